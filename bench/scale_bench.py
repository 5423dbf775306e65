#!/usr/bin/env python
"""What the merge holds in memory at 0.5b, 1.5b, 7b and a whole 72B, computed from modelpack's own plans (issue 12):

    python bench/scale_bench.py [--workdir /tmp/modelpack-bench]

The merge pipeline (builder/weights.py) holds row blocks and copy slices in bounded queues, plus one tensor's
adapter factors; how large those get is decided by the plan, tensor by tensor. This script builds the real plan
(`plan_from_spec`) for each size and reports the largest piece in flight, the largest factors and the bound they
give. The sizes come from bench/merge_bench.py's cached inputs; the 72B (Qwen2.5-72B's 80 layers, 145 GB) is the
cached 72b-2layers input stretched to 80 layers as sparse files: real safetensors headers, holes for the data
(nothing is read but headers when planning, and the holes take no disk). The bound is the same for every size
whose largest tensor rows are the same, whatever the layer count: the 72b-2layers run that merge_bench.py measures
(`--size 72b-2layers --steps a`) has the 72B's every tensor shape, so its peak RSS is the 72B's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench as mb  # noqa: E402

from builder.build import plan_from_spec  # noqa: E402
from builder.safetensors_io import TensorEntry, encode_header, read_safetensors_header  # noqa: E402
from builder.weights import QUEUE_DEPTH, plan_pieces  # noqa: E402

# Pieces one pipeline can hold at once: a full queue between each pair of stages (read -> merge, read -> source
# hash, merge -> write, write -> output hash) and one piece inside each of its five stages (as
# tests/test_merge_device.py's bounded-pieces test counts them).
PIECES_IN_FLIGHT = 4 * QUEUE_DEPTH + 5


def sparse_copy(header_source: Path, dest: Path, rename=lambda name: [name]) -> None:
    """A safetensors file with the header of header_source, each tensor renamed to one or more names, and holes
    for its data."""
    header = read_safetensors_header(header_source)
    entries = [TensorEntry(new, location.dtype, location.shape)
               for name, location in header.items() for new in rename(name)]
    data = encode_header(entries, {"format": "pt"})
    with open(dest, "wb") as f:
        f.write(data)
        f.truncate(len(data) + sum(e.nbytes for e in entries))


def stretched_72b(two_layers_root: Path, folder: Path, layers: int = 80) -> Path:
    """The 72b-2layers base and adapter stretched to `layers` decoder layers as sparse files; returns the spec."""
    if folder.exists():
        shutil.rmtree(folder)
    base, adapter = folder / "base", folder / "checkpoint-1000"
    base.mkdir(parents=True)
    adapter.mkdir()
    source_base, source_adapter = two_layers_root / "base", two_layers_root / "checkpoint-1000"
    for path in source_base.iterdir():
        if not path.name.endswith(".safetensors") and path.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(path, base / path.name)
    config = json.loads((source_base / "config.json").read_text())
    config["num_hidden_layers"] = layers
    (base / "config.json").write_text(json.dumps(config, indent=2))

    def every_layer(name: str) -> list[str]:  # layer 0's tensors stand for every layer's
        if ".layers.1." in name:
            return []
        return [name.replace(".layers.0.", f".layers.{i}.") for i in range(layers)] if ".layers.0." in name \
            else [name]

    weight_map = {}
    for path in sorted(source_base.glob("*.safetensors")):
        names = list(read_safetensors_header(path))
        if any(".layers.1." in n for n in names):
            continue  # layer 1's shard: its tensors are layer 0's shapes, written for every layer below
        if any(".layers.0." in n for n in names):
            for i in range(layers):
                shard = f"model-layer{i:04d}.safetensors"
                sparse_copy(path, base / shard, lambda n, i=i: [n.replace(".layers.0.", f".layers.{i}.")])
                weight_map.update({n.replace(".layers.0.", f".layers.{i}."): shard for n in names})
        else:
            sparse_copy(path, base / path.name)
            weight_map.update({n: path.name for n in names})
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    shutil.copy(source_adapter / "adapter_config.json", adapter / "adapter_config.json")
    sparse_copy(source_adapter / "adapter_model.safetensors", adapter / "adapter_model.safetensors", every_layer)
    return mb.write_spec(folder, base, adapter, "72b")


def memory_of_plan(spec: Path) -> dict:
    plan = plan_from_spec(spec)
    largest_piece = 0
    for piece in plan_pieces(plan):
        tensor = piece.tensor
        out = piece.nbytes
        if piece.rows is not None and tensor.source.shape:
            start, end = piece.rows
            out = (end - start) * (tensor.entry.nbytes // tensor.source.shape[0])
        largest_piece = max(largest_piece, piece.nbytes, out)
    factors = [sum(loc.nbytes for d in t.deltas for loc in (d.a, d.b, d.magnitude) if loc is not None)
               for shard in plan.shards for t in shard.tensors]
    return {
        "weight_bytes": plan.weight_bytes,
        "tensors": sum(len(s.tensors) for s in plan.shards),
        "largest_piece_bytes": largest_piece,
        "largest_factors_bytes": max(factors, default=0),
        "in_flight_bound_bytes": PIECES_IN_FLIGHT * largest_piece + max(factors, default=0),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-bench"))
    args = parser.parse_args(argv)
    rows = {}
    for size in ("0.5b", "1.5b", "7b", "72b-2layers"):
        base, adapter = mb.ensure_inputs(args.workdir, size, adapter_dtype="float32", seed=0)
        rows[size] = memory_of_plan(mb.write_spec(args.workdir / f"scale-{size}", base, adapter, size))
    two_layers = args.workdir / "inputs" / "qwen2-72b-2layers-lora64-float32"
    rows["72b (80 layers, sparse)"] = memory_of_plan(stretched_72b(two_layers, args.workdir / "scale-72b-sparse"))
    print(f"{'size':26s} {'weights GB':>10s} {'tensors':>7s} {'largest piece MB':>16s} {'factors MB':>10s} "
          f"{'bound MB':>8s}")
    for size, row in rows.items():
        print(f"{size:26s} {row['weight_bytes'] / 1e9:10.2f} {row['tensors']:7d} "
              f"{row['largest_piece_bytes'] / 1e6:16.1f} {row['largest_factors_bytes'] / 1e6:10.1f} "
              f"{row['in_flight_bound_bytes'] / 1e6:8.1f}")
    out = args.workdir / "results" / "scale.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"pieces_in_flight": PIECES_IN_FLIGHT, "sizes": rows}, indent=2) + "\n")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
