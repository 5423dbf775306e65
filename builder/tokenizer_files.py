"""The chat template and special tokens that tokenizer files declare, each file read once (no tokenizer is loaded)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from builder.errors import SourceError
from builder.sources import read_json, read_text

# Token strings a tokenizer config names, which templates use as variables (`{{ eos_token }}`).
TEMPLATE_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


@dataclass(frozen=True)
class TokenizerFiles:
    """The shipped tokenizer's declarations, each file read once."""

    template: str | None
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
    template_tokens = {}
    for key in TEMPLATE_TOKEN_KEYS:
        value = (config or {}).get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            template_tokens[key] = value
    template: str | None
    if template_file is not None:
        template = read_text(template_file)
    elif "chat_template.jinja" in by_name:
        template = read_text(by_name["chat_template.jinja"])
    else:
        template = (config or {}).get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one is what chat uses
            named = [t for t in template if isinstance(t, dict)]
            template = next((t.get("template") for t in named if t.get("name") == "default"), None)
        if template is not None and not isinstance(template, str):
            raise SourceError(f"{by_name['tokenizer_config.json']}: chat_template is {template!r}, not a Jinja "
                              "template text; fix it or give one with `chat.template` in the spec")
    return TokenizerFiles(template, special, template_tokens, config)
