#!/usr/bin/env python
"""Merge benchmark: modelpack vs peft's merge flow vs `cp -r` vs the bare delta math, on a Qwen2-shaped model.

    python bench/merge_bench.py --size 0.5b|1.5b|7b [--workdir DIR] [--keep] [--repeat N] [--profile]
                                [--checkout OTHER_TREE]

It generates (once per size, cached in the workdir) a random bfloat16 Qwen2 base with the real Qwen2
dimensions, saved as sharded safetensors like the hub, and a random LoRA adapter (r=64, alpha=128, all
seven linear projections) saved as peft saves it. Then, one after another on this machine:

  (c) `cp -r` of the base folder                         -- the file-copy floor
  (d) fp32 delta-and-add of every targeted tensor, in memory, no I/O   -- the math floor
  (a) `modelpack build SPEC --no-verify --force -o OUT`   (subprocess, /usr/bin/time -v for peak RSS)
  (b) peft's flow from the seed document                  (subprocess, /usr/bin/time -v for peak RSS):
      AutoPeftModelForCausalLM.from_pretrained(adapter, dtype=bfloat16) -> merge_and_unload() -> save_pretrained()

The page cache is dropped before every step when this process may write /proc/sys/vm/drop_caches
(root); otherwise every step starts with the base read once into the cache (`--cache warm`), and the
results say which. Each step's time is given to process exit and to exit + `sync` (its writes on disk).
With --checkout, (a) runs every tree (this one and the others, each as `python -m builder` from its root) once per
round, alternating, and the medians are compared. Finally (a)'s tensors are compared with (b)'s bit for bit,
tensor by tensor, and a table plus a JSON result file are written. Everything big lives in the workdir (default
/tmp/modelpack-bench), never in the repository.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Bumped whenever the generated inputs change, so a stale cache is regenerated rather than reused.
# 2: config.json names its architecture, as every hub checkpoint saved by save_pretrained does.
INPUTS_VERSION = 2

# Real Qwen2 / Qwen2.5 dimensions (config.json of Qwen/Qwen2.5-{0.5B,1.5B,7B}).
SIZES: dict[str, dict] = {
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                 intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                 intermediate_size=8960, vocab_size=151936, tie_word_embeddings=True),
    "7b": dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
               intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False),
    # Qwen2.5-72B's tensors (config.json of Qwen/Qwen2.5-72B) with 2 of its 80 decoder layers: every tensor shape
    # the 72B merge handles, at a size this machine holds (8.5 GB); memory cannot grow with the layers left out,
    # since the pipeline holds a few byte-sized blocks whatever the layer count (see bench/scale_bench.py).
    "72b-2layers": dict(hidden_size=8192, num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                        intermediate_size=29568, vocab_size=152064, tie_word_embeddings=False),
}
LORA_RANK = 64
LORA_ALPHA = 128
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WEIGHT_STD = 0.02
# lora_A like peft's kaiming-uniform init (std ~ 1/sqrt(in_features)); lora_B "trained" away from its zero
# init, large enough that every merged weight moves by more than one bfloat16 ulp on average.
LORA_B_STD = 0.002
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
BENCH_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

# peft's flow as the seed document runs it (there with device_map="auto" on a GPU box; here on CPU).
PEFT_FLOW = r"""
import json, sys, time
started = time.perf_counter()
import torch
from peft import AutoPeftModelForCausalLM
imported = time.perf_counter()
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
loaded = time.perf_counter()
merged = model.merge_and_unload()
merged_at = time.perf_counter()
merged.save_pretrained(sys.argv[2])
saved = time.perf_counter()
print("PHASES " + json.dumps({"import": imported - started, "load": loaded - imported,
                              "merge": merged_at - loaded, "save": saved - merged_at}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# Inputs: a random Qwen2-shaped base and a random LoRA adapter, cached per size.
# --------------------------------------------------------------------------------------------------

def qwen2_config(size: str):
    from transformers import Qwen2Config

    return Qwen2Config(
        **SIZES[size], max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
        bos_token_id=0, eos_token_id=2, pad_token_id=0, dtype="bfloat16",
    )


def base_tensor_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor a Qwen2ForCausalLM checkpoint stores, in module order, from a model on the meta device."""
    from transformers import Qwen2ForCausalLM

    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    shapes = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    if config.tie_word_embeddings:  # a tied head is not stored: it is the input embedding
        shapes = [(name, shape) for name, shape in shapes if name != "lm_head.weight"]
    return shapes


def shard_groups(shapes: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple[int, ...]]]]:
    """One shard for the embedding, one per decoder layer, one for the final norm (and untied head)."""
    groups: dict[str, list] = {}
    for name, shape in shapes:
        match = re.match(r"model\.layers\.(\d+)\.", name)
        key = f"layer{int(match.group(1)):04d}" if match else ("embed" if "embed_tokens" in name else "zfinal")
        groups.setdefault(key, []).append((name, shape))
    return [groups[key] for key in sorted(groups, key=lambda k: (k != "embed", k))]


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sum(ord(c) * 31**i for i, c in enumerate(name)) % 2**31)


def _random_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, std: float, seed: int) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=_generator(seed, name))


def write_tokenizer(folder: Path) -> None:
    """A tiny byte-level BPE tokenizer with ChatML specials and template: modelpack copies tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["a tiny corpus for a benchmark tokenizer"] * 10, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=CHATML_TEMPLATE).save_pretrained(folder)


def generate_base(folder: Path, size: str, *, seed: int) -> int:
    """Write config.json, generation_config.json, a tokenizer and one safetensors shard per layer; returns bytes."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    config = qwen2_config(size)
    config.architectures = ["Qwen2ForCausalLM"]  # what model.save_pretrained writes, and every hub config carries
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    GenerationConfig(bos_token_id=0, eos_token_id=[2, 0], pad_token_id=0, do_sample=True, temperature=0.7,
                     top_p=0.8, top_k=20, repetition_penalty=1.05).save_pretrained(folder)
    write_tokenizer(folder)

    groups = shard_groups(base_tensor_shapes(config))
    weight_map, total = {}, 0
    for number, group in enumerate(groups, 1):
        filename = f"model-{number:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
            else:  # weights and the q/k/v biases
                tensors[name] = _random_tensor(name, shape, torch.bfloat16, WEIGHT_STD, seed)
            weight_map[name] = filename
            total += tensors[name].nbytes
        # One layer at a time in memory (at most the 7b embedding, 1.1 GB), never the model.
        save_file(tensors, folder / filename, metadata={"format": "pt"})
        del tensors
        log(f"  base shard {number}/{len(groups)} written")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return total


def lora_targets(config) -> list[tuple[str, int, int]]:
    """(module path, out_features, in_features) of every targeted linear layer."""
    hidden, inter = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (hidden // config.num_attention_heads)
    per_layer = [("self_attn.q_proj", hidden, hidden), ("self_attn.k_proj", kv, hidden),
                 ("self_attn.v_proj", kv, hidden), ("self_attn.o_proj", hidden, hidden),
                 ("mlp.gate_proj", inter, hidden), ("mlp.up_proj", inter, hidden), ("mlp.down_proj", hidden, inter)]
    return [(f"model.layers.{i}.{module}", out, inp)
            for i in range(config.num_hidden_layers) for module, out, inp in per_layer]


def generate_adapter(folder: Path, base: Path, size: str, *, dtype: torch.dtype, seed: int) -> None:
    """adapter_config.json from peft's LoraConfig and adapter_model.safetensors with peft's key names."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    config = qwen2_config(size)
    folder.mkdir(parents=True)
    lora = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.05, target_modules=TARGET_MODULES,
                      task_type="CAUSAL_LM", bias="none", base_model_name_or_path=str(base))
    lora.save_pretrained(folder)
    tensors = {}
    for module, out_features, in_features in lora_targets(config):
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = _random_tensor(
            prefix + "A", (LORA_RANK, in_features), torch.float32, in_features**-0.5, seed).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = _random_tensor(
            prefix + "B", (out_features, LORA_RANK), torch.float32, LORA_B_STD, seed).to(dtype)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


def linked_weights(cached: Path, folder: Path) -> Path:
    """A fresh folder holding links to a cached base's weights and configs, without its tokenizer files (which the
    caller writes): another tokenizer over the same multi-GB weights without copying them."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for path in cached.iterdir():
        if path.suffix in (".safetensors", ".json") and not path.name.startswith(("tokenizer", "special_tokens")):
            (folder / path.name).symlink_to(path.resolve())
    return folder


def ensure_inputs(workdir: Path, size: str, *, adapter_dtype: str, seed: int) -> tuple[Path, Path]:
    """The cached base and adapter folders for this size, generated on first use (or when stale)."""
    root = workdir / "inputs" / f"qwen2-{size}-lora{LORA_RANK}-{adapter_dtype}"
    base, adapter, marker = root / "base", root / "checkpoint-1000", root / "complete.json"
    wanted = {"version": INPUTS_VERSION, "size": size, "adapter_dtype": adapter_dtype, "seed": seed}
    if marker.is_file() and json.loads(marker.read_text()) == wanted:
        log(f"using cached inputs in {root}")
        return base, adapter
    if root.exists():
        shutil.rmtree(root)
    log(f"generating {size} inputs in {root}")
    started = time.perf_counter()
    total = generate_base(base, size, seed=seed)
    generate_adapter(adapter, base, size, dtype=getattr(torch, adapter_dtype), seed=seed)
    marker.write_text(json.dumps(wanted))
    log(f"generated {total / 1e9:.2f} GB of base weights in {time.perf_counter() - started:.0f} s")
    return base, adapter


def write_spec(folder: Path, base: Path, adapter: Path, size: str) -> Path:
    """A modelpack spec with paths relative to its own folder, as a committed spec has them."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    spec = {
        "name": f"bench-qwen2-{size}",
        "base": {"path": os.path.relpath(base, folder)},
        "adapter": {"path": os.path.relpath(adapter, folder)},
        "output": {"dir": "modelpack-out", "mode": "merge", "dtype": "auto"},
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------------
# Measuring: cache state, disk counters, machine load, timed subprocesses.
# --------------------------------------------------------------------------------------------------

def can_drop_caches() -> bool:
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


def prepare_cache(mode: str, base: Path) -> None:
    """cold: write back dirty pages and drop the page cache; warm: read the base once so it is cached."""
    os.sync()
    if mode == "cold":
        DROP_CACHES.write_text("3")
    else:
        for path in sorted(base.iterdir()):
            with open(path, "rb") as f:
                while f.read(64 << 20):
                    pass


def disk_stat_path(path: Path) -> Path | None:
    dev = os.stat(path).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.is_file() else None


def disk_bytes(stat_path: Path | None) -> tuple[int, int]:
    """Bytes read and written so far on the workdir's block device (whole machine, not just us)."""
    if stat_path is None:
        return (0, 0)
    fields = stat_path.read_text().split()
    return int(fields[2]) * 512, int(fields[6]) * 512


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    ticks = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        name = cmdline or stat[stat.index("(") + 1:stat.rindex(")")]
        ticks[int(proc.name)] = (int(fields[11]) + int(fields[12]), name)
    return ticks


def machine_load(window: float = 1.0) -> dict:
    """Load average and the processes that used the CPU over a short window (other engineers' tests distort timings)."""
    before = _cpu_ticks()
    time.sleep(window)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    busy = []
    for pid, (ticks, cmdline) in after.items():
        used = (ticks - before.get(pid, (ticks, ""))[0]) / hz / window
        if pid != os.getpid() and used >= 0.1:
            busy.append(f"{100 * used:.0f}% {cmdline[:100]}")
    return {"loadavg": [round(x, 2) for x in os.getloadavg()], "busy_processes": busy}


def cpu_busy_seconds() -> float:
    """CPU time spent by everything on the machine so far, all cores together (from /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        load = machine_load(window=2.0)
        if not load["busy_processes"] and load["loadavg"][0] < 1.0:
            log(f"machine idle (load {load['loadavg']})")
            return
        if time.monotonic() > deadline:
            log(f"machine still busy, measuring anyway: {load}")
            return
        log(f"waiting for an idle machine: load {load['loadavg']}, busy: {load['busy_processes']}")
        time.sleep(30)


@dataclass
class StepResult:
    step: str
    seconds: float            # until the process (or operation) finished
    sync_seconds: float = 0.0  # the `sync` right after it: its writes reaching the disk
    max_rss_mb: float | None = None  # MiB (kilobytes from time -v / 1024)
    cpu_percent: float | None = None
    user_s: float | None = None
    system_s: float | None = None
    disk_read_gb: float | None = None
    disk_write_gb: float | None = None
    load_before: dict = field(default_factory=dict)
    # CPU that other processes used while the step ran, in % of one core (this machine has os.cpu_count()):
    # the distortion from other engineers' work, measured rather than guessed from the load average.
    others_cpu_percent: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def to_disk(self) -> float:
        return self.seconds + self.sync_seconds


TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "User time (seconds)": "user_s",
    "System time (seconds)": "system_s",
    "Percent of CPU this job got": "cpu_percent",
}


def parse_time_v(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in TIME_FIELDS:
            out[TIME_FIELDS[key]] = float(value.rstrip("%"))
    return out


def run_timed(step: str, command: list[str], *, stat_path: Path | None, log_file: Path,
              wrap: list[str] | None = None, cwd: Path | None = None,
              env: dict[str, str] | None = None) -> tuple[StepResult, str]:
    """Run a command under /usr/bin/time -v (when present); time it to exit and to the end of a sync."""
    time_bin = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)
    load = machine_load()
    with tempfile.NamedTemporaryFile("r", suffix=".time") as time_out:
        full = ([time_bin, "-v", "-o", time_out.name] if time_bin else []) + (wrap or []) + command
        read0, write0 = disk_bytes(stat_path)
        rusage0 = _children_rusage()
        busy0, own0 = cpu_busy_seconds(), own_cpu_seconds()
        started = time.perf_counter()
        process = subprocess.run(full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd,
                                 env={**(env or os.environ), **BENCH_ENV})
        seconds = time.perf_counter() - started
        busy = cpu_busy_seconds() - busy0 - (own_cpu_seconds() - own0)
        synced = time.perf_counter()
        os.sync()
        sync_seconds = time.perf_counter() - synced
        read1, write1 = disk_bytes(stat_path)
        stats = parse_time_v(Path(time_out.name).read_text()) if time_bin else {}
    log_file.write_text(process.stdout)
    if process.returncode != 0:
        raise SystemExit(f"{step} failed (exit {process.returncode}); output in {log_file}:\n{process.stdout[-3000:]}")
    if not time_bin:  # fall back to getrusage: the largest child RSS so far, good enough as an upper bound
        usage = _children_rusage()
        stats = {"max_rss_kb": usage.ru_maxrss, "user_s": usage.ru_utime - rusage0.ru_utime,
                 "system_s": usage.ru_stime - rusage0.ru_stime}
    result = StepResult(
        step=step, seconds=seconds, sync_seconds=sync_seconds,
        max_rss_mb=stats["max_rss_kb"] / 1024 if "max_rss_kb" in stats else None,
        cpu_percent=stats.get("cpu_percent"), user_s=stats.get("user_s"), system_s=stats.get("system_s"),
        disk_read_gb=(read1 - read0) / 1e9, disk_write_gb=(write1 - write0) / 1e9, load_before=load,
    )
    if result.user_s is not None:
        result.others_cpu_percent = max(0.0, 100 * (busy - result.user_s - result.system_s) / seconds)
    return result, process.stdout


def _children_rusage():
    import resource

    return resource.getrusage(resource.RUSAGE_CHILDREN)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------------------
# The four steps.
# --------------------------------------------------------------------------------------------------

def step_cp(base: Path, out: Path, **kw) -> StepResult:
    if out.exists():
        shutil.rmtree(out)
    result, _ = run_timed("cp", ["cp", "-r", str(base), str(out)], **kw)
    return result


def modelpack_command(checkout: Path | None = None) -> list[str]:
    found = None if checkout else shutil.which("modelpack")
    return [found] if found else [sys.executable, "-m", "builder"]


def checkout_environment(checkout: Path) -> dict[str, str]:
    """`python -m builder` runs that checkout's builder/ package: its root first on PYTHONPATH (and the cwd)."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])])}


def checkout_package(checkout: Path) -> None:
    """The checkout's own builder/ is the one its `python -m builder` imports, with its templates."""
    done = subprocess.run([sys.executable, "-c", "import builder, builder.templates; print(builder.__file__)"],
                          cwd=checkout, env=checkout_environment(checkout), capture_output=True, text=True)
    if done.returncode != 0 or not Path(done.stdout.strip()).is_relative_to(checkout):
        sys.exit(f"{checkout}: `import builder, builder.templates` finds {done.stdout.strip() or done.stderr.strip()}, "
                 "not the checkout's own package (give it builder/templates, e.g. a link to ../templates)")


def step_modelpack(spec: Path, out: Path, *, profile: Path | None = None, extra_args: list[str] = (),
                   checkout: Path | None = None, **kw) -> StepResult:
    """(a); with `checkout`, as `python -m builder` from that tree (its root first on PYTHONPATH, and the cwd)."""
    command = [*modelpack_command(checkout), "build", str(spec), "--no-verify", "--force", "-o", str(out),
               *extra_args]
    wrap = None
    if profile is not None:
        # --idle keeps samples of threads blocked in read()/write(): disk time must show up in the profile.
        wrap = ["py-spy", "record", "--idle", "--threads", "--full-filenames", "--rate", "50", "--format", "raw",
                "-o", str(profile), "--"]
    root = checkout or REPO
    before = builder_fingerprint(root)
    result, output = run_timed("modelpack", command, wrap=wrap, cwd=checkout,
                               env=checkout_environment(checkout) if checkout else None, **kw)
    result.extra["builder_sources_sha256"] = builder_fingerprint(root)
    if checkout is not None:
        result.extra["checkout"] = str(checkout)
    if result.extra["builder_sources_sha256"] != before:
        log("warning: builder/ changed while modelpack ran; this measurement mixes two versions")
        result.extra["builder_changed_during_run"] = True
    match = re.search(r"built .* in ([\d.]+)s", output)
    if match:
        result.extra["self_reported_build_s"] = float(match.group(1))
    if profile is not None:
        result.extra["profile"] = str(profile)
        result.extra["profiled"] = True
    return result


def step_peft(adapter: Path, out: Path, **kw) -> StepResult:
    if out.exists():
        shutil.rmtree(out)
    result, output = run_timed("peft", [sys.executable, "-c", PEFT_FLOW, str(adapter), str(out)], **kw)
    match = re.search(r"^PHASES (.*)$", output, re.MULTILINE)
    if match:
        result.extra["phases_s"] = {k: round(v, 2) for k, v in json.loads(match.group(1)).items()}
    return result


def step_math_floor(size: str, *, seed: int, reuse_buffers: bool = False) -> StepResult:
    """The fp32 delta-and-add of every targeted tensor on random tensors of the real shapes; only the math is timed.

    One random W, A and B per distinct shape is reused for every layer (generating 6.5e9 random values would
    take longer than the benchmark). The timed expression is exactly the merge's:
    (W.float() + (B.float() @ A.float()) * scaling).to(bfloat16), each operation into a fresh tensor.
    With reuse_buffers the same operations write into preallocated tensors (matmul out=, mul_, add_, copy_):
    bit-identical results, minus the cost of the kernel handing out and zeroing fresh pages for every
    temporary (glibc serves allocations this large with mmap and returns them on free).
    """
    config = qwen2_config(size)
    scaling = LORA_ALPHA / LORA_RANK
    pool: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}
    load = machine_load()
    total, count, params = 0.0, 0, 0
    busy0, own0, wall0 = cpu_busy_seconds(), own_cpu_seconds(), time.perf_counter()
    for _module, out_features, in_features in lora_targets(config):
        key = (out_features, in_features)
        if key not in pool:
            pool[key] = (
                _random_tensor(f"W{key}", key, torch.bfloat16, WEIGHT_STD, seed),
                _random_tensor(f"A{key}", (LORA_RANK, in_features), torch.float32, in_features**-0.5, seed),
                _random_tensor(f"B{key}", (out_features, LORA_RANK), torch.float32, LORA_B_STD, seed),
            ) + ((torch.zeros(key), torch.zeros(key, dtype=torch.bfloat16)) if reuse_buffers else ())
        if reuse_buffers:
            weight, a, b, work, out = pool[key]
            started = time.perf_counter()
            torch.matmul(b, a, out=work)
            work.mul_(scaling).add_(weight)
            out.copy_(work)
            total += time.perf_counter() - started
        else:
            weight, a, b = pool[key]
            started = time.perf_counter()
            merged = (weight.float() + (b.float() @ a.float()) * scaling).to(torch.bfloat16)
            total += time.perf_counter() - started
            del merged
        count += 1
        params += out_features * in_features
    others = (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0)
    return StepResult(step="math floor" + (" (reused buffers)" if reuse_buffers else ""), seconds=total,
                      load_before=load, others_cpu_percent=max(0.0, 100 * others / (time.perf_counter() - wall0)),
                      extra={"tensors": count, "parameters": params, "torch_threads": torch.get_num_threads()})


# --------------------------------------------------------------------------------------------------
# Bit-for-bit comparison of two saved models.
# --------------------------------------------------------------------------------------------------

def weight_map(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    from safetensors import safe_open

    single = folder / "model.safetensors"
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def compare_models(left: Path, right: Path) -> dict:
    """Stream both models tensor by tensor; count tensors whose bytes differ and the largest difference."""
    from safetensors import safe_open

    left_map, right_map = weight_map(left), weight_map(right)
    common = sorted(set(left_map) & set(right_map))
    differing, max_abs_diff, worst = [], 0.0, None
    with contextlib.ExitStack() as stack:
        handles: dict[Path, object] = {}

        def get(path: Path, name: str) -> torch.Tensor:
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(path, "pt"))
            return handles[path].get_tensor(name)

        for name in common:
            a, b = get(left_map[name], name), get(right_map[name], name)
            same = a.dtype == b.dtype and a.shape == b.shape and torch.equal(
                a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
            if not same:
                diff = (a.float() - b.float()).abs().max().item() if a.shape == b.shape else float("inf")
                differing.append(name)
                if diff > max_abs_diff or worst is None:
                    max_abs_diff, worst = diff, name
            del a, b
    return {
        "tensors_compared": len(common),
        "tensors_differing": len(differing),
        "differing_examples": differing[:10],
        "max_abs_diff": max_abs_diff,
        "worst_tensor": worst,
        "only_in_modelpack": sorted(set(left_map) - set(right_map)),
        "only_in_peft": sorted(set(right_map) - set(left_map)),
    }


# --------------------------------------------------------------------------------------------------
# Profile summary. py-spy's raw format with --threads: "thread (tid): Name;frame;frame;... count",
# each frame "function (path/file.py:line)"; --idle keeps samples of threads blocked in I/O or on locks.
# --------------------------------------------------------------------------------------------------

WAIT_FRAMES = re.compile(r"^(Condition\.wait|Event\.wait|Thread\.join|Queue\.get|Queue\.put|_wait_for_tstate_lock"
                         r"|Lock\.acquire|_worker) ")


def _short(frame: str) -> str:
    """`f (/long/path/builder/execute.py:12)` -> `f (builder/execute.py:12)`."""
    return re.sub(r"\((?:[^()]*?/)?((?:builder|safetensors|torch|peft|transformers)/[^()]*|[^()/]+)\)", r"(\1)", frame)


def parse_profile(raw: Path) -> list[tuple[str, list[str], int]]:
    """(thread name, frames root first, sample count); py-spy names a thread on only some of its stacks."""
    parsed, names = [], {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        match = re.match(r"thread \((\d+)\)(?::\s*(.*))?$", frames[0])
        tid = match.group(1) if match else "?"
        if match and match.group(2):
            names[tid] = match.group(2)
        parsed.append((tid, [_short(f) for f in frames[1:]] if match else [_short(f) for f in frames], int(count)))
    return [(names.get(tid, f"thread {tid}"), frames, n) for tid, frames, n in parsed]


def summarize_profile(raw: Path, top: int = 12) -> dict:
    """Wall-clock shares: modelpack functions on the main thread (inclusive), and each thread's leaf frames.

    Shares are of the main thread's samples, i.e. of the build's wall time; a worker thread's row says
    what that thread was doing for that share of the wall time (waits on the other thread included).
    """
    samples = parse_profile(raw)
    wall = sum(n for thread, _, n in samples if thread == "MainThread") or 1
    inclusive: collections.Counter = collections.Counter()
    for thread, frames, n in samples:
        if thread != "MainThread":
            continue
        names = {re.sub(r":\d+\)$", ")", f) for f in frames}
        if any(f.startswith("_find_and_load ") for f in frames[:3]):
            names.add("(imports)")
        for name in names:
            if ("builder/" in name and "builder/cli.py" not in name) or name == "(imports)":
                inclusive[name] += n
    threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for thread, frames, n in samples:
        leaf = frames[-1] if frames else "(no python frame)"
        threads[thread]["waiting on another thread" if WAIT_FRAMES.match(leaf) else leaf] += n
    return {
        "wall_samples": wall,
        "main_thread_inclusive_percent": {k: round(100 * v / wall, 1) for k, v in inclusive.most_common(top)},
        "leaf_percent_by_thread": {
            thread: {k: round(100 * v / wall, 1) for k, v in counter.most_common(top)}
            for thread, counter in sorted(threads.items(), key=lambda item: item[0] != "MainThread")
        },
    }


# --------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------

def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def render_table(results: dict) -> str:
    rows = [("step", "exit s", "+sync s", "peak RSS MiB", "CPU %", "disk read GB", "disk write GB", "others' CPU %")]
    for key, label in (("modelpack", "(a) modelpack build"), ("peft", "(b) peft merge_and_unload"),
                       ("cp", "(c) cp -r base"), ("math_floor", "(d) math floor (fp32 delta+add)"),
                       ("math_floor_reused", "(d') math floor, reused buffers")):
        r = results["steps"].get(key)
        if r is None:
            continue
        rows.append((label, _fmt(r["seconds"]), _fmt(r["seconds"] + r["sync_seconds"]),
                     _fmt(r["max_rss_mb"], ".0f"), _fmt(r["cpu_percent"], ".0f"),
                     _fmt(r["disk_read_gb"], ".2f"), _fmt(r["disk_write_gb"], ".2f"),
                     _fmt(r.get("others_cpu_percent"), ".0f")))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    ratios = results.get("ratios", {})
    for key, text in (("modelpack_over_floor", "modelpack / max(cp, math floor)"),
                      ("modelpack_over_reused_floor", "modelpack / max(cp, math floor with reused buffers)"),
                      ("peft_over_modelpack", "peft / modelpack")):
        if key in ratios:
            r = ratios[key]
            lines.append(f"{text}: {r['exit']:.2f}x (to exit), {r['to_disk']:.2f}x (to disk, +sync)")
    if "modelpack" in results["steps"] and results["steps"]["modelpack"]["max_rss_mb"] is not None:
        peft_rss = f", peft {results['steps']['peft']['max_rss_mb']:.0f} MiB" if "peft" in results["steps"] else ""
        lines.append(f"peak RSS: modelpack {results['steps']['modelpack']['max_rss_mb']:.0f} MiB{peft_rss}")
    if "comparison" in results:
        c = results["comparison"]
        lines.append(f"modelpack vs peft: {c['tensors_differing']} of {c['tensors_compared']} tensors differ"
                     f" (max abs diff {c['max_abs_diff']:g})"
                     + (f"; only in modelpack: {c['only_in_modelpack']}" if c["only_in_modelpack"] else "")
                     + (f"; only in peft: {c['only_in_peft']}" if c["only_in_peft"] else ""))
    lines.append(f"cache: {results['cache']}")
    return "\n".join(lines)


def checkout_medians(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per checkout: the median time to exit and to disk, and of the CPU time (user + system), over its rounds, every
    round's figures and others' CPU, and the ratio of the first checkout's (this one's) medians to its own."""
    medians = {}
    for tree, results in runs.items():
        medians[tree] = {
            "rounds": len(results),
            "median_s": statistics.median(r["seconds"] for r in results),
            "median_to_disk_s": statistics.median(r["seconds"] + r["sync_seconds"] for r in results),
            "seconds": [round(r["seconds"], 2) for r in results],
            "others_cpu_percent": [None if r["others_cpu_percent"] is None else round(r["others_cpu_percent"])
                                   for r in results],
            "max_rss_mb": max((r["max_rss_mb"] or 0) for r in results),
            # CPU time is what a change adds to the work; on a busy machine it moves much less than the wall time.
            "median_cpu_s": statistics.median((r["user_s"] or 0) + (r["system_s"] or 0) for r in results),
            "cpu_s": [round((r["user_s"] or 0) + (r["system_s"] or 0), 1) for r in results],
        }
    this = medians[next(iter(runs))]
    for values in medians.values():
        values["this_over_median"] = this["median_s"] / values["median_s"]
        values["this_over_median_cpu"] = this["median_cpu_s"] / values["median_cpu_s"]
    return medians


def render_checkouts(medians: dict[str, dict]) -> str:
    rows = [("(a) checkout", "rounds", "median exit s", "median +sync s", "runs s", "others' CPU %",
             "median CPU s", "runs CPU s", "peak RSS MiB", "this / it (exit)", "this / it (CPU)")]
    for tree, m in medians.items():
        rows.append((tree, str(m["rounds"]), f"{m['median_s']:.1f}", f"{m['median_to_disk_s']:.1f}",
                     " ".join(f"{x:.1f}" for x in m["seconds"]),
                     " ".join(_fmt(x, ".0f") for x in m["others_cpu_percent"]), f"{m['median_cpu_s']:.1f}",
                     " ".join(f"{x:.1f}" for x in m["cpu_s"]), f"{m['max_rss_mb']:.0f}",
                     f"{m['this_over_median']:.3f}", f"{m['this_over_median_cpu']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_profile(profile: dict) -> str:
    lines = [f"\nprofile of (a) (py-spy --idle --threads, {profile['seconds_under_profiler']} s under the profiler); "
             "% of wall time", "main thread, modelpack functions (inclusive):"]
    lines += [f"  {pct:5.1f}%  {name}" for name, pct in profile["main_thread_inclusive_percent"].items()]
    for thread, leaves in profile["leaf_percent_by_thread"].items():
        lines.append(f"thread {thread}, leaf frames:")
        lines += [f"  {pct:5.1f}%  {name}" for name, pct in leaves.items()]
    return "\n".join(lines)


def ratios_of(steps: dict) -> dict:
    out = {}
    floors = (("modelpack_over_floor", "math_floor"), ("modelpack_over_reused_floor", "math_floor_reused"))
    for key, floor_key in floors:
        if {"modelpack", "cp", floor_key} <= steps.keys():
            mp, cp, floor = steps["modelpack"], steps["cp"], steps[floor_key]
            out[key] = {
                "exit": mp["seconds"] / max(cp["seconds"], floor["seconds"]),
                "to_disk": (mp["seconds"] + mp["sync_seconds"])
                / max(cp["seconds"] + cp["sync_seconds"], floor["seconds"]),
            }
    if {"modelpack", "peft"} <= steps.keys():
        mp, peft = steps["modelpack"], steps["peft"]
        out["peft_over_modelpack"] = {
            "exit": peft["seconds"] / mp["seconds"],
            "to_disk": (peft["seconds"] + peft["sync_seconds"]) / (mp["seconds"] + mp["sync_seconds"]),
        }
    return out


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "safetensors", "modelpack"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    with contextlib.suppress(Exception):
        git = ["git", "-C", str(REPO)]
        out["modelpack_git"] = subprocess.run([*git, "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain", "--", "builder", "templates"],
                                capture_output=True, text=True).stdout
        out["modelpack_uncommitted"] = [line[3:] for line in status.splitlines()]
    out["builder_sources_sha256"] = builder_fingerprint()
    return out


def builder_fingerprint(root: Path = REPO) -> str:
    """sha256 of builder/*.py: the code that ran, since builder/ may carry uncommitted work or change mid-run."""
    digest = hashlib.sha256()
    for path in sorted((root / "builder").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(Exception):
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = model.group(1) if model else None
        mem = re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text())
        info["memory_gib"] = round(int(mem.group(1)) / 2**20, 1)
    return info


# --------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-bench"),
                        help="inputs (cached), outputs and results; must not be inside the repository "
                             "unless under bench/out/ (default: /tmp/modelpack-bench)")
    parser.add_argument("--keep", action="store_true", help="keep the outputs of (a), (b) and (c)")
    parser.add_argument("--steps", default="cdab",
                        help="which steps, in order: c=cp, d=math floor, a=modelpack, b=peft (default cdab)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run (a), (c) and (d) this many times and keep the fastest (peft runs once)")
    parser.add_argument("--cache", choices=["cold", "warm", "auto"], default="auto",
                        help="cold: drop the page cache before each step (needs root); warm: read the base into "
                             "the cache before each step; auto: cold when permitted (default)")
    parser.add_argument("--adapter-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the saved LoRA weights (default float32: what peft saves after a bf16 run, "
                             "since autocast_adapter_dtype keeps LoRA parameters in fp32)")
    parser.add_argument("--profile", action="store_true",
                        help="run (a) under `py-spy record --idle` and summarise where its time goes")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="MINUTES",
                        help="before measuring, wait up to this long for a quiet machine (no other process "
                             "using >10%% of a core, 1-minute load average < 1)")
    parser.add_argument("--modelpack-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for `modelpack build` (repeat for several), e.g. "
                             "--modelpack-arg=--merge-device --modelpack-arg=cuda")
    parser.add_argument("--checkout", type=Path, action="append", default=[], metavar="PATH",
                        help="another checkout's root (e.g. the code before a change), timed in (a) with this one: "
                             "each runs `python -m builder` from its root, first on PYTHONPATH; the trees alternate "
                             "in each of --repeat rounds (ABBA) and the median is reported; repeatable")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    checkouts = [c.resolve() for c in args.checkout]
    trees = [REPO, *checkouts] if checkouts else []
    for tree in trees:
        checkout_package(tree)

    workdir = args.workdir.resolve()
    if REPO in [workdir, *workdir.parents] and (REPO / "bench" / "out") not in [workdir, *workdir.parents]:
        parser.error(f"--workdir {workdir} is inside the repository; use /tmp/... or {REPO / 'bench' / 'out'}")
    workdir.mkdir(parents=True, exist_ok=True)
    # One benchmark at a time per workdir: two would share outputs, and on two cores distort each other's times.
    lock = open(workdir / ".lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another merge_bench run holds {workdir / '.lock'}; waiting for it")
        fcntl.flock(lock, fcntl.LOCK_EX)
    cache = args.cache
    if cache == "auto":
        cache = "cold" if can_drop_caches() else "warm"
    elif cache == "cold" and not can_drop_caches():
        parser.error(f"cannot write {DROP_CACHES} (needs root): use --cache warm")
    log(f"free disk in {workdir}: {shutil.disk_usage(workdir).free / 1e9:.0f} GB; cache mode: {cache}")

    base, adapter = ensure_inputs(workdir, args.size, adapter_dtype=args.adapter_dtype, seed=args.seed)
    if args.wait_idle:
        wait_until_idle(args.wait_idle * 60)
    run_dir = workdir / f"run-{args.size}"
    spec = write_spec(run_dir, base, adapter, args.size)
    outs = {"modelpack": run_dir / "modelpack-out", "peft": run_dir / "peft-out", "cp": run_dir / "cp-out"}
    stat_path = disk_stat_path(workdir)
    cache_note = (
        "cold: `sync; echo 3 > /proc/sys/vm/drop_caches` before every step" if cache == "cold"
        else "warm: the base folder read once into the page cache before every step (drop_caches not permitted)"
    )

    results: dict = {
        "size": args.size, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(), "versions": versions(), "cache": cache_note,
        "inputs": {"base": str(base), "adapter": str(adapter), "base_bytes": folder_bytes(base),
                   "adapter_bytes": (adapter / "adapter_model.safetensors").stat().st_size,
                   "adapter_dtype": args.adapter_dtype, "lora": {"r": LORA_RANK, "alpha": LORA_ALPHA,
                                                                 "target_modules": TARGET_MODULES}},
        "config": SIZES[args.size], "steps": {}, "all_runs": collections.defaultdict(list), "checkouts": {},
    }
    common = dict(stat_path=stat_path)

    def keep_best(key: str, result: StepResult) -> None:
        record = asdict(result)
        results["all_runs"][key].append({
            "seconds": round(result.seconds, 2), "sync_seconds": round(result.sync_seconds, 2),
            "max_rss_mb": result.max_rss_mb, "others_cpu_percent": result.others_cpu_percent,
            "loadavg": result.load_before.get("loadavg"),
        })
        best = results["steps"].get(key)
        if best is None or result.to_disk < best["seconds"] + best["sync_seconds"]:
            results["steps"][key] = record

    for step in args.steps:
        repeats = 1 if step == "b" else max(1, args.repeat)
        for _attempt in range(repeats):
            if step != "d" and not (step == "a" and trees):  # with trees, before each tree's run
                prepare_cache(cache, base)
            if step == "c":
                log("(c) cp -r base")
                result = step_cp(base, outs["cp"], log_file=run_dir / "cp.log", **common)
                shutil.rmtree(outs["cp"])  # only its time matters; free the disk for the other outputs
                keep_best("cp", result)
            elif step == "d":
                log("(d) math floor")
                result = step_math_floor(args.size, seed=args.seed)
                keep_best("math_floor", result)
                log(f"    {result.seconds:.1f} s; (d') the same math into reused buffers")
                result = step_math_floor(args.size, seed=args.seed, reuse_buffers=True)
                keep_best("math_floor_reused", result)
            elif step == "a" and trees:
                # Alternating trees, in reversed order every other round, so that a busy stretch of a shared
                # machine and the disk's drift fall on every tree alike.
                for tree in (trees if _attempt % 2 == 0 else trees[::-1]):
                    # Every tree's build writes into an empty destination: none pays for removing an older bundle,
                    # and the disk holds one output at a time (a 7b one is 15 GB).
                    shutil.rmtree(outs["modelpack"], ignore_errors=True)
                    prepare_cache(cache, base)
                    log(f"(a) modelpack build --no-verify, {tree}")
                    result = step_modelpack(spec, outs["modelpack"], extra_args=args.modelpack_arg, checkout=tree,
                                            log_file=run_dir / "modelpack.log", **common)
                    results["checkouts"].setdefault(str(tree), []).append(asdict(result))
                    if tree == REPO:
                        keep_best("modelpack", result)
                    log(f"    {result.seconds:.1f} s (+{result.sync_seconds:.1f} s sync), others' CPU "
                        f"{_fmt(result.others_cpu_percent, '.0f')}%")
            elif step == "a":
                log("(a) modelpack build --no-verify")
                result = step_modelpack(spec, outs["modelpack"], extra_args=args.modelpack_arg,
                                        log_file=run_dir / "modelpack.log", **common)
                keep_best("modelpack", result)
            elif step == "b":
                log("(b) peft AutoPeftModelForCausalLM -> merge_and_unload -> save_pretrained")
                result = step_peft(adapter, outs["peft"], log_file=run_dir / "peft.log", **common)
                keep_best("peft", result)
            else:
                parser.error(f"unknown step {step!r} in --steps")
            if not (step == "a" and trees):
                log(f"    {result.seconds:.1f} s (+{result.sync_seconds:.1f} s sync), "
                    f"peak RSS {_fmt(result.max_rss_mb, '.0f')} MiB")

    if args.profile:
        # A separate run: sampling slows the build and hides its RSS behind py-spy's, so report where the
        # time goes, never this run's time or memory.
        prepare_cache(cache, base)
        log("(a) again, under py-spy record --idle")
        profile = run_dir / "modelpack-profile.txt"
        profiled = step_modelpack(spec, outs["modelpack"], profile=profile, extra_args=args.modelpack_arg,
                                  log_file=run_dir / "modelpack-profiled.log", **common)
        results["profile"] = {"raw": str(profile), "seconds_under_profiler": round(profiled.seconds, 1),
                              **summarize_profile(profile)}

    if outs["modelpack"].exists() and outs["peft"].exists():
        log("comparing (a) and (b) tensor by tensor")
        started = time.perf_counter()
        results["comparison"] = compare_models(outs["modelpack"], outs["peft"])
        results["comparison"]["seconds"] = round(time.perf_counter() - started, 1)
    results["ratios"] = ratios_of(results["steps"])
    if results["checkouts"]:
        results["checkout_medians"] = checkout_medians(results["checkouts"])
    results["load_after"] = machine_load()
    if not args.keep:
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)

    table = render_table(results)
    if "checkout_medians" in results:
        table += "\n\n" + render_checkouts(results["checkout_medians"])
    print(f"\nmerge benchmark, Qwen2 {args.size} (bf16 base {results['inputs']['base_bytes'] / 1e9:.2f} GB, "
          f"LoRA r={LORA_RANK} on {len(TARGET_MODULES)} projections, {args.adapter_dtype} adapter)")
    print(table)
    if "profile" in results:
        print(render_profile(results["profile"]))
    results_dir = workdir / "results"
    results_dir.mkdir(exist_ok=True)
    out_json = results_dir / f"merge-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_json.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nresults: {out_json}")
    comparison = results.get("comparison")
    return 1 if comparison and (comparison["tensors_differing"] or comparison["only_in_modelpack"]
                                or comparison["only_in_peft"]) else 0


if __name__ == "__main__":
    sys.exit(main())
