"""`modelpack init`: from a checkpoint folder to a commented spec that validates and builds, asserted as written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from builder.chat import default_system_prompt
from builder.cli import app
from builder.spec import load_spec
from helpers import CHATML_TEMPLATE, assert_user_error, qwen_base

REPO = Path(__file__).resolve().parents[1]


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """A copy of the repo's demo inputs, with the current folder beside them (as a user's project would be)."""
    shutil.copytree(REPO / "demo", tmp_path / "demo")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "demo"


DEMO_SPEC = """\
# Drafted by `modelpack init` from ../demo/checkpoint-200: LoRA r=8, alpha=16 on down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj.
# Paths are relative to this file. Read every value, then: modelpack build specs/demo.yaml
name: demo
base:
  path: ../demo/base              # Qwen2ForCausalLM, 626.7K parameters, float32
  trust_remote_code: false        # the base ships no model code
adapter:
  path: ../demo/checkpoint-200    # trained on Qwen2-tiny-demo, recorded in adapter_config.json
output:
  dir: ../dist/demo
  mode: merge                     # merge: one set of weights, loads without peft; separate: base + adapter/
  dtype: float32                  # the base's own dtype
  max_shard_size: 5GB
generation: {}                    # the base sets no defaults: add do_sample, temperature, max_new_tokens...
chat:
  system_prompt: null             # the chat template has no default; load.py's chat() sends this one when set
card:
  description: null               # a paragraph for the model card: what was tuned, on which data
  base_model: null                # the base's Hub id (org/name), if it has one; a folder name is not one
  license: null                   # e.g. apache-2.0; the base's terms apply
  language: []
  tags: [lora]
  intended_use: null
  limitations: null
verify:
  max_new_tokens: 64
  prompts:                        # must pass; add `expect: {contains: [...]}` with what the answer must hold
    - prompt: Replace this with a question from your fine-tuning data
  probes:                         # general skills: answers are recorded in the card
    - prompt: Hello! Who are you?
    - prompt: What is machine learning? Answer in one sentence.
"""  # noqa: E501


def test_init_on_the_demo_checkpoint_writes_a_spec_that_validates_and_builds(demo):
    result = run("init", "demo/checkpoint-200", "--base", "demo/base")
    assert result.exit_code == 0, result.output
    assert result.stdout == "wrote specs/demo.yaml; check it, then: modelpack build specs/demo.yaml\n"
    assert result.stderr == "checkpoint: demo/checkpoint-200 (the folder given)\nbase: demo/base (from --base)\n"
    assert Path("specs/demo.yaml").read_text(encoding="utf-8") == DEMO_SPEC

    assert run("validate", "specs/demo.yaml").exit_code == 0
    built = run("build", "specs/demo.yaml", "--no-verify")
    assert built.exit_code == 0, built.output
    assert (demo.parent / "dist" / "demo" / "model.safetensors").is_file()


def test_init_without_a_base_on_this_machine_names_the_option(demo):
    result = run("init", "demo/checkpoint-200")
    assert_user_error(result, 2, "records the base '/home/Work/muyu_qwen/models/qwen/Qwen2-tiny-demo', which is not "
                                 "a model folder on this machine; give the base model's folder with --base PATH")
    assert not Path("specs").exists()


def test_init_refuses_to_overwrite_a_spec_without_force(demo):
    Path("specs").mkdir()
    Path("specs/mine.yaml").write_text("name: mine\n")
    result = run("init", "demo/checkpoint-200", "--base", "demo/base", "-o", "specs/mine.yaml")
    assert_user_error(result, 2, "specs/mine.yaml already exists; choose another file with -o, or replace it with "
                                 "--force")
    assert Path("specs/mine.yaml").read_text() == "name: mine\n"
    result = run("init", "demo/checkpoint-200", "--base", "demo/base", "-o", "specs/mine.yaml", "--force")
    assert result.exit_code == 0, result.output
    assert Path("specs/mine.yaml").read_text().startswith("# Drafted by `modelpack init`")
    assert "\nname: mine\n" in Path("specs/mine.yaml").read_text()


def test_a_folder_that_is_no_checkpoint_is_refused(demo):
    assert_user_error(run("init", "demo/base"), 2, "checkpoint demo/base: no adapter_config.json and no checkpoint-N "
                                                   "folder with one")


@pytest.fixture(scope="module")
def trainer_inputs(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


def trainer_run(root: Path, base_fixture: Path, adapter: Path, *, best: str | None) -> tuple[Path, Path]:
    """A base folder and a Trainer output folder with checkpoint-10/20/30 (as a training run leaves them), whose
    adapters record the base's path on this machine; `best` goes into the last checkpoint's trainer_state.json."""
    base = shutil.copytree(base_fixture, root / "models" / "tiny-base")
    run_folder = root / "output" / "med-lora"
    for step in (10, 20, 30):
        checkpoint = shutil.copytree(adapter, run_folder / f"checkpoint-{step}")
        config = json.loads((checkpoint / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(base)
        (checkpoint / "adapter_config.json").write_text(json.dumps(config))
        state = {"global_step": step, "best_metric": 0.4321 if best else None,
                 "best_model_checkpoint": f"/train/machine/output/med-lora/{best}" if best else None}
        (checkpoint / "trainer_state.json").write_text(json.dumps(state))
    return base, run_folder


TRAINER_SPEC = """\
# Drafted by `modelpack init` from ../output/med-lora/checkpoint-20: LoRA r=8, alpha=16 on down_proj, q_proj, v_proj.
# Paths are relative to this file. Read every value, then: modelpack build specs/med-lora.yaml
name: med-lora
base:
  path: ../models/tiny-base       # Qwen2ForCausalLM, 100.9K parameters, float32
  trust_remote_code: false        # the base ships no model code
adapter:
  path: ../output/med-lora/checkpoint-20  # trained on the base above
output:
  dir: ../dist/med-lora
  mode: merge                     # merge: one set of weights, loads without peft; separate: base + adapter/
  dtype: float32                  # the base's own dtype
  max_shard_size: 5GB
generation:                       # the base's generation_config.json; change what the bundle should use
  do_sample: true
  temperature: 0.7
chat:
  system_prompt: null             # the chat template has no default; load.py's chat() sends this one when set
card:
  description: null               # a paragraph for the model card: what was tuned, on which data
  base_model: null                # the base's Hub id (org/name), if it has one; a folder name is not one
  license: null                   # e.g. apache-2.0; the base's terms apply
  language: []
  tags: [lora]
  intended_use: null
  limitations: null
verify:
  max_new_tokens: 64
  prompts:                        # must pass; add `expect: {contains: [...]}` with what the answer must hold
    - prompt: Replace this with a question from your fine-tuning data
  probes:                         # general skills: answers are recorded in the card
    - prompt: Hello! Who are you?
    - prompt: What is machine learning? Answer in one sentence.
"""


def test_init_on_a_trainer_output_picks_the_best_checkpoint_and_finds_the_recorded_base(
        tmp_path, monkeypatch, trainer_inputs):
    base, run_folder = trainer_run(tmp_path, *trainer_inputs, best="checkpoint-20")
    monkeypatch.chdir(tmp_path)
    result = run("init", "output/med-lora")
    assert result.exit_code == 0, result.output
    assert result.stderr == (
        "checkpoint: output/med-lora/checkpoint-20 (the best of 3 checkpoints by checkpoint-30/trainer_state.json "
        "(best_model_checkpoint, best_metric 0.4321))\n"
        f"base: {base} (recorded in adapter_config.json)\n"
    )
    assert Path("specs/med-lora.yaml").read_text(encoding="utf-8") == TRAINER_SPEC
    built = run("build", "specs/med-lora.yaml", "--no-verify")
    assert built.exit_code == 0, built.output
    assert (tmp_path / "dist" / "med-lora" / "model.safetensors").is_file()


def test_init_on_a_trainer_output_without_a_best_checkpoint_takes_the_last(tmp_path, monkeypatch, trainer_inputs):
    trainer_run(tmp_path, *trainer_inputs, best=None)
    monkeypatch.chdir(tmp_path)
    result = run("init", "output/med-lora", "-o", "elsewhere/run.yaml")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("checkpoint: output/med-lora/checkpoint-30 (the last of 3 checkpoints (highest "
                                    "step); trainer_state.json names no best checkpoint)\n")
    text = Path("elsewhere/run.yaml").read_text()
    assert "name: run\n" in text and "  path: ../output/med-lora/checkpoint-30  # trained on the base above\n" in text
    assert run("validate", "elsewhere/run.yaml").exit_code == 0


def test_a_base_that_ships_code_gets_trust_remote_code_with_the_files_named(tmp_path, monkeypatch, trainer_inputs):
    base = qwen_base(tmp_path / "qwen")
    _, adapter = trainer_inputs  # init reads the adapter's config only: any checkpoint folder will do
    checkpoint = shutil.copytree(adapter, tmp_path / "run" / "checkpoint-5")
    monkeypatch.chdir(tmp_path)
    result = run("init", "run/checkpoint-5", "--base", base)
    assert result.exit_code == 0, result.output
    text = Path("specs/run.yaml").read_text()
    assert ("  # the base ships its own code, which loading runs: cache_autogptq_cuda_256.cpp, "
            "cache_autogptq_cuda_kernel_256.cu, configuration_qwen.py, cpp_kernels.py, modeling_qwen.py, "
            "qwen_generation_utils.py, tokenization_qwen.py (read it)\n  trust_remote_code: true\n") in text
    assert "  # python: /path/to/venv/bin/python" in text
    assert load_spec(Path("specs/run.yaml")).base.trust_remote_code  # (this adapter fits another base: no build)
    assert checkpoint.is_dir()


# A Qwen2.5-style template: a conversation without a system message gets the template's own.
DEFAULT_SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for m in messages %}{% if m['role'] != 'system' %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template, expected", [
    (DEFAULT_SYSTEM_TEMPLATE, "You are a helpful assistant."),
    (CHATML_TEMPLATE, None),  # a system turn only when the conversation has one
    ("{% for m in messages %}{{ m['content'] }}{% endfor %}", None),  # the template drops system messages
    ("{{ raise_exception('no system role') if messages[0]['role'] == 'system' }}", None),
])
def test_the_chat_templates_default_system_prompt(template, expected):
    assert default_system_prompt(template, {}) == expected


INJECTIONS = ["q_proj\nverify: {prompts: []}", "q_proj\r\nname: evil", "q_proj\x85name: evil", "q_proj\u2028name: evil",
              "q_proj\u202e", "q_proj\x00\x1b[2J"]


@pytest.mark.parametrize("module", INJECTIONS)
def test_values_read_from_a_checkpoint_cannot_inject_yaml(demo, module):
    config_path = demo / "checkpoint-200" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["target_modules"] = [*config["target_modules"], module]
    config["base_model_name_or_path"] = "/train/" + module
    config_path.write_text(json.dumps(config))
    result = run("init", "demo/checkpoint-200", "--base", "demo/base", "-o", "specs/x.yaml")
    if result.exit_code == 2:  # refused when read (a module name the base lacks), which is as good
        assert "Traceback" not in result.output
        return
    assert result.exit_code == 0, result.output
    import yaml

    text = Path("specs/x.yaml").read_text(encoding="utf-8")
    drafted = yaml.safe_load(text)
    assert drafted["name"] == "x" and drafted["verify"]["prompts"] and set(drafted) == {
        "name", "base", "adapter", "output", "generation", "chat", "card", "verify"}
    assert not any(c in text for c in "\r\x85\u2028\u202e\x00\x1b")


@pytest.mark.parametrize("metric, shown", [(10**400, "beyond any float"), (1e308, "1e+308"), (-0.0, "-0")])
def test_a_huge_metric_is_written_not_a_crash(tmp_path, monkeypatch, trainer_inputs, metric, shown):
    _, run_folder = trainer_run(tmp_path, *trainer_inputs, best="checkpoint-20")
    state_file = run_folder / "checkpoint-30" / "trainer_state.json"
    state_file.write_text(state_file.read_text().replace("0.4321", str(metric) if isinstance(metric, int) else
                                                         repr(metric)))
    monkeypatch.chdir(tmp_path)
    result = run("init", "output/med-lora")
    assert result.exit_code == 0, result.output
    assert f"best_metric {shown})" in result.stderr


def test_init_exits_2_when_its_output_cannot_be_written(demo):
    Path("specs").write_text("a file where the folder would go")
    result = run("init", "demo/checkpoint-200", "--base", "demo/base", "-o", "specs/x.yaml")
    assert_user_error(result, 2, "specs/x.yaml: cannot write the drafted spec there")


def test_a_recorded_base_under_an_unknown_users_home_is_a_user_error(demo):
    config_path = demo / "checkpoint-200" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = "~no-such-user-3f5c/models/base"
    config_path.write_text(json.dumps(config))
    result = run("init", "demo/checkpoint-200")
    assert_user_error(result, 2, "whose `~` names no user on this machine", "--base PATH")
