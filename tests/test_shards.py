"""builder/plan.py::split_into_shards as a pure plan of names and sizes, before any file exists."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from huggingface_hub import split_torch_state_dict_into_shards

from builder.plan import ShardPlan, TensorPlan, split_into_shards
from builder.safetensors_io import TensorLocation
from helpers import dtype_of

NOWHERE = Path("base/model.safetensors")  # never opened: the splitter sees names, dtypes and shapes only


def tensor(name: str, nbytes: int, *, dtype: torch.dtype = torch.float32, source_dtype: torch.dtype | None = None):
    """A planned output tensor of `nbytes` bytes in `dtype` (one row of nbytes / itemsize elements)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert nbytes % itemsize == 0
    shape = (nbytes // itemsize,)
    source_dtype = source_dtype or dtype
    source_bytes = shape[0] * torch.empty((), dtype=source_dtype).element_size()
    location = TensorLocation(name, NOWHERE, dtype_of(source_dtype), shape, 0, source_bytes)
    return TensorPlan(name=name, source=location, out_dtype=dtype_of(dtype))


def names(shards: tuple[ShardPlan, ...]) -> list[list[str]]:
    return [[t.name for t in shard.tensors] for shard in shards]


def test_everything_fits_one_shard_named_model_safetensors():
    tensors = [tensor("a", 40), tensor("b", 40), tensor("c", 20)]
    shards = split_into_shards(tensors, max_shard_size=100)
    assert [s.filename for s in shards] == ["model.safetensors"]
    assert names(shards) == [["a", "b", "c"]]
    assert shards[0].nbytes == 100  # exactly the limit still fits


def test_shards_fill_in_order_up_to_the_limit():
    tensors = [tensor(name, 40) for name in "abcde"]
    shards = split_into_shards(tensors, max_shard_size=100)
    assert names(shards) == [["a", "b"], ["c", "d"], ["e"]]
    assert [s.filename for s in shards] == [
        "model-00001-of-00003.safetensors",
        "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors",
    ]
    assert [s.nbytes for s in shards] == [80, 80, 40]


@pytest.mark.parametrize(
    ("sizes", "expected"),
    [
        ([500], [["t0"]]),
        ([500, 12], [["t0"], ["t1"]]),
        ([12, 500], [["t0"], ["t1"]]),
        ([12, 500, 12], [["t0"], ["t1"], ["t2"]]),
        ([12, 500, 600, 12], [["t0"], ["t1"], ["t2"], ["t3"]]),
        ([60, 32, 500, 32, 60], [["t0", "t1"], ["t2"], ["t3", "t4"]]),
    ],
    ids=["alone", "first", "last", "middle", "two-in-a-row", "between-full-shards"],
)
def test_a_tensor_larger_than_the_limit_gets_a_shard_of_its_own(sizes, expected):
    """Unlike huggingface_hub's splitter, which moves it to a later shard, order is kept: the writer streams in it."""
    shards = split_into_shards([tensor(f"t{i}", n) for i, n in enumerate(sizes)], max_shard_size=100)
    assert names(shards) == expected
    oversized = [s for s in shards if s.nbytes > 100]
    assert all(len(s.tensors) == 1 for s in oversized)


def test_sizes_count_the_output_dtype_not_the_source():
    """A float32 base written as bfloat16 takes half the bytes: shards are planned on what is written."""
    tensors = [tensor(name, 40, dtype=torch.bfloat16, source_dtype=torch.float32) for name in "abcde"]
    assert tensors[0].source.nbytes == 80
    shards = split_into_shards(tensors, max_shard_size=100)
    assert names(shards) == [["a", "b"], ["c", "d"], ["e"]]


def test_empty_tensors_add_nothing():
    tensors = [tensor("a", 100), tensor("empty", 0), tensor("b", 4)]
    assert names(split_into_shards(tensors, max_shard_size=100)) == [["a", "empty"], ["b"]]


def test_prefix_names_the_files():
    shards = split_into_shards([tensor("a", 8), tensor("b", 8)], max_shard_size=8, prefix="adapter_model")
    assert [s.filename for s in shards] == [
        "adapter_model-00001-of-00002.safetensors",
        "adapter_model-00002-of-00002.safetensors",
    ]
    assert split_into_shards([tensor("a", 8)], max_shard_size=8, prefix="adapter_model")[0].filename == (
        "adapter_model.safetensors"
    )


def test_numbering_is_five_digits_past_nine_shards():
    shards = split_into_shards([tensor(f"t{i}", 8) for i in range(12)], max_shard_size=8)
    assert len(shards) == 12
    assert shards[9].filename == "model-00010-of-00012.safetensors"
    assert shards[-1].filename == "model-00012-of-00012.safetensors"


def test_no_tensors_is_one_empty_shard():
    shards = split_into_shards([], max_shard_size=100)
    assert [(s.filename, s.tensors) for s in shards] == [("model.safetensors", ())]


@pytest.mark.parametrize("seed", range(20))
def test_order_is_preserved_and_every_shard_respects_the_limit(seed):
    rng = random.Random(seed)
    limit = rng.choice([64, 100, 256, 1000])
    tensors = [tensor(f"t{i}", 4 * rng.randint(0, limit // 2)) for i in range(rng.randint(1, 40))]
    shards = split_into_shards(tensors, max_shard_size=limit)
    assert [t for s in shards for t in s.tensors] == tensors
    assert all(s.tensors for s in shards)
    assert all(s.nbytes <= limit or len(s.tensors) == 1 for s in shards)
    # Greedy: a shard was closed only because its successor's first tensor did not fit.
    for shard, following in zip(shards, shards[1:], strict=False):
        assert shard.nbytes + following.tensors[0].entry.nbytes > limit


@pytest.mark.parametrize("seed", range(10))
def test_same_split_and_names_as_huggingface_hub_when_every_tensor_fits(seed):
    """With no oversized tensor, the split and the file names are huggingface_hub's (what transformers saves)."""
    rng = random.Random(seed)
    limit = 4 * rng.randint(8, 64)
    # No empty tensors: huggingface_hub groups those by their (shared, null) storage rather than by order.
    state_dict = {f"t{i}": torch.zeros(rng.randint(1, limit // 4)) for i in range(rng.randint(1, 30))}
    hub = split_torch_state_dict_into_shards(state_dict, max_shard_size=limit)
    ours = split_into_shards([tensor(name, t.nbytes) for name, t in state_dict.items()], max_shard_size=limit)
    assert {s.filename: [t.name for t in s.tensors] for s in ours} == hub.filename_to_tensors
