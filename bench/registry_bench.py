#!/usr/bin/env python
"""Registry hand-off benchmark: `modelpack push` and `modelpack pull` of a 1.5b-shaped bundle to a loopback registry,
against `cp -r` of the same folder, in one run.

    python bench/registry_bench.py [--workdir DIR] [--gb 3.09] [--shard-gb 2.2] [--chunk-mb N] [--keep]

It synthesizes a bundle the size of Qwen2.5-1.5B in bfloat16 (1.54B parameters, 3.09 GB; default shards of 2.2 GB
and the rest, so one shard is over 2 GB) with random weights and the small files of a real bundle (config,
facts, runtime, card, manifest, sealed), starts Debian's docker-registry on a free 127.0.0.1 port with its
store in the workdir, then times, one after another: `cp -r` of the bundle, `modelpack push` (to a fresh
repository), `modelpack pull` by digest. push and pull run as subprocesses under /usr/bin/time -v (their peak
RSS). The page cache is warm (the bundle was just written); the pulled bundle is compared with the source, file
by file (sha256 from the manifest check pull itself ran, and sizes). pull fsyncs what it publishes, as build does,
so `cp -r` is also timed with its copy fsynced. The machine's load average is recorded: on a shared machine the
figures move with it. A JSON result lands in WORKDIR/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from builder.manifest import write_manifest  # noqa: E402
from builder.runtime.bundle_check import DIGEST_PLACEHOLDER  # noqa: E402
from builder.trust import BUNDLE_RUNTIME, seal  # noqa: E402

BLOCK = 64 << 20
QWEN25_15B_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 1536,
                     "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                     "intermediate_size": 8960, "vocab_size": 151936, "torch_dtype": "bfloat16"}


def write_shard(path: Path, nbytes: int) -> None:
    """A safetensors file of one bfloat16 tensor of nbytes random bytes (a 64 MiB random block, repeated)."""
    count = nbytes // 2
    header = json.dumps({"weight": {"dtype": "BF16", "shape": [count], "data_offsets": [0, count * 2]}}).encode()
    header += b" " * (-len(header) % 8)
    block = os.urandom(BLOCK)
    with open(path, "wb") as file:
        file.write(len(header).to_bytes(8, "little") + header)
        left = count * 2
        while left:
            file.write(block[: min(BLOCK, left)])
            left -= min(BLOCK, left)


def synthesize_bundle(folder: Path, total: int, shard: int) -> Path:
    bundle = folder / "qwen-1.5b-shaped"
    if (bundle / "manifest.json").is_file():
        return bundle
    shutil.rmtree(bundle, ignore_errors=True)
    bundle.mkdir(parents=True)
    sizes = [shard, total - shard] if total > shard else [total]
    for index, size in enumerate(sizes, 1):
        write_shard(bundle / f"model-{index:05d}-of-{len(sizes):05d}.safetensors", size)
    (bundle / "config.json").write_text(json.dumps(QWEN25_15B_CONFIG, indent=2))
    (bundle / "modelpack_bundle.json").write_text(json.dumps({"name": bundle.name, "dtype": "bfloat16"}))
    (bundle / "README.md").write_text(f"# {bundle.name}\n\nBundle digest: {DIGEST_PLACEHOLDER}\n")
    for name in BUNDLE_RUNTIME:
        shutil.copy(REPO / "builder" / "runtime" / name, bundle / name)
    write_manifest(bundle, {"generator": "modelpack", "modelpack_version": "bench", "name": bundle.name,
                            "mode": "merge"})
    seal(bundle)
    return bundle


def start_registry(folder: Path) -> tuple[str, subprocess.Popen]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "config.yml"
    config.write_text(f"version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: "
                      f"{folder / 'store'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    process = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=1)
            return f"127.0.0.1:{port}", process
        except (urllib.error.URLError, OSError):
            time.sleep(0.05)
    process.kill()
    raise SystemExit("docker-registry did not start")


def timed(command: list[str]) -> dict:
    """Wall time and, under /usr/bin/time -v, the command's peak RSS in MiB."""
    start = time.monotonic()
    done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=REPO)
    wall = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr[-3000:]}")
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return {"seconds": round(wall, 2), "peak_rss_mib": round(int(rss.group(1)) / 1024, 1) if rss else None,
            "stdout": done.stdout.strip()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-registry-bench"))
    parser.add_argument("--gb", type=float, default=3.09, help="bundle weights in GB (Qwen2.5-1.5B bf16: 3.09)")
    parser.add_argument("--shard-gb", type=float, default=2.2, help="the first shard's size in GB")
    parser.add_argument("--chunk-mb", type=int, help="push with PATCH chunks of this many MiB")
    parser.add_argument("--keep", action="store_true", help="keep the registry store, the copy and the pull")
    args = parser.parse_args()
    work = args.workdir.resolve()
    if REPO in (work, *work.parents):
        raise SystemExit("--workdir must be outside the repository")
    work.mkdir(parents=True, exist_ok=True)
    bundle = synthesize_bundle(work / "input", int(args.gb * 1e9), int(args.shard_gb * 1e9))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    for leftover in ("registry", "copy", "pulled"):
        shutil.rmtree(work / leftover, ignore_errors=True)
    host, registry = start_registry(work / "registry")
    modelpack = [sys.executable, "-m", "builder"]
    try:
        start = time.monotonic()
        subprocess.run(["cp", "-r", str(bundle), str(work / "copy")], check=True)
        copy_seconds = round(time.monotonic() - start, 2)
        # pull publishes as build does, with every file fsynced; cp -r leaves its writes in the page cache
        subprocess.run(["find", str(work / "copy"), "-type", "f", "-exec", "sync", "{}", "+"], check=True)
        copy_sync_seconds = round(time.monotonic() - start, 2)
        push = timed([*modelpack, "push", str(bundle), f"{host}/bench/qwen-1.5b:v1", "--plain-http", "--quiet",
                      "--json", *(["--chunk-mb", str(args.chunk_mb)] if args.chunk_mb else [])])
        pushed = json.loads(push.pop("stdout"))
        pull = timed([*modelpack, "pull", pushed["artifact"], str(work / "pulled"), "--plain-http", "--quiet",
                      "--json"])
        pulled = json.loads(pull.pop("stdout"))
    finally:
        os.kill(registry.pid, signal.SIGTERM)
        registry.wait()
    identical = all((work / "pulled" / p.relative_to(bundle)).stat().st_size == p.stat().st_size
                    for p in bundle.rglob("*") if p.is_file()) and pulled["bundle_digest"] == pushed["bundle_digest"]
    result = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "bundle_bytes": size, "largest_file_bytes": max(p.stat().st_size for p in bundle.rglob("*") if p.is_file()),
        "cpu_count": os.cpu_count(), "cp_r_seconds": copy_seconds, "cp_r_sync_seconds": copy_sync_seconds,
        "push": push, "pull": pull, "load_average": os.getloadavg(),
        "push_vs_cp": round(push["seconds"] / copy_seconds, 2), "pull_vs_cp": round(pull["seconds"] / copy_seconds, 2),
        "chunk_mb": args.chunk_mb, "artifact": pushed["digest"], "pulled_identical": identical,
    }
    (work / "results").mkdir(exist_ok=True)
    out = work / "results" / f"registry-{result['when'].replace(':', '')}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    largest = result["largest_file_bytes"] / 1e9
    print(f"bundle {size / 1e9:.2f} GB (largest file {largest:.2f} GB), {os.cpu_count()} CPUs")
    print(f"cp -r            {copy_seconds:7.2f} s  (then the copy fsynced: {copy_sync_seconds:.2f} s)")
    for name, step in (("push", push), ("pull", pull)):
        print(f"modelpack {name}   {step['seconds']:7.2f} s  ({result[name + '_vs_cp']}x cp)  "
              f"peak RSS {step['peak_rss_mib']} MiB")
    print(f"pulled identical: {identical}; load average {os.getloadavg()[0]:.1f}; {out}")
    if not args.keep:
        for leftover in ("registry", "copy", "pulled"):
            shutil.rmtree(work / leftover, ignore_errors=True)


if __name__ == "__main__":
    main()
