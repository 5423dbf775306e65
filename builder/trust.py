"""What a receiver can trust before any bundle code runs: files against the manifest, the digest, the signature."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from builder.errors import BundleError, VerificationError
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
        wanted = expected_digest if expected_digest.startswith("sha256:") else f"sha256:{expected_digest}"
        if digest != wanted.lower():
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


def require_signature(bundle: Path, public_key: Path) -> None:
    """Refuse (exit 3) a bundle whose model.sig is missing or was not made by the holder of public_key's private key
    over exactly these files."""
    signing = _model_signing()
    signature = bundle / SIGNATURE
    if not signature.is_file():
        raise VerificationError(f"{bundle}: no {SIGNATURE}; ask the sender to run `modelpack sign` on the bundle")
    try:
        signing.verifying.Config().use_elliptic_key_verifier(public_key=public_key).set_hashing_config(
            signing.hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=False)
        ).verify(bundle, signature)
    except ValueError as exc:
        raise VerificationError(f"{bundle}: signature check with {public_key} failed: {exc}") from exc


def _model_signing():
    try:
        import model_signing
    except ImportError as exc:
        raise BundleError(
            "signing needs OpenSSF's model_signing package: pip install 'modelpack-lora[signing]'"
        ) from exc
    return model_signing
