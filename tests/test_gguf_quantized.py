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
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import SpecError, VerificationError
from builder.gguf_facts import DEFAULT_MAX_MEAN_KLD, estimated_gguf_bytes, variant_budgets
from builder.report import failure_message
from builder.spec import load_spec
from builder.verify import reverify_bundle
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
        assert entry["tensor_types"] == counts
        assert entry["weight_shares"].keys() == counts.keys()
        assert sum(entry["weight_shares"].values()) == pytest.approx(1, abs=1e-3)


def test_each_variant_is_measured_against_the_16_bit_gguf(built):
    files = files_of(built)
    for entry in files.values():
        assert entry["reference"] == "tiny-med-bf16.gguf"
        assert entry["tokens"] > 1000  # the prompts' and probes' few hundred, and the held-out text's
        assert 0 < entry["mean_kld"] <= entry["budget"]["max_mean_kld"]
        assert entry["p99_kld"] >= entry["mean_kld"] and 0 <= entry["top1"] <= 1
        assert entry["within_budget"] and entry["ok"]
    assert files["q6_k"]["mean_kld"] < files["q4_k_m"]["mean_kld"]
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
                      export={"gguf": {"types": ["q4_0"], "budget": {"max_mean_kld": 1e-9}}},
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
    assert files_of(result)["q6_k"]["reference"] == "tiny-med-bf16.gguf"  # the shipped one


def test_without_llama_cpp_a_spec_asking_for_k_quants_is_refused(tmp_path, models, adapters, monkeypatch):
    import builder.gguf_facts

    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {"types": ["q8_0", "q4_k_m"]}})
    monkeypatch.setattr(builder.gguf_facts, "llama_cpp_installed", lambda: False)
    with pytest.raises(SpecError, match=r"q4_k_m .*modelpack-lora\[gguf\]"):
        plan_from_spec(spec)


def test_one_budget_for_every_variant_with_per_type_overrides(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {
        "types": ["bf16", "q8_0", "q6_k", "q4_k_m"],
        "budget": {"max_mean_kld": 0.03, "min_top1": 0.5,
                   "types": {"q4_k_m": {"max_mean_kld": 0.2, "expectations": True}, "q8_0": {"min_top1": 0.9}}}}})
    assert variant_budgets(load_spec(spec)) == {
        "q8_0": {"max_mean_kld": 0.03, "min_top1": 0.9, "expectations": False},
        "q6_k": {"max_mean_kld": 0.03, "min_top1": 0.5, "expectations": False},
        "q4_k_m": {"max_mean_kld": 0.2, "min_top1": 0.5, "expectations": True},
    }
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {"types": ["q6_k", "q4_0"]}})
    assert variant_budgets(load_spec(spec)) == {  # modelpack's defaults, reported answers
        "q6_k": {"max_mean_kld": DEFAULT_MAX_MEAN_KLD["q6_k"], "min_top1": 0.0, "expectations": False},
        "q4_0": {"max_mean_kld": DEFAULT_MAX_MEAN_KLD["q4_0"], "min_top1": 0.0, "expectations": False},
    }


@pytest.mark.parametrize(("budget", "message"), [
    ({"max_mean_kld": {"q4_k_m": 0.1}}, r"export\.gguf\.budget\.max_mean_kld.*per-type budgets go under "
                                        r"export\.gguf\.budget\.types"),
    ({"types": {"q4_0": {"max_mean_kld": 0.1}}}, r"budget\.types names q4_0, which export\.gguf\.types does not list"),
    ({"types": {"bf16": {"max_mean_kld": 0.1}}}, r"export\.gguf\.budget\.types"),
    ({"min_top1": 1.5}, r"export\.gguf\.budget\.min_top1"),
    ({"types": {"q4_k_m": {"max_mean_kld": 0}}}, r"max_mean_kld"),
])
def test_a_budget_that_cannot_be_applied_is_refused_naming_the_key(tmp_path, models, adapters, budget, message):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {"types": ["q4_k_m"], "budget": budget}})
    with pytest.raises(SpecError, match=message):
        load_spec(spec)


def test_the_bundle_carries_each_variants_budget_for_its_receivers(built):
    facts = json.loads((built.bundle / "modelpack_bundle.json").read_text())
    assert facts["gguf_budget"] == {t: {"max_mean_kld": DEFAULT_MAX_MEAN_KLD[t], "min_top1": 0.0,
                                        "expectations": False} for t in ("q6_k", "q4_k_m")}
    for entry in files_of(built).values():
        assert entry["budget"] == facts["gguf_budget"][entry["type"]]


def test_the_16_bit_source_counts_in_the_disk_the_build_needs(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["q4_k_m"]}})
    plan = plan_from_spec(spec)
    shapes = [t.source.shape for s in plan.shards for t in s.tensors]
    assert plan.gguf_bytes == estimated_gguf_bytes(shapes, "q4_k_m") + estimated_gguf_bytes(shapes, "bf16")


def test_quantized_answers_are_held_to_the_expectations_only_when_the_budget_says_so(built, wide):
    """The bundle meets an expectation that one quantized file's answer misses: reported by default, a failed build
    (exit 3) with budget.expectations."""
    root, base, adapter = wide
    bundle_answers = {r["prompt"]: r["answer"] for r in built.verification["prompts"]}
    gguf_type, prompt = next((f["type"], a["prompt"]) for f in built.verification["gguf"]["files"]
                             for a in f["answers"] if a["prompt"] in bundle_answers and not a["equal"])
    folder = root / "expectations"
    folder.mkdir()
    prompts = [{"prompt": prompt, "expect": {"equals": bundle_answers[prompt]}}]

    def build(expectations: bool):
        spec = write_spec(folder, base, adapter, output={"dtype": "bfloat16"},
                          export={"gguf": {"types": [gguf_type], "budget": {"expectations": expectations}}},
                          verify={"max_new_tokens": 8, "prompts": prompts})
        return build_bundle(plan_from_spec(spec), verify=True, device="cpu", force=True)

    reported = build(expectations=False)
    (entry,) = reported.verification["gguf"]["files"]
    assert entry["ok"] and not entry["expectations_required"] and entry["answers"][0]["failures"]
    assert "missed (reported, not required)" in (reported.bundle / "README.md").read_text()
    with pytest.raises(VerificationError, match=rf"gguf: gguf/tiny-med-{gguf_type}.gguf: prompt .*: expected "):
        build(expectations=True)


def test_a_receiver_remeasures_the_variants_against_the_16_bit_gguf_made_from_the_bundle(built, wide):
    """The bundle ships no 16-bit GGUF: verify makes it from the bundle's weights and, scoring the same held-out
    text, gets the build's figures exactly (the same tensors, so the same logits)."""
    root, _, _ = wide
    received = reverify_bundle(built.bundle, device="cpu", gguf_eval_text=root / "held-out.txt")
    assert failure_message(received) is None
    measured = {f["type"]: f for f in received["gguf"]["files"]}
    for gguf_type, entry in files_of(built).items():
        for key in ("reference", "tokens", "mean_kld", "p99_kld", "top1", "budget", "within_budget", "tensor_types"):
            assert measured[gguf_type][key] == entry[key], key
    assert "bf16" not in measured  # made in verify's working folder, not part of the bundle


def test_verify_refuses_an_eval_text_it_cannot_read(built, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for path, reason in ((tmp_path / "missing.txt", "cannot read it"), (tmp_path / "latin1.txt", "not UTF-8")):
        result = CliRunner().invoke(app, ["verify", str(built.bundle), "--eval-text", str(path)])
        assert result.exit_code == 2, result.output
        assert f"--eval-text {path}: {reason}" in result.output


def test_a_q8_0_file_listed_alone_is_measured_too(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["q8_0"]}}, verify={"max_new_tokens": 4, "prompts": PROMPTS[:1]})
    result = build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    assert sorted(p.name for p in (result.bundle / "gguf").glob("*.gguf")) == ["tiny-med-q8_0.gguf"]
    (entry,) = result.verification["gguf"]["files"]
    assert entry["reference"] == "tiny-med-bf16.gguf" and entry["tokens"] > 0 and entry["within_budget"]
    assert entry["budget"] == {"max_mean_kld": DEFAULT_MAX_MEAN_KLD["q8_0"], "min_top1": 0.0, "expectations": False}


def test_a_held_out_text_is_scored_up_to_its_first_8192_tokens_in_chunks_of_512():
    def tokenizer(text, add_special_tokens):
        return {"input_ids": list(range(len(text)))}  # a token per character

    chunks = gguf_check.text_chunks("x" * 20_000, tokenizer)
    assert [len(c) for c in chunks] == [512] * 16 and chunks[-1][-1] == 8191
    # the last token alone predicts nothing
    assert [len(c) for c in gguf_check.text_chunks("x" * 1_025, tokenizer)] == [512, 512]


@pytest.mark.parametrize(("content", "reason"), [
    (b"caf\xe9 au lait", r"not UTF-8 text \(byte 3\)"),
    (None, r"17\.0 MiB; held-out texts are scored up to their first 8,192 tokens, so give one of at most 16 MiB"),
])
def test_a_held_out_text_that_cannot_be_scored_is_refused_at_validate(tmp_path, models, adapters, content, reason):
    held_out = tmp_path / "held-out.txt"
    if content is None:
        with open(held_out, "wb") as f:  # sparse: 17 MiB of nothing on disk
            f.truncate(17 << 20)
    else:
        held_out.write_bytes(content)
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), export={"gguf": {"types": ["q8_0"], "eval_text": "held-out.txt"}})
    with pytest.raises(SpecError, match=rf"export\.gguf\.eval_text .*held-out\.txt: {reason}"):
        plan_from_spec(spec)


def test_the_reference_logits_need_their_disk_before_they_are_written(tmp_path):
    with pytest.raises(SystemExit, match=r"error: .*1000000\.0 GB for 100 positions, and .* GB free; free space there"):
        gguf_check.require_free_space(tmp_path, 10**15, 100)
    gguf_check.require_free_space(tmp_path, 1, 100)


def test_a_receiver_without_room_for_the_16_bit_gguf_is_told_where_and_how_much(built, monkeypatch):
    import builder.verify

    free = type("Usage", (), {"free": 1000})
    monkeypatch.setattr(builder.verify.shutil, "disk_usage", lambda path: free)
    result = CliRunner().invoke(app, ["verify", str(built.bundle), "--device", "cpu"])
    assert result.exit_code == 2, result.output
    assert "needs the 16-bit GGUF made from its weights, about" in result.output
    assert "GB free; free space there or point TMPDIR at a larger disk" in result.output


def test_the_quantized_types_are_one_list_wherever_they_are_named():
    """The spec (the lowest layer), gguf_facts and the standalone gguf_check each name them; they must agree, and the
    spec's description must state the defaults modelpack applies."""
    from typing import get_args

    from builder.gguf_facts import QUANTIZED_TYPES, SIXTEEN_BIT_TYPES
    from builder.spec import GgufBudget, QuantizedGgufType

    assert set(get_args(QuantizedGgufType)) == set(DEFAULT_MAX_MEAN_KLD) == set(gguf_check.QUANTIZED)
    assert set(DEFAULT_MAX_MEAN_KLD) == {"q8_0", *QUANTIZED_TYPES}
    assert set(gguf_check.SIXTEEN_BIT) == set(SIXTEEN_BIT_TYPES)
    described = GgufBudget.model_fields["max_mean_kld"].description
    for gguf_type, default in DEFAULT_MAX_MEAN_KLD.items():
        assert f"{gguf_type} {default:g}" in described
