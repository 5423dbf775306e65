"""A received bundle is checked before any of its code runs, against an anchor the receiver got from the sender."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builder import trust
from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import VerificationError
from builder.manifest import write_manifest
from builder.trust import BUNDLE_RUNTIME, DIGEST_PLACEHOLDER, bundle_digest, check_integrity, code_files, seal
from builder.verify import verify_bundle
from helpers import RUNTIME, assert_user_error, import_file, signing_key_pair, write_spec

# A tampered load.py that would leave this file behind if it ever ran (at import, before anything else).
MARKER = "tampered-load-py-ran"
PAYLOAD = "import pathlib; pathlib.Path({marker!r}).write_text('ran')\n"


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
    assert check_integrity(bundle).ok


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
    assert check_integrity(bundle).ok


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
    # The bundle's own verification runtime applies the same rules (for receivers without modelpack).
    own = import_file(bundle / "bundle_check.py").check_integrity(bundle)
    assert not own["ok"] and any(p.startswith(culprit) for p in own["problems"]), own
    assert own["problems"] == check_integrity(bundle).problems


def _fake_bundle(folder: Path) -> Path:
    """A bundle's shape without a model: a few files, a subfolder, a digest carrier, a manifest, sealed."""
    bundle = folder / "fake"
    (bundle / "sub").mkdir(parents=True)
    (bundle / "config.json").write_text("{}\n")
    (bundle / "sub" / "x.txt").write_text("x")
    (bundle / "README.md").write_text(f"# fake\n\nBundle digest: {DIGEST_PLACEHOLDER}\n")
    for name in BUNDLE_RUNTIME:
        shutil.copy(RUNTIME / name, bundle / name)
    write_manifest(bundle, {})
    seal(bundle)
    return bundle


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _symlink_folder(bundle: Path) -> None:
    shutil.move(bundle / "sub", bundle.parent / "sub-real")
    (bundle / "sub").symlink_to(bundle.parent / "sub-real")


def _folder_for_file(bundle: Path) -> None:
    (bundle / "config.json").unlink()
    (bundle / "config.json").mkdir()
    (bundle / "config.json" / "a").write_text("a")


# (how the received bundle was changed, a problem both checks must report; None: both must pass)
TAMPERED = {
    "untouched": (lambda b: None, None),
    "signature beside the manifest": (lambda b: (b / "model.sig").write_text("sig"), None),
    "unlisted file": (lambda b: (b / "notes.txt").write_text("n"), "notes.txt: not in manifest.json"),
    "planted __pycache__": (
        lambda b: (b / "__pycache__").mkdir() or (b / "__pycache__" / "load.cpython-311.pyc").write_bytes(b"x"),
        "__pycache__/load.cpython-311.pyc: not in manifest.json"),
    "empty folder": (lambda b: (b / "empty").mkdir(), "empty/: not in manifest.json"),
    "file replaced by a symlink": (
        lambda b: (b / "config.json").unlink() or (b / "config.json").symlink_to(b / "sub" / "x.txt"),
        "config.json: is a symlink"),
    "symlinked folder added": (lambda b: (b / "extra").symlink_to(b.parent), "extra: not in manifest.json"),
    "listed file behind a symlinked folder": (_symlink_folder, "sub/x.txt: lies behind a symlink"),
    "folder in place of a file": (_folder_for_file, "config.json: not a regular file"),
    "fifo in place of a file": (lambda b: (b / "config.json").unlink() or os.mkfifo(b / "config.json"),
                                "config.json: not a regular file"),
    "missing file": (lambda b: (b / "sub" / "x.txt").unlink(), "sub/x.txt: missing"),
    "changed size": (lambda b: (b / "config.json").write_text("{ }\n"), "config.json: size 4 != 3"),
    "changed bytes": (lambda b: (b / "config.json").write_text("[]\n"), "config.json: sha256 differs"),
    "changed runtime": (lambda b: (b / "bundle_check.py").write_text((b / "bundle_check.py").read_text()[:-1] + " "),
                        "bundle_check.py: sha256 differs"),
    "card with another digest": (
        lambda b: (b / "README.md").write_text((b / "README.md").read_text().replace("sha256:", "sha256:f", 1)[:-1]),
        "README.md: sha256 differs"),
    "card edited": (lambda b: (b / "README.md").write_text((b / "README.md").read_text().replace("#", "##", 1)),
                    "README.md: size"),
    "path outside": (lambda b: _edit_manifest(b, lambda m: m["files"].update({"../x": {"sha256": "0", "size": 1}})),
                     "../x: not a file name inside the bundle"),
    "absolute path": (lambda b: _edit_manifest(b, lambda m: m["files"].update({"/etc/hostname": {"size": 1}})),
                      "/etc/hostname: not a file name inside the bundle"),
    "entry that is not a table": (lambda b: _edit_manifest(b, lambda m: m["files"].update({"config.json": 3})),
                                  "config.json: its entry is not"),
    "hash in another form": (lambda b: _edit_manifest(b, lambda m: m["files"]["config.json"].update(
        sha256="SHA256:" + m["files"]["config.json"]["sha256"])), "config.json: its entry is not"),
    "name listed twice in another case": (
        lambda b: _edit_manifest(b, lambda m: m["files"].update({"CONFIG.json": m["files"]["config.json"]})),
        "config.json: listed twice"),
    "key repeated in the JSON": (lambda b: (b / "manifest.json").write_text(
        (b / "manifest.json").read_text().replace('"files": {', '"files": {"config.json": {}, ', 1)),
        "manifest.json: not a JSON object (the key config.json appears twice)"),
    "manifest listing itself": (lambda b: _edit_manifest(b, lambda m: m["files"].update(
        {"manifest.json": m["files"]["config.json"]})), "manifest.json: manifest.json cannot list itself"),
    "name with a control character": (lambda b: _edit_manifest(b, lambda m: m["files"].update(
        {"con\nfig.json": m["files"]["config.json"]})), "con\\nfig.json: not a file name inside the bundle"),
    "manifest that is a JSON list": (lambda b: (b / "manifest.json").write_text("[]"),
                                     "manifest.json: has no 'files' table"),
    "manifest behind a symlink": (lambda b: (shutil.move(b / "manifest.json", b.parent / "m.json"), (
        b / "manifest.json").symlink_to(b.parent / "m.json")), "manifest.json: is a symlink"),
    "no files table": (lambda b: _edit_manifest(b, lambda m: m.pop("files")), "manifest.json: has no 'files' table"),
    "path through a file": (lambda b: _edit_manifest(b, lambda m: m["files"].update(
        {"config.json/x": {"sha256": "0" * 64, "size": 1}})), "config.json/x: missing"),
}


@pytest.mark.parametrize("tamper, culprit", TAMPERED.values(), ids=TAMPERED)
def test_the_bundles_own_integrity_check_agrees_with_modelpacks(tmp_path, tamper, culprit):
    bundle = _fake_bundle(tmp_path)
    tamper(bundle)
    trusted = check_integrity(bundle)
    own = import_file(RUNTIME / "bundle_check.py").check_integrity(bundle)
    assert own == {"ok": trusted.ok, "files": trusted.files, "problems": trusted.problems}
    if culprit is None:
        assert trusted.ok, trusted.problems
    else:
        assert any(p.startswith(culprit) for p in trusted.problems), trusted.problems


@pytest.mark.parametrize("name, is_model_code", [
    ("load.py", False), ("bundle_check.py", False), ("modeling_qwen.py", True), ("cpp_kernels.py", True),
    ("cache_autogptq_cuda_256.cpp", True), ("adapter/load.py", True), ("sub/bundle_check.py", True),
    ("modelpack_bundle.json", False), ("equivalence.py", True),
])
def test_only_the_bundles_own_runtime_is_exempt_from_consent_to_model_code(name, is_model_code):
    assert (name in code_files({"files": {name: {"sha256": "0" * 64, "size": 0}}})) is is_model_code


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


def test_a_signed_bundle_verifies_with_the_senders_key_and_not_after_tampering(bundle, tmp_path):
    pytest.importorskip("model_signing")
    private, public = signing_key_pair(tmp_path / "sender")
    _, stranger = signing_key_pair(tmp_path / "stranger")
    signed = run("sign", bundle, "--key", private)
    assert signed.exit_code == 0, signed.output
    assert (bundle / "model.sig").is_file()
    result = run("verify", bundle, "--public-key", public)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"{bundle_digest(bundle)} (signature)\n")
    assert_user_error(run("verify", bundle, "--public-key", stranger), 3, "signature check with")

    marker = tmp_path / MARKER
    plant_payload(bundle, marker)
    rewrite_manifest(bundle)  # it lists model.sig, which a manifest cannot: refused before the signature is read
    assert_user_error(run("verify", bundle, "--public-key", public), 3, "model.sig: model.sig cannot list itself")
    _edit_manifest(bundle, lambda m: m["files"].pop("model.sig"))
    assert_user_error(run("verify", bundle, "--public-key", public), 3, "signature check with")
    assert not marker.exists()


def _attack_at_step_one(attack):
    """A progress callback that runs attack once, after the files were checked and before the bundle runs."""
    def progress(line: str) -> None:
        if line.startswith("verification step 1 of"):
            attack()
    return progress


def _rename_swap(path: Path, content: bytes) -> None:
    swapped = path.with_name(path.name + ".swap")
    swapped.write_bytes(content)
    os.replace(swapped, path)


def _overwrite_in_place(path: Path, content: bytes) -> None:
    with open(path, "r+b") as f:  # the same inode: a hard link or an open handle would see these bytes too
        f.write(content)


@pytest.mark.parametrize("change", [_rename_swap, _overwrite_in_place], ids=["rename-swap", "in-place"])
def test_a_load_py_changed_mid_verification_is_not_what_runs(bundle, tmp_path, change):
    marker = tmp_path / MARKER
    load_py = bundle / "load.py"
    payload = PAYLOAD.format(marker=str(marker)).encode() + load_py.read_bytes()
    report = verify_bundle(bundle, progress=_attack_at_step_one(lambda: change(load_py, payload)))
    assert report["ok"] and not marker.exists()  # the snapshot's checked load.py ran, not the changed one


@pytest.mark.parametrize("change", [_rename_swap, _overwrite_in_place], ids=["rename-swap", "in-place"])
def test_held_weights_changed_mid_verification_are_refused(bundle, monkeypatch, change):
    monkeypatch.setattr(trust, "HELD_OPEN_BYTES", 0)  # hold the tiny model's weights open as a 7B's would be
    weights = bundle / "model.safetensors"
    # Even the same bytes: a held file's change time moved (a write, or its name unlinked by a rename over it), and
    # that is all the check can know, so it refuses rather than vouch for answers read through it.
    same = weights.read_bytes()
    with pytest.raises(VerificationError, match="model.safetensors of .* changed while it was being verified"):
        verify_bundle(bundle, progress=_attack_at_step_one(lambda: change(weights, same)))


def test_the_snapshot_is_private_and_removed_afterwards(bundle, monkeypatch):
    seen = []
    monkeypatch.setattr(trust, "HELD_OPEN_BYTES", 0)
    with trust.received_snapshot(bundle) as snapshot:
        seen.append(snapshot.folder)
        assert oct(snapshot.folder.parent.stat().st_mode & 0o777) == "0o700"
        assert (snapshot.folder / "model.safetensors").is_symlink() and snapshot.held
        assert (snapshot.folder / "load.py").read_bytes() == (bundle / "load.py").read_bytes()
    assert not seen[0].exists()


@pytest.mark.parametrize("given", [
    "sha256:" + "a" * 63, "sha512:" + "a" * 128, "a" * 64, "sha256: " + "a" * 64, "md5:" + "a" * 32, "", "sha256:",
    "sha256:" + "g" * 64,
])
def test_a_digest_in_another_form_is_refused_showing_the_form(bundle, given):
    assert_user_error(run("verify", bundle, "--digest", given), 2, "give it as sha256:<64 hex digits>")


def test_the_digest_compares_case_insensitively_in_hex(bundle):
    digest = bundle_digest(bundle)
    result = run("verify", bundle, "--digest", "SHA256:" + digest.removeprefix("sha256:").upper())
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("sources", [
    [], "x", {"base": 3}, {"base": "b", "adapters": "x"}, {"base": "b", "adapters": [3]},
    {"base": "b", "adapters": [{"path": ["x"]}]}, {"base": "b", "sha256": []}, {"base": "b\0c"},
    {"base": "b", "adapters": [{"path": "p", "weight": "1"}]},
])
def test_a_sources_table_of_another_shape_is_refused_once_the_digest_proved_it(bundle, sources):
    digest = bundle_digest(bundle)
    for name in ("README.md", "verification.json"):  # unsealed, so the edited manifest can be sealed again
        if (bundle / name).is_file():
            (bundle / name).write_text((bundle / name).read_text().replace(digest, DIGEST_PLACEHOLDER))
    _edit_manifest(bundle, lambda m: m.update(sources=sources))
    seal(bundle)
    assert_user_error(run("verify", bundle, "--digest", bundle_digest(bundle)), 3,
                      "manifest.json's `sources` is not the table modelpack writes")


@pytest.mark.parametrize("signature", [b"", b"{", b"x" * 100, b'{"mediaType": 3}'])
def test_a_truncated_or_foreign_signature_fails_the_check(bundle, tmp_path, signature):
    pytest.importorskip("model_signing")
    _, public = signing_key_pair(tmp_path / "sender")
    (bundle / "model.sig").write_bytes(signature)
    assert_user_error(run("verify", bundle, "--public-key", public), 3, "signature check with")


def test_a_report_path_that_cannot_be_written_is_a_user_error(bundle, tmp_path):
    result = run("verify", bundle, "--report", tmp_path / "no" / "such" / "folder" / "report.json")
    assert_user_error(result, 2, "--report", "cannot write the report there (No such file or directory)")


def test_real_sized_files_pass_the_limits_on_what_verification_loads(bundle, tmp_path):
    """The limits admit real inputs: Gemma 3's tokenizer.json (about 33 MB, a 262k vocabulary, each merge a pair)
    and the files of a built bundle, checked well within the time a hostile input is given."""
    import time

    vocabulary = {f"▁token{i:06d}" + "x" * (i % 47): i for i in range(262_144)}
    names = list(vocabulary)
    tokenizer = {"version": "1.0", "added_tokens": [{"id": i, "content": f"<unused{i}>", "special": True}
                                                    for i in range(6_000)],
                 "normalizer": {"type": "Sequence", "normalizers": [{"type": "Replace", "pattern": {"String": " "},
                                                                     "content": "▁"}]},
                 "model": {"type": "BPE", "vocab": vocabulary, "merges": [[names[i], names[-i]]
                                                                          for i in range(262_144)]}}
    folder = tmp_path / "gemma-sized"
    shutil.copytree(bundle, folder)
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert (folder / "tokenizer.json").stat().st_size > 30e6
    started = time.monotonic()

    trust.refuse_unloadable_files(folder, manifest, shown=folder)

    assert time.monotonic() - started < 10


@pytest.mark.parametrize("recorded", ["/models/base\udcff", "/models/base\n", "/models/\x1b[31mbase"])
def test_recorded_sources_that_are_not_text_are_shown_escaped(recorded):
    """A proven manifest's `sources` is the sender's text: a path in it that is no printable text (a JSON escape of
    a byte that is not UTF-8, a control character) is shown escaped in the report's reason, which is printed."""
    from builder.verify import recorded_sources

    sources, reason = recorded_sources({"sources": {"base": recorded, "adapter": "/models/adapter"}})

    assert sources is None and reason is not None
    assert reason.isprintable() and reason.encode("utf-8")


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_bundles_runaway_template_is_refused_by_inspect_and_verify(bundle, command):
    """inspect renders a bundle's template for its end-of-turn token, verify every verification conversation: a
    template past a rendering limit is exit 2 naming it, whatever the rest of the bundle says."""
    template = bundle / "chat_template.jinja"
    template.write_text(f"{{# {command} #}}{{% for i in range(100000) %}}{{% for j in range(100000) %}}"
                        "{% endfor %}{% endfor %}", encoding="utf-8")
    arguments = [command, str(bundle)]
    if command == "verify":  # the sender's own bundle, consistently re-listed, as a hostile sender would send it
        rewrite_manifest(bundle)

    result = CliRunner().invoke(app, arguments)

    assert_user_error(result, 2, f"{template}: the chat template did not finish rendering within 2 s")
