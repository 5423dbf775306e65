"""Staging, the manifest of hashes, and the atomic rename that makes a bundle appear only when complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from builder.errors import BundleError, SourceError

MANIFEST = "manifest.json"
# Text files are scanned for paths of the build machine; weights are binary and skipped.
BINARY_SUFFIXES = (".safetensors", ".bin", ".tiktoken", ".model")


def check_destination(dest: Path, *, force: bool) -> None:
    """Refuse to build over an existing bundle unless forced, before any work is done."""
    if dest.exists() and not force:
        raise SourceError(f"output {dest} already exists; pass --force to replace it (it is kept until the new one is ready)")
    if dest.exists() and not dest.is_dir():
        raise SourceError(f"output {dest} exists and is not a folder")


def check_disk_space(dest: Path, needed: int) -> None:
    parent = next(p for p in [dest.parent, *dest.parent.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise SourceError(
            f"output {dest}: the bundle needs {needed / 1e9:.2f} GB but {parent} has {free / 1e9:.2f} GB free; "
            "free space or pass -o to build elsewhere"
        )


@contextlib.contextmanager
def staging_folder(dest: Path) -> Iterator[Path]:
    """A fresh folder beside dest (same filesystem, so the final rename is atomic); removed if the build fails."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        yield staging
    except BaseException:  # interrupted builds too: never leave half a bundle behind
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, dest: Path) -> None:
    """Move the finished staging folder into place; a replaced bundle stays until the new one is in place."""
    previous = dest.parent / f".{dest.name}.previous-{os.getpid()}"
    if dest.exists():
        dest.rename(previous)
    staging.rename(dest)
    if previous.exists():
        shutil.rmtree(previous)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(bundle: Path) -> list[str]:
    return sorted(
        p.relative_to(bundle).as_posix()
        for p in bundle.rglob("*")
        if p.is_file() and p.name != MANIFEST and "__pycache__" not in p.parts
    )


def write_manifest(bundle: Path, provenance: dict, *, known_sha256: dict[str, str] | None = None) -> dict:
    """manifest.json: the provenance record plus sha256 and size of every other file in the bundle.

    known_sha256 holds hashes computed while the files were written (the weights), so they are not read again.
    """
    known = known_sha256 or {}
    files = {
        name: {"sha256": known.get(name) or sha256_file(bundle / name), "size": (bundle / name).stat().st_size}
        for name in bundle_files(bundle)
    }
    manifest = {**provenance, "files": files}
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
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
