"""What ships is finite: every tensor a build writes (base tensors copied or cast, merged tensors, modules_to_save
copies and resized embeddings, separate mode's adapter, the GGUF files' tensors) is checked for NaN and Inf as it
streams. A bad one stops the build with exit 2 and one sentence naming the tensor, where its values came from and
the fix; nothing is published and the sources are untouched. Finite extremes (-0.0, subnormals, the largest finite
value) still build."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from builder.cli import app
from builder.finite import all_finite, ggml_block_finite, nonfinite_found
from helpers import assert_user_error, bundle_tensors, tree_snapshot, write_spec

NAN, INF = float("nan"), float("inf")
BF16_MAX = torch.finfo(torch.bfloat16).max
DIVERGED = "the adapter diverged in training (or its file is damaged); pick another checkpoint"
DAMAGED_BASE = "re-download the base or use another copy"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def private_copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def plant(file: Path, name: str, index: tuple, value: float) -> None:
    """Set one element of one tensor of a safetensors file (in the tensor's own dtype)."""
    tensors = load_file(file)
    tensors[name][index] = value
    save_file(tensors, file, metadata={"format": "pt"})


def weights_file(folder: Path, name: str) -> Path:
    """The safetensors file of a model folder that holds the named tensor."""
    return next(p for p in sorted(folder.glob("*.safetensors")) if name in load_file(p))


def adapters_spec(folder: Path, base: Path, adapters: list[Path], **sections) -> Path:
    """A spec with `adapters:` (each weight 0.5) in place of `adapter:`."""
    path = write_spec(folder, base, adapters[0], **sections)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    del spec["adapter"]
    spec["adapters"] = [{"path": os.path.relpath(a, folder), "weight": 0.5} for a in adapters]
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def build_refused(spec: Path, sources: list[Path], *culprits: str, force: bool = False) -> str:
    """The build exits 2 with one sentence naming every culprit; nothing is published (a bundle already there stays
    as it was, and no staging folder is left) and the sources are unchanged. Returns the message."""
    dest = spec.parent / "dist" / "tiny-med"
    before = {source: tree_snapshot(source) for source in [*sources, dest]}
    published = sorted(os.listdir(dest.parent)) if dest.parent.exists() else []
    result = run("build", spec, "--no-verify", *(["--force"] if force else []))
    assert_user_error(result, 2, *culprits)
    assert (sorted(os.listdir(dest.parent)) if dest.parent.exists() else []) == published
    assert {source: tree_snapshot(source) for source in [*sources, dest]} == before
    return result.output


# --- the check itself: every kind of non-finite value, wherever it sits in a block ------------------------------


def bit_patterns(dtype: torch.dtype):
    """Every class of non-finite value of a float dtype, as (label, bits): +/-Inf, quiet and signalling NaNs with
    payloads, NaN with the sign bit set."""
    if dtype in (torch.float8_e4m3fn,):  # no Inf in this format: only NaN, both signs
        yield from (("nan", 0x7F), ("-nan", 0xFF))
        return
    bits = torch.finfo(dtype).bits
    exponent_bits = {16: 5 if dtype == torch.float16 else 8, 32: 8, 64: 11, 8: 5}[bits]
    mantissa = bits - 1 - exponent_bits
    inf = ((1 << exponent_bits) - 1) << mantissa
    sign = 1 << (bits - 1)
    yield from (("+inf", inf), ("-inf", sign | inf), ("qnan", inf | 1 << (mantissa - 1)), ("snan", inf | 1),
                ("-nan", sign | inf | 1 << (mantissa - 1)), ("nan-payload", inf | (1 << mantissa) - 1))


INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_stored(bits: int, itemsize: int) -> int:
    """The value of INT_VIEW[itemsize] whose bytes are `bits` (the signed views hold the top bit as negative)."""
    return bits - (1 << 8 * itemsize) if itemsize > 1 and bits >> (8 * itemsize - 1) else bits


DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.float8_e5m2, torch.float8_e4m3fn)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_non_finite_value_is_found_at_every_position_of_a_block(dtype):
    """Positions at the start, the end and around the vector lanes' edges of a block whose length is no multiple of
    any lane width: a vectorised min/max must not skip a tail or lose a NaN in a lane."""
    size = 4099
    finite = torch.linspace(-2, 2, size).to(dtype)
    assert all_finite(finite)
    itemsize = finite.element_size()
    for label, bits in bit_patterns(dtype):
        for position in (0, 1, 7, 8, 15, 16, 31, 32, 63, 64, 2047, size - 4, size - 2, size - 1):
            values = finite.clone()
            values.view(INT_VIEW[itemsize])[position] = as_stored(bits, itemsize)
            assert not all_finite(values), (label, position)


def test_finite_extremes_are_finite():
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        info = torch.finfo(dtype)
        values = torch.tensor([-0.0, 0.0, info.tiny / 4, -info.tiny / 4, info.max, -info.max, info.tiny], dtype=dtype)
        assert all_finite(values), dtype
    assert all_finite(torch.tensor([], dtype=torch.bfloat16))
    assert all_finite(torch.tensor([-(2**63)], dtype=torch.int64))


def test_the_description_counts_the_kinds_and_finds_the_first_row():
    values = torch.zeros(10, 4)
    values[7, 2], values[8, 0], values[9, 3] = NAN, INF, -INF
    assert nonfinite_found(values, first_row=100) == "NaN and +Inf and -Inf in 3 of 40 values, the first in row 107"
    assert nonfinite_found(torch.tensor([0.0, NAN])) == "NaN in 1 of 2 values, the first in element 1"


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0"])
def test_a_gguf_block_is_checked_in_the_bytes_its_type_writes(qtype):
    quant = gguf.GGMLQuantizationType[qtype]
    values = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)
    assert ggml_block_finite(gguf.quants.quantize(values, quant), qtype)
    too_large = {"F32": np.inf, "F16": 7e4, "BF16": 3.4e38, "Q8_0": 1e7}[qtype]
    for bad in (np.nan, -np.inf, too_large):
        for row, column in ((0, 0), (3, 63), (2, 31)):
            planted = values.copy()
            planted[row, column] = bad
            with np.errstate(over="ignore", invalid="ignore"):
                block = gguf.quants.quantize(planted, quant)
            assert not ggml_block_finite(block, qtype), (bad, row, column)


# --- the build: a bad tensor wherever it comes from --------------------------------------------------------------

# (label, base tensor, index, value): copied through unchanged (not targeted by the adapter), 1-D and 2-D, first and
# last element, NaN and both infinities.
COPIED = [
    ("embedding-first-nan", "model.embed_tokens.weight", (0, 0), NAN),
    ("embedding-last-inf", "model.embed_tokens.weight", (-1, -1), INF),
    ("norm-minus-inf", "model.layers.1.input_layernorm.weight", (-1,), -INF),
    ("bias-nan", "model.layers.0.self_attn.k_proj.bias", (3,), NAN),
    ("untargeted-weight-inf", "model.layers.1.mlp.up_proj.weight", (5, 7), INF),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(("label", "name", "index", "value"), COPIED, ids=[c[0] for c in COPIED])
def test_a_base_tensor_copied_or_cast_through_is_checked(tmp_path, models, adapters, dtype, label, name, index,
                                                          value):
    """bfloat16: the base's bytes are copied unchanged (checked as raw slices); float32 with output bfloat16: cast."""
    source = models("qwen2", tied=True, dtype=dtype)
    base = private_copy(source, tmp_path / "base")
    file = weights_file(base, name)
    plant(file, name, index, value)
    spec = write_spec(tmp_path, base, adapters(source), output={"dtype": "bfloat16"})
    build_refused(spec, [base], f"tensor {name!r} contains NaN or Inf", str(file), DAMAGED_BASE)


def test_an_inf_in_one_shard_of_a_sharded_base_names_that_shard(tmp_path, models, adapters):
    source = models("qwen2", tied=True, dtype=torch.float32, shards=True)
    base = private_copy(source, tmp_path / "base")
    name = "model.layers.1.post_attention_layernorm.weight"
    file = weights_file(base, name)
    assert len(list(base.glob("*.safetensors"))) > 2 and file.name != "model.safetensors"
    plant(file, name, (0,), INF)
    build_refused(write_spec(tmp_path, base, adapters(source)), [base],
                  f"tensor {name!r} contains NaN or Inf (+Inf in 1 of 64 values, the first in element 0) as read "
                  f"from {file}")


def test_a_nan_in_a_merged_base_tensor_names_the_base_file(tmp_path, models, adapters):
    source = models("qwen2", tied=True, dtype=torch.float32)
    base = private_copy(source, tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj.weight"  # the adapter targets q_proj: this tensor is merged
    plant(base / "model.safetensors", name, (9, 1), NAN)
    build_refused(write_spec(tmp_path, base, adapters(source)), [base],
                  f"merged tensor {name!r} contains NaN or Inf (NaN in 1 of 4096 values, the first in row 9) as read "
                  f"from {base / 'model.safetensors'}")


# (label, adapter (its options), adapter tensor, index): the adapter's own full tensors (modules_to_save, resized
# embeddings: padding rows included) and the LoRA factors of a merge.
RESIZED = ("resized", dict(resize_vocab=448))
ADAPTER_TENSORS = [
    ("modules-to-save", ("modules-to-save", dict(modules_to_save=["lm_head"])),
     "base_model.model.lm_head.weight", (3, 5)),
    ("resized-embedding-padding-row", RESIZED, "base_model.model.model.embed_tokens.weight", (447, 0)),
    ("resized-head-padding-row", RESIZED, "base_model.model.lm_head.weight", (430, 63)),
    ("lora-a", ("plain", {}), "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight", (0, 0)),
    ("lora-b-last", ("plain", {}), "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", (-1, -1)),
]


@pytest.fixture(scope="module")
def untied_base(models):
    return models("qwen2", tied=False, dtype=torch.float32)


@pytest.fixture(scope="module")
def adapter_with(adapters, untied_base):
    """A session-wide adapter of the untied base, by (label, options)."""
    def get(adapter: tuple[str, dict]) -> Path:
        label, options = adapter
        return adapters(untied_base, f"finite-{label}", **options)
    return get


@pytest.mark.parametrize("value", [NAN, -INF], ids=["nan", "minus-inf"])
@pytest.mark.parametrize(("label", "made", "name", "index"), ADAPTER_TENSORS, ids=[c[0] for c in ADAPTER_TENSORS])
def test_an_adapter_tensor_that_is_not_finite_is_named_with_its_checkpoint(tmp_path, untied_base, adapter_with,
                                                                           label, made, name, index, value):
    adapter = private_copy(adapter_with(made), tmp_path / "checkpoint-10")
    plant(adapter / "adapter_model.safetensors", name, index, value)
    output = build_refused(write_spec(tmp_path, untied_base, adapter), [adapter, untied_base],
                           repr(name), str(adapter / "adapter_model.safetensors"), DIVERGED)
    if label.startswith("resized"):  # the row is named: a padding row, past the base's 416
        assert f"the first in row {index[0]}" in output


def test_a_nan_in_separate_modes_lora_b_is_named_in_the_shipped_adapter(tmp_path, untied_base, adapters):
    adapter = private_copy(adapters(untied_base), tmp_path / "checkpoint-10")
    name = "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"
    plant(adapter / "adapter_model.safetensors", name, (2, 3), NAN)
    spec = write_spec(tmp_path, untied_base, adapter, output={"mode": "separate"})
    build_refused(spec, [adapter, untied_base],
                  f"tensor {name!r} of the bundle's adapter/adapter_model.safetensors contains NaN or Inf (NaN in 1 "
                  f"of 512 values, the first in row 2) as read from the adapter's "
                  f"{adapter / 'adapter_model.safetensors'}: {DIVERGED}")


def test_a_nan_in_one_of_several_adapters_stops_separate_modes_concatenation(tmp_path, untied_base, adapters):
    first = adapters(untied_base)
    second = private_copy(adapters(untied_base, "finite-second", r=4), tmp_path / "second" / "checkpoint-10")
    name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    plant(second / "adapter_model.safetensors", name, (1, 1), -INF)
    spec = adapters_spec(tmp_path, untied_base, [first, second], output={"mode": "separate"})
    build_refused(spec, [first, second], f"tensor {name!r} of the bundle's concatenated adapter contains NaN or Inf",
                  str(second / "adapter_model.safetensors"), DIVERGED)


def test_a_refused_rebuild_leaves_the_published_bundle_as_it_was(tmp_path, models, adapters):
    source = models("qwen2", tied=True, dtype=torch.float32)
    adapter = private_copy(adapters(source), tmp_path / "checkpoint-10")
    spec = write_spec(tmp_path, source, adapter)
    assert run("build", spec, "--no-verify").exit_code == 0
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    plant(adapter / "adapter_model.safetensors", name, (0, 0), NAN)
    build_refused(spec, [source, adapter], repr(name), force=True)


# --- overflow: finite inputs whose merge or cast is not finite ----------------------------------------------------


def spike(adapter: Path, module: str, b: float, a: float) -> None:
    """Make one element of a LoRA update (B @ A) * scaling equal b * a * scaling: row 0 of B and column 0 of A cross
    at one nonzero pair (scaling is lora_alpha / r = 2 for these adapters)."""
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    lora_a, lora_b = (tensors[f"base_model.model.{module}.lora_{x}.weight"] for x in "AB")
    lora_b[0] = 0.0
    lora_a[:, 0] = 0.0
    lora_b[0, 0], lora_a[0, 0] = b, a
    save_file(tensors, path, metadata={"format": "pt"})


V_PROJ = "model.layers.0.self_attn.v_proj"
# (label, output dtype, B and A at the crossing, the sentence's parts): an update of 3.4e38 is finite in float32 and
# beyond bfloat16; 1e5 is beyond float16; 3e38 * 1e10 overflows the float32 product itself.
OVERFLOWS = [
    ("bfloat16-from-finite-float32", "bfloat16", (1.7e38, 1.0),
     [f"merged tensor '{V_PROJ}.weight' overflows bfloat16: its largest magnitude is 3.4e+38, beyond bfloat16's "
      "3.38953e+38 (after merging adapter (", "set `output.dtype: float32`"]),
    ("float16", "float16", (5e4, 1.0),
     [f"merged tensor '{V_PROJ}.weight' overflows float16: its largest magnitude is 1e+05, beyond float16's 65504 "
      "(after merging adapter (", "set `output.dtype: bfloat16` (float32's range) or float32"]),
    ("float32-inside-the-merge", "float32", (3e38, 1e10),
     [f"merged tensor '{V_PROJ}.weight' overflows float32 after merging adapter (",
      "from finite base and adapter weights: the adapter diverged in training; pick another checkpoint"]),
]


@pytest.mark.parametrize(("label", "out", "crossing", "culprits"), OVERFLOWS, ids=[c[0] for c in OVERFLOWS])
def test_a_merge_that_overflows_from_finite_inputs_says_after_merging_which_adapter(
        tmp_path, models, adapters, label, out, crossing, culprits):
    base = models("qwen2", tied=True, dtype=torch.float32)
    adapter = private_copy(adapters(base), tmp_path / "checkpoint-10")
    spike(adapter, V_PROJ, *crossing)
    build_refused(write_spec(tmp_path, base, adapter, output={"dtype": out}), [adapter, base], *culprits,
                  str(adapter))


def test_a_cast_that_overflows_names_the_base_tensor_and_the_dtype(tmp_path, models, adapters):
    source = models("qwen2", tied=True, dtype=torch.float32)
    base = private_copy(source, tmp_path / "base")
    plant(base / "model.safetensors", "model.norm.weight", (4,), 1e5)  # finite in float32, beyond float16
    build_refused(write_spec(tmp_path, base, adapters(source), output={"dtype": "float16"}), [base],
                  "tensor 'model.norm.weight' overflows float16: its largest magnitude is 1e+05, beyond float16's "
                  "65504 (cast from float32); set `output.dtype: bfloat16`")


# --- GGUF: what the export writes, from a bundle that is finite ---------------------------------------------------

# (bundle dtype, GGUF type, a finite value the bundle holds, what the GGUF type cannot hold)
GGUF_OVERFLOWS = [
    ("float32", "f16", 7e4, "overflows F16: its largest magnitude is 7e+04, beyond the 65504 that F16 holds"),
    ("bfloat16", "f16", 1e6, "overflows F16: its largest magnitude is 9.994e+05"),
    ("bfloat16", "q8_0", 1e7, "overflows Q8_0: its largest magnitude is 1.003e+07, beyond the 8.31901e+06"),
    ("float32", "bf16", 3.4e38, "overflows BF16: its largest magnitude is 3.4e+38"),
]


@pytest.mark.parametrize(("dtype", "gguf_type", "value", "culprit"), GGUF_OVERFLOWS,
                         ids=[f"{d}-{t}" for d, t, _, _ in GGUF_OVERFLOWS])
def test_a_gguf_type_that_cannot_hold_a_finite_bundle_value_is_refused(tmp_path, models, adapters, dtype, gguf_type,
                                                                        value, culprit):
    source = models("qwen2", tied=True, dtype=torch.float32)
    base = private_copy(source, tmp_path / "base")
    name = "model.layers.1.mlp.up_proj.weight"  # not targeted: the bundle holds the value as planted
    plant(base / "model.safetensors", name, (3, 3), value)
    spec = write_spec(tmp_path, base, adapters(source), output={"dtype": dtype},
                      export={"gguf": {"types": [gguf_type]}})
    build_refused(spec, [base], f"GGUF tensor 'blk.1.ffn_up.weight' (from the bundle's {name!r}) {culprit}")


# --- no false positives ------------------------------------------------------------------------------------------


def test_finite_extremes_build_and_ship_bit_for_bit(tmp_path, models, adapters):
    """-0.0, subnormals and the largest finite bfloat16, in a copied tensor, a merged one and a GGUF export."""
    source = models("qwen2", tied=True, dtype=torch.bfloat16)
    base = private_copy(source, tmp_path / "base")
    tensors = load_file(base / "model.safetensors")
    extremes = torch.tensor([-0.0, torch.finfo(torch.bfloat16).tiny / 8, -torch.finfo(torch.bfloat16).tiny / 64,
                             BF16_MAX, -BF16_MAX], dtype=torch.bfloat16)
    tensors["model.layers.1.mlp.up_proj.weight"][0, :5] = extremes  # copied
    tensors["model.norm.weight"][:5] = extremes  # copied, 1-D, F32 in GGUF
    tensors["model.layers.0.self_attn.q_proj.weight"][0, :3] = extremes[:3]  # merged
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    spec = write_spec(tmp_path, base, adapters(source), export={"gguf": {"types": ["bf16"]}})
    result = run("build", spec, "--no-verify")
    assert result.exit_code == 0, result.output
    bundle = bundle_tensors(tmp_path / "dist" / "tiny-med")
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.equal(bundle[name].view(torch.int16), tensors[name].view(torch.int16)), name
    assert (tmp_path / "dist" / "tiny-med" / "gguf" / "tiny-med-bf16.gguf").is_file()


def test_a_finite_adapter_with_large_values_in_its_added_rows_builds(tmp_path, untied_base, adapter_with):
    """Rows an adapter adds hold whatever training left there: large but finite values ship."""
    adapter = private_copy(adapter_with(RESIZED), tmp_path / "checkpoint-10")
    name = "base_model.model.model.embed_tokens.weight"
    plant(adapter / "adapter_model.safetensors", name, (447, 3), 3e38)
    result = run("build", write_spec(tmp_path, untied_base, adapter, output={"dtype": "float32"}), "--no-verify")
    assert result.exit_code == 0, result.output
    assert bundle_tensors(tmp_path / "dist" / "tiny-med")["model.embed_tokens.weight"][447, 3] == 3e38
