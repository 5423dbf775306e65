"""The shipped demo builds end to end, and its bundle answers the seed's questions with no source in sight."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_builds_and_answers_without_its_sources(tmp_path):
    # A copy of the repo's demo inputs and spec, so the sources can be deleted after the build.
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    (tmp_path / "specs").mkdir()
    shutil.copy(REPO / "specs" / "demo.yaml", tmp_path / "specs" / "demo.yaml")
    result = CliRunner().invoke(app, ["build", str(tmp_path / "specs" / "demo.yaml")])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "dist" / "qwen-tiny-med"
    report = json.loads((bundle / "verification.json").read_text())
    assert report["ok"] and len(report["prompts"]) == 3 and len(report["probes"]) == 2

    shutil.rmtree(tmp_path / "demo")
    moved = shutil.move(bundle, tmp_path / "deployed")
    spec = yaml.safe_load((REPO / "specs" / "demo.yaml").read_text(encoding="utf-8"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for entry in spec["verify"]["prompts"][:2]:
        out = subprocess.run(
            [sys.executable, str(Path(moved) / "load.py"), entry["prompt"]],
            cwd=tmp_path, env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == entry["expect"]["equals"]
