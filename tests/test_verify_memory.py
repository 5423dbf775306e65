"""Verification holds one model at a time, and says what it will cost before it starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from builder.build import build_bundle, plan_from_spec
from builder.console import verification_checks
from builder.verification_cost import verification_cost
from builder.verify import ReferenceAdapter, ReferenceSources, verify_bundle
from helpers import make_adapter, make_base_model, subprocess_env, write_spec

# A Qwen2 of 49M parameters: 197 MB in float32, large enough that a second copy in a process shows far above the
# noise of what torch and transformers allocate around it, small enough to build and verify in seconds.
MEDIUM = dict(hidden_size=640, intermediate_size=2560, num_hidden_layers=8, num_attention_heads=4,
              num_key_value_heads=2)


def test_verification_cost_counts_loads_and_tokens_from_the_spec():
    merge = verification_cost(mode="merge", answers=2, max_new_tokens=4, compare_base=True, equivalence=True,
                              vocab_rows=152064, logits_itemsize=2)
    assert merge.loads == ("the bundle (its own load.py --verify)",
                           "base + adapter through peft (the unmerged reference, the base answers)")
    assert merge.generated_tokens == 2 * 4 + 2 * 4
    assert merge.kept_logits_bytes == 2 * 5 * 152064 * 2
    separate = verification_cost(mode="separate", answers=3, max_new_tokens=8, compare_base=False, equivalence=True,
                                 vocab_rows=416, logits_itemsize=4)
    assert separate.loads[1] == "the bundle again, merged in memory after scoring (the reference)"
    assert separate.generated_tokens == 3 * 8
    # `modelpack verify` without the sources: the bundle alone, and base answers need the sources.
    alone = verification_cost(mode="merge", answers=2, max_new_tokens=4, compare_base=True, equivalence=False,
                              vocab_rows=416, logits_itemsize=4)
    assert (len(alone.loads), alone.generated_tokens, alone.kept_logits_bytes) == (1, 2 * 4, None)
    assert alone.describe() == ("verification: 1 model load, one model in memory at a time (the bundle (its own "
                                "load.py --verify)); up to 8 generated tokens (2 answers x 4 by the bundle)")


def test_the_dry_run_states_what_verification_will_load_and_generate(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), verify={
        "max_new_tokens": 4, "prompts": [{"prompt": "你好"}], "probes": [{"prompt": "hi"}], "compare_base": True})
    rows = dict(verification_checks(plan_from_spec(spec), verification=True))
    assert "verification: " + rows["verify: cost"] == (
        "verification: 2 model loads, one model in memory at a time (the bundle (its own load.py --verify); "
        "base + adapter through peft (the unmerged reference, the base answers)); up to 16 generated tokens "
        "(2 answers x 4 by the bundle, 2 x 4 by the base alone); 2 answers scored by both "
        "models, up to 16.6 KB of logits kept on disk between them"
    )


def _import_baseline_gb() -> float:
    """Peak RSS of a process that imports what a verification process imports, and loads nothing."""
    code = ("import resource, torch, transformers, peft, safetensors; from transformers import AutoModelForCausalLM; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=subprocess_env(),
                         check=True)
    return float(out.stdout.strip())


@pytest.fixture(scope="module")
def medium_base(tmp_path_factory):
    root = tmp_path_factory.mktemp("medium")
    base = make_base_model(root / "base", arch="qwen2", tied=False, dtype=torch.float32, **MEDIUM)
    return base, make_adapter(root / "adapter" / "checkpoint-10", base)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_each_verification_process_holds_one_model(tmp_path, medium_base, mode):
    """Peak RSS of both verification processes (the bundle answering, then the reference compared with its
    logits), against a process that only imports the libraries: one model's weights above it, never two."""
    base, adapter = medium_base
    spec = write_spec(tmp_path, base, adapter, output={"mode": mode}, verify={
        "max_new_tokens": 4, "prompts": [{"prompt": "你好"}], "probes": [{"prompt": "hi"}]})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle
    lines: list[str] = []
    report = verify_bundle(bundle, device="cpu", sources=ReferenceSources(base, (ReferenceAdapter(adapter),)),
                           compare_base=True, progress=lines.append)
    assert report["ok"] and all("base_answer" in r for r in report["prompts"] + report["probes"])
    weights = sum(p.stat().st_size for p in bundle.rglob("*.safetensors")) / 1e9
    baseline = _import_baseline_gb()
    peaks = {"bundle": report["runtime"]["peak_rss_gb"], "reference": report["equivalence"]["peak_rss_gb"]}
    for step, peak in peaks.items():
        # One model: baseline + weights + activations and logits of a few tokens. Two would add another weights.
        assert peak - baseline < 1.5 * weights, (step, peak, baseline, weights)
    assert len(report["equivalence"]["prompts"]) == 2 and report["equivalence"]["positions"] >= 2
    # The progress lines say the cost first, then each step; the reference step loads the reference alone.
    cost = next(i for i, line in enumerate(lines) if line.startswith("verification: 2 model loads"))
    step1 = lines.index("verification step 1 of 2: the bundle (its own load.py --verify)")
    step2 = next(i for i, line in enumerate(lines) if line.startswith("verification step 2 of 2: "))
    assert cost < step1 < lines.index("scoring the answers for the equivalence check") < step2
    loading = [line for line in lines if line.startswith("equivalence: loading")]
    assert loading == ["equivalence: loading " + ("base + adapter through peft (the unmerged reference)"
                                                  if mode == "merge" else "the bundle, base + adapter through peft")]
