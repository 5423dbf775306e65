"""Processes that run model code for modelpack: their environment, their interpreter, and one sentence when they
crash (used by verification and by the chat facts' tokenizer probe)."""

from __future__ import annotations

import os
import re
import signal
import sys
from pathlib import Path

from builder.errors import BundleError


def model_code_env(workdir: str) -> dict[str, str]:
    """The environment of a process that runs model code for modelpack: offline, unable to import modelpack's
    sources, writing no bytecode, with a modules cache of its own in workdir (nothing another model left in the
    user's cache is picked up)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1",
           "HF_MODULES_CACHE": str(Path(workdir) / "modules")}
    env.pop("PYTHONPATH", None)
    return env


def die_with_parent() -> None:
    """In the child, before exec: Linux sends it SIGKILL when modelpack dies, even by SIGKILL, so a killed build
    leaves no verification running on a staging folder the next build removes."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


# A frame of a Python traceback: `  File "/path/modeling_qwen.py", line 44, in <module>`.
_FRAME = re.compile(r'^\s*File "(?P<file>.+)", line (?P<line>\d+), in (?P<function>.+)$')


def describe_crash(lines: list[str], returncode: int) -> str:
    """One sentence for a verification process that ended without a report: the exception's last line and the
    frame it came from, preferring the model's own code (imported under transformers_modules) over library frames."""
    errors = [line for line in lines if line.startswith("error: ")]
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if not starts:
        return errors[-1].removeprefix("error: ") if errors else f"the process exited with code {returncode}"
    block = lines[starts[-1]:]
    frames = [match for line in block if (match := _FRAME.match(line))]
    exception = next((line for line in reversed(block) if line and not line[0].isspace()), "")
    model_frames = [f for f in frames if "transformers_modules" in Path(f["file"]).parts]
    candidates = model_frames or frames
    if not candidates:
        return exception
    frame = candidates[-1]
    owner = "the model's own code" if model_frames else "library code"
    return f"{exception} (raised in {owner}: {Path(frame['file']).name} line {frame['line']}, in {frame['function']})"


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
