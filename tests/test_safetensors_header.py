"""The writer side of builder/safetensors_io.py: encode_header and ShardWriter write what safetensors writes.

The format: an 8-byte little-endian header length, a JSON header (dtype, shape, data_offsets per tensor, then
padding with spaces so the data starts 8-byte aligned), then the tensors' raw bytes. Laid out in the order
safetensors itself picks (by dtype, then name), the files are byte-identical to `safetensors.torch.save`'s.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from builder.dtypes import FLOAT32, SAFETENSORS_DTYPES
from builder.safetensors_io import ShardWriter, TensorEntry, encode_header, tensor_bytes
from helpers import dtype_of

METADATA = {"format": "pt"}


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of any dtype with varied bytes (random bits reinterpreted where randn has no such dtype)."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point and dtype.itemsize > 1:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool()
    raw = torch.randint(0, 256, (*shape, dtype.itemsize), generator=generator, dtype=torch.uint8)
    return raw.view(dtype).reshape(shape)


def split_file(raw: bytes) -> tuple[int, dict, bytes, bytes]:
    """(header length, parsed header, raw header bytes with padding, data section) of a safetensors file."""
    (length,) = struct.unpack("<Q", raw[:8])
    header_bytes = raw[8 : 8 + length]
    return length, json.loads(header_bytes), header_bytes, raw[8 + length :]


def safetensors_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The order in which safetensors lays tensors out (its header lists them in data order)."""
    _, header, _, _ = split_file(save(tensors, metadata=METADATA))
    return [name for name in header if name != "__metadata__"]


def entries(tensors: dict[str, torch.Tensor], order: list[str]) -> list[TensorEntry]:
    return [TensorEntry(name, dtype_of(tensors[name].dtype), tuple(tensors[name].shape)) for name in order]


def write_shard(path, tensors: dict[str, torch.Tensor], order: list[str], *, chunk_rows: int | None = None) -> str:
    """Stream tensors through ShardWriter as the build does: whole, or row block by row block."""
    writer = ShardWriter(path, entries(tensors, order), metadata=METADATA)
    for name in order:
        tensor = tensors[name]
        if chunk_rows and tensor.dim() > 0 and tensor.shape[0] > chunk_rows:
            for start in range(0, tensor.shape[0], chunk_rows):
                writer.write_bytes(name, tensor_bytes(tensor[start : start + chunk_rows]))
        elif tensor.numel():
            writer.write_bytes(name, tensor_bytes(tensor))
    return writer.finish()


CASES = {
    "one-float32": {"a": sample(torch.float32, (1,))},
    "mixed-dtypes": {
        "weight": sample(torch.bfloat16, (4, 3)),
        "bias": sample(torch.float16, (3,)),
        "ids": sample(torch.int64, (5,)),
        "mask": sample(torch.bool, (7,)),
        "scale": sample(torch.float32, ()),
    },
    "empty-and-scalar": {"empty": sample(torch.float32, (0, 4)), "scalar": sample(torch.bfloat16, ())},
    "odd-sizes-need-padding": {
        "x": sample(torch.int8, (3,)),
        "y": sample(torch.uint8, (5, 1)),
        "z": sample(torch.float16, (1,)),
    },
    "model-like": {
        f"model.layers.{i}.{name}": sample(torch.bfloat16, shape, seed=i)
        for i in range(3)
        for name, shape in (
            ("self_attn.q_proj.weight", (16, 8)),
            ("mlp.up_proj.weight", (24, 8)),
            ("norm.weight", (8,)),
        )
    },
}


def test_header_bytes_pinned():
    """One small case byte for byte: length 88 little-endian, compact JSON, three spaces to reach 8-byte alignment."""
    header = encode_header([TensorEntry("a", FLOAT32, (1,))], METADATA)
    json_text = b'{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    assert len(json_text) == 85
    assert header == b"\x58\x00\x00\x00\x00\x00\x00\x00" + json_text + b"   "
    assert header == save({"a": torch.zeros(1)}, metadata=METADATA)[: len(header)]


@pytest.mark.parametrize("case", CASES)
def test_header_is_aligned_and_little_endian(case):
    tensors = CASES[case]
    header = encode_header(entries(tensors, list(tensors)), METADATA)
    length = int.from_bytes(header[:8], "little")
    assert length == len(header) - 8
    assert length % 8 == 0
    text = header[8:].decode("ascii")
    assert text.rstrip(" ").endswith("}")
    assert len(text) - len(text.rstrip(" ")) < 8
    parsed = json.loads(text)
    assert list(parsed) == ["__metadata__", *tensors]
    offset = 0
    for name, tensor in tensors.items():  # tensors tile the data section in the given order
        assert parsed[name]["data_offsets"] == [offset, offset + tensor.nbytes]
        offset += tensor.nbytes


@pytest.mark.parametrize("case", CASES)
def test_header_equals_safetensors_in_its_order(case):
    tensors = CASES[case]
    order = safetensors_order(tensors)
    reference = save(tensors, metadata=METADATA)
    length, _, _, _ = split_file(reference)
    assert encode_header(entries(tensors, order), METADATA) == reference[: 8 + length]


@pytest.mark.parametrize("chunk_rows", [None, 1, 2], ids=["whole", "row-by-row", "blocks-of-2"])
@pytest.mark.parametrize("case", CASES)
def test_shard_writer_writes_the_bytes_safetensors_writes(tmp_path, case, chunk_rows):
    tensors = CASES[case]
    path = tmp_path / "model.safetensors"
    digest = write_shard(path, tensors, safetensors_order(tensors), chunk_rows=chunk_rows)
    written = path.read_bytes()
    reference = save(tensors, metadata=METADATA)
    assert split_file(written)[3] == split_file(reference)[3]  # the data sections
    assert written == reference
    assert digest == hashlib.sha256(written).hexdigest()


@pytest.mark.parametrize("case", CASES)
def test_shard_writer_in_plan_order_reads_back_equal(tmp_path, case):
    """Any tensor order (the plan's, not safetensors' sorted one) is a valid file that safetensors reads back."""
    tensors = CASES[case]
    order = list(reversed(tensors))
    path = tmp_path / "model.safetensors"
    write_shard(path, tensors, order, chunk_rows=2)
    raw = path.read_bytes()
    loaded = load(raw)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor), name
    assert split_file(raw)[3] == b"".join(bytes(tensor_bytes(tensors[name])) for name in order)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == METADATA
        assert list(f.keys()) == sorted(tensors)
        for name in order:
            assert torch.equal(f.get_tensor(name), tensors[name]), name


@pytest.mark.parametrize("name", sorted(SAFETENSORS_DTYPES))
def test_dtype_names_are_safetensors_own(tmp_path, name):
    """Every dtype modelpack writes gets the name safetensors writes for it, and reads back as that dtype."""
    dtype = SAFETENSORS_DTYPES[name].torch
    tensors = {"t": sample(dtype, (2, 3))}
    try:
        reference = save(tensors, metadata=METADATA)
    except (TypeError, ValueError, KeyError) as exc:  # an older safetensors without this dtype
        pytest.skip(f"safetensors cannot save {dtype}: {exc}")
    header = encode_header(entries(tensors, ["t"]), METADATA)
    assert json.loads(header[8:])["t"]["dtype"] == name
    assert header == reference[: len(header)]
    path = tmp_path / "t.safetensors"
    write_shard(path, tensors, ["t"])
    assert path.read_bytes() == reference


def test_non_ascii_names_round_trip(tmp_path):
    """Tensor names are escaped (\\uXXXX) where safetensors writes UTF-8: another header, the same tensors."""
    tensors = {"模型.权重": sample(torch.float32, (2,)), "naïve": sample(torch.float16, (3,))}
    path = tmp_path / "model.safetensors"
    write_shard(path, tensors, list(tensors))
    loaded = load(path.read_bytes())
    assert all(torch.equal(loaded[name], tensor) for name, tensor in tensors.items())


def test_writer_refuses_bytes_out_of_plan(tmp_path):
    tensors = {"a": sample(torch.float32, (4,)), "b": sample(torch.float32, (2,))}
    writer = ShardWriter(tmp_path / "x.safetensors", entries(tensors, ["a", "b"]), metadata=METADATA)
    with pytest.raises(AssertionError, match="expected bytes of 'a', got 'b'"):
        writer.write_bytes("b", tensor_bytes(tensors["b"]))
    with pytest.raises(AssertionError, match="'a' received more bytes than planned"):
        writer.write_bytes("a", tensor_bytes(torch.zeros(5)))
    writer.write_bytes("a", tensor_bytes(tensors["a"]))
    with pytest.raises(AssertionError, match="closed before tensor 'b' was complete"):
        writer.finish()


def test_writer_refuses_bytes_after_the_last_tensor(tmp_path):
    tensors = {"a": sample(torch.float32, (4,))}
    writer = ShardWriter(tmp_path / "x.safetensors", entries(tensors, ["a"]), metadata=METADATA)
    writer.write_bytes("a", tensor_bytes(tensors["a"]))
    with pytest.raises(AssertionError, match="expected bytes of 'nothing'"):
        writer.write_bytes("a", tensor_bytes(tensors["a"]))
    writer.finish()


def test_written_bytes_are_handed_to_the_disk_range_by_range_as_they_are_written(tmp_path, monkeypatch):
    """The build ends with an fsync; ranges already handed to the disk leave it little to wait for."""
    from builder import safetensors_io

    handed: list[tuple[int, int]] = []
    real = safetensors_io.start_writeback
    monkeypatch.setattr(safetensors_io, "WRITEBACK_BYTES", 4096)
    monkeypatch.setattr(safetensors_io, "start_writeback",
                        lambda fd, offset, nbytes: handed.append((offset, nbytes)) or real(fd, offset, nbytes))
    tensors = {"a": sample(torch.float32, (64, 100)), "b": sample(torch.bfloat16, (33, 70))}
    path = tmp_path / "x.safetensors"
    write_shard(path, tensors, ["a", "b"], chunk_rows=5)
    size = path.stat().st_size
    assert handed[0][0] == 0 and all(nbytes >= 4096 for _, nbytes in handed)
    assert all(offset + nbytes == following for (offset, nbytes), (following, _) in itertools.pairwise(handed))
    assert size - sum(nbytes for _, nbytes in handed) < 4096  # the rest waits for the final fsync
    assert torch.equal(load(path.read_bytes())["b"], tensors["b"])
    assert safetensors_io._SYNC_FILE_RANGE is not None  # Linux: the call exists, so it really was made
