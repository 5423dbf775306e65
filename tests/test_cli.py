"""The `modelpack` command: exact messages and stable exit codes (0 ok, 2 bad input, 3 verification failed)."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import builder
from builder.build import plan_from_spec
from builder.cli import app
from builder.report import failure_message, read_verification
from builder.spec import spec_json_schema
from helpers import make_base_model, write_spec

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def sources(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


def test_validate_accepts_a_good_spec(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("validate", spec)
    assert result.exit_code == 0, result.output
    assert result.output == f"{spec}: valid (merge, 6 tensors to merge)\n"


def test_dry_run_prints_the_plan_as_tables_and_writes_nothing(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("build", spec, "--dry-run")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    lines = [line.rstrip() for line in result.stdout.splitlines()]
    assert lines[0] == f"bundle tiny-med -> {tmp_path / 'dist' / 'tiny-med'}"
    assert lines[1:5] == [
        "┏━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┳━━━━━━━━━━┳━━━━━━━━┳━━━━━━━━┳━━━━━━┳━━━━━━━━━━━━━━━━━━━━━━━━━━┓",
        "┃ file                                   ┃     size ┃ merged ┃ copied ┃ cast ┃ from                     ┃",
        "┡━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━╇━━━━━━━━━━╇━━━━━━━━╇━━━━━━━━╇━━━━━━╇━━━━━━━━━━━━━━━━━━━━━━━━━━┩",
        "│ model.safetensors                      │ 403.7 KB │      6 │     20 │    0 │ weights (merge, float32) │",
    ]
    assert ("│ model.layers.0.self_attn.q_proj.weight │ [64, 64]  │ model.layers.0.self_attn.q_proj r=8 scale=2 │"
            in lines)
    assert re.fullmatch(r"disk: [\d.]+ [KMG]?B needed, [\d.]+ [KMG]?B free", lines[-8]), lines[-8]
    assert lines[-7:-1] == [
        "skipped: training leftovers optimizer.pt, rng_state.pth, trainer_state.json",
        "warning: adapter records base_model_name_or_path='/home/Work/train-machine/models/tiny-base', base.path is "
        "'qwen2-tied-float32'; shapes match, so packaging goes on",
        "verify: integrity: every file against manifest.json",
        "verify: serving: eos ids, chat template, special ids, vocabulary",
        "verify: equivalence: next-token logits of the bundle against base + adapter through peft",
        "verify: answers: 1 prompts (their expectations must hold), 0 probes (answers recorded), up to 8 new tokens "
        "each",
    ]
    assert lines[-1].startswith("verify: cost: 2 model loads, one model in memory at a time"), lines[-1]
    assert not (tmp_path / "dist").exists()

    plan = json.loads(run("build", spec, "--dry-run", "--json").stdout)
    assert plan["tensors"] == {"merged": 6, "copied": 20, "cast": 0}
    assert plan["files"][0] == {"name": "model.safetensors",
                                "bytes": sum(s.nbytes for s in plan_from_spec(spec).shards)}
    assert plan["verification"] == {"run": True, "checks": ["integrity", "serving", "equivalence", "answers"],
                                    "prompts": 1, "probes": 0, "max_new_tokens": 8, "model_loads": 2,
                                    "device": "auto"}
    assert plan["skipped_training_files"] == ["optimizer.pt", "rng_state.pth", "trainer_state.json"]
    assert plan["disk"]["needed"] < plan["disk"]["free"]
    assert not (tmp_path / "dist").exists()


def test_build_with_output_override(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("build", spec, "-o", tmp_path / "other", "--no-verify")
    assert result.exit_code == 0, result.output
    assert "not verified (--no-verify)" in result.output
    assert (tmp_path / "other" / "model.safetensors").is_file()
    assert not (tmp_path / "dist").exists()


def other_base(tmp_path: Path, **sizes) -> Path:
    return make_base_model(tmp_path / "other-base", arch="qwen2", tied=True, dtype=torch.float32, **sizes)


def _break_adapter_shape(tmp_path: Path, adapter: Path) -> Path:
    """A copy of the adapter whose config claims another rank than its tensors have."""
    broken = tmp_path / "broken-adapter"
    shutil.copytree(adapter, broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 4
    (broken / "adapter_config.json").write_text(json.dumps(config))
    return broken


# (id, how to make the bad input, expected exit code, expected message fragment)
ERROR_CASES = [
    ("missing-spec", lambda tmp, base, adapter: tmp / "nope.yaml", 2, "spec file not found"),
    (
        "unknown-key",
        lambda tmp, base, adapter: write_spec(tmp, base, adapter, generation={"tempreature": 0.5}),
        2,
        "generation.tempreature: unknown key 'tempreature'; did you mean 'temperature'?",
    ),
    (
        "missing-base",
        lambda tmp, base, adapter: write_spec(tmp, tmp / "no-such-model", adapter),
        2,
        "base.path: directory not found",
    ),
    (
        "rank-mismatch",
        lambda tmp, base, adapter: write_spec(tmp, base, _break_adapter_shape(tmp, adapter)),
        2,
        "tensors have rank 8 but adapter_config.json gives r=4",
    ),
    (
        "adapter-for-a-smaller-model",
        lambda tmp, base, adapter: write_spec(tmp, other_base(tmp, num_hidden_layers=1), adapter),
        2,
        "targets 'model.layers.1.mlp.down_proj.weight', which the base model at",
    ),
    (
        "adapter-for-a-narrower-model",
        lambda tmp, base, adapter: write_spec(tmp, other_base(tmp, hidden_size=32), adapter),
        2,
        "the LoRA update has shape [64, 128] but base tensor 'model.layers.0.mlp.down_proj.weight' has [32, 128]",
    ),
]


@pytest.mark.parametrize("case, make, exit_code, message", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_bad_input_exits_2_with_a_message_and_no_traceback(tmp_path, sources, case, make, exit_code, message):
    base, adapter = sources
    result = run("build", make(tmp_path, base, adapter), "--no-verify")
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ")


def test_verification_failure_exits_3_naming_prompt_expectation_and_answer(tmp_path, sources):
    spec = write_spec(tmp_path, *sources, verify={"prompts": [{"prompt": "你好", "expect": {"contains": ["缺钙"]}}]})
    result = run("build", spec)
    assert result.exit_code == 3, result.output
    assert "prompt '你好': expected contains '缺钙'; answered " in result.output
    assert not (tmp_path / "dist" / "tiny-med").exists()


def test_schema_command_matches_the_committed_schema():
    result = run("schema")
    assert result.exit_code == 0
    assert json.loads(result.output) == spec_json_schema()
    assert json.loads((REPO / "specs" / "modelpack.schema.json").read_text()) == spec_json_schema()


def test_build_prints_the_digest_that_the_card_and_report_carry_and_the_verify_command_accepts(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    built = run("build", spec)
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "dist" / "tiny-med"
    digest = "sha256:" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert built.stdout.endswith(f", verified; digest {digest}\n")
    assert json.loads((bundle / "verification.json").read_text())["digest"] == digest
    assert f"modelpack verify tiny-med --digest {digest}" in (bundle / "README.md").read_text()
    result = run("verify", bundle, "--digest", digest)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"verification passed (1 prompts, 0 probes), {digest} (digest)\n")
    result = run("verify", tmp_path)
    assert result.exit_code == 2
    assert "is not a modelpack bundle" in result.output


def test_build_shows_the_weights_progress_off_a_terminal_and_quiet_keeps_errors_only(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    result = run("build", spec, "--no-verify")
    assert result.exit_code == 0, result.output
    assert re.search(r"^weights: 403\.7 KB of 403\.7 KB, 26/26 tensors, [\d.]+ [KMG]?B/s, [\d.]+s$", result.stderr,
                     re.MULTILINE), result.stderr
    quiet = run("build", spec, "--no-verify", "--force", "--quiet")
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == ""
    assert quiet.stdout.startswith(f"built {tmp_path / 'dist' / 'tiny-med'} in ")


def test_weights_progress_counts_tensors_and_time_left_from_bytes(tmp_path, sources):
    from builder.console import WeightsProgress

    plan = plan_from_spec(write_spec(tmp_path, *sources))
    now = [100.0]
    progress = WeightsProgress(plan, clock=lambda: now[0])
    first = plan.shards[0].tensors[0].entry.nbytes
    progress.advance(first)
    now[0] += 2
    assert progress.tensors_done == 1
    left = (plan.weight_bytes - first) / (first / 2)
    assert progress.describe() == (f"weights: {first / 1000:.1f} KB of 403.7 KB, 1/26 tensors, "
                                   f"{first / 2000:.1f} KB/s, about {left:.0f}s left")
    progress.advance(plan.weight_bytes - first)
    now[0] += 10  # the other phases: the summary keeps the time the weights took
    rate = plan.weight_bytes / 2000
    assert progress.describe() == f"weights: 403.7 KB of 403.7 KB, 26/26 tensors, {rate:.1f} KB/s, 2.0s"


def test_json_results_for_ci(tmp_path, sources):
    spec = write_spec(tmp_path, *sources)
    valid = run("validate", spec, "--json")
    assert valid.exit_code == 0, valid.output
    assert json.loads(valid.stdout) == {"schema_version": 1, "ok": True, "spec": str(spec), "name": "tiny-med",
                                        "mode": "merge", "merged_tensors": 6, "warnings": [
                                            "adapter records base_model_name_or_path='/home/Work/train-machine/models/"
                                            "tiny-base', base.path is 'qwen2-tied-float32'; shapes match, so packaging "
                                            "goes on"]}
    built = run("build", spec, "--json", "--no-verify")
    assert built.exit_code == 0, built.output
    result = json.loads(built.stdout)
    bundle = tmp_path / "dist" / "tiny-med"
    assert result["bundle"] == str(bundle) and not result["verified"] and result["verification"] is None
    assert result["digest"] == "sha256:" + hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert set(result["timings"]) == {"write", "total"}
    inspected = json.loads(run("inspect", bundle, "--json").stdout)
    assert inspected["bundle"]["digest"] == result["digest"]
    failed = run("build", spec, "--json")  # the bundle exists and --force was not given
    assert failed.exit_code == 2
    error = json.loads(failed.stdout)
    assert error["ok"] is False and error["exit_code"] == 2 and "--force" in error["error"]
    refused = run("verify", bundle, "--digest", "sha256:" + "1" * 64, "--json")  # refused before anything runs
    assert refused.exit_code == 3
    assert json.loads(refused.stdout)["exit_code"] == 3


def test_a_failed_verification_goes_through_the_one_error_handler_with_its_report(tmp_path, sources):
    spec = write_spec(tmp_path, *sources, verify={"prompts": [{"prompt": "你好", "expect": {"equals": "impossible"}}]})
    failed = run("build", spec, "--json")
    assert failed.exit_code == 3
    error = json.loads(failed.stdout)
    assert set(error) == {"schema_version", "ok", "exit_code", "error"} and error["ok"] is False
    assert error["exit_code"] == 3
    assert error["error"].startswith("verification failed:\n  prompt '你好': expected equals 'impossible'")
    assert run("build", spec, "--no-verify").exit_code == 0
    verified = run("verify", tmp_path / "dist" / "tiny-med", "--json")  # verify's result is the report, failed too
    assert verified.exit_code == 3
    output = json.loads(verified.stdout)
    assert output.pop("schema_version") == 1  # the --json output's; the rest is the report
    report = read_verification(output)
    assert report["ok"] is False and report["bundle"] == "tiny-med" and report["equivalence"]["ok"]
    assert verified.stderr.endswith(f"\nerror: {failure_message(report)}\n")  # after the progress lines


def test_no_color_turns_colour_off_on_a_terminal(monkeypatch):
    import io

    from builder.console import Console

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert not Console(stream=Terminal()).rich.no_color
    monkeypatch.setenv("NO_COLOR", "1")
    assert Console(stream=Terminal()).rich.no_color


@pytest.mark.parametrize("args", [["--version", "--json"], ["--json", "--version"]])
def test_version_as_text_and_as_json(args):
    result = run("--version")
    assert (result.exit_code, result.stdout, result.stderr) == (0, f"modelpack {builder.__version__}\n", "")
    result = run(*args)
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == (f'{{\n  "schema_version": 1,\n  "ok": true,\n  "modelpack_version": '
                             f'"{builder.__version__}"\n}}\n')


def test_json_before_the_command_says_where_it_goes(tmp_path, sources):
    result = run("--json", "validate", write_spec(tmp_path, *sources))
    assert result.exit_code == 2
    assert "--json goes after the command: modelpack validate ... --json" in " ".join(result.stderr.split())


def modelpack_options() -> list[list[str]]:
    """The options of `modelpack` itself (before any command), each as its spellings."""
    import typer.main

    group = typer.main.get_command(app)
    context = group.make_context("modelpack", [], resilient_parsing=True)
    return [p.opts for p in group.get_params(context) if p.param_type_name == "option" and p.opts != ["--help"]]


def cli_commands() -> dict[str, list[list[str]]]:
    """Every command of the CLI and its options, each as its spellings (README's table must show one of them)."""
    import typer.main

    group = typer.main.get_command(app)
    context = group.make_context("modelpack", [], resilient_parsing=True)
    commands = {}
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        assert command is not None
        commands[name] = [p.opts for p in command.get_params(context)
                          if p.param_type_name == "option" and p.opts != ["--help"]]
    return commands


def test_every_command_help_has_an_example():
    for name in cli_commands():
        result = run(name, "--help")
        assert result.exit_code == 0, result.output
        assert f"Example: modelpack {name}" in " ".join(result.output.split()), f"{name} --help has no example"


def test_readme_command_table_matches_the_cli():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Commands\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for usage in re.findall(r"^\| `(modelpack [^`]*)` \|", section, re.MULTILINE):
        word = usage.split()[1]
        rows["" if word.startswith("-") else word] = usage  # `modelpack --version`: the options of modelpack itself
    commands = {"": modelpack_options(), **cli_commands()}
    assert sorted(rows) == sorted(commands), "README's command table and the CLI name different commands"
    for name, options in commands.items():
        shown = re.findall(r"(?<![\w-])--?[a-z][\w-]*", rows[name])
        for spellings in options:
            assert set(spellings) & set(shown), f"README's row for `modelpack {name}` does not show {spellings[-1]}"
        for written in shown:
            assert any(written in spellings for spellings in options), \
                f"README shows {written} for `modelpack {name}`, which has no such option"
