"""Writing a plan's weights: stream each base tensor, merge its LoRA deltas on the CPU or a GPU, write shards;
copy side files; write separate mode's concatenated adapter."""

from __future__ import annotations

import ctypes
import hashlib
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.adapter_compose import Concatenation
from builder.adapter_match import ADAPTER_PREFIX
from builder.errors import SourceError
from builder.finite import all_finite, nonfinite_found, read_from, remedy
from builder.formatting import dump_json
from builder.merge_blocks import BLOCK_ROW_MULTIPLE, MergedBlock, nonfinite_error, read_factors
from builder.plan import BuildPlan, ShardPlan, TensorPlan
from builder.safetensors_io import (
    ShardWriter,
    TensorLocation,
    read_into,
    read_safetensors_header,
    read_tensor,
    tensor_bytes,
)

# torch comes in with the merge device, when write_weights starts: build.py imports this module for validate and
# --dry-run too, which must not pay for it.
if TYPE_CHECKING:
    import torch

    from builder.merge_device import MergeDevice

# A merged tensor moves through the pipeline in row blocks whose float32 working copy stays under this size, so
# memory is bounded by a few blocks, not by the largest tensor (a 7B embedding is 2 GB in fp32).
BLOCK_BYTES = 64 << 20
# Unchanged tensors are copied in slices of this size.
COPY_CHUNK_BYTES = 16 << 20
# Pieces in flight between two stages of the pipeline.
QUEUE_DEPTH = 4

Progress = Callable[[int], None]
# mallopt(3) parameter numbers from glibc's malloc.h.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass
class WrittenWeights:
    """sha256 of every written weight file, and of every base weight file read (for the manifest)."""

    written: dict[str, str]
    sources: dict[Path, str]


@dataclass(frozen=True)
class Piece:
    """What moves through the pipeline: a row block of a tensor to merge or cast, or a slice of one to copy."""

    tensor: TensorPlan
    offset: int  # of its source bytes in the base weight file
    nbytes: int
    rows: tuple[int, int] | None  # None: bytes copied unchanged


@dataclass(frozen=True)
class SourceRead:
    """Bytes of a base weight file the merge read, so the file's hash needs no second pass over it."""

    file: Path
    offset: int
    data: torch.Tensor


def write_weights(plan: BuildPlan, staging: Path, *, on_bytes: Progress = lambda n: None) -> WrittenWeights:
    """Write every planned shard (and the index when there are several), hashing what is written and read.

    Five threads overlap the work: one reads the base's bytes, one hashes them, one merges (on the CPU, or
    on a GPU through pinned buffers), and one writes while another hashes what is written. File I/O, hashing and
    torch release the GIL, so on a 2-core machine the CPU work spreads over both cores, and on a GPU machine the
    build runs at the speed of its slowest stage (the disk or a hash). Memory stays at a few pieces per queue;
    no file is read twice: the base's and the adapters' weight files are hashed from the bytes the merge reads.
    """
    from builder.merge_device import merge_device_for

    device = merge_device_for(plan.merge_device)
    keep_freed_memory()
    digests = {path: SourceDigest(path) for path in plan.base.weight_files}
    adapter_digests = {path: SourceDigest(path) for path in adapter_weight_files(plan)}
    pipeline = Pipeline()
    merge_inbox, digest_inbox, written = pipeline.pipe(), pipeline.pipe(), pipeline.pipe()
    pipeline.start("read", read_pieces, plan, device, merge_inbox, digest_inbox)
    pipeline.start("hash-source", hash_sources, digests, digest_inbox)
    pipeline.start("merge", merge_pieces, device, merge_inbox, written, adapter_digests)
    hashes: dict[str, str] = {}
    try:
        for shard in plan.shards:
            hashes[shard.filename] = _write_shard(shard, staging / shard.filename, written, pipeline, on_bytes)
        sources = {path: digest.hexdigest(pipeline) for path, digest in {**digests, **adapter_digests}.items()}
    except Stopped:
        pipeline.raise_failure()
        raise
    finally:
        pipeline.close()
        device.close()
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.weight_bytes},
            "weight_map": {t.name: s.filename for s in plan.shards for t in s.tensors},
        }
        (staging / "model.safetensors.index.json").write_text(dump_json(index))
    return WrittenWeights(written=hashes, sources=sources)


class Stopped(Exception):
    """A stage gave up because another one failed (or the build was interrupted)."""


class Pipe:
    """A bounded queue between two stages that gives up as soon as the pipeline stops."""

    def __init__(self, stop: threading.Event, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = stop

    def put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise Stopped

    def get(self):
        while not self._stop.is_set():
            try:
                return self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
        raise Stopped

    def __iter__(self) -> Iterator:
        """Items until the sender's end mark."""
        while (item := self.get()) is not _END:
            yield item


_END = object()


class Pipeline:
    """Threads joined by pipes; the first failure in any stage stops them all and is raised in the caller."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self._errors: list[BaseException] = []
        self._threads: list[threading.Thread] = []

    def pipe(self, depth: int = QUEUE_DEPTH) -> Pipe:
        return Pipe(self.stop, depth)

    def start(self, name: str, stage: Callable, *args) -> None:
        def run() -> None:
            try:
                stage(*args)
            except Stopped:
                pass
            except BaseException as error:  # raised in the caller by raise_failure
                self._errors.append(error)
                self.stop.set()

        thread = threading.Thread(target=run, name=f"modelpack-{name}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def raise_failure(self) -> None:
        if self._errors:
            raise self._errors[0]

    def close(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join()


def plan_pieces(plan: BuildPlan) -> Iterator[Piece]:
    """Every output tensor's source bytes in plan order, in row blocks (merge, cast) or slices (copy)."""
    for shard in plan.shards:
        for tensor in shard.tensors:
            source = tensor.source
            if tensor.entry.nbytes == 0:
                continue
            if tensor.action == "copy":
                for offset in range(source.start, source.end, COPY_CHUNK_BYTES):
                    yield Piece(tensor, offset, min(COPY_CHUNK_BYTES, source.end - offset), None)
            elif not source.shape:
                yield Piece(tensor, source.start, source.nbytes, (0, 1))
            else:
                rows = source.shape[0]
                block = rows if any(d.needs_whole_tensor for d in tensor.deltas) else rows_per_block(source)
                row_bytes = source.nbytes // rows
                for start in range(0, rows, block):
                    end = min(rows, start + block)
                    yield Piece(tensor, source.start + start * row_bytes, (end - start) * row_bytes, (start, end))


def rows_per_block(source: TensorLocation) -> int:
    row_fp32_bytes = 4 * (source.nbytes // source.dtype.itemsize // source.shape[0])
    return max(1, BLOCK_BYTES // max(row_fp32_bytes, 1) // BLOCK_ROW_MULTIPLE) * BLOCK_ROW_MULTIPLE


def read_pieces(plan: BuildPlan, device: MergeDevice, merge_inbox: Pipe, digest_inbox: Pipe) -> None:
    """Stage 1: read every piece's source bytes into a host buffer the device can copy from (pinned for a GPU)."""
    files: dict[Path, int] = {}
    try:
        for piece in plan_pieces(plan):
            file = piece.tensor.source.file
            if file not in files:
                files[file] = os.open(file, os.O_RDONLY)
                # Reads go front to back through each file: a larger read-ahead keeps the disk busy.
                os.posix_fadvise(files[file], 0, 0, os.POSIX_FADV_SEQUENTIAL)
            buffer = device.host_buffer(piece.nbytes)
            read_into(files[file], piece.offset, tensor_bytes(buffer), file=file, name=piece.tensor.name)
            merge_inbox.put((piece, buffer))
            digest_inbox.put(SourceRead(file, piece.offset, buffer))
        merge_inbox.put(_END)
        digest_inbox.put(_END)
    finally:
        for fd in files.values():
            os.close(fd)


def hash_sources(digests: dict[Path, SourceDigest], inbox: Pipe) -> None:
    """Stage 2: sha256 of the base's weight files from the bytes stage 1 read (for the manifest's provenance)."""
    for read in inbox:
        if read.file in digests:
            digests[read.file].feed(read.offset, tensor_bytes(read.data))
    for digest in digests.values():
        digest.done.set()


def adapter_weight_files(plan: BuildPlan) -> list[Path]:
    """The adapters' safetensors files the merge reads its factors from, as the user has them (a legacy .bin adapter
    is read through a converted copy, which is not what the manifest fingerprints)."""
    if plan.mode != "merge":
        return []
    files = (a.checkpoint.weights_file for a in plan.adapters)
    return [f for f in dict.fromkeys(files) if f.parent in {a.checkpoint.path for a in plan.adapters}]


def merge_pieces(device: MergeDevice, inbox: Pipe, outbox: Pipe, adapter_digests: dict[Path, SourceDigest]) -> None:
    """Stage 3: merge or cast row blocks on the device; copied slices pass through unchanged, in order. The
    adapters' files are hashed from the factors' bytes as they are read."""

    def hash_factor(location: TensorLocation, data: torch.Tensor) -> None:
        if location.file in adapter_digests:
            adapter_digests[location.file].feed(location.start, tensor_bytes(data))

    factors, current = None, None
    for piece, buffer in inbox:
        if piece.rows is None:
            # Copied bytes are checked here, in host memory, as any block is where it is made.
            if not all_finite(buffer.view(piece.tensor.source.dtype.torch)):
                raise nonfinite_error(piece.tensor, *copied_rows(piece))
            outbox.put(buffer)
            continue
        tensor = piece.tensor
        if tensor is not current:
            factors, current = device.place(read_factors(tensor, on_read=hash_factor)), tensor
        assert factors is not None
        start, end = piece.rows
        shape = (end - start, *tensor.source.shape[1:]) if tensor.source.shape else ()
        source = buffer.view(tensor.source.dtype.torch).reshape(shape)
        outbox.put(device.merge(tensor, factors, source, start, end))
    outbox.put(_END)
    for digest in adapter_digests.values():
        digest.done.set()


def copied_rows(piece: Piece) -> tuple[int, int]:
    """The rows (along the first dimension) a copied slice of a tensor's bytes touches."""
    source = piece.tensor.source
    if not source.shape:
        return 0, 1
    row_bytes = source.nbytes // source.shape[0]
    first = (piece.offset - source.start) // row_bytes
    return first, -(-(piece.offset + piece.nbytes - source.start) // row_bytes)


def _write_shard(shard: ShardPlan, path: Path, written: Pipe, pipeline: Pipeline, on_bytes: Progress) -> str:
    """Stage 4 (the caller's thread): write one shard's tensors in order while stage 5 hashes the same bytes."""
    digest = BackgroundSha256(pipeline)
    writer = ShardWriter(path, [t.entry for t in shard.tensors], metadata={"format": "pt"}, digest=digest)
    try:
        for tensor in shard.tensors:
            remaining = tensor.entry.nbytes
            while remaining:
                item = written.get()
                data = item.result() if isinstance(item, MergedBlock) else item
                view = tensor_bytes(data)
                writer.write_bytes(tensor.name, view)
                remaining -= view.nbytes
                on_bytes(view.nbytes)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


class BackgroundSha256:
    """sha256 computed in its own thread from the chunks handed to it, so hashing overlaps writing."""

    def __init__(self, pipeline: Pipeline):
        self._sha256 = hashlib.sha256()
        self._inbox = pipeline.pipe()
        self._done = threading.Event()
        self._pipeline = pipeline
        pipeline.start("hash-output", self._run)

    def _run(self) -> None:
        for chunk in self._inbox:
            self._sha256.update(chunk)
        self._done.set()

    def update(self, chunk) -> None:
        self._inbox.put(chunk)

    def hexdigest(self) -> str:
        self._inbox.put(_END)
        while not self._done.wait(0.1):
            if self._pipeline.stop.is_set():
                raise Stopped
        return self._sha256.hexdigest()


class SourceDigest:
    """sha256 of a source file, fed with the bytes the merge reads anyway, by one stage.

    Bytes the merge skips (the header, tensors the adapter replaces) or reads out of file order (an adapter whose
    layers are stored 0, 1, 10, 11, ... while the base's come 0, 1, 2, ...) are read here, once the merge's reads
    move past them; bytes read twice (a tied head re-reading the embedding) are hashed once.
    """

    def __init__(self, path: Path):
        self.path = path
        self._sha256 = hashlib.sha256()
        self._position = 0
        self.done = threading.Event()  # set by the hashing stage once every read was fed

    def feed(self, offset: int, data: memoryview) -> None:
        if offset > self._position:
            self._read_up_to(offset)
        already = self._position - offset
        if already < data.nbytes:
            self._sha256.update(data[already:])
            self._position += data.nbytes - already

    def hexdigest(self, pipeline: Pipeline) -> str:
        while not self.done.wait(0.1):
            if pipeline.stop.is_set():
                raise Stopped
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

    Every row block allocates tens of MB of buffers; by default glibc maps each from the OS and unmaps it when
    freed, so the kernel zero-fills every page again (at 7B, half the merge time was page faults). With a higher
    mmap/trim threshold the same memory is reused; peak RSS stays a few blocks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): their allocators behave differently; nothing to tune
        return
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
    libc.mallopt(M_TRIM_THRESHOLD, 4 << 30)


def copy_side_files(plan: BuildPlan, staging: Path) -> list[str]:
    """Copy tokenizer files, remote code and (separate mode) adapter weights byte for byte."""
    written = []
    for copy in plan.copies:
        dest = staging / copy.dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        if copy.role == "adapter weights":
            copy_finite_safetensors(copy.source, dest, bundle_name=copy.dest)
        else:
            shutil.copyfile(copy.source, dest)
        written.append(copy.dest)
    return written


def copy_finite_safetensors(source: Path, dest: Path, *, bundle_name: str) -> None:
    """Copy a safetensors file byte for byte in slices, checking each float tensor's slices for NaN and Inf as they
    pass (separate mode's adapter, shipped as the training run saved it)."""
    import torch

    tensors = sorted(read_safetensors_header(source).values(), key=lambda t: t.start)
    header_bytes = tensors[0].start if tensors else source.stat().st_size
    buffer = torch.empty(COPY_CHUNK_BYTES, dtype=torch.uint8)
    fd = os.open(source, os.O_RDONLY)
    try:
        with open(dest, "wb") as out:
            out.write(os.pread(fd, header_bytes, 0))
            for location in tensors:
                for offset in range(location.start, location.end, COPY_CHUNK_BYTES):
                    chunk = buffer[:min(COPY_CHUNK_BYTES, location.end - offset)]
                    read_into(fd, offset, tensor_bytes(chunk), file=source, name=location.name)
                    if not all_finite(chunk.view(location.dtype.torch)):
                        raise SourceError(
                            f"tensor {location.name!r} of the bundle's {bundle_name} contains NaN or Inf "
                            f"({nonfinite_found(read_tensor(location))}) as read from "
                            f"{read_from(location, location.name)}: {remedy(location)}"
                        )
                    out.write(tensor_bytes(chunk))
    finally:
        os.close(fd)


def concatenated_tensors(concat: Concatenation) -> dict[str, torch.Tensor]:
    """The concatenated adapter's tensors in float32, keyed as peft saves them (weights folded into A, as peft's
    cat does)."""
    import torch

    def finite(location: TensorLocation, values: torch.Tensor) -> torch.Tensor:
        if not all_finite(values):
            raise SourceError(
                f"tensor {location.name!r} of the bundle's concatenated adapter contains NaN or Inf "
                f"({nonfinite_found(values)}) as read from {read_from(location)}: {remedy(location)}"
            )
        return values

    tensors = {}
    for module, parts in concat.modules.items():
        a_parts, b_parts = [], []
        for delta in parts:
            assert delta.a is not None  # refuse_inexact_concatenation refused lora_bias
            a = finite(delta.a, read_tensor(delta.a).float()) * delta.scaling
            if not all_finite(a):
                raise SourceError(
                    f"tensor {delta.a.name!r} of the bundle's concatenated adapter overflows float32 when scaled by "
                    f"{delta.scaling:g} ({delta.adapter}'s weight times its alpha / r); lower the weight in the spec"
                )
            a_parts.append(a)
            b_parts.append(finite(delta.b, read_tensor(delta.b).float()))
        a, b = torch.cat(a_parts, dim=0), torch.cat(b_parts, dim=1)
        padding = concat.rank - a.shape[0]
        a = torch.cat([a, a.new_zeros(padding, a.shape[1])], dim=0)
        b = torch.cat([b, b.new_zeros(b.shape[0], padding)], dim=1)
        names = ("lora_embedding_A", "lora_embedding_B") if parts[0].kind == "embedding" \
            else ("lora_A.weight", "lora_B.weight")
        tensors[f"{ADAPTER_PREFIX}{module}.{names[0]}"] = a.contiguous()
        tensors[f"{ADAPTER_PREFIX}{module}.{names[1]}"] = b.contiguous()
    return tensors


def write_concatenated_adapter(concat: Concatenation, folder: Path) -> None:
    """adapter/adapter_model.safetensors of the concatenated adapter (small: the adapters' factors side by side)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(concatenated_tensors(concat), str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
