"""What a bundle contains: weights, configs, tokenizer and chat template, rendered files, manifest; nothing else."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata

import pytest
import torch
from huggingface_hub import ModelCard
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

import builder.build
from builder.build import build_bundle, plan_from_spec
from builder.configs import default_system_template
from builder.errors import OutputError
from builder.manifest import sha256_file
from builder.trust import DIGEST_CARRIERS, DIGEST_PLACEHOLDER, bundle_digest
from helpers import CHATML_TEMPLATE, write_spec


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory, models, adapters):
    """One verified merge-mode bundle of a tied Qwen2, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("merged")
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(
        root, base, adapters(base),
        output={"dtype": "bfloat16"},
        chat={"system_prompt": "You are a careful assistant."},
        card={"description": "A tiny test model.", "license": "apache-2.0", "language": ["zh"], "tags": ["medical"]},
        verify={"prompts": [{"prompt": "你好", "expect": {"not_contains": ["NEVER-SAID"]}}],
                "probes": [{"prompt": "什么是机器学习"}]},
    )
    return build_bundle(plan_from_spec(spec), verify=True)


def test_bundle_has_every_file_a_deployment_needs(merged_bundle):
    files = sorted(p.name for p in merged_bundle.bundle.iterdir())
    assert files == sorted([
        "README.md", "bundle_check.py", "chat_template.jinja", "config.json", "generation_config.json", "load.py",
        "manifest.json", "model.safetensors", "modelpack_bundle.json", "requirements.txt", "tokenizer.json",
        "tokenizer_config.json", "verification.json",
    ])


def test_training_leftovers_are_not_copied_and_are_recorded(merged_bundle):
    manifest = json.loads((merged_bundle.bundle / "manifest.json").read_text())
    assert sorted(manifest["ignored_training_files"]) == ["optimizer.pt", "rng_state.pth", "trainer_state.json"]
    assert not any(merged_bundle.bundle.rglob("*.pt*"))


def test_chat_template_is_kept_in_both_places_and_eos_covers_end_of_turn(merged_bundle):
    bundle = merged_bundle.bundle
    # The base's template, carrying the spec's system prompt (tests/test_serving.py: rendered byte for byte as before).
    carrying = default_system_template(CHATML_TEMPLATE, "You are a careful assistant.", None)
    assert (bundle / "chat_template.jinja").read_text() == carrying
    assert json.loads((bundle / "tokenizer_config.json").read_text())["chat_template"] == carrying
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    generation = json.loads((bundle / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])
    assert generation["max_new_tokens"] == 16  # the spec's value over the base's


def test_config_records_output_dtype(merged_bundle):
    config = json.loads((merged_bundle.bundle / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16"
    with safe_open(merged_bundle.bundle / "model.safetensors", framework="pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


def test_manifest_hashes_every_file_and_records_provenance(merged_bundle):
    bundle = merged_bundle.bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    listed = set(manifest["files"])
    assert listed == {p.name for p in bundle.iterdir()} - {"manifest.json"}
    digest = bundle_digest(bundle)
    for name, meta in manifest["files"].items():
        content = (bundle / name).read_bytes()
        if name in DIGEST_CARRIERS:  # they carry the digest, so they are hashed with it blanked (trust.seal)
            assert digest.encode() in content
            content = content.replace(digest.encode(), DIGEST_PLACEHOLDER.encode())
        assert meta["sha256"] == hashlib.sha256(content).hexdigest()
    assert "base/config.json" in manifest["sources"]["sha256"]
    assert "adapter/adapter_model.safetensors" in manifest["sources"]["sha256"]
    assert "${" not in manifest["spec"]["text"] and "name: tiny-med" in manifest["spec"]["text"]
    assert manifest["tools"]["torch"] == metadata.version("torch")


def test_no_file_but_the_manifest_names_a_build_machine_path(merged_bundle):
    sources = [str(merged_bundle.plan.base.path), *(str(a.checkpoint.path) for a in merged_bundle.plan.adapters)]
    for path in merged_bundle.bundle.iterdir():
        if path.suffix != ".safetensors" and path.name != "manifest.json":
            text = path.read_text(encoding="utf-8")
            assert not any(s in text for s in sources), path.name


def test_model_card_parses_and_shows_adapter_facts_and_verification(merged_bundle):
    card = ModelCard.load(merged_bundle.bundle / "README.md")
    assert card.data.license == "apache-2.0"
    assert card.data.language == ["zh"]
    assert card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers"
    assert {"medical", "lora"} <= set(card.data.tags)
    text = card.text
    assert "A tiny test model." in text
    assert "| rank (r) | 8 |" in text and "q_proj, v_proj" in text.replace("down_proj, ", "")
    assert "**passed**" in text
    assert "什么是机器学习" in text  # the probe and its answer are in the card
    # The adapter records its training machine's base folder: the card names it by its last component only.
    assert "| trained on base | `tiny-base` |" in text and "/home/Work" not in text
    # No Hub id is known (the adapter records a folder): the Hub rejects a folder name, so no base_model at all.
    assert card.data.base_model is None and "base_model_relation" not in card.data.to_dict()


# A separate bundle's root is the base itself, loaded with transformers; its adapter is in adapter/, not at the root
# where the Hub's "adapter" relation and library_name peft would look for it.
@pytest.mark.parametrize("mode, relation", [("merge", "finetune"), ("separate", None)])
def test_card_names_the_bases_hub_id_and_how_the_bundle_relates_to_it(tmp_path, models, adapters, mode, relation):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), output={"mode": mode}, card={"base_model": "Qwen/Qwen2-0.5B"})
    card = ModelCard.load(build_bundle(plan_from_spec(spec), verify=False).bundle / "README.md")
    assert card.data.base_model == "Qwen/Qwen2-0.5B"
    assert card.data.to_dict().get("base_model_relation") == relation
    assert card.data.library_name == "transformers"
    assert ("peft" in card.data.tags) is (mode == "separate")


def test_requirements_pin_the_versions_verification_used(merged_bundle):
    lines = (merged_bundle.bundle / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if "==" in line)
    verified = json.loads((merged_bundle.bundle / "verification.json").read_text())["environment"]
    assert pins["transformers"] == verified["transformers"]
    assert pins["torch"] == verified["torch"].split("+")[0]  # "2.13.0+cpu" is not installable by that pin
    assert "peft" not in pins  # a merged bundle does not need it


def test_load_py_answers_without_modelpack_or_the_sources(merged_bundle, tmp_path):
    moved = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(merged_bundle.bundle, moved)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    code = (
        "import sys; sys.modules['builder'] = None\n"  # importing modelpack would now fail
        "from load import load, chat\n"
        "model, tok = load(device='cpu')\n"
        "print(repr(chat(model, tok, '你好', greedy=True, max_new_tokens=8)[0]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=moved, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    expected = json.loads((moved / "verification.json").read_text())["prompts"][0]["answer"]
    assert out.stdout.strip() == repr(expected)  # the same greedy answer verification recorded


def test_load_py_verify_rechecks_the_bundle_without_modelpack_and_leaves_it_unchanged(merged_bundle, tmp_path):
    moved = tmp_path / "received" / "bundle"
    shutil.copytree(merged_bundle.bundle, moved)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["HF_HUB_OFFLINE"] = "1"
    out = subprocess.run([sys.executable, "load.py", "--verify", "--device", "cpu"], cwd=moved, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.endswith("verification passed\n")
    assert "[verify] checking files against manifest.json" in out.stderr  # its own integrity check ran, and passed
    # Importing bundle_check.py wrote no __pycache__ into the bundle, which the next check would report as added.
    assert not (moved / "__pycache__").exists()


def test_separate_bundle_loads_in_plain_peft(tmp_path, monkeypatch, models, adapters):
    base = models("llama", tied=False, dtype=torch.float32)
    adapter = adapters(base)
    spec = write_spec(tmp_path, base, adapter, output={"mode": "separate", "dtype": "float32"})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle

    config = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    # Its base by name (no Hub id here): a relative path would resolve against the working directory, not the bundle.
    assert config["base_model_name_or_path"] == "tiny-med"
    assert not (bundle / "adapter" / "tokenizer_config.json").exists()
    # As the card writes it: from the folder that holds the bundle, whatever folder the loader runs in otherwise.
    monkeypatch.chdir(bundle.parent)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle.name),
                                      f"{bundle.name}/adapter").eval()
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_existing_destination_needs_force_and_survives_a_failed_build(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base))
    dest = tmp_path / "dist" / "tiny-med"
    dest.mkdir(parents=True)
    (dest / "keep.txt").write_text("previous bundle")
    # What makes it a bundle that --force may replace: a manifest.json written by modelpack listing its files.
    (dest / "manifest.json").write_text(json.dumps({"generator": "modelpack", "files": {"keep.txt": {}}}))
    with pytest.raises(OutputError, match="already exists; pass --force"):
        build_bundle(plan_from_spec(spec), verify=False)

    failing = write_spec(tmp_path, base, adapters(base),
                         verify={"prompts": [{"prompt": "你好", "expect": {"equals": "impossible"}}]})
    with pytest.raises(Exception, match="equals 'impossible'"):
        build_bundle(plan_from_spec(failing), force=True, verify=True)
    assert (dest / "keep.txt").read_text() == "previous bundle"
    assert [p.name for p in dest.parent.iterdir()] == ["tiny-med"]  # no staging folder left behind

    build_bundle(plan_from_spec(spec), force=True, verify=False)
    assert not (dest / "keep.txt").exists() and (dest / "model.safetensors").is_file()


def test_sources_are_never_modified(tmp_path, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    adapter = adapters(base)
    before = {p: sha256_file(p) for folder in (base, adapter) for p in folder.rglob("*") if p.is_file()}
    build_bundle(plan_from_spec(write_spec(tmp_path, base, adapter)), verify=False)
    after = {p: sha256_file(p) for folder in (base, adapter) for p in folder.rglob("*") if p.is_file()}
    assert before == after


def test_the_base_license_travels_with_the_weights(tmp_path, models, adapters):
    base = tmp_path / "licensed-base"
    shutil.copytree(models("qwen2", tied=True, dtype=torch.float32), base)
    (base / "LICENSE").write_text("Tongyi Qianwen LICENSE AGREEMENT ...")
    (base / "NOTICE").write_text("Copyright (c) Alibaba Cloud.")
    bundle = build_bundle(plan_from_spec(write_spec(tmp_path, base, adapters(base))), verify=False).bundle
    assert (bundle / "LICENSE").read_text() == "Tongyi Qianwen LICENSE AGREEMENT ..."
    assert (bundle / "NOTICE").read_text() == "Copyright (c) Alibaba Cloud."


@pytest.mark.parametrize("arch, tied, shards, targets", [
    ("llama", False, True, ["q_proj", "lm_head"]),  # several shards
    ("qwen2", True, False, ["q_proj", "lm_head"]),  # the untied head re-reads the embedding
    ("qwen2", True, False, ["embed_tokens"]),  # save_embedding_layers: the base's embedding is replaced
])
def test_source_fingerprints_equal_the_files_sha256(tmp_path, monkeypatch, models, adapters, arch, tied, shards,
                                                   targets):
    """Base and adapter weights are hashed from the bytes the merge reads, whatever order it reads them in (peft
    stores lm_head's factors first, the merge needs them last); the result must be the file's own sha256."""
    base = models(arch, tied=tied, dtype=torch.float32, shards=shards)
    adapter = adapters(base, "fingerprint-" + "-".join(targets), target_modules=targets)
    hashed_again = []
    monkeypatch.setattr(builder.build, "sha256_file", lambda path: hashed_again.append(path.name) or sha256_file(path))
    bundle = build_bundle(plan_from_spec(write_spec(tmp_path, base, adapter)), verify=False).bundle
    assert not [name for name in hashed_again if name.endswith(".safetensors")]  # no second pass over weights
    recorded = json.loads((bundle / "manifest.json").read_text())["sources"]["sha256"]
    weight_files = sorted(base.glob("*.safetensors"))
    assert len(weight_files) > 1 if shards else len(weight_files) == 1
    for path in weight_files:
        assert recorded[f"base/{path.name}"] == sha256_file(path), path.name
    assert recorded["adapter/adapter_model.safetensors"] == sha256_file(adapter / "adapter_model.safetensors")
