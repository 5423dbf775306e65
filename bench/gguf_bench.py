#!/usr/bin/env python
"""GGUF export benchmark: modelpack's exporter vs llama.cpp's own convert_hf_to_gguf.py on the same merged folder.

    python bench/gguf_bench.py --converter DIR [--converter-python PY] [--family NAME ...] [--types bf16,q8_0]
                               [--rounds 2] [--shape real|tiny] [--workdir /tmp/modelpack-gguf-bench]

DIR is llama.cpp's source folder, as the llama-cpp-python sdist ships it:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp-sdist
    tar xzf /tmp/lcp-sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp-sdist
    --converter /tmp/lcp-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
(the converter imports its own gguf-py from there, whatever gguf version is installed). The converter also needs
sentencepiece, which modelpack does not: give it an interpreter that has it, e.g.
    python -m venv --system-site-packages /tmp/lcp-venv && /tmp/lcp-venv/bin/pip install sentencepiece
    --converter-python /tmp/lcp-venv/bin/python

Families (gguf_families.py; default llama3, gemma3, qwen3moe, llama2-sp): a random bfloat16 base of a published
model's real shape with a real-sized tokenizer and a LoRA, merged by `modelpack build --no-verify`. Then, for each
type, in each of --rounds rounds (which exporter goes first alternating), each exporter writes the type from that
folder in a subprocess under /usr/bin/time -v (wall time, CPU time, peak RSS, others' CPU % from /proc/stat); the
median is reported. The two files are then compared: every tensor (name, order, shape, type, bytes; where the bytes
differ, the largest difference of the dequantised values) and every metadata key and value; then deleted, and after
the last type the family's folder too (--keep keeps them). A table per family and the differences are printed, and the
JSON result in WORKDIR/results/ is rewritten after each family. Exit status 1 when any tensor's values differ (a
tensor type chosen differently, or metadata, is reported, not failed).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gguf_families  # noqa: E402  (the generated bases and their merged bundles)
import merge_bench  # noqa: E402  (machine facts, load and the timed runner)

REPO = BENCH.parent
EXPORTERS = ("modelpack", "llama.cpp")
# Rows dequantised at a time when two tensors' bytes differ (the 152k-row embedding never whole in float32).
COMPARE_ROWS = 8192

# Runs in a subprocess: the plan and chat facts as a build has them, then the exporter alone.
_MODELPACK_EXPORT = """
import sys
from pathlib import Path
from builder.build import plan_from_spec
from builder.chat import read_chat_facts
from builder.gguf_export import export_gguf
spec, merged, gguf_type, out = sys.argv[1:]
plan = plan_from_spec(Path(spec))
chat = read_chat_facts({c.dest: c.source for c in plan.copies if c.role == "tokenizer"},
                       template_file=plan.spec.chat.template, generation_config=plan.base.generation_config,
                       bundle=Path(merged), python=sys.executable)
export_gguf(plan, Path(merged), chat, {gguf_type: Path(out)})
"""


# --- comparing two files ---------------------------------------------------------------------------------------


def summary(value: object) -> object:
    """A metadata value short enough for a table: long arrays as their length and first items."""
    if isinstance(value, list) and len(value) > 6:
        return {"items": len(value), "first": value[:3]}
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} characters)"
    return value


def compare_metadata(ours, theirs) -> dict:
    """Every key/value pair but the file header's (GGUF.*): keys only one file has, and keys whose values differ
    (for arrays, the lengths and the first index where they part)."""
    a = {k: f.contents() for k, f in ours.fields.items() if not k.startswith("GGUF.")}
    b = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    differing = []
    for key in sorted(set(a) & set(b)):
        if a[key] == b[key]:
            continue
        entry: dict = {"key": key, "modelpack": summary(a[key]), "llama.cpp": summary(b[key])}
        if isinstance(a[key], list) and isinstance(b[key], list):
            parted = [i for i in range(max(len(a[key]), len(b[key])))
                      if i >= min(len(a[key]), len(b[key])) or a[key][i] != b[key][i]]
            entry["items_differing"] = len(parted)
            entry["differences"] = [{"index": i, "modelpack": a[key][i] if i < len(a[key]) else None,
                                     "llama.cpp": b[key][i] if i < len(b[key]) else None} for i in parted[:8]]
        differing.append(entry)
    return {
        "keys": len(set(a) | set(b)), "equal": len(set(a) & set(b)) - len(differing),
        "only_modelpack": {k: summary(a[k]) for k in sorted(set(a) - set(b))},
        "only_llama_cpp": {k: summary(b[k]) for k in sorted(set(b) - set(a))},
        "differing": differing,
    }


def value_difference(x, y) -> dict:
    """The largest absolute difference of two tensors' dequantised values and how many elements differ, a block
    of rows at a time (Q8_0 blocks run along rows)."""
    import gguf
    import numpy as np

    rows_x, rows_y = x.data.reshape(-1, x.data.shape[-1]), y.data.reshape(-1, y.data.shape[-1])
    largest, differing = 0.0, 0
    for start in range(0, rows_x.shape[0], COMPARE_ROWS):
        block_x = gguf.quants.dequantize(rows_x[start:start + COMPARE_ROWS], x.tensor_type).astype(np.float32)
        block_y = gguf.quants.dequantize(rows_y[start:start + COMPARE_ROWS], y.tensor_type).astype(np.float32)
        delta = np.abs(block_x - block_y)
        largest = max(largest, float(delta.max()))
        differing += int((delta > 0).sum())
    return {"max_abs_diff": largest, "elements_differing": differing}


def compare_tensors(ours, theirs) -> dict:
    """Every tensor: in both files or one, same order, same shape and type, same bytes; values where bytes differ."""
    a, b = {t.name: t for t in ours.tensors}, {t.name: t for t in theirs.tensors}
    common = [n for n in a if n in b]
    identical, differing = [], []
    for name in common:
        x, y = a[name], b[name]
        row: dict = {"name": name, "shape": [int(d) for d in x.shape]}
        if list(x.shape) != list(y.shape):
            row.update(llama_cpp_shape=[int(d) for d in y.shape])
            differing.append(row)
            continue
        same_bytes = x.tensor_type == y.tensor_type and x.n_bytes == y.n_bytes and bytes(
            ours.data[x.data_offset:x.data_offset + x.n_bytes]) == bytes(
            theirs.data[y.data_offset:y.data_offset + y.n_bytes])
        if same_bytes:
            identical.append(name)
            continue
        row.update(modelpack_type=x.tensor_type.name, llama_cpp_type=y.tensor_type.name, **value_difference(x, y))
        differing.append(row)
    their_order = [n for n in b if n in a]
    parted = next((i for i, (x, y) in enumerate(zip(common, their_order, strict=True)) if x != y), None)
    return {
        "tensors": len(set(a) | set(b)), "identical": len(identical), "differing": differing,
        "same_order": parted is None,
        # where the orders part (llama.cpp finds tensors by name, so the order is the writer's affair)
        "order_parts_at": None if parted is None else {"index": parted, "modelpack": common[parted:parted + 4],
                                                       "llama.cpp": their_order[parted:parted + 4]},
        "only_modelpack": [n for n in a if n not in b], "only_llama_cpp": [n for n in b if n not in a],
    }


def compare(ours: Path, theirs: Path) -> dict:
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    return {"tensors": compare_tensors(a, b), "metadata": compare_metadata(a, b),
            "bytes": {"modelpack": ours.stat().st_size, "llama.cpp": theirs.stat().st_size}}


# --- running ---------------------------------------------------------------------------------------------------


def export_commands(args, spec: Path, merged: Path, gguf_type: str, out: Path) -> dict[str, tuple[list[str], Path]]:
    """exporter -> (command, the file it writes)."""
    ours, theirs = out / f"modelpack-{gguf_type}.gguf", out / f"llama-cpp-{gguf_type}.gguf"
    return {
        "modelpack": ([sys.executable, "-c", _MODELPACK_EXPORT, str(spec), str(merged), gguf_type, str(ours)], ours),
        "llama.cpp": ([args.converter_python, str(args.converter / "convert_hf_to_gguf.py"), str(merged),
                       "--outtype", gguf_type, "--outfile", str(theirs)], theirs),
    }


def bench_family(args, family: gguf_families.Family) -> dict:
    """Merge once; for each type, export with both exporters for --rounds rounds (which goes first alternating),
    compare the two files and delete them (on disk at most the merged folder and two files of one type)."""
    spec, merged, facts = gguf_families.ensure_merged(args.workdir, family, args.shape)
    out = merged.parent / "out"
    out.mkdir(exist_ok=True)
    result: dict = {"family": family.name, "architecture": family.architecture, "inputs": facts, "runs": {},
                    "steps": {}, "compare": {}}
    for gguf_type in args.types:
        commands = export_commands(args, spec, merged, gguf_type, out)
        for number in range(args.rounds):
            order = EXPORTERS if number % 2 == 0 else EXPORTERS[::-1]
            for exporter in order:
                command, written = commands[exporter]
                written.unlink(missing_ok=True)
                merge_bench.prepare_cache("warm", merged)  # both read the merged folder from the page cache
                merge_bench.log(f"{family.name}: round {number + 1}, {exporter} -> {gguf_type}")
                step, _ = merge_bench.run_timed(f"{exporter} {gguf_type}", command, stat_path=None,
                                                log_file=out / f"{exporter}-{gguf_type}.log")
                result["runs"].setdefault(f"{exporter} {gguf_type}", []).append({
                    "seconds": round(step.seconds, 1), "max_rss_mb": round(step.max_rss_mb or 0),
                    # user + system: the work done, which the machine's other load stretches far less than the wall
                    "cpu_seconds": round((step.user_s or 0) + (step.system_s or 0), 1),
                    "cpu_percent": step.cpu_percent, "others_cpu_percent": round(step.others_cpu_percent or 0),
                    "loadavg_before": step.load_before.get("loadavg"), "bytes": written.stat().st_size})
                merge_bench.log(f"    {step.seconds:.1f} s, peak RSS {step.max_rss_mb or 0:.0f} MiB, others' CPU "
                                f"{step.others_cpu_percent or 0:.0f} %")
        merge_bench.log(f"{family.name}: comparing the {gguf_type} files")
        result["compare"][gguf_type] = compare(commands["modelpack"][1], commands["llama.cpp"][1])
        if not args.keep:
            for _, written in commands.values():
                written.unlink()
    if not args.keep:
        shutil.rmtree(merged.parent)
    for key, runs in result["runs"].items():
        result["steps"][key] = {
            "seconds": statistics.median(r["seconds"] for r in runs),
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in runs),
            "max_rss_mb": statistics.median(r["max_rss_mb"] for r in runs),
            "others_cpu_percent": statistics.median(r["others_cpu_percent"] for r in runs),
            "bytes": runs[-1]["bytes"],
        }
    return result


# --- reporting -------------------------------------------------------------------------------------------------


def render(result: dict) -> str:
    facts = result["inputs"]
    lines = [f"\n{result['family']} ({result['architecture']}, {facts['dimensions']}, "
             f"{facts['parameters'] / 1e9:.2f}B parameters, {facts['base_bytes'] / 1e9:.2f} GB bf16)",
             f"{'export':<22} {'wall s':>8} {'CPU s':>7} {'peak RSS MiB':>13} {'others CPU %':>13} {'file bytes':>15}"]
    for key, step in result["steps"].items():
        lines.append(f"{key:<22} {step['seconds']:>8.1f} {step['cpu_seconds']:>7.1f} {step['max_rss_mb']:>13.0f} "
                     f"{step['others_cpu_percent']:>13.0f} {step['bytes']:>15,}")
    for gguf_type, c in result["compare"].items():
        t, m = c["tensors"], c["metadata"]
        lines.append(f"{gguf_type}: tensors {t['identical']} of {t['tensors']} byte-identical, same order: "
                     f"{t['same_order']}; metadata {m['equal']} of {m['keys']} keys equal")
        if t["order_parts_at"]:
            lines.append(f"  tensor order parts at {t['order_parts_at']}")
        for row in t["differing"]:
            lines.append(f"  tensor {row['name']}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "name"))
        for side in ("only_modelpack", "only_llama_cpp"):
            if t[side]:
                lines.append(f"  tensors {side.replace('_', ' ')}: {t[side]}")
            for key, value in m[side].items():
                lines.append(f"  key {side.replace('_', ' ')}: {key} = {json.dumps(value, ensure_ascii=False)}")
        for entry in m["differing"]:
            ours, theirs = (json.dumps(entry[side], ensure_ascii=False) for side in EXPORTERS)
            lines.append(f"  key differs: {entry['key']}: modelpack {ours}, llama.cpp {theirs}"
                         + (f"; {entry['items_differing']} items differ: {entry['differences']}"
                            if "differences" in entry else ""))
    return "\n".join(lines)


def checkout(root: Path) -> dict:
    """Which code exported: the checkout, its commit and its uncommitted changes under builder/."""
    git = ["git", "-C", str(root)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    status = subprocess.run([*git, "status", "--porcelain", "--", "builder"], capture_output=True, text=True).stdout
    return {"path": str(root), "commit": commit, "uncommitted": [line[3:] for line in status.splitlines()]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--converter", type=Path, required=True, help="llama.cpp's folder (convert_hf_to_gguf.py)")
    parser.add_argument("--converter-python", default=sys.executable, help="an interpreter with sentencepiece")
    parser.add_argument("--family", action="append", choices=sorted(gguf_families.FAMILIES),
                        help=f"repeatable; default: {', '.join(gguf_families.DEFAULT_FAMILIES)}")
    parser.add_argument("--types", default="bf16,q8_0")
    parser.add_argument("--rounds", type=int, default=2, help="exports per exporter and type; the median is reported")
    parser.add_argument("--shape", choices=["real", "tiny"], default="real",
                        help="tiny: the same families with small dimensions, to try the bench in a minute")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-gguf-bench"))
    parser.add_argument("--keep", action="store_true",
                        help="keep the GGUF files and the merged bundles (by default each family's are deleted once "
                             "compared, so that at most one family's lie on disk: ~11 GB for qwen3moe)")
    parser.add_argument("--modelpack-root", type=Path, default=REPO,
                        help="the checkout whose builder/ merges and exports (default: this one), e.g. a clean "
                             "`git worktree` of a commit while builder/ is being edited")
    args = parser.parse_args(argv)
    # That checkout's builder/ for this process (the tokenizer's vocabulary) and every subprocess.
    args.modelpack_root = args.modelpack_root.resolve()
    sys.path.insert(0, str(args.modelpack_root))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(args.modelpack_root), os.environ.get("PYTHONPATH")]))
    args.types = args.types.split(",")
    args.workdir = args.workdir.resolve()
    if REPO in args.workdir.parents:
        parser.error(f"--workdir {args.workdir} is inside the repository; use /tmp/...")
    families = args.family or list(gguf_families.DEFAULT_FAMILIES)
    started = time.perf_counter()
    results: dict = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "shape": args.shape,
        "rounds": args.rounds, "types": args.types, "machine": merge_bench.machine(),
        "versions": merge_bench.versions(), "modelpack_root": checkout(args.modelpack_root),
        "load_before": merge_bench.machine_load(), "converter": str(args.converter), "families": {},
    }
    results_dir = args.workdir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    out_json = results_dir / f"gguf-{'-'.join(families)}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    for name in families:  # the result file rewritten after each family: a family done is never lost
        results["families"][name] = bench_family(args, gguf_families.FAMILIES[name])
        print(render(results["families"][name]), flush=True)
        results["seconds"] = round(time.perf_counter() - started)
        out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    results["load_after"] = merge_bench.machine_load()
    out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults: {out_json} ({results['seconds']} s in all)")
    values_differ = any(row.get("max_abs_diff", 1) != 0 for result in results["families"].values()
                        for c in result["compare"].values() for row in c["tensors"]["differing"])
    return 1 if values_differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
