"""The merge devices: the CPU (the reference) and a CUDA GPU, over torch.

Both take a source block in host memory and hand back the output block in host memory; the math is the same
functions over tensors (merge_blocks.py, merge.py), only where the tensors live differs. This is where a build
imports torch: weights.py asks for a device only once it starts writing.
"""

from __future__ import annotations

from typing import Literal, Protocol

import torch

from builder.finite import all_finite
from builder.merge_blocks import BLOCK_ROW_MULTIPLE, Factors, MergedBlock, merged_block
from builder.plan import TensorPlan
from builder.refusals import require_merge_device

# On the CPU a row block is merged in tiles whose float32 temporaries stay in the processor's cache: merging is a
# handful of passes over float32 data (product, scaling, add, cast), and from main memory each pass costs as much
# as the arithmetic of all of them.
TILE_BYTES = 4 << 20


class MergeDevice(Protocol):
    name: Literal["cpu", "cuda"]

    def host_buffer(self, nbytes: int) -> torch.Tensor: ...

    def place(self, factors: Factors) -> Factors: ...

    def merge(self, tensor: TensorPlan, factors: Factors, source: torch.Tensor, start: int, end: int) -> MergedBlock:
        ...

    def close(self) -> None: ...


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
            block = merged_block(source, tensor, factors, start, end, out_dtype=tensor.out_dtype.torch)
            return MergedBlock(tensor, start, end, block, finite=all_finite(block))
        block = torch.empty(source.shape, dtype=tensor.out_dtype.torch)
        finite = True
        for tile in range(0, end - start, rows):
            stop = min(end - start, tile + rows)
            merged = merged_block(
                source[tile:stop], tensor, factors, start + tile, start + stop, out_dtype=tensor.out_dtype.torch
            )
            finite = finite and all_finite(merged)  # checked while the tile is still in the cache
            block[tile:stop] = merged
        return MergedBlock(tensor, start, end, block, finite=finite)

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
            block = merged_block(on_device, tensor, factors, start, end, out_dtype=tensor.out_dtype.torch)
            finite: torch.Tensor | bool = True
            if block.is_floating_point():  # on the GPU, as finite.all_finite does it, without waiting for the result
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
