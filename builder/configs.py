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
# Remote-code chat models without a chat template name their prompt format in generation_config.json
# (Qwen-v1: `chat_format: chatml`); the token that ends an assistant turn in each format.
CHAT_FORMAT_END_OF_TURN = {"chatml": "<|im_end|>"}
# adapter_config.json keys that peft 0.13 (the oldest peft a bundle supports) knows; it refuses any other key.
PEFT_0_13_LORA_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
})


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
    # Servers (vLLM) stop only at eos_token_id: it must hold the end-of-turn token and the single-token stop
    # words that remote chat code (Qwen-v1's `stop_words_ids`) stops at by itself.
    for stop_id in [end_of_turn_id, *single_token_stop_ids(config)]:
        if stop_id is not None and stop_id not in eos_ids:
            eos_ids.append(stop_id)
    if eos_ids:
        config["eos_token_id"] = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    config.pop("transformers_version", None)
    return config


def single_token_stop_ids(generation: dict) -> list[int]:
    """The ids of `stop_words_ids` entries that are one token long ([[151645], [151643]] -> [151645, 151643])."""
    words = generation.get("stop_words_ids") or []
    return [w[0] for w in words if isinstance(w, list) and len(w) == 1 and isinstance(w[0], int)]


def chat_format_end_of_turn(base_generation: dict | None) -> str | None:
    """The end-of-turn token of a model that names its chat format instead of shipping a template (Qwen-v1)."""
    return CHAT_FORMAT_END_OF_TURN.get(str((base_generation or {}).get("chat_format")))


def tokenizer_config(source: Path, chat_template: str | None) -> dict:
    """tokenizer_config.json with the shipped chat template inside it (older loaders read it only there)."""
    config = read_json(source)
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config


def adapter_config(config: dict) -> dict:
    """The separate-mode adapter_config.json: its base is the bundle it sits in, never a training-machine path."""
    # Keys newer peft writes that older peft (< 0.14) rejects are left out while they hold their default,
    # i.e. while they change nothing; a key that is switched on stays, and old peft refuses it loudly.
    clean = {key: value for key, value in config.items()
             if key in PEFT_0_13_LORA_KEYS or not _is_lora_default(key, value)}
    clean["base_model_name_or_path"] = ".."
    clean["inference_mode"] = True
    return clean


def _is_lora_default(key: str, value: object) -> bool:
    """Whether an adapter_config.json entry is peft's default (or the informational `peft_version`)."""
    import dataclasses

    from peft import LoraConfig

    if key == "peft_version":
        return True
    field = next((f for f in dataclasses.fields(LoraConfig) if f.name == key), None)
    if field is None:
        return value in (None, False, {}, [])
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    return value == default or value in (None, {}, []) and default in (None, {}, [])


def dump_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n"
