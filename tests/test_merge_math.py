"""builder/merge.py on bare tensors, bit for bit against peft's own LoRA layers merging the same weights.

The reference is the layer peft builds (get_peft_model on a one-layer module, adapter weights autocast to float32
as PeftModel.from_pretrained loads them) after its default merge(); merge.py gets the same base weight as stored
(float32) and the output dtype, as the build does.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from builder.adapter_match import lora_scaling, pattern_value
from builder.merge import (
    embedding_lora_delta,
    linear_lora_delta,
    merge_bias_delta,
    merge_dora_delta,
    merge_dora_embedding_delta,
    merge_embedding_lora_delta,
    merge_lora_delta,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IN_FEATURES, OUT_FEATURES, VOCAB, RANK = 80, 96, 120, 8


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer


def peft_layer(base_layer: nn.Module, *, adapter: dict[str, torch.Tensor], **lora_options):
    """peft's LoRA wrapper around base_layer, its adapter tensors set to `adapter` (peft name -> value)."""
    config = LoraConfig(r=RANK, target_modules=["layer"], init_lora_weights=False, **lora_options)
    lora = get_peft_model(OneLayer(base_layer), config).base_model.model.layer
    for name, value in adapter.items():
        parameter = lora.get_parameter(name)
        # PeftModel.from_pretrained autocasts (b)float16 adapters to float32; the merge math depends on it.
        assert parameter.dtype == torch.float32, name
        parameter.data = value.float().clone()
    return lora


def random_factors(seed: int, a_shape: tuple[int, int], b_shape: tuple[int, int], *, saved_dtype=torch.float32):
    """LoRA factors as an adapter file stores them, large enough that every output rounding is exercised."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(a_shape, generator=generator) * 0.3
    b = torch.randn(b_shape, generator=generator) * 0.3
    return a.to(saved_dtype), b.to(saved_dtype)


def base_weight(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A base tensor as stored in float32; the merge casts it to the output dtype first."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def assert_bitwise_equal(ours: torch.Tensor, peft_result: torch.Tensor) -> None:
    assert ours.dtype == peft_result.dtype
    assert ours.shape == peft_result.shape
    differing = (ours != peft_result).sum().item()
    assert torch.equal(ours, peft_result), f"{differing} of {ours.numel()} elements differ from peft's merge"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("saved_dtype", [torch.float32, torch.bfloat16], ids=["adapter-fp32", "adapter-bf16"])
def test_linear_merge_matches_peft(dtype, saved_dtype):
    weight = base_weight(0, (OUT_FEATURES, IN_FEATURES))
    a, b = random_factors(1, (RANK, IN_FEATURES), (OUT_FEATURES, RANK), saved_dtype=saved_dtype)
    layer = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=dtype)
    layer.weight.data = weight.to(dtype, copy=True)  # peft merges in place; keep `weight` intact
    lora = peft_layer(layer, adapter={"lora_A.default.weight": a, "lora_B.default.weight": b}, lora_alpha=16)
    scaling = lora_scaling(alpha=16, rank=RANK, use_rslora=False)
    assert scaling == lora.scaling["default"]

    delta = linear_lora_delta(a, b, scaling=scaling, fan_in_fan_out=False)
    assert_bitwise_equal(delta, lora.get_delta_weight("default"))
    lora.merge()
    assert_bitwise_equal(merge_lora_delta(weight, delta, out_dtype=dtype), lora.base_layer.weight.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_conv1d_fan_in_fan_out_merge_matches_peft(dtype):
    """GPT-2's Conv1D stores its weight (in, out): the delta is transposed (fan_in_fan_out)."""
    weight = base_weight(2, (IN_FEATURES, OUT_FEATURES))
    a, b = random_factors(3, (RANK, IN_FEATURES), (OUT_FEATURES, RANK))
    layer = Conv1D(OUT_FEATURES, IN_FEATURES).to(dtype)
    layer.weight.data = weight.to(dtype, copy=True)  # peft merges in place; keep `weight` intact
    lora = peft_layer(
        layer, adapter={"lora_A.default.weight": a, "lora_B.default.weight": b}, lora_alpha=8, fan_in_fan_out=True
    )
    assert lora.fan_in_fan_out

    delta = linear_lora_delta(a, b, scaling=lora.scaling["default"], fan_in_fan_out=True)
    assert delta.shape == (IN_FEATURES, OUT_FEATURES)
    assert_bitwise_equal(delta, lora.get_delta_weight("default"))
    lora.merge()
    assert_bitwise_equal(merge_lora_delta(weight, delta, out_dtype=dtype), lora.base_layer.weight.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_merge_matches_peft(dtype):
    """Embedding LoRA: A is (r, vocab), B is (dim, r); peft rounds the delta into the dtype before adding it."""
    weight = base_weight(4, (VOCAB, OUT_FEATURES))
    a, b = random_factors(5, (RANK, VOCAB), (OUT_FEATURES, RANK))
    layer = nn.Embedding(VOCAB, OUT_FEATURES, dtype=dtype)
    layer.weight.data = weight.to(dtype, copy=True)  # peft merges in place; keep `weight` intact
    lora = peft_layer(layer, adapter={"lora_embedding_A.default": a, "lora_embedding_B.default": b}, lora_alpha=32)

    delta = embedding_lora_delta(a, b, scaling=lora.scaling["default"])
    assert_bitwise_equal(delta, lora.get_delta_weight("default"))
    lora.merge()
    assert_bitwise_equal(merge_embedding_lora_delta(weight, delta, out_dtype=dtype), lora.base_layer.weight.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layer_kind", ["linear", "conv1d"])
def test_dora_merge_matches_peft(dtype, layer_kind):
    """DoRA rescales each output feature of W + dW to the trained magnitude (columns of a Conv1D weight)."""
    fan_in_fan_out = layer_kind == "conv1d"
    shape = (IN_FEATURES, OUT_FEATURES) if fan_in_fan_out else (OUT_FEATURES, IN_FEATURES)
    weight = base_weight(6, shape)
    a, b = random_factors(7, (RANK, IN_FEATURES), (OUT_FEATURES, RANK))
    magnitude = torch.rand(OUT_FEATURES, generator=torch.Generator().manual_seed(8)) * 10 + 1
    if fan_in_fan_out:
        layer: nn.Module = Conv1D(OUT_FEATURES, IN_FEATURES).to(dtype)
    else:
        layer = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False, dtype=dtype)
    layer.weight.data = weight.to(dtype, copy=True)  # peft merges in place; keep `weight` intact
    adapter = {
        "lora_A.default.weight": a,
        "lora_B.default.weight": b,
        "lora_magnitude_vector.default.weight": magnitude,
    }
    lora = peft_layer(layer, adapter=adapter, lora_alpha=16, use_dora=True, fan_in_fan_out=fan_in_fan_out)

    delta = linear_lora_delta(a, b, scaling=lora.scaling["default"], fan_in_fan_out=fan_in_fan_out)
    lora.merge()
    ours = merge_dora_delta(weight, delta, magnitude, out_dtype=dtype, fan_in_fan_out=fan_in_fan_out)
    assert_bitwise_equal(ours, lora.base_layer.weight.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dora_embedding_merge_matches_peft(dtype):
    """DoRA on an Embedding: one magnitude per embedding dimension, the norm taken over the whole vocabulary."""
    weight = base_weight(9, (VOCAB, OUT_FEATURES))
    a, b = random_factors(10, (RANK, VOCAB), (OUT_FEATURES, RANK))
    magnitude = torch.rand(OUT_FEATURES, generator=torch.Generator().manual_seed(11)) * 10 + 1
    layer = nn.Embedding(VOCAB, OUT_FEATURES, dtype=dtype)
    layer.weight.data = weight.to(dtype, copy=True)  # peft merges in place; keep `weight` intact
    adapter = {
        "lora_embedding_A.default": a,
        "lora_embedding_B.default": b,
        "lora_magnitude_vector.default.weight": magnitude,
    }
    lora = peft_layer(layer, adapter=adapter, lora_alpha=16, use_dora=True)

    delta = embedding_lora_delta(a, b, scaling=lora.scaling["default"])
    lora.merge()
    ours = merge_dora_embedding_delta(weight, delta, magnitude, out_dtype=dtype)
    assert_bitwise_equal(ours, lora.base_layer.weight.data)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_lora_bias_merge_matches_peft(dtype):
    """lora_bias=True: lora_B carries a bias, added to the base bias times the scaling."""
    weight, bias = base_weight(12, (OUT_FEATURES, IN_FEATURES)), base_weight(13, (OUT_FEATURES,))
    a, b = random_factors(14, (RANK, IN_FEATURES), (OUT_FEATURES, RANK))
    lora_bias = torch.randn(OUT_FEATURES, generator=torch.Generator().manual_seed(15))
    layer = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=True, dtype=dtype)
    layer.weight.data, layer.bias.data = weight.to(dtype, copy=True), bias.to(dtype, copy=True)
    adapter = {"lora_A.default.weight": a, "lora_B.default.weight": b, "lora_B.default.bias": lora_bias}
    lora = peft_layer(layer, adapter=adapter, lora_alpha=24, lora_bias=True)

    scaling = lora.scaling["default"]
    lora.merge()
    assert_bitwise_equal(merge_bias_delta(bias, lora_bias, scaling=scaling, out_dtype=dtype), lora.base_layer.bias.data)
    delta = linear_lora_delta(a, b, scaling=scaling, fan_in_fan_out=False)
    assert_bitwise_equal(merge_lora_delta(weight, delta, out_dtype=dtype), lora.base_layer.weight.data)


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize(("alpha", "rank"), [(16, 8), (7, 3), (32, 64)])
def test_scaling_matches_peft(alpha, rank, use_rslora):
    layer = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=False)
    config = LoraConfig(r=rank, lora_alpha=alpha, use_rslora=use_rslora, target_modules=["layer"])
    lora = get_peft_model(OneLayer(layer), config).base_model.model.layer
    assert lora_scaling(alpha=alpha, rank=rank, use_rslora=use_rslora) == lora.scaling["default"]


class Blocks(nn.Module):
    """Two blocks with same-named layers, so a pattern can pick one block's layer by its path."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"q_proj": nn.Linear(8, 8), "v_proj": nn.Linear(8, 8), "down_proj": nn.Linear(8, 8)})
            for _ in range(2)
        )


@pytest.mark.parametrize("use_rslora", [False, True], ids=["lora", "rslora"])
def test_rank_and_alpha_patterns_match_peft(use_rslora):
    """pattern_value picks each module's rank and alpha as peft does (rank_pattern / alpha_pattern)."""
    rank_pattern = {"v_proj": 4, r"blocks\.1\.down_proj": 2}
    alpha_pattern = {"q_proj": 32, r"1\.v_proj": 3}
    config = LoraConfig(
        r=8, lora_alpha=16, use_rslora=use_rslora, target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
    )
    model = get_peft_model(Blocks(), config)
    layers = {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "scaling")}
    assert len(layers) == 6
    for path, layer in layers.items():
        rank = int(pattern_value(rank_pattern, path, 8))
        alpha = pattern_value(alpha_pattern, path, 16)
        assert rank == layer.r["default"], path
        assert lora_scaling(alpha=alpha, rank=rank, use_rslora=use_rslora) == layer.scaling["default"], path
