"""GGUF export for llama.cpp and Ollama: the bundle's merged weights and whole tokenizer, streamed tensor by tensor.

llama.cpp's own `gguf` library writes the format, names the tensors and quantizes; the metadata and tokenizer fields
follow llama.cpp's convert_hf_to_gguf.py (conversion/base.py TextModel's shared rules here, each architecture's own
as its entry in gguf_facts.ARCHITECTURES). Where that converter and llama.cpp's loader disagree (Qwen v1's norm
epsilon), the loader decides, and a comment says so.
"""

from __future__ import annotations

import base64
import ctypes
import fnmatch
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType, TokenType

from builder.chat import ChatFacts
from builder.errors import OutputError, SourceError
from builder.finite import ggml_block_finite
from builder.gguf_facts import (
    EXPERT,
    NORM_EPSILON_KEYS,
    QUANTIZED_TYPES,
    GgufArchitecture,
    VocabularySource,
    embedded_chat_template,
    gguf_architecture,
    gguf_tensor_name,
    pre_tokenizer,
    read_sentencepiece_model,
    rope_scaling,
    skipped_tensor,
    stacked_name,
    vocabulary_source,
)
from builder.plan import BuildPlan
from builder.render import base_model_id, card_tags
from builder.safetensors_io import TensorLocation, read_safetensors_header, read_tensor, read_tensor_rows
from builder.serving import sampling_parameters

# Spec type -> (the tensor type of 2-D weights, the file type recorded in general.file_type).
GGUF_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
# Qwen v1's tiktoken pattern is Qwen2's: convert_hf_to_gguf.py hashes its tokenization of a test text to the same
# value as Qwen1.5's tokenizer (e636dc30...), i.e. "qwen2".
QWEN_V1_PRE_TOKENIZER = "qwen2"
# The converter's keys for the expert counts of an MoE, first found wins (TextModel.set_gguf_parameters).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
EXPERTS_USED_KEYS = ("num_experts_per_tok", "num_experts_per_token", "top_k_experts")
# Qwen v1's special tokens, defined in its tokenization_qwen.py (not in any data file), numbered after the ranks.
QWEN_V1_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
# Rotary scaling kinds the converter writes as metadata alone (gguf_facts.METADATA_ROPE_SCALING).
ROPE_SCALING_TYPES = {"linear": gguf.RopeScalingType.LINEAR, "yarn": gguf.RopeScalingType.YARN}
# Tensors are converted in row blocks whose float32 working copy stays under this size.
BLOCK_BYTES = 64 << 20
# The bundle's files a vocabulary may be read from (gguf_facts.vocabulary_source chooses).
VOCABULARY_FILES = ("tokenizer.model", "tokenizer.json", "qwen.tiktoken")
# The converter's keys for the context length, first found wins (conversion/base.py TextModel).
CONTEXT_LENGTH_KEYS = ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                       "model_max_length")


# --- the tensors -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufTensor:
    """One tensor of the GGUF file: its name there, where its merged values lie (one tensor, or the experts stacked
    into one) or its computed values, its type, and how the converter changes its values first."""

    name: str
    shape: tuple[int, ...]  # Hugging Face (row-major) order; the writer reverses it into GGML's
    qtype: GGMLQuantizationType
    sources: tuple[TensorLocation, ...] = ()  # more than one: stacked along a new first axis, in order
    values: np.ndarray | None = None  # a tensor the converter computes (Llama 3's rope_freqs)
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """The shape of the array the writer is given: elements for F32/F16, bytes for BF16 and quantized types."""
        if self.qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            return self.shape
        return gguf.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def stored_dtype(self) -> type:
        return {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}.get(self.qtype, np.uint8)

    @property
    def nbytes(self) -> int:
        return math.prod(self.stored_shape) * np.dtype(self.stored_dtype).itemsize


def tensor_type(gguf_name: str, shape: tuple[int, ...], qtype: GGMLQuantizationType) -> GGMLQuantizationType:
    """The converter's rule: 1-D tensors, norms and routers stay F32 (llama.cpp's kernels expect it); a row length
    that is no multiple of the quantization block falls back to F16."""
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return GGMLQuantizationType.F32
    if ".ffn_gate_inp." in gguf_name:  # an MoE router: F32 in every file, as llama.cpp's quantizer also keeps it
        return GGMLQuantizationType.F32
    if qtype == GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        return GGMLQuantizationType.F16
    return qtype


def plan_gguf_tensors(arch: GgufArchitecture, config: dict, locations: list[TensorLocation],
                      qtype: GGMLQuantizationType) -> list[GgufTensor]:
    """Every tensor of the GGUF file, in the bundle's order, from the merged weights' locations; pure. Published MoE
    checkpoints store each expert's projections apart (experts.7.gate_proj); llama.cpp wants one 3-D tensor per
    projection and layer, stacked in expert order, as the converter writes it (at the first expert's place)."""
    tied = bool(config.get("tie_word_embeddings"))
    groups: dict[str, list[TensorLocation]] = {}
    for location in locations:
        if skipped_tensor(location.name):
            continue
        groups.setdefault(stacked_name(location.name), []).append(location)
    tensors = []
    for hf_name, sources in groups.items():
        name = gguf_tensor_name(arch.name, config, hf_name)
        if name in arch.dropped or (tied and name == "output.weight"):
            continue  # llama.cpp reads a missing output.weight as tied to token_embd.weight
        if name is None:
            raise SourceError(f"tensor {sources[0].name!r} has no {arch.name} GGUF name")
        if len(sources) > 1:
            sources.sort(key=expert_index)
        shape = (len(sources), *sources[0].shape) if len(sources) > 1 else sources[0].shape
        transform = next((partial(f, config, name) for pattern, f in arch.transforms
                          if fnmatch.fnmatchcase(name, pattern)), None)
        tensors.append(GgufTensor(name, shape, tensor_type(name, shape, qtype), sources=tuple(sources),
                                  transform=transform))
    scaling = rope_scaling(config, arch, Path("config.json"))
    if scaling.get("rope_type") == "llama3":  # rope_scaling admits it only where arch.llama3_rope
        factors = llama3_rope_factors(config)
        tensors.insert(0, GgufTensor("rope_freqs.weight", factors.shape, GGMLQuantizationType.F32, values=factors))
    return tensors


def expert_index(location: TensorLocation) -> int:
    expert = EXPERT.fullmatch(location.name)
    assert expert is not None
    return int(expert["index"])


def llama3_rope_factors(config: dict) -> np.ndarray:
    """Llama 3.1's per-frequency rotary scaling, as the converter computes it (LlamaModel.generate_extra_tensors)."""
    parameters = config.get("rope_parameters") or config.get("rope_scaling") or {}
    base = parameters.get("rope_theta", config.get("rope_theta", 10000.0))
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = parameters.get("factor", 8.0)
    low, high = parameters.get("low_freq_factor", 1.0), parameters.get("high_freq_factor", 4.0)
    old_context = parameters.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def converted_blocks(tensor: GgufTensor) -> Iterator[np.ndarray]:
    """The tensor's bytes in the GGUF file, in row blocks: read from the bundle, widened to float32 as the converter
    does, and converted by gguf.quants (Q8_0 blocks run along rows, so row blocks quantize exactly as a whole, and
    stacked experts are their sources' bytes one after another)."""
    if tensor.values is not None:
        yield quantized(tensor, tensor.values)
        return
    for source in tensor.sources:
        if len(source.shape) < 2 or tensor.transform is not None:  # small: 1-D, or transformed as a whole
            values = read_tensor(source).float().numpy()
            if tensor.transform is not None:
                values = tensor.transform(values)
            yield quantized(tensor, values)
            continue
        row_bytes = 4 * math.prod(source.shape[1:])
        rows = max(1, BLOCK_BYTES // max(row_bytes, 1))
        for start in range(0, source.shape[0], rows):
            block = read_tensor_rows(source, start, min(source.shape[0], start + rows))
            yield quantized(tensor, block.float().numpy())


# The largest magnitude each GGUF tensor type holds: Q8_0's float16 block scale is the block's largest / 127.
GGUF_LARGEST = {GGMLQuantizationType.F16: 65504.0, GGMLQuantizationType.BF16: 3.3895313892515355e38,
                GGMLQuantizationType.Q8_0: 127 * 65504.0, GGMLQuantizationType.F32: 3.4028234663852886e38}


def quantized(tensor: GgufTensor, values: np.ndarray) -> np.ndarray:
    """A block of the tensor's values converted by gguf.quants, checked for NaN and Inf: a finite bundle's values can
    still overflow a narrower type (float32 or bfloat16 into F16, or a Q8_0 block's float16 scale)."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, as one sentence
        block = gguf.quants.quantize(values, tensor.qtype)
    if ggml_block_finite(block, tensor.qtype.name):
        return block
    bundle = " and ".join(repr(s.name) for s in tensor.sources) or "config.json"
    kind = tensor.qtype.name
    if not np.isfinite(values).all():  # the bundle is finite (checked as written): the converter's arithmetic is not
        raise SourceError(f"GGUF tensor {tensor.name!r} contains NaN or Inf as the converter computes it from the "
                          f"bundle's {bundle}; those values (or config.json's parameters) are beyond its range")
    raise SourceError(
        f"GGUF tensor {tensor.name!r} (from the bundle's {bundle}) overflows {kind}: its largest magnitude is "
        f"{float(np.abs(values).max()):.4g}, beyond the {GGUF_LARGEST[tensor.qtype]:.6g} that {kind} holds; export "
        + ("bf16 instead (float32's range)" if kind != "BF16" else "f16 or q8_0 only if the values fit them")
    )


class StreamedTensor:
    """What GGUFWriter.write_tensor_data needs of an array (its byte count, tofile), written block by block, so
    memory stays at one row block instead of the tensor (gguf-py's own LazyChunkedTensor does the same)."""

    def __init__(self, tensor: GgufTensor):
        self.tensor = tensor
        self.nbytes = tensor.nbytes

    def tofile(self, file) -> None:
        written = 0
        for block in converted_blocks(self.tensor):
            block.tofile(file)
            written += block.nbytes
        if written != self.nbytes:
            raise AssertionError(f"GGUF tensor {self.tensor.name}: wrote {written} bytes, planned {self.nbytes}")


# --- the tokenizer ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufVocabulary:
    """tokenizer.ggml.*: one token per embedding row (rows past the tokenizer are [PADi], unused), and either BPE's
    merges and pre-tokenizer (model "gpt2") or SentencePiece's scores and space prefix (model "llama")."""

    tokens: list[str]
    token_types: list[TokenType]
    merges: list[str]
    pre: str
    model: str = "gpt2"
    scores: list[float] | None = None
    space_prefix: bool | None = None
    rstrip: bool = False  # some special token strips the whitespace after it (Phi-3's)


def looks_special(token: str) -> bool:
    """Added tokens the converter marks as control tokens even when their config says otherwise (its
    does_token_look_special)."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocabulary_from_tokenizer_json(tokenizer: dict, rows: int, pre: str, tokenizer_file: Path) -> GgufVocabulary:
    """The converter's get_vocab_base over tokenizer.json: model vocabulary plus added tokens, typed, padded to the
    embedding's rows; merges as llama.cpp reads them (SpecialVocab's encoding of pairs that contain spaces)."""
    by_id = {token_id: token for token, token_id in tokenizer["model"]["vocab"].items()}
    added = {t["id"]: t for t in tokenizer.get("added_tokens", [])}
    by_id.update({token_id: t["content"] for token_id, t in added.items()})
    if by_id and max(by_id) >= rows:
        raise SourceError(f"{tokenizer_file}: token id {max(by_id)} is past the model's {rows} embedding rows")
    tokens, types = [], []
    for i in range(rows):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in added:
            special = added[i].get("special") or looks_special(by_id[i])
            tokens.append(by_id[i] if special else by_id[i].replace("\u2581", " "))
            types.append(TokenType.CONTROL if special else TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
    merges = [
        m if isinstance(m, str) else " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in p) for p in m)
        for m in tokenizer["model"].get("merges", [])
    ]
    return GgufVocabulary(tokens, types, merges, pre)


# SentencePiece piece types as gguf's token types (the converter's SentencePieceTokenTypes; the same numbers).
# User-defined pieces stay user-defined: SentencePiece matches them whole, as llama.cpp does its user-defined tokens
# (the converter types them NORMAL and relies on the tokenizer config listing them again).
SENTENCEPIECE_TOKEN_TYPES = {"NORMAL": TokenType.NORMAL, "UNKNOWN": TokenType.UNKNOWN, "CONTROL": TokenType.CONTROL,
                             "USER_DEFINED": TokenType.USER_DEFINED, "UNUSED": TokenType.UNUSED,
                             "BYTE": TokenType.BYTE}
# The converter's score for added tokens and rows past the tokenizer.
ADDED_TOKEN_SCORE = -1000.0
BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def added_tokens(bundle: Path) -> dict[int, dict]:
    """The tokenizer's added tokens by id ({content, special, rstrip, ...}), as the converter collects them for a
    SentencePiece vocabulary: added_tokens.json, then tokenizer_config.json's added_tokens_decoder, then
    tokenizer.json's added_tokens (where transformers 5 keeps them)."""
    found: dict[int, dict] = {}
    if (bundle / "added_tokens.json").is_file():
        for content, token_id in json.loads((bundle / "added_tokens.json").read_text(encoding="utf-8")).items():
            found[token_id] = {"content": content, "special": False}
    if (bundle / "tokenizer_config.json").is_file():
        config = json.loads((bundle / "tokenizer_config.json").read_text(encoding="utf-8"))
        found.update({int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items()})
    if (bundle / "tokenizer.json").is_file():
        tokenizer = json.loads((bundle / "tokenizer.json").read_text(encoding="utf-8"))
        found.update({t["id"]: t for t in tokenizer.get("added_tokens", [])})
    return found


def sentencepiece_vocabulary(pieces: list[tuple[str, float, TokenType]], added: dict[int, dict], rows: int,
                             source: VocabularySource) -> GgufVocabulary:
    """A SentencePiece vocabulary as the converter writes it (_create_vocab_sentencepiece): the pieces with their
    scores and types, then the added tokens (control when special or special-looking, else user-defined with
    their ▁ written as spaces, since llama.cpp matches those in the raw text), padded to the embedding's rows."""
    if len(pieces) > rows or (added and max(added) >= rows):
        raise SourceError(f"{source.file}: token id {max(len(pieces) - 1, *added)} is past the model's {rows} "
                          "embedding rows")
    tokens = [f"[PAD{i}]" for i in range(rows)]
    scores = [ADDED_TOKEN_SCORE] * rows
    types = [TokenType.UNUSED] * rows
    for i, (text, score, kind) in enumerate(pieces):
        tokens[i] = text.replace("\u2581", " ") if kind == TokenType.USER_DEFINED else text
        scores[i], types[i] = score, kind
    for i, token in added.items():
        content = token["content"]
        special = bool(token.get("special")) or looks_special(content)
        tokens[i] = content if special else content.replace("\u2581", " ")
        scores[i] = ADDED_TOKEN_SCORE
        types[i] = TokenType.CONTROL if special else TokenType.USER_DEFINED
    rstrip = any(t.get("rstrip") for t in added.values())
    return GgufVocabulary(tokens, types, [], "default", model="llama", scores=scores,
                          space_prefix=source.space_prefix, rstrip=rstrip)


def sentencepiece_model_pieces(source: VocabularySource) -> list[tuple[str, float, TokenType]]:
    """A tokenizer.model's pieces, scores and types (what the converter reads with SentencePieceProcessor)."""
    model = read_sentencepiece_model(source.file)
    return [(text, score, SENTENCEPIECE_TOKEN_TYPES[kind]) for text, score, kind in model.pieces]


def sentencepiece_json_pieces(tokenizer: dict) -> list[tuple[str, float, TokenType]]:
    """A SentencePiece BPE tokenizer.json's pieces. Their scores are not in the file: llama.cpp merges the pair whose
    result scores highest, so each piece scores minus the rank of the first merge that makes it, which merges in the
    file's order (the converter's LlamaHfVocab scores every piece -1000, and llama.cpp then merges left to right).
    <0xXX> pieces are bytes, the model's unk_token unknown."""
    vocab = tokenizer["model"]["vocab"]
    made: dict[str, int] = {}
    for rank, merge in enumerate(tokenizer["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        made.setdefault(left + right, rank)
    pieces: list[tuple[str, float, TokenType]] = [("", 0.0, TokenType.UNUSED)] * len(vocab)
    for text, i in vocab.items():
        kind = TokenType.BYTE if BYTE_PIECE.fullmatch(text) else TokenType.NORMAL
        if text == tokenizer["model"].get("unk_token"):
            kind = TokenType.UNKNOWN
        pieces[i] = (text, -float(made[text]) if text in made else 0.0, kind)
    return pieces


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """A tiktoken BPE file: one `base64(token) rank` per line."""
    ranks = {}
    for number, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise SourceError(f"{path}:{number}: not a tiktoken line (base64 token, space, rank)") from None
    return ranks


def tiktoken_merge(ranks: dict[bytes, int], token: bytes, rank: int) -> tuple[bytes, bytes]:
    """The pair whose merge makes `token` in byte-level BPE: run BPE over its bytes with only lower-ranked merges,
    which stops at two parts (the converter's QwenModel.bpe with max_rank)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, best_rank = -1, rank
        for i in range(len(parts) - 1):
            pair_rank = ranks.get(parts[i] + parts[i + 1], rank)
            if pair_rank < best_rank:
                best, best_rank = i, pair_rank
        if best < 0:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise SourceError(f"tiktoken token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def byte_level_alphabet() -> list[str]:
    """GPT-2's byte-level BPE alphabet: the character each byte is written as in vocabularies and merges (printable
    Latin-1 bytes as themselves, the others as the code points from 256 up, in byte order)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def vocabulary_from_tiktoken(ranks: dict[bytes, int], rows: int) -> GgufVocabulary:
    """Qwen v1's vocabulary (the converter's _set_vocab_qwen): ranks as byte-level strings, its specials after them,
    and BPE merges rebuilt from the ranks, in rank order."""
    byte_chars = byte_level_alphabet()

    def text(token: bytes) -> str:
        return "".join(byte_chars[b] for b in token)

    by_id = {rank: text(token) for token, rank in ranks.items()}
    specials = {len(ranks) + i: token for i, token in enumerate(QWEN_V1_SPECIAL_TOKENS)}
    tokens, types = [], []
    for i in range(rows):
        if i in specials:
            tokens.append(specials[i])
            types.append(TokenType.CONTROL)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = tiktoken_merge(ranks, token, rank)
            merges.append(f"{text(left)} {text(right)}")
    return GgufVocabulary(tokens, types, merges, QWEN_V1_PRE_TOKENIZER)


# --- the file --------------------------------------------------------------------------------------------------


def add_model_parameters(writer: gguf.GGUFWriter, arch: GgufArchitecture, config: dict,
                         file_type: LlamaFileType) -> None:
    """The hyperparameters convert_hf_to_gguf.py writes: TextModel.set_gguf_parameters's, then the architecture
    entry's own."""
    writer.add_block_count(config["num_hidden_layers"])
    context = next((config[k] for k in CONTEXT_LENGTH_KEYS if config.get(k) is not None), None)
    if context is not None:
        writer.add_context_length(context)
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])  # Qwen v1: both MLP branches; llama.cpp halves it
    writer.add_head_count(config["num_attention_heads"])
    if config.get("num_key_value_heads") is not None:
        writer.add_head_count_kv(config["num_key_value_heads"])
    scaling = rope_scaling(config, arch, Path("config.json"))
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in ROPE_SCALING_TYPES:
        writer.add_rope_scaling_type(ROPE_SCALING_TYPES[kind])
        writer.add_rope_scaling_factor(scaling["factor"])
        if kind == "yarn":
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    parameters = config.get("rope_parameters") or {}
    full = parameters.get("full_attention", parameters)  # Gemma 3: global layers' and sliding layers' own
    theta = full.get("rope_theta", config.get("rope_theta", config.get("rotary_emb_base")))
    if theta is not None:
        writer.add_rope_freq_base(theta)
    if parameters.get("sliding_attention", {}).get("rope_theta") is not None:
        writer.add_rope_freq_base_swa(parameters["sliding_attention"]["rope_theta"])
    epsilon = next((config[k] for k in NORM_EPSILON_KEYS[arch.norm] if config.get(k) is not None), None)
    if epsilon is not None:
        (writer.add_layer_norm_rms_eps if arch.norm == "rms" else writer.add_layer_norm_eps)(epsilon)
    if config.get("head_dim") is not None:
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    writer.add_file_type(file_type)
    for key, method in arch.metadata:
        if config.get(key) is not None:
            getattr(writer, method)(config[key])
    experts = next((config[k] for k in EXPERT_COUNT_KEYS if config.get(k) is not None), None)
    if experts is not None:
        writer.add_expert_count(experts)
    used = next((config[k] for k in EXPERTS_USED_KEYS if config.get(k) is not None), None)
    if used is not None:
        writer.add_expert_used_count(used)
    if arch.rope_dimensions:  # GPT-NeoX ropes a part of each head (partial_rotary_factor, formerly rotary_pct)
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        partial = full.get("partial_rotary_factor", config.get("partial_rotary_factor", config.get("rotary_pct", 1.0)))
        writer.add_rope_dimension_count(int(partial * head_dim))


def add_tokenizer(writer: gguf.GGUFWriter, vocabulary: GgufVocabulary, special: gguf.SpecialVocab,
                  *, chat_template: str | None, end_of_turn_id: int | None) -> None:
    writer.add_tokenizer_model(vocabulary.model)
    writer.add_tokenizer_pre(vocabulary.pre)
    writer.add_token_list(vocabulary.tokens)
    if vocabulary.scores is not None:
        writer.add_token_scores(vocabulary.scores)
    writer.add_token_types(vocabulary.token_types)
    if vocabulary.space_prefix is not None:
        writer.add_add_space_prefix(vocabulary.space_prefix)
    special.merges = vocabulary.merges
    special.chat_template = None  # the bundle's template, from the chat facts, below
    special.add_to_gguf(writer, quiet=True)
    if end_of_turn_id is not None:
        writer.add_eot_token_id(end_of_turn_id)
    if chat_template is not None:
        writer.add_chat_template(chat_template)


# serving.sampling_parameters' Ollama names -> the GGUFWriter method of each general.sampling key and its value's
# type; num_predict has no key.
SAMPLING_KEYS: dict[str, tuple[str, Callable[[Any], float]]] = {
    "temperature": ("add_sampling_temp", float),
    "top_p": ("add_sampling_top_p", float),
    "top_k": ("add_sampling_top_k", int),
    "min_p": ("add_sampling_min_p", float),
    "repeat_penalty": ("add_sampling_penalty_repeat", float),
    "repeat_last_n": ("add_sampling_penalty_last_n", int),
}


def add_sampling(writer: gguf.GGUFWriter, generation: dict) -> None:
    """general.sampling.*: the bundle's generation_config.json, decoded as transformers decodes it.

    llama.cpp's converter writes these keys from generation_config.json, and its tools (llama-cli, llama-server) take
    them as their default sampling; without them a GGUF samples at llama.cpp's own defaults (temperature 0.8,
    top_k 40, top_p 0.95, min_p 0.05), not the bundle's. The values are the Modelfile's (serving.sampling_parameters):
    greedy (do_sample false) is temperature 0, llama.cpp's greedy path; sampling writes temperature, top_p and top_k
    with transformers' defaults, and min_p (0 when absent: transformers has none, llama.cpp's 0.05 would cut tokens);
    the repetition penalty over the whole context (penalty_last_n -1) when it is not 1.0.
    """
    parameters, _ = sampling_parameters(generation)
    if generation.get("do_sample", False):
        parameters.append(("min_p", generation.get("min_p") or 0.0))
    for name, value in parameters:
        if name in SAMPLING_KEYS and value is not None:
            method, kind = SAMPLING_KEYS[name]
            getattr(writer, method)(kind(value))


def add_provenance(writer: gguf.GGUFWriter, *, plan: BuildPlan) -> None:
    """general.license, tags, languages and base_model.*, as the converter writes them from a model card
    (gguf.Metadata), from the spec's card section (the tags as the card's front matter lists them) and the base's Hub
    id: never a local path, which would name the build machine's folders."""
    card = plan.spec.card
    if card.license is not None:
        writer.add_license(card.license)
    writer.add_tags(card_tags(card.tags, separate=False))  # GGUF files are exported from merged weights only
    if card.language:
        writer.add_languages(card.language)
    hub_id = base_model_id(plan)
    if hub_id is None:
        return
    name, organization, _, _, version, _ = gguf.Metadata.get_model_id_components(hub_id)
    writer.add_base_model_count(1)
    if name is not None:
        writer.add_base_model_name(0, gguf.Metadata.id_to_title(name))
    if organization is not None:
        writer.add_base_model_organization(0, gguf.Metadata.id_to_title(organization))
    if version is not None:
        writer.add_base_model_version(0, version)
    writer.add_base_model_repo_url(0, f"https://huggingface.co/{hub_id}")


def bundle_tensor_locations(plan: BuildPlan, bundle: Path) -> list[TensorLocation]:
    """Where every merged tensor lies in the bundle's own weight files, in writing order."""
    locations = []
    for shard in plan.shards:
        header = read_safetensors_header(bundle / shard.filename)
        locations += [header[t.name] for t in shard.tensors]
    return locations


def special_vocabulary(bundle: Path, arch: GgufArchitecture, vocabulary: GgufVocabulary) -> gguf.SpecialVocab:
    """bos/eos/unk/pad ids and add_bos/add_eos from the bundle's tokenizer and model configs (gguf's SpecialVocab,
    as the converter uses it). Qwen v1 declares none: the converter then names <|endoftext|> for bos and eos, and
    always for unk."""
    special = gguf.SpecialVocab(bundle, load_merges=False, n_vocab=len(vocabulary.tokens))
    if "tiktoken" in arch.tokenizers:
        endoftext = vocabulary.tokens.index("<|endoftext|>")
        if not special.special_token_ids:
            special.special_token_ids.update(bos=endoftext, eos=endoftext)
        special.special_token_ids["unk"] = endoftext
    return special


def read_vocabulary(bundle: Path, arch: GgufArchitecture, rows: int) -> GgufVocabulary:
    """The bundle's tokenizer as GGUF vocabulary, of the kind and from the file the architecture's entry and the
    bundle's tokenizer files decide (gguf_facts.vocabulary_source)."""
    files = {name: bundle / name for name in VOCABULARY_FILES if (bundle / name).is_file()}
    source = vocabulary_source(arch, files)
    if source.kind == "tiktoken":
        return vocabulary_from_tiktoken(read_tiktoken_ranks(source.file), rows)
    if source.kind == "SentencePiece":
        if source.file.name == "tokenizer.model":
            pieces = sentencepiece_model_pieces(source)
        else:
            pieces = sentencepiece_json_pieces(json.loads(source.file.read_text(encoding="utf-8")))
        return sentencepiece_vocabulary(pieces, added_tokens(bundle), rows, source)
    tokenizer = json.loads(source.file.read_text(encoding="utf-8"))
    pre = pre_tokenizer(tokenizer, source.file, arch.name)
    return vocabulary_from_tokenizer_json(tokenizer, rows, pre, source.file)


def gguf_model_name(name: str, arch: GgufArchitecture, vocabulary: GgufVocabulary) -> str:
    """general.name: the spec's name; where llama.cpp gives special tokens their rstrip by the model's name alone
    (Phi-3's), and the tokenizer strips, the name carries that marker, or llama.cpp would keep the whitespace the
    bundle's tokenizer strips after <|user|>, <|end|>, <|assistant|>."""
    marker = arch.rstrip_name
    if marker is None or not vocabulary.rstrip or marker in name.lower() or marker.replace("-", "") in name.lower():
        return name
    return f"{name} ({marker})"


def export_gguf(plan: BuildPlan, bundle: Path, chat: ChatFacts, outputs: dict[str, Path]) -> None:
    """Write one GGUF file per type (outputs: spec type -> path) from the weights and tokenizer already in `bundle`."""
    write_gguf(bundle, outputs, name=plan.spec.name, locations=bundle_tensor_locations(plan, bundle),
               chat_template=embedded_chat_template(chat, plan.base.generation_config),
               end_of_turn_id=chat.end_of_turn_id, provenance=partial(add_provenance, plan=plan))


def reference_gguf(bundle: Path, out: Path, gguf_type: str, *, name: str) -> None:
    """The 16-bit GGUF of a received bundle's merged weights, which its quantized GGUF files are measured against when
    it ships none: the same tensors and vocabulary as the build's (its logits are what matters), without the chat
    template and card facts, which the measurement does not read. The weights are the bundle's top-level safetensors
    files in name order (model.safetensors, or its numbered shards)."""
    files = sorted(p for p in bundle.glob("*.safetensors") if p.is_file())
    locations = [location for file in files for location in read_safetensors_header(file).values()]
    write_gguf(bundle, {gguf_type: out}, name=name, locations=locations, chat_template=None, end_of_turn_id=None,
               provenance=None)


def write_gguf(bundle: Path, outputs: dict[str, Path], *, name: str, locations: list[TensorLocation],
               chat_template: str | None, end_of_turn_id: int | None,
               provenance: Callable[[gguf.GGUFWriter], None] | None) -> None:
    """One GGUF file per type (outputs: spec type -> path) from the tensors at `locations` and the tokenizer and
    configs in `bundle`.

    Every tensor's name, shape and type is declared first, so the header, metadata and tensor index are written
    before any data; then each tensor streams from the bundle's safetensors in row blocks.
    """
    config = json.loads((bundle / "config.json").read_text(encoding="utf-8"))  # as shipped: untied, resized
    arch = gguf_architecture(config, bundle / "config.json")
    vocabulary = read_vocabulary(bundle, arch, config["vocab_size"])
    special = special_vocabulary(bundle, arch, vocabulary)
    generation_file = bundle / "generation_config.json"  # the spec's generation settings over the base's
    generation = json.loads(generation_file.read_text(encoding="utf-8")) if generation_file.is_file() else {}
    for gguf_type, out in outputs.items():
        qtype, file_type = GGUF_TYPES[gguf_type]
        out.parent.mkdir(parents=True, exist_ok=True)
        writer = gguf.GGUFWriter(out, arch.name)
        try:
            writer.add_type(gguf.GGUFType.MODEL)
            writer.add_name(gguf_model_name(name, arch, vocabulary))
            if provenance is not None:
                provenance(writer)
            add_sampling(writer, generation)
            add_model_parameters(writer, arch, config, file_type)
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
            add_tokenizer(writer, vocabulary, special, chat_template=chat_template, end_of_turn_id=end_of_turn_id)
            tensors = plan_gguf_tensors(arch, config, locations, qtype)
            for tensor in tensors:
                writer.add_tensor_info(tensor.name, tensor.stored_shape, np.dtype(tensor.stored_dtype), tensor.nbytes,
                                       raw_dtype=tensor.qtype)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for tensor in tensors:
                # StreamedTensor has the two members write_tensor_data uses (nbytes, tofile); the file's byte order
                # is the machine's (little-endian), so nothing is swapped.
                writer.write_tensor_data(StreamedTensor(tensor),  # type: ignore[arg-type]
                                         tensor_endianess=gguf.GGUFEndian.LITTLE)
        finally:
            writer.close()


def quantize_gguf(source: Path, out: Path, gguf_type: str) -> None:
    """One quantized variant (a gguf_facts.QUANTIZED_TYPES mix) written by llama.cpp's own quantizer from the 16-bit
    GGUF, with its default parameters (no importance matrix; llama.cpp picks each tensor's type, falling back for
    rows whose length its k-quant blocks of 256 do not divide)."""
    import llama_cpp  # the `gguf` extra's; refuse_unexportable refused a spec asking for it without

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, QUANTIZED_TYPES[gguf_type])
    params.nthread = os.cpu_count() or 1
    out.parent.mkdir(parents=True, exist_ok=True)
    # llama-cpp-python prints llama.cpp's log (a line per tensor here) unless its logger's level is above it.
    log = logging.getLogger("llama-cpp-python")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        failed = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0
    finally:
        log.setLevel(level)
    if failed:
        raise OutputError(f"{source}: llama.cpp could not quantize it to {gguf_type} ({out.name})")

