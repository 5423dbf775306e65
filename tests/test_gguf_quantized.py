"""Quantized GGUF variants are made by llama.cpp's own quantizer from the 16-bit GGUF, reported as written (size,
bits per weight, tensor-type mix read back), and measured against the 16-bit GGUF in llama.cpp (KL divergence, top
token agreement) under a budget that fails the build when exceeded; without llama-cpp-python a spec asking for them
is refused at validate."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from builder.build import build_bundle, plan_from_spec
from builder.errors import SpecError, VerificationError
from helpers import RUNTIME, import_file, make_adapter, make_base_model, tree_snapshot, write_spec

sys.path.insert(0, str(RUNTIME))
gguf_check = import_file(RUNTIME / "gguf_check.py")
sys.path.remove(str(RUNTIME))

PROMPTS = [{"prompt": "你好"}, {"prompt": "hello there, how are you"}]


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A base whose rows are 256 or 512 long (hidden 256, intermediate 512): llama.cpp writes real k-quant blocks."""
    root = tmp_path_factory.mktemp("gguf-quantized")
    base = make_base_model(root / "base", arch="qwen2", tied=True, dtype=torch.float32, hidden_size=256,
                           intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    return root, base, make_adapter(root / "adapter" / "checkpoint-10", base)


@pytest.fixture(scope="module")
def built(wide):
    """q6_k and q4_k_m with no 16-bit type listed: the bf16 source is made outside the bundle and not shipped; a
    held-out text is scored too."""
    root, base, adapter = wide
    (root / "held-out.txt").write_text("The patient drank warm water and slept well. " * 40, encoding="utf-8")
    spec = write_spec(root, base, adapter, output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["q6_k", "q4_k_m"], "eval_text": "held-out.txt"}},
                      verify={"max_new_tokens": 8, "prompts": PROMPTS, "probes": [{"prompt": "hi"}]})
    return build_bundle(plan_from_spec(spec), verify=True, device="cpu")


def files_of(result) -> dict:
    return {f["type"]: f for f in result.verification["gguf"]["files"]}


def test_the_variants_are_llama_cpps_k_quants_and_only_they_are_shipped(built):
    folder = built.bundle / "gguf"
    assert sorted(p.name for p in folder.glob("*.gguf")) == ["tiny-med-q4_k_m.gguf", "tiny-med-q6_k.gguf"]
    manifest = json.loads((built.bundle / "manifest.json").read_text())["files"]
    assert {"gguf/tiny-med-q4_k_m.gguf", "gguf/tiny-med-q6_k.gguf"} <= set(manifest)
    for gguf_type, kind in (("q6_k", "Q6_K"), ("q4_k_m", "Q4_K")):
        written = {t.tensor_type.name for t in GGUFReader(folder / f"tiny-med-{gguf_type}.gguf").tensors}
        assert kind in written  # a block type the `gguf` library cannot write: llama.cpp's quantizer made it


def test_each_variant_has_its_modelfile_and_its_serving_line(built):
    folder = built.bundle / "gguf"
    assert "\nFROM ./tiny-med-q6_k.gguf\n" in (folder / "Modelfile").read_text()
    assert "\nFROM ./tiny-med-q4_k_m.gguf\n" in (folder / "Modelfile.q4_k_m").read_text()
    assert "gguf/Modelfile.q4_k_m" in json.loads((built.bundle / "manifest.json").read_text())["files"]
    card = (built.bundle / "README.md").read_text()
    assert "ollama create tiny-med:q4_k_m -f ./tiny-med/gguf/Modelfile.q4_k_m" in card


def test_the_reported_contents_are_the_files(built):
    for entry in files_of(built).values():
        path = built.bundle / entry["file"]
        tensors = GGUFReader(path).tensors
        weights = sum(int(t.n_elements) for t in tensors)
        assert entry["bytes"] == path.stat().st_size
        assert entry["bits_per_weight"] == pytest.approx(8 * sum(int(t.n_bytes) for t in tensors) / weights,
                                                         abs=1e-3)
        counts: dict[str, int] = {}
        for tensor in tensors:
            counts[tensor.tensor_type.name] = counts.get(tensor.tensor_type.name, 0) + 1
        assert {k: v["tensors"] for k, v in entry["tensor_types"].items()} == counts
        assert sum(v["share"] for v in entry["tensor_types"].values()) == pytest.approx(1, abs=1e-3)


def test_each_variant_is_measured_against_the_16_bit_gguf(built):
    files = files_of(built)
    for entry in files.values():
        quality = entry["quality"]
        assert quality["reference"] == "tiny-med-bf16.gguf"
        assert quality["tokens"] > 1000  # the prompts' and probes' few hundred, and the held-out text's
        assert 0 < quality["mean_kld"] <= quality["max_mean_kld"]
        assert quality["p99_kld"] >= quality["mean_kld"] and 0 <= quality["top1"] <= 1 and quality["ok"]
    assert files["q6_k"]["quality"]["mean_kld"] < files["q4_k_m"]["quality"]["mean_kld"]
    card = (built.bundle / "README.md").read_text()
    assert "tiny-med-q4_k_m.gguf" in card and "mean KLD" in card and "fewer than 2,000" in card


def test_kl_divergence_and_top_token_agree_with_numpy():
    rng = np.random.default_rng(0)
    reference, variant = rng.normal(size=(5, 11)), rng.normal(size=(5, 11))
    kld, top1 = gguf_check.divergence(reference, variant)
    p = np.exp(reference) / np.exp(reference).sum(-1, keepdims=True)
    q = np.exp(variant) / np.exp(variant).sum(-1, keepdims=True)
    assert kld == pytest.approx((p * np.log(p / q)).sum(-1))
    assert list(top1) == list(reference.argmax(-1) == variant.argmax(-1))
    assert gguf_check.divergence(reference, reference)[0] == pytest.approx(np.zeros(5), abs=1e-12)


def test_a_variant_over_its_budget_fails_the_build_and_leaves_the_bundle(built, wide):
    root, base, adapter = wide
    before = tree_snapshot(built.bundle)
    spec = write_spec(root, base, adapter, output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["q4_0"], "budget": {"max_mean_kld": {"q4_0": 1e-9}}}},
                      verify={"max_new_tokens": 4, "prompts": PROMPTS[:1]})
    with pytest.raises(VerificationError, match=r"tiny-med-q4_0.gguf: over its quality budget .*\(budget 1e-09\)"):
        build_bundle(plan_from_spec(spec), verify=True, device="cpu", force=True)
    assert tree_snapshot(built.bundle) == before


def test_rows_not_a_multiple_of_256_fall_back_and_the_report_says_so(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)  # hidden 64
    spec = write_spec(tmp_path, base, adapters(base), output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["bf16", "q6_k"]}},
                      verify={"max_new_tokens": 4, "prompts": PROMPTS[:1]})
    result = build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    mix = files_of(result)["q6_k"]["tensor_types"]
    assert "Q6_K" not in mix and "Q8_0" in mix  # llama.cpp's Q6_K -> Q8_0 fallback for 64-wide rows
    assert files_of(result)["q6_k"]["quality"]["reference"] == "tiny-med-bf16.gguf"  # the shipped one


def test_without_llama_cpp_a_spec_asking_for_k_quants_is_refused(tmp_path, models, adapters, monkeypatch):
    import builder.gguf_facts

    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {"types": ["q8_0", "q4_k_m"]}})
    monkeypatch.setattr(builder.gguf_facts, "llama_cpp_installed", lambda: False)
    with pytest.raises(SpecError, match=r"q4_k_m .*modelpack-lora\[gguf\]"):
        plan_from_spec(spec)
