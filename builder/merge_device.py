"""Merging one row block of an output tensor on a device: the CPU (the reference) or a CUDA GPU.

Both take a source block in host memory and hand back the output block in host memory; the math is the same
functions over tensors (merge.py), only where the tensors live differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch

from builder.adapter_match import LoraDelta
from builder.errors import ModelpackError, SourceError
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

# Blocks and tiles are whole multiples of this many rows: matmuls over a single row take another BLAS path (gemv)
# whose rounding differs, and the merge must be bit-identical to peft's full-matrix product.
BLOCK_ROW_MULTIPLE = 64
# On the CPU a row block is merged in tiles whose float32 temporaries stay in the processor's cache: merging is a
# handful of passes over float32 data (product, scaling, add, cast), and from main memory each pass costs as much
# as the arithmetic of all of them.
TILE_BYTES = 4 << 20
FLOAT16_MAX = torch.finfo(torch.float16).max


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


class MergeDevice(Protocol):
    name: Literal["cpu", "cuda"]

    def host_buffer(self, nbytes: int) -> torch.Tensor: ...

    def place(self, factors: Factors) -> Factors: ...

    def merge(self, tensor: TensorPlan, factors: Factors, source: torch.Tensor, start: int, end: int) -> MergedBlock:
        ...

    def close(self) -> None: ...


def require_merge_device(requested: str) -> None:
    """Refuse, before any work, a merge device this machine does not have."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelpackError(
            f"the merge device is cuda (output.merge_device or --merge-device), but torch {torch.__version__} sees "
            "no CUDA GPU on this machine; use cpu, or auto to merge on a GPU only where there is one"
        )


def merge_device_for(requested: str) -> MergeDevice:
    """The device the build asked for (output.merge_device or --merge-device), on this machine."""
    require_merge_device(requested)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return CpuMerge()
    return CudaMerge()


class CpuMerge:
    """The reference: each block merged tile by tile in one thread, since the pipeline's other threads (reading,
    hashing, writing) need the remaining cores, and torch's worker threads would spin waiting between small ops."""

    name: Literal["cpu", "cuda"] = "cpu"

    def __init__(self) -> None:
        self._threads = torch.get_num_threads()
        torch.set_num_threads(1)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def place(self, factors: Factors) -> Factors:
        return factors

    def merge(self, tensor: TensorPlan, factors: Factors, source: torch.Tensor, start: int, end: int) -> MergedBlock:
        rows = tile_rows(tensor)
        if source.dim() == 0 or end - start <= rows or any(d.needs_whole_tensor for d in tensor.deltas):
            block = merged_block(source, tensor, factors, start, end, out_dtype=tensor.out_dtype)
        else:
            block = torch.empty(source.shape, dtype=tensor.out_dtype)
            for tile in range(0, end - start, rows):
                stop = min(end - start, tile + rows)
                block[tile:stop] = merged_block(
                    source[tile:stop], tensor, factors, start + tile, start + stop, out_dtype=tensor.out_dtype
                )
        return MergedBlock(tensor, start, end, block, finite=not needs_check(tensor) or all_finite(block))

    def close(self) -> None:
        torch.set_num_threads(self._threads)


class CudaMerge:
    """The first GPU: each block is copied in from pinned host memory, merged, and copied back to pinned memory on
    one side stream, without waiting; the writer waits for each block's event. GPU memory holds the blocks in flight
    (a few times BLOCK_BYTES) and one tensor's adapter factors, whatever the model's size."""

    name: Literal["cpu", "cuda"] = "cuda"

    def __init__(self) -> None:
        self.device = torch.device("cuda")
        # float32 products must be float32 (no TF32), as on the CPU and in peft.
        torch.backends.cuda.matmul.allow_tf32 = False
        self.stream = torch.cuda.Stream(self.device)

    def host_buffer(self, nbytes: int) -> torch.Tensor:
        # torch's pinned-memory allocator caches freed buffers, so a steady stream of blocks reuses the same few.
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def place(self, factors: Factors) -> Factors:
        with torch.cuda.stream(self.stream):
            return factors.to(self.device)

    def merge(self, tensor: TensorPlan, factors: Factors, source: torch.Tensor, start: int, end: int) -> MergedBlock:
        with torch.cuda.stream(self.stream):
            on_device = source.to(self.device, non_blocking=True)
            block = merged_block(on_device, tensor, factors, start, end, out_dtype=tensor.out_dtype)
            finite: torch.Tensor | bool = True
            if needs_check(tensor):
                low, high = torch.aminmax(block)
                finite = (torch.isfinite(low) & torch.isfinite(high)).to("cpu", non_blocking=True)
            data = torch.empty(block.shape, dtype=block.dtype, pin_memory=True)
            data.copy_(block, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record(self.stream)
        return MergedBlock(tensor, start, end, data, finite=finite, ready=ready, keep=(source,))

    def close(self) -> None:
        self.stream.synchronize()


def tile_rows(tensor: TensorPlan) -> int:
    """Rows per CPU tile: a multiple of BLOCK_ROW_MULTIPLE whose float32 copy stays near TILE_BYTES."""
    source = tensor.source
    row_elements = source.nbytes // source.dtype.itemsize // source.shape[0] if source.shape and source.shape[0] else 1
    row_fp32_bytes = 4 * max(1, row_elements)
    return max(1, TILE_BYTES // row_fp32_bytes // BLOCK_ROW_MULTIPLE) * BLOCK_ROW_MULTIPLE


def needs_check(tensor: TensorPlan) -> bool:
    """Merged blocks can hold NaN/Inf from a broken adapter; a cast to float16 can overflow."""
    return bool(tensor.deltas or tensor.token_rows) or tensor.out_dtype == torch.float16


def all_finite(block: torch.Tensor) -> bool:
    """No NaN or Inf: aminmax propagates NaN and exposes +/-inf, in one pass and without a boolean buffer."""
    low, high = torch.aminmax(block)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def merge_failure(tensor: TensorPlan, start: int, end: int) -> SourceError:
    """Why a block is not finite, from the block merged again on the CPU in float32 (a failing build's last step)."""
    source = read_tensor_rows(tensor.source, start, end) if tensor.source.shape else read_tensor(tensor.source)
    exact = merged_block(source, tensor, read_factors(tensor), start, end, out_dtype=torch.float32)
    if tensor.out_dtype == torch.float16 and torch.isfinite(exact).all():
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
