"""Unusual but valid bases (no generation_config.json, eos null, no chat template, a tokenizer without special
tokens): the build writes a card and loader facts with every template variable present, or refuses with exit 2."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from builder.cli import app
from builder.render import FACT_FIELDS, FACTS_FILE
from helpers import CORPUS, assert_user_error, write_spec

# A chat template that needs no special token (no end-of-turn token to find).
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}assistant: {% endif %}")


def save_plain_tokenizer(folder: Path) -> None:
    """A byte-level BPE with no special tokens at all (no eos, pad, bos or unk) and a plain chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, chat_template=PLAIN_TEMPLATE).save_pretrained(folder)


def no_generation_config(folder: Path) -> None:
    (folder / "generation_config.json").unlink()


def eos_null(folder: Path) -> None:
    for name in ("config.json", "generation_config.json"):
        config = json.loads((folder / name).read_text())
        config["eos_token_id"] = None
        (folder / name).write_text(json.dumps(config))


def no_chat_template(folder: Path) -> None:
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


def no_special_tokens(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (folder / name).unlink(missing_ok=True)
    save_plain_tokenizer(folder)


def everything_at_once(folder: Path) -> None:
    for change in (eos_null, no_generation_config, no_special_tokens):
        change(folder)


@pytest.mark.parametrize("change", [no_generation_config, eos_null, no_special_tokens, everything_at_once],
                         ids=lambda change: change.__name__)
def test_an_unusual_base_builds_a_card_and_loader_facts_with_every_variable(tmp_path, models, adapters, change):
    original = models("qwen2", tied=True, dtype=torch.float32)
    base = shutil.copytree(original, tmp_path / "base")
    change(base)
    spec = write_spec(tmp_path, base, adapters(original), card={"description": "An unusual base."},
                      verify={"prompts": [{"prompt": "你好"}], "probes": [{"prompt": "Hello"}]})
    result = CliRunner().invoke(app, ["build", str(spec), "--no-verify"])
    assert result.exit_code == 0, result.output
    bundle = tmp_path / "dist" / "tiny-med"
    card = ModelCard.load(bundle / "README.md")  # every variable was present: the render is StrictUndefined
    assert card.data.to_dict()["library_name"] == "transformers"
    assert "An unusual base." in card.text
    assert "None" not in card.text.replace("`None`", ""), card.text
    facts = json.loads((bundle / FACTS_FILE).read_text())
    assert set(facts) == set(FACT_FIELDS)
    assert facts["has_chat_template"] is True
    generation = json.loads((bundle / "generation_config.json").read_text())
    if change in (no_special_tokens, everything_at_once):
        assert facts["end_of_turn_token"] is None
    else:
        assert facts["end_of_turn_token"] == "<|im_end|>"
        eos = generation["eos_token_id"]
        assert 2 in (eos if isinstance(eos, list) else [eos])
    if change is everything_at_once:  # nothing names an eos: none is invented
        assert "eos_token_id" not in generation


def test_a_base_without_chat_template_or_model_code_is_refused_naming_chat_template(tmp_path, models, adapters):
    original = models("qwen2", tied=True, dtype=torch.float32)
    base = shutil.copytree(original, tmp_path / "base")
    no_chat_template(base)
    spec = write_spec(tmp_path, base, adapters(original))
    result = CliRunner().invoke(app, ["build", str(spec), "--dry-run"])
    assert_user_error(result, 2, f"the tokenizer in {base} has no chat template", "`chat.template`")
    (tmp_path / "chat.jinja").write_text(PLAIN_TEMPLATE)
    spec = write_spec(tmp_path, base, adapters(original), chat={"template": "chat.jinja"})
    assert CliRunner().invoke(app, ["build", str(spec), "--no-verify"]).exit_code == 0
