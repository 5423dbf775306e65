"""The bundle's JSON configs, derived from the base's own and the spec: pure functions over dicts."""

from __future__ import annotations

import json

from builder.chat_template import ChatTemplateError, compile_chat_template
from builder.dtypes import BFLOAT16, FLOAT16, FLOAT32, Dtype
from builder.tokenizer_files import TEMPLATE_TOKEN_KEYS

# Qwen-v1 style configs pick the load dtype from boolean flags; they must agree with the weights.
DTYPE_FLAGS = {"bf16": BFLOAT16, "fp16": FLOAT16, "fp32": FLOAT32}
# Sampling-only settings that transformers rejects when do_sample is false.
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")
# adapter_config.json keys that peft 0.13 (the oldest peft a bundle supports) knows; it refuses any other key.
PEFT_0_13_LORA_KEYS = frozenset({
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "r", "rank_pattern",
    "revision", "runtime_config", "target_modules", "task_type", "use_dora", "use_rslora",
})


def model_config(base_config: dict, out_dtype: Dtype, *, untie_embeddings: bool, vocab_size: int | None) -> dict:
    """config.json with the output dtype recorded under the key(s) transformers 4.x and 5.x read."""
    config = dict(base_config)
    if untie_embeddings:
        config["tie_word_embeddings"] = False
    if vocab_size is not None:  # the adapter saved resized embeddings
        config["vocab_size"] = vocab_size
    config["torch_dtype"] = out_dtype.name
    if "dtype" in config:
        config["dtype"] = out_dtype.name
    for flag, dtype in DTYPE_FLAGS.items():
        if flag in config:
            config[flag] = dtype == out_dtype
    return config


def generation_config(base_generation: dict | None, *, overrides: dict, model_config: dict,
                      end_of_turn_id: int | None) -> dict:
    """The base's generation_config.json overlaid with the spec's `generation` overrides, with eos ids covering the
    end-of-turn token (model_config: the base's config.json, whose eos_token_id applies when the former has none)."""
    config = dict(base_generation or {})
    config.update(overrides)
    if config.get("do_sample") is False:
        for key in SAMPLING_KEYS:
            if key not in overrides:
                config.pop(key, None)
    eos = config.get("eos_token_id", model_config.get("eos_token_id"))
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


def tokenizer_config(config: dict, chat_template: str) -> dict:
    """tokenizer_config.json with the shipped chat template inside it (older loaders read it only there)."""
    return {**config, "chat_template": chat_template}


def adapter_config(config: dict, *, base: str) -> dict:
    """The separate-mode adapter_config.json: its base is `base`, never a training-machine path.

    base: the base's Hub id when its config names one, else the bundle's name. Never "..": peft resolves a relative
    base_model_name_or_path against the working directory, not the adapter folder, so ".." named whatever folder the
    loader ran in. peft's PeftModel.from_pretrained(base, "NAME/adapter") and vLLM's --lora-modules do not read it.
    """
    # Keys newer peft writes that older peft (< 0.14) rejects are left out while they hold their default,
    # i.e. while they change nothing; a key that is switched on stays, and old peft refuses it loudly.
    clean = {key: value for key, value in config.items()
             if key in PEFT_0_13_LORA_KEYS or not _is_lora_default(key, value)}
    clean["base_model_name_or_path"] = base
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



# Opens a chat template that carries the spec's system prompt (default_system_template): a Jinja comment, which
# renders as nothing.
DEFAULT_SYSTEM_MARK = "{# modelpack: a conversation that does not open with a system message gets chat.system_prompt #}"
# Conversations default_system_template is checked on: with a system message (rendered byte for byte as before) and
# without one, one turn and several.
_CONVERSATIONS = (
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
     {"role": "user", "content": "And then?"}],
)


def default_system_template(template: str, system_prompt: str, tokenizer_config: dict | None) -> str | None:
    """The chat template with the spec's system prompt as its default: a conversation whose first message is not a
    system message is rendered as if it opened with one holding system_prompt, and every other conversation byte
    for byte as before. So a client of a server (vLLM, SGLang, llama-server) that sends no system message gets the
    answer load.py gives, which sends the bundle's system prompt itself.

    None where the template cannot carry it, checked by rendering both forms: a template without a system role (it
    raises on one, as Gemma's do, or renders another prompt than the default's), or one the wrapper would change.
    """
    literal = json.dumps(system_prompt, ensure_ascii=False)  # a JSON string is a Jinja string literal
    wrapped = (f"{DEFAULT_SYSTEM_MARK}{{% if not (messages and messages[0]['role'] == 'system') %}}"
               f"{{% set messages = [{{'role': 'system', 'content': {literal}}}] + messages %}}{{% endif %}}{template}")
    tokens = {}
    for key in TEMPLATE_TOKEN_KEYS:
        value = (tokenizer_config or {}).get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            tokens[key] = value
    original, carrying = compile_chat_template(template), compile_chat_template(wrapped)
    system = [{"role": "system", "content": system_prompt}]
    try:
        for conversation in _CONVERSATIONS:
            for prompt in (True, False):
                with_system = original.render(messages=system + conversation, add_generation_prompt=prompt, **tokens)
                if system_prompt not in with_system:  # the template drops or rewrites system messages
                    return None
                if (carrying.render(messages=conversation, add_generation_prompt=prompt, **tokens) != with_system
                        or carrying.render(messages=system + conversation, add_generation_prompt=prompt,
                                           **tokens) != with_system):
                    return None
    except ChatTemplateError:  # no system role (raise_exception), or a template that refuses the probes
        return None
    return wrapped
