"""The build spec: YAML file -> validated, frozen `Spec`, with errors that point at file:line."""

from __future__ import annotations

import difflib
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic import ByteSize as PydanticByteSize

from builder.errors import SpecError
from builder.runtime.load import DEVICE_PATTERN

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*$"
# The bundle's folder, its GGUF files (name + "-Q4_K_M.gguf") and staging folders must fit one 255-byte file name.
MAX_NAME_LENGTH = 200
# A Hugging Face Hub model id as the card's `base_model` needs it: org/name.
HUB_MODEL_ID = r"[A-Za-z0-9][\w.-]*/[\w.-]+"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"



def hub_model_id(value: object) -> str | None:
    """`org/name` as the Hub spells model ids; a folder path (of this or any machine) is not one."""
    text = str(value or "")
    if not re.fullmatch(HUB_MODEL_ID, text) or Path(text).expanduser().exists() or ".." in text:
        return None
    return text


_VARIABLE_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
# A spec is a few hundred values; aliases that expand past this many are a "billion laughs" document, refused
# before anything is built from it (PyYAML itself would expand it without limit).
MAX_ALIAS_EXPANSION = 10_000
# A spec nests five levels deep (verify.prompts[0].expect.contains[0]); far deeper is hostile, and PyYAML's
# scanner slows quadratically with the nesting of [ and { (3000 levels take seconds to fail).
MAX_NESTING = 100

Location = tuple[str | int, ...]


def _parse_byte_size(value: Any) -> int:
    """Accept a byte count or a size such as "2GB", "500MB", "1.5GiB", read by pydantic's ByteSize (decimal units
    are powers of ten and binary ones powers of two, as in huggingface_hub's max_shard_size)."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a number of bytes or a size such as '2GB', got {value!r}")
    if isinstance(value, int) and value <= 0:
        raise ValueError(f"size must be greater than 0 bytes, got {value!r}")
    try:
        # pydantic reads the number and unit at the start and ignores what follows ("2 GB each"): refuse that.
        if isinstance(value, str) and not _SIZE_TEXT.fullmatch(value):
            raise ValueError(value)
        size = _BYTE_SIZE.validate_python(value)
    except (ValidationError, ValueError):
        raise ValueError(
            f"cannot read {value!r} as a size; write a number of bytes or a number with a unit "
            "(KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024), e.g. '2GB'"
        ) from None
    if size <= 0:
        raise ValueError(f"size must be greater than 0 bytes, got {value!r}")
    return int(size)


_BYTE_SIZE = TypeAdapter(PydanticByteSize)
_SIZE_TEXT = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*[A-Za-z]*\s*")
ByteSize = Annotated[
    int,
    BeforeValidator(_parse_byte_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "exclusiveMinimum": 0},
                # JSON Schema regexes take no flags: spell out the case-insensitive unit.
                {"type": "string", "pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*([KkMmGgTt][Ii]?[Bb]|[Bb])?\s*$"},
            ],
            "description": "Bytes, or a size with a unit: KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (of 1024).",
        }
    ),
]


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Make a path absolute against the spec file's folder, so a committed spec works from any cwd."""
    anchor = (info.context or {}).get("spec_dir", Path.cwd())
    try:
        expanded = value.expanduser()
    except RuntimeError:  # "~name/..." for a user this machine does not have
        raise ValueError(
            f"cannot expand {str(value)!r}: no such user's home folder; write ~/... or a full path"
        ) from None
    # normpath, not resolve(): keep symlinked model folders as the user named them.
    return Path(os.path.normpath(Path(anchor) / expanded))


SpecPath = Annotated[Path, AfterValidator(_resolve_path)]


def _as_list(value: Any) -> Any:
    """A lone string stands for a one-item list: `contains: 缺钙`."""
    return [value] if isinstance(value, str) else value


StringList = Annotated[
    list[str],
    BeforeValidator(_as_list),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]}),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelSpec(_Section):
    """The base model folder (config.json, weights, tokenizer files)."""

    path: SpecPath = Field(description="Directory of the base model.")
    trust_remote_code: bool = Field(
        default=False, description="The base ships its own modeling/tokenizer code (e.g. Qwen-7B-Chat v1)."
    )


class AdapterSpec(_Section):
    """The peft LoRA checkpoint folder."""

    path: SpecPath = Field(description="Directory holding adapter_config.json and the adapter weights.")
    allow_pickle: bool = Field(
        default=False,
        description="Read a legacy adapter_model.bin (pickle, loaded with torch.load(weights_only=True)) "
        "when the checkpoint has no adapter_model.safetensors.",
    )


class WeightedAdapterSpec(AdapterSpec):
    """One adapter of several composed into the bundle, with the weight its LoRA updates are multiplied by."""

    weight: float = Field(
        default=1.0,
        description="Multiplies this adapter's LoRA updates (W' = W + sum of weight * delta), like scaling it in "
        "peft. Negative weights subtract an adapter's effect (task negation); 0 is refused (the adapter would do "
        "nothing). Tensors an adapter replaces whole (modules_to_save, resized embeddings, trainable tokens) are "
        "taken as saved.",
    )

    @field_validator("weight")
    @classmethod
    def _weight_changes_something(cls, value: float) -> float:
        if not math.isfinite(value) or value == 0:
            raise ValueError(f"weight must be a finite number other than 0, got {value!r}; remove an adapter that "
                             "should do nothing")
        return value


@dataclass(frozen=True)
class AdapterSource:
    """One adapter of the build, however the spec wrote it: `key` names it in messages (adapter, adapters[1])."""

    key: str
    path: Path
    weight: float
    allow_pickle: bool


class TokenizerSpec(_Section):
    """Where the bundle's tokenizer comes from, for a base saved without one (merge_and_unload + save_pretrained)."""

    path: SpecPath = Field(
        description="Folder holding the tokenizer files (tokenizer.json or vocab files, tokenizer_config.json, the "
        "chat template; Qwen v1: qwen.tiktoken and tokenization_qwen.py), e.g. the original base model or the "
        "checkpoint the trainer saved the tokenizer into. Copied in place of the base's and the checkpoint's; "
        "its vocabulary must fit the model's embedding rows."
    )


class OutputSpec(_Section):
    """Where and how the bundle is written."""

    dir: SpecPath = Field(description="Bundle directory; replaced atomically when the build succeeds.")
    mode: Literal["merge", "separate"] = Field(
        default="merge", description="merge: one set of merged weights; separate: base weights plus adapter/."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto", description="Weight dtype of the bundle; auto keeps the base's dtype."
    )
    max_shard_size: ByteSize = Field(default=5 * 10**9)
    merge_device: Literal["cpu", "cuda", "auto"] = Field(
        default="cpu",
        description="Where the LoRA deltas are computed: cpu (the reference), cuda (the first GPU; base tensors "
        "stream through it, so GPU memory stays at a few tensors whatever the model size) or auto (cuda when a GPU "
        "is visible, else cpu). The GPU result equals the CPU result within one unit in the last place of the "
        "output dtype.",
    )


# Of what a spec can set, transformers' strict check (GenerationConfig.validate(strict=True), as of 5.25) refuses a
# sampling knob set away from its neutral value while do_sample is false; the rest the fields' bounds cover. Checked
# here with its words, without transformers (whose import brings torch's seconds into `validate`);
# tests/test_light_commands.py compares the verdicts and messages with transformers' on every combination of values.
_GREEDY_NEUTRAL: dict[str, float] = {"temperature": 1.0, "top_p": 1.0, "top_k": 50}
_GREEDY_CONFLICT = ("- `{flag}`: `do_sample` is not set to `True`. However, `{flag}` is set to `{value}` -- this flag "
                    "is only used in sample-based generation modes. You should set `do_sample=True` or unset `{flag}`.")
_PRETRAINED_NOTE = ("If you're using a pretrained model, note that some of these attributes may be set through the "
                    "model's `generation_config.json` file.")


class GenerationSpec(_Section):
    """Overrides for the bundle's generation_config.json; an unset field keeps the base's value."""

    max_new_tokens: Annotated[int, Field(gt=0)] | None = None
    do_sample: bool | None = None
    temperature: Annotated[float, Field(gt=0)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None

    @model_validator(mode="after")
    def _transformers_accepts(self) -> GenerationSpec:
        values = self.overrides()
        # Unset do_sample means the base decides; the sampling knobs are judged as if it samples,
        # since rejecting `temperature` alone would refuse a valid override of a sampling base.
        if values.get("do_sample") is not False:
            return self
        conflicts = [_GREEDY_CONFLICT.format(flag=key, value=values[key])
                     for key, neutral in _GREEDY_NEUTRAL.items() if key in values and values[key] != neutral]
        if conflicts:
            raise ValueError(" ".join(["GenerationConfig is invalid:", *conflicts, _PRETRAINED_NOTE]))
        return self

    def overrides(self) -> dict[str, Any]:
        """The fields the spec sets, ready to update a GenerationConfig."""
        return self.model_dump(exclude_none=True)


class ChatSpec(_Section):
    """Chat behaviour baked into the bundle."""

    system_prompt: str | None = Field(default=None, description="Default system prompt of the loader's chat().")
    template: SpecPath | None = Field(
        default=None, description="A .jinja chat template file that replaces the base's chat template."
    )


class CardSpec(_Section):
    """Model card text and metadata."""

    description: str | None = None
    base_model: str | None = Field(
        default=None, description="The base's Hugging Face Hub id (org/name) for the card's front matter; "
        "default: the adapter's recorded base when that is a Hub id, else none (a folder name is not a model id).",
    )
    license: str | None = None
    language: StringList = []
    tags: StringList = []
    intended_use: str | None = None
    limitations: str | None = None


    @field_validator("base_model")
    @classmethod
    def _base_model_is_a_hub_id(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(HUB_MODEL_ID, value):
            raise ValueError(f"{value!r} is not a Hub model id; write it as org/name (e.g. Qwen/Qwen-7B-Chat)")
        return value


class Expectation(_Section):
    """What a verification reply must (not) contain; every given check must pass."""

    contains: StringList = []
    not_contains: StringList = []
    equals: str | None = None
    regex: str | None = Field(default=None, description="Python regular expression searched in the reply.")

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as err:
                raise ValueError(f"invalid regular expression {value!r}: {err}") from None
        return value


class VerifyPrompt(_Section):
    """One prompt sent to the built bundle."""

    prompt: str
    expect: Expectation = Expectation()

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        return value


class VerifySpec(_Section):
    """Checks run on the finished bundle before it is published."""

    max_new_tokens: Annotated[int, Field(gt=0)] = 64
    prompts: list[VerifyPrompt] = Field(default=[], description="In-domain prompts; their expectations must hold.")
    probes: list[VerifyPrompt] = Field(
        default=[],
        description="General-skill prompts outside the tuning domain; replies are recorded, expectations optional.",
    )
    python: SpecPath | None = Field(
        default=None,
        description="Python interpreter (e.g. a virtualenv's bin/python) that runs every check loading the model; "
        "default: the one running modelpack. Use the deployment's environment when the model's code needs other "
        "library versions (Qwen-7B-Chat v1: transformers<5).",
    )
    device: str = Field(
        default="auto",
        pattern=f"^({DEVICE_PATTERN})$",
        description="Where verification loads the model: auto = every visible GPU (accelerate's device_map) "
        "when there is one, else the CPU; cpu, cuda, cuda:N (one GPU) or mps.",
    )
    compare_base: bool = Field(
        default=False,
        description="Also answer every prompt and probe with the base model alone, shown beside the tuned "
        "answers in the report and the card (costs a second generation pass).",
    )
    serve: list[Literal["vllm"]] = Field(
        default=[],
        description="Serving engines that verification starts the bundle in, the way the card's command does, "
        "asking every prompt and probe and comparing the token ids with the bundle's answers in transformers.",
    )
    vllm_python: SpecPath | None = Field(
        default=None,
        description="Python interpreter of a virtualenv with vLLM (it pins its own torch and transformers), for "
        "serve: [vllm]; without one the stage is reported as not run (build and verify take --vllm-python too).",
    )
    vllm_tensor_parallel_size: Annotated[int, Field(gt=0)] | None = Field(
        default=None,
        description="vLLM's --tensor-parallel-size: the GPUs one model is split over; shown in the card's vLLM "
        "command and passed to the serving stage.",
    )

    @field_validator("serve")
    @classmethod
    def _engines_once_each(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("each serving engine once")
        return value


QuantizedGgufType = Literal["q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0"]
KldBudget = Annotated[float, Field(gt=0)]
Top1Budget = Annotated[float, Field(ge=0, le=1)]


class GgufTypeBudget(_Section):
    """One quantized type's own budget: whatever it names replaces export.gguf.budget's value for that type."""

    max_mean_kld: KldBudget | None = None
    min_top1: Top1Budget | None = None
    expectations: bool | None = None


class GgufBudget(_Section):
    """The quality budget of the quantized GGUF variants against the 16-bit GGUF: one value for every variant, with
    per-type overrides under `types` (expected divergence differs about six-fold between q6_k and q4_k_m)."""

    max_mean_kld: KldBudget | None = Field(default=None, description=(
        "The largest mean KL divergence KL(p_16bit || p_variant) allowed, for every variant; default: modelpack's "
        "per type (q8_0 0.005, q6_k 0.02, q5_k_m 0.05, q5_0 0.06, q4_k_m 0.1, q4_0 0.15)."))
    min_top1: Top1Budget = Field(0.0, description=(
        "The smallest share of positions whose top token agrees with the 16-bit GGUF's, for every variant."))
    expectations: bool = Field(False, description=(
        "Require the spec's verification expectations of the quantized answers too (by default they are reported: "
        "a quantized file rounds the weights, and a 4-bit answer may word things otherwise)."))
    types: dict[QuantizedGgufType, GgufTypeBudget] = Field(default_factory=dict, description=(
        "Per-type overrides, e.g. {q4_k_m: {max_mean_kld: 0.1}}."))

    @field_validator("max_mean_kld", mode="before")
    @classmethod
    def _one_value(cls, value: Any) -> Any:
        if isinstance(value, Mapping):
            raise ValueError("one number for every variant; per-type budgets go under export.gguf.budget.types, "
                             "e.g. types: {q4_k_m: {max_mean_kld: 0.1}}")
        return value


class GgufExportSpec(_Section):
    """GGUF files for llama.cpp and Ollama, written into the bundle's gguf/ folder from the merged weights."""

    types: Annotated[list[Literal["f16", "bf16"] | QuantizedGgufType],
                     Field(min_length=1)] = Field(
        description="One gguf/NAME-<type>.gguf per type; the first is the one gguf/Modelfile serves. "
        "q8_0 is quantized by llama.cpp's own gguf library; q6_k, q5_k_m, q4_k_m, q5_0 and q4_0 by llama.cpp's "
        "quantizer (llama-cpp-python, the `gguf` extra) from the 16-bit GGUF, which is made even when not listed."
    )
    budget: GgufBudget = Field(default_factory=GgufBudget, description=(
        "How far each quantized variant may move the 16-bit GGUF's next-token distributions, measured in llama.cpp "
        "on the verification prompts, their answers and the probes; a variant over it fails verification."))
    eval_text: SpecPath | None = Field(default=None, description=(
        "A UTF-8 text file (held-out data of the fine-tune's own kind) also scored when measuring the quantized "
        "variants, in chunks of 512 tokens, up to its first 8,192 tokens (at most 16 MiB); about 2,000 tokens or more "
        "give a firm figure."))

    @field_validator("types")
    @classmethod
    def _types_once_each(cls, value: list[str]) -> list[str]:
        repeated = sorted({t for t in value if value.count(t) > 1})
        if repeated:
            raise ValueError(f"each GGUF type once: {', '.join(repeated)} is listed more than once")
        return value

    @model_validator(mode="after")
    def _budgets_of_listed_types(self) -> GgufExportSpec:
        unlisted = [t for t in self.budget.types if t not in self.types]
        if unlisted:
            raise ValueError(f"budget.types names {', '.join(unlisted)}, which export.gguf.types does not list: list "
                             "it or drop its budget")
        return self


class ExportSpec(_Section):
    """Formats written beside the Hugging Face weights, each checked by verification in its own runtime."""

    gguf: GgufExportSpec | None = None


class Spec(_Section):
    """A modelpack build: base model + LoRA adapter(s) -> a verified bundle."""

    # Editors learn the rule _one_adapter_section enforces: exactly one of `adapter` and `adapters`.
    model_config = ConfigDict(extra="forbid", frozen=True,
                              json_schema_extra={"oneOf": [{"required": ["adapter"]}, {"required": ["adapters"]}]})

    name: str = Field(json_schema_extra={"pattern": NAME_PATTERN})
    base: BaseModelSpec
    adapter: AdapterSpec | None = Field(default=None, description="The LoRA checkpoint (one adapter, weight 1); "
                                        "give either this or `adapters`.")
    adapters: Annotated[list[WeightedAdapterSpec], Field(min_length=1)] | None = Field(
        default=None, description="Several LoRA checkpoints trained on the same base, composed with their weights: "
        "merge mode sums their updates, separate mode concatenates them into one adapter; give either this or "
        "`adapter`.",
    )
    tokenizer: TokenizerSpec | None = Field(
        default=None, description="A tokenizer folder, when the base has none; default: the checkpoint's saved "
        "tokenizer, else the base's.",
    )
    output: OutputSpec
    generation: GenerationSpec = GenerationSpec()
    chat: ChatSpec = ChatSpec()
    card: CardSpec = CardSpec()
    verify: VerifySpec = VerifySpec()
    export: ExportSpec = ExportSpec()

    @field_validator("name")
    @classmethod
    def _name_is_portable(cls, value: str) -> str:
        # fullmatch: `$` alone also matches before a trailing newline, which would then reach file and card names.
        if not re.fullmatch(NAME_PATTERN, value) or len(value) > MAX_NAME_LENGTH:
            raise ValueError(
                f"invalid name {value[:80]!r}: use letters, digits, '.', '_' and '-', starting with a letter or digit, "
                f"at most {MAX_NAME_LENGTH} characters"
            )
        return value

    @field_validator("adapters")
    @classmethod
    def _adapters_once_each(cls, value: list[WeightedAdapterSpec] | None, info: ValidationInfo):
        if value is not None and info.data.get("adapter") is not None:
            raise ValueError("give either `adapter:` (one adapter) or `adapters:` (a list with weights), not both")
        paths = [a.path for a in value or []]
        repeated = next((p for p in paths if paths.count(p) > 1), None)
        if repeated is not None:
            raise ValueError(f"{repeated} is listed more than once; list each adapter once, with its total weight")
        return value

    @model_validator(mode="after")
    def _one_adapter_section(self) -> Spec:
        if self.adapter is None and self.adapters is None:
            raise ValueError("no adapter: give `adapter:` with a checkpoint path, or `adapters:` as a list of "
                             "{path, weight}")
        return self

    @property
    def adapter_sources(self) -> tuple[AdapterSource, ...]:
        """Every adapter of the build in spec order; a single `adapter:` is one adapter of weight 1."""
        if self.adapters is None:
            assert self.adapter is not None  # _one_adapter_section
            return (AdapterSource("adapter", self.adapter.path, 1.0, self.adapter.allow_pickle),)
        return tuple(AdapterSource(f"adapters[{i}]", a.path, a.weight, a.allow_pickle)
                     for i, a in enumerate(self.adapters))


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema of the spec file, for editors (`modelpack schema > specs/modelpack.schema.json`)."""
    schema = Spec.model_json_schema()
    schema.pop("title", None)
    return {"$schema": JSON_SCHEMA_DIALECT, "title": "modelpack spec", **schema}


def load_spec(path: Path, *, environ: Mapping[str, str] | None = None, check_paths: bool = True) -> Spec:
    """Read, expand and validate a spec file; every problem becomes one SpecError naming file:line."""
    shown = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file not found: {shown}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"cannot read spec file {shown}: {err}") from None

    data, lines = _parse_yaml(text, shown)
    data, origins = _expand_variables(data, lines, shown, os.environ if environ is None else environ)
    spec_dir = Path(os.path.normpath(Path(path).expanduser().absolute().parent))
    try:
        spec = Spec.model_validate(data, context={"spec_dir": spec_dir})
    except ValidationError as err:
        problems = sorted((_line_of(e["loc"], lines), _key_path(e["loc"]), _describe(e)) for e in err.errors())
        raise SpecError(_invalid(shown, problems)) from None
    if check_paths:
        _check_paths(spec, data, origins, lines, shown)
    return spec


def _invalid(shown: str, problems: list[tuple[int, str, str]]) -> str:
    return "\n".join([f"invalid spec {shown}:"] + [f"{shown}:{line}: {key}: {msg}" for line, key, msg in problems])


class _SpecLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing [ / { nested past MAX_NESTING while scanning, before its cost grows."""

    def fetch_flow_collection_start(self, token_class):
        if self.flow_level >= MAX_NESTING:
            raise yaml.scanner.ScannerError(
                problem=f"nested deeper than {MAX_NESTING} levels", problem_mark=self.get_mark()
            )
        super().fetch_flow_collection_start(token_class)


def _parse_yaml(text: str, shown: str) -> tuple[dict[str, Any], dict[Location, int]]:
    """Load the YAML document and the line (1-based) of every mapping key and sequence item."""
    loader = _SpecLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_alias_expansion(node, shown)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{shown}:{mark.line + 1}" if mark else shown
        reason = ": ".join(part for part in (err.context, err.problem) if part)
        raise SpecError(f"{where}: invalid YAML: {reason}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"{shown}: invalid YAML: {err}") from None
    except RecursionError:  # PyYAML composes recursively: indented nesting can exhaust the stack first
        raise SpecError(f"{shown}: invalid YAML: nested deeper than {MAX_NESTING} levels") from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        found = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{shown}: a spec must be a mapping of keys (name, base, adapter, ...), found {found}")
    lines: dict[Location, int] = {(): node.start_mark.line + 1}
    _record_lines(node, (), lines, shown)
    return data, lines


def _check_alias_expansion(root: yaml.Node, shown: str) -> None:
    """Refuse a document nested past MAX_NESTING levels, or whose aliases expand past MAX_ALIAS_EXPANSION values.

    PyYAML's composed graph shares an anchored node between its uses, so the graph stays as small as the text;
    expanding it (constructing, then walking the data) is what explodes. Walking the graph and counting every
    node reached again through an alias (with everything below it) measures that expansion at a bounded cost,
    and stops self-referencing aliases too.
    """
    seen: set[int] = set()
    reused = 0
    stack: list[tuple[yaml.Node, int, yaml.Node | None]] = [(root, 0, None)]
    while stack:
        node, depth, reused_anchor = stack.pop()
        if reused_anchor is None and id(node) in seen:
            reused_anchor = node
        if depth > MAX_NESTING:
            through = " through aliases of the anchor at this line" if reused_anchor else ""
            line = (reused_anchor or node).start_mark.line + 1
            raise SpecError(f"{shown}:{line}: invalid YAML: nested deeper than {MAX_NESTING} levels{through}")
        seen.add(id(node))
        if reused_anchor is not None:
            reused += 1
            if reused > MAX_ALIAS_EXPANSION:
                raise SpecError(
                    f"{shown}:{reused_anchor.start_mark.line + 1}: invalid YAML: aliases of the anchor at this line "
                    f"expand to more than {MAX_ALIAS_EXPANSION} values (nested or self-referencing aliases); "
                    "write the values out instead"
                )
        if isinstance(node, yaml.MappingNode):
            stack.extend((child, depth + 1, reused_anchor) for pair in node.value for child in pair)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, depth + 1, reused_anchor) for child in node.value)


def _record_lines(node: yaml.Node, loc: Location, lines: dict[Location, int], shown: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            child = loc + (key_node.value,)
            if child in lines:
                # PyYAML silently keeps the last duplicate; a strict spec names both lines instead.
                raise SpecError(
                    f"{shown}:{key_node.start_mark.line + 1}: {_key_path(child)}: "
                    f"duplicate key (first at line {lines[child]})"
                )
            lines[child] = key_node.start_mark.line + 1
            _record_lines(value_node, child, lines, shown)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[loc + (index,)] = item.start_mark.line + 1
            _record_lines(item, loc + (index,), lines, shown)


def _expand_variables(
    value: Any, lines: dict[Location, int], shown: str, environ: Mapping[str, str]
) -> tuple[Any, dict[Location, tuple[str, dict[str, str]]]]:
    """Replace `${NAME}` / `${NAME:-default}` in every string value; remember what each expanded string was written as.

    An unset or empty variable without a default is an error: an empty `${DIST}` would silently turn
    `${DIST}/bundle` into `/bundle`.
    """
    origins: dict[Location, tuple[str, dict[str, str]]] = {}
    problems: list[tuple[int, str, str]] = []

    def expand(item: Any, loc: Location) -> Any:
        if isinstance(item, dict):
            return {key: expand(child, loc + (key,)) for key, child in item.items()}
        if isinstance(item, list):
            return [expand(child, loc + (index,)) for index, child in enumerate(item)]
        if not isinstance(item, str):
            return item
        used: dict[str, str] = {}

        def substitute(match: re.Match) -> str:
            name, default = match.group(1), match.group(2)
            value = environ.get(name) or default
            if value is None and name not in used:
                problem = (
                    f'environment variable {name} is not set (used in "{item}")'
                    if name not in environ
                    else f'environment variable {name} is set but empty (used in "{item}"); '
                    f"give it a value, or write ${{{name}:-}} if empty is meant"
                )
                problems.append((_line_of(loc, lines), _key_path(loc), problem))
            used[name] = value or ""
            return value or ""

        expanded = _VARIABLE_PATTERN.sub(substitute, item)
        if used:
            origins[loc] = (item, used)
        return expanded

    expanded = expand(value, ())
    if problems:
        raise SpecError(_invalid(shown, problems))
    return expanded, origins


def _check_paths(
    spec: Spec,
    data: dict[str, Any],
    origins: dict[Location, tuple[str, dict[str, str]]],
    lines: dict[Location, int],
    shown: str,
) -> None:
    adapters: list[tuple[Location, Path | None, str]] = [
        (("adapter", "path") if source.key == "adapter" else ("adapters", index, "path"), source.path, "directory")
        for index, source in enumerate(spec.adapter_sources)
    ]
    wanted = [
        (("base", "path"), spec.base.path, "directory"),
        *adapters,
        (("tokenizer", "path"), spec.tokenizer.path if spec.tokenizer else None, "directory"),
        (("chat", "template"), spec.chat.template, "file"),
        (("verify", "python"), spec.verify.python, "file"),
    ]
    problems = []
    for loc, resolved, kind in wanted:
        if resolved is None or (resolved.is_dir() if kind == "directory" else resolved.is_file()):
            continue
        reason = f"not a {kind}" if resolved.exists() else f"{kind} not found"
        written, variables = origins.get(loc, (_value_at(data, loc), {}))
        sources = [f'"{written}"'] if written != str(resolved) else []
        sources += [f"{name}={value}" for name, value in variables.items()]
        source = f" (from {', '.join(sources)})" if sources else ""
        problems.append((_line_of(loc, lines), _key_path(loc), f"{reason}: {resolved}{source}"))
    if problems:
        raise SpecError(_invalid(shown, problems))


def _value_at(data: Any, loc: Location) -> Any:
    for part in loc:
        data = data[part]
    return data


def _line_of(loc: Location, lines: dict[Location, int]) -> int:
    """The line of the nearest written ancestor: a missing key is reported at its parent mapping."""
    while loc not in lines:
        loc = loc[:-1]
    return lines[loc]


def _key_path(loc: Location) -> str:
    """`("verify", "prompts", 0, "expect")` -> `verify.prompts[0].expect`."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else part
    return path or "(top level)"


def _describe(error: Any) -> str:
    """A pydantic error in the spec author's words."""
    kind = error["type"]
    if kind == "extra_forbidden":
        return _unknown_key(error["loc"])
    if kind == "missing":
        return "required key is missing"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    if kind == "model_type":
        return f"expected a mapping of keys, got {error['input']!r}"
    if isinstance(error["input"], str | int | float | bool | None):
        return f"{error['msg']}, got {error['input']!r}"
    return error["msg"]


def _unknown_key(loc: Location) -> str:
    unknown = str(loc[-1])
    valid = list(_section_at(loc[:-1]).model_fields)
    close = difflib.get_close_matches(unknown, valid, n=1)
    if close:
        return f"unknown key {unknown!r}; did you mean {close[0]!r}?"
    return f"unknown key {unknown!r}; valid keys: {', '.join(valid)}"


def _section_at(loc: Location) -> type[BaseModel]:
    """The model class validating the mapping at `loc` (list indices step into the item type)."""
    section: type[BaseModel] = Spec
    for part in loc:
        if isinstance(part, int):
            continue
        annotation = section.model_fields[part].annotation
        section = next(_models_in(annotation))
    return section


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
    for arg in get_args(annotation):
        yield from _models_in(arg)
