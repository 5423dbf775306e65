"""What a deployment engineer reads in the card: memory sizing, and for each runtime a command its own flags parse, a
chat request that is valid OpenAI JSON, the port and a health check; the Modelfile's license and context."""

from __future__ import annotations

import argparse
import json
import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import torch

from builder.build import build_bundle, plan_from_spec
from builder.serving import ServedBundle, serving_commands
from builder.sizing import kv_cache
from helpers import GO_MISSING, ollama_prompts, ollama_renderer, write_spec

OPENAI_CHAT_REQUEST = json.loads((Path(__file__).parent / "openai" / "chat_completions_request.schema.json")
                                 .read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------- memory sizing

@pytest.mark.parametrize("config, context, elements, approximate", [
    # Qwen2-7B: 28 layers, 4 KV heads of 128 (grouped-query attention).
    ({"num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_size": 3584,
      "max_position_embeddings": 32768, "sliding_window": 131072, "use_sliding_window": False},
     32768, 2 * 28 * 4 * 128, []),
    # Llama-3-8B with head_dim given.
    ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
      "head_dim": 128, "max_position_embeddings": 8192}, 8192, 2 * 32 * 8 * 128, []),
    # GPT-2: its own key names, one KV head per attention head.
    ({"n_layer": 12, "n_head": 12, "n_embd": 768, "n_positions": 1024}, 1024, 2 * 12 * 768, []),
    # Qwen-7B-Chat v1: kv_channels, seq_length.
    ({"num_hidden_layers": 32, "num_attention_heads": 32, "hidden_size": 4096, "kv_channels": 128,
      "seq_length": 8192}, 8192, 2 * 32 * 32 * 128, []),
    # Mistral's sliding window and Mixtral's experts are stated as approximations.
    ({"num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_size": 4096,
      "max_position_embeddings": 32768, "sliding_window": 4096, "num_local_experts": 8}, 32768,
     2 * 32 * 8 * 128, ["sliding-window", "8 experts"]),
    ({"max_position_embeddings": 2048}, 2048, None, []),
])
def test_the_kv_cache_per_token_from_config(config, context, elements, approximate):
    kv = kv_cache(config)
    assert (kv.context_length, kv.elements_per_token) == (context, elements)
    assert len(kv.approximations) == len(approximate)
    assert all(word in sentence for word, sentence in zip(approximate, kv.approximations, strict=True))
    if elements is not None:
        assert kv.bytes_at_context(2) == elements * 2 * context


# ------------------------------------------------------------- each runtime's command, request and health

def served(**overrides) -> ServedBundle:
    facts = dict(name="med", mode="merge", trust_remote_code=True, has_chat_template=True, max_lora_rank=24,
                 gguf_files=["med-bf16.gguf", "med-q8_0.gguf"], gguf_has_chat_template=True, has_modelfile=True,
                 context_length=32768, max_new_tokens=128, system_prompt="你是一名专业的医生助手。",
                 example_prompt="宝宝满头冒汗，是不是缺钙？it's \"quoted\"")
    return ServedBundle(**{**facts, **overrides})


def vllm_serve() -> argparse.ArgumentParser:
    """`vllm serve`'s flags the card uses, as vLLM's docs and its arg_utils declare them."""
    parser = argparse.ArgumentParser(prog="vllm serve", exit_on_error=False)
    parser.add_argument("model")
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--port", type=int)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--lora-modules", nargs="+")
    parser.add_argument("--max-lora-rank", type=int, choices=[1, 8, 16, 32, 64, 128, 256, 320, 512])
    parser.add_argument("--tensor-parallel-size", "-tp", type=int)
    return parser


def sglang_launch_server() -> argparse.ArgumentParser:
    """`python -m sglang.launch_server`'s flags (sglang/srt/server_args.py)."""
    parser = argparse.ArgumentParser(prog="sglang.launch_server", exit_on_error=False)
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--served-model-name")
    parser.add_argument("--port", type=int)
    parser.add_argument("--context-length", type=int)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--lora-paths", nargs="*")
    return parser


def tgi_launcher() -> argparse.ArgumentParser:
    """text-generation-launcher's flags (launcher/src/main.rs, clap), after the docker image."""
    parser = argparse.ArgumentParser(prog="text-generation-launcher", exit_on_error=False)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--lora-adapters")
    return parser


def llama_server() -> argparse.ArgumentParser:
    """llama-server's flags (common/arg.cpp)."""
    parser = argparse.ArgumentParser(prog="llama-server", exit_on_error=False)
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("--jinja", action="store_true")
    parser.add_argument("--alias")
    parser.add_argument("--port", type=int)
    parser.add_argument("-c", "--ctx-size", type=int)
    return parser


def ollama_create() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ollama create", exit_on_error=False)
    parser.add_argument("model")
    parser.add_argument("-f", "--file", required=True)
    return parser


def parsed(command: str) -> argparse.Namespace:
    """The command through its runtime's flags; an unknown flag or a wrong value fails the test."""
    words = shlex.split(command)
    if words[:2] == ["vllm", "serve"]:
        return vllm_serve().parse_args(words[2:])
    if words[:3] == ["python", "-m", "sglang.launch_server"]:
        return sglang_launch_server().parse_args(words[3:])
    if words[0] == "docker":
        return tgi_launcher().parse_args(words[words.index("ghcr.io/huggingface/text-generation-inference") + 1:])
    if words[0] == "llama-server":
        return llama_server().parse_args(words[1:])
    assert words[:2] == ["ollama", "create"], command
    return ollama_create().parse_args(words[2:])


@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_every_command_parses_with_its_runtimes_flags_and_names_the_model_requests_use(mode):
    commands = {c.runtime: c for c in serving_commands(served(mode=mode))}
    vllm = parsed(commands["vLLM"].command)
    assert vllm.port == commands["vLLM"].port == 8000 and vllm.max_model_len == 32768 and vllm.trust_remote_code
    if mode == "merge":
        assert vllm.served_model_name == ["med"] and commands["vLLM"].model == "med"
        assert parsed(commands["llama.cpp"].command).ctx_size == 32768
        assert parsed(commands["Ollama"].command).model == "med"
    else:  # the adapter is `med`, the base alone `med-base`
        assert vllm.served_model_name == ["med-base"] and vllm.lora_modules == ["med=./med/adapter"]
        assert vllm.max_lora_rank == 32 and commands["vLLM"].model == "med"
    sglang = parsed(commands["SGLang"].command)
    assert (sglang.port, sglang.context_length) == (30000, 32768)
    assert parsed(commands["TGI"].command).model_id == "/data/med"
    for command in commands.values():
        parsed(command.command)


@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_vllms_command_splits_the_model_over_the_gpus_the_spec_names(mode):
    assert parsed(next(c for c in serving_commands(served(mode=mode)) if c.runtime == "vLLM").command) \
        .tensor_parallel_size is None  # one GPU unless the spec says otherwise
    vllm = next(c for c in serving_commands(served(mode=mode, tensor_parallel_size=4)) if c.runtime == "vLLM")
    assert parsed(vllm.command).tensor_parallel_size == 4


@pytest.mark.parametrize("mode", ["merge", "separate"])
def test_every_request_is_an_openai_chat_completion_with_max_tokens_said(mode):
    for command in serving_commands(served(mode=mode)):
        words = shlex.split(command.request)
        assert words[:3] == ["curl", "-s", f"http://localhost:{command.port}/v1/chat/completions"]
        body = json.loads(words[words.index("-d") + 1])
        jsonschema.validate(body, OPENAI_CHAT_REQUEST)
        assert body["model"] == command.model
        assert body["messages"] == [{"role": "system", "content": "你是一名专业的医生助手。"},
                                    {"role": "user", "content": "宝宝满头冒汗，是不是缺钙？it's \"quoted\""}]
        assert body["max_tokens"] >= 128  # never vLLM's silent default from generation_config.json
        assert shlex.split(command.health)[:2] == ["curl", "-sf"] and str(command.port) in command.health


def test_vllm_says_that_generation_configs_max_new_tokens_limits_every_request():
    notes = {c.runtime: c.notes for c in serving_commands(served())}["vLLM"]
    assert notes[0].startswith("vLLM makes `generation_config.json`'s `max_new_tokens` (128) the default "
                               "`max_tokens` of every request that gives none")
    assert not any("max_new_tokens" in n for n in
                   {c.runtime: c.notes for c in serving_commands(served(max_new_tokens=None))}["vLLM"])


# ----------------------------------------------------------------------------------------- a built bundle

@pytest.fixture(scope="module")
def bundle(tmp_path_factory, models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path_factory.mktemp("deployment"), base, adapters(base), name="med",
                      output={"dir": "dist/med", "dtype": "bfloat16"}, card={"license": "apache-2.0"},
                      chat={"system_prompt": "你是一名专业的医生助手。"}, export={"gguf": {"types": ["bf16", "q8_0"]}})
    return build_bundle(plan_from_spec(spec), verify=False).bundle


def test_the_card_sizes_the_model_per_variant(bundle):
    config = json.loads((bundle / "config.json").read_text())
    card = (bundle / "README.md").read_text(encoding="utf-8")
    context = config["max_position_embeddings"]
    assert f"Context length: {context} tokens (`config.json`)" in card
    memory = card[card.index("## Memory"):card.index("## Serving")]
    rows = [line for line in memory.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0] for row in rows] == ["| safetensors, bfloat16", "| `gguf/med-bf16.gguf`",
                                                     "| `gguf/med-q8_0.gguf`"]
    assert "requirements.txt` pins the versions `load.py` was verified with" in card
    for section in ("vLLM", "SGLang", "TGI", "Ollama", "llama.cpp"):
        part = card[card.index(f"### {section}\n"):]
        assert "Listens on port" in part.split("\n### ")[0], section


def test_the_modelfile_carries_the_license_and_the_context_and_ollama_parses_it(bundle):
    go_renderer = ollama_renderer()
    if go_renderer is None:
        pytest.skip(GO_MISSING)
    modelfile = (bundle / "gguf" / "Modelfile").read_text(encoding="utf-8")
    context = json.loads((bundle / "config.json").read_text())["max_position_embeddings"]
    assert "\nLICENSE apache-2.0\n" in modelfile and f"\nPARAMETER num_ctx {context}\n" in modelfile
    commands, _ = ollama_prompts(go_renderer, modelfile, [])
    assert ["license", "apache-2.0"] in commands


def test_load_py_takes_a_system_prompt_and_an_answer_length_and_refuses_a_device_that_is_none(bundle):
    import subprocess
    import sys

    def load_py(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(bundle / "load.py"), *args], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    refused = load_py("hi", "--device", "gpu0")
    assert refused.returncode == 2 and "'gpu0' is not a device: auto | cpu | cuda | cuda:N | mps" in refused.stderr
    answered = load_py("hi", "--system", "", "--max-new-tokens", "3", "--device", "cpu")
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.strip()
