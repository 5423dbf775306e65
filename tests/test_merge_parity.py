"""A merged bundle holds exactly the tensors peft's merge_and_unload produces, and answers like base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from builder.build import build_bundle, plan_from_spec
from helpers import bundle_tensors, write_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (id, architecture, tied embeddings, base dtype, output dtype, LoRA options)
CASES = [
    ("qwen2-tied-fp32", "qwen2", True, torch.float32, "float32", {}),
    ("llama-untied-bf16", "llama", False, torch.bfloat16, "bfloat16", {}),
    ("qwen2-fp32-base-to-bf16", "qwen2", True, torch.float32, "bfloat16", {}),
    ("llama-fp16", "llama", False, torch.float32, "float16", {}),
    (
        "rslora-with-patterns",
        "qwen2",
        True,
        torch.float32,
        "float32",
        dict(
            use_rslora=True,
            target_modules=ALL_LINEAR,
            rank_pattern={"v_proj": 4, r"layers\.1\.mlp\.down_proj": 2},
            alpha_pattern={"q_proj": 32, "o_proj": 3},
        ),
    ),
    ("lm-head-on-tied-embedding", "qwen2", True, torch.float32, "float32", dict(target_modules=["q_proj", "lm_head"])),
    ("lm-head-untied-bf16", "llama", False, torch.bfloat16, "bfloat16", dict(target_modules=["lm_head", "up_proj"])),
    # GPT-2's Conv1D stores weights (in, out); attn.c_proj is square, so only fan_in_fan_out tells the orientation.
    ("gpt2-conv1d", "gpt2", True, torch.float32, "float32", dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    ("embedding-lora-untied-bf16", "llama", False, torch.bfloat16, "bfloat16",
     dict(target_modules=["embed_tokens", "q_proj"])),
    ("embedding-lora-on-tied", "qwen2", True, torch.float32, "float32",
     dict(target_modules=["embed_tokens", "q_proj"])),
    ("dora-linear-bf16", "llama", False, torch.bfloat16, "bfloat16", dict(use_dora=True, target_modules=ALL_LINEAR)),
    ("dora-embedding", "llama", False, torch.float32, "float32",
     dict(use_dora=True, target_modules=["embed_tokens", "v_proj"])),
    ("dora-conv1d", "gpt2", True, torch.float32, "float32", dict(use_dora=True, target_modules=["c_attn", "c_proj"])),
    ("lora-bias", "qwen2", True, torch.float32, "float32", dict(lora_bias=True, target_modules=["q_proj", "k_proj"])),
    ("bias-lora-only", "qwen2", True, torch.bfloat16, "bfloat16",
     dict(bias="lora_only", target_modules=["q_proj", "v_proj"])),
    ("bias-all", "qwen2", True, torch.float32, "float32", dict(bias="all", target_modules=["q_proj"])),
    ("modules-to-save-untied", "llama", False, torch.float32, "float32", dict(modules_to_save=["lm_head"])),
    ("modules-to-save-tied-head", "qwen2", True, torch.float32, "float32", dict(modules_to_save=["lm_head"])),
    ("trainable-tokens", "llama", False, torch.float32, "float32", dict(trainable_token_indices=[3, 7, 400])),
    ("trainable-tokens-tied", "qwen2", True, torch.bfloat16, "bfloat16", dict(trainable_token_indices=[5, 9])),
    ("resized-vocab-untied", "llama", False, torch.float32, "float32",
     dict(resize_vocab=424, target_modules=["q_proj", "embed_tokens", "lm_head"])),
    ("resized-vocab-tied", "qwen2", True, torch.float32, "float32",
     dict(resize_vocab=424, target_modules=["q_proj", "embed_tokens"])),
]
# Cases where peft's merge writes a one-sided delta into the tied matrix; the bundle unties instead, so it is
# compared with the unmerged adapter (the model the user trained) rather than with peft's merged tensors.
UNTIED_BY_BUNDLE = {"lm-head-on-tied-embedding", "embedding-lora-on-tied", "resized-vocab-tied"}


def peft_reference(base, adapter, dtype, *, resize_vocab=None):
    """The oracle: base loaded in the output dtype, the adapter through peft, unmerged and merged."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize_vocab:
        model.resize_token_embeddings(resize_vocab)
    peft_model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([[1, 5, 17, 33, 80, 2, 101, 7, 250, 3]])
    with torch.no_grad():
        unmerged_logits = peft_model(ids).logits
        merged = peft_model.merge_and_unload().eval()
        merged_logits = merged(ids).logits
    return merged.state_dict(), unmerged_logits, merged_logits, ids


@pytest.mark.parametrize("case_id, arch, tied, base_dtype, out_dtype, lora", CASES, ids=[c[0] for c in CASES])
def test_merged_bundle_equals_peft_merge(tmp_path, models, adapters, case_id, arch, tied, base_dtype, out_dtype, lora):
    base = models(arch, tied=tied, dtype=base_dtype)
    adapter = adapters(base, case_id, **lora)
    spec = write_spec(tmp_path, base, adapter, output={"dtype": out_dtype})
    result = build_bundle(plan_from_spec(spec), verify=False)

    dtype = DTYPES[out_dtype]
    merged_state, unmerged_logits, merged_logits, ids = peft_reference(
        base, adapter, dtype, resize_vocab=lora.get("resize_vocab")
    )
    written = bundle_tensors(result.bundle)
    bundle_model = AutoModelForCausalLM.from_pretrained(result.bundle, dtype=dtype).eval()
    with torch.no_grad():
        logits = bundle_model(ids).logits
    # Against the unmerged adapter the only difference is where rounding happens: (W + BA)x vs Wx + B(Ax).
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    assert (logits.float() - unmerged_logits.float()).abs().max().item() <= tolerance

    if case_id in UNTIED_BY_BUNDLE:
        assert json.loads((result.bundle / "config.json").read_text())["tie_word_embeddings"] is False
        assert set(written) == set(merged_state)
        return
    for name, tensor in written.items():
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, merged_state[name]), f"{name} differs from peft's merge"
    # Every tensor peft's merged model holds is in the bundle, except a tied head that shares the embedding.
    missing = set(merged_state) - set(written)
    assert missing <= ({"lm_head.weight"} if tied else set())
    assert torch.equal(logits, merged_logits)


def test_sharded_base_streams_into_sharded_bundle(tmp_path, models, adapters):
    base = models("llama", tied=False, dtype=torch.float32, shards=True)
    adapter = adapters(base)
    spec = write_spec(tmp_path, base, adapter, output={"max_shard_size": "100KB"})
    result = build_bundle(plan_from_spec(spec), verify=False)

    shards = sorted(p.name for p in result.bundle.glob("model-*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size <= 100_000 + 64 * 128 * 4 for p in result.bundle.glob("model-*"))
    merged_state, *_ = peft_reference(base, adapter, torch.float32)
    written = bundle_tensors(result.bundle)
    assert set(written) == set(merged_state)
    assert all(torch.equal(written[n], merged_state[n]) for n in written)


def test_block_wise_merge_is_bit_identical(tmp_path, models, adapters, monkeypatch):
    """Large tensors are merged in row blocks to bound memory; the result must not depend on the block size."""
    import builder.weights

    base = models("llama", tied=False, dtype=torch.bfloat16)
    adapter = adapters(base, "blocks", target_modules=["q_proj", "down_proj", "lm_head"])
    monkeypatch.setattr(builder.weights, "BLOCK_BYTES", 1000)  # the minimum block: 64 rows
    spec = write_spec(tmp_path, base, adapter, output={"dtype": "bfloat16"})
    written = bundle_tensors(build_bundle(plan_from_spec(spec), verify=False).bundle)
    merged_state, *_ = peft_reference(base, adapter, torch.bfloat16)
    assert all(torch.equal(written[n], merged_state[n]) for n in written)

