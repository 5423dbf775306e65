"""A remote-code model's own Python files, read as text: the packages they import and where pip finds them."""

from __future__ import annotations

import sys
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
    """Top-level modules a file imports, as transformers' own `check_imports` finds them before it loads the file.

    transformers' `get_imports` skips imports inside `try:` blocks and under `if is_..._available():`, counts
    imports inside functions (it refuses to load the file when any of them is missing) and leaves out relative
    imports (the model's own files).
    """
    from transformers.dynamic_module_utils import get_imports

    try:
        return set(get_imports(path))
    except SyntaxError as exc:
        raise SourceError(f"{path}: not valid Python (line {exc.lineno}: {exc.msg}); the model cannot load it") from exc


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
