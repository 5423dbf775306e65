"""The Python that ships inside bundles (builder/runtime/), unit by unit: no model is loaded here."""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from builder import render
from builder.sizing import KvCache
from builder.trust import BUNDLE_RUNTIME
from helpers import RUNTIME, import_file

load = import_file(RUNTIME / "load.py", "runtime_load")
check = import_file(RUNTIME / "bundle_check.py", "runtime_bundle_check")

FACTS = {
    "name": "tiny", "modelpack_version": "0.1.0", "mode": "merge", "dtype": "float32", "trust_remote_code": False,
    "system_prompt": "be brief", "has_chat_template": True, "end_of_turn_token": "<|im_end|>",
    "verify_max_new_tokens": 8, "prompts": [{"prompt": "hi", "expect": {"contains": ["a"]}}], "probes": [],
    "remote_code_files": [], "remote_code_imports": [],
    "gguf_budget": {"q4_k_m": {"max_mean_kld": 0.1, "min_top1": 0.0, "expectations": False}},
}


@pytest.mark.parametrize("answer, expect, failures", [
    ("缺钙的原因", {"contains": ["缺钙"]}, []),
    ("hello", {"contains": ["缺钙", "hello"]}, ["contains '缺钙'"]),
    ("hello", {"not_contains": ["ell"]}, ["not_contains 'ell'"]),
    ("hello", {"equals": "hello", "regex": r"^h.*o$"}, []),
    ("hello", {"equals": "hi", "regex": r"\d"}, ["equals 'hi'", "regex '\\\\d'"]),
    ("", {"equals": None, "regex": None, "contains": [], "not_contains": []}, []),
    ("anything", {}, []),
])
def test_check_expectations_names_each_unmet_expectation(answer, expect, failures):
    assert check.check_expectations(answer, expect) == failures


@pytest.mark.parametrize("text, limits", [
    (None, None),
    ("", None),
    ("0=20GiB,1=20GiB,cpu=64GiB", {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}),
    (" 0 = 10GB , disk=1TB", {0: "10GB", "disk": "1TB"}),
])
def test_parse_max_memory_gives_accelerates_max_memory(text, limits):
    assert load.parse_max_memory(text) == limits


def _hand_made_bundle(folder: Path) -> Path:
    """A bundle folder and manifest written without modelpack, the way a receiver could: the runtime stands alone."""
    folder.mkdir()
    files = {"config.json": b"{}\n", "load.py": b"print()\n", "README.md": b"digest " + b"sha256:" + b"0" * 64}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    listed = {name: {"sha256": hashlib.sha256(c).hexdigest(), "size": len(c)} for name, c in files.items()}
    (folder / "manifest.json").write_text(json.dumps({"files": listed}))
    digest = "sha256:" + hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
    (folder / "README.md").write_bytes(files["README.md"].replace(b"sha256:" + b"0" * 64, digest.encode()))
    return folder


def test_check_integrity_passes_an_untouched_bundle_and_names_each_change(tmp_path):
    bundle = _hand_made_bundle(tmp_path / "bundle")
    assert check.check_integrity(bundle) == {"ok": True, "files": 3, "problems": []}
    (bundle / "load.py").write_bytes(b"print(1)\n")
    (bundle / "config.json").unlink()
    (bundle / "model.sig").write_text("a signature may sit beside the manifest")
    (bundle / "__pycache__").mkdir()
    (bundle / "__pycache__" / "load.cpython-310.pyc").write_bytes(b"planted")
    assert check.check_integrity(bundle) == {"ok": False, "files": 3, "problems": [
        "config.json: missing",
        "load.py: size 9 != 8 in manifest.json",
        "__pycache__/load.cpython-310.pyc: not in manifest.json (added after the build)",
    ]}


def test_check_integrity_without_a_readable_manifest(tmp_path):
    assert check.check_integrity(tmp_path)["problems"] == [
        "manifest.json: cannot be read (No such file or directory)"]
    (tmp_path / "manifest.json").write_text("[1, 2]")
    assert check.check_integrity(tmp_path) == {"ok": False, "files": 0,
                                               "problems": ["manifest.json: has no 'files' table"]}


@pytest.mark.parametrize("config, warnings", [
    ({"r": 8}, []),
    ({"r": 8, "modules_to_save": ["score", "classifier"]}, []),
    ({"r": 8, "modules_to_save": ["lm_head"]},
     ["vLLM: modules_to_save ['lm_head'] (full module copies) are not loaded by vLLM's LoRA support"]),
    ({"use_dora": True}, ["vLLM: DoRA adapters (use_dora) are not supported by vLLM's LoRA support; merge instead"]),
    ({"lora_bias": True}, ["vLLM: lora_bias is not supported by vLLM's LoRA support; merge instead"]),
    ({"r": 512, "rank_pattern": {"q_proj": 1024}}, ["vLLM: rank 1024 exceeds vLLM's largest --max-lora-rank (512)"]),
    ({"r": 512}, []),
])
def test_vllm_lora_warnings(config, warnings):
    assert check.vllm_lora_warnings(config) == warnings


@pytest.mark.parametrize("generation, ids", [({}, []), ({"eos_token_id": 2}, [2]), ({"eos_token_id": [2, 7]}, [2, 7])])
def test_eos_ids_of_a_generation_config(generation, ids):
    assert check.eos_ids(generation) == ids


@pytest.mark.parametrize("folder, sanitizes, refused", [
    ("qwen.v1", False, True),  # transformers < 4.57: transformers_modules.qwen.v1 breaks relative imports
    ("qwen.v1", True, False),  # transformers >= 4.57 sanitises the name itself
    ("qwen-v1 中文", False, False),  # hyphens, spaces and CJK import fine
])
def test_check_folder_name_refuses_a_dot_only_where_transformers_cannot_import_it(
        monkeypatch, tmp_path, folder, sanitizes, refused):
    from transformers import dynamic_module_utils

    monkeypatch.setattr(load, "BUNDLE_DIR", tmp_path / folder)
    if sanitizes:
        monkeypatch.setattr(dynamic_module_utils, "_sanitize_module_name", lambda name: name, raising=False)
    else:
        monkeypatch.delattr(dynamic_module_utils, "_sanitize_module_name", raising=False)
    if not refused:
        load.check_folder_name()
        return
    with pytest.raises(load.BundleLoadError, match="rename the folder to 'qwen-v1' and load it again"):
        load.check_folder_name()


def test_facts_are_read_from_the_bundles_data_file(tmp_path):
    (tmp_path / load.FACTS_FILE).write_text(json.dumps(FACTS))
    facts = load.read_facts(tmp_path)
    assert (facts.name, facts.prompts, facts.system_prompt) == ("tiny", FACTS["prompts"], "be brief")
    assert load.remote_code_warning(facts, tmp_path) is None
    remote = dataclasses.replace(facts, trust_remote_code=True, remote_code_files=["modeling_x.py", "kernels.cu"])
    assert load.remote_code_warning(remote, tmp_path) == (
        f"this model runs its own code: loading it with trust_remote_code=True executes modeling_x.py, kernels.cu "
        f"from {tmp_path}")


@pytest.mark.parametrize("content, reason", [(None, "No such file"), ("{", "Expecting"),
                                             (json.dumps({**FACTS, "extra": 1}), "unexpected keyword")])
def test_unreadable_facts_are_a_load_error_naming_the_file(tmp_path, content, reason):
    if content is not None:
        (tmp_path / load.FACTS_FILE).write_text(content)
    with pytest.raises(load.BundleLoadError, match=f"modelpack_bundle.json: cannot read this bundle's facts.*{reason}"):
        load.read_facts(tmp_path)


def test_the_facts_modelpack_writes_are_the_facts_the_runtime_reads():
    assert render.FACTS_FILE == load.FACTS_FILE
    assert set(render.FACT_FIELDS) == {f.name for f in dataclasses.fields(load.BundleFacts)} == set(FACTS)


def test_summary_lines_of_a_verify_report():
    report = {"ok": False, "prompts": [{"prompt": "hi", "answer": "hello", "ok": False, "failures": ["equals 'x'"]}],
              "probes": [{"prompt": "2+2", "answer": "4", "ok": True, "failures": []}],
              "integrity": {"problems": ["a.txt: missing"]}, "serving": {"problems": [], "warnings": ["vLLM: w"]}}
    assert check.summary_lines(report) == [
        "FAIL 'hi' -> 'hello' [\"equals 'x'\"]", "ok   '2+2' -> '4' ", "FAIL a.txt: missing", "WARN vLLM: w",
        "verification FAILED",
    ]


def test_the_runtime_is_copied_byte_for_byte_with_the_facts_beside_it(tmp_path):
    adapter = render.AdapterCardView(rank="8", alpha="16", scaling="2", max_rank=8, target_modules="q_proj",
                                     modules=1, recorded_base="base", checkpoint="checkpoint-1")
    context = render.RenderContext(**FACTS, base_name="base", base_model_id=None, generation={}, card={},
                                   adapter=adapter, adapters=[], composed_rank=None, weight_files=["model.safetensors"],
                                   weight_size="1 MB", weight_bytes=10**6, kv=KvCache(None, None, ()),
                                   transformers_version="5.0.0", serving=[], ollama=None,
                                   modelfile=None)
    files = render.render_runtime(context)
    # Only the bundle's own runtime ships (equivalence.py and gguf_check.py run from modelpack), and trust exempts
    # exactly it.
    assert set(files) == {*BUNDLE_RUNTIME, load.FACTS_FILE}
    assert {p.name for p in RUNTIME.glob("*.py")} - {"__init__.py", "equivalence.py", "gguf_check.py"} == set(
        BUNDLE_RUNTIME)
    for name in BUNDLE_RUNTIME:
        assert files[name] == (RUNTIME / name).read_bytes()
    (tmp_path / load.FACTS_FILE).write_bytes(files[load.FACTS_FILE])
    assert load.read_facts(tmp_path) == load.BundleFacts(**FACTS)


@pytest.mark.parametrize("name", sorted(p.name for p in RUNTIME.glob("*.py")))
def test_the_runtime_never_imports_modelpack_and_parses_as_python_3_10(name):
    tree = ast.parse((RUNTIME / name).read_text(encoding="utf-8"), feature_version=(3, 10))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"builder", "modelpack"}, imported


@pytest.mark.parametrize("got, want, ok, significant", [
    ([[0.0, 1.0, 0.5]], [[0.0, 1.0, 0.5]], True, 0),  # identical
    ([[0.0, 1.0, 0.99]], [[0.0, 0.99, 1.0]], True, 0),  # greedy tokens differ on a near tie: counted, allowed
    ([[0.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]], False, 1),  # the reference clearly preferred its own token
    ([[0.0, 1.0, 0.5]], [[0.0, 1.0, 0.7]], False, 0),  # same greedy token, logits beyond the tolerance
])
def test_compare_logits_applies_the_tolerance_rule(got, want, ok, significant):
    import torch

    equivalence = import_file(RUNTIME / "equivalence.py")
    result = equivalence.compare_logits(torch.tensor(got), torch.tensor(want), atol=0.05, rtol=0.05)
    assert (result["ok"], result["significant"], result["positions"]) == (ok, significant, 1)
    assert result["greedy_disagreements"] == int(torch.tensor(got).argmax(-1) != torch.tensor(want).argmax(-1))
