"""Writing a plan's weights: stream each base tensor, merge its LoRA deltas, write shards; copy side files."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.adapter_match import LoraDelta
from builder.errors import SourceError
from builder.merge import (
    embedding_lora_delta,
    linear_lora_delta,
    merge_bias_delta,
    merge_dora_delta,
    merge_dora_embedding_delta,
    merge_embedding_lora_delta,
    merge_lora_delta,
)
from builder.plan import BuildPlan, ShardPlan, TensorPlan
from builder.safetensors_io import (
    ShardWriter,
    TensorLocation,
    read_byte_chunks,
    read_tensor,
    read_tensor_rows,
    tensor_bytes,
)

# A merged tensor is processed in row blocks whose float32 working copy stays under this size,
# so peak memory is bounded by a few blocks, not by the largest tensor (a 7B embedding is 2 GB in fp32).
BLOCK_BYTES = 64 << 20
# Blocks are whole multiples of this many rows: matmuls over a single row take another BLAS path (gemv)
# whose rounding differs, and the merge must be bit-identical to peft's full-matrix product.
BLOCK_ROW_MULTIPLE = 64
# Unchanged tensors are copied in slices of this size.
COPY_CHUNK_BYTES = 16 << 20
# Chunks in flight between the reading/merging thread and the writing thread.
QUEUE_DEPTH = 4
FLOAT16_MAX = torch.finfo(torch.float16).max

Progress = Callable[[int], None]
_DONE = object()
# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass
class WrittenWeights:
    """sha256 of every written weight file, and of every base weight file read (for the manifest)."""

    written: dict[str, str]
    sources: dict[Path, str]


def write_weights(plan: BuildPlan, staging: Path, *, on_bytes: Progress = lambda n: None) -> WrittenWeights:
    """Write every planned shard (and the index when there are several), hashing what is written and read.

    Two threads overlap the work on two cores: one reads and merges (torch and file reads release the GIL),
    the other hashes and writes. Memory stays at QUEUE_DEPTH chunks plus one block's working copies. The base's
    weight files are hashed from the bytes the merge reads anyway, so no file is read twice.
    """
    keep_freed_memory()
    digests = {path: SourceDigest(path) for path in plan.base.weight_files}
    chunks: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
    stop = threading.Event()
    producer = threading.Thread(target=_produce_chunks, args=(plan, chunks, stop), daemon=True)
    producer.start()
    hashes: dict[str, str] = {}
    try:
        for shard in plan.shards:
            hashes[shard.filename] = _write_shard(shard, staging / shard.filename, chunks, digests, on_bytes)
        if chunks.get() is not _DONE:
            raise AssertionError("the merge produced more tensors than planned")
    finally:
        stop.set()
        producer.join()
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.weight_bytes},
            "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
        }
        (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return WrittenWeights(written=hashes, sources={path: digest.hexdigest() for path, digest in digests.items()})


class SourceDigest:
    """sha256 of a source file, fed in file order with the bytes the merge reads anyway.

    Bytes the merge skips (the header, tensors the adapter replaces) are read here; bytes read twice (a tied
    head re-reading the embedding) are hashed once.
    """

    def __init__(self, path: Path):
        self.path = path
        self._sha256 = hashlib.sha256()
        self._position = 0

    def feed(self, offset: int, data: memoryview) -> None:
        if offset > self._position:
            self._read_up_to(offset)
        already = self._position - offset
        if already < data.nbytes:
            self._sha256.update(data[already:])
            self._position += data.nbytes - already

    def hexdigest(self) -> str:
        self._read_up_to(self.path.stat().st_size)
        return self._sha256.hexdigest()

    def _read_up_to(self, end: int) -> None:
        with open(self.path, "rb", buffering=0) as f:
            while self._position < end:
                chunk = os.pread(f.fileno(), min(COPY_CHUNK_BYTES, end - self._position), self._position)
                if not chunk:
                    raise SourceError(f"{self.path}: shorter than its header says (truncated download?)")
                self._sha256.update(chunk)
                self._position += len(chunk)


def keep_freed_memory() -> None:
    """Have glibc reuse freed blocks instead of returning them to the OS.

    Every row block allocates tens of MB of float32 work buffers; by default glibc maps each from the OS and
    unmaps it when freed, so the kernel zero-fills every page again (at 7B, half the merge time was page
    faults). With a higher mmap/trim threshold the same memory is reused; peak RSS stays a few blocks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators behave differently; nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 4 << 30)


def _write_shard(shard: ShardPlan, path: Path, chunks: queue.Queue, digests: dict[Path, SourceDigest],
                 on_bytes: Progress) -> str:
    writer = ShardWriter(path, [t.entry for t in shard.tensors], metadata={"format": "pt"})
    try:
        for tensor in shard.tensors:
            remaining = tensor.entry.nbytes
            while remaining:
                item = chunks.get()
                if isinstance(item, BaseException):
                    raise item
                data = item.data
                view = tensor_bytes(data) if isinstance(data, torch.Tensor) else memoryview(data)
                writer.write_bytes(item.tensor, view)
                if item.source.file in digests:
                    digests[item.source.file].feed(item.source.offset, item.source.data)
                remaining -= view.nbytes
                on_bytes(view.nbytes)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def _produce_chunks(plan: BuildPlan, chunks: queue.Queue, stop: threading.Event) -> None:
    """Read, merge and cast every output tensor in plan order, handing chunks to the writer."""

    def put(item) -> bool:
        while not stop.is_set():
            try:
                chunks.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    try:
        for shard in plan.shards:
            for tensor in shard.tensors:
                if tensor.entry.nbytes == 0:
                    continue
                parts = copied_chunks(tensor.source) if tensor.action == "copy" else output_blocks(tensor)
                for part, source_read in parts:
                    if not put(Chunk(tensor.name, part, source_read)):
                        return
        put(_DONE)
    except BaseException as error:  # handed to the writing thread, which raises it in the caller
        put(error)


@dataclass(frozen=True)
class SourceRead:
    """Bytes of a base weight file the merge read, so the file's hash needs no second pass over it."""

    file: Path
    offset: int
    data: memoryview


@dataclass(frozen=True)
class Chunk:
    """The next bytes of an output tensor, handed from the merging thread to the writing thread."""

    tensor: str
    data: torch.Tensor | bytes
    source: SourceRead


def copied_chunks(location: TensorLocation) -> Iterator[tuple[bytes, SourceRead]]:
    """An unchanged tensor's stored bytes, slice by slice, without materialising it as a tensor."""
    offset = location.start
    for chunk in read_byte_chunks(location, COPY_CHUNK_BYTES):
        yield chunk, SourceRead(location.file, offset, memoryview(chunk))
        offset += len(chunk)


def output_blocks(tensor: TensorPlan) -> Iterator[tuple[torch.Tensor, SourceRead]]:
    """The output tensor in row blocks: cast, or merged with its updates and checked for NaN/Inf/overflow."""
    shape = tensor.source.shape
    if not shape:
        source = read_tensor(tensor.source)
        yield source.to(tensor.out_dtype), SourceRead(tensor.source.file, tensor.source.start, tensor_bytes(source))
        return
    block_rows = shape[0] if any(d.needs_whole_tensor for d in tensor.deltas) else rows_per_block(tensor.source)
    factors = [
        (d, read_tensor(d.a) if d.a else None, read_tensor(d.b), read_tensor(d.magnitude) if d.magnitude else None)
        for d in tensor.deltas
    ]
    token_rows = read_tensor(tensor.token_rows.values) if tensor.token_rows else None
    for start in range(0, shape[0], block_rows):
        end = min(shape[0], start + block_rows)
        source = read_tensor_rows(tensor.source, start, end)
        source_read = SourceRead(tensor.source.file, tensor.source.start + start * tensor.source.nbytes // shape[0],
                                 tensor_bytes(source))
        block = merged_block(source, tensor, factors, token_rows, start, end, out_dtype=tensor.out_dtype)
        if not (factors or tensor.out_dtype == torch.float16) or all_finite(block):
            yield block, source_read
            continue
        exact = merged_block(source, tensor, factors, token_rows, start, end, out_dtype=torch.float32)
        if tensor.out_dtype == torch.float16 and torch.isfinite(exact).all():
            raise SourceError(
                f"merged tensor {tensor.name!r} overflows float16: its largest magnitude is "
                f"{exact.abs().max().item():.4g}, beyond float16's {FLOAT16_MAX:g}. Set `output.dtype: bfloat16` "
                "(float32's range) or float32"
            )
        raise SourceError(
            f"merged tensor {tensor.name!r} contains NaN or Inf: the adapter's weights for it are broken "
            f"(check {', '.join(d.module for d in tensor.deltas) or 'its replacement'} in the adapter)"
        )


def all_finite(block: torch.Tensor) -> bool:
    """No NaN or Inf: aminmax propagates NaN and exposes +/-inf, in one pass and without a boolean buffer."""
    low, high = torch.aminmax(block)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def merged_block(source, tensor: TensorPlan, factors, token_rows, start: int, end: int, *, out_dtype) -> torch.Tensor:
    block = source.to(out_dtype)
    if token_rows is not None and tensor.token_rows is not None:  # the values read for tensor.token_rows
        block = replace_token_rows(block, tensor.token_rows.indices, token_rows, start, end)
    # Updates apply one after another, each rounded into the output dtype, as peft merges layer by layer.
    for delta, a, b, magnitude in factors:
        block = merge_delta_rows(block, delta, a, b, magnitude, start, end, out_dtype=out_dtype)
    return block


def rows_per_block(source) -> int:
    row_fp32_bytes = 4 * (source.nbytes // source.dtype.itemsize // source.shape[0])
    return max(1, BLOCK_BYTES // max(row_fp32_bytes, 1) // BLOCK_ROW_MULTIPLE) * BLOCK_ROW_MULTIPLE


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


def copy_side_files(plan: BuildPlan, staging: Path) -> list[str]:
    """Copy tokenizer files, remote code and (separate mode) adapter weights byte for byte."""
    written = []
    for copy in plan.copies:
        dest = staging / copy.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copy.source, dest)
        written.append(copy.dest)
    return written
