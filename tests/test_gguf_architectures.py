"""Every architecture the GGUF export knows, proven in llama.cpp: a tiny random model of it with a LoRA and its
family's tokenizer (byte-level BPE, or SentencePiece from tokenizer.model or tokenizer.json alone), exported as bf16
and q8_0, verified by the GGUF check (the probe text's and every prompt's tokens, greedy answers against the bundle's
in transformers); a wrong but known pre-tokenizer and a flipped SentencePiece space prefix caught by that check; and
tokenizers llama.cpp would tokenize otherwise refused at validate."""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from builder import gguf_export
from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import VerificationError
from builder.gguf_facts import ARCHITECTURES, read_sentencepiece_model
from helpers import (
    CHATML_TEMPLATE,
    CORPUS,
    RUNTIME,
    SPECIAL_TOKENS,
    assert_user_error,
    import_file,
    make_adapter,
    write_spec,
)
from sentencepiece_fixtures import (
    SENTENCEPIECE_FAMILIES,
    save_sentencepiece_tokenizer,
    sentencepiece_rows,
    train_sentencepiece,
)

pytest.importorskip("llama_cpp")
# The runtime scripts, imported by path as modelpack runs them (gguf_check finds its sibling equivalence.py).
sys.path.insert(0, str(RUNTIME))
gguf_check = import_file(RUNTIME / "gguf_check.py")
sys.path.remove(str(RUNTIME))
TOLERANCES = gguf_check.TOLERANCES

# The pre-tokenizers' Split regexes as the families publish them in tokenizer.json (Qwen2.5/Qwen3, Llama 3).
_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_REST = r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    "qwen2": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|" + _REST,
    "llama-bpe": _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|" + _REST,
}
# Text with digit runs and contractions, so that the trained merges span what each pre-tokenizer splits apart.
TOKENIZER_CORPUS = CORPUS + [
    "In 2024, 1234567 people said: I'm sure you're RIGHT, they've gone... 3.14159 and 2048 or 365 days.",
    "We'll see 100 or 250 of them; it's 12:30 and 99 more, don't worry.",
] * 20
SMALL = dict(vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, bos_token_id=None, eos_token_id=2, pad_token_id=0)
# Hugging Face architecture -> its config class, the class's keyword arguments, the family's tokenizer: a byte-level
# BPE pre-tokenizer's name, or "sentencepiece:<family>" (sentencepiece_fixtures.SENTENCEPIECE_FAMILIES, the
# tokenizer.model with its tokenizer.json).
MODELS = {
    "Qwen3ForCausalLM": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True), "qwen2"),
    # Llama 3.2's shape: tied embeddings, Llama 3's rope scaling (a rope_freqs tensor in llama.cpp)
    "LlamaForCausalLM": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}), "llama-bpe"),
    "MistralForCausalLM": ("MistralConfig", dict(head_dim=16, sliding_window=None, tie_word_embeddings=False),
                           "sentencepiece:mistral-v3"),
    "MixtralForCausalLM": ("MixtralConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                                                 tie_word_embeddings=False), "llama-bpe"),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2,
                                                   moe_intermediate_size=64, norm_topk_prob=True,
                                                   tie_word_embeddings=False), "qwen2"),
    "SmolLM3ForCausalLM": ("SmolLM3Config", dict(tie_word_embeddings=True), "llama-bpe"),
    "GraniteForCausalLM": ("GraniteConfig", dict(tie_word_embeddings=True, attention_multiplier=0.25,
                                                 embedding_multiplier=2.0, residual_multiplier=0.5,
                                                 logits_scaling=1.5), "gpt-2"),
    "Gemma2ForCausalLM": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                               tie_word_embeddings=True), "sentencepiece:gemma"),
    "Gemma3ForCausalLM": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=16, sliding_window=512,
                                                   tie_word_embeddings=True), "sentencepiece:gemma"),
    "Phi3ForCausalLM": ("Phi3Config", dict(original_max_position_embeddings=128, tie_word_embeddings=False),
                        "sentencepiece:phi3"),
    "Olmo2ForCausalLM": ("Olmo2Config", dict(tie_word_embeddings=False), "gpt-2"),
    "Starcoder2ForCausalLM": ("Starcoder2Config", dict(tie_word_embeddings=True, use_bias=True, norm_epsilon=1e-5),
                              "gpt-2"),
    # Pythia's shape: a quarter of each head roped, parallel residual, the fused QKV its own way
    "GPTNeoXForCausalLM": ("GPTNeoXConfig", dict(num_key_value_heads=None, tie_word_embeddings=False,
                                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.25}), "gpt-2"),
}
# The LoRA's modules: the attention projections (GPT-NeoX's and Phi-3's fused QKV and output)
TARGETS = {"GPTNeoXForCausalLM": ["query_key_value", "dense"], "Phi3ForCausalLM": ["qkv_proj", "o_proj"]}
# Phi-3 with seed 0 answers the digits prompt in llama.cpp like transformers for 7 tokens, then parts at a near tie
# just past bfloat16's tolerance (margin 0.148, tolerance 0.146) while every prompt position's logits agree within
# 0.03: a tie the rule cannot call, not an export error; seed 1 has none. Gemma 2 with seed 0 fails the bundle's own
# equivalence check against peft's unmerged model (max |delta logit| 0.197 vs bfloat16's 0.165), before any GGUF.
SEEDS = {"Phi3ForCausalLM": 1, "Gemma2ForCausalLM": 1}
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def save_family_tokenizer(folder: Path, pre: str) -> None:
    """A byte-level BPE tokenizer trained with the family's pre-tokenizer, ChatML specials and template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLITS[pre]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(TOKENIZER_CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHATML_TEMPLATE).save_pretrained(folder)


def make_family_model(folder: Path, architecture: str, tokenizer: str | None = None, *,
                      json_only: bool = False, seed: int | None = None) -> Path:
    """A tiny random model of the architecture with the family's tokenizer (or `tokenizer`, MODELS' third column);
    a SentencePiece one without its tokenizer.model when json_only."""
    import transformers

    config_class, options, family_tokenizer = MODELS[architecture]
    tokenizer = tokenizer or family_tokenizer
    sentencepiece = tokenizer.removeprefix("sentencepiece:") if tokenizer.startswith("sentencepiece:") else None
    ids = {}
    if sentencepiece is not None:  # the family's special ids, and room for its tokenizer
        family = SENTENCEPIECE_FAMILIES[sentencepiece]
        ids = dict(vocab_size=sentencepiece_rows(sentencepiece), eos_token_id=family.eos_id,
                   bos_token_id=family.ids["bos_id"], pad_token_id=max(family.ids["pad_id"], 0))
    config = getattr(transformers, config_class)(**{**SMALL, **options, **ids})
    torch.manual_seed(SEEDS.get(architecture, 0) if seed is None else seed)
    model = getattr(transformers, architecture)(config)
    model.generation_config = transformers.GenerationConfig(eos_token_id=config.eos_token_id,
                                                            pad_token_id=config.pad_token_id)
    model.save_pretrained(folder)
    if sentencepiece is not None:
        save_sentencepiece_tokenizer(folder, sentencepiece, json_only=json_only)
    else:
        save_family_tokenizer(folder, tokenizer)
    return folder


def family_spec(root: Path, architecture: str, tokenizer: str | None = None, *, json_only: bool = False,
                seed: int | None = None) -> Path:
    base = make_family_model(root / "base", architecture, tokenizer, json_only=json_only, seed=seed)
    targets = TARGETS.get(architecture, ATTENTION)
    adapter = make_adapter(root / "adapter" / "checkpoint-10", base, target_modules=targets)
    prompts = [{"prompt": "In 2024, I'm sure 1234567 is right."}]
    return write_spec(root, base, adapter, output={"dtype": "bfloat16"}, export={"gguf": {"types": ["bf16", "q8_0"]}},
                      verify={"max_new_tokens": 16, "prompts": prompts, "probes": [{"prompt": "你好"}]})


def test_every_architecture_has_a_model_here():
    assert set(MODELS) == set(ARCHITECTURES) - {"Qwen2ForCausalLM", "QWenLMHeadModel"}  # test_gguf_check, _export


def next_token_logits(bundle: Path, gguf_file: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Both runtimes' next-token logits at every prompt position: transformers over the bundle (its bfloat16 weights,
    as load.py loads them) and llama.cpp over the GGUF file (its plain CPU buffers, as gguf_check loads it)."""
    import llama_cpp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    with gguf_check.plain_cpu_buffers(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    return expected, np.array(llm.scores[:len(ids)])


# Other tokenizers of an architecture, each proven the same way: (architecture, tokenizer, tokenizer.json alone,
# seed). Llama 2's shape with seed 0 parts from peft's unmerged answer just past bfloat16's tolerance (0.1672 vs
# 0.1648) in the bundle's own equivalence check, before any GGUF.
VARIANTS = {
    "Llama2-tokenizer.json": ("LlamaForCausalLM", "sentencepiece:llama2", True, 1),
    "Gemma2-tokenizer.json": ("Gemma2ForCausalLM", None, True, None),
}
CASES = {architecture: (architecture, None, False, None) for architecture in sorted(MODELS)} | VARIANTS


@pytest.mark.parametrize("case", CASES)
def test_the_architecture_answers_in_llama_cpp_like_the_bundle(case, tmp_path):
    """The GGUF check passes: every file's probe text and prompts tokenize as the bundle's tokenizer does, bf16
    answers equal the bfloat16 bundle's or part only at a near tie (q8_0 is reported), answers run the whole 16
    tokens; and llama.cpp's next-token logits over the bf16 file at every prompt position are transformers' over
    the bundle within bfloat16's tolerance."""
    architecture, tokenizer, json_only, seed = CASES[case]
    spec = family_spec(tmp_path, architecture, tokenizer, json_only=json_only, seed=seed)
    assert (tmp_path / "base" / "tokenizer.model").is_file() is (MODELS[architecture][2].startswith("sentencepiece")
                                                                 and not json_only)
    report = build_bundle(plan_from_spec(spec), verify=True, device="cpu").verification
    gguf = report["gguf"]
    assert report["ok"] and gguf["ok"], json.dumps(gguf, indent=1, ensure_ascii=False)[:3000]
    by_type = {f["type"]: f for f in gguf["files"]}
    assert set(by_type) == {"bf16", "q8_0"} and by_type["bf16"]["exact"]
    for file in gguf["files"]:
        assert file["tokenization"] is None
        assert all(a["prompt_difference"] is None and not a["failures"] for a in file["answers"])
    assert all(a["equal"] or a["difference"]["near_tie"] for a in by_type["bf16"]["answers"])
    from transformers import AutoTokenizer

    bundle = tmp_path / "dist" / "tiny-med"
    tokenizer = AutoTokenizer.from_pretrained(bundle)
    for result in report["prompts"] + report["probes"]:  # no early end of sequence
        assert len(tokenizer(result["answer"], add_special_tokens=False).input_ids) >= 12, result
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "In 2024, I'm sure 1234567 is right."}],
                                        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    expected, got = next_token_logits(bundle, bundle / "gguf" / "tiny-med-bf16.gguf", ids)
    atol, rtol = TOLERANCES["bfloat16"]
    worst = np.abs(got - expected).max(axis=1)
    tolerance = atol + rtol * np.abs(expected).max(axis=1)
    print(f"{case}: max |delta logit| {worst.max():.4f}, tolerance {tolerance.min():.4f}")
    assert (worst <= tolerance).all(), (worst, tolerance)


def test_a_wrong_but_known_pre_tokenizer_fails_verification(tmp_path, monkeypatch):
    """Llama 3's tokenizer written as Qwen2's (llama.cpp knows both names and loads the file): digits split one by
    one instead of in threes, so the probe text's tokens differ and verification fails, naming the probe."""
    spec = family_spec(tmp_path, "LlamaForCausalLM")
    monkeypatch.setattr(gguf_export, "pre_tokenizer", lambda tokenizer, tokenizer_file, arch: "qwen2")
    with pytest.raises(VerificationError) as failed:
        build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    message = str(failed.value)
    assert "tokens of the probe text differ" in message and "pre-tokenizer" in message


def test_a_config_llama_cpp_would_not_follow_is_refused_at_validate(tmp_path):
    """Qwen3-MoE without renormalised expert weights: llama.cpp's qwen3moe always renormalises, so it would answer
    otherwise; refused before any work, naming the architecture and the key."""
    spec = family_spec(tmp_path, "Qwen3MoeForCausalLM")
    config_file = tmp_path / "base" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "norm_topk_prob": False}))
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert_user_error(result, 2, str(config_file), "norm_topk_prob is False", "llama.cpp's qwen3moe")


def test_a_flipped_space_prefix_fails_verification(tmp_path, monkeypatch):
    """Mistral's SentencePiece vocabulary written without its dummy prefix (tokenizer.ggml.add_space_prefix false,
    a setting llama.cpp loads silently): the probe text's first word loses its ▁, so its tokens differ and
    verification fails (exit 3), naming the probe."""
    spec = family_spec(tmp_path, "MistralForCausalLM")
    source = gguf_export.vocabulary_source

    def flipped(arch, files):
        found = source(arch, files)
        assert found.kind == "SentencePiece" and found.space_prefix
        return dataclasses.replace(found, space_prefix=False)

    monkeypatch.setattr(gguf_export, "vocabulary_source", flipped)
    with pytest.raises(VerificationError) as failed:
        build_bundle(plan_from_spec(spec), verify=True, device="cpu")
    assert failed.value.exit_code == 3
    assert "tokens of the probe text differ" in str(failed.value)


@pytest.fixture(scope="module")
def gemma2_root(tmp_path_factory):
    """A Gemma 2 spec, base and adapter, with paths relative to the spec (so a copy of the folder is a spec too)."""
    root = tmp_path_factory.mktemp("gemma2")
    family_spec(root, "Gemma2ForCausalLM")
    return root


def unigram_model(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(train_sentencepiece("gemma", model_type="unigram", vocab_size=340))


def model_without_byte_fallback(folder: Path) -> None:
    (folder / "tokenizer.model").write_bytes(train_sentencepiece("gemma", byte_fallback=False, vocab_size=200))


def wordpiece_json(folder: Path) -> None:
    from tokenizers import Tokenizer, models

    (folder / "tokenizer.model").unlink()
    Tokenizer(models.WordPiece({"[UNK]": 0, "hello": 1, "##s": 2}, unk_token="[UNK]")).save(
        str(folder / "tokenizer.json"))


def normalized_json(folder: Path) -> None:
    (folder / "tokenizer.model").unlink()
    tokenizer = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    tokenizer["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "NFKC"}, tokenizer["normalizer"]]}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")


@pytest.mark.parametrize(("change", "culprit", "reason"), [
    (unigram_model, "tokenizer.model", "it is a Unigram model, not BPE"),
    (model_without_byte_fallback, "tokenizer.model", "it has no byte fallback"),
    (wordpiece_json, "tokenizer.json", "and this tokenizer is a WordPiece model"),
    (normalized_json, "tokenizer.json", '"type": "NFKC"'),
])
def test_a_tokenizer_llama_cpp_would_tokenize_otherwise_is_refused_at_validate(gemma2_root, tmp_path, change,
                                                                              culprit, reason):
    """SentencePiece tokenizers llama.cpp's merges by score cannot follow (a Unigram model, no byte fallback, a
    normalizer step it does not run) and a tokenizer of another kind are refused before any work, naming the file,
    the architecture and what is missing."""
    root = shutil.copytree(gemma2_root, tmp_path / "copy")
    change(root / "base")
    result = CliRunner().invoke(app, ["validate", str(root / "spec.yaml")])
    assert_user_error(result, 2, str(root / "base" / culprit), "gemma2 GGUF export", reason)


def test_gemma2_writes_its_soft_caps_and_a_sentencepiece_vocabulary(gemma2_root, tmp_path):
    """What llama.cpp reads besides the tensors: Gemma 2's soft-capping and sliding window, no lm_head, norms + 1;
    the vocabulary as llama.cpp's SentencePiece ("llama") model: scores, byte pieces typed BYTE, the chat tokens
    CONTROL, whitespace-run pieces USER_DEFINED in the raw text's spaces, no space prefix (Gemma's)."""
    from gguf import GGUFReader, TokenType

    root = shutil.copytree(gemma2_root, tmp_path / "copy")
    bundle = build_bundle(plan_from_spec(root / "spec.yaml"), verify=False).bundle
    reader = GGUFReader(bundle / "gguf" / "tiny-med-bf16.gguf")
    fields = {name: field.contents() for name, field in reader.fields.items()}
    assert fields["general.architecture"] == "gemma2"
    assert fields["gemma2.attn_logit_softcapping"] == 50.0 and fields["gemma2.final_logit_softcapping"] == 30.0
    assert fields["gemma2.attention.sliding_window"] == 512
    assert fields["gemma2.attention.key_length"] == fields["gemma2.attention.value_length"] == 16
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.pre"] == "default"
    assert fields["tokenizer.ggml.add_space_prefix"] is False
    tokens, types = fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]
    scores = fields["tokenizer.ggml.scores"]
    model = read_sentencepiece_model(root / "base" / "tokenizer.model")
    assert len(tokens) == len(scores) == sentencepiece_rows("gemma")
    # The specials and user-defined pieces (ids 0-8) are the tokenizer's added tokens too: the converter's -1000.
    assert scores[:len(model.pieces)] == [-1000.0] * 9 + [score for _, score, _ in model.pieces[9:]]
    assert [tokens[i] for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert types[tokens.index("<start_of_turn>")] == types[tokens.index("<end_of_turn>")] == TokenType.CONTROL
    assert types[tokens.index("  ")] == TokenType.USER_DEFINED and "▁▁" not in tokens
    assert [tokens[i] for i, t in enumerate(types) if t == TokenType.BYTE] == [f"<0x{b:02X}>" for b in range(256)]
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors
    norm = tensors["blk.0.post_ffw_norm.weight"]
    from safetensors import safe_open

    with safe_open(bundle / "model.safetensors", "pt") as weights:
        expected = weights.get_tensor("model.layers.0.post_feedforward_layernorm.weight").float().numpy() + 1
    assert np.array_equal(np.asarray(norm.data), expected)
