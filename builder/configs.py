"""The bundle's JSON configs, derived from the base's own and the spec: pure functions over dicts."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from builder.errors import SourceError
from builder.plan import BuildPlan
from builder.sources import read_json

DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
# Qwen-v1 style configs pick the load dtype from boolean flags; they must agree with the weights.
DTYPE_FLAGS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Sampling-only settings that transformers rejects when do_sample is false.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
_SENTINEL = "MODELPACK_ASSISTANT_REPLY"


def model_config(base_config: dict, out_dtype: torch.dtype, *, untie_embeddings: bool, vocab_size: int | None) -> dict:
    """config.json with the output dtype recorded under the key(s) transformers 4.x and 5.x read."""
    config = dict(base_config)
    if untie_embeddings:
        config["tie_word_embeddings"] = False
    if vocab_size is not None:  # the adapter saved resized embeddings
        config["vocab_size"] = vocab_size
    name = DTYPE_NAMES[out_dtype]
    config["torch_dtype"] = name
    if "dtype" in config:
        config["dtype"] = name
    for flag, dtype in DTYPE_FLAGS.items():
        if flag in config:
            config[flag] = dtype == out_dtype
    return config


def chat_template_of(plan: BuildPlan) -> str | None:
    """The chat template the bundle ships: the spec's file, else the tokenizer's own (file or config entry)."""
    if plan.spec.chat.template is not None:
        return plan.spec.chat.template.read_text(encoding="utf-8")
    by_name = {c.dest: c.source for c in plan.copies if c.role == "tokenizer"}
    if "chat_template.jinja" in by_name:
        return by_name["chat_template.jinja"].read_text(encoding="utf-8")
    if "tokenizer_config.json" in by_name:
        template = read_json(by_name["tokenizer_config.json"]).get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one is what chat uses
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template
    return None


def special_token_ids(plan: BuildPlan) -> dict[str, int]:
    """Added/special tokens of the shipped tokenizer, content -> id (tokenizer.json and tokenizer_config.json)."""
    by_name = {c.dest: c.source for c in plan.copies if c.role == "tokenizer"}
    tokens: dict[str, int] = {}
    if "tokenizer.json" in by_name:
        for token in read_json(by_name["tokenizer.json"]).get("added_tokens", []):
            tokens[token["content"]] = token["id"]
    if "tokenizer_config.json" in by_name:
        for token_id, token in read_json(by_name["tokenizer_config.json"]).get("added_tokens_decoder", {}).items():
            tokens[token["content"]] = int(token_id)
    return tokens


def tokenizer_config_tokens(plan: BuildPlan) -> dict[str, str]:
    """bos/eos/pad/unk token strings as the tokenizer config names them, for rendering the template."""
    by_name = {c.dest: c.source for c in plan.copies if c.role == "tokenizer"}
    if "tokenizer_config.json" not in by_name:
        return {}
    config = read_json(by_name["tokenizer_config.json"])
    found = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            found[key] = value
    return found


def end_of_turn_token(template: str, special_tokens: dict[str, int], template_vars: dict[str, str]) -> str | None:
    """The special token the chat template puts right after an assistant reply (ChatML: <|im_end|>)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_template_exception
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        rendered = env.from_string(template).render(messages=messages, add_generation_prompt=False, **template_vars)
    except Exception as exc:  # a template error is the user's to fix: say where it came from
        raise SourceError(f"chat template cannot be rendered: {exc}") from exc
    after = rendered.split(_SENTINEL, 1)[-1] if _SENTINEL in rendered else ""
    matches = [token for token in special_tokens if token and after.startswith(token)]
    return max(matches, key=len) if matches else None


def _raise_template_exception(message: str):
    raise ValueError(message)


def generation_config(plan: BuildPlan, base_generation: dict | None, end_of_turn_id: int | None) -> dict:
    """The base's generation_config.json overlaid with the spec, with eos ids covering the end-of-turn token."""
    config = dict(base_generation or {})
    overrides = plan.spec.generation.overrides()
    config.update(overrides)
    if config.get("do_sample") is False:
        for key in SAMPLING_KEYS:
            if key not in overrides:
                config.pop(key, None)
    eos = config.get("eos_token_id", plan.base.config.get("eos_token_id"))
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    if end_of_turn_id is not None and end_of_turn_id not in eos_ids:
        eos_ids.append(end_of_turn_id)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    config.pop("transformers_version", None)
    return config


def tokenizer_config(source: Path, chat_template: str | None) -> dict:
    """tokenizer_config.json with the shipped chat template inside it (older loaders read it only there)."""
    config = read_json(source)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def adapter_config(config: dict) -> dict:
    """The separate-mode adapter_config.json: its base is the bundle it sits in, never a training-machine path."""
    clean = dict(config)
    clean["base_model_name_or_path"] = ".."
    clean["inference_mode"] = True
    return clean


def dump_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
