#!/usr/bin/env python
"""End-to-end `modelpack build` with verification: wall time per phase and peak RSS per process (issue 12).

    nice python bench/verify_bench.py --size 7b
    nice python bench/verify_bench.py --size 7b --modelpack-root /tmp/mp-before   # another checkout, e.g. HEAD~

Uses bench/merge_bench.py's random Qwen2-shaped base (bfloat16, with its tiny ChatML tokenizer and chat template)
and float32 LoRA, cached in --workdir (seen through links with a tokenizer that covers the model's whole
vocabulary, see full_vocabulary_base), and a spec with a verify section: one prompt, one probe,
`max_new_tokens: 4`, `compare_base: true`, merge mode in bfloat16. It runs `modelpack build` once and polls
/proc every 0.2 s for the build's process tree: each process's peak RSS (VmHWM, exact: the kernel's own high-water
mark, read until the process exits) and its RSS split into anonymous and file-backed pages at its largest sample.
Each progress line of the build is stamped with its time, so the phases (write, each verification step, finalise)
are read off the build's own output. The JSON result lands in WORKDIR/results/.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_bench import REPO, ensure_inputs, linked_weights, log, machine, versions  # noqa: E402

PROMPT = "Hello, who are you?"
PROBE = "什么是机器学习"
POLL_SECONDS = 0.2


def full_vocabulary_base(cached: Path, folder: Path) -> Path:
    """The cached base seen through links, with a tokenizer that has a token for every embedding row.

    The cached base's tokenizer knows 300 tokens while the model has 152064 rows: the random model's greedy answers
    are then ids the tokenizer cannot decode, the answers come back empty and the equivalence check scores one
    position per prompt. A byte-level BPE with a token for every row decodes every id, so every generated token is
    scored (the answer re-encodes to about as many tokens: BPE may merge across the generated boundaries).
    """
    from merge_bench import CHATML_TEMPLATE, SPECIAL_TOKENS
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rows = json.loads((cached / "config.json").read_text())["vocab_size"]
    linked_weights(cached, folder)
    # Byte-level BPE whose vocabulary is every byte, every pair of bytes, then byte triples up to the row count.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    pairs = [a + b for a in alphabet for b in alphabet]
    triples = [p + c for p in pairs for c in alphabet][:rows - len(SPECIAL_TOKENS) - len(alphabet) - len(pairs)]
    tokens = [*SPECIAL_TOKENS, *alphabet, *pairs, *triples]
    merges = [(t[0], t[1]) for t in pairs] + [(t[:2], t[2]) for t in triples]
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL_TOKENS)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHATML_TEMPLATE).save_pretrained(folder)
    return folder


def write_spec(folder: Path, base: Path, adapter: Path, size: str) -> Path:
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": f"verify-bench-qwen2-{size}",
        "base": {"path": os.path.relpath(base, folder)},
        "adapter": {"path": os.path.relpath(adapter, folder)},
        "output": {"dir": "bundle", "mode": "merge", "dtype": "bfloat16"},
        "verify": {"max_new_tokens": 4, "prompts": [{"prompt": PROMPT}], "probes": [{"prompt": PROBE}],
                   "compare_base": True, "device": "cpu"},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def _status(pid: int) -> dict[str, int] | None:
    """VmHWM, VmRSS, RssAnon, RssFile of a process, in kB; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
            found[key] = int(value.split()[0])
    return found


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _describe(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "?"
    words = [a.decode(errors="replace") for a in argv if a]
    # The script and its first option say which verification step it is (load.py --verify, equivalence.py ...).
    script = next((w for w in words if w.endswith(".py") or w == "builder"), words[0] if words else "?")
    rest = words[words.index(script) + 1:][:2] if script in words else []
    return " ".join([Path(script).name, *rest])


class TreeWatcher(threading.Thread):
    """Polls the process tree under one pid: per process, first/last seen, peak RSS and its split."""

    def __init__(self, root: int, started: float):
        super().__init__(daemon=True)
        self.root, self.started, self.processes, self.done = root, started, {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            pids, queue = [], [self.root]
            while queue:
                pid = queue.pop()
                pids.append(pid)
                queue += _children(pid)
            now = time.perf_counter() - self.started
            for pid in pids:
                status = _status(pid)
                if status is None:
                    continue
                record = self.processes.setdefault(pid, {"first_s": now, "peak_kb": 0, "largest_sample": {}})
                command = _describe(pid)  # again each time: a fresh child shows its parent's until exec
                if command != "?":  # a zombie's cmdline is empty
                    record["command"] = command
                record["last_s"] = now
                record["peak_kb"] = max(record["peak_kb"], status.get("VmHWM", 0))
                if status.get("VmRSS", 0) >= record["largest_sample"].get("VmRSS", 0):
                    record["largest_sample"] = status
            time.sleep(POLL_SECONDS)


def run_build(spec: Path, out: Path, modelpack_root: Path) -> dict:
    """`modelpack build` from modelpack_root's sources, its progress lines stamped, its process tree watched."""
    command = [sys.executable, "-m", "builder", "build", str(spec), "--force", "-o", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    started = time.perf_counter()
    # cwd: `python -m builder` imports the builder/ of the checkout it runs in (sys.path[0] is the cwd).
    process = subprocess.Popen(command, cwd=modelpack_root, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace")
    watcher = TreeWatcher(process.pid, started)
    watcher.start()
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        stamp = time.perf_counter() - started
        lines.append([round(stamp, 1), line.rstrip()])
        log(f"+{stamp:6.1f}s {line.rstrip()}")
    code = process.wait()
    seconds = time.perf_counter() - started
    watcher.done.set()
    watcher.join()
    processes = [
        {"pid": pid, "command": r["command"], "from_s": round(r["first_s"], 1), "to_s": round(r["last_s"], 1),
         "peak_rss_gb": round(r["peak_kb"] * 1024 / 1e9, 2),
         "at_largest_sample_gb": {k: round(v * 1024 / 1e9, 2) for k, v in r["largest_sample"].items()}}
        for pid, r in sorted(watcher.processes.items(), key=lambda item: item[1]["first_s"])
    ]
    return {"command": " ".join(command), "cwd": str(modelpack_root), "exit": code, "seconds": round(seconds, 1),
            "processes": processes, "progress": lines}


def weight_bytes(bundle: Path) -> int:
    return sum(p.stat().st_size for p in bundle.glob("*.safetensors"))


def render(result: dict) -> str:
    weights = result["weight_bytes"]
    rows = [f"modelpack build: exit {result['build']['exit']}, {result['build']['seconds']} s; "
            f"weights {weights / 1e9:.2f} GB"]
    for p in result["build"]["processes"]:
        split = p["at_largest_sample_gb"]
        rows.append(f"  {p['command'][:60]:60s} {p['from_s']:7.1f}-{p['to_s']:7.1f} s  "
                    f"peak RSS {p['peak_rss_gb']:6.2f} "
                    f"GB = {p['peak_rss_gb'] * 1e9 / weights:.2f}x weights (anon {split.get('RssAnon', 0):.2f}, "
                    f"file {split.get('RssFile', 0):.2f} GB at the largest sample)")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="7b", choices=["0.5b", "1.5b", "7b"])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-bench"),
                        help="cached inputs (shared with merge_bench.py), the bundle, results")
    parser.add_argument("--modelpack-root", type=Path, default=REPO,
                        help="the checkout whose builder/ runs (default: this one)")
    parser.add_argument("--tokenizer", choices=["full", "fixture"], default="full",
                        help="full: a tokenizer with a token for every embedding row (every answer token scored); "
                             "fixture: the cached base's own 300-token tokenizer, as issue 12's 322 s run had it")
    args = parser.parse_args(argv)
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # merge_bench.py's lock: two benchmarks at once would distort each other and, at 7b, not fit in memory.
    lock = open(workdir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark holds {workdir / '.lock'}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    inputs = workdir / "inputs" / f"qwen2-{args.size}-lora64-float32"
    if inputs.exists() and not (inputs / "complete.json").is_file():
        parser.error(f"{inputs} is being generated by another run (no complete.json yet); wait for it")
    cached, adapter = ensure_inputs(workdir, args.size, adapter_dtype="float32", seed=0)
    run_dir = workdir / f"verify-{args.size}"
    base = full_vocabulary_base(cached, run_dir / "base") if args.tokenizer == "full" else cached
    spec = write_spec(run_dir, base, adapter, args.size)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    free = subprocess.run(["free", "-g"], capture_output=True, text=True).stdout
    log(f"uptime: {uptime}")
    result: dict = {
        "size": args.size, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "uptime_before": uptime, "free_before": free,
        "spec": spec.read_text(encoding="utf-8"), "tokenizer": args.tokenizer,
    }
    result["build"] = run_build(spec, run_dir / "bundle", args.modelpack_root.resolve())
    result["uptime_after"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    result["weight_bytes"] = weight_bytes(run_dir / "bundle")
    report = run_dir / "bundle" / "verification.json"
    if report.is_file():
        verification = json.loads(report.read_text(encoding="utf-8"))
        result["equivalence"] = {k: v for k, v in verification.get("equivalence", {}).items() if k != "prompts"}
        result["runtime"] = verification.get("runtime")
    results = workdir / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = results / f"verify_bench_{args.size}_{stamp}.json"
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(render(result))
    log(f"result: {path}")
    return result["build"]["exit"]


if __name__ == "__main__":
    sys.exit(main())
