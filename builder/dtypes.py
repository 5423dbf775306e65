"""Tensor dtypes as plain values (safetensors name, torch name, item size), so headers and plans need no torch."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from packaging.version import Version

if TYPE_CHECKING:
    import torch

# The oldest torch the package supports (pyproject.toml); a dtype added later is readable only with a newer one.
OLDEST_TORCH = (2, 1)


@dataclass(frozen=True)
class Dtype:
    """One tensor dtype: `safetensors` is its name in a safetensors header ("BF16"), `name` torch's attribute name,
    which config.json's torch_dtype also uses ("bfloat16")."""

    safetensors: str
    name: str
    itemsize: int
    is_floating_point: bool
    since_torch: tuple[int, int] = OLDEST_TORCH

    @property
    def torch(self) -> torch.dtype:
        """The torch dtype, for code that makes tensors (importing torch takes seconds: only that code pays it)."""
        import torch

        return getattr(torch, self.name)


# Every dtype modelpack reads, in the order messages list them. Float8 and the unsigned types appear in current
# checkpoints (FP8 weights, packed quantisation data).
SAFETENSORS_DTYPES: dict[str, Dtype] = {d.safetensors: d for d in (
    Dtype("F64", "float64", 8, True),
    Dtype("F32", "float32", 4, True),
    Dtype("F16", "float16", 2, True),
    Dtype("BF16", "bfloat16", 2, True),
    Dtype("F8_E4M3", "float8_e4m3fn", 1, True),
    Dtype("F8_E5M2", "float8_e5m2", 1, True),
    Dtype("I64", "int64", 8, False),
    Dtype("I32", "int32", 4, False),
    Dtype("I16", "int16", 2, False),
    Dtype("I8", "int8", 1, False),
    Dtype("U64", "uint64", 8, False, since_torch=(2, 3)),
    Dtype("U32", "uint32", 4, False, since_torch=(2, 3)),
    Dtype("U16", "uint16", 2, False, since_torch=(2, 3)),
    Dtype("U8", "uint8", 1, False),
    Dtype("BOOL", "bool", 1, False),
)}
BY_NAME: dict[str, Dtype] = {d.name: d for d in SAFETENSORS_DTYPES.values()}
BFLOAT16, FLOAT16, FLOAT32 = BY_NAME["bfloat16"], BY_NAME["float16"], BY_NAME["float32"]
# What a bundle's weights may be written in (the spec's output.dtype).
OUTPUT_DTYPES: dict[str, Dtype] = {d.name: d for d in (BFLOAT16, FLOAT16, FLOAT32)}


def readable(dtype: Dtype) -> bool:
    """Whether the installed torch has this dtype (torch < 2.3 has no uint16/32/64), asked of torch's metadata, not
    of torch itself, and only for dtypes newer than the oldest supported torch."""
    return dtype.since_torch <= OLDEST_TORCH or dtype.since_torch <= _installed_torch()


@functools.cache
def _installed_torch() -> tuple[int, ...]:
    return Version(metadata.version("torch")).release[:2]
