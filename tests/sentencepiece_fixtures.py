"""Tiny SentencePiece tokenizers with the settings of the families that publish one (Llama 2 and Mistral v0.1,
Mistral v0.3, Gemma, Phi-3): a BPE tokenizer.model trained by sentencepiece itself, and the Hugging Face tokenizer
transformers makes from it (tokenizer.json, tokenizer_config.json), with the family's special tokens and template.

The settings copied from the published tokenizer.model files: BPE with byte fallback (the <0x00>...<0xFF> pieces),
digits split one by one, no whitespace collapsing, Llama's dummy prefix (Gemma has none); the special ids (Llama:
<unk> 0, <s> 1, </s> 2; Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3); Mistral v0.3's [INST] and [/INST] control pieces
right after them; Gemma's <start_of_turn>/<end_of_turn> and whitespace runs as user-defined pieces; Phi-3's chat
tokens added after the 32000-style vocabulary as special tokens that strip the whitespace after them (its
tokenizer.json's rstrip). Llama 2, Mistral and Phi-3 declare `legacy: true` (a space prefixed after special tokens
too, as their published tokenizer.json's Prepend normalizer does).

    save_sentencepiece_tokenizer(folder, "gemma")                   # tokenizer.model + tokenizer.json
    save_sentencepiece_tokenizer(folder, "llama2", json_only=True)  # tokenizer.json alone
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

# Text with digit runs, whitespace runs and contractions; CJK and emoji come out of byte fallback.
SENTENCEPIECE_CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "In 2024, 1234567 people said: I'm sure you're RIGHT, they've gone... 3.14159 and 2048 or 365 days.",
    "We'll see 100 or 250 of them; it's 12:30 and 99 more, don't worry.",
    "我家宝宝六个月，吃奶、睡觉常常满头冒汗。",
    "The   model  answers\tin\n\nparagraphs, naïve café.",
] * 30
LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}{% endfor %}"
)
# Mistral v0.3's template writes "[INST] " + content; llama.cpp prefixes a space after every special token, so
# that extra space would make its tokens differ (see the report); here the content follows [INST] directly.
MISTRAL_V3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ '[INST]' + message['content'] + '[/INST]' }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + '\n' + message['content'] + '<|end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' + '\n' }}{% endif %}"
)
# Phi-3-mini's tokens after the Llama 2 vocabulary (ids 32000...), in order; all but <|endoftext|> strip the
# whitespace after them.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


@dataclass(frozen=True)
class SentencePieceFamily:
    """One family's tokenizer.model settings and the Hugging Face tokenizer built from it."""

    ids: dict[str, int]  # sentencepiece's unk/bos/eos/pad ids (-1: none)
    dummy_prefix: bool
    template: str
    control: tuple[str, ...] = ()
    user_defined: tuple[str, ...] = ()
    added: tuple[str, ...] = ()  # special tokens added after the pieces, which strip the whitespace after them
    tokenizer_class: str = "LlamaTokenizer"
    options: dict = field(default_factory=dict)  # the tokenizer_config.json settings
    pieces: dict = field(default_factory=dict)  # the special pieces' names, where not sentencepiece's own

    @property
    def eos_id(self) -> int:
        return self.ids["eos_id"]


LLAMA_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": -1}
SENTENCEPIECE_FAMILIES = {
    "llama2": SentencePieceFamily(LLAMA_IDS, True, LLAMA2_TEMPLATE, options={"legacy": True}),
    "mistral-v3": SentencePieceFamily(LLAMA_IDS, True, MISTRAL_V3_TEMPLATE, control=("[INST]", "[/INST]"),
                                      options={"legacy": True}),
    "gemma": SentencePieceFamily(
        {"pad_id": 0, "eos_id": 1, "bos_id": 2, "unk_id": 3}, False, GEMMA_TEMPLATE,
        user_defined=("<start_of_turn>", "<end_of_turn>", "\n\n", "▁▁", "▁▁▁"),
        tokenizer_class="GemmaTokenizer", pieces={"bos_piece": "<bos>", "eos_piece": "<eos>"}),
    "phi3": SentencePieceFamily(LLAMA_IDS, True, PHI3_TEMPLATE, added=tuple(PHI3_ADDED), options={"legacy": True}),
}
# Pieces in every tiny tokenizer.model (259 of them bytes and specials; the rest merges and characters).
SENTENCEPIECE_VOCABULARY = 480


def train_sentencepiece(family: str, **changed) -> bytes:
    """A tokenizer.model with the family's settings (or SentencePieceTrainer's options `changed`: model_type,
    byte_fallback...), trained on SENTENCEPIECE_CORPUS."""
    import sentencepiece

    settings = SENTENCEPIECE_FAMILIES[family]
    model = io.BytesIO()
    options = dict(
        model_type="bpe", byte_fallback=True, split_digits=True, character_coverage=1.0,
        remove_extra_whitespaces=False, add_dummy_prefix=settings.dummy_prefix, normalization_rule_name="identity",
        allow_whitespace_only_pieces=True, control_symbols=list(settings.control),
        user_defined_symbols=list(settings.user_defined), vocab_size=SENTENCEPIECE_VOCABULARY, **settings.ids,
        **settings.pieces,
    )
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCEPIECE_CORPUS), model_writer=model,
                                             minloglevel=2, **{**options, **changed})
    return model.getvalue()


def save_sentencepiece_tokenizer(folder: Path, family: str, *, json_only: bool = False,
                                 model: bytes | None = None) -> Path:
    """The family's tokenizer files in `folder`: tokenizer.model (unless json_only) and what transformers saves of
    the tokenizer it builds from it. `model` replaces the trained tokenizer.model (a planted setting)."""
    import transformers

    settings = SENTENCEPIECE_FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model or train_sentencepiece(family))
    tokenizer_class = getattr(transformers, settings.tokenizer_class)
    tokenizer = tokenizer_class.from_pretrained(folder, chat_template=settings.template, **settings.options)
    if settings.added:
        from tokenizers import AddedToken

        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(token, rstrip=token != "<|endoftext|>", normalized=False, special=True)
            for token in settings.added]})
    if settings.control:
        tokenizer.add_special_tokens({"additional_special_tokens": list(settings.control)})
    if settings.user_defined[:2] == ("<start_of_turn>", "<end_of_turn>"):
        tokenizer.add_special_tokens({"additional_special_tokens": list(settings.user_defined[:2])})
    tokenizer.save_pretrained(folder)
    # As the families publish it: without the path GemmaTokenizer saves (vocab_file), with `legacy`, which
    # transformers 5 does not save and reads as false when missing.
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.pop("vocab_file", None)
    config_file.write_text(json.dumps({**config, **settings.options}, indent=2, ensure_ascii=False), encoding="utf-8")
    if json_only:
        (folder / "tokenizer.model").unlink()
    return folder


def sentencepiece_rows(family: str) -> int:
    """Embedding rows that hold the family's tokenizer: its pieces and added tokens, rounded up."""
    return SENTENCEPIECE_VOCABULARY + 32
