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
from gguf import GGUFReader
from typer.testing import CliRunner

from builder.cli import app

REPO = Path(__file__).resolve().parents[1]


def build_shipped_spec(tmp_path: Path, spec: str) -> None:
    """`modelpack build` of a copy of the repo's demo inputs and a shipped spec (so the sources can be deleted)."""
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    (tmp_path / "specs").mkdir()
    shutil.copy(REPO / "specs" / spec, tmp_path / "specs" / spec)
    result = CliRunner().invoke(app, ["build", str(tmp_path / "specs" / spec)])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_demo_builds_and_answers_without_its_sources(tmp_path):
    build_shipped_spec(tmp_path, "demo.yaml")
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


@pytest.mark.slow
def test_the_wide_demo_ships_llama_cpps_k_quants_measured_against_the_16_bit_gguf(tmp_path):
    # demo/wide's rows are all multiples of 256 long, so llama.cpp writes real k-quant blocks (demo/base's fall back).
    build_shipped_spec(tmp_path, "demo_quantized.yaml")
    bundle = tmp_path / "dist" / "qwen-wide-med"
    folder = bundle / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile", "Modelfile.q4_k_m", "qwen-wide-med-q4_k_m.gguf", "qwen-wide-med-q6_k.gguf"]  # no 16-bit file
    for gguf_type, block in (("q6_k", "Q6_K"), ("q4_k_m", "Q4_K")):
        written = {t.tensor_type.name for t in GGUFReader(folder / f"qwen-wide-med-{gguf_type}.gguf").tensors}
        assert block in written, written

    files = json.loads((bundle / "verification.json").read_text())["gguf"]["files"]
    assert sorted(f["type"] for f in files) == ["q4_k_m", "q6_k"]
    by_type = {f["type"]: f for f in files}
    for entry in files:
        assert entry["ok"] and entry["within_budget"], entry
        assert entry["tokens"] >= 2000  # demo/wide/held-out.md alone is about 2,100 tokens
        assert all(not a["failures"] for a in entry["answers"])  # the spec requires it of q6_k
    assert by_type["q6_k"]["expectations_required"] and not by_type["q4_k_m"]["expectations_required"]
    assert by_type["q6_k"]["mean_kld"] < by_type["q4_k_m"]["mean_kld"]
    rows = (bundle / "README.md").read_text(encoding="utf-8").splitlines()
    for gguf_type, block in (("q6_k", "Q6_K"), ("q4_k_m", "Q4_K")):
        # the card's quality table: the file, its tensor-type mix and its figures
        assert any(r.startswith(f"| `gguf/qwen-wide-med-{gguf_type}.gguf` |") and block in r for r in rows), rows
