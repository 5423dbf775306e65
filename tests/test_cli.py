"""The `modelpack` command: exact messages and stable exit codes (0 ok, 2 bad input, 3 verification failed)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builder.cli import app
from builder.spec import spec_json_schema
from helpers import make_base_model, write_spec

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sources(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


def test_validate_accepts_a_good_spec(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("validate", spec)
    assert result.exit_code == 0, result.output
    assert result.output == f"{spec}: valid (merge, 6 tensors to merge)\n"


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("build", spec, "--dry-run")
    assert result.exit_code == 0, result.output
    assert ("merge model.layers.0.self_attn.q_proj.weight [64, 64] <- model.layers.0.self_attn.q_proj r=8 scale=2"
            in result.output)
    assert "tensors: 6 merged, 0 cast, 20 copied as bytes" in result.output
    assert "skip training leftover: optimizer.pt" in result.output
    assert not (tmp_path / "dist").exists()


def test_build_with_output_override(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("build", spec, "-o", tmp_path / "other", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "not verified (--no-verify)" in result.output
    assert (tmp_path / "other" / "model.safetensors").is_file()
    assert not (tmp_path / "dist").exists()


def other_base(tmp_path: Path, **sizes) -> Path:
    return make_base_model(tmp_path / "other-base", arch="qwen2", tied=True, dtype=torch.float32, **sizes)


def _break_adapter_shape(tmp_path: Path, adapter: Path) -> Path:
    """A copy of the adapter whose config claims another rank than its tensors have."""
    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 4
    (broken / "adapter_config.json").write_text(json.dumps(config))
    return broken


# (id, how to make the bad input, expected exit code, expected message fragment)
ERROR_CASES = [
    ("missing-spec", lambda tmp, base, adapter: tmp / "nope.yaml", 2, "spec file not found"),
    (
        "unknown-key",
        lambda tmp, base, adapter: write_spec(tmp, base, adapter, generation={"tempreature": 0.5}),
        2,
        "generation.tempreature: unknown key 'tempreature'; did you mean 'temperature'?",
    ),
    (
        "missing-base",
        lambda tmp, base, adapter: write_spec(tmp, tmp / "no-such-model", adapter),
        2,
        "base.path: directory not found",
    ),
    (
        "rank-mismatch",
        lambda tmp, base, adapter: write_spec(tmp, base, _break_adapter_shape(tmp, adapter)),
        2,
        "tensors have rank 8 but adapter_config.json gives r=4",
    ),
    (
        "adapter-for-a-smaller-model",
        lambda tmp, base, adapter: write_spec(tmp, other_base(tmp, num_hidden_layers=1), adapter),
        2,
        "targets 'model.layers.1.mlp.down_proj.weight', which the base model at",
    ),
    (
        "adapter-for-a-narrower-model",
        lambda tmp, base, adapter: write_spec(tmp, other_base(tmp, hidden_size=32), adapter),
        2,
        "the LoRA update has shape [64, 128] but base tensor 'model.layers.0.mlp.down_proj.weight' has [32, 128]",
    ),
]


@pytest.mark.parametrize("case, make, exit_code, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, sources, case, make, exit_code, message):
    base, adapter = sources
    result = run("build", make(tmp_path, base, adapter), "--no-verify")
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")


def test_verification_failure_exits_3_naming_prompt_expectation_and_answer(tmp_path, sources):
    spec = write_spec(tmp_path, *sources, verify={"prompts": [{"prompt": "你好", "expect": {"contains": ["缺钙"]}}]})
    result = run("build", spec)
    assert result.exit_code == 3, result.output
    assert "prompt '你好': expected contains '缺钙'; answered " in result.output
    assert not (tmp_path / "dist" / "tiny-med").exists()


def test_schema_command_matches_the_committed_schema():
    result = run("schema")
    assert result.exit_code == 0
    assert json.loads(result.output) == spec_json_schema()
    assert json.loads((REPO / "specs" / "modelpack.schema.json").read_text()) == spec_json_schema()


def test_build_prints_the_digest_that_the_card_and_report_carry_and_the_verify_command_accepts(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    built = run("build", spec)
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "dist" / "tiny-med"
    digest = "sha256:" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert built.stdout.endswith(f", verified; digest {digest}\n")
    assert json.loads((bundle / "verification.json").read_text())["digest"] == digest
    assert f"modelpack verify tiny-med --digest {digest}" in (bundle / "README.md").read_text()
    result = run("verify", bundle, "--digest", digest)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"verification passed (1 prompts, 0 probes), {digest} (digest)\n")
    result = run("verify", tmp_path)
    assert result.exit_code == 2
    assert "is not a modelpack bundle" in result.output
