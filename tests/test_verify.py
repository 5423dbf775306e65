"""Verification catches what a deployment team would trip over: changed files, wrong answers, broken serving
settings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import builder
from builder.build import build_bundle, plan_from_spec
from builder.errors import BundleError, VerificationError
from builder.manifest import write_manifest
from builder.report import failure_message, read_verification, verification_report
from builder.trust import DIGEST_PLACEHOLDER
from builder.verify import verify_bundle
from helpers import write_spec


@pytest.fixture(scope="module")
def built(tmp_path_factory, models, adapters):
    root = tmp_path_factory.mktemp("verify")
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(root, base, adapters(base),
                      verify={"prompts": [{"prompt": "你好"}], "probes": [{"prompt": "hi"}]})
    return build_bundle(plan_from_spec(spec), verify=False).bundle


@pytest.fixture
def bundle(built, tmp_path):
    """A fresh copy per test, so each can break it its own way."""
    copy = tmp_path / built.name
    shutil.copytree(built, copy)
    return copy


def test_an_untouched_bundle_passes_and_reports_every_check(bundle):
    report = verify_bundle(bundle)
    assert report["ok"] and failure_message(report) is None
    files = len(json.loads((bundle / "manifest.json").read_text())["files"])
    assert report["integrity"] == {"ok": True, "files": files,
                                   "problems": [], "checked_by": f"modelpack {builder.__version__}"}
    assert report["serving_contract"]["ok"] and report["serving"] == []  # no serving engine was asked for
    assert [r["prompt"] for r in report["prompts"]] == ["你好"] and [r["prompt"] for r in report["probes"]] == ["hi"]
    assert set(report["environment"]) >= {"python", "torch", "transformers"}
    runtime = report["runtime"]  # the speed is the answers' own: at most max_new_tokens for each of the 2 answers
    assert 1 <= runtime["generated_tokens"] <= 2 * 64
    assert runtime["tokens_per_second"] == pytest.approx(runtime["generated_tokens"] / runtime["generation_seconds"],
                                                         rel=0.05)


def test_the_generation_clock_counts_what_generate_adds_and_unwraps_itself(models):
    from transformers import AutoModelForCausalLM

    from helpers import RUNTIME, import_file

    check = import_file(RUNTIME / "bundle_check.py", "runtime_bundle_check_clock")
    model = AutoModelForCausalLM.from_pretrained(models("qwen2", tied=True, dtype=torch.float32))
    prompt = torch.tensor([[5, 6, 7]])
    clock = check.GenerationClock(model)
    with clock:  # input_ids positional, as Qwen-v1's chat() calls self.generate
        model.generate(prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    with clock:  # and by keyword, asking for a dict back
        model.generate(input_ids=prompt, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                       return_dict_in_generate=True)
    assert clock.tokens == 8 and clock.seconds > 0
    assert clock.tokens_per_second() == round(8 / clock.seconds, 2)
    assert "generate" not in vars(model)  # the class's own generate is back
    assert check.GenerationClock(model).tokens_per_second() is None  # nothing generated: no speed to report


def test_the_generation_clock_counts_a_peft_models_tokens_once_and_its_base_models_too(models, adapters):
    """Separate mode: PeftModel.generate calls its base model's generate (counted once), and remote chat code
    (Qwen-v1's chat, which a PeftModel hands to its base model) calls the base model's self.generate directly."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from helpers import RUNTIME, import_file

    check = import_file(RUNTIME / "bundle_check.py", "runtime_bundle_check_peft_clock")
    base = models("qwen2", tied=True, dtype=torch.float32)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapters(base))
    prompt = torch.tensor([[5, 6, 7]])
    clock = check.GenerationClock(model)
    with clock:
        model.generate(input_ids=prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        model.get_base_model().generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False)
    assert clock.tokens == 6
    assert "generate" not in vars(model) and "generate" not in vars(model.get_base_model())


def test_two_runs_give_the_same_answers(bundle):
    first, second = verify_bundle(bundle), verify_bundle(bundle)
    assert [r["answer"] for r in first["prompts"] + first["probes"]] == [
        r["answer"] for r in second["prompts"] + second["probes"]
    ]


def test_a_corrupted_shard_is_caught(bundle):
    shard = bundle / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-10] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(VerificationError) as caught:  # before load.py runs: see test_trust.py
        verify_bundle(bundle)
    assert "integrity: model.safetensors: sha256 differs from manifest.json" in caught.value.message


def test_a_file_added_after_the_build_is_caught(bundle):
    (bundle / "notes.txt").write_text("added later")
    with pytest.raises(VerificationError) as caught:
        verify_bundle(bundle)
    assert "integrity: notes.txt: not in manifest.json (added after the build)" in caught.value.message


def test_an_expectation_that_cannot_hold_names_prompt_and_answer(bundle):
    facts_path = bundle / "modelpack_bundle.json"
    facts = json.loads(facts_path.read_text())
    assert facts["prompts"][0]["expect"]["equals"] is None
    facts["prompts"][0]["expect"]["equals"] = "IMPOSSIBLE"
    facts_path.write_text(json.dumps(facts, ensure_ascii=False))
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    message = failure_message(verify_bundle(bundle))
    assert "prompt '你好': expected equals 'IMPOSSIBLE'; answered " in message


def test_generation_config_without_end_of_turn_id_is_caught(bundle):
    path = bundle / "generation_config.json"
    config = json.loads(path.read_text())
    config["eos_token_id"] = 0
    path.write_text(json.dumps(config))
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))
    message = failure_message(verify_bundle(bundle))
    assert ("serving: generation_config.json eos_token_id [0] lacks the chat template's end-of-turn token <|im_end|>"
            in message)


def test_a_folder_that_is_not_a_bundle_is_refused(tmp_path):
    with pytest.raises(BundleError, match="is not a modelpack bundle"):
        verify_bundle(tmp_path)


def test_a_merge_with_wrong_scaling_fails_equivalence(tmp_path, models, adapters, monkeypatch):
    """The merged weights are compared with base + adapter through peft, loaded from the sources."""
    import builder.adapter_match

    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base))
    real_scaling = builder.adapter_match.lora_scaling
    monkeypatch.setattr(builder.adapter_match, "lora_scaling", lambda **kw: 2 * real_scaling(**kw))
    with pytest.raises(VerificationError) as caught:
        build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    assert "equivalence: prompt '你好': max |delta logit|" in caught.value.message
    assert "from base + adapter through peft, unmerged" in caught.value.message
    report = caught.value.report  # the error carries the report: the build's, sealed later, names no digest yet
    assert report is not None and not report["ok"] and not report["equivalence"]["ok"]
    assert report["digest"] == DIGEST_PLACEHOLDER and failure_message(report) == caught.value.message


def test_equivalence_passes_and_base_answers_are_recorded(tmp_path, models, adapters):
    base = models("llama", tied=False, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), verify={"compare_base": True, "probes": [{"prompt": "hi"}]})
    result = build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    report = result.verification
    # verification.json as written has exactly the declared shape (builder/report.py), digest included.
    written = read_verification(json.loads((result.bundle / "verification.json").read_text()))
    assert written["digest"] == result.digest and written["equivalence"]["prompts"][0]["ok"]
    equivalence = report["equivalence"]
    assert equivalence["ok"] and equivalence["dtype"] == "float32"
    assert equivalence["max_abs_logit_diff"] < 1e-3 and equivalence["significant_disagreements"] == 0
    assert all("base_answer" in r for r in report["prompts"] + report["probes"])


def test_dora_adapter_in_separate_mode_gets_a_vllm_warning(tmp_path, models, adapters):
    base = models("llama", tied=False, dtype=torch.float32)
    adapter = adapters(base, "dora-separate", use_dora=True)
    spec = write_spec(tmp_path, base, adapter, output={"mode": "separate"})
    report = build_bundle(plan_from_spec(spec), verify=True, device="cpu").verification
    assert report["ok"] and report["equivalence"]["reference"] == "bundle merged in memory"
    warnings = report["serving_contract"]["warnings"]
    assert any("DoRA adapters (use_dora) are not supported by vLLM" in w for w in warnings)
    assert len(warnings) == 1


def test_a_report_of_another_shape_is_named_not_a_key_error():
    with pytest.raises(VerificationError, match="verification.json does not have the expected shape: .*integrity"):
        read_verification({"bundle": "x", "ok": True})


def test_the_report_is_assembled_whole_from_its_parts():
    answer = {"prompt": "你好", "answer": "hi", "failures": [], "ok": True,
              "expect": {"contains": [], "not_contains": [], "equals": None, "regex": None}}
    runtime = {"bundle": "tiny", "ok": True, "integrity": {"ok": True, "files": None, "problems": []},
               "serving": {"ok": True, "problems": [], "warnings": []}, "prompts": [answer], "probes": [],
               "environment": {"torch": "2.9.0"},
               "runtime": {"load_seconds": 0.1, "tokens_per_second": None, "placement": {"parameters": {"cpu": 1}}}}
    equivalence = {"ok": True, "dtype": "float32", "rule": "exact", "max_abs_logit_diff": 0.0, "positions": 3,
                   "greedy_agreement": 1.0, "significant_disagreements": 0, "prompts": [], "reference": "peft",
                   "seconds": 1.5, "base_answers": {"你好": "base"}, "adapter_answers": [{"你好": "a"}, {"你好": "b"}]}
    gguf = {"ok": False, "runtime": "llama-cpp-python 0.3.36", "threads": 2, "files": []}
    skipped = [{"check": "vllm", "reason": "not installed"}]
    files = {"ok": True, "files": 9, "problems": [], "checked_by": "modelpack 0.1.0"}
    report = verification_report(runtime, files=files, digest=DIGEST_PLACEHOLDER, remote_code={}, skipped=skipped,
                                 gguf=gguf, equivalence=equivalence)
    # verification.json's keys in their order; `serving` lists the engine runs (format 3), none here
    assert list(report) == ["bundle", "ok", "integrity", "serving_contract", "prompts", "probes", "environment",
                            "runtime", "digest", "remote_code", "skipped", "serving", "gguf", "equivalence"]
    assert report["serving_contract"] == runtime["serving"] and report["serving"] == []
    assert report["ok"] is False  # the GGUF check failed
    assert report["integrity"] is files and report["skipped"] == skipped and report["digest"] == DIGEST_PLACEHOLDER
    # the reference's answers beside the bundle's, keyed as the spec names the adapters; the comparison without them
    assert report["prompts"] == [{**answer, "base_answer": "base",
                                  "adapter_answers": {"adapters[0]": "a", "adapters[1]": "b"}}]
    assert list(report["equivalence"]) == [key for key in equivalence if not key.endswith("_answers")]
    assert "base_answer" not in runtime["prompts"][0] and "base_answers" in equivalence  # its parts are unchanged
    assert read_verification(report) == report
    alone = verification_report(runtime, files=files, digest="sha256:" + "0" * 64, remote_code={}, skipped=[],
                                gguf=None, equivalence=None)
    assert alone["ok"] and "gguf" not in alone and "equivalence" not in alone and alone["prompts"] == [answer]
