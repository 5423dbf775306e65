"""The chat template and special tokens that tokenizer files declare, each file read once (no tokenizer is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.errors import SourceError
from builder.sources import read_json, read_text, require_text_path

# Token strings a tokenizer config names, which templates use as variables (`{{ eos_token }}`): those transformers'
# apply_chat_template passes (its SPECIAL_TOKENS_ATTRIBUTES, as of 5.25).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "sep_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class TokenizerFiles:
    """The shipped tokenizer's declarations, each file read once."""

    template: str | None
    template_source: str | None  # where the template was read, for messages: a file, or tokenizer_config.json's key
    special_ids: dict[str, int]
    template_tokens: dict[str, str]
    config: dict | None


def tokenizer_declarations(by_name: dict[str, Path], *, template_file: Path | None = None) -> TokenizerFiles:
    """The chat template and special tokens declared by tokenizer files (name -> path), each read once; a
    template_file replaces the files' own template."""
    config = read_json(by_name["tokenizer_config.json"]) if "tokenizer_config.json" in by_name else None
    special: dict[str, int] = {}
    if "tokenizer.json" in by_name:
        added = read_json(by_name["tokenizer.json"]).get("added_tokens", [])
        for token in added if isinstance(added, list) else [added]:
            if not (isinstance(token, dict) and isinstance(token.get("content"), str)
                    and type(token.get("id")) is int):
                raise SourceError(f"{by_name['tokenizer.json']}: added_tokens holds {str(token)[:80]}, not "
                                  '{"id": <integer>, "content": <text>, ...}')
            special[token["content"]] = token["id"]
    decoder = (config or {}).get("added_tokens_decoder", {})
    for token_id, token in (decoder.items() if isinstance(decoder, dict) else [("", decoder)]):
        if not (str(token_id).isdigit() and isinstance(token, dict) and isinstance(token.get("content"), str)):
            raise SourceError(f"{by_name['tokenizer_config.json']}: added_tokens_decoder holds "
                              f"{str(token_id)[:40]!r}: {str(token)[:80]}, not \"<id>\": {{\"content\": <text>, ...}}")
        special[token["content"]] = int(token_id)
    template, source = declared_template(by_name, config, template_file=template_file)
    return TokenizerFiles(template, source, special, template_variables(config), config)


def template_variables(config: dict | None) -> dict[str, str]:
    """The token strings a tokenizer config names, as templates see them (`{{ eos_token }}`)."""
    found = {}
    for key in TEMPLATE_TOKEN_KEYS:
        value = (config or {}).get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            found[key] = value
    return found


def declared_template(by_name: dict[str, Path], config: dict | None, *,
                      template_file: Path | None = None) -> tuple[str | None, str | None]:
    """The chat template chat uses, and where it was read: template_file (the spec's chat.template), else the
    tokenizer's chat_template.jinja, else tokenizer_config.json's chat_template (its "default" one when named)."""
    if template_file is not None:
        require_text_path(template_file, "chat.template")
        return read_text(template_file), str(template_file)
    if "chat_template.jinja" in by_name:
        return read_text(by_name["chat_template.jinja"]), str(by_name["chat_template.jinja"])
    template = (config or {}).get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one is what chat uses
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    if template is not None and not isinstance(template, str):
        raise SourceError(f"{by_name['tokenizer_config.json']}: chat_template is {template!r}, not a Jinja "
                          "template text; fix it or give one with `chat.template` in the spec")
    return template, f"{by_name['tokenizer_config.json']} (its chat_template)" if template is not None else None
