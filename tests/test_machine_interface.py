"""What scripts and CI rely on: every --json output against its committed schema, devices refused up front, checks
that did not run named (and failed with --strict), bundles whose bytes depend only on their inputs, and no path of the
build machine in any generated file."""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import torch
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec, run_file_path
from builder.cli import app
from builder.json_outputs import output_schemas
from builder.manifest import find_machine_paths, machine_paths
from helpers import tree_snapshot, valid_output, write_spec

REPO = Path(__file__).resolve().parents[1]


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_committed_schemas_match_the_outputs_shapes():
    for name, schema in output_schemas().items():
        committed = (REPO / "schemas" / f"{name}.schema.json").read_text(encoding="utf-8")
        assert json.loads(committed) == schema, (
            f"schemas/{name}.schema.json is stale; regenerate: python -m builder.json_outputs schemas")
        jsonschema.Draft202012Validator.check_schema(schema)
    assert {p.name for p in (REPO / "schemas").iterdir()} == {f"{n}.schema.json" for n in output_schemas()}


@pytest.fixture(scope="module")
def sources(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


@pytest.fixture(scope="module")
def without_llama_cpp(tmp_path_factory) -> Path:
    """A verifying interpreter that cannot import llama_cpp: the GGUF check does not run."""
    folder = tmp_path_factory.mktemp("no-llama-cpp")
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'llama_cpp':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n")
    python = folder / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={folder} exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return python


@pytest.fixture(scope="module")
def spec(tmp_path_factory, sources, without_llama_cpp) -> Path:
    return write_spec(tmp_path_factory.mktemp("interface"), *sources,
                      verify={"python": str(without_llama_cpp)}, export={"gguf": {"types": ["bf16"]}})


@pytest.fixture(scope="module")
def built(spec):
    """The spec built through the CLI with --json into dist/first: verified, but its GGUF file not run."""
    result = run("build", spec, "-o", spec.parent / "dist" / "first", "--json")
    assert result.exit_code == 0, result.output
    return result


def test_build_json_names_the_check_that_did_not_run_and_keeps_the_runs_figures_beside_the_bundle(built, spec):
    output = valid_output("build", built.stdout)
    bundle = spec.parent / "dist" / "first"
    assert output["ok"] and output["verified"] and output["not_run"] == ["gguf"]
    assert output["run_file"] == str(run_file_path(bundle)) == str(bundle.parent / "first.run.json")
    run_report = json.loads(run_file_path(bundle).read_text(encoding="utf-8"))
    assert run_report["digest"] == output["digest"] and run_report["verification"]["runtime"]["load_seconds"] > 0
    recorded = json.loads((bundle / "verification.json").read_text(encoding="utf-8"))
    jsonschema.validate(recorded, output_schemas()["verification"])
    assert recorded["format_version"] == 3 and "runtime" not in recorded
    assert "seconds" not in recorded["equivalence"] and "peak_rss_gb" not in recorded["equivalence"]


def test_the_final_line_names_every_check_that_did_not_run(spec):
    result = run("build", spec, "-o", spec.parent / "dist" / "plain", "--quiet")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().endswith("; not run: gguf (see the report)")
    assert ", verified; digest sha256:" in result.stdout


def test_strict_fails_a_build_and_a_verify_with_a_check_that_did_not_run(spec, built):
    dest = spec.parent / "dist" / "strict"
    result = run("build", spec, "-o", dest, "--strict")
    assert result.exit_code == 3, result.output
    assert "gguf did not run: llama-cpp-python is not installed in the verifying interpreter" in result.output
    assert not dest.exists()
    assert run("build", spec, "--strict", "--no-verify").exit_code == 2

    bundle = spec.parent / "dist" / "first"
    result = run("verify", bundle, "--python", _verify_python(spec), "--strict", "--json")
    assert result.exit_code == 3, result.output
    assert "gguf did not run" in result.output
    assert valid_output("verify", result.stdout)["skipped"][0]["check"] == "gguf"
    result = run("verify", bundle, "--python", _verify_python(spec), "--json")
    assert result.exit_code == 0, result.output
    assert valid_output("verify", result.stdout)["not_run"] == ["gguf"]


def _verify_python(spec: Path) -> str:
    import yaml

    return yaml.safe_load(spec.read_text(encoding="utf-8"))["verify"]["python"]


def test_two_builds_into_differently_named_folders_are_byte_identical(spec, built):
    second = build_bundle(plan_from_spec(spec, output_dir=spec.parent / "elsewhere" / "second-name")).bundle
    first = spec.parent / "dist" / "first"
    assert tree_snapshot(first) == tree_snapshot(second)
    card = (first / "README.md").read_text(encoding="utf-8")
    assert "vllm serve ./tiny-med" in card and "./first" not in card


@pytest.mark.parametrize("device", ["foo", "cuda:x", "gpu", "cuda:"])
def test_a_device_that_is_none_is_refused_before_any_work(spec, device, tmp_path):
    result = run("build", spec, "--device", device, "--dry-run", "--json")
    assert result.exit_code == 2, result.output
    assert valid_output("error", result.stdout)["error"].startswith(f"--device {device!r} is not a device")
    assert run("verify", tmp_path, "--device", device).exit_code == 2
    written = write_spec(tmp_path, *_sources_of(spec), verify={"device": device})
    assert run("validate", written).exit_code == 2


def _sources_of(spec: Path) -> tuple[Path, Path]:
    import yaml

    data = yaml.safe_load(spec.read_text(encoding="utf-8"))
    return (spec.parent / data["base"]["path"]).resolve(), (spec.parent / data["adapter"]["path"]).resolve()


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_load_py_takes_is_accepted(spec, device):
    assert run("build", spec, "--device", device, "--dry-run", "--json").exit_code == 0


def test_every_light_commands_json_validates(spec, sources, tmp_path):
    version = valid_output("version", run("--version", "--json").stdout)
    assert version["schema_version"] == 1
    assert valid_output("validate", run("validate", spec, "--json").stdout)["ok"]
    plan = valid_output("build-plan", run("build", spec, "--dry-run", "--json").stdout)
    assert plan["verification"]["checks"] == ["integrity", "serving", "equivalence", "answers", "gguf"]
    base, adapter = sources
    assert valid_output("inspect", run("inspect", base, "--json").stdout)["kind"] == "base model"
    assert valid_output("inspect", run("inspect", adapter, "--json").stdout)["kind"] == "adapter checkpoint"
    trainer = tmp_path / "run"
    (trainer / "checkpoint-5").mkdir(parents=True)
    for file in adapter.iterdir():
        if file.is_file():
            (trainer / "checkpoint-5" / file.name).write_bytes(file.read_bytes())
    found = valid_output("inspect", run("inspect", trainer, "--json").stdout)
    assert found["chosen_checkpoint"] == {"name": "checkpoint-5", "rule": "only", "reason": "the only checkpoint"}
    drafted = run("init", trainer / "checkpoint-5", "--base", base, "-o", tmp_path / "drafted.yaml", "--json")
    assert valid_output("init", drafted.stdout)["checkpoint"]["rule"] == "given", drafted.output
    missing = run("validate", tmp_path / "missing.yaml", "--json")
    assert missing.exit_code == 2 and valid_output("error", missing.stdout)["exit_code"] == 2


def test_inspect_and_sign_of_a_bundle_validate(built, spec, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    bundle = spec.parent / "dist" / "first"
    found = valid_output("inspect", run("inspect", bundle, "--json").stdout)
    assert found["bundle"]["files"] == len(json.loads((bundle / "manifest.json").read_text())["files"])
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert f"Files listed in manifest.json and checked against it: {found['bundle']['files']}." in card
    copy = tmp_path / "tiny-med"
    copy.mkdir()
    for path in bundle.rglob("*"):
        if path.is_file():
            (copy / path.relative_to(bundle)).parent.mkdir(parents=True, exist_ok=True)
            (copy / path.relative_to(bundle)).write_bytes(path.read_bytes())
    key = tmp_path / "private.pem"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    signed = run("sign", copy, "--key", key, "--json")
    assert signed.exit_code == 0, signed.output
    assert valid_output("sign", signed.stdout)["digest"] == json.loads(built.stdout)["digest"]


# ------------------------------------------------------------------------------ paths of the build machine

def test_the_machine_paths_cover_the_interpreter_prefix_home_temp_and_working_folder(tmp_path):
    paths = machine_paths([tmp_path / "base"], python=tmp_path / "venv" / "bin" / "python")
    for path in (sys.executable, sys.prefix, str(Path.home()), tempfile.gettempdir(), os.getcwd(),
                 str(tmp_path / "base"), str(tmp_path / "venv" / "bin" / "python")):
        assert os.path.abspath(path) in paths or os.path.abspath(path) in {"/", "/usr", "/usr/local"}, path
    assert "/" not in paths and "/usr" not in paths  # load.py's shebang, /usr/bin/env, names no machine


@pytest.mark.parametrize("planted", ["executable", "prefix", "home", "temp", "cwd"])
def test_a_planted_machine_path_is_caught_in_text_headers_and_gguf_metadata(tmp_path, planted):
    import gguf
    from safetensors.torch import save_file

    path = {"executable": sys.executable, "prefix": sys.prefix, "home": str(Path.home()),
            "temp": tempfile.gettempdir(), "cwd": os.getcwd()}[planted]
    paths = machine_paths([], python=sys.executable)
    bundle = tmp_path / "bundle"
    (bundle / "gguf").mkdir(parents=True)
    (bundle / "README.md").write_text(f"installed in {path}/bin\n")
    save_file({"w": torch.zeros(2)}, bundle / "model.safetensors", metadata={"origin": f"{path}/x"})
    writer = gguf.GGUFWriter(bundle / "gguf" / "m.gguf", "llama")
    writer.add_string("general.source.url", f"file://{path}/model")
    writer.add_token_list([f"{path}/token"])  # the vocabulary is the tokenizer's own text: not scanned
    writer.add_tensor("w", torch.zeros(4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (bundle / "tokenizer.json").write_text(f'{{"vocab": "{path}/copied"}}')  # copied byte for byte: not scanned
    found = find_machine_paths(bundle, paths, copied={"tokenizer.json"})
    assert {line.split(" mentions ")[0] for line in found} == {"README.md", "model.safetensors", "gguf/m.gguf"}
    for name in ("README.md", "model.safetensors", "gguf/m.gguf"):  # each names the planted path itself
        assert f"{name} mentions {os.path.abspath(path)}" in found, found
    # A path ends at a name character: /tmp is not in /tmpfs.
    (bundle / "README.md").write_text(f"{path}fs and {path}-other\n")
    assert "README.md" not in {line.split(" mentions ")[0] for line in find_machine_paths(bundle, [path], copied=set())}
