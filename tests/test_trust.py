"""A received bundle is checked before any of its code runs, against an anchor the receiver got from the sender."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.manifest import write_manifest
from builder.trust import DIGEST_PLACEHOLDER, bundle_digest, check_integrity
from helpers import assert_user_error, write_spec

# A tampered load.py that would leave this file behind if it ever ran (at import, before anything else).
MARKER = "tampered-load-py-ran"
PAYLOAD = f"import pathlib; pathlib.Path({{marker!r}}).write_text('ran')\n"


def run(*args) -> object:
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def built(tmp_path_factory, models, adapters):
    root = tmp_path_factory.mktemp("trust")
    base = models("qwen2", tied=True, dtype=torch.float32)
    return build_bundle(plan_from_spec(write_spec(root, base, adapters(base))), verify=False).bundle


@pytest.fixture
def bundle(built, tmp_path):
    copy = tmp_path / "received" / built.name
    shutil.copytree(built, copy)
    return copy


def plant_payload(bundle: Path, marker: Path) -> None:
    load_py = bundle / "load.py"
    load_py.write_text(PAYLOAD.format(marker=str(marker)) + load_py.read_text())


def rewrite_manifest(bundle: Path) -> None:
    """What an attacker who changed files does next: a manifest that agrees with them."""
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))


def test_card_and_report_carry_the_digest_the_build_printed(bundle):
    digest = bundle_digest(bundle)
    assert digest.startswith("sha256:") and digest != DIGEST_PLACEHOLDER
    assert digest in (bundle / "README.md").read_text()
    assert check_integrity(bundle, json.loads((bundle / "manifest.json").read_text())).ok


def test_a_changed_load_py_is_refused_before_it_runs(bundle, tmp_path):
    marker = tmp_path / MARKER
    plant_payload(bundle, marker)
    result = run("verify", bundle)
    assert_user_error(result, 3, "nothing from it was run", "integrity: load.py: size")
    assert not marker.exists()


def test_a_self_consistent_tampered_bundle_is_refused_by_the_senders_digest(bundle, tmp_path):
    digest = bundle_digest(bundle)
    marker = tmp_path / MARKER
    plant_payload(bundle, marker)
    rewrite_manifest(bundle)
    result = run("verify", bundle, "--digest", digest)
    assert_user_error(result, 3, f"is not the expected {digest}", "nothing from the bundle was run")
    assert not marker.exists()
    # Without an anchor the files agree with their (rewritten) manifest: that is why --digest exists.
    assert check_integrity(bundle, json.loads((bundle / "manifest.json").read_text())).ok


def test_the_right_digest_passes_and_is_printed(bundle):
    digest = bundle_digest(bundle)
    result = run("verify", bundle, "--digest", digest)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"verification passed (1 prompts, 0 probes), {digest} (digest)\n")


@pytest.mark.parametrize("tamper, culprit", [
    (lambda b: (b / "__pycache__").mkdir() or (b / "__pycache__" / "load.cpython-311.pyc").write_bytes(b"x"),
     "__pycache__/load.cpython-311.pyc: not in manifest.json"),
    (lambda b: (b / "config.json").unlink() or (b / "config.json").symlink_to("/etc/hostname"),
     "config.json: is a symlink"),
    (lambda b: (b / "extra").symlink_to("/etc"), "extra: not in manifest.json"),
    (lambda b: (b / "README.md").write_text((b / "README.md").read_text().replace("#", "##", 1)),
     "README.md: size"),
    (lambda b: (b / "README.md").write_text((b / "README.md").read_text().replace("sha256:", "sha256:f", 1)[:-1]),
     "README.md: sha256 differs"),
    (lambda b: (b / "tokenizer.json").unlink(), "tokenizer.json: missing"),
])
def test_unlisted_linked_changed_or_missing_files_are_refused_by_both_checks(bundle, tmp_path, tamper, culprit):
    tamper(bundle)
    result = run("verify", bundle)
    assert_user_error(result, 3, f"integrity: {culprit}")
    # The bundle's own load.py applies the same rules (for receivers without modelpack).
    loader_spec = importlib.util.spec_from_file_location("received_load", bundle / "load.py")
    loader = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(loader)
    own = loader.check_integrity()
    assert not own["ok"] and any(p.startswith(culprit.split(":")[0]) for p in own["problems"]), own


def test_a_manifest_naming_files_outside_the_bundle_is_refused(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    (tmp_path / "outside.txt").write_text("x")
    manifest["files"]["../outside.txt"] = {"sha256": "0" * 64, "size": 1}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    assert_user_error(run("verify", bundle), 3, "integrity: ../outside.txt: not a file name inside the bundle")


def test_model_code_runs_only_with_trust_remote_code(bundle, tmp_path):
    (bundle / "modeling_extra.py").write_text(f"import pathlib; pathlib.Path({str(tmp_path / MARKER)!r}).touch()\n")
    rewrite_manifest(bundle)
    assert_user_error(run("verify", bundle), 2, "ships model code that verification would run (modeling_extra.py)",
                      "--trust-remote-code")
    result = run("verify", bundle, "--trust-remote-code", "--report", tmp_path / "report.json")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["remote_code"] == {"modeling_extra.py": json.loads((bundle / "manifest.json").read_text())[
        "files"]["modeling_extra.py"]["sha256"]}


def _key_pair(folder: Path) -> tuple[Path, Path]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "private.pem", folder / "public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public


def test_a_signed_bundle_verifies_with_the_senders_key_and_not_after_tampering(bundle, tmp_path):
    pytest.importorskip("model_signing")
    private, public = _key_pair(tmp_path / "sender")
    _, stranger = _key_pair(tmp_path / "stranger")
    signed = run("sign", bundle, "--key", private)
    assert signed.exit_code == 0, signed.output
    assert (bundle / "model.sig").is_file()
    result = run("verify", bundle, "--public-key", public)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"{bundle_digest(bundle)} (signature)\n")
    assert_user_error(run("verify", bundle, "--public-key", stranger), 3, "signature check with")

    marker = tmp_path / MARKER
    plant_payload(bundle, marker)
    rewrite_manifest(bundle)
    assert_user_error(run("verify", bundle, "--public-key", public), 3, "signature check with")
    assert not marker.exists()
