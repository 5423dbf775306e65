"""What the GGUF export needs to know before any weight is read, as data and pure checks: which architectures and
tokenizers it exports, the files' names and a bound for their size, and why a spec cannot be exported.

Names are llama.cpp's own (`gguf.MODEL_ARCH_NAMES`); the `gguf` package itself (and numpy with it) is imported only
where a spec asks for GGUF, so planning a build without it stays light.
"""

from __future__ import annotations

import functools
import json
import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from builder.chat import QWEN_V1_DEFAULT_SYSTEM, ChatFacts
from builder.errors import ModelpackError, SourceError, SpecError
from builder.sources import require_eval_text

if TYPE_CHECKING:
    from builder.sources import BaseModelFolder
    from builder.spec import Spec


# A tensor's values as the converter changes them before writing: (config, GGUF name, float32 array) -> array.
Transform = Callable[[dict, str, Any], Any]


def interleave_rotary_halves(rows: Any, heads: int) -> Any:
    """convert_hf_to_gguf.py LlamaModel.permute: within each head, rows (first half, second half) -> interleaved."""
    return rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def undo_rotary_halves(config: dict, name: str, rows: Any) -> Any:
    """"Normal" rope (the converter's LlamaModel.undo_permute): Hugging Face keeps each head's rotary halves apart in
    q_proj/k_proj rows for its rotate_half, llama.cpp rotates interleaved pairs, so the rows are permuted back."""
    heads = config["num_attention_heads"]
    if ".attn_k." in name:
        heads = config.get("num_key_value_heads") or heads
    return interleave_rotary_halves(rows, heads)


def plus_one(config: dict, name: str, values: Any) -> Any:
    """Gemma's RMS norms scale by (1 + weight); llama.cpp's by the weight (GemmaModel.modify_tensors)."""
    return values + 1


def qkv_grouped_by_kind(config: dict, name: str, rows: Any) -> Any:
    """GPT-NeoX's fused query_key_value rows go head by head (q, k, v of head 0, then head 1...); llama.cpp splits
    the fused tensor into all q, all k, all v (GPTNeoXModel.modify_tensors)."""
    heads = config["num_attention_heads"]
    return rows.reshape(heads, 3, rows.shape[0] // heads // 3, *rows.shape[1:]).swapaxes(0, 1).reshape(rows.shape)


@dataclass(frozen=True)
class GgufArchitecture:
    """What llama.cpp's converter does for one Hugging Face architecture beyond the rules every TextModel shares
    (conversion/base.py), as data that gguf_export applies; adding an architecture is one entry and one test."""

    name: str  # llama.cpp's architecture name (gguf.MODEL_ARCH_NAMES)
    # the tokenizer kinds the converter reads for it, the first the model's files hold wins: "SentencePiece"
    # (tokenizer.model, or a tokenizer.json with byte fallback), "byte-level BPE" (tokenizer.json), "tiktoken"
    tokenizers: tuple[str, ...] = ("byte-level BPE",)
    # tokenizer.ggml.add_space_prefix as the converter forces it for a SentencePiece vocabulary (Gemma's: False);
    # None: the tokenizer's own dummy prefix
    space_prefix: bool | None = None
    # llama.cpp gives special tokens their rstrip only when general.name contains this (Phi-3's, llama-vocab.cpp)
    rstrip_name: str | None = None
    # GGUF name pattern (fnmatch) -> how the converter changes those tensors' values; the first match applies
    transforms: tuple[tuple[str, Transform], ...] = ()
    dropped: tuple[str, ...] = ()  # GGUF names llama.cpp does not load, which the converter leaves out
    rope_dimensions: bool = False  # rope.dimension_count written: head_dim, or the hidden size over the heads
    llama3_rope: bool = False  # Llama 3's rope scaling, read by llama.cpp as a rope_freqs tensor
    norm: str = "rms"  # which epsilon the converter writes: RMS norms' or LayerNorm's (from the config keys below)
    # config key -> the GGUFWriter method that writes it, when the config sets it (the class's own parameters)
    metadata: tuple[tuple[str, str], ...] = ()
    # llama.cpp constants the config must agree with, checked at plan time: (config key, what llama.cpp assumes
    # given the config, what the sentence names).
    fixed: tuple[tuple[str, Callable[[dict], object], str], ...] = ()


def llama_like(name: str, metadata: tuple[tuple[str, str], ...] = (), **own: Any) -> GgufArchitecture:
    """An architecture the converter handles as a LlamaModel subclass: its rope layout, parameters and rope_freqs."""
    return GgufArchitecture(name, transforms=(("blk.*.attn_q.*", undo_rotary_halves),
                                              ("blk.*.attn_k.*", undo_rotary_halves)),
                            rope_dimensions=True, llama3_rope=True, tokenizers=("SentencePiece", "byte-level BPE"),
                            metadata=(("vocab_size", "add_vocab_size"), *metadata), **own)


# config.json `architectures[0]` -> its entry (convert_hf_to_gguf.py's registrations: conversion/*.py).
ARCHITECTURES = {
    "Qwen2ForCausalLM": GgufArchitecture("qwen2"),
    "Qwen3ForCausalLM": GgufArchitecture("qwen3"),
    "LlamaForCausalLM": llama_like("llama"),
    "MistralForCausalLM": llama_like("llama"),
    "SmolLM3ForCausalLM": llama_like(
        "smollm3",
        # llama.cpp skips rope in every 4th layer (hparams.n_no_rope_layer_step), whatever the config says.
        fixed=(("no_rope_layers", lambda c: [int((i + 1) % 4 != 0) for i in range(c["num_hidden_layers"])],
                "rope in every layer but every 4th"),),
    ),
    "GraniteForCausalLM": llama_like(
        "granite",
        metadata=(("attention_multiplier", "add_attention_scale"), ("embedding_multiplier", "add_embedding_scale"),
                  ("residual_multiplier", "add_residual_scale"), ("logits_scaling", "add_logit_scale")),
    ),
    "MixtralForCausalLM": llama_like("llama"),  # its experts stacked (gguf_export.plan_gguf_tensors)
    "Qwen3MoeForCausalLM": GgufArchitecture(
        "qwen3moe", metadata=(("moe_intermediate_size", "add_expert_feed_forward_length"),),
        # llama.cpp's qwen3moe always renormalises the chosen experts' weights
        fixed=(("norm_topk_prob", lambda c: True, "the top-k experts' weights renormalised"),),
    ),
    "Gemma2ForCausalLM": GgufArchitecture(
        "gemma2", transforms=(("*_norm.weight", plus_one),), tokenizers=("SentencePiece",), space_prefix=False,
        dropped=("output.weight",),  # llama.cpp's Gemma always ties the head to the embedding
        metadata=(("attn_logit_softcapping", "add_attn_logit_softcapping"),
                  ("final_logit_softcapping", "add_final_logit_softcapping"), ("sliding_window", "add_sliding_window")),
        fixed=(
            # llama.cpp scales queries by 1/sqrt(head_dim) (the 27B's own rule aside)
            ("query_pre_attn_scalar", lambda c: c.get("head_dim", 256), "queries scaled by 1/sqrt(head_dim)"),
            # and makes every 2nd layer a global one, starting with the second
            ("layer_types", lambda c: ["full_attention" if (i + 1) % 2 == 0 else "sliding_attention"
                                       for i in range(c["num_hidden_layers"])], "every 2nd layer global"),
        ),
    ),
    "Gemma3ForCausalLM": GgufArchitecture(
        "gemma3", transforms=(("*_norm.weight", plus_one),), tokenizers=("SentencePiece", "byte-level BPE"),
        space_prefix=False,
        dropped=("output.weight",),  # llama.cpp's Gemma always ties the head to the embedding
        metadata=(("final_logit_softcapping", "add_final_logit_softcapping"), ("sliding_window", "add_sliding_window")),
        fixed=(
            # llama.cpp scales queries by 1/sqrt(head_dim) (the 27B's own rule aside)
            ("query_pre_attn_scalar", lambda c: c.get("head_dim", 256), "queries scaled by 1/sqrt(head_dim)"),
            # and without a sliding_window_pattern key makes every 6th layer a global one
            ("layer_types", lambda c: ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                                       for i in range(c["num_hidden_layers"])], "every 6th layer global"),
        ),
    ),
    "GPTNeoXForCausalLM": GgufArchitecture(
        "gptneox", norm="layer", rope_dimensions=True, transforms=(("blk.*.attn_qkv.*", qkv_grouped_by_kind),),
        metadata=(("use_parallel_residual", "add_parallel_residual"),),
    ),
    # Phi-3's fused qkv_proj and gate_up_proj are llama.cpp's attn_qkv and ffn_up as they are; its LongRoPE (128k)
    # scaling is refused by rope_scaling.
    "Phi3ForCausalLM": GgufArchitecture(
        "phi3", rope_dimensions=True, tokenizers=("SentencePiece", "byte-level BPE"), rstrip_name="phi-3",
        metadata=(("original_max_position_embeddings", "add_rope_scaling_orig_ctx_len"),
                  ("sliding_window", "add_sliding_window")),
    ),
    "Olmo2ForCausalLM": GgufArchitecture("olmo2"),
    "Starcoder2ForCausalLM": GgufArchitecture("starcoder2", norm="layer"),
    # Qwen-7B-Chat (v1, remote code). Its norms are RMS norms under the name layer_norm_epsilon: llama.cpp's qwen
    # loader requires attention.layer_norm_rms_epsilon (today's converter writes attention.layer_norm_epsilon, which
    # it does not read; its earlier QwenModel wrote the RMS key, as here). Its rope spans whole heads.
    "QWenLMHeadModel": GgufArchitecture(
        "qwen", tokenizers=("tiktoken",), rope_dimensions=True,
        metadata=(("layer_norm_epsilon", "add_layer_norm_rms_eps"),),
    ),
}
# One expert's projection as published MoE checkpoints store it (Qwen3-MoE's mlp.experts.3.gate_proj.weight,
# Mixtral's block_sparse_moe.experts.3.w1.weight); llama.cpp wants each layer's projections stacked into one 3-D tensor.
EXPERT = re.compile(r"(?P<layer>.*\.experts)\.(?P<index>\d+)\.(?P<projection>\w+\.weight)")
# The converter's config keys for a norm's epsilon, first found wins (TextModel.set_gguf_parameters).
NORM_EPSILON_KEYS = {"rms": ("rms_norm_eps", "norm_eps"), "layer": ("layer_norm_eps", "layer_norm_epsilon",
                                                                    "norm_epsilon")}
# Spec type -> (elements per block, bytes per block) of its 2-D weights: gguf.GGML_QUANT_SIZES of F16, BF16, Q8_0
# (a test holds this table to the library's).
GGUF_BLOCK_SIZES = {"f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34)}
# Spec type -> llama.cpp's file type (llama_cpp.LLAMA_FTYPE_MOSTLY_*) for the mixes llama.cpp's own quantizer
# (llama_model_quantize) makes from the 16-bit GGUF; the `gguf` library has no k-quants.
QUANTIZED_TYPES = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
                   "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
                   "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}
SIXTEEN_BIT_TYPES = ("bf16", "f16")
# The quality budget's default mean KL divergence per variant against the 16-bit GGUF: llama.cpp's published
# Llama-3-8B wikitext-2 figures (Q8_0 0.0014, Q6_K 0.0055, Q4_K_M 0.031) times about three, for a fine-tune's short
# verification text and small models quantizing worse than 8B; the types without a published figure interpolated.
DEFAULT_MAX_MEAN_KLD = {"q8_0": 0.005, "q6_k": 0.02, "q5_k_m": 0.05, "q5_0": 0.06, "q4_k_m": 0.1, "q4_0": 0.15}
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


def gguf_file_type(name: str) -> str:
    """The type of an exported GGUF file from its name, gguf/NAME-<type>.gguf (gguf_path)."""
    return name.rsplit("/", 1)[-1].removesuffix(".gguf").rsplit("-", 1)[-1].lower()


def source_gguf_type(types: list[str], bundle_dtype: str) -> str | None:
    """The 16-bit GGUF llama.cpp's quantizer reads for its types and every quantized file (q8_0 too) is measured
    against: the first 16-bit type listed, else the bundle's own (bf16 for a bfloat16 bundle, f16 otherwise), made
    outside the bundle; None without quantized types."""
    if not any(t in DEFAULT_MAX_MEAN_KLD for t in types):
        return None
    listed = [t for t in types if t in SIXTEEN_BIT_TYPES]
    return listed[0] if listed else ("bf16" if bundle_dtype == "bfloat16" else "f16")


def variant_budgets(spec: Spec) -> dict[str, dict]:
    """Each quantized GGUF type the spec lists -> its quality budget {max_mean_kld, min_top1, expectations}: the
    type's own under export.gguf.budget.types, else the budget's value for every variant, else (mean KLD) modelpack's
    default for the type. The bundle's facts carry it, so that `modelpack verify` gates the variants as the build
    did."""
    gguf = spec.export.gguf
    if gguf is None:
        return {}
    budgets: dict[str, dict] = {}
    overrides: dict[str, Any] = {str(t): budget for t, budget in gguf.budget.types.items()}
    for gguf_type in gguf.types:
        if gguf_type not in DEFAULT_MAX_MEAN_KLD:
            continue
        own = overrides.get(gguf_type)
        budgets[gguf_type] = {
            "max_mean_kld": _first(own and own.max_mean_kld, gguf.budget.max_mean_kld,
                                   DEFAULT_MAX_MEAN_KLD[gguf_type]),
            "min_top1": _first(own and own.min_top1, gguf.budget.min_top1),
            "expectations": _first(own and own.expectations, gguf.budget.expectations),
        }
    return budgets


def _first(*values: Any) -> Any:
    """The first value that is set (neither None nor a missing override)."""
    return next(v for v in values if v is not None)


def llama_cpp_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def gguf_architecture(config: dict, config_file: Path) -> GgufArchitecture:
    """The export's entry for a Hugging Face config, or a user error naming it and the supported ones."""
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
    quantized = [t for t in spec.export.gguf.types if t in QUANTIZED_TYPES]
    eval_text = spec.export.gguf.eval_text
    if eval_text is not None:
        try:
            require_eval_text(eval_text, named="export.gguf.eval_text")
        except ModelpackError as exc:
            raise SpecError(f"{spec_file}: {exc}") from exc
    if quantized and not llama_cpp_installed():
        raise SpecError(f"{spec_file}: export.gguf.types {', '.join(quantized)} are made by llama.cpp's own quantizer, "
                        "and llama-cpp-python is not installed in modelpack's environment; install the extra with "
                        "`python -m pip install 'modelpack-lora[gguf]'`, or list only f16, bf16 and q8_0")
    if spec.output.mode != "merge":
        raise SpecError(f"{spec_file}: export.gguf converts merged weights; set `output.mode: merge` to export GGUF "
                        "(or remove export.gguf)")
    config_file = base.path / "config.json"
    arch = gguf_architecture(base.config, config_file)
    rope_scaling(base.config, arch, config_file)
    for key, assumed, sentence in arch.fixed:
        if key in base.config and base.config[key] != assumed(base.config):
            raise SourceError(f"{config_file}: {key} is {base.config[key]}, and llama.cpp's {arch.name} assumes "
                              f"{sentence} ({assumed(base.config)}); remove `export.gguf` from the spec")
    vocabulary_source(arch, tokenizer_files)
    unknown = [n for n in tensor_names
               if gguf_tensor_name(arch.name, base.config, stacked_name(n)) is None and not skipped_tensor(n)]
    if unknown:
        raise SourceError(f"{config_file}: tensor {unknown[0]!r} has no {arch.name} GGUF name "
                          f"({len(unknown)} such tensors); remove `export.gguf` from the spec")


@dataclass(frozen=True)
class VocabularySource:
    """Where the export reads the vocabulary: its kind (GgufArchitecture.tokenizers) and file, and for SentencePiece
    whether llama.cpp is to prefix a space to the text (tokenizer.ggml.add_space_prefix)."""

    kind: str
    file: Path
    space_prefix: bool = False


def vocabulary_source(arch: GgufArchitecture, tokenizer_files: dict[str, Path]) -> VocabularySource:
    """The vocabulary the converter would read for this architecture from these files, checked so that llama.cpp
    tokenizes as the bundle does; a user error naming the architecture and what is missing otherwise.

    In the entry's order: a SentencePiece `tokenizer.model` (the converter's _set_vocab_sentencepiece), else a
    tokenizer.json that is SentencePiece's BPE with byte fallback (its LlamaHfVocab), else a byte-level BPE
    tokenizer.json (its _set_vocab_gpt2), or Qwen v1's qwen.tiktoken.
    """
    json_file = tokenizer_files.get("tokenizer.json", Path("tokenizer.json"))
    tokenizer = json.loads(json_file.read_text(encoding="utf-8")) if "tokenizer.json" in tokenizer_files else None
    sentencepiece_json = tokenizer is not None and is_sentencepiece_json(tokenizer)
    for kind in arch.tokenizers:
        if kind == "tiktoken" and "qwen.tiktoken" in tokenizer_files:
            return VocabularySource(kind, tokenizer_files["qwen.tiktoken"])
        if kind == "SentencePiece" and "tokenizer.model" in tokenizer_files:
            model_file = tokenizer_files["tokenizer.model"]
            model = read_sentencepiece_model(model_file)
            refuse_unusable_sentencepiece(model, model_file, arch.name)
            prefix = model.add_dummy_prefix
            if tokenizer is not None and sentencepiece_json:  # the bundle's tokenizer prefixes as its tokenizer.json
                prefix = sentencepiece_json_space_prefix(tokenizer, json_file, arch)
            return VocabularySource(kind, model_file, prefix if arch.space_prefix is None else arch.space_prefix)
        if kind == "SentencePiece" and tokenizer is not None and sentencepiece_json:
            prefix = sentencepiece_json_space_prefix(tokenizer, json_file, arch)
            return VocabularySource(kind, json_file, prefix if arch.space_prefix is None else arch.space_prefix)
        if kind == "byte-level BPE" and tokenizer is not None and not sentencepiece_json:
            pre_tokenizer(tokenizer, json_file, arch.name)
            return VocabularySource(kind, json_file)
    wanted = {"tiktoken": "qwen.tiktoken", "SentencePiece": "tokenizer.model, or a tokenizer.json of a BPE model with "
              "byte fallback", "byte-level BPE": "tokenizer.json of a byte-level BPE model"}
    needed = " or ".join(f"a {kind} vocabulary ({wanted[kind]})" for kind in arch.tokenizers)
    if tokenizer is not None:
        section = tokenizer.get("model") or {}
        found = f"a {section.get('type')} model{' with byte fallback' if section.get('byte_fallback') else ''}"
        raise SourceError(f"{json_file}: the {arch.name} GGUF export needs {needed}, and this tokenizer is {found}; "
                          "llama.cpp would tokenize it differently, so remove `export.gguf` from the spec")
    folder = next(iter(tokenizer_files.values())).parent if tokenizer_files else "the base model"
    raise SourceError(f"{folder}: the {arch.name} GGUF export needs {needed}, which the model's tokenizer files "
                      "lack; save the tokenizer with it (the original model's files), or remove `export.gguf` from "
                      "the spec")


def is_sentencepiece_json(tokenizer: dict) -> bool:
    """A tokenizer.json written from a SentencePiece BPE model (Llama 2, Mistral, Gemma, Phi-3): BPE over ▁-marked
    text with byte fallback, where byte-level BPE has no fallback."""
    model = tokenizer.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def sentencepiece_json_space_prefix(tokenizer: dict, tokenizer_file: Path, arch: GgufArchitecture) -> bool:
    """Whether a SentencePiece tokenizer.json prefixes a space to each text (its dummy prefix): the steps
    transformers writes for these families, the normalizer replacing spaces by ▁ (with Prepend("▁") before it in
    the older files) or a Metaspace pre-tokenizer; any other step is refused, since llama.cpp runs none."""
    steps: list[dict] = []
    for section in ("normalizer", "pre_tokenizer"):
        step = tokenizer.get(section) or {}
        steps += step.get("normalizers" if section == "normalizer" else "pretokenizers", [step]) \
            if step.get("type") == "Sequence" else ([step] if step else [])
    prefix = False
    for step in steps:
        kind = step.get("type")
        if kind == "Prepend" and step.get("prepend") == "\u2581":
            prefix = True
        elif kind == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == "\u2581":
            continue
        elif kind == "Metaspace" and step.get("replacement") == "\u2581" and not step.get("split"):
            prefix = step.get("prepend_scheme", "always") != "never"
        elif (kind == "Split" and step.get("pattern") == {"String": " "}
              and step.get("behavior") == "MergedWithPrevious"):
            continue  # Gemma's: after spaces became ▁, there is no space left to split at
        else:
            raise SourceError(
                f"{tokenizer_file}: the {arch.name} GGUF export reads this SentencePiece tokenizer as llama.cpp's, "
                f"which replaces spaces by \u2581 and runs no other step, and this one has "
                f"{json.dumps(step, ensure_ascii=False)[:200]}; llama.cpp would tokenize it differently, so remove "
                "`export.gguf` from the spec"
            )
    return prefix


# sentencepiece_model.proto: ModelProto.SentencePiece.Type values, and TrainerSpec.ModelType's BPE.
SENTENCEPIECE_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
SENTENCEPIECE_BPE = 2


@dataclass(frozen=True)
class SentencePieceModel:
    """What the export reads of a SentencePiece tokenizer.model: its pieces (text, score, type name) and the
    trainer's and normalizer's settings llama.cpp depends on."""

    pieces: list[tuple[str, float, str]]
    model_type: int  # TrainerSpec.model_type: 1 unigram, 2 BPE, 3 word, 4 char
    byte_fallback: bool
    add_dummy_prefix: bool


def read_sentencepiece_model(path: Path) -> SentencePieceModel:
    """A tokenizer.model (a serialized sentencepiece ModelProto), read from the protobuf wire format itself: the
    three messages it needs are small, and so validation needs neither sentencepiece nor protobuf."""
    data = path.read_bytes()
    try:
        fields = _protobuf_fields(data)
        pieces = []
        for piece in fields.get(1, []):
            own = _protobuf_fields(piece)
            text = own[1][-1].decode("utf-8") if 1 in own else ""
            score = struct.unpack("<f", own[2][-1])[0] if 2 in own else 0.0
            pieces.append((text, score, SENTENCEPIECE_TYPES.get(own[3][-1] if 3 in own else 1, "NORMAL")))
        trainer = _protobuf_fields(fields[2][-1]) if 2 in fields else {}
        normalizer = _protobuf_fields(fields[3][-1]) if 3 in fields else {}
    except (ValueError, KeyError, IndexError, UnicodeDecodeError, struct.error):
        raise SourceError(f"{path}: not a SentencePiece model (a serialized ModelProto)") from None
    return SentencePieceModel(pieces, trainer.get(3, [1])[-1], bool(trainer.get(35, [0])[-1]),
                              bool(normalizer.get(3, [1])[-1]))


def _protobuf_fields(data: bytes) -> dict[int, list]:
    """A protobuf message's fields by number: varints as ints, 32-bit values and length-delimited ones as bytes."""
    fields: dict[int, list] = {}
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, position = _varint(data, position)
        elif wire == 2:
            size, position = _varint(data, position)
            value, position = data[position:position + size], position + size
        elif wire in (1, 5):
            width = 8 if wire == 1 else 4
            value, position = data[position:position + width], position + width
        else:
            raise ValueError(f"wire type {wire}")
        if position > len(data):
            raise ValueError("truncated")
        fields.setdefault(number, []).append(value)
    return fields


def _varint(data: bytes, position: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[position]
        value |= (byte & 0x7F) << shift
        position += 1
        shift += 7
        if not byte & 0x80:
            return value, position


def refuse_unusable_sentencepiece(model: SentencePieceModel, model_file: Path, arch: str) -> None:
    """llama.cpp's SentencePiece tokenizer merges pieces by score, as BPE does, and spells a character outside the
    vocabulary with <0xXX> byte pieces: a Unigram model (the most probable split) would be split otherwise, and
    without byte pieces llama.cpp aborts (an uncaught std::out_of_range in llama-cpp-python 0.3.36) at the first
    such character."""
    missing = []
    if model.model_type != SENTENCEPIECE_BPE:
        kinds = {1: "Unigram", 3: "word", 4: "char"}
        missing.append(f"it is a {kinds.get(model.model_type, model.model_type)} model, not BPE (llama.cpp would "
                       "merge its pieces by score instead of choosing the most probable split)")
    if not model.byte_fallback:
        missing.append("it has no byte fallback (<0x00>...<0xFF> pieces), and llama.cpp aborts at the first "
                       "character outside the vocabulary")
    if missing:
        raise SourceError(f"{model_file}: the {arch} GGUF export reads SentencePiece BPE models with byte fallback, "
                          f"as llama.cpp tokenizes them, and {'; and '.join(missing)}; remove `export.gguf` from the "
                          "spec")


def pre_tokenizer(tokenizer: dict, tokenizer_file: Path, arch: str) -> str:
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
        f"{tokenizer_file}: the {arch} GGUF export needs a byte-level BPE tokenizer whose pre-tokenizer llama.cpp "
        f"names (GPT-2's, Qwen2's or Llama 3's split), and this one has {found}; llama.cpp would tokenize it "
        "differently, so remove `export.gguf` from the spec"
    )


def rope_scaling(config: dict, arch: GgufArchitecture, config_file: Path) -> dict:
    """The config's rotary scaling parameters ({} when none); kinds llama.cpp has no reading for are refused."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    parameters = parameters.get("full_attention", parameters)  # Gemma 3's global layers (as the converter reads it)
    kind = parameters.get("rope_type", parameters.get("type"))
    if kind in (None, "default"):
        return {}
    if kind in METADATA_ROPE_SCALING and parameters.get("factor") is not None:
        return parameters
    if kind == "llama3" and arch.llama3_rope:
        return parameters
    raise SourceError(f"{config_file}: rope scaling {kind!r} has no {arch.name} GGUF export in modelpack (it exports "
                      "linear, yarn and, for Llama-like architectures, Llama 3's); remove `export.gguf` from the spec")


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


def stacked_name(name: str) -> str:
    """The name of the tensor a published MoE checkpoint's per-expert projection is stacked into (the converter's,
    without the expert index); any other name unchanged."""
    expert = EXPERT.fullmatch(name)
    return f"{expert['layer']}.{expert['projection']}" if expert else name


def skipped_tensor(name: str) -> bool:
    """Buffers some checkpoints store that are not weights (the converter drops them too)."""
    return name.endswith((".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq"))


def estimated_gguf_bytes(shapes: list[tuple[int, ...]], gguf_type: str) -> int:
    """A bound for one GGUF file's size: its tensors (2-D in the type, the rest F32) plus 8 MB for the header,
    metadata and vocabulary (a 152k-token vocabulary with merges takes about 5 MB)."""
    # A quantized mix keeps no tensor wider than Q8_0 (its fallback type) where its source is 16-bit.
    block, size = GGUF_BLOCK_SIZES.get(gguf_type, GGUF_BLOCK_SIZES["q8_0"])
    total = 8 << 20
    for shape in shapes:
        elements = math.prod(shape)
        if len(shape) <= 1:
            total += F32_BYTES * elements
        else:
            total += -(-elements // block) * size + 32
    return total
