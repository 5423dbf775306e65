"""Shared test helpers: tiny real models (Qwen2, Llama, GPT-2) built from configs, a trained BPE tokenizer, peft
adapters, specs, and the assertions every user-error test makes. Test modules import from here, never from conftest."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "我家宝宝六个月，吃奶、睡觉常常满头冒汗。这是缺钙的原因。",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "什么是机器学习？机器学习是让计算机从数据中学习。",
] * 20


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    fast.save_pretrained(folder)


def make_base_model(
    folder: Path, *, arch: str, tied: bool, dtype: torch.dtype, max_shard_size: str = "5GB", **size_overrides
) -> Path:
    """A randomly initialised tiny model saved like a hub checkpoint: safetensors, tokenizer, generation config."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder.mkdir(parents=True)
    save_tokenizer(folder)
    sizes = dict(
        vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    sizes.update(size_overrides)
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers: weights stored (in, out), LoRA with fan_in_fan_out
        config = GPT2Config(vocab_size=416, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=2,
                            eos_token_id=2, tie_word_embeddings=tied)
        model = GPT2LMHeadModel(config).to(dtype)
    else:
        config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        model = model_cls(config_cls(**sizes)).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.7)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def make_adapter(
    folder: Path, base: Path, *, dtype: torch.dtype = torch.float32, resize_vocab: int | None = None, **lora_options
) -> Path:
    """A peft LoRA checkpoint with random (non-zero) weights, plus the leftovers a trainer writes.

    Every trainable tensor (LoRA factors, DoRA magnitudes, modules_to_save copies, biases, token rows) is
    perturbed, as training would, so a merge that ignores any of them changes the outputs visibly.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize_vocab:
        torch.manual_seed(2)
        model.resize_token_embeddings(resize_vocab)
    options = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    options.update(lora_options)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(4.0)
            elif param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(folder, save_embedding_layers=True if resize_vocab else "auto")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/Work/train-machine/models/tiny-base"
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save({"state": [torch.zeros(16)]}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    torch.save({"seed": 1}, folder / "rng_state.pth")
    return folder


def write_spec(folder: Path, base_dir: Path, adapter_dir: Path, /, **sections) -> Path:
    """A spec file in folder, with paths relative to it as a committed spec would have them."""
    import yaml

    spec = {
        "name": "tiny-med",
        "base": {"path": os.path.relpath(base_dir, folder)},
        "adapter": {"path": os.path.relpath(adapter_dir, folder)},
        "output": {"dir": "dist/tiny-med", "mode": "merge", "dtype": "auto"},
        "generation": {"max_new_tokens": 16},
        "verify": {"max_new_tokens": 8, "prompts": [{"prompt": "你好"}]},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path




def bundle_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a bundle's weight files, read back through safetensors (every written file must round-trip)."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(bundle.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def tree_snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file below folder (symlinks as their target text): what "unchanged"
    means for sources and destinations in the fault tests."""
    snapshot: dict[str, tuple[int, str]] = {}
    if not folder.exists():
        return snapshot
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            snapshot[name] = (-1, os.readlink(path))
        elif path.is_file():
            snapshot[name] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return snapshot


def assert_user_error(result, exit_code: int, *culprits: str) -> None:
    """A CLI result is one clear user error: the exit code, no traceback, and a message naming every culprit."""
    output = result.output
    assert result.exit_code == exit_code, output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: " in output, output
    for culprit in culprits:
        assert culprit in output, f"{culprit!r} not in:\n{output}"


# The Python that ships inside bundles (and the equivalence script), as in the repository.
RUNTIME = Path(__file__).resolve().parents[1] / "templates" / "runtime"


def import_file(path: Path, name: str | None = None):
    """A Python file imported by path as a fresh module (a bundle's load.py, or the runtime in templates/runtime)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name or f"imported_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # never a __pycache__ inside a bundle
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module
