"""Reload-and-chat verification: a fresh offline process runs the bundle's own load.py and checks its answers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from builder.errors import BundleError, VerificationError
from builder.publish import read_manifest


def verify_bundle(bundle: Path, *, python: str | os.PathLike | None = None, device: str = "cpu",
                  on_progress: Callable[[str], None] = lambda line: None) -> dict:
    """Run `load.py --verify` in a subprocess that cannot import modelpack; return its JSON report.

    `python` is the interpreter that loads the model (default: this one), e.g. the deployment's virtualenv
    when the model's own code needs other library versions. The report is returned whether or not the checks
    passed; `failure_message` says what failed.
    """
    python = verifying_python(python)
    read_manifest(bundle)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="modelpack-verify-") as workdir:
        report_path = Path(workdir) / "report.json"
        command = [python, str(bundle / "load.py"), "--verify", "--report", str(report_path), "--device", device]
        # cwd is an empty folder: the process sees the bundle and nothing of the build.
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
        tail: list[str] = []
        assert process.stdout is not None
        for line in process.stdout:
            on_progress(line.rstrip())
            tail = (tail + [line.rstrip()])[-25:]
        returncode = process.wait()
        if not report_path.is_file():
            raise VerificationError(
                f"verification could not load the bundle {bundle} (exit {returncode}):\n" + "\n".join(tail)
            )
        return json.loads(report_path.read_text(encoding="utf-8"))


def verifying_python(python: str | os.PathLike | None) -> str:
    """The interpreter that runs model code: the given one, checked to exist, else the one running modelpack."""
    if python is None:
        return sys.executable
    path = Path(python)
    if not path.is_file() or not os.access(path, os.X_OK):
        raise BundleError(f"verification interpreter {path}: not an executable file; point it at a Python, "
                          "e.g. /path/to/venv/bin/python")
    # Absolute (the subprocess runs elsewhere) but not resolved: a virtualenv's bin/python is a symlink, and
    # only under its own path does it find the venv's packages.
    return os.path.abspath(path)


def failure_message(report: dict) -> str | None:
    """One line per failed check: the prompt, the unmet expectation and the answer; None if all passed."""
    lines = [f"integrity: {p}" for p in report["integrity"]["problems"]]
    lines += [f"serving: {p}" for p in report["serving"]["problems"]]
    for result in report["prompts"] + report["probes"]:
        if not result["ok"]:
            lines.append(
                f"prompt {result['prompt']!r}: expected {', '.join(result['failures'])}; answered {result['answer']!r}"
            )
    return "verification failed:\n  " + "\n  ".join(lines) if lines else None
