"""Reading safetensors headers and streaming tensors into files whose header is written first."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from builder.errors import SourceError

# safetensors dtype names <-> torch dtypes, and the byte width of each.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}
# A header larger than this is not a safetensors file (the format's own limit is 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class TensorLocation:
    """Where one tensor's bytes lie: file, absolute byte range, dtype and shape."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_safetensors_header(path: Path) -> dict[str, TensorLocation]:
    """Parse a safetensors file's header into tensor locations without reading tensor data."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) != 8:
                raise SourceError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES:
                raise SourceError(f"{path}: not a safetensors file (header length {header_len} is implausible)")
            header = json.loads(f.read(header_len))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path}: cannot read safetensors header: {exc}") from exc
    data_start = 8 + header_len
    file_size = path.stat().st_size
    locations = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise SourceError(f"{path}: tensor {name!r} has unsupported dtype {info.get('dtype')!r}")
        begin, end = info["data_offsets"]
        if data_start + end > file_size:
            raise SourceError(f"{path}: tensor {name!r} extends past the end of the file (truncated download?)")
        locations[name] = TensorLocation(name, path, dtype, tuple(info["shape"]), data_start + begin, data_start + end)
    return locations


def read_tensor(location: TensorLocation) -> torch.Tensor:
    """Read one tensor's bytes into a fresh CPU tensor (the only copy held)."""
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
        return torch.empty(location.shape, dtype=location.dtype)
    return torch.frombuffer(buffer, dtype=location.dtype).reshape(location.shape)


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


@dataclass(frozen=True)
class TensorEntry:
    """One tensor a shard will hold: its name, output dtype and shape, known before any bytes move."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def encode_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """The 8-byte length plus JSON header for tensors laid out in the given order."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for entry in entries:
        header[entry.name] = {
            "dtype": TORCH_TO_SAFETENSORS[entry.dtype],
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    # Pad with spaces so tensor data starts 8-byte aligned, as safetensors itself does.
    encoded += b" " * (-len(encoded) % 8)
    return struct.pack("<Q", len(encoded)) + encoded


class ShardWriter:
    """Writes one safetensors file tensor by tensor: the header comes from the plan, then bytes stream in order.

    Memory stays at one tensor (or one row block), never one shard, because nothing is buffered here.
    """

    def __init__(self, path: Path, entries: list[TensorEntry], *, metadata: dict[str, str]):
        self.path = path
        self._entries = entries
        self._next = 0
        self._remaining_in_entry = entries[0].nbytes if entries else 0
        self._file = open(path, "wb")
        self._file.write(encode_header(entries, metadata))

    def _expect(self, name: str, nbytes: int) -> None:
        entry = self._entries[self._next]
        if entry.name != name:
            raise AssertionError(f"{self.path.name}: expected tensor {entry.name!r} next, got {name!r}")
        if nbytes > self._remaining_in_entry:
            raise AssertionError(f"{self.path.name}: {name!r} received more bytes than planned")
        self._remaining_in_entry -= nbytes
        if self._remaining_in_entry == 0:
            self._next += 1
            if self._next < len(self._entries):
                self._remaining_in_entry = self._entries[self._next].nbytes

    def write_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Append a tensor (or the next row block of one) whose dtype matches the plan."""
        planned = self._entries[self._next]
        if tensor.dtype != planned.dtype:
            raise AssertionError(f"{name}: planned {planned.dtype}, got {tensor.dtype}")
        data = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
        self._expect(name, data.nbytes)
        self._file.write(memoryview(data))

    def copy_bytes(self, name: str, location: TensorLocation) -> None:
        """Copy a tensor's bytes straight from its source file, without materialising it."""
        self._expect(name, location.nbytes)
        self._file.flush()
        with open(location.file, "rb") as src:
            copy_file_range(src.fileno(), self._file.fileno(), location.start, location.nbytes)

    def finish(self) -> None:
        """Close the file, which must now hold every planned tensor."""
        self._file.close()
        if self._next != len(self._entries):
            missing = self._entries[self._next].name
            raise AssertionError(f"{self.path.name}: closed before tensor {missing!r} was written")

    def abort(self) -> None:
        """Close after a failure; the staging folder holding the partial file is removed by the caller."""
        self._file.close()


def copy_file_range(src_fd: int, dst_fd: int, src_offset: int, count: int) -> None:
    """Kernel-side copy of count bytes from src_offset to the destination's current position."""
    dst_offset = os.lseek(dst_fd, 0, os.SEEK_CUR)
    done = 0
    while done < count:
        try:
            n = os.copy_file_range(src_fd, dst_fd, count - done, src_offset + done, dst_offset + done)
        except (AttributeError, OSError):
            n = os.pwrite(dst_fd, os.pread(src_fd, min(count - done, 64 << 20), src_offset + done), dst_offset + done)
        if n == 0:
            raise SourceError(f"unexpected end of file copying {count} bytes at offset {src_offset}")
        done += n
    os.lseek(dst_fd, dst_offset + count, os.SEEK_SET)
