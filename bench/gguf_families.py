"""The model families gguf_bench.py exports: for each, a random bfloat16 base of a published model's real shape, saved
as the Hub publishes it (one safetensors shard per decoder layer, MoE experts as per-expert tensors), a real-sized
tokenizer that llama.cpp's converter accepts, and a LoRA saved as peft saves it.

The byte-level BPE families all get Qwen2's vocabulary (151,643 BPE ranks from qwen.tiktoken with the merges
rebuilt, Qwen2's pre-tokenizer, ChatML specials): the converter accepts a BPE tokenizer only when its hash of a fixed
text's tokens is one it knows, so a trained stand-in of Llama 3's or Gemma's would be refused, and their real
tokenizer files are not on this machine. The SentencePiece family gets a 32,000-piece tokenizer.model trained with
Llama 2's settings (tests/sentencepiece_fixtures.py) on the Python standard library's source: the converter reads a
tokenizer.model as it is, whatever trained it. The tensors, configs and transforms are each family's own.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import merge_bench  # noqa: E402  (random tensors, shard grouping, the ChatML template, logging)

# Qwen2's vocabulary: 151,643 ranks, then these specials; the embedding of Qwen2 has 151,936 rows.
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_TOKENS = 151_643 + len(QWEN2_SPECIALS)
QWEN2_ROWS = 151_936
QWEN2_IDS = dict(bos_token_id=151_643, eos_token_id=151_645, pad_token_id=151_643)
LLAMA2_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)
SENTENCEPIECE_PIECES = 32_000
LORA_RANK, LORA_ALPHA = 16, 32
WEIGHT_STD = 0.02
# Norm weights are random around their neutral value (1; 0 for Gemma, which scales by 1 + weight), so that a
# transform applied differently shows in the bytes (Gemma's +1 rounded to bfloat16 instead of added in float32).
NORM = re.compile(r".*norm\.weight")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    """One family: its Hugging Face class and config at a published model's dimensions, and the LoRA's modules."""

    name: str
    architecture: str  # config.json architectures[0], the transformers class
    config_class: str
    dimensions: str  # whose shape this is
    config: dict
    base_model: str  # the card's base_model: the provenance both exporters write into the GGUF metadata
    license: str
    targets: tuple[str, ...] = ATTENTION + MLP
    tokenizer: str = "qwen2"  # or the tests' SentencePiece fixture family ("llama2"), at 32,000 pieces
    token_ids: dict = field(default_factory=lambda: QWEN2_IDS)
    norm_centre: float = 1.0
    tiny: dict = field(default_factory=dict)  # --shape tiny: the same family with small dimensions (a smoke test)


TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32)

FAMILIES = {
    # Qwen2.5-1.5B: the issue 11 benchmark's model, kept for its figures.
    "qwen2": Family(
        "qwen2", "Qwen2ForCausalLM", "Qwen2Config", "Qwen2.5-1.5B",
        dict(merge_bench.SIZES["1.5b"], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6),
        base_model="Qwen/Qwen2.5-1.5B", license="apache-2.0", tiny={**TINY, "head_dim": None}),
    # Llama-3.2-1B: tied embeddings, Llama 3's rope scaling (llama.cpp's rope_freqs tensor); Qwen2's vocabulary
    # (151,936 rows instead of 128,256).
    "llama3": Family(
        "llama3", "LlamaForCausalLM", "LlamaConfig", "Llama-3.2-1B",
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
             num_key_value_heads=8, head_dim=64, vocab_size=QWEN2_ROWS, tie_word_embeddings=True,
             max_position_embeddings=131072, rms_norm_eps=1e-5,
             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
        base_model="meta-llama/Llama-3.2-1B", license="llama3.2", tiny=TINY),
    # Gemma-3-1B (text): 4 query heads of 256 over one KV head, sliding window 512 in 5 of every 6 layers, q/k norms
    # and the sandwich norms, tied embeddings. Every embedding row a token, as in Gemma's own 262,144-row vocabulary
    # (the converter trims Gemma's embedding to the tokenizer's length).
    "gemma3": Family(
        "gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", "Gemma-3-1B",
        dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26, num_attention_heads=4,
             num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
             vocab_size=QWEN2_TOKENS, tie_word_embeddings=True, max_position_embeddings=32768, rms_norm_eps=1e-6,
             rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                              "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        base_model="google/gemma-3-1b-pt", license="gemma", norm_centre=0.0,
        tiny={**TINY, "num_hidden_layers": 6, "query_pre_attn_scalar": 32}),
    # Qwen3-30B-A3B's tensors with 2 of its 48 decoder layers: 128 experts of 768 (8 used), 32 query heads of 128
    # over 4 KV heads, untied head; 1.87B parameters, every shape the 30B model has. The LoRA on attention only.
    "qwen3moe": Family(
        "qwen3moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "Qwen3-30B-A3B, 2 of 48 layers",
        dict(hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
             num_experts_per_tok=8, norm_topk_prob=True, num_hidden_layers=2, num_attention_heads=32,
             num_key_value_heads=4, head_dim=128, vocab_size=QWEN2_ROWS, tie_word_embeddings=False,
             max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0),
        base_model="Qwen/Qwen3-30B-A3B-Base", license="apache-2.0", targets=ATTENTION,
        tiny={**TINY, "moe_intermediate_size": 64, "num_experts": 8, "num_experts_per_tok": 2}),
    # TinyLlama-1.1B: Llama 2's architecture and SentencePiece vocabulary (32,000 pieces, byte fallback, dummy
    # prefix), untied head, no rope scaling.
    "llama2-sp": Family(
        "llama2-sp", "LlamaForCausalLM", "LlamaConfig", "TinyLlama-1.1B",
        dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=SENTENCEPIECE_PIECES, tie_word_embeddings=False,
             max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0),
        base_model="TinyLlama/TinyLlama_v1.1", license="apache-2.0", tokenizer="llama2", token_ids=LLAMA2_IDS,
        tiny={**TINY, "head_dim": None}),
}
DEFAULT_FAMILIES = ("llama3", "gemma3", "qwen3moe", "llama2-sp")


def family_config(family: Family, shape: str):
    """The transformers config of the family at its real (or tiny) shape, with its tokenizer's special token ids."""
    import transformers

    options = {**family.config, **(family.tiny if shape == "tiny" else {}), **family.token_ids, "dtype": "bfloat16"}
    config = getattr(transformers, family.config_class)(**{k: v for k, v in options.items() if v is not None})
    config.architectures = [family.architecture]  # what save_pretrained writes, and every hub config carries
    return config


def published_tensor_shapes(family: Family, config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor the family's published checkpoint stores, in module order, from a model on the meta device.
    transformers 5 holds an MoE layer's experts fused (experts.gate_up_proj, experts.down_proj); checkpoints on
    the Hub store one tensor per expert and projection (experts.7.gate_proj.weight), and so does this base."""
    import transformers

    with torch.device("meta"):
        model = getattr(transformers, family.architecture)(config)
    shapes: list[tuple[str, tuple[int, ...]]] = []
    for name, tensor in model.state_dict().items():
        if config.tie_word_embeddings and name == "lm_head.weight":
            continue  # a tied head is not stored
        if name.endswith(".experts.gate_up_proj"):  # (experts, 2 x ff, hidden)
            experts, double_ff, hidden = tensor.shape
            prefix = name.removesuffix("gate_up_proj")
            for expert in range(experts):
                shapes += [(f"{prefix}{expert}.gate_proj.weight", (double_ff // 2, hidden)),
                           (f"{prefix}{expert}.up_proj.weight", (double_ff // 2, hidden))]
        elif name.endswith(".experts.down_proj"):  # (experts, hidden, ff)
            experts, hidden, ff = tensor.shape
            prefix = name.removesuffix("down_proj")
            shapes += [(f"{prefix}{expert}.down_proj.weight", (hidden, ff)) for expert in range(experts)]
        else:
            shapes.append((name, tuple(tensor.shape)))
    # One expert's three projections together, as published checkpoints order them.
    return sorted(shapes, key=lambda item: _checkpoint_order(item[0], [n for n, _ in shapes]))


def _checkpoint_order(name: str, names: list[str]) -> tuple:
    expert = re.fullmatch(r"(.*\.experts)\.(\d+)\.(\w+)\.weight", name)
    if expert is None:
        return (names.index(name), 0, 0)
    first = next(i for i, n in enumerate(names) if n.startswith(expert[1] + "."))
    return (first, int(expert[2]), MLP.index(expert[3]))


def write_qwen2_tokenizer(folder: Path) -> None:
    """Qwen2's tokenizer rebuilt from qwen.tiktoken: byte-level vocabulary, merges, Split + ByteLevel, ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from builder.gguf_export import read_tiktoken_ranks, vocabulary_from_tiktoken
    from builder.gguf_facts import SPLIT_PRE_TOKENIZERS

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.qwen_v1.make_qwen_v1 import find_qwen_tiktoken

    ranks = read_tiktoken_ranks(find_qwen_tiktoken())
    vocabulary = vocabulary_from_tiktoken(ranks, len(ranks))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocabulary.tokens)},
                                     [tuple(m.split(" ")) for m in vocabulary.merges]))
    pattern = next(p for p, name in SPLIT_PRE_TOKENIZERS.items() if name == "qwen2")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(QWEN2_SPECIALS)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=merge_bench.CHATML_TEMPLATE).save_pretrained(folder)


def write_sentencepiece_tokenizer(folder: Path, fixture: str) -> None:
    """The tests' SentencePiece tokenizer of a family (its settings, special pieces, template), trained to a real
    vocabulary size on a real-sized corpus: the Python standard library's source lines."""
    sys.path.insert(0, str(REPO / "tests"))
    import sentencepiece_fixtures

    lines = []
    for path in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(path, encoding="utf-8", errors="replace") as source:
            lines += [line.rstrip("\n") for line in source if line.strip()]
    # train_sentencepiece reads its corpus from the module; this corpus holds enough text for 32,000 pieces
    sentencepiece_fixtures.SENTENCEPIECE_CORPUS = lines
    model = sentencepiece_fixtures.train_sentencepiece(fixture, vocab_size=SENTENCEPIECE_PIECES)
    sentencepiece_fixtures.save_sentencepiece_tokenizer(folder, fixture, model=model)


def cached_tokenizer(workdir: Path, kind: str) -> Path:
    """The family's tokenizer files, made once per workdir (rebuilding Qwen2's merges or training 32,000 pieces
    takes seconds)."""
    folder = workdir / f"tokenizer-{kind}"
    if not (folder / "tokenizer_config.json").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        if kind == "qwen2":
            write_qwen2_tokenizer(partial)
        else:
            write_sentencepiece_tokenizer(partial, kind)
        partial.rename(folder)
    return folder


def generate_base(folder: Path, family: Family, shape: str, tokenizer: Path, *, seed: int) -> int:
    """config.json, generation_config.json, the tokenizer and one safetensors shard per decoder layer; returns the
    weights' bytes. One shard in memory at a time."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = family_config(family, shape)
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    # sampling defaults as published checkpoints carry them (Llama-3.2-1B's); the converter writes general.sampling.*
    GenerationConfig(**{**family.token_ids, "eos_token_id": [family.token_ids["eos_token_id"]]}, do_sample=True,
                     temperature=0.6, top_p=0.9).save_pretrained(folder)
    for path in tokenizer.iterdir():
        shutil.copy(path, folder / path.name)
    groups = merge_bench.shard_groups(published_tensor_shapes(family, config))
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, tensor_shape in group:
            values = merge_bench._random_tensor(name, tensor_shape, torch.bfloat16, WEIGHT_STD, seed)
            tensors[name] = values + family.norm_centre if NORM.fullmatch(name) else values
            weight_map[name] = filename
            total += tensors[name].nbytes
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def generate_adapter(folder: Path, base: Path, family: Family, *, seed: int) -> None:
    """A LoRA (r=16, alpha=32, float32 as peft saves it after bf16 training) on every layer's target modules."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    index = json.loads((base / "model.safetensors.index.json").read_text())
    shards = {}
    pattern = re.compile(rf"(model\.layers\.\d+\.(?:self_attn|mlp)\.(?:{'|'.join(family.targets)}))\.weight")
    tensors = {}
    for name, filename in index["weight_map"].items():
        target = pattern.fullmatch(name)
        if target is None:
            continue
        if filename not in shards:
            from safetensors import safe_open

            shards[filename] = safe_open(base / filename, "pt")
        out_features, in_features = shards[filename].get_slice(name).get_shape()
        prefix = f"base_model.model.{target[1]}"
        tensors[f"{prefix}.lora_A.weight"] = merge_bench._random_tensor(
            prefix + "A", (LORA_RANK, in_features), torch.float32, in_features**-0.5, seed)
        tensors[f"{prefix}.lora_B.weight"] = merge_bench._random_tensor(
            prefix + "B", (out_features, LORA_RANK), torch.float32, merge_bench.LORA_B_STD, seed)
    folder.mkdir(parents=True)
    LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=list(family.targets), task_type="CAUSAL_LM",
               base_model_name_or_path=family.base_model).save_pretrained(folder)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def write_spec(root: Path, family: Family, base: Path, adapter: Path) -> Path:
    """The build spec: merge into bfloat16, no GGUF (the bench exports), a card whose provenance both exporters
    carry into the GGUF metadata (modelpack from the spec, the converter from the bundle's README front matter).
    Once merged, the spec names the merged folder as its base: the export plans from it what it plans from the base
    (the same tensor names and shapes, tokenizer files and configs), and the base's gigabytes can go."""
    import yaml

    spec = {
        "name": f"bench-{family.name}",
        "base": {"path": os.path.relpath(base, root)},
        "adapter": {"path": os.path.relpath(adapter, root)},
        "output": {"dir": "modelpack-out", "mode": "merge", "dtype": "auto"},
        "card": {"base_model": family.base_model, "license": family.license, "language": ["en"],
                 "tags": ["medical", "benchmark"]},
    }
    path = root / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


INPUTS_VERSION = 2  # 2: sampling defaults in generation_config.json


def ensure_merged(workdir: Path, family: Family, shape: str, *, seed: int = 0) -> tuple[Path, Path, dict]:
    """The merged bundle of the family (modelpack build --no-verify, no export) and its spec; made once per workdir
    (until gguf_bench removes it). The base is deleted once merged: on disk at most a base and its merged copy.
    Returns (spec, merged folder, facts about the inputs)."""
    root = workdir / "families" / f"{family.name}-{shape}"
    spec, merged, marker = root / "spec.yaml", root / "merged", root / "complete.json"
    wanted = json.dumps({"version": INPUTS_VERSION, "family": family.name, "shape": shape, "seed": seed,
                         "config": family_config(family, shape).to_dict()}, default=str, sort_keys=True)
    if marker.is_file() and json.loads(marker.read_text())["wanted"] == wanted:
        merge_bench.log(f"{family.name}: using the merged bundle in {merged}")
        return spec, merged, json.loads(marker.read_text())["facts"]
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    merge_bench.log(f"{family.name}: generating the {shape} base ({family.dimensions}) in {root}")
    started = time.perf_counter()
    base = root / "base"
    total = generate_base(base, family, shape, cached_tokenizer(workdir, family.tokenizer), seed=seed)
    generate_adapter(root / "adapter" / "checkpoint-1000", base, family, seed=seed)
    spec = write_spec(root, family, base, root / "adapter" / "checkpoint-1000")
    merge_bench.log(f"{family.name}: {total / 1e9:.2f} GB of weights in {time.perf_counter() - started:.0f} s; "
                    "merging (modelpack build --no-verify)")
    # `python -m builder`: the builder/ first on PYTHONPATH (gguf_bench's --modelpack-root), not an installed one
    subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--no-verify", "--force", "-o", str(merged)],
                   check=True, stdout=subprocess.DEVNULL)
    shutil.rmtree(base)
    spec = write_spec(root, family, merged, root / "adapter" / "checkpoint-1000")
    facts = {"base_bytes": total, "parameters": total // 2, "dimensions": family.dimensions,
             "config": {k: v for k, v in family_config(family, shape).to_dict().items()
                        if k in ("hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                                 "num_experts_per_tok", "vocab_size", "tie_word_embeddings")},
             "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA, "targets": list(family.targets)}}
    marker.write_text(json.dumps({"wanted": wanted, "facts": facts}, indent=2, default=str))
    return spec, merged, facts
