"""Qwen-7B-Chat (v1) shape: remote code, a tiktoken tokenizer saved into the checkpoint, model.chat, both modes."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.configs import adapter_config
from builder.manifest import sha256_file
from builder.remote_code import distribution_name, third_party_imports
from builder.sources import find_remote_code
from fixtures.qwen_v1.make_qwen_v1 import CODE_FILES
from helpers import (
    SEED_PROBES,
    SEED_SAMPLES,
    TARGET_MODULES,
    assert_user_error,
    bundle_tensors,
    import_file,
    load_fixture,
    qwen_base,
    random_checkpoint,
    run_python,
    seed_checkpoint,
    subprocess_env,
    tree_snapshot,
    write_spec,
)

ENDOFTEXT_ID, IM_END_ID, VOCAB_ROWS = 151643, 151645, 151936
QUESTION = SEED_SAMPLES[0][0]
TOKENIZER_FILES = ("tokenizer_config.json", "qwen.tiktoken", "tokenization_qwen.py")


@pytest.fixture(scope="session")
def qwen_root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "qwen_v1"


@pytest.fixture(scope="session")
def base(qwen_root):
    return qwen_base(qwen_root)


@pytest.fixture(scope="session")
def checkpoint(qwen_root):
    return random_checkpoint(qwen_root)


def qwen_spec(folder: Path, base: Path, checkpoint: Path, *, mode: str, output: dict | None = None,
              verify: dict | None = None) -> Path:
    return write_spec(
        folder, base, checkpoint, name=f"qwen-med-{mode}", base={"trust_remote_code": True},
        output={"dir": f"dist/qwen-med-{mode}", "mode": mode, "dtype": "bfloat16", **(output or {})},
        generation={"max_new_tokens": 12, "repetition_penalty": 1.05},
        verify=verify or {"max_new_tokens": 12, "prompts": [{"prompt": QUESTION}]},
    )


@pytest.fixture(scope="module")
def merged_bundle(tmp_path_factory, base, checkpoint):
    spec = qwen_spec(tmp_path_factory.mktemp("merge"), base, checkpoint, mode="merge")
    return build_bundle(plan_from_spec(spec), verify=True).bundle


@pytest.fixture(scope="module")
def separate_bundle(tmp_path_factory, base, checkpoint):
    spec = qwen_spec(tmp_path_factory.mktemp("separate"), base, checkpoint, mode="separate")
    return build_bundle(plan_from_spec(spec), verify=True).bundle


@pytest.fixture(params=["merge", "separate"])
def bundle(request):
    """A verified bundle of the fixture with the random adapter, in each mode."""
    return request.getfixturevalue(f"{request.param}{'d' if request.param == 'merge' else ''}_bundle")


def test_remote_code_base_without_trust_remote_code_is_refused_naming_its_files(tmp_path, base, checkpoint):
    spec = write_spec(tmp_path, base, checkpoint)
    result = CliRunner().invoke(app, ["build", str(spec)])
    assert result.exit_code == 2, result.output
    assert ", ".join(CODE_FILES) in result.output
    assert "set `base.trust_remote_code: true` in the spec" in result.output
    assert not (tmp_path / "dist").exists()


@pytest.mark.parametrize("folder", ["qwen.v1", "Qwen-7B-Chat.v1.1"])
def test_a_remote_code_bundle_folder_name_with_a_dot_is_refused_before_any_work(tmp_path, base, checkpoint, folder):
    # transformers 4.x (< 4.57) would import the model's code as transformers_modules.<folder name>: a dot breaks it.
    spec = qwen_spec(tmp_path, base, checkpoint, mode="merge", output={"dir": f"dist/{folder}"})
    before = tree_snapshot(base)
    for command in (["validate", str(spec)], ["build", str(spec)]):
        result = CliRunner().invoke(app, command)
        assert_user_error(result, 2, f"output folder {folder!r} contains '.'", "transformers_modules.<folder name>",
                          f"name it e.g. {folder.replace('.', '-')!r}")
    assert not (tmp_path / "dist").exists() and tree_snapshot(base) == before


def test_a_crash_in_the_models_own_code_is_one_message_with_file_line_interpreter_and_log(tmp_path, base, checkpoint):
    broken = tmp_path / "Qwen-7B-Chat"
    shutil.copytree(base, broken)
    utils = broken / "qwen_generation_utils.py"
    utils.write_text(utils.read_text() + "\nraise ImportError('cannot import name StoppingCriteria')\n")
    line = len(utils.read_text().splitlines())
    result = CliRunner().invoke(app, ["build", str(qwen_spec(tmp_path, broken, checkpoint, mode="merge"))])
    assert_user_error(result, 3, "ImportError: cannot import name StoppingCriteria (raised in the model's own code: "
                      f"qwen_generation_utils.py line {line}, in <module>)", f"it ran with {sys.executable}")
    log = Path(result.output.split("full output is in ")[1].split()[0])
    assert "Traceback (most recent call last)" in log.read_text() and "Traceback" not in result.output
    assert not (tmp_path / "dist" / "qwen-med-merge").exists()


def test_every_file_the_model_and_tokenizer_need_is_copied_byte_for_byte_and_hashed(bundle, base, checkpoint):
    manifest = json.loads((bundle / "manifest.json").read_text())["files"]
    # Model code from the base; the tokenizer (its code included) as the checkpoint saved it, never re-saved.
    expected = {name: base / name for name in CODE_FILES} | {name: checkpoint / name for name in TOKENIZER_FILES}
    for name, source in expected.items():
        assert (bundle / name).read_bytes() == source.read_bytes(), name
        assert manifest[name]["sha256"] == sha256_file(source), name
    assert "finetune.py" in (bundle / "tokenization_qwen.py").read_text()  # the checkpoint's copy won
    leftovers = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"}
    assert not leftovers & {p.name for p in bundle.rglob("*")}


def test_load_py_of_a_base_without_code_does_not_trust_remote_code(tmp_path, models, adapters):
    plain = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, plain, adapters(plain), base={"trust_remote_code": True})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle
    facts = json.loads((bundle / "modelpack_bundle.json").read_text())
    assert facts["trust_remote_code"] is False and facts["remote_code_files"] == []
    assert "RUNS ITS OWN CODE" not in (bundle / "README.md").read_text()


def test_load_py_trusts_remote_code_and_says_so_at_the_top(bundle):
    # load.py is the same file in every bundle; the bundle's facts say that it runs model code, and which.
    facts = json.loads((bundle / "modelpack_bundle.json").read_text())
    assert facts["trust_remote_code"] is True and facts["remote_code_files"] == list(CODE_FILES)
    # The card says so before anything else, naming the files.
    card = (bundle / "README.md").read_text()
    top = card.split("## ")[0]
    assert "THIS MODEL RUNS ITS OWN CODE" in top and ", ".join(CODE_FILES) in top
    assert "AutoPeftModelForCausalLM.from_pretrained" not in (bundle / "load.py").read_text()


def test_generation_config_keeps_qwen_fields_overlays_the_spec_and_stops_servers_at_im_end(bundle, base):
    generation = json.loads((bundle / "generation_config.json").read_text())
    original = json.loads((base / "generation_config.json").read_text())
    for key in ("chat_format", "max_window_size", "stop_words_ids", "pad_token_id", "do_sample"):
        assert generation[key] == original[key], key
    assert generation["max_new_tokens"] == 12 and generation["repetition_penalty"] == 1.05
    # vLLM stops only at eos_token_id: the base's <|endoftext|> and ChatML's end of turn <|im_end|>.
    assert generation["eos_token_id"] == [ENDOFTEXT_ID, IM_END_ID]


def test_config_dtype_flags_agree_with_the_output_dtype(bundle):
    config = json.loads((bundle / "config.json").read_text())
    assert (config["torch_dtype"], config["bf16"], config["fp16"], config["fp32"]) == ("bfloat16", True, False, False)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen.QWenLMHeadModel"


@pytest.mark.parametrize("dtype, flag", [("float32", "fp32"), ("float16", "fp16")])
def test_config_flags_pick_the_load_dtype_of_a_cast_bundle(tmp_path, base, checkpoint, dtype, flag):
    """Qwen-v1 code loads in the dtype its config's flag names when the caller gives none."""
    from transformers import AutoModelForCausalLM

    spec = qwen_spec(tmp_path, base, checkpoint, mode="merge", output={"dtype": dtype})
    result = build_bundle(plan_from_spec(spec), verify=False)
    config = json.loads((result.bundle / "config.json").read_text())
    assert {f: config[f] for f in ("bf16", "fp16", "fp32")} == {f: f == flag for f in ("bf16", "fp16", "fp32")}
    if dtype == "float32":  # loading takes seconds; once shows the flag is what the model's code reads
        model = AutoModelForCausalLM.from_pretrained(result.bundle, trust_remote_code=True)
        assert model.lm_head.weight.dtype == torch.float32


def test_requirements_list_what_the_model_code_imports_with_verified_versions(bundle):
    pins = dict(line.split("==") for line in (bundle / "requirements.txt").read_text().splitlines() if "==" in line)
    environment = json.loads((bundle / "verification.json").read_text())["environment"]
    # tokenization_qwen.py imports tiktoken; the fixture's modeling file imports yaml inside a function.
    assert environment["imports"]["yaml"][0] == "PyYAML"
    assert pins["PyYAML"] == environment["imports"]["yaml"][1]
    assert pins["tiktoken"] == environment["tiktoken"]
    assert pins["transformers"] == environment["transformers"]


def test_merged_tensors_equal_peft_merge_and_unload(merged_bundle, base, checkpoint):
    model, _ = load_fixture(base, torch.bfloat16)
    merged = PeftModel.from_pretrained(model, checkpoint).merge_and_unload().state_dict()
    written = bundle_tensors(merged_bundle)
    assert set(written) == set(merged)
    for name, tensor in written.items():
        assert torch.equal(tensor, merged[name]), f"{name} differs from peft's merge"
    with safe_open(base / "model.safetensors", framework="pt") as f:
        for module in TARGET_MODULES:  # every target changed: the merge reached c_attn, c_proj, w1 and w2
            name = next(n for n in written if n.endswith(f".{module}.weight"))
            assert not torch.equal(written[name], f.get_tensor(name)), name


def test_separate_bundle_keeps_tokenizer_files_out_of_the_adapter_folder(separate_bundle):
    bundle = separate_bundle
    # peft >= 0.8's AutoPeftModelForCausalLM would load a tokenizer found here without trust_remote_code.
    assert sorted(p.name for p in (bundle / "adapter").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"
    ]
    config = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    # No Hub id is known (the adapter records a training-machine folder): the bundle's name, never a relative path.
    assert config["base_model_name_or_path"] == "qwen-med-separate"
    assert sorted(config["target_modules"]) == sorted(TARGET_MODULES)


def test_bundle_loads_and_chats_through_model_chat_without_the_sources(bundle, base, checkpoint, tmp_path):
    moved = tmp_path / "elsewhere" / bundle.name
    shutil.copytree(bundle, moved)
    hidden = [base.with_name(base.name + ".hidden"), checkpoint.with_name(checkpoint.name + ".hidden")]
    base.rename(hidden[0])
    checkpoint.rename(hidden[1])
    try:  # a fresh process that sees neither the sources nor modelpack, with an empty remote-code module cache
        env = subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))
        loaded = run_python(sys.executable, "load.py", QUESTION, cwd=moved, env=env)
    finally:
        hidden[0].rename(base)
        hidden[1].rename(checkpoint)
    answer = loaded.stdout.strip()
    assert answer == json.loads((bundle / "verification.json").read_text())["prompts"][0]["answer"] != ""
    # load() says, as it loads, which of the bundle's files run as the model's own code.
    assert f"this model runs its own code: loading it with trust_remote_code=True executes {', '.join(CODE_FILES)}" \
        in loaded.stderr

    loader = _import_loader(moved)
    model, tokenizer = loader.load(device="cpu")
    calls = []
    own_chat = model.chat  # in separate mode, the PeftModel hands this on to the Qwen model it wraps
    model.chat = lambda *args, **kwargs: calls.append(1) or own_chat(*args, **kwargs)
    response, history = loader.chat(model, tokenizer, QUESTION)
    assert response == answer and history == [(QUESTION, answer)] and calls == [1]
    assert type(model).__name__ == ("QWenLMHeadModel" if "merge" in bundle.name else "PeftModelForCausalLM")
    # No peft tokenizer pitfall: the padded embedding keeps all 151936 rows, in the bundle's dtype.
    embedding = model.get_input_embeddings().weight
    assert (embedding.shape[0], embedding.dtype) == (VOCAB_ROWS, torch.bfloat16)

    # The answer of base + adapter through peft (merged like the bundle, or not) in this process, not the base's.
    model, tokenizer = load_fixture(base, torch.bfloat16)
    plain, _ = model.chat(tokenizer, QUESTION, history=None, generation_config=_greedy(model, 12))
    reference = PeftModel.from_pretrained(model, checkpoint).eval()
    if "merge" in bundle.name:
        reference = reference.merge_and_unload()
    expected, _ = reference.chat(tokenizer, QUESTION, history=None, generation_config=_greedy(reference, 12))
    assert answer == expected != plain


def _import_loader(bundle: Path):
    return import_file(bundle / "load.py", f"load_{bundle.name.replace('-', '_')}")


def _greedy(model, max_new_tokens):
    import copy

    config = copy.deepcopy(model.generation_config)
    config.update(do_sample=False, max_new_tokens=max_new_tokens, repetition_penalty=1.05)
    return config


def test_card_says_how_to_serve_a_remote_code_model_without_chat_template(bundle):
    assert json.loads((bundle / "verification.json").read_text())["ok"]
    card = (bundle / "README.md").read_text()
    assert "--trust-remote-code" in card and "ships no chat template" in card and "`chatml`" in card


@pytest.mark.slow
def test_seed_walkthrough_trained_adapter_answers_the_seed_questions(tmp_path, qwen_root, base):
    """The seed's notebook as a build: checkpoint with Qwen's tokenizer files -> merged bf16 bundle -> chat."""
    checkpoint = seed_checkpoint(qwen_root)
    spec = write_spec(
        tmp_path, base, checkpoint, name="qwen-7b-chat-med", base={"trust_remote_code": True},
        output={"dir": "dist/qwen-7b-chat-med", "mode": "merge", "dtype": "bfloat16"},
        generation={"max_new_tokens": 48},
        card={"description": "Qwen-7B-Chat (tiny stand-in) with the seed's medical LoRA.", "language": ["zh"]},
        verify={"max_new_tokens": 48, "prompts": [{"prompt": q, "expect": {"equals": a}} for q, a in SEED_SAMPLES],
                "probes": [{"prompt": p} for p in SEED_PROBES]},
    )
    result = build_bundle(plan_from_spec(spec), verify=True)
    verification = result.verification
    assert verification["ok"], verification
    assert [r["answer"] for r in verification["prompts"]] == [a for _, a in SEED_SAMPLES]
    probes = {r["prompt"]: r["answer"] for r in verification["probes"]}
    assert list(probes) == SEED_PROBES
    card = (result.bundle / "README.md").read_text()
    assert "General-skill probes" in card
    assert all(f"| {prompt} | {answer} |" in card for prompt, answer in probes.items())

    moved = tmp_path / "deploy" / result.bundle.name
    shutil.copytree(result.bundle, moved)
    shutil.rmtree(tmp_path / "dist")
    answer = run_python(sys.executable, "load.py", QUESTION, cwd=moved,
                        env=subprocess_env(HF_MODULES_CACHE=str(tmp_path / "modules"))).stdout.strip()
    assert answer == SEED_SAMPLES[0][1]


def test_remote_code_imports_are_found_like_transformers_check_imports(tmp_path):
    (tmp_path / "modeling_x.py").write_text(textwrap.dedent("""
        import math, os.path
        import torch.nn as nn
        from einops import rearrange
        from .configuration_x import XConfig
        import configuration_x
        from transformers.utils import is_flash_attn_2_available
        try:
            import flash_attn
        except ImportError:
            flash_attn = None
        if is_flash_attn_2_available():
            from flash_attn import flash_attn_func

        def chat_stream(self):
            from transformers_stream_generator.main import NewGenerationConfig
            import yaml
    """))
    (tmp_path / "configuration_x.py").write_text("from transformers import PretrainedConfig\n")
    files = [tmp_path / "modeling_x.py", tmp_path / "configuration_x.py"]
    assert third_party_imports(files) == ["einops", "torch", "transformers", "transformers_stream_generator", "yaml"]
    assert distribution_name("yaml") == "PyYAML"
    assert distribution_name("transformers_stream_generator") == "transformers-stream-generator"


def test_remote_code_is_found_through_auto_map_local_imports_and_named_kernel_sources(tmp_path):
    config = {"auto_map": {"AutoModelForCausalLM": "modeling_x.XModel", "AutoTokenizer": ["tokenization_x.XTok", None]}}
    (tmp_path / "modeling_x.py").write_text(textwrap.dedent("""
        from .configuration_x import XConfig
        src_files = ("cache_kernel.cpp", "cache_kernel.cu")
        def quantized_cache():
            try:
                from .cpp_kernels import build
            except ImportError:
                build = None
    """))
    (tmp_path / "cpp_kernels.py").write_text('sources = ["./cache_kernel.cpp", "./missing.cu"]\n')
    for name in ("configuration_x.py", "tokenization_x.py", "cache_kernel.cpp", "cache_kernel.cu", "unused.py"):
        (tmp_path / name).write_text("")
    assert [p.name for p in find_remote_code(tmp_path, config)] == [
        "cache_kernel.cpp", "cache_kernel.cu", "configuration_x.py", "cpp_kernels.py", "modeling_x.py",
        "tokenization_x.py",
    ]


def test_adapter_config_leaves_out_default_keys_older_peft_rejects():
    written = adapter_config({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"],
        "base_model_name_or_path": "/train/Qwen-7B-Chat", "use_dora": False, "peft_version": "0.21.2",
        "lora_bias": False, "exclude_modules": None, "qalora_group_size": 16, "trainable_token_indices": None,
        "eva_config": None, "use_qalora": True,
    }, base="Qwen/Qwen-7B-Chat")
    assert written == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["c_attn"],
        "base_model_name_or_path": "Qwen/Qwen-7B-Chat", "use_dora": False, "use_qalora": True, "inference_mode": True,
    }


def test_verify_python_must_be_an_interpreter(tmp_path, base, checkpoint):
    spec = qwen_spec(tmp_path, base, checkpoint, mode="merge", verify={"python": "venv/bin/python"})
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2
    assert f"verify.python: file not found: {tmp_path / 'venv/bin/python'}" in result.output
