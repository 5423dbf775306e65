"""Session-wide fixtures: tiny real bases and adapters made once (the makers live in helpers.py)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from helpers import make_adapter, make_base_model  # noqa: E402  (offline before transformers is imported)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """Session-wide tiny bases: {(arch, tied, dtype): folder}, created on first use."""
    root = tmp_path_factory.mktemp("bases")
    cache: dict = {}

    def get(arch: str = "qwen2", *, tied: bool = True, dtype: torch.dtype = torch.float32, shards: bool = False):
        key = (arch, tied, dtype, shards)
        if key not in cache:
            name = f"{arch}-{'tied' if tied else 'untied'}-{str(dtype)[6:]}{'-sharded' if shards else ''}"
            cache[key] = make_base_model(
                root / name, arch=arch, tied=tied, dtype=dtype, max_shard_size="60KB" if shards else "5GB"
            )
        return cache[key]

    return get


@pytest.fixture(scope="session")
def adapters(tmp_path_factory, models):
    """Session-wide adapters keyed by (base key, option name); options are given on first use."""
    root = tmp_path_factory.mktemp("adapters")
    cache: dict = {}

    def get(base: Path, label: str = "plain", **lora_options):
        key = (base, label)
        if key not in cache:
            cache[key] = make_adapter(root / f"{base.name}-{label}" / "checkpoint-10", base, **lora_options)
        return cache[key]

    return get
