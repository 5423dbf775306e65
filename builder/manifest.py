"""The bundle's manifest: sha256 and size of every file, the provenance record, and the machine-path scan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TypeGuard

from builder.errors import BundleError
from builder.formatting import dump_json

# The file name and the hash are the bundle runtime's own, so a bundle and modelpack agree on both by construction.
from builder.runtime.bundle_check import MANIFEST, sha256_file

# The marker that says modelpack wrote a folder: `--force` replaces only such a folder (or an empty one).
GENERATOR = "modelpack"
# Text files are scanned for paths of the build machine; weights are binary and skipped.
BINARY_SUFFIXES = (".safetensors", ".bin", ".tiktoken", ".model", ".gguf")


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


def find_machine_paths(bundle: Path, paths: list[Path]) -> list[str]:
    """Files (other than the manifest's provenance) that mention a path of the build machine."""
    needles = [str(p) for p in paths]
    offenders = []
    for name in bundle_files(bundle):
        if name.endswith(BINARY_SUFFIXES):
            continue
        text = (bundle / name).read_text(encoding="utf-8", errors="replace")
        offenders += [f"{name} mentions {needle}" for needle in needles if needle in text]
    return offenders


def read_manifest(bundle: Path) -> dict:
    path = bundle / MANIFEST
    if not (bundle / "load.py").is_file() or not path.is_file():
        raise BundleError(f"{bundle} is not a modelpack bundle (no manifest.json and load.py)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc


def written_by_modelpack(manifest: object) -> TypeGuard[dict]:
    """Whether a parsed manifest.json says modelpack wrote its folder.

    Bundles built before the `generator` marker existed are recognised by their `modelpack_version`.
    """
    return isinstance(manifest, dict) and (
        manifest.get("generator") == GENERATOR or isinstance(manifest.get("modelpack_version"), str)
    )
