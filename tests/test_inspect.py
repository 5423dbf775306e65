"""`modelpack inspect`: what a folder is and holds, as exact lines and as JSON; nothing in the folder runs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builder.cli import app
from helpers import assert_user_error

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


DEMO_MODEL_LINES = """\
  architecture   Qwen2ForCausalLM (qwen2)
  parameters     626.7K (626,688)
  dtype          {dtype}
  weights        model.safetensors ({size})
  tokenizer      tokenizer.json, tokenizer_config.json, special_tokens_map.json, vocab.json, merges.txt, chat_template.jinja
  chat template  yes (chat_template.jinja)
  end of turn    <|im_end|> (id 2582)
  eos_token_id   [2582, 2580]
"""  # noqa: E501

DEMO_ADAPTER_LINES = """\
  LoRA                r=8 alpha=16 scaling=2
  targets             down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj
  forms               plain LoRA
  weights             adapter_model.safetensors (134.6 KB, 28 tensors)
  recorded base       /home/Work/muyu_qwen/models/qwen/Qwen2-tiny-demo
  tokenizer           none (the base's is used)
  training leftovers  optimizer.pt (19.6 KB), rng_state.pth (14.4 KB), scheduler.pt (1.3 KB), trainer_state.json (3.5 KB), training_args.bin (1.7 KB)
"""  # noqa: E501


def test_a_base_model_folder():
    result = run("inspect", DEMO / "base")
    assert result.exit_code == 0, result.output
    assert result.stdout == (f"{DEMO / 'base'}: base model\n"
                             + DEMO_MODEL_LINES.format(dtype="float32", size="2.5 MB") + "  model code     none\n")


def test_an_adapter_checkpoint_with_its_training_leftovers():
    result = run("inspect", DEMO / "checkpoint-200")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{DEMO / 'checkpoint-200'}: adapter checkpoint\n" + DEMO_ADAPTER_LINES


def test_a_trainer_output_says_which_checkpoint_init_would_package(tmp_path):
    for step in (100, 200):
        shutil.copytree(DEMO / "checkpoint-200", tmp_path / f"checkpoint-{step}")
    result = run("inspect", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{tmp_path}: Trainer output\n"
        "  checkpoints         checkpoint-100, checkpoint-200\n"
        "  init would use      checkpoint-200 (the last of 2 checkpoints (highest step); trainer_state.json names no "
        "best checkpoint)\n" + DEMO_ADAPTER_LINES
    )


def test_the_lora_forms_an_adapter_uses(models, adapters):
    base = models("qwen2", tied=False, dtype=torch.float32)
    adapter = adapters(base, "dora-rslora-lm-head", use_dora=True, use_rslora=True, modules_to_save=["lm_head"],
                       rank_pattern={"down_proj": 4})
    result = run("inspect", adapter)
    assert result.exit_code == 0, result.output
    assert "  LoRA                r=8 alpha=16 scaling=5.65685\n" in result.stdout
    assert "  forms               rsLoRA (scaling alpha/sqrt(r)), DoRA, rank_pattern (1), modules_to_save: lm_head\n" \
        in result.stdout
    found = json.loads(run("inspect", adapter, "--json").stdout)
    assert found["kind"] == "adapter checkpoint"
    assert found["adapter"]["forms"] == ["rsLoRA (scaling alpha/sqrt(r))", "DoRA", "rank_pattern (1)",
                                         "modules_to_save: lm_head"]
    assert found["adapter"]["training_leftovers"] == [
        {"name": name, "bytes": (adapter / name).stat().st_size}
        for name in ("optimizer.pt", "rng_state.pth", "trainer_state.json")]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """The demo built without verification (inspect reads what is there; it does not verify)."""
    root = tmp_path_factory.mktemp("inspect-bundle")
    shutil.copytree(DEMO, root / "demo")
    (root / "specs").mkdir()
    shutil.copy(REPO / "specs" / "demo.yaml", root / "specs" / "demo.yaml")
    built = run("build", root / "specs" / "demo.yaml", "--no-verify")
    assert built.exit_code == 0, built.output
    return root / "dist" / "qwen-tiny-med"


def test_a_bundle_with_its_manifest_status_and_digest(bundle):
    digest = "sha256:" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    listed = len(json.loads((bundle / "manifest.json").read_text())["files"])
    result = run("inspect", bundle)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{bundle}: bundle\n"
        "  name           qwen-tiny-med\n"
        "  mode           merge\n"
        "  built by       modelpack 0.1.0\n"
        f"  integrity      ok ({listed} files checked against manifest.json; nothing was run)\n"
        f"  digest         {digest}\n"
        "  signed         no\n"
        "  verification   not run\n"
        "  model code     none\n" + DEMO_MODEL_LINES.format(dtype="bfloat16", size="1.3 MB")
    )
    found = json.loads(run("inspect", bundle, "--json").stdout)
    assert found["bundle"]["digest"] == digest and found["bundle"]["integrity_problems"] == []
    assert found["model"]["parameters"] == 626688


def test_a_changed_bundle_is_reported_and_nothing_in_it_runs(bundle, tmp_path):
    changed = shutil.copytree(bundle, tmp_path / "changed")
    marker = tmp_path / "ran"
    with open(changed / "load.py", "a", encoding="utf-8") as f:
        f.write(f"\nopen({str(marker)!r}, 'w').close()\n")
    result = run("inspect", changed)
    assert result.exit_code == 0, result.output
    size = (changed / "load.py").stat().st_size
    manifest = json.loads((changed / "manifest.json").read_text())
    assert (f"  integrity      load.py: size {size} != {manifest['files']['load.py']['size']} in manifest.json "
            f"({len(manifest['files'])} files checked against manifest.json; nothing was run)\n") in result.stdout
    assert not marker.exists()


def test_a_folder_that_is_none_of_the_four_kinds_is_a_user_error(tmp_path):
    assert_user_error(run("inspect", tmp_path), 2, f"{tmp_path} is not a model folder (config.json), an adapter "
                                                   "checkpoint (adapter_config.json), a Trainer output")
