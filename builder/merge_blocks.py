"""One row block of an output tensor merged from its source rows and adapter factors, the same on every merge device.

The devices (merge_device.py) import torch and hand the tensors in; this module uses the tensors' own methods only,
so validate and --dry-run, which import it through build.py, never load torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from builder.adapter_match import LoraDelta
from builder.dtypes import BFLOAT16, FLOAT16, FLOAT32
from builder.errors import SourceError
from builder.finite import all_finite, nonfinite_found, read_from, remedy
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
# The largest finite value of each output dtype (torch.finfo(...).max), and what to do when a tensor exceeds it.
FLOAT16_MAX = 65504.0
LARGEST = {FLOAT16: FLOAT16_MAX, BFLOAT16: 3.3895313892515355e38, FLOAT32: 3.4028234663852886e38}
WIDER = {
    FLOAT16: "set `output.dtype: bfloat16` (float32's range) or float32",
    BFLOAT16: "set `output.dtype: float32`",
    FLOAT32: "no output dtype holds it: the base's values are broken; use another copy of the base",
}


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
    # False when the block holds NaN/Inf (or overflowed its dtype); a host tensor the GPU fills in, on the GPU path.
    finite: torch.Tensor | bool = True
    # Recorded on the GPU's stream after the copy back to host memory; None on the CPU.
    ready: torch.cuda.Event | None = None
    # The pinned source block, kept alive until the GPU has copied it.
    keep: tuple = field(default=())

    def result(self) -> torch.Tensor:
        """The block once the device has written it; raises the user error if it holds NaN or Inf."""
        if self.ready is not None:
            self.ready.synchronize()
            self.keep = ()
        if not bool(self.finite):
            raise nonfinite_error(self.tensor, self.start, self.end)
        return self.data


def nonfinite_error(tensor: TensorPlan, start: int, end: int) -> SourceError:
    """Why rows [start, end) of an output tensor came out NaN or Inf, found by reading them again (a failing build's
    last step): its source holds them, an adapter tensor merged into it does, the merge overflowed float32, or the
    result is beyond the output dtype's range. One sentence naming the tensor, where the values came from and the fix.
    """
    merged = "merged tensor" if tensor.action == "merge" else "tensor"
    source = read_tensor_rows(tensor.source, start, end) if tensor.source.shape else read_tensor(tensor.source)
    if not all_finite(source):
        return SourceError(
            f"{merged} {tensor.name!r} contains NaN or Inf ({nonfinite_found(source, first_row=start)}) as read from "
            f"{read_from(tensor.source, tensor.name)}: {remedy(tensor.source)}"
        )
    factors = read_factors(tensor)
    for location, values in factor_tensors(tensor, factors):
        if not all_finite(values):
            return SourceError(
                f"merged tensor {tensor.name!r} contains NaN or Inf ({nonfinite_found(values)}) from "
                f"{read_from(location)}: {remedy(location)}"
            )
    # The merge's own float32 arithmetic, before the rounding into the output dtype.
    exact = merged_block(source, tensor, factors, start, end, out_dtype=FLOAT32.torch)
    if tensor.action == "merge" and not all_finite(exact):
        return SourceError(
            f"merged tensor {tensor.name!r} overflows float32 after merging {merged_adapters(tensor)}, from finite "
            "base and adapter weights: the adapter diverged in training; pick another checkpoint"
        )
    out_dtype = tensor.out_dtype
    cast = not all_finite(source.to(out_dtype.torch))
    if cast or not all_finite(exact.to(out_dtype.torch)):
        largest = (source if cast else exact).abs().max().item()
        how = f"cast from {tensor.source.dtype.name}" if cast else f"after merging {merged_adapters(tensor)}"
        return SourceError(
            f"{merged} {tensor.name!r} overflows {out_dtype.name}: its largest magnitude is {largest:.4g}, beyond "
            f"{out_dtype.name}'s {LARGEST[out_dtype]:g} ({how}); {WIDER[out_dtype]}"
        )
    return SourceError(
        f"{merged} {tensor.name!r} contains NaN or Inf in rows {start}-{end}, yet its sources read again are finite: "
        "were they changed while the build read them? Build again"
    )


def factor_tensors(tensor: TensorPlan, factors: Factors) -> list[tuple[TensorLocation, torch.Tensor]]:
    """Every adapter tensor merged into an output tensor, with where it was read from."""
    pairs = [(location, values) for delta, a, b, magnitude in factors.deltas
             for location, values in ((delta.a, a), (delta.b, b), (delta.magnitude, magnitude))
             if location is not None and values is not None]
    if tensor.token_rows is not None and factors.token_rows is not None:
        pairs.append((tensor.token_rows.values, factors.token_rows))
    return pairs


def merged_adapters(tensor: TensorPlan) -> str:
    """The adapters whose updates an output tensor takes, for messages: "adapter (/runs/ckpt-200)"."""
    sources = [(d.adapter, d.b.file.parent) for d in tensor.deltas]
    if tensor.token_rows is not None:
        sources.append(("the trainable token rows of the adapter", tensor.token_rows.values.file.parent))
    return " and ".join(f"{key} ({folder})" for key, folder in dict.fromkeys(sources))


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
