"""Reading safetensors headers and streaming tensors into files whose header is written first."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterator
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

    Memory stays at one chunk (a row block or a slice of a copied tensor), never one shard, because nothing is
    buffered here. The file's sha256 is computed from the bytes as they are written, so the manifest needs no
    second pass over the weights.
    """

    def __init__(self, path: Path, entries: list[TensorEntry], *, metadata: dict[str, str]):
        self.path = path
        self._entries = entries
        self._next = 0
        self._remaining = 0
        self._sha256 = hashlib.sha256()
        self._file = open(path, "wb")
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
        self._file.write(data)

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
    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def read_byte_chunks(location: TensorLocation, chunk_bytes: int) -> Iterator[bytes]:
    """A tensor's stored bytes in chunks, for copying it without materialising it as a tensor."""
    with open(location.file, "rb", buffering=0) as f:
        offset = location.start
        while offset < location.end:
            chunk = os.pread(f.fileno(), min(chunk_bytes, location.end - offset), offset)
            if not chunk:
                raise SourceError(f"{location.file}: unexpected end of file reading tensor {location.name!r}")
            offset += len(chunk)
            yield chunk
