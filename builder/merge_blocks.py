"""One row block of an output tensor merged from its source rows and adapter factors, the same on every merge device.

The devices (merge_device.py) import torch and hand the tensors in; this module uses the tensors' own methods only,
so validate and --dry-run, which import it through build.py, never load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from builder.adapter_match import LoraDelta
from builder.dtypes import FLOAT16, FLOAT32
from builder.errors import SourceError
from builder.merge import (
    embedding_lora_delta,
    linear_lora_delta,
    merge_bias_delta,
    merge_dora_delta,
    merge_dora_embedding_delta,
    merge_embedding_lora_delta,
    merge_lora_delta,
    merge_lora_delta_sum,
)
from builder.plan import TensorPlan
from builder.safetensors_io import TensorLocation, read_tensor, read_tensor_rows

if TYPE_CHECKING:
    import torch

# Blocks and tiles are whole multiples of this many rows: matmuls over a single row take another BLAS path (gemv)
# whose rounding differs, and the merge must be bit-identical to peft's full-matrix product.
BLOCK_ROW_MULTIPLE = 64
FLOAT16_MAX = 65504.0  # torch.finfo(torch.float16).max


@dataclass(frozen=True)
class Factors:
    """An output tensor's adapter tensors, read once and kept on the merge device while its row blocks pass."""

    deltas: tuple[tuple[LoraDelta, torch.Tensor | None, torch.Tensor, torch.Tensor | None], ...]
    token_rows: torch.Tensor | None

    def to(self, device: torch.device) -> Factors:
        def moved(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return Factors(
            deltas=tuple((d, moved(a), b.to(device), moved(m)) for d, a, b, m in self.deltas),
            token_rows=moved(self.token_rows),
        )


def read_factors(tensor: TensorPlan, on_read: Callable[[TensorLocation, torch.Tensor], None] = lambda loc, t: None
                 ) -> Factors:
    """An output tensor's adapter tensors from the adapter's files; on_read sees each one's bytes as read."""

    def read(location: TensorLocation) -> torch.Tensor:
        data = read_tensor(location)
        on_read(location, data)
        return data

    return Factors(
        deltas=tuple(
            (d, read(d.a) if d.a else None, read(d.b), read(d.magnitude) if d.magnitude else None)
            for d in tensor.deltas
        ),
        token_rows=read(tensor.token_rows.values) if tensor.token_rows else None,
    )


@dataclass
class MergedBlock:
    """Rows [start, end) of an output tensor in host memory, possibly still being written by the GPU."""

    tensor: TensorPlan
    start: int
    end: int
    data: torch.Tensor
    # False when the block holds NaN/Inf (or overflowed float16); a host tensor the GPU fills in, on the GPU path.
    finite: torch.Tensor | bool = True
    # Recorded on the GPU's stream after the copy back to host memory; None on the CPU.
    ready: torch.cuda.Event | None = None
    # The pinned source block, kept alive until the GPU has copied it.
    keep: tuple = field(default=())

    def result(self) -> torch.Tensor:
        """The block once the device has written it; raises the user error if the merge produced NaN or Inf."""
        if self.ready is not None:
            self.ready.synchronize()
            self.keep = ()
        if not bool(self.finite):
            raise merge_failure(self.tensor, self.start, self.end)
        return self.data


def merge_failure(tensor: TensorPlan, start: int, end: int) -> SourceError:
    """Why a block is not finite, from the block merged again on the CPU in float32 (a failing build's last step)."""
    source = read_tensor_rows(tensor.source, start, end) if tensor.source.shape else read_tensor(tensor.source)
    exact = merged_block(source, tensor, read_factors(tensor), start, end, out_dtype=FLOAT32.torch)
    if tensor.out_dtype == FLOAT16 and exact.isfinite().all():
        return SourceError(
            f"merged tensor {tensor.name!r} overflows float16: its largest magnitude is "
            f"{exact.abs().max().item():.4g}, beyond float16's {FLOAT16_MAX:g}. Set `output.dtype: bfloat16` "
            "(float32's range) or float32"
        )
    return SourceError(
        f"merged tensor {tensor.name!r} contains NaN or Inf: the adapter's weights for it are broken "
        f"(check {', '.join(d.module for d in tensor.deltas) or 'its replacement'} in the adapter)"
    )


def merged_block(source: torch.Tensor, tensor: TensorPlan, factors: Factors, start: int, end: int, *,
                 out_dtype: torch.dtype) -> torch.Tensor:
    """Rows [start, end) of the output tensor from the same rows of its source, on the source's device."""
    block = source.to(out_dtype)
    if factors.token_rows is not None and tensor.token_rows is not None:
        block = replace_token_rows(block, tensor.token_rows.indices, factors.token_rows, start, end)
    if tensor.summed:
        # Several adapters: one sum in float32, one rounding (adapter_compose refused DoRA on a shared tensor).
        rows = [delta_rows(delta, a, b, start, end) for delta, a, b, _ in factors.deltas]
        return merge_lora_delta_sum(block, rows, out_dtype=out_dtype)
    # One adapter's updates apply one after another, each rounded into the output dtype, as peft merges layer by layer.
    for delta, a, b, magnitude in factors.deltas:
        block = merge_delta_rows(block, delta, a, b, magnitude, start, end, out_dtype=out_dtype)
    return block


def delta_rows(delta: LoraDelta, a, b: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """One adapter's update to rows [start, end) of its target tensor, in float32, not yet added to it."""
    if delta.kind == "bias":
        return b[start:end].float() * delta.scaling
    if delta.kind == "embedding":
        return embedding_lora_delta(a[:, start:end], b, scaling=delta.scaling)
    if delta.fan_in_fan_out:
        return linear_lora_delta(a[:, start:end], b, scaling=delta.scaling, fan_in_fan_out=True)
    return linear_lora_delta(a, b[start:end], scaling=delta.scaling, fan_in_fan_out=False)


def replace_token_rows(block: torch.Tensor, indices, values: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """trainable_token_indices: the trained rows replace the base's (they are not added)."""
    block = block.clone()
    for position, index in enumerate(indices):
        if start <= index < end:
            block[index - start] = values[position].to(block.dtype)
    return block


def merge_delta_rows(
    weight: torch.Tensor, delta: LoraDelta, a, b: torch.Tensor, magnitude, start: int, end: int, *,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """Merge one adapter update into rows [start, end) of its target tensor."""
    if delta.kind == "bias":
        return merge_bias_delta(weight, b[start:end], scaling=delta.scaling, out_dtype=out_dtype)
    if delta.kind == "embedding":
        # Rows of (B @ A).T are columns of A: one per vocabulary entry.
        rows = embedding_lora_delta(a[:, start:end], b, scaling=delta.scaling)
        if magnitude is not None:
            return merge_dora_embedding_delta(weight, rows, magnitude, out_dtype=out_dtype)
        return merge_embedding_lora_delta(weight, rows, out_dtype=out_dtype)
    if delta.fan_in_fan_out:
        rows = linear_lora_delta(a[:, start:end], b, scaling=delta.scaling, fan_in_fan_out=True)
    else:
        rows = linear_lora_delta(a, b[start:end], scaling=delta.scaling, fan_in_fan_out=False)
    if magnitude is not None:
        mag = magnitude if delta.fan_in_fan_out else magnitude[start:end]
        return merge_dora_delta(weight, rows, mag, out_dtype=out_dtype, fan_in_fan_out=delta.fan_in_fan_out)
    return merge_lora_delta(weight, rows, out_dtype=out_dtype)
