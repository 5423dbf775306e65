"""A remote-code model's own Python files, read as text: the packages they import, and token ids only its code knows."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

from builder.errors import SourceError

# Import names whose distribution on PyPI is named differently, for when the builder's own environment
# does not have the package installed (then its metadata cannot say).
KNOWN_DISTRIBUTIONS = {
    "PIL": "Pillow",
    "attr": "attrs",
    "bs4": "beautifulsoup4",
    "cv2": "opencv-python",
    "flash_attn": "flash-attn",
    "google": "protobuf",
    "sklearn": "scikit-learn",
    "transformers_stream_generator": "transformers-stream-generator",
    "yaml": "PyYAML",
}


def code_imports(path: Path) -> set[str]:
    """Top-level modules a file imports, found the way transformers' `check_imports` finds them.

    Imports inside `try:` blocks and under `if is_..._available():` are optional and skipped; imports inside
    functions count (transformers refuses to load the file when any of them is missing); relative imports
    are the model's own files.
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.Try):
            return
        if isinstance(node, ast.If) and any(
            isinstance(call, ast.Call) and _is_availability_check(call) for call in ast.walk(node.test)
        ):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    try:
        visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
    except SyntaxError as exc:
        raise SourceError(f"{path}: not valid Python (line {exc.lineno}: {exc.msg}); the model cannot load it") from exc
    return found


def _is_availability_check(call: ast.Call) -> bool:
    name = getattr(call.func, "id", None) or getattr(call.func, "attr", "")
    return name.startswith("is_") and name.endswith("_available")


def third_party_imports(files: Iterable[Path]) -> list[str]:
    """Import names of the packages the files need: neither the standard library nor one of the model's own files."""
    files = list(files)
    own = {p.stem for p in files}
    names: set[str] = set()
    for path in files:
        names |= code_imports(path)
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    return sorted(n for n in names if n not in stdlib and n not in own)


def distribution_name(import_name: str) -> str:
    """The pip name that provides an import name: this environment's metadata, a known mapping, else the name."""
    installed = metadata.packages_distributions().get(import_name)
    if installed:
        return installed[0]
    return KNOWN_DISTRIBUTIONS.get(import_name, import_name.replace("_", "-"))


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name, for comparing "PyYAML" with "pyyaml"."""
    return name.lower().replace("_", "-").replace(".", "-")


# Runs in the verifying interpreter: the model's tokenizer code is executed there, never in the builder.
_TOKEN_PROBE = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = {}
for token in sys.argv[2:]:
    try:
        value = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError):
        value = None
    ids[token] = value if isinstance(value, int) and value != tokenizer.unk_token_id else None
print("MODELPACK_TOKEN_IDS " + json.dumps(ids))
"""


def probe_token_ids(folder: Path, tokens: list[str], *, python: str) -> dict[str, int | None]:
    """Ids of special tokens that only the tokenizer's own code defines (Qwen-v1 keeps them in tokenization_qwen.py).

    The tokenizer is loaded from `folder` in a fresh offline subprocess of `python`, so no model code runs here.
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    with tempfile.TemporaryDirectory(prefix="modelpack-tokens-") as workdir:
        process = subprocess.run([python, "-c", _TOKEN_PROBE, str(folder), *tokens], cwd=workdir, env=env,
                                 capture_output=True, text=True, encoding="utf-8", errors="replace")
    for line in process.stdout.splitlines():
        if line.startswith("MODELPACK_TOKEN_IDS "):
            return json.loads(line.split(" ", 1)[1])
    tail = "\n".join((process.stdout + process.stderr).strip().splitlines()[-12:])
    raise SourceError(
        f"cannot load the model's tokenizer with {python} to look up {', '.join(tokens)} "
        f"(exit {process.returncode}); set `verify.python` to an interpreter that can load this model:\n{tail}"
    )
