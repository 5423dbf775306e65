"""GGUF export: built from real tiny bundles, read back by two independent readers (transformers' own GGUF loader
and gguf's GGUFReader), tensors and tokenizer compared with the bundle; refusals before any work."""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from builder import gguf_export, gguf_facts
from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.errors import SourceError, VerificationError
from builder.gguf_export import (
    GgufTensor,
    StreamedTensor,
    converted_blocks,
    plan_gguf_tensors,
    tensor_type,
    tiktoken_merge,
)
from builder.gguf_facts import ARCHITECTURES, interleave_rotary_halves, pre_tokenizer, qkv_grouped_by_kind
from builder.manifest import sha256_file
from builder.safetensors_io import read_safetensors_header
from builder.trust import bundle_digest, require_integrity
from helpers import (
    CHATML_TEMPLATE,
    SEED_SAMPLES,
    assert_user_error,
    bundle_tensors,
    import_file,
    qwen_base,
    random_checkpoint,
    write_spec,
)
from sentencepiece_fixtures import (
    SENTENCEPIECE_FAMILIES,
    SENTENCEPIECE_VOCABULARY,
    save_sentencepiece_tokenizer,
    train_sentencepiece,
)

TYPES = ["bf16", "f16", "q8_0"]
SAMPLES = ["Hello world, this is a tiny corpus.", "我家宝宝六个月，吃奶、睡觉常常满头冒汗。", "I've 333 ideas!\n\n  ok",
           "<|im_start|>user\n什么是机器学习？<|im_end|>\n<|im_start|>assistant\n"]
# tokenizer.json pre_tokenizer sections as Qwen2.5 and Llama 3 publish them.
QWEN2_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": gguf_facts._CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                                  + gguf_facts._REST}, "behavior": "Isolated", "invert": False},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
LLAMA3_PRE = json.loads(json.dumps(QWEN2_PRE).replace(r"\\p{N}|", r"\\p{N}{1,3}|"))


@functools.cache
def reader(path: Path) -> gguf.GGUFReader:
    """Each file parsed once: GGUFReader takes seconds over a 152k-token vocabulary."""
    return gguf.GGUFReader(path)


def reader_fields(path: Path) -> dict:
    return {name: field.contents() for name, field in reader(path).fields.items()}


def gguf_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a GGUF file as float32 in Hugging Face's (row-major) shape, dequantized by gguf itself."""
    tensors = {}
    for tensor in reader(path).tensors:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        tensors[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32))
    return tensors


def exported(models, adapters, tmp_path_factory, arch: str, *, tied: bool) -> Path:
    base = models(arch, tied=tied, dtype=torch.bfloat16)
    folder = tmp_path_factory.mktemp(f"gguf-{arch}")
    spec = write_spec(folder, base, adapters(base), export={"gguf": {"types": TYPES}})
    return build_bundle(plan_from_spec(spec), verify=False).bundle


@pytest.fixture(scope="module")
def qwen2_bundle(models, adapters, tmp_path_factory):
    return exported(models, adapters, tmp_path_factory, "qwen2", tied=True)


@pytest.fixture(scope="module")
def llama_bundle(models, adapters, tmp_path_factory):
    return exported(models, adapters, tmp_path_factory, "llama", tied=False)


@pytest.fixture(scope="module")
def qwen_v1_bundle(tmp_path_factory):
    root = tmp_path_factory.getbasetemp() / "qwen_v1"
    base, checkpoint = qwen_base(root), random_checkpoint(root)
    spec = write_spec(tmp_path_factory.mktemp("gguf-qwen-v1"), base, checkpoint, name="qwen-med",
                      base={"trust_remote_code": True}, output={"dir": "dist/qwen-med", "dtype": "bfloat16"},
                      export={"gguf": {"types": ["bf16"]}})
    return build_bundle(plan_from_spec(spec), verify=False).bundle


# --- transformers' own GGUF reader: the tensors and tokenizer are the bundle's ----------------------------------


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_transformers_reads_the_bundles_tensors(arch, qwen2_bundle, llama_bundle):
    """bf16 equals the bf16 bundle exactly, f16 equals its f16 rounding exactly, q8_0 stays within a quantization step;
    for Llama transformers undoes the q/k permutation, so equality also proves the permutation."""
    from transformers import AutoModelForCausalLM

    bundle = qwen2_bundle if arch == "qwen2" else llama_bundle
    expected = bundle_tensors(bundle)
    for gguf_type in TYPES:
        model = AutoModelForCausalLM.from_pretrained(bundle / "gguf", gguf_file=f"tiny-med-{gguf_type}.gguf",
                                                     dtype=torch.float32)
        loaded = model.state_dict()
        assert set(expected) <= set(loaded)
        worst = 0.0
        for name, tensor in expected.items():
            got = loaded[name]
            if gguf_type == "bf16" or tensor.dim() == 1:  # 1-D tensors are F32 in every type
                assert torch.equal(got, tensor.float()), name
            elif gguf_type == "f16":
                assert torch.equal(got, tensor.to(torch.float16).float()), name
            else:  # Q8_0: blocks of 32 with an fp16 scale amax/127; the error is at most half a step plus the
                # scale's rounding, so below one step of the tensor's largest block
                error = (got - tensor.float()).abs().max().item()
                assert error <= tensor.float().abs().max().item() / 127, (name, error)
                worst = max(worst, error)
        if gguf_type == "q8_0":
            print(f"{arch} q8_0 max abs error {worst:.5f}")
            assert 0 < worst


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_transformers_reads_the_bundles_tokenizer(arch, qwen2_bundle, llama_bundle):
    from transformers import AutoTokenizer

    bundle = qwen2_bundle if arch == "qwen2" else llama_bundle
    shipped = AutoTokenizer.from_pretrained(bundle)
    for gguf_type in TYPES:
        tokenizer = AutoTokenizer.from_pretrained(bundle / "gguf", gguf_file=f"tiny-med-{gguf_type}.gguf")
        for sample in SAMPLES:
            assert tokenizer(sample).input_ids == shipped(sample).input_ids, sample
        assert tokenizer.eos_token == "<|im_end|>"


def test_metadata_and_tokenizer_fields(qwen2_bundle, llama_bundle):
    for bundle, arch in ((qwen2_bundle, "qwen2"), (llama_bundle, "llama")):
        config = json.loads((bundle / "config.json").read_text())
        tokenizer = json.loads((bundle / "tokenizer.json").read_text())
        for gguf_type, file_type in (("bf16", 32), ("f16", 1), ("q8_0", 7)):
            fields = reader_fields(bundle / "gguf" / f"tiny-med-{gguf_type}.gguf")
            assert fields["general.architecture"] == arch
            assert fields["general.name"] == "tiny-med"
            assert fields["general.file_type"] == file_type
            assert fields[f"{arch}.block_count"] == config["num_hidden_layers"] == 2
            assert fields[f"{arch}.context_length"] == 256
            assert fields[f"{arch}.embedding_length"] == 64
            assert fields[f"{arch}.feed_forward_length"] == 128
            assert fields[f"{arch}.attention.head_count"] == 4
            assert fields[f"{arch}.attention.head_count_kv"] == 2
            assert fields[f"{arch}.rope.freq_base"] == 10000.0
            assert fields[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)
            assert fields["tokenizer.ggml.model"] == "gpt2"
            assert fields["tokenizer.ggml.pre"] == "gpt-2"  # the fixtures' tokenizer: GPT-2's ByteLevel split
            assert len(fields["tokenizer.ggml.tokens"]) == config["vocab_size"] == 416
            assert fields["tokenizer.ggml.tokens"][2] == "<|im_end|>"
            assert fields["tokenizer.ggml.tokens"][-1] == "[PAD415]"  # rows past the tokenizer
            assert fields["tokenizer.ggml.token_type"][2] == gguf.TokenType.CONTROL
            assert len(fields["tokenizer.ggml.merges"]) == len(tokenizer["model"]["merges"])
            assert fields["tokenizer.ggml.eos_token_id"] == fields["tokenizer.ggml.eot_token_id"] == 2
            assert fields["tokenizer.ggml.padding_token_id"] == 0
            assert fields["tokenizer.chat_template"] == CHATML_TEMPLATE
        assert (f"{arch}.vocab_size" in fields) == (arch == "llama")  # as the converter writes them
        assert fields.get(f"{arch}.rope.dimension_count") == (16 if arch == "llama" else None)


def test_tied_head_is_not_written_untied_head_is(qwen2_bundle, llama_bundle):
    """llama.cpp reads a missing output.weight as tied to token_embd.weight, so a tied model writes none."""
    tied = {t.name for t in gguf.GGUFReader(qwen2_bundle / "gguf" / "tiny-med-bf16.gguf").tensors}
    untied = {t.name: t for t in gguf.GGUFReader(llama_bundle / "gguf" / "tiny-med-q8_0.gguf").tensors}
    assert "output.weight" not in tied and "token_embd.weight" in tied
    assert untied["output.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert untied["output_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32  # norms stay F32
    assert untied["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32


def test_exports_are_in_the_manifest_and_its_integrity_check(qwen2_bundle, tmp_path):
    manifest = json.loads((qwen2_bundle / "manifest.json").read_text())
    for gguf_type in TYPES:
        name = f"gguf/tiny-med-{gguf_type}.gguf"
        assert manifest["files"][name]["sha256"] == sha256_file(qwen2_bundle / name)
    assert require_integrity(qwen2_bundle, expected_digest=bundle_digest(qwen2_bundle)).ok
    changed = shutil.copytree(qwen2_bundle, tmp_path / "tiny-med")
    with open(changed / "gguf" / "tiny-med-q8_0.gguf", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(VerificationError, match="gguf/tiny-med-q8_0.gguf"):
        require_integrity(changed)


# --- Qwen v1 (transformers cannot read its GGUF): GGUFReader against the merged weights and tiktoken -----------


@pytest.mark.slow
def test_qwen_v1_tensors_are_the_merged_weights(qwen_v1_bundle):
    expected = bundle_tensors(qwen_v1_bundle)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN, 2)
    tensors = gguf_tensors(qwen_v1_bundle / "gguf" / "qwen-med-bf16.gguf")
    assert len(tensors) == len(expected)
    for name, tensor in expected.items():
        got = tensors[names.get_name(name, try_suffixes=(".weight", ".bias"))]
        assert torch.equal(got.reshape(tensor.shape), tensor.float()), name
    fields = reader_fields(qwen_v1_bundle / "gguf" / "qwen-med-bf16.gguf")
    assert fields["general.architecture"] == "qwen"
    assert fields["qwen.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-6)  # what llama.cpp's qwen loader reads
    assert fields["qwen.context_length"] == 2048
    assert fields["qwen.feed_forward_length"] == 256
    assert fields["qwen.rope.freq_base"] == 10000.0
    assert fields["qwen.rope.dimension_count"] == 16


@pytest.mark.slow
def test_qwen_v1_vocabulary_is_the_tiktoken_ranks_and_specials(qwen_v1_bundle):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_v1_bundle, trust_remote_code=True)
    fields = reader_fields(qwen_v1_bundle / "gguf" / "qwen-med-bf16.gguf")
    tokens = fields["tokenizer.ggml.tokens"]
    alphabet = gguf_export.byte_level_alphabet()
    assert len(tokens) == 151936
    for token, rank in tokenizer.mergeable_ranks.items():
        assert tokens[rank] == "".join(alphabet[b] for b in token)
    for token, token_id in tokenizer.special_tokens.items():
        assert tokens[token_id] == token and fields["tokenizer.ggml.token_type"][token_id] == gguf.TokenType.CONTROL
    assert tokens[151851] == "[PAD151851]"
    assert len(fields["tokenizer.ggml.merges"]) == 151643 - 256
    assert fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["tokenizer.ggml.bos_token_id"] == fields["tokenizer.ggml.eos_token_id"] == 151643
    assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.im_end_id == 151645

    # The merges, applied as llama.cpp applies them (BPE by merge rank over Qwen's split), tokenize like Qwen.
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    bpe = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)},
                               [tuple(m.split(" ")) for m in fields["tokenizer.ggml.merges"]]))
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRE["pretokenizers"][0]["pattern"]["Regex"]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    for text in [*SAMPLES[:3], *(q + a for q, a in SEED_SAMPLES)]:
        assert bpe.encode(text).ids == tokenizer.encode(text), text

    # The embedded template writes the prompt Qwen's own make_context builds.
    from jinja2 import Template

    utils = import_file(qwen_v1_bundle / "qwen_generation_utils.py")
    question = SEED_SAMPLES[0][0]
    prompt, _ = utils.make_context(tokenizer, question, [], "You are a helpful assistant.", 1024)
    rendered = Template(fields["tokenizer.chat_template"]).render(
        messages=[{"role": "user", "content": question}], add_generation_prompt=True)
    assert rendered == prompt


def test_provenance_comes_from_the_card_and_names_no_local_path(models, adapters, tmp_path):
    base = models("qwen2", tied=True, dtype=torch.bfloat16)
    card = {"license": "apache-2.0", "tags": ["medical", "lora"], "language": ["zh", "en"],
            "base_model": "Qwen/Qwen2.5-0.5B-Instruct"}
    spec = write_spec(tmp_path, base, adapters(base), card=card, export={"gguf": {"types": ["bf16"]}})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle
    fields = reader_fields(bundle / "gguf" / "tiny-med-bf16.gguf")
    assert fields["general.license"] == "apache-2.0"
    assert fields["general.tags"] == ["medical", "lora", "modelpack"] and fields["general.languages"] == ["zh", "en"]
    front_matter = (bundle / "README.md").read_text(encoding="utf-8").split("---\n")[1]
    assert fields["general.tags"] == yaml.safe_load(front_matter)["tags"]  # the card's tags, as the Hub shows them
    assert fields["general.base_model.count"] == 1 and fields["general.base_model.0.organization"] == "Qwen"
    assert fields["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct"
    texts = [v for k, v in fields.items() if k.startswith("general.") and isinstance(v, str)]
    assert not any(str(tmp_path) in text or "/home/" in text for text in texts)


@pytest.mark.parametrize(("generation", "expected"), [
    # greedy: temperature 0 is llama.cpp's greedy path; top_k/top_p/min_p mean nothing there and are not written
    ({"do_sample": False}, {"temp": 0.0, "penalty_repeat": 1.0}),
    ({"do_sample": False, "repetition_penalty": 1.2}, {"temp": 0.0, "penalty_repeat": 1.2, "penalty_last_n": -1}),
    # sampling: the spec's values; min_p 0, transformers' (none), not llama.cpp's 0.05
    ({"do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1},
     {"temp": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.0, "penalty_repeat": 1.1, "penalty_last_n": -1}),
], ids=["greedy", "greedy-penalty", "sampling"])
def test_sampling_keys_decode_as_the_bundles_generation_config(models, adapters, tmp_path, generation, expected):
    base = models("qwen2", tied=True, dtype=torch.bfloat16)
    spec = write_spec(tmp_path, base, adapters(base), generation=generation, export={"gguf": {"types": ["bf16"]}})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle
    fields = reader_fields(bundle / "gguf" / "tiny-med-bf16.gguf")
    sampling = {k.removeprefix("general.sampling."): v for k, v in fields.items() if k.startswith("general.sampling.")}
    assert sampling == pytest.approx(expected)
    assert isinstance(sampling["temp"], float)
    assert all(isinstance(sampling[key], int) for key in ("top_k", "penalty_last_n") if key in sampling)


# --- refusals, before any work ------------------------------------------------------------------------------------


def test_unknown_architecture_is_refused_at_validate(models, adapters, tmp_path):
    base = models("gpt2", tied=True)
    spec = write_spec(tmp_path, base, adapters(base, "gpt2", target_modules=["c_attn"]),
                      export={"gguf": {"types": ["bf16"]}})
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert_user_error(result, 2, "'GPT2LMHeadModel'", "Qwen2ForCausalLM, Qwen3ForCausalLM, LlamaForCausalLM",
                      "export.gguf")


def test_separate_mode_is_refused_at_validate(models, adapters, tmp_path):
    base = models("qwen2", tied=True)
    spec = write_spec(tmp_path, base, adapters(base), output={"mode": "separate"}, export={"gguf": {"types": ["q8_0"]}})
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert_user_error(result, 2, str(spec), "output.mode: merge")


def test_unmapped_pre_tokenizer_is_refused_at_validate(models, adapters, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models("qwen2", tied=True), base)
    tokenizer = json.loads((base / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True}
    (base / "tokenizer.json").write_text(json.dumps(tokenizer))
    spec = write_spec(tmp_path, base, adapters(models("qwen2", tied=True)), export={"gguf": {"types": ["bf16"]}})
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert_user_error(result, 2, str(base / "tokenizer.json"), "Metaspace", "qwen2 GGUF export",
                      "pre-tokenizer llama.cpp names")


# --- the pure layers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "expected"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),
    (QWEN2_PRE, "qwen2"),
    (LLAMA3_PRE, "llama-bpe"),
])
def test_pre_tokenizer_names(section, expected):
    tokenizer = {"model": {"type": "BPE"}, "pre_tokenizer": section}
    assert pre_tokenizer(tokenizer, Path("tokenizer.json"), "qwen2") == expected


@pytest.mark.parametrize("section", [
    {"type": "ByteLevel", "add_prefix_space": True, "use_regex": True},  # another split than GPT-2's
    json.loads(json.dumps(QWEN2_PRE).replace(r"\\p{N}|", r"\\p{N}{1,2}|")),  # a regex llama.cpp has no copy of
    {"type": "Whitespace"},
])
def test_pre_tokenizers_without_a_llama_cpp_name_are_refused(section):
    with pytest.raises(gguf_export.SourceError, match="tokenizer.json: the qwen2 GGUF export needs a byte-level BPE"):
        pre_tokenizer({"model": {"type": "BPE"}, "pre_tokenizer": section}, Path("tokenizer.json"), "qwen2")


def test_interleave_rotary_halves_is_the_converters_permute():
    """convert_hf_to_gguf.py's LlamaModel.permute, written over torch as there; heads given as the kv heads for k."""
    def permute(weights: torch.Tensor, n_head: int) -> torch.Tensor:
        return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
                .swapaxes(1, 2).reshape(weights.shape))

    weights = torch.arange(8 * 16 * 3, dtype=torch.float32).reshape(8 * 16, 3)
    for heads in (8, 2):
        expected = permute(weights, heads).numpy()
        assert np.array_equal(interleave_rotary_halves(weights.numpy(), heads), expected)
    assert interleave_rotary_halves(np.arange(8.0), 2).tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_qkv_grouped_by_kind_is_the_converters_reordering():
    """GPTNeoXModel.modify_tensors, for the weight and the bias."""
    heads, head_dim, embed = 4, 3, 12
    weights = torch.randn(3 * embed, embed)
    per_head = weights.reshape(heads, 3, head_dim, embed)
    expected = torch.cat([per_head[:, kind].reshape(-1, embed) for kind in range(3)])
    config = {"num_attention_heads": heads}
    assert np.array_equal(qkv_grouped_by_kind(config, "blk.0.attn_qkv.weight", weights.numpy()), expected.numpy())
    bias = torch.randn(3 * embed)
    expected_bias = torch.cat([bias.reshape(heads, 3, head_dim)[:, kind].reshape(-1) for kind in range(3)])
    assert np.array_equal(qkv_grouped_by_kind(config, "blk.0.attn_qkv.bias", bias.numpy()), expected_bias.numpy())


def test_experts_are_stacked_in_expert_order_at_the_first_experts_place(tmp_path):
    from safetensors.torch import save_file

    names = ["model.embed_tokens.weight", *(f"model.layers.0.mlp.experts.{e}.{p}.weight"
                                            for e in (1, 0, 10, 2) for p in ("up_proj", "down_proj")),
             "model.layers.0.mlp.gate.weight"]
    save_file({n: torch.zeros(4, 32) for n in names}, tmp_path / "model.safetensors")
    header = read_safetensors_header(tmp_path / "model.safetensors")
    config = {"num_hidden_layers": 1, "num_attention_heads": 4}
    planned = plan_gguf_tensors(ARCHITECTURES["Qwen3MoeForCausalLM"], config, [header[n] for n in names],
                                gguf.GGMLQuantizationType.Q8_0)
    assert [(t.name, t.shape) for t in planned] == [("token_embd.weight", (4, 32)), ("blk.0.ffn_up_exps.weight",
                                                    (4, 4, 32)), ("blk.0.ffn_down_exps.weight", (4, 4, 32)),
                                                    ("blk.0.ffn_gate_inp.weight", (4, 32))]
    assert [s.name.split(".")[5] for s in planned[1].sources] == ["0", "1", "2", "10"]
    assert planned[3].qtype == gguf.GGMLQuantizationType.F32  # the router, as llama.cpp keeps it


def test_tiktoken_merge_finds_the_pair_bpe_made():
    ranks = {bytes([b]): b for b in range(256)} | {b"ab": 256, b"bc": 257, b"abc": 258, b"cd": 259, b"abcd": 260}
    assert tiktoken_merge(ranks, b"abc", 258) == (b"ab", b"c")  # ab (256) merges before bc (257)
    assert tiktoken_merge(ranks, b"abcd", 260) == (b"abc", b"d")
    with pytest.raises(gguf_export.SourceError, match="not the merge of two lower-ranked tokens"):
        tiktoken_merge(ranks | {b"xyz": 261}, b"xyz", 261)


@pytest.mark.parametrize(("name", "shape", "qtype", "expected"), [
    ("blk.0.attn_norm.weight", (64,), "Q8_0", "F32"),
    ("output_norm.weight", (64,), "BF16", "F32"),
    ("blk.0.attn_q.bias", (64,), "Q8_0", "F32"),
    ("blk.0.attn_q.weight", (64, 64), "Q8_0", "Q8_0"),
    ("token_embd.weight", (416, 64), "BF16", "BF16"),
    ("blk.0.ffn_down.weight", (64, 48), "Q8_0", "F16"),  # rows not a multiple of Q8_0's 32-value blocks
])
def test_tensor_types_follow_the_converter(name, shape, qtype, expected):
    qtypes = gguf.GGMLQuantizationType
    assert tensor_type(name, shape, qtypes[qtype]) == qtypes[expected]


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0"])
def test_row_blocks_convert_exactly_as_the_whole_tensor(qtype, tmp_path, monkeypatch):
    """A tensor streamed in many row blocks gives the bytes of gguf converting it in one piece."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weight = torch.randn(300, 96).to(torch.bfloat16)
    save_file({"w": weight}, str(tmp_path / "w.safetensors"))
    location = read_safetensors_header(tmp_path / "w.safetensors")["w"]
    monkeypatch.setattr(gguf_export, "BLOCK_BYTES", 96 * 4 * 7)  # 7 rows a block: 43 blocks
    tensor = GgufTensor("blk.0.ffn_up.weight", location.shape, gguf.GGMLQuantizationType[qtype],
                        sources=(location,))
    blocks = list(converted_blocks(tensor))
    assert len(blocks) == 43
    whole = gguf.quants.quantize(weight.float().numpy(), tensor.qtype)
    assert b"".join(b.tobytes() for b in blocks) == whole.tobytes()
    assert StreamedTensor(tensor).nbytes == whole.nbytes


# --- SentencePiece vocabularies -------------------------------------------------------------------------------


@pytest.mark.parametrize("family", sorted(SENTENCEPIECE_FAMILIES))
def test_the_sentencepiece_model_reader_reads_what_sentencepiece_reads(family, tmp_path):
    """gguf_facts reads tokenizer.model's protobuf itself: every piece, score and type, and the trainer's and
    normalizer's settings, as the sentencepiece library (which the converter uses) reads them."""
    import sentencepiece

    path = tmp_path / "tokenizer.model"
    path.write_bytes(train_sentencepiece(family))
    model = gguf_facts.read_sentencepiece_model(path)
    library = sentencepiece.SentencePieceProcessor(model_file=str(path))
    assert len(model.pieces) == library.vocab_size() == SENTENCEPIECE_VOCABULARY
    for i, (text, score, kind) in enumerate(model.pieces):
        assert text == library.id_to_piece(i) and score == library.get_score(i)
        expected = ("UNKNOWN" if library.is_unknown(i) else "CONTROL" if library.is_control(i) else
                    "BYTE" if library.is_byte(i) else "UNUSED" if library.is_unused(i) else None)
        assert kind == expected or (expected is None and kind in ("NORMAL", "USER_DEFINED")), (i, text, kind)
    assert [t for t, _, k in model.pieces if k == "BYTE"] == [f"<0x{b:02X}>" for b in range(256)]
    settings = SENTENCEPIECE_FAMILIES[family]
    assert {t for t, _, k in model.pieces if k == "USER_DEFINED"} == set(settings.user_defined)
    assert model.model_type == gguf_facts.SENTENCEPIECE_BPE and model.byte_fallback
    assert model.add_dummy_prefix is settings.dummy_prefix


def test_a_file_that_is_not_a_sentencepiece_model_is_a_user_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"\x0a\xff\xff\xff\x0fno")
    with pytest.raises(SourceError, match="not a SentencePiece model"):
        gguf_facts.read_sentencepiece_model(path)


def test_sentencepiece_json_pieces_score_by_their_merges_rank():
    """llama.cpp merges the pair whose result scores highest: a piece scores minus the rank of the first merge that
    makes it, so merges apply in tokenizer.json's order; bytes are typed BYTE and the unk token UNKNOWN."""
    tokenizer = {"model": {"type": "BPE", "byte_fallback": True, "unk_token": "<unk>",
                           "vocab": {"<unk>": 0, "<0x41>": 1, "▁": 2, "a": 3, "b": 4, "▁a": 5, "ab": 6, "▁ab": 7},
                           "merges": ["▁ a", "a b", "▁a b", "▁ ab"]}}
    pieces = gguf_export.sentencepiece_json_pieces(tokenizer)
    assert [score for _, score, _ in pieces] == [0.0, 0.0, 0.0, 0.0, 0.0, -0.0, -1.0, -2.0]
    assert [kind for _, _, kind in pieces][:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.BYTE, gguf.TokenType.NORMAL]


@pytest.mark.parametrize(("normalizer", "pre", "prefix"), [
    ({"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                          {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]},
     None, True),  # Llama 2's and Mistral v0.1's published tokenizer.json
    (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": False}, True),
    (None, {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "never", "split": False}, False),
    ({"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
     {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": False}, False),  # Gemma
])
def test_the_space_prefix_of_a_sentencepiece_tokenizer_json(normalizer, pre, prefix):
    tokenizer = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": normalizer, "pre_tokenizer": pre}
    arch = ARCHITECTURES["LlamaForCausalLM"]
    assert gguf_facts.sentencepiece_json_space_prefix(tokenizer, Path("tokenizer.json"), arch) is prefix


def test_sentencepiece_json_scores_tokenize_as_the_bundle_where_the_converters_do_not(tmp_path):
    """From tokenizer.json alone, pieces scored by their merge's rank tokenize in llama.cpp as the bundle's
    tokenizer does; with the converter's LlamaHfVocab scores (-1000 for every piece) llama.cpp merges left to right
    and splits "answers", "wherever", "tokenizers" otherwise."""
    import dataclasses

    import llama_cpp
    from transformers import AutoTokenizer

    folder = save_sentencepiece_tokenizer(tmp_path / "tokenizer", "llama2", json_only=True)
    arch = ARCHITECTURES["LlamaForCausalLM"]
    vocabulary = gguf_export.read_vocabulary(folder, arch, 512)
    texts = ["The   model answers\tin paragraphs", "they've gone wherever the world is",
             "Hello there tiny tokenizers, don't worry"]
    bundle = AutoTokenizer.from_pretrained(folder)
    expected = [bundle(text, add_special_tokens=False).input_ids for text in texts]

    def llama_cpp_ids(scores: list[float]) -> list[list[int]]:
        path = tmp_path / "vocabulary.gguf"
        writer = gguf.GGUFWriter(path, "llama")
        special = gguf_export.special_vocabulary(folder, arch, vocabulary)
        gguf_export.add_tokenizer(writer, dataclasses.replace(vocabulary, scores=scores), special,
                                  chat_template=None, end_of_turn_id=None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
        return [llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) for text in texts]

    assert vocabulary.model == "llama" and vocabulary.space_prefix is True
    assert llama_cpp_ids(vocabulary.scores) == expected
    flat = llama_cpp_ids([-1000.0] * len(vocabulary.tokens))
    assert all(got != want for got, want in zip(flat, expected, strict=True))


@pytest.mark.parametrize(("arch", "name", "rstrip", "expected"), [
    ("Phi3ForCausalLM", "tiny-med", True, "tiny-med (phi-3)"),  # llama.cpp strips after Phi-3's tokens by name
    ("Phi3ForCausalLM", "my-phi3-bot", True, "my-phi3-bot"),
    ("Phi3ForCausalLM", "tiny-med", False, "tiny-med"),  # no token strips: the name would make llama.cpp strip
    ("MistralForCausalLM", "tiny-med", True, "tiny-med"),  # llama.cpp has no such rule for it
])
def test_general_name_carries_phi3_only_where_its_tokens_strip(arch, name, rstrip, expected):
    vocabulary = gguf_export.GgufVocabulary([], [], [], "default", model="llama", rstrip=rstrip)
    assert gguf_export.gguf_model_name(name, ARCHITECTURES[arch], vocabulary) == expected
