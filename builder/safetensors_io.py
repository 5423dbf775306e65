"""Reading safetensors headers and streaming tensors into files whose header is written first."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from builder.dtypes import SAFETENSORS_DTYPES, Dtype, readable
from builder.errors import SourceError

# torch is imported by the two functions that make tensors: headers and the writer need none of it, and validate,
# inspect and build --dry-run read headers too, answering in well under a second.
if TYPE_CHECKING:
    import torch

# A header larger than this is not a safetensors file (the format's own limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000
_REDOWNLOAD = "the file is damaged or was not written by safetensors; re-download or re-save it"


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: Dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse and fully validate a safetensors file's header into tensor locations, without reading tensor data.

    The checks are the safetensors library's own: every tensor well-formed, and the tensors' byte ranges tiling
    the data section exactly (no overlap, no gap, nothing past the end), so no later read can go astray.
    """
    try:
        with open(path, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise SourceError(
                    f"{path}: not a safetensors file (shorter than its 8-byte header length); {_REDOWNLOAD}"
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES:
                raise SourceError(
                    f"{path}: not a safetensors file (header length {header_len} is implausible); {_REDOWNLOAD}"
                )
            if 8 + header_len > file_size:
                raise SourceError(
                    f"{path}: the header claims {header_len} bytes but the file has only {file_size}; {_REDOWNLOAD}"
                )
            raw_header = f.read(header_len)
    except OSError as exc:
        raise SourceError(f"{path}: cannot read safetensors header: {exc.strerror or exc}") from exc
    header = _parse_header(path, raw_header)
    data_start = 8 + header_len
    locations = {}
    for name, info in header.items():
        if name != "__metadata__":
            locations[name] = _tensor_location(path, name, info, data_start)
    _check_tiling(path, sorted(locations.values(), key=lambda t: (t.start, t.end)), data_start, file_size)
    return locations


def _parse_header(path: Path, raw_header: bytes) -> dict:
    """The header's JSON object, with `__metadata__` (if any) checked to be the str -> str map the format defines."""
    try:
        header = json.loads(raw_header.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        raise SourceError(f"{path}: the safetensors header is not UTF-8 text; {_REDOWNLOAD}") from None
    except RecursionError:
        raise SourceError(f"{path}: the safetensors header nests JSON too deeply; {_REDOWNLOAD}") from None
    except ValueError as exc:  # json.JSONDecodeError, or a duplicate key from _unique_keys
        reason = f"{exc.msg} at byte {exc.pos}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise SourceError(f"{path}: the safetensors header is not valid JSON ({reason}); {_REDOWNLOAD}") from None
    if not isinstance(header, dict):
        raise SourceError(
            f"{path}: the safetensors header is a JSON {_json_type(header)}, not an object; {_REDOWNLOAD}"
        )
    metadata = header.get("__metadata__")
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(value, str) for value in metadata.values())
    ):
        raise SourceError(f"{path}: __metadata__ must map names to strings, found {_short(metadata)}; {_REDOWNLOAD}")
    return header


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object whose keys are unique: a repeated tensor name would hide one of the two entries."""
    result = dict(pairs)
    if len(result) != len(pairs):
        duplicate = next(key for key, count in Counter(key for key, _ in pairs).items() if count > 1)
        raise ValueError(f"key {duplicate!r} appears twice")
    return result


def _tensor_location(path: Path, name: str, info: object, data_start: int) -> TensorLocation:
    """One header entry checked for types, dtype and a byte span that matches its shape."""

    def damaged(problem: str) -> SourceError:
        return SourceError(f"{path}: tensor {name!r} {problem}; {_REDOWNLOAD}")

    if not isinstance(info, dict):
        raise damaged(f"is a JSON {_json_type(info)} where an object with dtype, shape and data_offsets belongs")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise damaged(f"lacks {' and '.join(missing)}")
    dtype_name, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    dtype = SAFETENSORS_DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None or not readable(dtype):
        reads = ", ".join(known.safetensors for known in SAFETENSORS_DTYPES.values() if readable(known))
        raise SourceError(
            f"{path}: tensor {name!r} has dtype {_short(dtype_name)}, which modelpack cannot read "
            f"(it reads {reads}); convert the tensor to one of these and re-save the file"
        )
    if not isinstance(shape, list) or not all(_is_count(dim) for dim in shape):
        raise damaged(f"has shape {_short(shape)}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise damaged(f"has data_offsets {_short(offsets)}, not two non-negative integers [begin, end]")
    begin, end = offsets
    if begin > end:
        raise damaged(f"has data_offsets {offsets} that end before they begin")
    needed = _byte_size(shape, dtype.itemsize)
    if needed != end - begin:
        needs = "more than 2**64" if needed is None else needed
        raise damaged(f"spans {end - begin} bytes but shape {_short(shape)} of {dtype_name} needs {needs}")
    return TensorLocation(name, path, dtype, tuple(shape), data_start + begin, data_start + end)


def _check_tiling(path: Path, tensors: list[TensorLocation], data_start: int, file_size: int) -> None:
    """Tensors sorted by offset must cover the data section exactly, as the safetensors library requires."""
    position = data_start
    previous: TensorLocation | None = None
    for tensor in tensors:
        if tensor.start < position:
            assert previous is not None  # the first tensor starts at or after data_start
            raise SourceError(
                f"{path}: tensor {tensor.name!r} (data bytes {tensor.start - data_start}-{tensor.end - data_start}) "
                f"overlaps tensor {previous.name!r} "
                f"(data bytes {previous.start - data_start}-{previous.end - data_start}); "
                f"{_REDOWNLOAD}"
            )
        if tensor.start > position:
            raise SourceError(
                f"{path}: data bytes {position - data_start}-{tensor.start - data_start} before tensor {tensor.name!r} "
                f"belong to no tensor; {_REDOWNLOAD}"
            )
        position, previous = tensor.end, tensor
    if position > file_size:
        assert previous is not None  # with no tensor, position is data_start, which the header check kept in the file
        raise SourceError(
            f"{path}: tensor {previous.name!r} ends {position - file_size} bytes past the end of the file "
            f"(truncated download?); {_REDOWNLOAD}"
        )
    if position < file_size:
        raise SourceError(
            f"{path}: the last {file_size - position} bytes of the file belong to no tensor; {_REDOWNLOAD}"
        )


def _byte_size(shape: list[int], itemsize: int) -> int | None:
    """prod(shape) * itemsize, or None past 2**64 bytes: a hostile shape must not cost a huge multiplication."""
    if 0 in shape:
        return 0
    size = itemsize
    for dim in shape:
        size *= dim
        if size > 2**64:
            return None
    return size


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _json_type(value: object) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}
    return names.get(type(value), "null")


def _short(value: object) -> str:
    """A JSON value for a message, cut short: a hostile header can hold megabytes in one field."""
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def read_tensor(location: TensorLocation) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor (the only copy held)."""
    import torch

    buffer = bytearray(location.nbytes)
    with open(location.file, "rb") as f:
        f.seek(location.start)
        view = memoryview(buffer)
        while view:
            n = f.readinto(view)
            if not n:
                raise SourceError(f"{location.file}: unexpected end of file reading tensor {location.name!r}")
            view = view[n:]
    if location.nbytes == 0:
        return torch.empty(location.shape, dtype=location.dtype.torch)
    return torch.frombuffer(buffer, dtype=location.dtype.torch).reshape(location.shape)


def read_tensor_rows(location: TensorLocation, row_start: int, row_end: int) -> torch.Tensor:
    """Read rows [row_start, row_end) of a tensor (first dimension), for block-wise processing of large tensors."""
    row_bytes = location.nbytes // location.shape[0]
    sub = TensorLocation(
        location.name,
        location.file,
        location.dtype,
        (row_end - row_start, *location.shape[1:]),
        location.start + row_start * row_bytes,
        location.start + row_end * row_bytes,
    )
    return read_tensor(sub)


def read_into(fd: int, offset: int, view: memoryview, *, file: Path, name: str) -> None:
    """Fill view with the file's bytes from offset (straight into the buffer: no intermediate copy)."""
    while view.nbytes:
        n = os.preadv(fd, [view], offset)
        if not n:
            raise SourceError(f"{file}: unexpected end of file reading tensor {name!r}")
        view, offset = view[n:], offset + n


@dataclass(frozen=True)
class TensorEntry:
    """One tensor a shard will hold: its name, output dtype and shape, known before any bytes move."""

    name: str
    dtype: Dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * self.dtype.itemsize


def encode_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype.safetensors,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so tensor data starts 8-byte aligned, as safetensors itself does.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


# Written bytes are handed to the disk every this many bytes (see start_writeback).
WRITEBACK_BYTES = 64 << 20
SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _sync_file_range():
    """libc's sync_file_range(2), where there is one (Linux), else None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError, TypeError):  # no such call (macOS), no process handle to look in (Windows)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a range of a file to disk without waiting for it.

    The bundle is fsynced before it is published; without this, a machine with a lot of memory keeps gigabytes of
    written weights in its page cache until then (the kernel starts writing at 10% of memory dirty) and the build
    ends waiting seconds for the disk. Started as each range is written, the disk writes while the merge goes on.
    Best effort: where the call does not exist or fails, the final fsync does the work.
    """
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header comes from the plan, then bytes stream in order.

    Memory stays at one chunk (a row block or a slice of a copied tensor), never one shard, because nothing is
    buffered here. The file's sha256 is computed from the bytes as they are written, so the manifest needs no
    second pass over the weights; `digest` may be any object with hashlib's update/hexdigest (one that hashes
    in another thread, say). Every WRITEBACK_BYTES written are handed to the disk at once (start_writeback).
    """

    def __init__(self, path: Path, entries: list[TensorEntry], *, metadata: dict[str, str], digest=None):
        self.path = path
        self._entries = entries
        self._next = 0
        self._remaining = 0
        self._sha256 = hashlib.sha256() if digest is None else digest
        self._file = open(path, "wb", buffering=0)  # chunks are megabytes: a buffer would only copy them
        self._written = self._handed_to_disk = 0
        self._write(encode_header(entries, metadata))
        self._advance()

    def _advance(self) -> None:
        """Move past finished (and empty) entries to the next one expecting bytes."""
        while self._remaining == 0 and self._next < len(self._entries):
            self._remaining = self._entries[self._next].nbytes
            self._current = self._entries[self._next]
            self._next += 1

    def _write(self, data) -> None:
        self._sha256.update(data)
        view = memoryview(data).cast("B")
        self._written += view.nbytes
        while view:  # an unbuffered write may write less than asked
            view = view[self._file.write(view):]
        if self._written - self._handed_to_disk >= WRITEBACK_BYTES:
            start_writeback(self._file.fileno(), self._handed_to_disk, self._written - self._handed_to_disk)
            self._handed_to_disk = self._written

    def write_bytes(self, name: str, data) -> None:
        """Append the next bytes of the named tensor (a whole tensor, a row block or a slice of one)."""
        nbytes = memoryview(data).nbytes
        if self._remaining == 0 or self._current.name != name:
            expected = self._current.name if self._remaining else "nothing"
            raise AssertionError(f"{self.path.name}: expected bytes of {expected!r}, got {name!r}")
        if nbytes > self._remaining:
            raise AssertionError(f"{self.path.name}: {name!r} received more bytes than planned")
        self._write(data)
        self._remaining -= nbytes
        self._advance()

    def finish(self) -> str:
        """Close the file, which must now hold every planned tensor; returns its sha256."""
        self._file.close()
        if self._remaining or self._next != len(self._entries):
            raise AssertionError(f"{self.path.name}: closed before tensor {self._current.name!r} was complete")
        return self._sha256.hexdigest()

    def abort(self) -> None:
        """Close after a failure; the staging folder holding the partial file is removed by the caller."""
        self._file.close()


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw little-endian bytes, without a copy when it is contiguous."""
    import torch

    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data  # ndarray.data: memoryview(array)
