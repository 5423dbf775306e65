"""What a receiver can trust before any bundle code runs: files against the manifest, the digest, the signature."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from builder.errors import BundleError, ModelpackError, VerificationError
from builder.manifest import MANIFEST, read_manifest, sha256_file

# The integrity rules have one implementation, in the bundle's runtime (receivers without modelpack run it from the
# bundle); modelpack runs the copy installed with it. It also names the files the rules single out: the bundle's
# digest is the sha256 of manifest.json, which lists every other file; DIGEST_CARRIERS (the card and
# verification.json) carry that digest, so they are written with DIGEST_PLACEHOLDER, hashed so, and the placeholder
# is then replaced by the digest (same length): checking undoes exactly that replacement, so every byte of them but
# the digest is covered, and the digest they show must be the bundle's own. SIGNATURE is model_signing's file, the
# one a bundle may hold beside manifest.json that the manifest cannot list.
from builder.runtime import bundle_check
from builder.runtime.bundle_check import DIGEST_CARRIERS, DIGEST_PLACEHOLDER, SIGNATURE
from builder.runtime.load import CHECK_MODULE
from builder.safetensors_io import read_safetensors_header
from builder.sources import MAX_JSON_DEPTH, json_depth, read_json, require_text_path

# Files of a bundle that run when it is loaded with trust_remote_code: model code, unless it is the bundle's own.
CODE_SUFFIXES = (".py", ".c", ".cc", ".cpp", ".cu", ".cuh", ".h", ".hpp")
LOADER = "load.py"
# The bundle's own runtime, copied from builder/runtime/ (exact names at the bundle's top level): the loader and
# the verification runtime `load.py --verify` imports by name. Not model code, so they need no --trust-remote-code.
BUNDLE_RUNTIME = (LOADER, f"{CHECK_MODULE}.py")


@dataclass(frozen=True)
class Integrity:
    """The outcome of checking a bundle's files against its manifest; problems name the files."""

    files: int
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def bundle_digest(bundle: Path) -> str:
    """The bundle's identity: sha256 of its manifest.json, as the build prints it and `--digest` expects it."""
    return "sha256:" + sha256_file(bundle / MANIFEST)


def seal(bundle: Path) -> str:
    """Write the bundle's digest into the files that carry it, in place of the placeholder; returns the digest."""
    digest = bundle_digest(bundle)
    for name in DIGEST_CARRIERS:
        path = bundle / name
        if path.is_file():
            path.write_bytes(path.read_bytes().replace(DIGEST_PLACEHOLDER.encode(), digest.encode()))
    return digest


def check_integrity(bundle: Path, *, known_sha256: dict[str, str] | None = None) -> Integrity:
    """Every listed file is a regular file inside the bundle with its recorded size and sha256, and nothing else is
    there (no unlisted file, symlink, empty folder or __pycache__: Python would run a planted .pyc instead of the
    bundle's code).

    The runtime's function, from the copy installed with modelpack, never the bundle's.
    known_sha256: hashes this process computed while writing the files itself (the build's weights), not re-read.
    """
    found = bundle_check.check_integrity(bundle, known_sha256=known_sha256)
    return Integrity(found["files"], found["problems"])


# The one form of digest modelpack records and accepts: the algorithm, then 64 hex digits (either case).
DIGEST_FORM = re.compile(r"sha256:([0-9a-f]{64})", re.IGNORECASE)
# Weight files at least this large are not copied into the snapshot but held open (see received_snapshot).
HELD_OPEN_BYTES = 64 << 20
HELD_OPEN_SUFFIXES = (".safetensors", ".gguf")
# Where a process finds its own open handles by number (Linux): a link to /proc/self/fd/N opens handle N's file.
_OWN_HANDLES = Path("/proc/self/fd")
MAX_SIGNATURE_BYTES = 16 << 20


@dataclass
class Snapshot:
    """A received bundle as it was checked, in a private folder that verification runs from.

    folder: the snapshot (the bundle's name inside a private temporary folder); manifest: the proven manifest.json;
    held: weight files kept open instead of copied, name -> (handle, stamp): the snapshot links to them through
    /proc/self/fd, so processes started with pass_fds open the very file that was hashed, whatever is renamed
    over the bundle's path later.
    """

    folder: Path
    digest: str
    manifest: dict
    integrity: Integrity
    held: dict[str, tuple[int, tuple[int, ...]]]

    @property
    def pass_fds(self) -> tuple[int, ...]:
        return tuple(fd for fd, _ in self.held.values())

    def require_unchanged(self, bundle: Path) -> None:
        """Refuse (exit 3) when a held weight file was written in place since it was hashed: what ran may differ
        from what was checked. (A copy needs no such check; a held file is the same inode as the bundle's.)"""
        changed = [name for name, (fd, stamp) in self.held.items() if bundle_check.stamp(os.fstat(fd)) != stamp]
        if changed:
            raise VerificationError(
                f"verification failed: {', '.join(changed)} of {bundle} changed while it was being verified (written "
                "in place after its check), so the answers cannot be trusted; verify again once nothing writes to it"
            )


def normalized_digest(expected: str) -> str:
    """The expected digest in the form bundle_digest prints (lower-case hex), or exit 2 showing the one form taken."""
    match = DIGEST_FORM.fullmatch(expected.strip())
    if match is None:
        raise BundleError(
            f"--digest {expected[:80]!r} is not a digest modelpack records: give it as sha256:<64 hex digits>, as the "
            "build printed it (e.g. sha256:3f5c...)"
        )
    return "sha256:" + match.group(1).lower()


@contextmanager
def received_snapshot(bundle: Path, *, expected_digest: str | None = None,
                      progress: Callable[[str], None] = lambda line: None) -> Iterator[Snapshot]:
    """Check a received bundle into a private snapshot and keep it for the duration; refuse (exit 3) one whose
    manifest.json is not the expected digest or whose files differ from it.

    manifest.json is read once; the digest and every rule apply to those bytes, and nothing of the manifest is used
    before the expected digest proved it. Each listed file is opened once without following links and hashed as it
    is copied into the snapshot, so a file renamed over, or written in place in, the bundle afterwards changes
    nothing that runs. Weight files of HELD_OPEN_BYTES or more (on Linux) are held open and linked instead of
    copied, at no disk cost: the snapshot's processes inherit the handle, and Snapshot.require_unchanged refuses the
    result if one was written in place meanwhile.
    """
    wanted = normalized_digest(expected_digest) if expected_digest is not None else None
    require_text_path(bundle, "the bundle")
    if not (bundle / LOADER).exists() and not (bundle / MANIFEST).exists():
        raise BundleError(f"{bundle} is not a modelpack bundle (no manifest.json and load.py)")
    data, problem = bundle_check.read_manifest_bytes(bundle)
    if data is None:
        raise VerificationError(f"verification failed: {bundle}/{MANIFEST} {problem}; nothing from it was run")
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if wanted is not None and digest != wanted:
        raise VerificationError(
            f"{bundle}: digest {digest} is not the expected {wanted}: this manifest.json is not the one the sender "
            "built; nothing from the bundle was run"
        )
    listed, problems = bundle_check.parse_manifest(data)
    if listed is None:
        _refuse(bundle, problems)
    progress("checking every file against manifest.json into a private snapshot")
    parent = Path(tempfile.mkdtemp(prefix="modelpack-snapshot-"))  # mode 0700: no other user can enter it
    held: dict[str, tuple[int, tuple[int, ...]]] = {}
    try:
        folder = parent / bundle.name
        folder.mkdir()
        (folder / MANIFEST).write_bytes(data)
        problems = _snapshot_files(bundle, folder, listed, digest, problems, held)
        problems += bundle_check.unlisted_entries(bundle, listed)
        if problems:
            _refuse(bundle, problems)
        # The manifest's bytes were proven above; only now is any of it used.
        yield Snapshot(folder, digest, json.loads(data), Integrity(len(listed)), held)
    finally:
        for fd, _ in held.values():
            os.close(fd)
        shutil.rmtree(parent, ignore_errors=True)


def _snapshot_files(bundle: Path, folder: Path, listed: dict, digest: str, problems: list[str],
                    held: dict[str, tuple[int, tuple[int, ...]]]) -> list[str]:
    """Each listed file parse_manifest found no problem with, checked into the snapshot (copied, or held open and
    linked); the problems found, those of the manifest first."""
    problems = list(problems)
    hold = _OWN_HANDLES.is_dir()
    for name, meta in bundle_check.clean_entries(listed):
        target = folder.joinpath(*name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if hold and name.endswith(HELD_OPEN_SUFFIXES) and meta["size"] >= HELD_OPEN_BYTES:
            found = bundle_check.check_listed_file(bundle, name, meta, digest, None)
            if isinstance(found, int):
                held[name] = (found, bundle_check.stamp(os.fstat(found)))
                target.symlink_to(_OWN_HANDLES / str(found))
        else:
            with open(target, "xb") as copy:
                found = bundle_check.check_listed_file(bundle, name, meta, digest, None, sink=copy.write)
            if isinstance(found, int):
                os.close(found)
        if isinstance(found, str):
            problems.append(f"{name}: {found}")
    problem = _copy_signature(bundle, folder)
    return problems + ([f"{SIGNATURE}: {problem}"] if problem else [])


def _copy_signature(bundle: Path, folder: Path) -> str | None:
    """model.sig into the snapshot (the signature is checked over the snapshot), read once through a handle that
    is no link; why not, when it is there but unusable."""
    try:
        fd = os.open(bundle / SIGNATURE, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"cannot be read, or is a symlink ({exc.strerror})"
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            return "not a regular file"
        if info.st_size > MAX_SIGNATURE_BYTES:
            return f"over the limit of {MAX_SIGNATURE_BYTES} bytes"
        (folder / SIGNATURE).write_bytes(f.read(MAX_SIGNATURE_BYTES))
    return None


def _refuse(bundle: Path, problems: list[str]) -> NoReturn:
    raise VerificationError(
        f"verification failed: files of {bundle} differ from its manifest.json, so nothing from it was run:\n  "
        + "\n  ".join(f"integrity: {problem}" for problem in problems[:50])
        + (f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else "")
    )


def refuse_unloadable_files(bundle: Path, manifest: dict, *, shown: Path) -> None:
    """Refuse (exit 3) a bundle with a JSON file or safetensors header that the verification process would hand to
    transformers, tokenizers, peft or safetensors and that is over modelpack's limits: every listed `.json` file
    (configs, tokenizer files, adapter_config.json, indexes; sources.read_json: at most MAX_JSON_BYTES, UTF-8, a JSON
    object nested at most MAX_JSON_DEPTH levels) and every `.safetensors` header (the format's own checks, nested
    at most as deep). Run in this process before any other starts, so a hostile file is one sentence naming it and
    the limit, not a crash or a RecursionError inside the child. bundle: a received bundle's snapshot; shown: the
    bundle's own path, for messages."""
    for name in sorted(manifest.get("files", {})):
        path, where = bundle.joinpath(*name.split("/")), shown.joinpath(*name.split("/"))
        try:
            if name.endswith(".json"):
                read_json(path, shown=where)
            elif name.endswith(".safetensors"):
                read_safetensors_header(path)
                _refuse_deep_header(path, where)
        except ModelpackError as exc:
            message = exc.message.replace(str(path), str(where))
            raise VerificationError(f"verification failed: {message}; nothing from the bundle was run") from exc


def _refuse_deep_header(path: Path, where: Path) -> None:
    """A safetensors header that read_safetensors_header accepted, nested no deeper than MAX_JSON_DEPTH (extra keys
    of a tensor's entry are free-form JSON, which safetensors' own parser stops reading at 128 levels)."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    if json_depth(header) > MAX_JSON_DEPTH:
        raise VerificationError(f"{where}: its safetensors header nests JSON deeper than modelpack's limit of "
                                f"{MAX_JSON_DEPTH} levels")


def code_files(manifest: dict) -> dict[str, str]:
    """The model's own code a bundle runs with trust_remote_code, name -> sha256 (not the bundle's own runtime)."""
    return {name: meta["sha256"] for name, meta in sorted(manifest.get("files", {}).items())
            if name.endswith(CODE_SUFFIXES) and name not in BUNDLE_RUNTIME}


def require_integrity(bundle: Path, *, expected_digest: str | None = None,
                      known_sha256: dict[str, str] | None = None) -> Integrity:
    """Refuse (exit 3) a bundle whose files differ from its manifest or whose digest is not the expected one.

    Runs in modelpack's own process before anything from the bundle is executed.
    """
    if expected_digest is not None:
        digest = bundle_digest(bundle)
        wanted = normalized_digest(expected_digest)
        if digest != wanted:
            raise VerificationError(
                f"{bundle}: digest {digest} is not the expected {wanted}: this manifest.json is not the one the sender "
                "built; nothing from the bundle was run"
            )
    integrity = check_integrity(bundle, known_sha256=known_sha256)
    if not integrity.ok:
        raise VerificationError(
            f"verification failed: files of {bundle} differ from its manifest.json, so nothing from it was run:\n  "
            + "\n  ".join(f"integrity: {problem}" for problem in integrity.problems)
        )
    return integrity


def require_consent_to_code(manifest: dict, *, trust_remote_code: bool) -> dict[str, str]:
    """The model code verification would run; refused (exit 2) unless the receiver said they trust it."""
    code = code_files(manifest)
    if code and not trust_remote_code:
        raise BundleError(
            f"the bundle ships model code that verification would run ({', '.join(code)}); read it, then pass "
            "--trust-remote-code"
        )
    return code


def sign_bundle(bundle: Path, private_key: Path) -> Path:
    """Sign every file of the bundle with an elliptic-curve private key (PEM), offline, through OpenSSF's
    model_signing; the signature goes into the bundle as model.sig."""
    require_text_path(bundle, "the bundle")
    signing = _model_signing()
    read_manifest(bundle)
    signature = bundle / SIGNATURE
    try:
        signing.signing.Config().use_elliptic_key_signer(private_key=private_key).set_hashing_config(
            signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
        ).sign(bundle, signature)
    except (ValueError, OSError) as exc:
        raise BundleError(f"cannot sign {bundle} with {private_key}: {exc}") from exc
    return signature


def require_signature(bundle: Path, public_key: Path, *, shown: Path | None = None) -> None:
    """Refuse (exit 3) a bundle whose model.sig is missing or was not made by the holder of public_key's private key
    over exactly these files.

    bundle is a received bundle's snapshot (received_snapshot): its only links are the snapshot's own, to the
    weight files it holds open, which the signature covers as the files they are. shown: the bundle's own path,
    for messages."""
    signing = _model_signing()
    signature = bundle / SIGNATURE
    shown = shown or bundle
    if not signature.is_file():
        raise VerificationError(f"{shown}: no {SIGNATURE}; ask the sender to run `modelpack sign` on the bundle")
    try:
        signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
            .set_allow_symlinks(True)
        ).verify(bundle, signature)
    # model_signing parses the sender's signature file and the receiver's key: a truncated or foreign one fails in
    # its parsers with whatever they raise, and every such failure is a failed check, never a crash.
    except Exception as exc:  # noqa: BLE001
        raise VerificationError(f"{shown}: signature check with {public_key} failed: "
                                f"{str(exc)[:300] or type(exc).__name__}") from exc


def _model_signing():
    try:
        import model_signing
    except ImportError as exc:
        raise BundleError(
            "signing needs OpenSSF's model_signing package: pip install 'modelpack-lora[signing]'"
        ) from exc
    return model_signing
