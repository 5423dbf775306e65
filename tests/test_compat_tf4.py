"""A bundle's load.py and verification in a second virtualenv with transformers 4.49 and peft 0.13 (Qwen-v1's range)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from helpers import SEED_SAMPLES, cached_venv, qwen_base, random_checkpoint, run_python, subprocess_env, write_spec

REPO = Path(__file__).resolve().parents[1]
# The oldest libraries a bundle supports; torch is pinned to the CPU wheel on this machine's disk.
OLD_STACK = ["torch==2.13.0", "transformers==4.49.*", "peft==0.13.*", "tiktoken", "safetensors", "accelerate"]
QUESTION = SEED_SAMPLES[0][0]


@pytest.fixture(scope="session")
def old_python() -> str:
    """bin/python of a virtualenv with transformers 4.49 and peft 0.13, created on first use."""
    constraints = str(REPO / "constraints.txt")
    return cached_venv("tf4.49-peft0.13", [OLD_STACK, (REPO / "constraints.txt").read_text()],
                       [["install", "-c", constraints, *OLD_STACK]])


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The fixture's published-style code in a base folder whose name has dots, as users version their copies:
    transformers 4.49 cannot import remote code from such a folder, so verification must not load it from there."""
    root = tmp_path_factory.getbasetemp() / "qwen_v1"
    base = tmp_path_factory.mktemp("dotted") / "Qwen-7B-Chat.v1.1"
    shutil.copytree(qwen_base(root), base)
    return base, random_checkpoint(root)


def old_stack_spec(folder: Path, sources, mode: str, python: str) -> Path:
    base, checkpoint = sources
    return write_spec(
        folder, base, checkpoint, name=f"qwen-med-{mode}", base={"trust_remote_code": True},
        output={"dir": f"dist/qwen-med-{mode}", "mode": mode, "dtype": "bfloat16"},
        generation={"max_new_tokens": 12},
        verify={"python": python, "max_new_tokens": 12, "prompts": [{"prompt": QUESTION}]},
    )


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_bundle_verifies_and_answers_under_transformers_4_49_and_peft_0_13(tmp_path, sources, old_python, mode):
    result = build_bundle(plan_from_spec(old_stack_spec(tmp_path, sources, mode, old_python)), verify=True)
    environment = result.verification["environment"]
    assert result.verification["ok"]
    # Qwen-v1's own chat() calls self.generate: the speed figure counts the tokens it generated there too.
    assert 1 <= result.verification["runtime"]["generated_tokens"] <= 12
    assert environment["transformers"].startswith("4.49.") and environment["peft"].startswith("0.13.")
    # requirements.txt pins what verification ran with: the old stack, not the builder's transformers 5.
    pins = dict(line.split("==") for line in (result.bundle / "requirements.txt").read_text().splitlines()
                if "==" in line)
    assert pins["transformers"] == environment["transformers"]
    assert pins.get("peft") == (environment["peft"] if mode == "separate" else None)
    assert pins["PyYAML"] == environment["imports"]["yaml"][1]

    moved = tmp_path / "deploy" / result.bundle.name
    shutil.copytree(result.bundle, moved)
    shutil.rmtree(result.bundle)
    env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
    answer = run_python(old_python, "load.py", QUESTION, cwd=moved, env=env).stdout.strip()
    assert answer == result.verification["prompts"][0]["answer"] != ""

    # A deployment team renames the folder: with a dot, load.py says what to rename instead of a traceback.
    dotted = moved.rename(moved.with_name("qwen.v1"))
    refused = subprocess.run([old_python, "load.py", QUESTION], cwd=dotted, env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert refused.stderr == ("error: this bundle's folder name 'qwen.v1' contains '.', from which transformers 4.49.0 "
                              "cannot import the model's own code; rename the folder to 'qwen-v1' and load it again\n")
    renamed = dotted.rename(dotted.with_name("qwen-v1"))
    assert run_python(old_python, "load.py", QUESTION, cwd=renamed, env=env).stdout.strip() == answer
    moved = renamed

    if mode == "merge":  # the CLI re-verifies an existing bundle in another interpreter too
        refused = CliRunner().invoke(app, ["verify", str(moved), "--python", old_python])
        assert refused.exit_code == 2 and "--trust-remote-code" in refused.output, refused.output
        rerun = CliRunner().invoke(app, ["verify", str(moved), "--python", old_python, "--trust-remote-code",
                                         "--digest", result.digest])
        assert rerun.exit_code == 0, rerun.output
        assert rerun.stdout.endswith(f"verification passed (1 prompts, 0 probes), {result.digest} (digest)\n")
