"""Hand-off through a real OCI registry (Debian's docker-registry, distribution 2.8.2, on a loopback port): a bundle
pushed as a ModelPack artifact pulls back byte-identical and proved; tampering, a wrong digest and hostile artifacts
are refused with nothing written; credentials come from a docker config; skopeo reads what was pushed."""

from __future__ import annotations

import base64
import fcntl
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import RegistryError
from builder.manifest import MANIFEST
from builder.model_artifact import (
    ARTIFACT_TYPE,
    CONFIG_MEDIA_TYPE,
    CONFIG_SCHEMA,
    DOC,
    OCI_MANIFEST,
    WEIGHT,
    WEIGHT_CONFIG,
    canonical_json,
    config_problems,
    describe_param_count,
    layer_media_type,
    sha256_digest,
)
from builder.registry import Credentials, RegistryClient, docker_credentials, parse_reference
from builder.trust import bundle_digest
from helpers import (
    environment_unavailable,
    heavy_imports_of,
    signing_key_pair,
    subprocess_env,
    tree_snapshot,
    valid_output,
)

REPO = Path(__file__).resolve().parents[1]
# model-spec v0.0.7's schema/config-schema.json, as its repository has it (commit 6440437b): the copy is exact.
MODEL_SPEC_CONFIG_SHA256 = "c755da7f78371519c09df7d92e74c7997184f5c73472be20d9dfb840d0ebbe0a"
USER, PASSWORD = "deployer", "s3cret-Pa55"


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


# ------------------------------------------------------------------------------ the registry

@dataclass
class Registry:
    host: str
    store: Path

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.store / "docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# Debian's packages for a real registry and an independent reader of it.
DEBIAN_PACKAGES = ["docker-registry", "skopeo"]


def debian_tool(program: str) -> str:
    """The path of one of DEBIAN_PACKAGES' programs, installed with apt-get on first use where the tests run as root
    (as CI does), the way the test venvs are made on first use; elsewhere it must be installed already."""
    found = shutil.which(program)
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        with open(Path(tempfile.gettempdir()) / "modelpack-test-apt.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits for one installer
            if shutil.which(program) is None:
                quiet = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
                for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *DEBIAN_PACKAGES]):
                    subprocess.run(command, env=quiet, capture_output=True, timeout=900)
        found = shutil.which(program)
    if found is None:
        environment_unavailable(f"{program} is not installed (apt-get install -y {' '.join(DEBIAN_PACKAGES)})")
    return found


def _start_registry(folder: Path, *, htpasswd: Path | None = None):
    """docker-registry on a free loopback port with a filesystem store in folder; (Registry, process)."""
    program = debian_tool("docker-registry")
    folder.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    auth = f"auth:\n  htpasswd:\n    realm: modelpack-test\n    path: {htpasswd}\n" if htpasswd else ""
    config = folder / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{folder / 'store'}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                      encoding="utf-8")
    with open(folder / "registry.log", "wb") as log:  # the registry keeps its own copy of the handle
        process = subprocess.Popen([program, "serve", str(config)], stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            break
        except urllib.error.HTTPError:  # 401 with auth on: it is up
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail("docker-registry did not start: " + (folder / "registry.log").read_text()[-2000:])
            time.sleep(0.05)
    return Registry(f"127.0.0.1:{port}", folder / "store"), process


def _stop(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture
def registry(tmp_path):
    """A fresh registry for each test (tests tamper with its storage)."""
    found, process = _start_registry(tmp_path / "registry-root")
    yield found
    _stop(process)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The shipped demo's bundle (its safetensors, both GGUF files, the card, the runtime), not verified here."""
    root = tmp_path_factory.mktemp("registry-bundle")
    return build_bundle(plan_from_spec(REPO / "specs" / "demo.yaml", output_dir=root / "qwen-tiny-med"),
                        verify=False).bundle


@pytest.fixture(autouse=True)
def no_docker_config(tmp_path, monkeypatch):
    """No test reads the docker config of the machine it runs on."""
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "no-docker-config"))


def _push(bundle: Path, reference: str) -> dict:
    result = run("push", bundle, reference, "--plain-http", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    return valid_output("push", result.stdout)


# ------------------------------------------------------------------------------ round trip

def test_a_pushed_bundle_pulls_back_by_digest_byte_identical_and_proved(registry, bundle, tmp_path):
    pushed = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    assert pushed["bundle_digest"] == bundle_digest(bundle)
    assert pushed["artifact"] == f"{registry.host}/models/tiny-med@{pushed['digest']}"
    files = json.loads((bundle / MANIFEST).read_text())["files"]
    assert pushed["layers"] == len(files) + 1 and pushed["uploaded"] == len(files) + 1

    again = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    assert again["digest"] == pushed["digest"] and again["uploaded"] == 0  # reproducible; blobs skipped (HEAD)

    dest = tmp_path / "deployed" / "qwen-tiny-med"
    result = run("pull", pushed["artifact"], dest, "--plain-http", "--json")
    assert result.exit_code == 0, result.output
    pulled = valid_output("pull", result.stdout)
    assert pulled["anchor"] == "artifact digest" and pulled["warnings"] == []
    assert pulled["bundle_digest"] == pushed["bundle_digest"] and pulled["files"] == len(files)
    assert tree_snapshot(dest) == tree_snapshot(bundle)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["qwen-tiny-med"]  # no staging or lock left beside it
    text = run("push", bundle, f"{registry.host}/models/tiny-med:v1", "--plain-http", "--quiet")
    assert text.stdout.strip() == f"pushed {bundle} ({pushed['bundle_digest']}): {pushed['artifact']}"


def test_a_tampered_bundle_is_refused_before_anything_is_pushed_and_a_change_during_the_push_too(
        registry, bundle, tmp_path, monkeypatch):
    copy = tmp_path / "copy" / bundle.name
    shutil.copytree(bundle, copy)
    (copy / "config.json").write_bytes((copy / "config.json").read_bytes().replace(b'"qwen2"', b'"qwen3"', 1))
    result = run("push", copy, f"{registry.host}/models/tiny-med:v1", "--plain-http")
    assert result.exit_code == 3 and "config.json: " in result.output, result.output
    assert not (registry.store / "docker").exists()  # not one blob sent
    # The registry checks every blob against the digest manifest.json recorded: a file written after the check
    # (the check is skipped here to plant one) is refused by it, and named.
    monkeypatch.setattr("builder.handoff.require_integrity", lambda bundle: None)
    result = run("push", copy, f"{registry.host}/models/tiny-med:v1", "--plain-http")
    assert result.exit_code == 3 and "config.json of" in result.output and "changed while it was being pushed" \
        in result.output, result.output


def test_a_pull_by_tag_proves_integrity_only_unless_given_the_bundle_digest(registry, bundle, tmp_path):
    pushed = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    result = run("pull", f"{registry.host}/models/tiny-med:v1", tmp_path / "a", "--plain-http")
    assert result.exit_code == 0, result.output
    assert "proves integrity only" in result.output and result.stdout.strip().endswith("integrity only")
    result = run("pull", f"{registry.host}/models/tiny-med:v1", tmp_path / "b", "--plain-http",
                 "--digest", pushed["bundle_digest"], "--json")
    assert result.exit_code == 0, result.output
    assert valid_output("pull", result.stdout)["anchor"] == "bundle digest"
    chunked = run("push", bundle, f"{registry.host}/models/chunked:v1", "--plain-http", "--chunk-mb", "1", "--json")
    assert chunked.exit_code == 0 and valid_output("push", chunked.stdout)["digest"] == pushed["digest"], chunked.output


def test_a_wrong_digest_is_refused_with_nothing_written(registry, bundle, tmp_path):
    pushed = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    other = "sha256:" + "1" * 64
    dest = tmp_path / "dest"
    result = run("pull", f"{registry.host}/models/tiny-med:v1", dest, "--plain-http", "--digest", other, "--json")
    assert result.exit_code == 3, result.output
    assert valid_output("error", result.stdout)["error"].count(other) == 1 and pushed["bundle_digest"] in result.output
    result = run("pull", f"{registry.host}/models/tiny-med@{other}", dest, "--plain-http")
    assert result.exit_code == 2 and "has no manifest" in result.output, result.output
    assert not dest.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".dest")]


def test_a_signed_bundle_pulls_proved_by_the_senders_key_and_is_refused_with_another(registry, bundle, tmp_path):
    signed = tmp_path / "signed" / bundle.name
    shutil.copytree(bundle, signed)
    private, public = signing_key_pair(tmp_path / "keys")
    _, stranger = signing_key_pair(tmp_path / "stranger")
    assert run("sign", signed, "--key", private).exit_code == 0
    pushed = _push(signed, f"{registry.host}/models/tiny-med:signed")
    result = run("pull", f"{registry.host}/models/tiny-med:signed", tmp_path / "other", "--plain-http",
                 "--public-key", stranger)
    assert result.exit_code == 3 and "signature check" in result.output, result.output
    assert not (tmp_path / "other").exists()
    result = run("pull", f"{registry.host}/models/tiny-med:signed", tmp_path / "ok", "--plain-http",
                 "--public-key", public, "--json")
    assert result.exit_code == 0, result.output
    assert valid_output("pull", result.stdout)["anchor"] == "signature" and pushed["layers"] == len(
        json.loads((bundle / MANIFEST).read_text())["files"]) + 2  # the signature travels inside the artifact
    assert tree_snapshot(tmp_path / "ok") == tree_snapshot(signed)


def test_a_blob_tampered_in_the_registrys_storage_is_refused_naming_the_file_and_both_digests(registry, bundle,
                                                                                             tmp_path):
    pushed = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    weights = json.loads((bundle / MANIFEST).read_text())["files"]["model.safetensors"]
    blob = registry.blob_file("sha256:" + weights["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF  # one bit flip in the last weight: the size stays the same
    blob.write_bytes(bytes(data))
    dest = tmp_path / "out" / "tiny-med"
    result = run("pull", pushed["artifact"], dest, "--plain-http")
    assert result.exit_code == 3, result.output
    assert "model.safetensors" in result.output and "sha256:" + weights["sha256"] in result.output
    assert sha256_digest(bytes(data)) in result.output
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_errors_for_an_unreachable_registry_a_missing_tag_and_a_bad_reference(registry, bundle, tmp_path):
    closed = f"127.0.0.1:{_free_port()}"
    result = run("pull", f"{closed}/models/x:v1", tmp_path / "x", "--plain-http")
    assert result.exit_code == 2 and f"cannot reach the registry {closed}" in result.output
    result = run("pull", f"{registry.host}/models/nothing:v9", tmp_path / "x", "--plain-http", "--json")
    assert result.exit_code == 2 and "has no tag v9" in valid_output("error", result.stdout)["error"]
    result = run("pull", f"{registry.host}/models/nothing:v9", tmp_path / "x")
    assert result.exit_code == 2 and "--plain-http" in result.output  # TLS to a plain registry says the fix
    assert run("push", bundle, "models/x:v1").exit_code == 2  # no registry host
    assert run("push", bundle, f"{registry.host}/Models/x:v1", "--plain-http").exit_code == 2
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ authentication

def _htpasswd(folder: Path) -> Path:
    import bcrypt

    path = folder / "htpasswd"
    path.write_bytes(USER.encode() + b":" + bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)) + b"\n")
    return path


def test_credentials_from_a_docker_config_in_home_authenticate_and_are_never_printed(bundle, tmp_path,
                                                                                     monkeypatch):
    found, process = _start_registry(tmp_path / "auth-root", htpasswd=_htpasswd(tmp_path))
    try:
        reference = f"{found.host}/models/tiny-med:v1"
        result = run("push", bundle, reference, "--plain-http")
        assert result.exit_code == 2 and "needs credentials" in result.output, result.output

        home = tmp_path / "home"
        (home / ".docker").mkdir(parents=True)
        monkeypatch.delenv("DOCKER_CONFIG")
        monkeypatch.setenv("HOME", str(home))
        config = home / ".docker" / "config.json"
        wrong = base64.b64encode(f"{USER}:not-it".encode()).decode()
        config.write_text(json.dumps({"auths": {found.host: {"auth": wrong}}}))
        result = run("push", bundle, reference, "--plain-http", "--json")
        assert result.exit_code == 2 and "not accepted" in result.output and "not-it" not in result.output

        config.write_text(json.dumps({"auths": {f"http://{found.host}": {
            "auth": base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()}}}))
        pushed = run("push", bundle, reference, "--plain-http", "--json")
        assert pushed.exit_code == 0, pushed.output
        artifact = valid_output("push", pushed.stdout)["artifact"]
        pulled = run("pull", artifact, tmp_path / "pulled", "--plain-http")
        assert pulled.exit_code == 0, pulled.output
        assert tree_snapshot(tmp_path / "pulled") == tree_snapshot(bundle)
        for output in (pushed.output, pulled.output):
            assert PASSWORD not in output and base64.b64encode(PASSWORD.encode()).decode() not in output
    finally:
        _stop(process)


def test_a_credential_helper_answers_for_its_registry(tmp_path, monkeypatch):
    helper = tmp_path / "bin" / "docker-credential-fake"
    helper.parent.mkdir()
    helper.write_text('#!/bin/sh\nread server\n[ "$server" = "reg.example:5000" ] || exit 1\n'
                      'echo \'{"ServerURL": "reg.example:5000", "Username": "u", "Secret": "from-helper"}\'\n')
    helper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{helper.parent}{os.pathsep}{os.environ['PATH']}")
    folder = tmp_path / "docker"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"credHelpers": {"reg.example:5000": "fake"}}))
    found = docker_credentials("reg.example:5000", environ={"DOCKER_CONFIG": str(folder)})
    assert found is not None and (found.username, found.secret) == ("u", "from-helper")
    assert "from-helper" not in repr(found)
    assert docker_credentials("other.example", environ={"DOCKER_CONFIG": str(folder)}) is None


# ------------------------------------------------------------------------------ an independent reader

def test_skopeo_sees_the_artifact_type_the_config_and_one_layer_per_file(registry, bundle, tmp_path):
    skopeo = debian_tool("skopeo")
    pushed = _push(bundle, f"{registry.host}/models/tiny-med:v1")
    raw = subprocess.run([skopeo, "inspect", "--raw", "--tls-verify=false",
                          f"docker://{registry.host}/models/tiny-med:v1"], capture_output=True, check=True).stdout
    assert sha256_digest(raw) == pushed["digest"]
    manifest = json.loads(raw)
    assert manifest["artifactType"] == ARTIFACT_TYPE and manifest["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    files = sorted([*json.loads((bundle / MANIFEST).read_text())["files"], MANIFEST])
    assert [layer["annotations"]["org.cncf.model.filepath"] for layer in manifest["layers"]] == files
    assert all(layer["annotations"]["org.opencontainers.image.title"] == layer["annotations"][
        "org.cncf.model.filepath"] for layer in manifest["layers"])
    by_path = {layer["annotations"]["org.cncf.model.filepath"]: layer for layer in manifest["layers"]}
    assert by_path["model.safetensors"]["mediaType"] == WEIGHT
    assert by_path["model.safetensors"]["digest"] == "sha256:" + json.loads(
        (bundle / MANIFEST).read_text())["files"]["model.safetensors"]["sha256"]  # the layer digest is the file's
    assert by_path["config.json"]["mediaType"] == WEIGHT_CONFIG and by_path[MANIFEST]["mediaType"] == DOC

    layout = tmp_path / "oci"
    subprocess.run([skopeo, "copy", "--src-tls-verify=false", f"docker://{registry.host}/models/tiny-med:v1",
                    f"oci:{layout}:v1"], capture_output=True, check=True)
    index = json.loads((layout / "index.json").read_text())
    assert index["manifests"][0]["digest"] == pushed["digest"]
    config = json.loads((layout / "blobs/sha256" / manifest["config"]["digest"].split(":")[1]).read_text())
    assert config_problems(config) == []
    assert config["descriptor"]["name"] == json.loads((bundle / MANIFEST).read_text())["name"]
    assert config["descriptor"]["version"] == "v1" and config["descriptor"]["family"] == "qwen2"
    assert config["config"]["format"] == "safetensors" and config["config"]["precision"] == "bfloat16"
    assert config["config"]["paramSize"] == "627K" and config["descriptor"]["licenses"] == ["Apache-2.0"]
    assert config["modelfs"]["diffIds"] == [layer["digest"] for layer in manifest["layers"]]
    for layer in manifest["layers"]:  # every file, byte for byte, in the copy
        path = bundle / layer["annotations"]["org.cncf.model.filepath"]
        assert (layout / "blobs/sha256" / layer["digest"].split(":")[1]).read_bytes() == path.read_bytes()


# ------------------------------------------------------------------------------ hostile artifacts

def _hand_pushed(registry: Registry, tag: str, paths: list[str], *, config: bytes | None = None,
                 manifest_padding: int = 0) -> str:
    """An artifact pushed by hand: one tiny blob per path (the same content), a valid config unless given."""
    client = RegistryClient(parse_reference(f"{registry.host}/models/hostile:{tag}"), plain_http=True, push=True)
    blob = b"payload\n"
    client.upload_bytes(sha256_digest(blob), blob)
    layers = [{"mediaType": DOC, "digest": sha256_digest(blob), "size": len(blob),
               "annotations": {"org.cncf.model.filepath": path, "org.opencontainers.image.title": path}}
              for path in paths]
    if config is None:
        config = canonical_json({"descriptor": {"name": "x"}, "config": {},
                                 "modelfs": {"type": "layers", "diffIds": [sha256_digest(blob)] * len(paths)}})
    client.upload_bytes(sha256_digest(config), config)
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
                "config": {"mediaType": CONFIG_MEDIA_TYPE, "digest": sha256_digest(config), "size": len(config)},
                "layers": layers, "annotations": {"padding": "x" * manifest_padding}}
    client.put_manifest(tag, canonical_json(manifest), OCI_MANIFEST)
    client.close()
    return f"{registry.host}/models/hostile:{tag}"


@pytest.mark.parametrize("paths, culprit", [
    (["../escaped.txt"], "layer 0 (../escaped.txt): not a file name inside the bundle"),
    (["/tmp/absolute.txt"], "layer 0 (/tmp/absolute.txt): not a file name inside the bundle"),
    (["a.txt", "sub/../a.txt"], "not a file name inside the bundle"),
    (["a.txt", "a.txt"], "layer 1 (a.txt): the path appears twice"),
    (["README.md", "readme.MD"], "layer 1 (readme.MD): the path appears twice (as 'README.md' too)"),
    (["sub", "sub/x.txt"], "sub: is a file and a folder"),
])
def test_hostile_artifact_paths_are_refused_before_anything_is_written(registry, tmp_path, paths, culprit):
    reference = _hand_pushed(registry, "evil", paths)
    dest = tmp_path / "land" / "dest"
    result = run("pull", reference, dest, "--plain-http")
    assert result.exit_code == 3, result.output
    assert culprit in result.output and "refused before anything was written" in result.output
    assert not (tmp_path / "land").exists() and not (tmp_path / "escaped.txt").exists()


def test_oversized_manifests_and_configs_and_off_schema_configs_are_refused(registry, tmp_path, monkeypatch):
    dest = tmp_path / "land" / "dest"
    # docker-registry itself stores no manifest over 4 MiB, modelpack's limit: the limit is lowered to plant one.
    monkeypatch.setattr("builder.handoff.MAX_MANIFEST_BYTES", 64 << 10)
    huge = _hand_pushed(registry, "huge-manifest", ["a.txt"], manifest_padding=100 << 10)
    result = run("pull", huge, dest, "--plain-http")
    assert result.exit_code == 3 and f"over the limit of {64 << 10}" in result.output, result.output
    big_config = canonical_json({"descriptor": {"name": "x", "description": "y" * (1 << 20)}, "config": {},
                                 "modelfs": {"type": "layers", "diffIds": ["sha256:" + "0" * 64]}})
    result = run("pull", _hand_pushed(registry, "huge-config", ["a.txt"], config=big_config), dest, "--plain-http")
    assert result.exit_code == 3 and "its config is" in result.output and "over the limit" in result.output
    extra = canonical_json({"descriptor": {"name": "x"}, "config": {}, "lora": {"rank": 8},
                            "modelfs": {"type": "layers", "diffIds": ["sha256:" + "0" * 64]}})
    result = run("pull", _hand_pushed(registry, "extra", ["a.txt"], config=extra), dest, "--plain-http")
    assert result.exit_code == 3 and "Additional properties are not allowed ('lora'" in result.output
    assert not (tmp_path / "land").exists()


# ------------------------------------------------------------------------------ the artifact's pure parts

def test_the_committed_config_schema_is_model_specs_own():
    import hashlib

    assert hashlib.sha256(CONFIG_SCHEMA.read_bytes()).hexdigest() == MODEL_SPEC_CONFIG_SHA256


SPEC_EXAMPLE = {  # docs/config.md of model-spec v0.0.7, less capabilities' fields the v0.0.7 schema ignores
    "descriptor": {"createdAt": "2025-01-01T00:00:00Z", "authors": ["xyz@xyz.com"], "vendor": "XYZ Corp.",
                   "family": "xyz3", "name": "xyz-3-8B-Instruct", "version": "3.1", "title": "XYZ 3 8B Instruct",
                   "description": "xyz is a large language model.", "docURL": "https://www.xyz.com/get-started/",
                   "sourceURL": "https://github.com/xyz/xyz3", "revision": "1234567890", "licenses": ["Apache-2.0"]},
    "config": {"architecture": "transformer", "format": "pytorch", "paramSize": "8b", "precision": "fp16",
               "quantization": "gptq", "capabilities": {"inputTypes": ["text"], "outputTypes": ["text", "image"],
                                                        "knowledgeCutoff": "2024-05-21T00:00:00Z",
                                                        "reasoning": True, "toolUsage": False}},
    "modelfs": {"type": "layers", "diffIds": ["sha256:" + "12" * 32, "sha256:" + "ab" * 32]},
}


@pytest.mark.parametrize("change, culprit", [  # schema/config_test.go's expected failures
    (lambda c: c.pop("config"), "'config' is a required property"),
    (lambda c: c["descriptor"].update(version=3.1), "descriptor.version"),
    (lambda c: c["descriptor"].update(createdAt="2025/01/01T00:00:00Z"), "descriptor.createdAt"),
    (lambda c: c["descriptor"].update(licenses="Apache-2.0"), "descriptor.licenses"),
    (lambda c: c["config"].update(paramSize=8), "config.paramSize"),
    (lambda c: c["modelfs"].update(diffIds=[]), "modelfs.diffIds"),
    (lambda c: c["descriptor"].update(name=""), "descriptor.name"),
    (lambda c: c.update(lora={}), "Additional properties are not allowed ('lora'"),
])
def test_the_config_schema_accepts_the_specs_example_and_refuses_its_counter_examples(change, culprit):
    assert config_problems(SPEC_EXAMPLE) == []
    broken = json.loads(json.dumps(SPEC_EXAMPLE))
    change(broken)
    assert any(culprit in problem for problem in config_problems(broken)), config_problems(broken)


@pytest.mark.parametrize("path, media_type", [
    ("model-00001-of-00002.safetensors", WEIGHT), ("gguf/m-q8_0.gguf", WEIGHT), ("config.json", WEIGHT_CONFIG),
    ("tokenizer.json", WEIGHT_CONFIG), ("chat_template.jinja", WEIGHT_CONFIG), ("qwen.tiktoken", WEIGHT_CONFIG),
    ("adapter/adapter_config.json", WEIGHT_CONFIG), ("README.md", DOC), (MANIFEST, DOC), ("model.sig", DOC),
    ("verification.json", DOC), ("load.py", "application/vnd.cncf.model.code.v1.raw"),
    ("modeling_qwen.py", "application/vnd.cncf.model.code.v1.raw"),
])
def test_each_bundle_file_gets_its_modelpack_layer_type(path, media_type):
    assert layer_media_type(path) == media_type


@pytest.mark.parametrize("count, shown", [(626_432, "626K"), (12_345, "12.3K"), (494_032_768, "494M"),
                                          (7_721_324_544, "7.7B"), (1_543_714_304, "1.5B"), (999, "999")])
def test_parameter_counts_read_as_model_names_write_them(count, shown):
    assert describe_param_count(count) == shown


@pytest.mark.parametrize("text", ["localhost:5000/a:v1", "reg.example/a/b/c@sha256:" + "a" * 64])
def test_references_parse_and_print_back(text):
    assert str(parse_reference(text)) == text


@pytest.mark.parametrize("text", ["a/b:v1", "reg.example/B:v1", "reg.example/a:-v", "reg.example/a@sha256:12"])
def test_malformed_references_are_refused(text):
    with pytest.raises(RegistryError):
        parse_reference(text)


def test_a_blob_longer_than_its_descriptor_is_cut_and_refused(registry, tmp_path):
    client = RegistryClient(parse_reference(f"{registry.host}/models/x:v1"), plain_http=True, push=True)
    data = b"0123456789"
    client.upload_bytes(sha256_digest(data), data)
    with open(tmp_path / "out", "wb") as file:
        found = client.download_blob(sha256_digest(data), 4, file)
    client.close()
    assert found[1] == 5 and (tmp_path / "out").stat().st_size <= 4


# ------------------------------------------------------------------------------ as a deployment runs it

def test_push_and_pull_in_a_fresh_process_import_no_torch_transformers_or_peft(registry, bundle, tmp_path):
    reference = f"{registry.host}/models/tiny-med:v1"
    for args in (["push", str(bundle), reference, "--plain-http"],
                 ["pull", reference, str(tmp_path / "pulled"), "--plain-http"]):
        found, output = heavy_imports_of(args)
        assert found == {"exit": 0, "heavy": []}, output
    assert tree_snapshot(tmp_path / "pulled") == tree_snapshot(bundle)


# ------------------------------------------------------------------------------ transport, against an in-process fake

class _FakeRegistry(http.server.BaseHTTPRequestHandler):
    """Answers from the class's `routes`: (method, path) -> list of (status, headers, body), one per call (the last
    repeats); records every request's method, path and Authorization header in `seen`."""

    routes: dict = {}
    seen: list = []

    def _answer(self) -> None:
        path = self.path.split("?")[0]
        self.seen.append((self.command, path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        answers = self.routes.get((self.command, path)) or [(404, {}, b"")]
        status, headers, body = answers.pop(0) if len(answers) > 1 else answers[0]
        if callable(body):
            status, body = body(self)
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeRegistry)
    _FakeRegistry.routes, _FakeRegistry.seen = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{server.server_address[1]}", _FakeRegistry
    server.shutdown()
    server.server_close()


def test_transient_failures_are_retried_with_backoff_and_then_reported(fake):
    host, handler = fake
    manifest = b'{"schemaVersion": 2}'
    handler.routes = {("GET", "/v2/"): [(200, {}, b"{}")],
                      ("GET", "/v2/m/manifests/v1"): [(503, {}, b""), (502, {}, b""), (200, {}, manifest)],
                      ("GET", "/v2/m/manifests/v2"): [(503, {}, b'{"errors": [{"code": "UNAVAILABLE"}]}')]}
    slept: list[float] = []
    client = RegistryClient(parse_reference(f"{host}/m:v1"), plain_http=True, sleep=slept.append)
    assert client.get_manifest("v1", max_bytes=1000) == manifest and slept == [0.5, 1.0]
    with pytest.raises(RegistryError, match="answered 503 .*UNAVAILABLE"):
        client.get_manifest("v2", max_bytes=1000)
    assert slept[2:] == [0.5, 1.0, 2.0, 4.0]


def test_a_bearer_challenge_gets_a_token_from_the_realm_with_the_docker_configs_credentials(fake):
    host, handler = fake
    basic = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def token(request):
        return (200, b'{"token": "t0ken"}') if request.headers.get("Authorization") == basic else (401, b"")

    def ping(request):
        return (200, b"{}") if request.headers.get("Authorization") == "Bearer t0ken" else (401, b"")

    challenge = {"WWW-Authenticate": f'Bearer realm="http://{host}/token",service="fake"'}
    handler.routes = {("GET", "/v2/"): [(401, challenge, ping)], ("GET", "/token"): [(200, {}, token)],
                      ("HEAD", "/v2/m/blobs/sha256:" + "a" * 64): [(200, {}, b"")]}
    client = RegistryClient(parse_reference(f"{host}/m:v1"), plain_http=True, push=True,
                            credentials=_credentials())
    assert client.has_blob("sha256:" + "a" * 64)
    assert handler.seen[-1] == ("HEAD", "/v2/m/blobs/sha256:" + "a" * 64, "Bearer t0ken")
    with pytest.raises(RegistryError, match="needs credentials"):
        RegistryClient(parse_reference(f"{host}/m:v1"), plain_http=True)


def _credentials() -> Credentials:
    return Credentials(USER, PASSWORD)


def test_a_redirected_blob_is_fetched_without_our_credentials_and_hashed(fake, tmp_path):
    host, handler = fake
    data = b"weights" * 1000
    digest = sha256_digest(data)
    handler.routes = {("GET", "/v2/"): [(200, {}, b"{}")],
                      ("GET", f"/v2/m/blobs/{digest}"): [(307, {"Location": f"http://{host}/cdn/blob"}, b"")],
                      ("GET", "/cdn/blob"): [(200, {}, data)]}
    client = RegistryClient(parse_reference(f"{host}/m:v1"), plain_http=True, credentials=_credentials())
    with open(tmp_path / "blob", "wb") as file:
        assert client.download_blob(digest, len(data), file) == (digest, len(data))
    assert (tmp_path / "blob").read_bytes() == data
    assert handler.seen[-1] == ("GET", "/cdn/blob", None)


def test_a_chunked_upload_stores_the_same_blob(registry, tmp_path):
    client = RegistryClient(parse_reference(f"{registry.host}/models/x:v1"), plain_http=True, push=True)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(10_000))
    digest = sha256_digest(source.read_bytes())
    client.upload_blob(digest, 10_000, lambda: open(source, "rb"), chunk_bytes=3_000)
    assert registry.blob_file(digest).read_bytes() == source.read_bytes()
    assert client.has_blob(digest)
    client.close()


# ------------------------------------------------------------------------------ scale

def _bundle_with_a_big_shard(folder: Path, nbytes: int) -> Path:
    """A bundle's shape around one bfloat16 safetensors shard of nbytes (a sparse file: zeros cost no disk here,
    though the registry and the pull write every byte), sealed like a build seals it."""
    from builder.manifest import write_manifest
    from builder.runtime.bundle_check import DIGEST_PLACEHOLDER
    from builder.trust import BUNDLE_RUNTIME, seal

    bundle = folder / "big"
    bundle.mkdir(parents=True)
    count = nbytes // 2
    header = json.dumps({"w": {"dtype": "BF16", "shape": [count], "data_offsets": [0, 2 * count]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(bundle / "model.safetensors", "wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        file.truncate(8 + len(header) + 2 * count)
    (bundle / "config.json").write_text('{"model_type": "qwen2"}')
    (bundle / "modelpack_bundle.json").write_text('{"dtype": "bfloat16"}')
    (bundle / "README.md").write_text(f"# big\n\nBundle digest: {DIGEST_PLACEHOLDER}\n")
    for name in BUNDLE_RUNTIME:
        shutil.copy(REPO / "builder" / "runtime" / name, bundle / name)
    write_manifest(bundle, {"generator": "modelpack", "name": "big", "mode": "merge"})
    seal(bundle)
    return bundle


# Runs a command and reports its peak RSS. Through this small interpreter, not from pytest's: a child forked from a
# process counts that process's memory at the fork in its own peak.
RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")


def _peak_rss_mib(args: list[str]) -> tuple[float, str]:
    """Run modelpack in a fresh process; its peak RSS in MiB and its output."""
    done = subprocess.run([sys.executable, "-c", RSS_WRAPPER, sys.executable, "-m", "builder", *args], cwd=REPO,
                          env=subprocess_env(), capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    output, _, peak = done.stdout.rpartition("PEAK_RSS_KB ")
    return int(peak) / 1024, output


@pytest.mark.slow
def test_push_and_pull_of_a_2gb_shard_stay_under_200mb_of_rss(registry, tmp_path):
    bundle = _bundle_with_a_big_shard(tmp_path / "in", 2_050_000_000)
    push_rss, output = _peak_rss_mib(["push", str(bundle), f"{registry.host}/models/big:v1", "--plain-http",
                                      "--json", "--quiet"])
    artifact = json.loads(output[output.index("{"):])["artifact"]
    pull_rss, _ = _peak_rss_mib(["pull", artifact, str(tmp_path / "pulled"), "--plain-http", "--quiet"])
    assert push_rss < 200 and pull_rss < 200, (push_rss, pull_rss)
    assert (tmp_path / "pulled" / "model.safetensors").stat().st_size == (bundle / "model.safetensors").stat().st_size


def test_a_manifest_that_is_not_the_digest_asked_for_is_refused(fake, tmp_path):
    host, handler = fake
    asked = "sha256:" + "ab" * 32
    served = b'{"schemaVersion": 2}'
    handler.routes = {("GET", "/v2/"): [(200, {}, b"{}")], ("GET", f"/v2/m/manifests/{asked}"): [(200, {}, served)]}
    result = run("pull", f"{host}/m@{asked}", tmp_path / "dest", "--plain-http")
    assert result.exit_code == 3, result.output
    assert f"served a manifest whose digest is {sha256_digest(served)}, not the {asked}" in result.output
    assert not (tmp_path / "dest").exists()
