"""What the GGUF export needs to know before any weight is read, as data and pure checks: which architectures and
tokenizers it exports, the files' names and a bound for their size, and why a spec cannot be exported.

Names are llama.cpp's own (`gguf.MODEL_ARCH_NAMES`); the `gguf` package itself (and numpy with it) is imported only
where a spec asks for GGUF, so planning a build without it stays light.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

from builder.chat import QWEN_V1_DEFAULT_SYSTEM, ChatFacts
from builder.errors import SourceError, SpecError

if TYPE_CHECKING:
    from builder.sources import BaseModelFolder
    from builder.spec import Spec

# config.json `architectures[0]` -> llama.cpp architecture name (convert_hf_to_gguf.py's registrations).
ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
    "QWenLMHeadModel": "qwen",  # Qwen-7B-Chat (v1, remote code)
}
# Spec type -> (elements per block, bytes per block) of its 2-D weights: gguf.GGML_QUANT_SIZES of F16, BF16, Q8_0
# (a test holds this table to the library's).
GGUF_BLOCK_SIZES = {"f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34)}
F32_BYTES = 4
# tokenizer.json Split patterns -> llama.cpp's pre-tokenizer name (tokenizer.ggml.pre). llama.cpp implements each
# with its own copy of the regex; src/llama-vocab.cpp quotes the tokenizer.json original beside it.
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PRE_TOKENIZERS = {
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _REST: "qwen2",
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _REST: "llama-bpe",
}
# Rotary scaling kinds the converter writes as metadata alone; Llama 3's also needs a rope_freqs tensor.
METADATA_ROPE_SCALING = ("linear", "yarn")


# Qwen v1 has no Jinja chat template: its remote code builds ChatML in make_context (qwen_generation_utils.py), always
# with a system message, "You are a helpful assistant." unless the caller gives one. This template writes that prompt.
QWEN_V1_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\n' + default_system + '<|im_end|>\\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def embedded_chat_template(chat: ChatFacts, generation_config: dict | None) -> str | None:
    """tokenizer.chat_template: the bundle's chat template; for a model that names its prompt format instead (Qwen v1:
    `chat_format: chatml`), the Jinja template of the prompt its own code builds."""
    if chat.template is not None:
        return chat.template
    if (generation_config or {}).get("chat_format") == "chatml":
        return QWEN_V1_CHAT_TEMPLATE.replace("default_system", json.dumps(QWEN_V1_DEFAULT_SYSTEM))
    return None


def gguf_path(name: str, gguf_type: str) -> str:
    """Where a GGUF export lies in the bundle (gguf/Modelfile serves the first type from the same folder)."""
    return f"gguf/{name}-{gguf_type}.gguf"


def gguf_architecture(config: dict, config_file: Path) -> str:
    """The llama.cpp architecture name of a Hugging Face config, or a user error naming it and the supported ones."""
    architectures = config.get("architectures") or [None]
    name = architectures[0]
    if name not in ARCHITECTURES:
        raise SourceError(
            f"{config_file}: architecture {name!r} has no GGUF export in modelpack (it exports "
            f"{', '.join(ARCHITECTURES)}); remove `export.gguf` from the spec"
        )
    return ARCHITECTURES[name]


def refuse_unexportable(spec: Spec, base: BaseModelFolder, *, tensor_names: list[str],
                        tokenizer_files: dict[str, Path], spec_file: Path) -> None:
    """Everything that would stop the GGUF export, checked at plan time before any work (no-op without export.gguf)."""
    if spec.export.gguf is None:
        return
    if spec.output.mode != "merge":
        raise SpecError(f"{spec_file}: export.gguf converts merged weights; set `output.mode: merge` to export GGUF "
                        "(or remove export.gguf)")
    config_file = base.path / "config.json"
    arch = gguf_architecture(base.config, config_file)
    rope_scaling(base.config, arch, config_file)
    if arch == "qwen":
        if "qwen.tiktoken" not in tokenizer_files:
            raise SourceError(f"base.path {base.path}: Qwen v1's vocabulary is qwen.tiktoken, which is missing; "
                              "copy it from the original model")
    elif "tokenizer.json" not in tokenizer_files:
        raise SourceError(f"base.path {base.path}: the GGUF export reads the vocabulary from tokenizer.json, which the "
                          "model's tokenizer files lack; save the tokenizer with a fast tokenizer (tokenizer.json)")
    else:
        tokenizer_file = tokenizer_files["tokenizer.json"]
        pre_tokenizer(json.loads(tokenizer_file.read_text(encoding="utf-8")), tokenizer_file)
    unknown = [n for n in tensor_names if gguf_tensor_name(arch, base.config, n) is None and not skipped_tensor(n)]
    if unknown:
        raise SourceError(f"{config_file}: tensor {unknown[0]!r} has no {arch} GGUF name "
                          f"({len(unknown)} such tensors); remove `export.gguf` from the spec")


def pre_tokenizer(tokenizer: dict, tokenizer_file: Path) -> str:
    """llama.cpp's name for a byte-level BPE tokenizer's pre-tokenizer, recognised from its structure in
    tokenizer.json: GPT-2's ByteLevel regex, or a Split regex llama.cpp implements followed by ByteLevel."""
    model = tokenizer.get("model") or {}
    step = tokenizer.get("pre_tokenizer") or {}
    if model.get("type") == "BPE":
        if step.get("type") == "ByteLevel" and step.get("use_regex", True) and not step.get("add_prefix_space"):
            return "gpt-2"
        steps = step.get("pretokenizers") if step.get("type") == "Sequence" else None
        if (isinstance(steps, list) and len(steps) == 2 and steps[0].get("type") == "Split"
                and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
                and steps[1].get("type") == "ByteLevel" and steps[1].get("use_regex") is False
                and not steps[1].get("add_prefix_space")):
            name = SPLIT_PRE_TOKENIZERS.get(str((steps[0].get("pattern") or {}).get("Regex")))
            if name is not None:
                return name
    found = f"model {model.get('type')!r}, pre_tokenizer {json.dumps(step, ensure_ascii=False)[:300]}"
    raise SourceError(
        f"{tokenizer_file}: the GGUF export knows byte-level BPE tokenizers split like GPT-2, Qwen2 or Llama 3, and "
        f"this one has {found}; llama.cpp would tokenize it differently, so remove `export.gguf` from the spec"
    )


def rope_scaling(config: dict, arch: str, config_file: Path) -> dict:
    """The config's rotary scaling parameters ({} when none); kinds llama.cpp has no reading for are refused."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = parameters.get("rope_type", parameters.get("type"))
    if kind in (None, "default"):
        return {}
    if kind in METADATA_ROPE_SCALING and parameters.get("factor") is not None:
        return parameters
    if kind == "llama3" and arch == "llama":
        return parameters
    raise SourceError(f"{config_file}: rope scaling {kind!r} has no GGUF export in modelpack (it exports linear, yarn "
                      "and Llama 3's); remove `export.gguf` from the spec")


def gguf_tensor_name(arch: str, config: dict, name: str) -> str | None:
    """A checkpoint tensor's GGUF name (blk.0.attn_q.weight), by llama.cpp's own name map; None when it has none."""
    return _tensor_name_map(arch, config["num_hidden_layers"]).get_name(name, try_suffixes=(".weight", ".bias"))


@functools.lru_cache(maxsize=8)
def _tensor_name_map(arch: str, blocks: int):
    import gguf  # numpy and the name tables: only for specs that export GGUF

    return gguf.get_tensor_name_map(gguf_model_arch(arch), blocks)


def gguf_model_arch(arch: str):
    """The `gguf` library's enum member for a llama.cpp architecture name."""
    import gguf

    return next(member for member, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)


def skipped_tensor(name: str) -> bool:
    """Buffers some checkpoints store that are not weights (the converter drops them too)."""
    return name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq"))


def estimated_gguf_bytes(shapes: list[tuple[int, ...]], gguf_type: str) -> int:
    """A bound for one GGUF file's size: its tensors (2-D in the type, the rest F32) plus 8 MB for the header,
    metadata and vocabulary (a 152k-token vocabulary with merges takes about 5 MB)."""
    block, size = GGUF_BLOCK_SIZES[gguf_type]
    total = 8 << 20
    for shape in shapes:
        elements = math.prod(shape)
        if len(shape) <= 1:
            total += F32_BYTES * elements
        else:
            total += -(-elements // block) * size + 32
    return total
