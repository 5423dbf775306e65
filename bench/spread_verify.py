#!/usr/bin/env python
"""Verification of a bundle that accelerate spreads over devices (issue: verification on several GPUs).

    python bench/spread_verify.py --size 7b --max-memory "0=40GiB,1=40GiB,cpu=200GiB" --out DIR

Builds the benchmark's random Qwen2-shaped model and LoRA (bench/merge_bench.py's generator) in merge mode,
then runs `modelpack verify BUNDLE --device auto --max-memory ...` (equivalence against the unmerged peft
reference included) and `load.py "question" --device auto --max-memory ...`, and writes the figures (load
time, tokens per second, parameters and peak memory per device) to DIR/spread_verify.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import ensure_inputs  # noqa: E402

PROMPTS = [{"prompt": "Hello, who are you?"}, {"prompt": "什么是机器学习"}]


def run(command: list[str], log: Path) -> tuple[int, float]:
    started = time.perf_counter()
    with open(log, "w") as out:
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT)
    return code, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="7b")
    parser.add_argument("--max-memory", required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-spread"))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    base, adapter = ensure_inputs(args.workdir, args.size, adapter_dtype="bfloat16", seed=0)

    import yaml

    spec_dir = args.workdir / "spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": f"spread-qwen2-{args.size}",
        "base": {"path": os.path.relpath(base, spec_dir)},
        "adapter": {"path": os.path.relpath(adapter, spec_dir)},
        "output": {"dir": "bundle", "mode": "merge", "dtype": "bfloat16"},
        "generation": {"do_sample": False, "max_new_tokens": 16},
        "verify": {"max_new_tokens": 16, "prompts": PROMPTS[:1], "probes": PROMPTS[1:]},
    }
    (spec_dir / "spec.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False))
    bundle = spec_dir / "bundle"
    modelpack = [sys.executable, "-m", "builder"]
    results: dict = {"size": args.size, "max_memory": args.max_memory}
    code, seconds = run([*modelpack, "build", str(spec_dir / "spec.yaml"), "--no-verify", "--force"],
                        args.out / "build.log")
    results["build"] = {"exit": code, "seconds": round(seconds, 1)}
    if code:
        (args.out / "spread_verify.json").write_text(json.dumps(results, indent=2))
        return code
    report = args.out / "verification.json"
    code, seconds = run([*modelpack, "verify", str(bundle), "--device", "auto", "--max-memory", args.max_memory,
                         "--report", str(report)], args.out / "verify.log")
    results["verify"] = {"exit": code, "seconds": round(seconds, 1)}
    code, seconds = run([sys.executable, str(bundle / "load.py"), PROMPTS[0]["prompt"], "--device", "auto",
                         "--max-memory", args.max_memory], args.out / "load_py.log")
    results["load_py"] = {"exit": code, "seconds": round(seconds, 1),
                          "answer": (args.out / "load_py.log").read_text().strip().splitlines()[-1:]}
    if report.is_file():
        verification = json.loads(report.read_text())
        results["runtime"] = verification.get("runtime")
        results["equivalence"] = {k: v for k, v in verification.get("equivalence", {}).items() if k != "prompts"}
        results["ok"] = verification["ok"]
    (args.out / "spread_verify.json").write_text(json.dumps(results, indent=2, ensure_ascii=False))
    print(json.dumps(results, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
