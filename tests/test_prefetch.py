"""`modelpack build` asks the kernel to read the base's first weights while it imports torch (builder/prefetch.py)."""

from __future__ import annotations

import json
import subprocess
import sys

from builder.prefetch import PREFETCH_LIMIT, base_weight_files, prefetch_budget, read_ahead


def test_the_weight_files_come_in_the_order_the_index_names_them(tmp_path):
    weight_map = {"embed": "model-00002-of-00002.safetensors", "layer0": "model-00001-of-00002.safetensors",
                  "head": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert base_weight_files(tmp_path) == [tmp_path / "model-00002-of-00002.safetensors",
                                           tmp_path / "model-00001-of-00002.safetensors"]


def test_without_an_index_every_safetensors_file_by_name_and_a_broken_index_gives_none(tmp_path):
    for name in ("b.safetensors", "a.safetensors", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert base_weight_files(tmp_path) == [tmp_path / "a.safetensors", tmp_path / "b.safetensors"]
    (tmp_path / "model.safetensors.index.json").write_text("{not json")
    assert base_weight_files(tmp_path) == []  # the plan reports the broken index, with its own message


def test_read_ahead_stops_at_the_budget_and_skips_missing_files(tmp_path):
    files = [tmp_path / "1.safetensors", tmp_path / "gone.safetensors", tmp_path / "2.safetensors"]
    files[0].write_bytes(b"a" * 3000)
    files[2].write_bytes(b"b" * 5000)
    assert read_ahead(files, budget=4000) == 4000  # all of the first file, 1000 bytes of the second
    assert read_ahead(files, budget=10**9) == 8000
    assert files[0].read_bytes() == b"a" * 3000  # read-only: the sources are untouched


def test_the_budget_is_a_quarter_of_available_memory_at_most_the_limit():
    with open("/proc/meminfo") as f:
        available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    assert 0 < prefetch_budget() <= min(PREFETCH_LIMIT, available // 4 + (64 << 20))  # memory moves meanwhile


def test_the_prefetch_and_the_spec_import_without_torch():
    """Its point is to run before torch's import: a torch import on its way would make it start too late."""
    code = "import sys, builder.prefetch, builder.spec; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
