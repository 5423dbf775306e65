"""LoRA merge math as pure functions over tensors, following peft's default (non-safe) merge exactly."""

from __future__ import annotations

from typing import TYPE_CHECKING

# Tensor methods only, but for DoRA's norm: validate and --dry-run import this module (through build.py) and must not
# pay for torch's import; a build that merges has imported torch by the time these functions run.
if TYPE_CHECKING:
    import torch


def linear_lora_delta(a: torch.Tensor, b: torch.Tensor, *, scaling: float, fan_in_fan_out: bool) -> torch.Tensor:
    """dW = (B @ A) * scaling in float32, transposed for Conv1D (fan_in_fan_out) layers."""
    delta = (b.float() @ a.float()).mul_(scaling)  # in place: same rounding as `* scaling`, one buffer less
    return delta.T if fan_in_fan_out else delta


def embedding_lora_delta(a: torch.Tensor, b: torch.Tensor, *, scaling: float) -> torch.Tensor:
    """dW = (B @ A).T * scaling for lora_embedding_A (r x vocab) and lora_embedding_B (dim x r), in float32."""
    return (b.float() @ a.float()).mul_(scaling).T


def merge_lora_delta(weight: torch.Tensor, delta: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """W' = W + dW, summed in float32 and rounded once into out_dtype (peft's `weight.data += delta_weight`).

    The base weight is first cast to out_dtype, as when peft loads the base in that dtype before merging.
    The sum is built in delta's own buffer (delta is consumed): merging is memory-bound, and every
    fresh float32 buffer costs page faults.
    """
    return delta.add_(weight.to(out_dtype)).to(out_dtype)


def merge_lora_delta_sum(weight: torch.Tensor, deltas: list[torch.Tensor], *, out_dtype: torch.dtype) -> torch.Tensor:
    """Several adapters on one tensor: W' = W + sum_i dW_i, each dW_i in float32 with its weight already in its
    scaling, summed in float32 in the spec's order and rounded once into out_dtype (the first delta is consumed).

    Not peft's merge of several adapters, which adds them one by one and rounds into the dtype after each.
    """
    total = deltas[0]
    for delta in deltas[1:]:
        total.add_(delta)
    return merge_lora_delta(weight, total, out_dtype=out_dtype)


def merge_embedding_lora_delta(weight: torch.Tensor, delta: torch.Tensor, *, out_dtype: torch.dtype) -> torch.Tensor:
    """Embedding merge as peft does it: the delta is rounded into out_dtype first, then added (two roundings)."""
    return (weight.to(out_dtype).float() + delta.to(out_dtype).float()).to(out_dtype)


def merge_dora_delta(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, out_dtype: torch.dtype, fan_in_fan_out: bool
) -> torch.Tensor:
    """DoRA on a Linear/Conv1D: W' = m / ||W + dW|| * (W + dW), the norm taken per output feature, rounded once."""
    import torch

    merged = weight.to(out_dtype).float() + delta
    oriented = merged.T if fan_in_fan_out else merged
    factor = magnitude.float() / torch.linalg.norm(oriented, dim=1)
    return ((factor.view(1, -1) if fan_in_fan_out else factor.view(-1, 1)) * merged).to(out_dtype)


def merge_dora_embedding_delta(
    weight: torch.Tensor, delta: torch.Tensor, magnitude: torch.Tensor, *, out_dtype: torch.dtype
) -> torch.Tensor:
    """DoRA on an Embedding: the norm is taken per embedding dimension, over the whole vocabulary."""
    import torch

    merged = weight.to(out_dtype).float() + delta
    factor = magnitude.float() / torch.linalg.norm(merged.T, dim=1)
    return (factor.view(1, -1) * merged).to(out_dtype)


def merge_bias_delta(bias: torch.Tensor, lora_bias: torch.Tensor, *, scaling: float, out_dtype: torch.dtype):
    """lora_bias: b' = b + lora_B.bias * scaling, rounded once."""
    return (bias.to(out_dtype).float() + lora_bias.float() * scaling).to(out_dtype)
