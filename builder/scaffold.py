"""`modelpack init`: a commented spec drafted from a training run's checkpoint folder and the base model it names."""

from __future__ import annotations

import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import yaml

from builder.chat import default_system_prompt
from builder.errors import OutputError, SourceError
from builder.inspection import (
    CHECKPOINT_FOLDER,
    ChosenCheckpoint,
    choose_checkpoint,
    describe_count,
    parameter_count,
)
from builder.refusals import POSITION_LIMIT_KEYS
from builder.sources import (
    VOCABULARY_FILE_NAMES,
    AdapterCheckpoint,
    BaseModelFolder,
    TokenizerFolder,
    code_files,
    read_adapter_checkpoint,
    read_base_model,
    read_tokenizer_folder,
    require_text_path,
)
from builder.spec import NAME_PATTERN, GenerationSpec, hub_model_id
from builder.tokenizer_files import tokenizer_declarations

PLACEHOLDER_PROMPT = "Replace this with a question from your fine-tuning data"
# General skills a fine-tune may lose (the seed's medical model answered a greeting with medical advice).
GENERAL_PROBES = ("Hello! Who are you?", "What is machine learning? Answer in one sentence.")
VERIFY_MAX_NEW_TOKENS = 64
# Sampling knobs transformers ignores (and its strict check refuses) when the base decodes greedily.
SAMPLING_KEYS = ("temperature", "top_p", "top_k")
COMMENT_COLUMN = 34
MAX_LINE = 120


@dataclass(frozen=True)
class Draft:
    """A spec drafted from what was found, not yet written."""

    spec_file: Path
    name: str
    checkpoint: ChosenCheckpoint
    base: Path
    base_reason: str
    text: str


def find_base(adapter: AdapterCheckpoint, base_option: Path | None) -> tuple[Path, str]:
    """The base model folder: --base when given, else the folder adapter_config.json records, when it is here."""
    if base_option is not None:
        if not (base_option / "config.json").is_file():
            raise SourceError(f"--base {base_option}: no config.json there; give the base model's folder")
        return base_option, "from --base"
    recorded = adapter.config.get("base_model_name_or_path")
    where = adapter.path / "adapter_config.json"
    try:
        local = Path(recorded).expanduser() if recorded else None
    except RuntimeError:  # `~someone/...` of a user this machine does not have
        raise SourceError(f"{where} records the base {recorded!r}, whose `~` names no user on this machine; give "
                          "the base model's folder with --base PATH") from None
    if local is not None and (local / "config.json").is_file():
        return local, f"recorded in {where.name}"
    if recorded and hub_model_id(recorded):
        raise SourceError(f"{where} names the Hub model {recorded!r}, and modelpack reads local folders only: download "
                          f"it (huggingface-cli download {recorded} --local-dir DIR) and give --base DIR")
    found = f"records the base {recorded!r}, which is not a model folder on this machine" if recorded else \
        "records no base model (base_model_name_or_path)"
    raise SourceError(f"{where} {found}; give the base model's folder with --base PATH")


def draft_spec(checkpoint: Path, *, base: Path | None = None, spec_file: Path | None = None) -> Draft:
    """Read the checkpoint and its base (configs and headers only) and draft a spec that validates as written."""
    if spec_file is not None:
        require_text_path(spec_file, "-o")
    chosen = choose_checkpoint(checkpoint)
    allow_pickle = not (chosen.path / "adapter_model.safetensors").is_file() and \
        (chosen.path / "adapter_model.bin").is_file()
    adapter = read_adapter_checkpoint(chosen.path, allow_pickle=allow_pickle)
    base_path, base_reason = find_base(adapter, base)
    base_folder = read_base_model(base_path)
    tokenizer = None if base_folder.tokenizer_files else _tokenizer_near(chosen.path)
    name = _portable_name(spec_file.stem if spec_file else _run_name(chosen.path))
    if code_files(base_folder, tokenizer or adapter):  # transformers 4.x cannot import model code from a dotted name
        name = name.replace(".", "-")
    spec_file = spec_file or Path("specs") / f"{name}.yaml"
    text = spec_text(name, spec_file, adapter, base_folder, allow_pickle=allow_pickle, tokenizer=tokenizer)
    return Draft(spec_file, name, chosen, base_path, base_reason, text)


def write_draft(draft: Draft, *, force: bool = False) -> None:
    if draft.spec_file.exists() and not force:
        raise OutputError(f"{draft.spec_file} already exists; choose another file with -o, or replace it with --force")
    try:
        draft.spec_file.parent.mkdir(parents=True, exist_ok=True)
        draft.spec_file.write_text(draft.text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"{draft.spec_file}: cannot write the drafted spec there ({exc.strerror})",
                          path=draft.spec_file, errno=exc.errno) from exc


def _tokenizer_near(checkpoint: Path) -> TokenizerFolder | None:
    """For a base saved without a tokenizer: the tokenizer the trainer saved in the checkpoint, or in the run's
    output folder above a checkpoint-N folder (where Trainer saves it at the end)."""
    folder = Path(os.path.abspath(checkpoint))
    candidates = [folder, folder.parent] if CHECKPOINT_FOLDER.match(folder.name) else [folder]
    for candidate in candidates:
        if any((candidate / name).is_file() for name in VOCABULARY_FILE_NAMES) or any(candidate.glob("*.tiktoken")):
            return read_tokenizer_folder(candidate)
    return None


def _run_name(checkpoint: Path) -> str:
    """A Trainer's checkpoint-N folder is named after the step: the run's folder above it names the model."""
    folder = Path(os.path.abspath(checkpoint))
    return folder.parent.name if CHECKPOINT_FOLDER.match(folder.name) else folder.name


def _portable_name(text: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return name if re.match(NAME_PATTERN, name) else "bundle"


def spec_text(name: str, spec_file: Path, adapter: AdapterCheckpoint, base: BaseModelFolder, *,
              allow_pickle: bool, tokenizer: TokenizerFolder | None = None) -> str:
    """The spec as YAML with a comment on every value that says where it came from or what to change."""
    spec_dir = Path(os.path.abspath(spec_file)).parent

    def relative(path: Path) -> str:
        return Path(os.path.relpath(os.path.abspath(path), spec_dir)).as_posix()

    config = adapter.config
    targets = config.get("target_modules") or []
    code = code_files(base, tokenizer or adapter)
    dtype = base.config.get("torch_dtype") or base.config.get("dtype")
    dtype = dtype if dtype in ("bfloat16", "float16", "float32") else "auto"
    architecture = (base.config.get("architectures") or ["?"])[0]
    recorded = config.get("base_model_name_or_path")
    hub_id = hub_model_id(recorded) or hub_model_id(base.config.get("_name_or_path"))
    base_card = _base_card_metadata(base.path)
    system_prompt = _template_system_prompt(tokenizer or adapter, base)
    targets_text = ", ".join(sorted(targets)) if isinstance(targets, list) else targets
    out = [
        _comment(f"# Drafted by `modelpack init` from {relative(adapter.path)}: LoRA r={config.get('r', 8)}, "
                 f"alpha={config.get('lora_alpha', 8)} on {targets_text}."),
        "# Paths are relative to this file. Read every value, then: modelpack build " + spec_file.as_posix(),
        f"name: {_yaml(name)}",
        "base:",
        _line(f"  path: {_yaml(relative(base.path))}",
              f"{architecture}, {describe_count(parameter_count(base))} parameters, {dtype}"),
    ]
    if code:
        out.append(_line("  trust_remote_code: true", "the base ships its own code, which loading runs: "
                         + ", ".join(p.name for p in code) + " (read it)"))
    else:
        out.append(_line("  trust_remote_code: false", "the base ships no model code"))
    out += ["adapter:",
            _line(f"  path: {_yaml(relative(adapter.path))}", _recorded_base_comment(recorded, base.path))]
    if allow_pickle:
        out.append(_line("  allow_pickle: true", "only adapter_model.bin here; read as plain tensors (weights_only)"))
    if tokenizer is not None:
        out += ["tokenizer:", _line(f"  path: {_yaml(relative(tokenizer.path))}",
                                    "the base has no tokenizer files; the one the trainer saved here")]
    elif not base.tokenizer_files and not adapter.tokenizer_files:
        out += [_line("# tokenizer: {path: PATH}", "the base has no tokenizer files: name a folder that holds "
                      "them (the original base model); the build needs one")]
    out += [
        "output:",
        f"  dir: {_yaml(relative(Path('dist') / name))}",
        _line("  mode: merge", "merge: one set of weights, loads without peft; separate: base + adapter/"),
        _line(f"  dtype: {dtype}", "the base's own dtype" if dtype != "auto" else "the base's own dtype"),
        "  max_shard_size: 5GB",
    ]
    out += _generation_lines(base)
    out += [
        "chat:",
        _line(f"  system_prompt: {_yaml(system_prompt)}",
              "the chat template's default system message" if system_prompt else
              "the chat template has no default; load.py's chat() sends this one when set"),
        "card:",
        _line("  description: null", "a paragraph for the model card: what was tuned, on which data"),
        _line(f"  base_model: {_yaml(hub_id)}", "the base's Hub id (org/name) for the card's front matter"
              if hub_id else "the base's Hub id (org/name), if it has one; a folder name is not one"),
        _line(f"  license: {_yaml(base_card.get('license'))}",
              "from the base's model card" if base_card.get("license") else "e.g. apache-2.0; the base's terms apply"),
        f"  language: {_yaml(_as_list(base_card.get('language')))}",
        "  tags: [lora]",
        "  intended_use: null",
        "  limitations: null",
        "verify:",
        f"  max_new_tokens: {_verify_tokens(base)}",
        *(["  # python: /path/to/venv/bin/python   # an interpreter where the model's code runs, if this one's "
            "transformers cannot"] if code else []),
        _line("  prompts:", "must pass; add `expect: {contains: [...]}` with what the answer must hold"),
        f"    - prompt: {_yaml(PLACEHOLDER_PROMPT)}",
        _line("  probes:", "general skills: answers are recorded in the card"),
        *(f"    - prompt: {_yaml(probe)}" for probe in GENERAL_PROBES),
    ]
    return "\n".join(out) + "\n"


def _generation_lines(base: BaseModelFolder) -> list[str]:
    """The base's own generation defaults, as the bundle's generation_config.json will carry them."""
    found = base.generation_config or {}
    values = {key: found[key] for key in GenerationSpec.model_fields if found.get(key) is not None}
    if values.get("do_sample") is False:
        values = {k: v for k, v in values.items() if k not in SAMPLING_KEYS}
    try:
        GenerationSpec.model_validate(values)
    except ValueError:  # values transformers would refuse: the spec starts from none and the bundle keeps the base's
        values = {}
    if not values:
        return [_line("generation: {}", "the base sets no defaults: add do_sample, temperature, max_new_tokens...")]
    return [_line("generation:", "the base's generation_config.json; change what the bundle should use")] + [
        f"  {key}: {_yaml(value)}" for key, value in values.items()]


def _recorded_base_comment(recorded: object, base: Path) -> str:
    if not recorded:
        return "adapter_config.json records no base"
    if os.path.abspath(str(recorded)) == os.path.abspath(base):
        return "trained on the base above"
    return f"trained on {Path(str(recorded)).name}, recorded in adapter_config.json"


def _template_system_prompt(tokenizer: AdapterCheckpoint | TokenizerFolder, base: BaseModelFolder) -> str | None:
    """The default system message of the chat template the bundle will ship (tokenizer.path's or the checkpoint's
    tokenizer, if any)."""
    files = tokenizer.tokenizer_files or base.tokenizer_files
    declared = tokenizer_declarations({p.name: p for p in files})
    if declared.template is None:
        return None
    return default_system_prompt(declared.template, declared.template_tokens, source=declared.template_source)


def _base_card_metadata(folder: Path) -> dict:
    """The base's model card front matter (license, language), when it has a card that parses."""
    from huggingface_hub import metadata_load

    card = folder / "README.md"
    try:
        return (metadata_load(card) or {}) if card.is_file() else {}
    except (ValueError, yaml.YAMLError):
        return {}


def _verify_tokens(base: BaseModelFolder) -> int:
    """Enough for a short answer, and room for a prompt within the base's positions."""
    limit = next((base.config[k] for k in POSITION_LIMIT_KEYS if type(base.config.get(k)) is int), None)
    return VERIFY_MAX_NEW_TOKENS if limit is None else max(1, min(VERIFY_MAX_NEW_TOKENS, limit // 2))


def _as_list(value: object) -> list:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value) if isinstance(value, list) else []


def _yaml(value: object) -> str:
    """One value as YAML on one line (quoted only when YAML needs it)."""
    text = yaml.safe_dump(value, allow_unicode=True, default_flow_style=True, width=1 << 20)
    return text.removesuffix("\n").removesuffix("\n...").strip()


def _comment(text: str) -> str:
    """Text from the checkpoint made safe for a YAML comment: a line break in it (YAML also breaks lines at NEL,
    LS and PS) would start a line of YAML, i.e. a key; every control or bidi character is written escaped."""
    return "".join(c if c.isprintable() and unicodedata.bidirectional(c) not in _BIDI_CONTROLS
                   else repr(c)[1:-1] for c in text)


_BIDI_CONTROLS = {"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"}


def _line(text: str, comment: str) -> str:
    """A value with its comment beside it, or above it when together they would run past a screen's width."""
    comment = _comment(comment)
    line = f"{text:<{COMMENT_COLUMN}}# {comment}" if len(text) < COMMENT_COLUMN else f"{text}  # {comment}"
    if len(line) <= MAX_LINE:
        return line
    indent = text[:len(text) - len(text.lstrip())]
    return f"{indent}# {comment}\n{text}"
