"""The bundle's chat facts, computed once: chat template, end-of-turn token and id, special token ids."""

from __future__ import annotations

import json
import mmap
import os
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.chat_template import ChatTemplateError, compile_chat_template
from builder.errors import SourceError, VerificationError
from builder.runtime.load import FACTS_FILE
from builder.sources import read_json, read_text
from builder.subprocesses import describe_crash, model_code_env
from builder.tokenizer_files import declared_template, template_variables, tokenizer_declarations

_SENTINEL = "MODELPACK_ASSISTANT_REPLY"
# Remote-code chat models without a chat template name their prompt format in generation_config.json
# (Qwen-v1: `chat_format: chatml`); the token that ends an assistant turn in each format.
CHAT_FORMAT_END_OF_TURN = {"chatml": "<|im_end|>"}
# Qwen-v1's remote code builds its prompt in make_context (qwen_generation_utils.py): ChatML whose system
# message is always there, "You are a helpful assistant." by default (modeling_qwen.py, chat(system=...)).
QWEN_V1_DEFAULT_SYSTEM = "You are a helpful assistant."


@dataclass(frozen=True)
class ChatFacts:
    """What chat and serving rely on, as the bundle ships it."""

    template: str | None  # the spec's template file, else the tokenizer's own (file or tokenizer_config.json)
    special_ids: dict[str, int]  # added/special tokens the tokenizer files declare, content -> id
    end_of_turn_token: str | None  # the token after an assistant reply (ChatML: <|im_end|>)
    end_of_turn_id: int | None
    tokenizer_config: dict | None  # the shipped tokenizer_config.json as read, which the bundle's copy extends


def read_chat_facts(tokenizer_files: dict[str, Path], *, template_file: Path | None, generation_config: dict | None,
                    bundle: Path, python: str) -> ChatFacts:
    """The chat facts of the bundle being written in `bundle` (its tokenizer files, name -> source, already copied
    there); template_file is the spec's chat.template, generation_config the base's.

    A model without a chat template whose format is named in generation_config.json (Qwen-v1) keeps its special
    tokens in its tokenizer's own code: then that tokenizer is started from `bundle` in a subprocess of `python`,
    the verifying interpreter, so no model code runs in modelpack's process.
    """
    files = tokenizer_declarations(tokenizer_files, template_file=template_file)
    if files.template is not None:
        token = end_of_turn_token(files.template, files.special_ids, files.template_tokens,
                                  source=files.template_source)
        token_id = files.special_ids.get(token) if token else None
        return ChatFacts(files.template, files.special_ids, token, token_id, files.config)
    token = CHAT_FORMAT_END_OF_TURN.get(str((generation_config or {}).get("chat_format")))
    if token is None:
        return ChatFacts(None, files.special_ids, None, None, files.config)
    token_id = files.special_ids.get(token)
    if token_id is None:
        token_id = probe_token_ids(bundle, [token], python=python)[token]
    return ChatFacts(None, files.special_ids, token if token_id is not None else None, token_id, files.config)


def end_of_turn_token(template: str, special_tokens: dict[str, int], template_vars: dict[str, str], *,
                      source: str | None = None) -> str | None:
    """The special token the chat template puts right after an assistant reply (ChatML: <|im_end|>).

    Rendered in transformers' own template environment (its `{% generation %}` tag, loop controls, `strftime_now`,
    `tojson`; see chat_template.py), so a template that works in transformers and vLLM works here; within the
    rendering limits (a template past one is exit 2, naming source: where it was read).
    """
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = compile_chat_template(template, source=source).render(
            messages=messages, add_generation_prompt=False, **template_vars)
    except ChatTemplateError as exc:  # a template error is the user's to fix: say where it came from
        where = f"{source}: " if source else ""
        raise SourceError(f"{where}chat template cannot be rendered: {exc}") from exc
    after = rendered.split(_SENTINEL, 1)[-1] if _SENTINEL in rendered else ""
    matches = [token for token in special_tokens if token and after.startswith(token)]
    return max(matches, key=len) if matches else None


def default_system_prompt(template: str, template_vars: dict[str, str], *,
                          source: str | None = None) -> str | None:
    """The system message the chat template adds when a conversation has none (Qwen2: "You are a helpful assistant.").

    Found by rendering a conversation with a marked system message and one without: the text the template puts
    where the marked message was is its default. A template that cannot render both ways has none worth stating;
    one past a rendering limit is exit 2, naming source.
    """
    marker = "MODELPACK_SYSTEM_PROMPT"
    user = {"role": "user", "content": _SENTINEL}
    compiled = compile_chat_template(template, source=source)
    try:
        with_system = compiled.render(messages=[{"role": "system", "content": marker}, user],
                                      add_generation_prompt=False, **template_vars)
        without = compiled.render(messages=[user], add_generation_prompt=False, **template_vars)
    except ChatTemplateError:  # a template the build would reject says so there, with the build's message
        return None
    if marker not in with_system:
        return None
    before, after = with_system.split(marker, 1)
    after = after.split(_SENTINEL, 1)[0]  # what follows the system message, up to the user's text
    if not before or not without.startswith(before):
        return None
    rest = without[len(before):]
    end = rest.find(after) if after else -1
    default = rest[:end] if end > 0 else ""
    return default if default and _SENTINEL not in default else None


def refuse_runaway_template(template: str, *, source: str | None, template_vars: dict[str, str], prompts: list[str],
                            system_prompt: str | None) -> None:
    """Render, within the limits (chat_template.py), every conversation that verification renders with this template
    through transformers' apply_chat_template (load.chat, bundle_check.formatted_prompt), llama.cpp and vLLM: each
    verification prompt and probe after the system prompt, with the generation prompt. Done before any process
    starts, so a template that would hang or flood one is refused here (exit 2, naming source and the limit). A
    template's own error (raise_exception) is left to the step that meets it, as before."""
    compiled = compile_chat_template(template, source=source)
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    # What each runtime defines beside the messages (a template can test whether a name is defined): transformers'
    # apply_chat_template (load.chat, bundle_check, vLLM) its tokenizer's special tokens, tools and documents;
    # llama-cpp-python's Jinja2ChatFormatter the BOS and EOS texts and its OpenAI-style options.
    runtimes = ({**template_vars, "tools": None, "documents": None},
                {**{k: v for k, v in template_vars.items() if k in ("bos_token", "eos_token")}, "tools": None,
                 "functions": None, "function_call": None, "tool_choice": None})
    for prompt in prompts:
        for variables in runtimes:
            try:
                compiled.render(messages=[*system, {"role": "user", "content": prompt}], add_generation_prompt=True,
                                **variables)
            except ChatTemplateError:
                continue


def refuse_runaway_spec_template(tokenizer_files: dict[str, Path], *, template_file: Path | None,
                                 prompts: list[str], system_prompt: str | None) -> None:
    """refuse_runaway_template for a build: the template chat will use (the spec's chat.template, else the
    tokenizer's), with the tokenizer's token variables; only tokenizer_config.json and the template are read."""
    config_file = tokenizer_files.get("tokenizer_config.json")
    config = read_json(config_file) if config_file is not None else None
    template, source = declared_template(tokenizer_files, config, template_file=template_file)
    if template is not None:
        refuse_runaway_template(template, source=source, template_vars=template_variables(config), prompts=prompts,
                                system_prompt=system_prompt)


# Where transformers finds a chat template in a model folder: chat_template.jinja (which it prefers),
# tokenizer_config.json's chat_template, a processor's chat_template.json.
_TEMPLATE_HOMES = ("chat_template.jinja", "tokenizer_config.json", "chat_template.json")
# GGUF metadata (the format's v2 and v3): a value's type -> its size in bytes, for the fixed-size ones; 8 is a string
# (uint64 length, then UTF-8), 9 an array (element type uint32, count uint64, then the elements).
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_MAX_KEYS = 1 << 16  # a GGUF file holds a few dozen; llama.cpp's converter writes about 40
_GGUF_MAX_ARRAY_DEPTH = 8
# Strings skipped one by one (a 262k vocabulary and its merges are about 520k), so a file of billions of empty
# strings costs bounded time.
_GGUF_MAX_STRINGS = 1 << 22


def gguf_chat_templates(path: Path) -> dict[str, str] | None:
    """The chat templates a GGUF file's metadata holds (tokenizer.chat_template, and named ones as
    tokenizer.chat_template.NAME), which llama.cpp renders; None when the metadata cannot be read within the file's
    size and these bounds (so nothing can hide a template from this check). Reads the key-value section only,
    stepping over arrays (the vocabulary) in place."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            return None
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                return _gguf_templates(data)
            except (IndexError, struct.error):  # a count or length past the end of the file
                return None


def _gguf_templates(data: mmap.mmap) -> dict[str, str] | None:
    magic, version, _, keys = struct.unpack_from("<4sIQQ", data, 0)
    if magic != b"GGUF" or version not in (2, 3) or keys > _GGUF_MAX_KEYS:
        return None
    size, at, strings = len(data), 24, 0
    templates: dict[str, str] = {}

    def string(at: int) -> tuple[bytes, int]:
        (length,) = struct.unpack_from("<Q", data, at)
        if at + 8 + length > size:
            raise IndexError
        return data[at + 8:at + 8 + length], at + 8 + length

    def skip(kind: int, at: int, depth: int) -> int:
        nonlocal strings
        if kind in _GGUF_SIZES:
            return at + _GGUF_SIZES[kind]
        if kind == _GGUF_STRING:
            strings += 1
            return at + 8 + struct.unpack_from("<Q", data, at)[0]
        if kind != _GGUF_ARRAY or depth >= _GGUF_MAX_ARRAY_DEPTH:
            raise IndexError
        inner, count = struct.unpack_from("<IQ", data, at)
        at += 12
        if inner in _GGUF_SIZES:
            return at + count * _GGUF_SIZES[inner]
        if inner == _GGUF_STRING and strings + count <= _GGUF_MAX_STRINGS:
            strings += count
            for _ in range(count):
                at += 8 + struct.unpack_from("<Q", data, at)[0]
            return at
        for _ in range(count):
            at = skip(inner, at, depth + 1)
            if at > size or strings > _GGUF_MAX_STRINGS:
                raise IndexError
        return at

    for _ in range(keys):
        key, at = string(at)
        (kind,) = struct.unpack_from("<I", data, at)
        if key.startswith(b"tokenizer.chat_template") and kind == _GGUF_STRING:
            text, at = string(at + 4)
            templates[key.decode("utf-8", "replace")] = text.decode("utf-8", "replace")
        else:
            at = skip(kind, at + 4, 0)
        if at > size:
            return None
    return templates


def refuse_runaway_bundle_templates(bundle: Path, *, shown: Path) -> None:
    """refuse_runaway_template for a bundle (a received one's snapshot) before verification starts any process:
    every template text the bundle holds where transformers looks for one, and each GGUF file's own, each with the
    prompts and system prompt its facts file gives load.py (llama.cpp's token variables come from the GGUF's
    vocabulary; the tokenizer's stand in for them). A GGUF file whose metadata cannot be read is refused (exit 3).
    shown: the bundle's own path, for messages."""
    facts = read_json(bundle / FACTS_FILE, shown=shown / FACTS_FILE)
    entries = [e for key in ("prompts", "probes") if isinstance(facts.get(key), list) for e in facts[key]]
    prompts = [e["prompt"] for e in entries if isinstance(e, dict) and isinstance(e.get("prompt"), str)]
    system_prompt = facts.get("system_prompt") if isinstance(facts.get("system_prompt"), str) else None
    homes = {name: (bundle / name, shown / name) for name in _TEMPLATE_HOMES if (bundle / name).is_file()}
    config = read_json(homes["tokenizer_config.json"][0], shown=homes["tokenizer_config.json"][1]) \
        if "tokenizer_config.json" in homes else None
    for name, (path, where) in homes.items():
        if name == "chat_template.jinja":
            found: object = read_text(path, shown=where)
        else:
            found = (config or {} if name == "tokenizer_config.json" else read_json(path, shown=where)).get(
                "chat_template")
        # tokenizer_config.json may hold named templates: [{"name": ..., "template": ...}, ...]
        texts = [t.get("template") for t in found if isinstance(t, dict)] if isinstance(found, list) else [found]
        for text in texts:
            if isinstance(text, str):
                refuse_runaway_template(text, source=str(where), template_vars=template_variables(config),
                                        prompts=prompts, system_prompt=system_prompt)
    for path in sorted(bundle.rglob("*.gguf")):  # llama.cpp renders the file's own template, which may differ
        where = shown / path.relative_to(bundle)
        found = gguf_chat_templates(path)
        if found is None:
            raise VerificationError(
                f"verification failed: {where}: its metadata cannot be read (not GGUF v2 or v3, over {_GGUF_MAX_KEYS} "
                f"keys, {_GGUF_MAX_STRINGS} strings or arrays nested over {_GGUF_MAX_ARRAY_DEPTH} deep, or cut "
                "short), so its chat template cannot be checked; nothing from the bundle was run")
        for key, text in found.items():
            refuse_runaway_template(text, source=f"{where} ({key})", template_vars=template_variables(config),
                                    prompts=prompts, system_prompt=system_prompt)


# Runs in the verifying interpreter: the model's tokenizer code is executed there, never in the builder.
_TOKEN_PROBE = """
import json, sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = {}
for token in sys.argv[2:]:
    try:
        value = tokenizer.convert_tokens_to_ids(token)
    except (KeyError, ValueError):
        value = None
    ids[token] = value if isinstance(value, int) and value != tokenizer.unk_token_id else None
print("MODELPACK_TOKEN_IDS " + json.dumps(ids))
"""


def probe_token_ids(folder: Path, tokens: list[str], *, python: str) -> dict[str, int | None]:
    """Ids of special tokens that only the tokenizer's own code defines (Qwen-v1 keeps them in tokenization_qwen.py).

    The tokenizer is loaded from `folder` in a fresh offline subprocess of `python`, so no model code runs here.
    """
    with tempfile.TemporaryDirectory(prefix="modelpack-tokens-") as workdir:
        process = subprocess.run([python, "-c", _TOKEN_PROBE, str(folder), *tokens], cwd=workdir,
                                 env=model_code_env(workdir),
                                 capture_output=True, text=True, encoding="utf-8", errors="replace")
    for line in process.stdout.splitlines():
        if line.startswith("MODELPACK_TOKEN_IDS "):
            return json.loads(line.split(" ", 1)[1])
    crash = describe_crash((process.stdout + process.stderr).splitlines(), process.returncode)
    raise SourceError(
        f"cannot load the model's tokenizer with {python} to look up {', '.join(tokens)}: {crash}; "
        "set `verify.python` to an interpreter that can load this model"
    )
