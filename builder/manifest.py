"""The bundle's manifest: sha256 and size of every file, the provenance record, and the machine-path scan."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TypeGuard

from builder.errors import BundleError
from builder.formatting import dump_json

# The file name and the hash are the bundle runtime's own, so a bundle and modelpack agree on both by construction.
from builder.runtime.bundle_check import MANIFEST, read_manifest_bytes, sha256_file

# The marker that says modelpack wrote a folder: `--force` replaces only such a folder (or an empty one).
GENERATOR = "modelpack"
# A GGUF file's copy of the vocabulary: the tokenizer's own strings, which may hold "/tmp" or "/home" as tokens.
GGUF_VOCABULARY = frozenset({"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                             "tokenizer.ggml.scores"})
# Folders every Unix machine has, which name nothing about the build machine (load.py's shebang is /usr/bin/env):
# a Python installed there gives them as sys.prefix.
SYSTEM_FOLDERS = frozenset({"/", "/usr", "/usr/local", "/bin", "/usr/bin", "/opt"})


def bundle_files(bundle: Path) -> list[str]:
    return sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    )


def write_manifest(bundle: Path, provenance: dict, *, known_sha256: dict[str, str] | None = None) -> dict:
    """manifest.json: the generator marker, the provenance record, and sha256 and size of every other file.

    known_sha256 holds hashes computed while the files were written (the weights), so they are not read again.
    """
    known = known_sha256 or {}
    files = {
        name: {"sha256": known.get(name) or sha256_file(bundle / name), "size": (bundle / name).stat().st_size}
        for name in bundle_files(bundle)
    }
    manifest = {"generator": GENERATOR, **provenance, "files": files}
    (bundle / MANIFEST).write_text(dump_json(manifest), encoding="utf-8")
    return manifest


def machine_paths(sources: list[Path], *, python: str | os.PathLike) -> list[str]:
    """The paths of the build machine a bundle must not name: the sources and the spec's folder, this interpreter
    and the verifying one (as given and resolved), sys.prefix, the home, temp and working folders."""
    candidates = [*sources, sys.executable, sys.prefix, sys.base_prefix, python, Path.home(), tempfile.gettempdir()]
    # A working folder at the top (/data, /workspace in a container) names no machine, and the card's serving
    # commands use such folders inside containers (TGI's -v ...:/data/NAME).
    if len(Path(os.getcwd()).parts) > 2:
        candidates.append(os.getcwd())
    found = {os.path.abspath(p) for p in candidates} | {os.path.realpath(p) for p in candidates}
    return sorted(p for p in found if p not in SYSTEM_FOLDERS)


def find_machine_paths(bundle: Path, paths: list[str], *, copied: set[str]) -> list[str]:
    """Files the build generated (other than the manifest's provenance) that mention a path of the build machine:
    text files whole, the safetensors headers and the GGUF metadata but its vocabulary. copied: the files taken
    byte for byte from the sources (tokenizer files, model code), whose text is the sources' own, not scanned."""
    # A path ends where a name character does not follow it: /tmp matches in "/tmp/x" and "/tmp", not in "/tmpfs".
    needles = [(p, re.compile(re.escape(p.encode()) + rb"(?![\w.-])")) for p in paths]
    offenders = []
    for name in bundle_files(bundle):
        if name in copied:
            continue
        data = _scanned_bytes(bundle / name)
        offenders += [f"{name} mentions {path}" for path, pattern in needles if pattern.search(data)]
    return offenders


def _scanned_bytes(path: Path) -> bytes:
    """What a build writes into a file as text: all of it, or a weight file's header (its tensors are numbers)."""
    if path.suffix == ".safetensors":
        with path.open("rb") as file:
            length = int.from_bytes(file.read(8), "little")
            return file.read(length)
    if path.suffix == ".gguf":
        import gguf  # the export's own library; only a bundle with GGUF files pays its import

        fields = gguf.GGUFReader(path).fields
        return "\n".join(str(field.contents()) for key, field in fields.items()
                         if key not in GGUF_VOCABULARY).encode()
    return path.read_bytes()


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not (bundle / "load.py").is_file() or not path.is_file():
        raise BundleError(f"{bundle} is not a modelpack bundle (no manifest.json and load.py)")
    # Through the runtime's reader: no symlink, at most bundle_check.MAX_MANIFEST_BYTES, one read.
    data, problem = read_manifest_bytes(bundle)
    if data is None:
        raise BundleError(f"{path}: {problem}")
    try:
        manifest = json.loads(data.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise BundleError(f"{path}: not UTF-8 text (byte {exc.start})") from exc
    except RecursionError as exc:
        raise BundleError(f"{path}: JSON nested too deeply") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object at the top level, found {type(manifest).__name__}")
    return manifest


def written_by_modelpack(manifest: object) -> TypeGuard[dict]:
    """Whether a parsed manifest.json says modelpack wrote its folder.

    Bundles built before the `generator` marker existed are recognised by their `modelpack_version`.
    """
    return isinstance(manifest, dict) and (
        manifest.get("generator") == GENERATOR or isinstance(manifest.get("modelpack_version"), str)
    )
