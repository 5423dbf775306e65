"""The bundle's chat facts, computed once: chat template, end-of-turn token and id, special token ids."""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.chat_template import compile_chat_template
from builder.errors import SourceError
from builder.subprocesses import describe_crash, model_code_env
from builder.tokenizer_files import tokenizer_declarations

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
        token = end_of_turn_token(files.template, files.special_ids, files.template_tokens)
        token_id = files.special_ids.get(token) if token else None
        return ChatFacts(files.template, files.special_ids, token, token_id, files.config)
    token = CHAT_FORMAT_END_OF_TURN.get(str((generation_config or {}).get("chat_format")))
    if token is None:
        return ChatFacts(None, files.special_ids, None, None, files.config)
    token_id = files.special_ids.get(token)
    if token_id is None:
        token_id = probe_token_ids(bundle, [token], python=python)[token]
    return ChatFacts(None, files.special_ids, token if token_id is not None else None, token_id, files.config)


def end_of_turn_token(template: str, special_tokens: dict[str, int], template_vars: dict[str, str]) -> str | None:
    """The special token the chat template puts right after an assistant reply (ChatML: <|im_end|>).

    Rendered in transformers' own template environment (its `{% generation %}` tag, loop controls, `strftime_now`,
    `tojson`; see chat_template.py), so a template that works in transformers and vLLM works here.
    """
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = compile_chat_template(template).render(messages=messages, add_generation_prompt=False,
                                                          **template_vars)
    except Exception as exc:  # a template error is the user's to fix: say where it came from
        raise SourceError(f"chat template cannot be rendered: {exc}") from exc
    after = rendered.split(_SENTINEL, 1)[-1] if _SENTINEL in rendered else ""
    matches = [token for token in special_tokens if token and after.startswith(token)]
    return max(matches, key=len) if matches else None


def default_system_prompt(template: str, template_vars: dict[str, str]) -> str | None:
    """The system message the chat template adds when a conversation has none (Qwen2: "You are a helpful assistant.").

    Found by rendering a conversation with a marked system message and one without: the text the template puts
    where the marked message was is its default. A template that cannot render both ways has none worth stating.
    """
    marker = "MODELPACK_SYSTEM_PROMPT"
    user = {"role": "user", "content": _SENTINEL}
    try:
        compiled = compile_chat_template(template)
        with_system = compiled.render(messages=[{"role": "system", "content": marker}, user],
                                      add_generation_prompt=False, **template_vars)
        without = compiled.render(messages=[user], add_generation_prompt=False, **template_vars)
    except Exception:  # a template the build would reject says so there, with the build's message
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
