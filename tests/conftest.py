"""Tiny real models for the tests: Qwen2 and Llama built from configs, a trained BPE tokenizer, peft adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

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


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Session-wide tiny bases: {(arch, tied, dtype): folder}, created on first use."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict = {}

    def get(arch: str = "qwen2", *, tied: bool = True, dtype: torch.dtype = torch.float32, shards: bool = False):
        key = (arch, tied, dtype, shards)
        if key not in cache:
            name = f"{arch}-{'tied' if tied else 'untied'}-{str(dtype)[6:]}{'-sharded' if shards else ''}"
            cache[key] = make_base_model(
                root / name, arch=arch, tied=tied, dtype=dtype, max_shard_size="60KB" if shards else "5GB"
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, models):
    """Session-wide adapters keyed by (base key, option name); options are given on first use."""
    root = tmp_path_factory.mktemp("adapters")
    cache: dict = {}

    def get(base: Path, label: str = "plain", **lora_options):
        key = (base, label)
        if key not in cache:
            cache[key] = make_adapter(root / f"{base.name}-{label}" / "checkpoint-10", base, **lora_options)
        return cache[key]

    return get
