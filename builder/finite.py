"""NaN and Inf in what a build writes: one cheap pass over each block of values as it streams, and the words that say
what was found where, for the one sentence that names a bad tensor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from builder.adapter_match import ADAPTER_PREFIX

# Tensor methods only: weights.py and merge_blocks.py import this module for validate and --dry-run too, which must
# not pay for torch's import (a build that writes weights has imported torch by the time these functions run).
if TYPE_CHECKING:
    import numpy as np
    import torch

    from builder.safetensors_io import TensorLocation

# A bfloat16 is NaN or Inf when all of these exponent bits are set.
BFLOAT16_EXPONENT = 0x7F80
# Q8_0 stores each block of 32 values as a float16 scale (2 bytes) and 32 int8s: the scale is NaN or Inf when any of
# the block's values is, or when the block's largest magnitude / 127 overflows float16.
Q8_0_BLOCK_BYTES, Q8_0_SCALE_BYTES = 34, 2


def all_finite(values: torch.Tensor) -> bool:
    """No NaN or Inf: aminmax propagates NaN and exposes +/-Inf in one vectorised pass, without a boolean buffer
    (torch.isfinite(values).all() writes one, and is 25 times slower on bfloat16). Integer tensors are finite."""
    if not values.is_floating_point() or values.numel() == 0:
        return True
    if values.element_size() == 1:  # float8: no aminmax kernel for it; its blocks are small
        values = values.float()
    low, high = values.aminmax()
    return bool(low.isfinite() & high.isfinite())


def nonfinite_found(values: torch.Tensor, *, first_row: int = 0) -> str:
    """What a non-finite tensor (or rows of one, the first being `first_row`) holds, e.g. "NaN and +Inf in 3 of
    4096 values, the first in row 7": the failing build's last step, so a whole pass is fine."""
    flat = values.reshape(-1).float()
    nan, positive, negative = flat.isnan(), flat == float("inf"), flat == float("-inf")
    kinds = [kind for kind, mask in (("NaN", nan), ("+Inf", positive), ("-Inf", negative)) if bool(mask.any())]
    bad = nan | positive | negative
    count = int(bad.sum())
    first = int(bad.nonzero()[0, 0]) if count else 0
    where = (f"row {first_row + first // max(1, values.shape[-1])}" if values.dim() > 1
             else f"element {first_row + first}")
    return f"{' and '.join(kinds) or 'no NaN or Inf'} in {count} of {flat.numel()} values, the first in {where}"


def read_from(location: TensorLocation, bundle_name: str | None = None) -> str:
    """Where a tensor's values were read, for messages: its file, and its name there when that differs from the
    bundle's (every adapter tensor's does: peft prefixes them)."""
    named = "" if location.name == bundle_name else f"{location.name!r} in "
    return f"{named}the adapter's {location.file}" if location.name.startswith(ADAPTER_PREFIX) \
        else f"{named}{location.file}"


def remedy(location: TensorLocation) -> str:
    """What to do about NaN or Inf read from this tensor: an adapter's come from training that diverged."""
    if location.name.startswith(ADAPTER_PREFIX):
        return "the adapter diverged in training (or its file is damaged); pick another checkpoint"
    return "the base model's file is damaged or the model is broken; re-download the base or use another copy"


def ggml_block_finite(block: np.ndarray, qtype_name: str) -> bool:
    """No NaN or Inf in a block of a GGUF tensor as gguf.quants wrote it: F32 and F16 as floats, BF16 as the bytes of
    16-bit floats, Q8_0 as blocks whose float16 scales become NaN or Inf with any of their values."""
    import numpy as np

    if qtype_name in ("F32", "F16"):
        return bool(np.isfinite(block).all())
    if qtype_name == "BF16":
        return not bool(((block.view(np.uint16) & BFLOAT16_EXPONENT) == BFLOAT16_EXPONENT).any())
    if qtype_name == "Q8_0":
        scales = block.reshape(-1, Q8_0_BLOCK_BYTES)[:, :Q8_0_SCALE_BYTES].copy().view(np.float16)
        return bool(np.isfinite(scales).all())
    raise AssertionError(f"no finiteness check for GGUF type {qtype_name}")
