"""Serving hand-over: the Ollama Modelfile (its TEMPLATE rendered by Go's text/template equals the Jinja chat
template's prompt, byte for byte), and the card's serving commands, each naming files the bundle holds."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from builder.build import build_bundle, plan_from_spec
from builder.chat import ChatFacts
from builder.errors import SpecError
from builder.serving import (
    QWEN_V1_DEFAULT_SYSTEM,
    ServedBundle,
    modelfile_problem,
    modelfile_value,
    ollama_template,
    render_modelfile,
    sampling_parameters,
    serving_commands,
    stop_tokens,
    vllm_max_lora_rank,
)
from helpers import (
    CHATML_TEMPLATE,
    GO_MISSING,
    LLAMA3_TEMPLATE,
    QWEN2_TEMPLATE,
    import_file,
    ollama_prompts,
    ollama_renderer,
    qwen_base,
    random_checkpoint,
    save_tokenizer,
    write_spec,
)

# Qwen2-7B-Instruct's chat template, as published: ChatML with a default system message.
# Zephyr's: a role line per message, no format modelpack translates.
ZEPHYR_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# ChatML that drops system messages, and ChatML with today's date in a default system message: near misses.
CHATML_WITHOUT_SYSTEM = CHATML_TEMPLATE.replace("{% for message in messages %}",
                                                "{% for message in messages if message['role'] != 'system' %}")
CHATML_DATED = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nToday is ' + strftime_now('%d %B %Y') + "
    "'<|im_end|>\\n' }}{% endif %}" + CHATML_TEMPLATE
)
# Llama 2 refuses a conversation whose roles do not alternate user/assistant.
LLAMA2_TEMPLATE = (
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}{% endfor %}"
)

CHATML_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
LLAMA3_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
              "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
FAMILIES = {
    "chatml": (CHATML_TEMPLATE, CHATML_IDS, "<|im_end|>", {"eos_token": "<|im_end|>"}),
    "qwen2": (QWEN2_TEMPLATE, CHATML_IDS, "<|im_end|>", {"eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3_TEMPLATE, LLAMA3_IDS, "<|eot_id|>",
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
}

# Conversations as Ollama's chat endpoint receives them: with a system message and several turns, without one
# (the Modelfile's SYSTEM then comes first), multi-line and non-ASCII text, text that looks like template syntax
# or Modelfile quoting (data, never template), and a final assistant message that the reply continues.
CONVERSATIONS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "我家宝宝六个月，满头冒汗。"},
     {"role": "assistant", "content": "这是缺钙的原因。\n是不是睡觉时也出汗？"}, {"role": "user", "content": "是的"}],
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"}],
    [{"role": "user", "content": 'Say {{ .System }} and """quoted""" {{- end }}'}],
    [{"role": "system", "content": "Line one\nline two"}, {"role": "user", "content": "Finish: the answer is"},
     {"role": "assistant", "content": "The answer is"}],
]
SYSTEM_PROMPTS = [None, "你是一名专业的医生助手。", 'Be careful.\n  Answer in "plain" words.  ']


def chat_facts(family: str) -> ChatFacts:
    template, ids, end, config = FAMILIES[family]
    return ChatFacts(template, ids, end, ids[end], config)


# ---------------------------------------------------------------------------------------------------- pure layers


@pytest.mark.parametrize("rank, accepted", [
    (1, 8), (4, 8), (8, 8), (9, 16), (16, 16), (24, 32), (64, 64), (100, 128), (256, 256), (300, 320), (320, 320),
    (321, 512), (512, 512), (513, None), (1024, None),
])
def test_vllm_max_lora_rank_is_the_smallest_accepted_value_that_holds_the_rank(rank, accepted):
    assert vllm_max_lora_rank(rank) == accepted


def served(**overrides) -> ServedBundle:
    facts = dict(name="med", mode="merge", trust_remote_code=False, has_chat_template=True,
                 max_lora_rank=8, gguf_files=[], gguf_has_chat_template=False, has_modelfile=False,
                 context_length=None, max_new_tokens=None, system_prompt=None, example_prompt="你好")
    return ServedBundle(**{**facts, **overrides})


def commands(bundle: ServedBundle) -> dict[str, str | None]:
    return {c.runtime: c.command for c in serving_commands(bundle)}


TGI = ("docker run --gpus all --shm-size 1g -p 8080:80 -v $PWD/med:/data/med "
       "ghcr.io/huggingface/text-generation-inference")
VLLM = "vllm serve ./med --served-model-name med --port 8000"
SGLANG = "python -m sglang.launch_server --model-path ./med --served-model-name med --port 30000"
# Separate mode: requests name the adapter `med`; the base alone is `med-base`.
VLLM_SEPARATE = "vllm serve ./med --served-model-name med-base --port 8000"
SGLANG_SEPARATE = "python -m sglang.launch_server --model-path ./med --served-model-name med-base --port 30000"


@pytest.mark.parametrize("bundle, expected", [
    (served(), {"vLLM": VLLM, "SGLang": SGLANG, "TGI": f"{TGI} --model-id /data/med"}),
    (served(trust_remote_code=True), {
        "vLLM": f"{VLLM} --trust-remote-code",
        "SGLang": f"{SGLANG} --trust-remote-code",
        "TGI": f"{TGI} --model-id /data/med --trust-remote-code",
    }),
    (served(mode="separate", max_lora_rank=24), {
        "vLLM": f"{VLLM_SEPARATE} --enable-lora --lora-modules med=./med/adapter --max-lora-rank 32",
        "SGLang": f"{SGLANG_SEPARATE} --lora-paths med=./med/adapter",
        "TGI": f"{TGI} --model-id /data/med --lora-adapters med=/data/med/adapter",
    }),
    (served(mode="separate", max_lora_rank=1024), {
        "vLLM": None,
        "SGLang": f"{SGLANG_SEPARATE} --lora-paths med=./med/adapter",
        "TGI": f"{TGI} --model-id /data/med --lora-adapters med=/data/med/adapter",
    }),
    (served(gguf_files=["med-bf16.gguf", "med-q8_0.gguf"], gguf_has_chat_template=True, has_modelfile=True,
            context_length=4096), {
        "vLLM": f"{VLLM} --max-model-len 4096",
        "SGLang": f"{SGLANG} --context-length 4096",
        "TGI": f"{TGI} --model-id /data/med",
        "Ollama": "ollama create med -f ./med/gguf/Modelfile",
        "llama.cpp": "llama-server -m ./med/gguf/med-bf16.gguf --jinja --alias med --port 8080 -c 4096",
    }),
], ids=["merged", "remote-code", "separate-rank-24", "separate-rank-1024", "gguf"])
def test_serving_commands_by_bundle_kind(bundle, expected):
    assert commands(bundle) == expected


def test_a_rank_vllm_cannot_serve_says_so_and_a_missing_chat_template_is_named():
    notes = {c.runtime: c.notes for c in serving_commands(served(mode="separate", max_lora_rank=1024,
                                                                 has_chat_template=False))}
    assert notes["vLLM"][0].startswith("vLLM cannot serve this adapter as a LoRA: its rank 1024 is above 512")
    assert all(any("no chat template" in n for n in notes[runtime]) for runtime in ("vLLM", "SGLang", "TGI"))


@pytest.mark.parametrize("generation, parameters", [
    ({"do_sample": False, "max_new_tokens": 128},
     [("temperature", 0), ("repeat_penalty", 1.0), ("num_predict", 128)]),
    ({}, [("temperature", 0), ("repeat_penalty", 1.0)]),  # transformers decodes greedily by default
    ({"do_sample": True, "temperature": 0.7}, [("temperature", 0.7), ("top_p", 1.0), ("top_k", 50),
                                               ("repeat_penalty", 1.0)]),
    ({"do_sample": True, "top_p": 0.8, "top_k": 20, "temperature": 0.6, "repetition_penalty": 1.05},
     [("temperature", 0.6), ("top_p", 0.8), ("top_k", 20), ("repeat_penalty", 1.05), ("repeat_last_n", -1)]),
])
def test_sampling_parameters_decode_as_generation_config_does(generation, parameters):
    assert sampling_parameters(generation)[0] == parameters


def test_stops_are_the_end_of_turn_token_and_every_named_eos_token():
    assert stop_tokens(chat_facts("chatml"), {"eos_token_id": [2, 0]}) == (["<|im_end|>", "<|endoftext|>"], [])
    assert stop_tokens(chat_facts("llama3"), {"eos_token_id": [128001, 128009]}) == (
        ["<|eot_id|>", "<|end_of_text|>"], [])
    qwen_v1 = ChatFacts(None, {}, "<|im_end|>", 151645, None)  # its special tokens live in its own code
    assert stop_tokens(qwen_v1, {"eos_token_id": [151643, 151645]}) == (["<|im_end|>"], [151643])


@pytest.mark.parametrize("text, value", [
    ("Be brief.", "Be brief."),
    ("你是一名专业的医生助手。", "你是一名专业的医生助手。"),
    ("two\nlines", '"""two\nlines"""'),
    (" padded ", '""" padded """'),
    ('"quoted"', '""""quoted""""'),
])
def test_modelfile_values_are_bare_only_where_ollama_reads_them_back_unchanged(text, value):
    assert modelfile_value(text) == value


@pytest.mark.parametrize("text, problem", [
    ("Be brief.\n\tIndented.", None),
    ("全角\u3000空格", "drops the character U+3000"),
    ("zero\u200bwidth", "drops the character U+200B"),
    ('ends with """\nthen more', 'a line ends with """'),
])
def test_modelfile_problem_names_what_ollamas_parser_would_change(text, problem):
    found = modelfile_problem(text)
    assert found == problem if problem is None else problem in found


def test_a_system_prompt_ollama_cannot_read_back_is_a_spec_error_naming_the_key():
    with pytest.raises(SpecError, match=r"chat\.system_prompt .*U\+3000"):
        render_modelfile(name="m", gguf_type="bf16", template=ollama_template(chat_facts("chatml"), {}),
                         chat=chat_facts("chatml"), generation={}, system_prompt="医生\u3000助手",
                         modelpack_version="0")


@pytest.mark.parametrize("template, config, expected", [
    (CHATML_TEMPLATE, {}, ("ChatML", None)),
    (QWEN2_TEMPLATE, {}, ("ChatML", "You are a helpful assistant.")),
    (LLAMA3_TEMPLATE, {"bos_token": "<|begin_of_text|>"}, ("Llama 3", None)),
    (ZEPHYR_TEMPLATE, {"eos_token": "</s>"}, (None, None)),
    (CHATML_WITHOUT_SYSTEM, {}, (None, None)),
    (CHATML_DATED, {}, (None, None)),
    (LLAMA2_TEMPLATE, {"bos_token": "<s>", "eos_token": "</s>"}, (None, None)),
], ids=["chatml", "qwen2", "llama3", "zephyr", "chatml-dropping-system", "chatml-dated", "llama2-refusing"])
def test_the_prompt_format_is_found_by_rendering_the_template(template, config, expected):
    found = ollama_template(ChatFacts(template, {}, None, None, config), {})
    assert (found.format, found.default_system) == expected
    assert (found.template is None) == (expected[0] is None)
    assert found.notes or expected[0] is not None  # no TEMPLATE always says why


def test_qwen_v1_without_a_template_gets_chatml_with_its_chat_codes_default_system():
    found = ollama_template(ChatFacts(None, {}, "<|im_end|>", 151645, None), {"chat_format": "chatml"})
    assert (found.format, found.default_system) == ("ChatML", QWEN_V1_DEFAULT_SYSTEM)
    unknown = ollama_template(ChatFacts(None, {}, None, None, None), {})
    assert unknown.template is None and "no chat template" in unknown.notes[0]


# ------------------------------------------------------------------------------ the TEMPLATE through Go's renderer


@pytest.fixture(scope="session")
def go_renderer():
    renderer = ollama_renderer()
    if renderer is None:
        pytest.skip(GO_MISSING)
    return renderer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    """A real tokenizer whose chat template and special tokens each test sets: transformers renders the Jinja."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def jinja_prompt(tokenizer, family: str, conversation: list[dict], system_prompt: str | None) -> str:
    """The prompt transformers builds from the bundle's template, as load.py's chat() asks for it: the bundle's
    system prompt first unless the conversation has one, and a final assistant message continued."""
    template, _, _, config = FAMILIES[family]
    tokenizer.chat_template = template
    tokenizer.bos_token = config.get("bos_token")
    if system_prompt and conversation[0]["role"] != "system":
        conversation = [{"role": "system", "content": system_prompt}, *conversation]
    continued = conversation[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=not continued,
                                         continue_final_message=continued)
    # llama.cpp adds Llama 3's BOS token itself when it tokenizes the prompt.
    return text.removeprefix("<|begin_of_text|>") if family == "llama3" else text


@pytest.mark.parametrize("system_prompt", SYSTEM_PROMPTS, ids=["no-system", "system", "system-multiline"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_modelfile_template_gives_the_jinja_templates_prompt_byte_for_byte(go_renderer, tokenizer, family,
                                                                             system_prompt):
    chat = chat_facts(family)
    generation = {"eos_token_id": [chat.end_of_turn_id], "do_sample": False, "max_new_tokens": 64}
    modelfile = render_modelfile(name="med", gguf_type="q8_0", template=ollama_template(chat, generation),
                                 chat=chat, generation=generation, system_prompt=system_prompt,
                                 modelpack_version="0")
    parsed, prompts = ollama_prompts(go_renderer, modelfile, CONVERSATIONS)
    for conversation, prompt in zip(CONVERSATIONS, prompts, strict=True):
        assert prompt == jinja_prompt(tokenizer, family, conversation, system_prompt), conversation
    # Ollama reads back exactly what was meant: the GGUF, the system prompt, the stops and greedy decoding.
    assert parsed[0] == ["from", "./med-q8_0.gguf"]
    # (a template that trims messages gets the system prompt trimmed, as that template would make it)
    written = system_prompt.strip() if system_prompt and family == "llama3" else system_prompt
    assert [args for name, args in parsed if name == "system"] == ([written] if written else [])
    assert [args for name, args in parsed if name == "stop"] == [chat.end_of_turn_token]
    assert [(name, args) for name, args in parsed if name not in ("from", "template", "system", "stop")] == [
        ("license", "other"), ("temperature", "0"), ("repeat_penalty", "1"), ("num_predict", "64")]


def test_llama3_whitespace_caveat_is_real_and_stated(go_renderer, tokenizer):
    """Llama 3's template trims each message; Go templates cannot: the one documented difference."""
    chat = chat_facts("llama3")
    template = ollama_template(chat, {})
    assert any("trims whitespace" in note for note in template.notes)
    padded = [[{"role": "user", "content": "  padded\n"}]]
    modelfile = render_modelfile(name="m", gguf_type="bf16", template=template, chat=chat, generation={},
                                 system_prompt=None, modelpack_version="0")
    _, [prompt] = ollama_prompts(go_renderer, modelfile, padded)
    expected = jinja_prompt(tokenizer, "llama3", padded[0], None)
    assert prompt != expected and prompt.replace("  padded\n", "padded") == expected


def test_the_renderer_parses_modelfile_values_as_ollama_does(go_renderer):
    """The quoting rules modelfile_problem relies on, checked in the Go parser: unprintable characters vanish,
    and a line ending in three quotes ends a triple-quoted value."""
    template = '{{ range .Messages }}{{ .Content }}{{ end }}'
    parsed, _ = ollama_prompts(go_renderer, f'FROM ./m.gguf\nTEMPLATE """{template}"""\n'
                                            'SYSTEM """全角\u3000空格"""\n', [])
    assert parsed[-1] == ["system", "全角空格"]
    with pytest.raises(AssertionError, match="unknown command|unterminated|invalid"):
        ollama_prompts(go_renderer, f'FROM ./m.gguf\nTEMPLATE """{template}"""\nSYSTEM """a"""\nb"""\n', [])


@pytest.fixture(scope="session")
def qwen_v1_base(tmp_path_factory):
    return qwen_base(tmp_path_factory.getbasetemp() / "qwen_v1")


@pytest.mark.parametrize("system_prompt", [None, "你是一名专业的医生助手。"])
def test_qwen_v1_modelfile_gives_make_contexts_prompt_byte_for_byte(go_renderer, qwen_v1_base, system_prompt):
    """Qwen-v1 has no Jinja template: its chat code's make_context is the reference, run as published."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_v1_base, trust_remote_code=True)
    make_context = import_file(qwen_v1_base / "qwen_generation_utils.py", "qwen_v1_generation_utils").make_context
    chat = ChatFacts(None, {}, "<|im_end|>", tokenizer.im_end_id, None)
    generation = {"chat_format": "chatml", "eos_token_id": [tokenizer.im_end_id, tokenizer.eod_id]}
    modelfile = render_modelfile(name="qwen", gguf_type="bf16", template=ollama_template(chat, generation),
                                 chat=chat, generation=generation, system_prompt=system_prompt,
                                 modelpack_version="0")
    turns = [("我家宝宝六个月", "这是缺钙的原因。"), ("还有呢？", "多晒太阳。\n补充维生素D。")]
    for history_length in range(len(turns) + 1):
        history = turns[:history_length]
        conversation = [m for q, a in history for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})]
        conversation.append({"role": "user", "content": "请问怎么办？"})
        _, [prompt] = ollama_prompts(go_renderer, modelfile, [conversation])
        # load.py's chat() passes the bundle's system prompt to model.chat, else model.chat's own default.
        system = {"system": system_prompt} if system_prompt else {}
        raw_text, _ = make_context(tokenizer, "请问怎么办？", history=history,
                                   system=system.get("system", QWEN_V1_DEFAULT_SYSTEM))
        assert prompt == raw_text


# -------------------------------------------------------------------------------- built bundles and their cards

def serving_paths(card: str, bundle: Path) -> list[tuple[str, Path]]:
    """Every path the Serving section's commands name, as (command, path on this machine): ./NAME/..., NAME=./...,
    TGI's -v $PWD/NAME:/data/NAME mount and the /data/NAME/... paths inside it. NAME is the bundle's name (its
    facts'), which the commands use whatever the folder is called (the card says so)."""
    name = json.loads((bundle / "modelpack_bundle.json").read_text(encoding="utf-8"))["name"]
    section = card[card.index("## Serving"):]
    section = section[:section.index("\n## ", 1)]
    found = []
    for command in re.findall(r"```bash\n(.*?)\n```", section, re.S):
        for word in shlex.split(command):
            for part in re.split(r"[=:]", word):
                part = part.replace("$PWD/", "./")
                if part.startswith("/data/"):
                    part = "./" + part[len("/data/"):]
                if part == f"./{name}" or part.startswith(f"./{name}/"):
                    found.append((command, bundle / part[len(f"./{name}/"):]))
    return found


@pytest.fixture(scope="module")
def bundles(tmp_path_factory, models, adapters):
    """Unverified bundles (the card and files are what is checked here), built once: merged with a GGUF export,
    in a folder named otherwise than the spec, and separate with a rank that vLLM needs rounded up."""
    base = models("qwen2", tied=True, dtype=torch.float32)
    merged = write_spec(tmp_path_factory.mktemp("merged"), base, adapters(base), name="med",
                        output={"mode": "merge", "dir": "dist/med-v2"},
                        chat={"system_prompt": "你是一名专业的医生助手。"},
                        export={"gguf": {"types": ["bf16", "q8_0"]}})
    separate = write_spec(tmp_path_factory.mktemp("separate"), base, adapters(base, "rank-24", r=24, lora_alpha=48),
                          name="med-lora", output={"mode": "separate", "dir": "dist/med-lora"})
    return {"merged-gguf": build_bundle(plan_from_spec(merged), verify=False).bundle,
            "separate": build_bundle(plan_from_spec(separate), verify=False).bundle}


@pytest.fixture(scope="module")
def remote_code_bundle(tmp_path_factory):
    """The Qwen-v1 fixture merged, with its own code and no chat template, and a GGUF export."""
    qwen_root = tmp_path_factory.getbasetemp() / "qwen_v1"
    spec = write_spec(tmp_path_factory.mktemp("remote-code"), qwen_base(qwen_root), random_checkpoint(qwen_root),
                      name="qwen-med", base={"trust_remote_code": True},
                      output={"dtype": "bfloat16", "dir": "dist/qwen-med"}, export={"gguf": {"types": ["bf16"]}})
    return build_bundle(plan_from_spec(spec), verify=False).bundle


@pytest.mark.parametrize("kind", ["merged-gguf", "separate", pytest.param("remote-code", marks=pytest.mark.slow)])
def test_every_path_a_serving_command_names_is_in_the_bundle(request, kind):
    bundle = (request.getfixturevalue("remote_code_bundle") if kind == "remote-code"
              else request.getfixturevalue("bundles")[kind])
    card = (bundle / "README.md").read_text(encoding="utf-8")
    paths = serving_paths(card, bundle)
    commands_seen = {command.split()[0] for command, _ in paths}
    assert {"vllm", "python", "docker"} <= commands_seen
    missing = [f"{path} (in: {command})" for command, path in paths if not path.exists()]
    assert not missing, missing


def test_the_card_serves_a_separate_adapter_with_a_rank_vllm_accepts(bundles):
    card = (bundles["separate"] / "README.md").read_text(encoding="utf-8")
    assert "--max-lora-rank 32" in card and "--max-lora-rank 24" not in card
    assert "--trust-remote-code" not in card and "ollama" not in card


@pytest.mark.slow
def test_a_remote_code_bundle_is_served_trusting_its_code_and_ollama_gets_qwen_v1s_chatml(remote_code_bundle):
    bundle = remote_code_bundle
    card = (bundle / "README.md").read_text(encoding="utf-8")
    assert "vllm serve ./qwen-med --served-model-name qwen-med --port 8000" in card
    assert "--trust-remote-code\n" in card and "ships no chat template" in card
    modelfile = (bundle / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./qwen-med-bf16.gguf" in modelfile and "You are a helpful assistant." in modelfile
    assert "PARAMETER stop <|im_end|>" in modelfile


def test_the_modelfile_is_in_the_manifest_and_names_the_first_gguf_type(bundles):
    bundle = bundles["merged-gguf"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "gguf/Modelfile" in manifest["files"]
    modelfile = (bundle / "gguf" / "Modelfile").read_text(encoding="utf-8")
    assert modelfile.splitlines()[2] == "FROM ./med-bf16.gguf"
    assert "SYSTEM 你是一名专业的医生助手。\n" in modelfile
    assert (bundle / "gguf" / "med-bf16.gguf").is_file()
    assert not (bundles["separate"] / "gguf").exists()

