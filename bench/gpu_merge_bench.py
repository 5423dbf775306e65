#!/usr/bin/env python
"""GPU merge benchmark, everything in one run on one GPU machine:

    python bench/gpu_merge_bench.py --size 7b --workdir /tmp/gpu-bench --results DIR [--ulp-layers 0,13,27]

On the random Qwen2-shaped base of bench/merge_bench.py (generated here, on the GPU for speed: same shapes and
statistics, different random numbers) and its r=64 LoRA, one after another, each with a cold page cache when
this process may drop it:

  (c) `cp -r` of the base + `sync`                                    -- the disk floor
  (a) `modelpack build --no-verify --merge-device cuda` + `sync`     -- GPU memory polled with nvidia-smi
  (b) peft's flow on the GPU: AutoPeftModelForCausalLM(device_map="cuda") -> merge_and_unload -> save_pretrained
      + `sync`

Then: (a) against (b) tensor by tensor (ulps), the GPU merge against modelpack's CPU merge (the reference) for
the tensors of a few layers, and the logits of (a), of (b) and of the unmerged base + adapter through peft (what
verification compares against) on the same random tokens. Results: RESULTS/gpu-merge-SIZE.json and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import merge_bench as mb  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

PEFT_GPU_FLOW = r"""
import json, sys, time
started = time.perf_counter()
import torch
from peft import AutoPeftModelForCausalLM
imported = time.perf_counter()
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16, device_map="cuda")
torch.cuda.synchronize()
loaded = time.perf_counter()
merged = model.merge_and_unload()
torch.cuda.synchronize()
merged_at = time.perf_counter()
merged.save_pretrained(sys.argv[2])
saved = time.perf_counter()
print("PHASES " + json.dumps({"import": imported - started, "load": loaded - imported, "merge": merged_at - loaded,
                              "save": saved - merged_at, "torch_peak_gb": torch.cuda.max_memory_allocated() / 1e9}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def gpu_random_tensor(name, shape, dtype, std, seed):
    generator = torch.Generator(device="cuda").manual_seed(mb._generator(seed, name).initial_seed())
    return torch.empty(shape, dtype=dtype, device="cuda").normal_(0.0, std, generator=generator).cpu()


class GpuMemoryPoll:
    """Peak memory.used of GPU 0 (nvidia-smi, every 50 ms) while a step runs, minus what was used before it."""

    def __init__(self) -> None:
        self.baseline = self._used()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _used() -> int:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True).stdout
        return int(out.strip() or 0)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._used())

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return (self.peak - self.baseline) / 1024  # GiB


def cold(base: Path, mode: str) -> None:
    """The base's pages out of the cache, but Python, torch, transformers and peft read back in (untimed): what
    is measured is the merge from a cold base, not a first import from a cold disk (16 s here)."""
    mb.prepare_cache(mode, base)
    subprocess.run([sys.executable, "-c", "import torch, transformers, peft, safetensors, builder.build"], check=True,
                   env={**os.environ, **mb.BENCH_ENV})


def timed(name: str, command: list[str], log_dir: Path, cwd: Path | None = None) -> dict:
    """Run a step to exit, then `sync`; each output line is stamped with its time since the start (where the
    process spends its time: start-up, plan, weights, publish)."""
    poll = GpuMemoryPoll()
    started = time.perf_counter()
    env = {**os.environ, **mb.BENCH_ENV}
    if cwd is not None and cwd != REPO:  # the other checkout's builder, not this one's
        env["PYTHONPATH"] = str(cwd)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                               cwd=cwd)
    assert process.stdout is not None
    lines = [(round(time.perf_counter() - started, 2), line.rstrip("\n")) for line in process.stdout]
    returncode = process.wait()
    seconds = time.perf_counter() - started
    synced = time.perf_counter()
    os.sync()
    sync_seconds = time.perf_counter() - synced
    gpu_gib = poll.stop()
    output = "\n".join(f"[{at:7.2f}] {line}" for at, line in lines)
    (log_dir / f"{name}.log").write_text(output + "\n")
    if returncode:
        raise SystemExit(f"{name} failed ({returncode}):\n{output[-4000:]}")
    result = {"seconds": round(seconds, 2), "sync_seconds": round(sync_seconds, 2),
              "to_disk_seconds": round(seconds + sync_seconds, 2), "gpu_memory_used_peak_gib": round(gpu_gib, 2)}
    for at, line in lines:
        built = re.match(r"built \S+ in ([\d.]+)s", line)
        if built:  # modelpack's own time, from its start of the build to the published bundle (fsynced)
            result["in_build_seconds"] = float(built.group(1))
        if line.startswith("writing "):  # the plan is done, the staging folder made: the build starts
            result["build_starts_at_seconds"] = at
        if line.startswith("PHASES "):
            result["phases"] = {k: round(v, 2) for k, v in json.loads(line[7:]).items()}
    if name.startswith("modelpack"):
        result["lines"] = lines
    log(f"{name}: { {k: v for k, v in result.items() if k != 'lines'} }")
    return result


def startup_seconds() -> dict:
    """What any run of modelpack pays before its first byte, warm: the interpreter, its imports, CUDA's start."""
    code = ("import time; t = time.perf_counter(); import builder.build, torch; i = time.perf_counter(); "
            "torch.zeros(1, device='cuda'); print(i - t, time.perf_counter() - i)")
    started = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, **mb.BENCH_ENV}).stdout.split()
    return {"process": round(time.perf_counter() - started, 2), "imports": round(float(out[0]), 2),
            "cuda_init": round(float(out[1]), 2)}


def ulp(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    width = torch.iinfo(bits).bits

    def ordered(t):
        i = t.contiguous().view(bits).long()
        return torch.where(i < 0, -(i + (1 << (width - 1))), i)

    return (ordered(a) - ordered(b)).abs()


def open_tensors(folder: Path):
    from safetensors import safe_open

    handles = {}
    for path in sorted(folder.glob("*.safetensors")):
        handle = safe_open(path, framework="pt")
        for name in handle.keys():
            handles[name] = handle
    return handles


def compare_folders(ours: Path, theirs: Path, names=None) -> dict:
    """Element-wise ulp distance between two folders' tensors (on the GPU, tensor by tensor)."""
    a, b = open_tensors(ours), open_tensors(theirs)
    names = sorted(set(a) & set(b)) if names is None else names
    stats = {"tensors": 0, "tensors_differing": 0, "elements": 0, "elements_differing": 0, "max_ulp": 0,
             "only_in_ours": sorted(set(a) - set(b)), "only_in_theirs": sorted(set(b) - set(a))}
    for name in names:
        x, y = a[name].get_tensor(name).cuda(), b[name].get_tensor(name).cuda()
        d = ulp(x, y)
        differing = int((d > 0).sum())
        stats["tensors"] += 1
        stats["tensors_differing"] += bool(differing)
        stats["elements"] += d.numel()
        stats["elements_differing"] += differing
        stats["max_ulp"] = max(stats["max_ulp"], int(d.max()))
    stats["fraction_differing"] = stats["elements_differing"] / max(stats["elements"], 1)
    return stats


def gpu_vs_cpu(spec: Path, bundle: Path, layers: list[int]) -> dict:
    """modelpack's CPU merge (the reference path, CpuMerge, tile by tile) of some layers against the GPU bundle."""
    sys.path.insert(0, str(REPO))
    from builder.build import plan_from_spec
    from builder.merge_device import CpuMerge, read_factors
    from builder.safetensors_io import read_tensor

    plan = plan_from_spec(spec)
    device = CpuMerge()
    torch.set_num_threads(os.cpu_count() or 1)  # the comparison, not the pipeline: use every core
    gpu = open_tensors(bundle)
    stats = {"layers": layers, "tensors": 0, "elements": 0, "elements_differing": 0, "max_ulp": 0, "per_tensor": {}}
    wanted = tuple(f"model.layers.{i}." for i in layers)
    for tensor in plan.merged_tensors:
        if not tensor.name.startswith(wanted):
            continue
        source = read_tensor(tensor.source)
        cpu = device.merge(tensor, device.place(read_factors(tensor)), source, 0, tensor.source.shape[0]).result()
        d = ulp(cpu.cuda(), gpu[tensor.name].get_tensor(tensor.name).cuda())
        differing = int((d > 0).sum())
        stats["tensors"] += 1
        stats["elements"] += d.numel()
        stats["elements_differing"] += differing
        stats["max_ulp"] = max(stats["max_ulp"], int(d.max()))
        stats["per_tensor"][tensor.name] = differing / d.numel()
    device.close()
    stats["fraction_differing"] = stats["elements_differing"] / max(stats["elements"], 1)
    return stats


def logits_check(bundle: Path, peft_out: Path, base: Path, adapter: Path) -> dict:
    """Logits of the bundle, of peft's merged save and of the unmerged base + adapter, on the same random tokens."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(0, 150000, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    out = {}

    def logits_of(load) -> torch.Tensor:
        model = load()
        with torch.no_grad():
            result = model(tokens).logits.float().cpu()
        del model
        torch.cuda.empty_cache()
        return result

    def merged(folder):
        return lambda: AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cuda")

    def unmerged():
        return PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16, device_map="cuda"), adapter)

    ours, peft_merged, reference = logits_of(merged(bundle)), logits_of(merged(peft_out)), logits_of(unmerged)
    tolerance = 0.1 + 0.1 * float(reference.abs().max())  # the equivalence rule for bfloat16 (runtime/equivalence.py)
    for name, x, y in (("modelpack_vs_peft_merged", ours, peft_merged), ("modelpack_vs_unmerged", ours, reference),
                       ("peft_merged_vs_unmerged", peft_merged, reference)):
        out[name] = {"max_abs_diff": float((x - y).abs().max()), "bit_identical": bool(torch.equal(x, y)),
                     "greedy_agreement": float((x.argmax(-1) == y.argmax(-1)).float().mean())}
    out["max_abs_reference_logit"] = float(reference.abs().max())
    out["tolerance_bfloat16"] = tolerance
    out["modelpack_within_tolerance"] = out["modelpack_vs_unmerged"]["max_abs_diff"] <= tolerance
    return out


def machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count()}
    info["gpu"] = torch.cuda.get_device_name(0)
    info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for package in ("transformers", "peft", "safetensors"):
        info[package] = __import__(package).__version__
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(mb.SIZES), required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--ulp-layers", default="0,13,27", help="layers whose merge is compared with the CPU's")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of cp and modelpack (the median is reported)")
    parser.add_argument("--speed-only", action="store_true", help="the rounds only: skip peft and the comparisons")
    parser.add_argument("--also-root", type=Path,
                        help="another checkout (builder/templates copied in) timed beside this one in each round")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    mode = "cold" if mb.can_drop_caches() else "warm"
    started = time.perf_counter()
    mb._random_tensor = gpu_random_tensor
    base, adapter = mb.ensure_inputs(args.workdir, args.size, adapter_dtype="float32", seed=0)
    results: dict = {"size": args.size, "machine": machine(), "cache": mode, "steps": {},
                     "generate_seconds": round(time.perf_counter() - started, 1),
                     "base_bytes": mb.folder_bytes(base)}
    run_dir = args.workdir / f"run-{args.size}"
    spec = mb.write_spec(run_dir, base, adapter, args.size)
    outs = {name: run_dir / f"{name}-out" for name in ("cp", "modelpack", "peft")}
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    python = sys.executable
    env_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ["PYTHONPATH"] = env_path

    roots = {"modelpack_cuda": REPO, **({"modelpack_cuda_other": args.also_root.resolve()} if args.also_root else {})}
    runs: dict[str, list[dict]] = {name: [] for name in ("cp", *roots)}
    for round_ in range(args.repeat):  # cp and each checkout alternate, so a drifting disk hits them alike
        log(f"round {round_ + 1} of {args.repeat}")
        cold(base, mode)
        runs["cp"].append(timed("cp", ["cp", "-r", str(base), str(outs["cp"])], run_dir))
        shutil.rmtree(outs["cp"])
        for name, root in roots.items():
            cold(base, mode)
            runs[name].append(timed(
                name, [python, "-m", "builder", "build", str(spec), "--no-verify", "--force", "--merge-device",
                       "cuda", "-o", str(outs["modelpack"] if root == REPO else run_dir / "other-out")], run_dir,
                cwd=root))
            shutil.rmtree(run_dir / "other-out", ignore_errors=True)
    results["all_runs"] = runs
    for name, done in runs.items():  # the median run of each step
        results["steps"][name] = sorted(done, key=lambda r: r["to_disk_seconds"])[len(done) // 2]
    if args.also_root:
        results["other_root"] = str(args.also_root)
    results["startup"] = startup_seconds()
    log(f"start-up, warm: {results['startup']}")
    each_round = {f"{name}_over_cp_to_disk_each_round": [round(m["to_disk_seconds"] / c["to_disk_seconds"], 3)
                                                          for m, c in zip(runs[name], runs["cp"], strict=True)]
                  for name in roots}
    if args.speed_only:  # the rounds alone: no peft step, no comparisons
        results["ratios"] = each_round
        out_json = args.results / f"gpu-merge-{args.size}-speed.json"
        out_json.write_text(json.dumps(results, indent=2) + "\n")
        log(f"ratios: {each_round}")
        return 0
    cold(base, mode)
    results["steps"]["peft_cuda"] = timed("peft_cuda", [python, "-c", PEFT_GPU_FLOW, str(adapter), str(outs["peft"])],
                                          run_dir)
    steps = results["steps"]
    results["ratios"] = {
        "modelpack_over_cp_to_disk": steps["modelpack_cuda"]["to_disk_seconds"] / steps["cp"]["to_disk_seconds"],
        "peft_over_modelpack_to_disk":
            steps["peft_cuda"]["to_disk_seconds"] / steps["modelpack_cuda"]["to_disk_seconds"],
        **each_round,
    }
    log("comparing modelpack (cuda) with peft (cuda), tensor by tensor")
    results["modelpack_vs_peft_tensors"] = compare_folders(outs["modelpack"], outs["peft"])
    layers = [int(x) for x in args.ulp_layers.split(",") if int(x) < mb.SIZES[args.size]["num_hidden_layers"]]
    log(f"GPU vs CPU merge, layers {layers}")
    results["gpu_vs_cpu"] = gpu_vs_cpu(spec, outs["modelpack"], layers)
    log("logits")
    results["logits"] = logits_check(outs["modelpack"], outs["peft"], base, adapter)
    out_json = args.results / f"gpu-merge-{args.size}.json"
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    summary = {k: results[k] for k in ("machine", "cache", "steps", "ratios")}
    summary["gpu_vs_cpu"] = {k: v for k, v in results["gpu_vs_cpu"].items() if k != "per_tensor"}
    summary["modelpack_vs_peft_tensors"] = results["modelpack_vs_peft_tensors"]
    summary["logits"] = results["logits"]
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
