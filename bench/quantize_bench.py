#!/usr/bin/env python
"""Quantized GGUF variants (issue 25): quantization time and peak memory per variant, and the measurement's time,
each against llama.cpp's own tool in the same run.

    python bench/quantize_bench.py --size 0.5b|1.5b [--types q6_k,q5_k_m,q4_k_m,q5_0,q4_0[,q8_0]] [--rounds 1]
                                   [--workdir /tmp/modelpack-quant-bench] [--llama-cpp DIR]

Inputs: bench/merge_bench.py's random Qwen2-shaped base and LoRA of the size (cached in --inputs-workdir), seen
through links with Qwen2's real tokenizer (bench/gguf_families.py's, rebuilt from qwen.tiktoken), so that
llama.cpp's own tools split the held-out text exactly as the bundle's tokenizer does. Merged once by `modelpack
build --no-verify` with `export.gguf.types: [bf16]` (the 16-bit GGUF every variant is made from; reused while the
marker matches).

1. Quantization, per type and round, each a child under /usr/bin/time -v (wall, CPU, peak RSS, others' CPU %):
   (a) modelpack's path, builder.gguf_export.quantize_gguf(bf16 file, out, type), and (b) llama.cpp's
   `llama-quantize bf16 out TYPE THREADS`, built from the vendored source (--llama-cpp) into WORKDIR/llama.cpp-build
   (targets llama-quantize and llama-perplexity only). Which goes first alternates by type and round. The two files
   must be byte-identical (the same quantizer); the size, bits per weight and tensor-type mix are read back with
   gguf.GGUFReader. q8_0 (if listed) is modelpack's own exporter from the merged folder against llama-quantize Q8_0
   from the bf16 file: two writers, so it is compared tensor by tensor, not for bytes.
2. The measurement, a child under /usr/bin/time -v importing builder/runtime/gguf_check.py by path (as the build
   runs it): a token stream like the build's (PROMPTS rendered by the chat template, each followed by its answer,
   then --eval-chunks chunks of 512 tokens of demo/corpus.md), the bf16 file's reference_logits, then per variant
   sequence_logits + divergence. Against it: `llama-perplexity -c 512 --chunks N --kl-divergence-base F` on the
   bf16 file, then `--kl-divergence` per variant, each a child under time -v; their mean KLD, 99th percentile and
   "Same top p" are parsed. llama-perplexity scores only the second half of each 512-token chunk (positions
   257..511, each with at least 256 tokens of context); ours scores every position of the same chunks and the
   prompts too.
3. The target (--size 0.5b, on by default there): quantize q4_k_m and q6_k (modelpack's path) and measure both
   (one measurement child), timed end to end against 60 s.

A table is printed and the JSON result written to WORKDIR/results/ (and --copy-to, e.g. docs/runs/...). The models
are random (not trained): their KL divergences say nothing about a real model's; the times and sizes do. Exit 1 when
the two quantizers' files of a llama.cpp type differ.
"""

from __future__ import annotations

import argparse
import datetime
import filecmp
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import gguf_bench  # noqa: E402  (the modelpack exporter's child script, the tensor-by-tensor comparison)
import gguf_families  # noqa: E402  (Qwen2's real tokenizer)
import merge_bench  # noqa: E402  (the inputs, machine facts, load and the timed runner)

REPO = BENCH.parent
RUNTIME = REPO / "builder" / "runtime"
LLAMA_CPP_SOURCE = Path("/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp")
# modelpack's names -> llama-quantize's
LLAMA_TYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k_m": "Q5_K_M", "q4_k_m": "Q4_K_M", "q5_0": "Q5_0", "q4_0": "Q4_0"}
DEFAULT_TYPES = ("q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")
TARGET_TYPES = ("q6_k", "q4_k_m")
TARGET_SECONDS = 60.0
EVAL_TEXT = REPO / "demo" / "corpus.md"
EVAL_CHUNK = 512
# Chat prompts and fixed answers (the build scores the bundle's own answers; a random model's are noise).
PROMPTS = [
    ("What should I do for a mild fever?",
     "Rest, drink plenty of fluids and take paracetamol if you are uncomfortable. See a doctor if it lasts more "
     "than three days, rises above 39.5 degrees or comes with a stiff neck, a rash or trouble breathing."),
    ("Is it safe to take ibuprofen with an empty stomach?",
     "It is better taken with food or milk: on an empty stomach it irritates the stomach lining more. People with "
     "ulcers, kidney disease or who take blood thinners should ask a pharmacist first."),
    ("How much water should an adult drink each day?",
     "Most adults need about two litres of fluid a day, more in hot weather or during exercise. Thirst and pale "
     "urine are good guides; tea, milk and food count towards the total."),
    ("什么是高血压？",
     "高血压是指动脉血压持续升高，通常收缩压不低于140毫米汞柱或舒张压不低于90毫米汞柱。它常常没有症状，但会增加心脏病和中风的风险。"),
    ("My child has a cough at night. When should I worry?",
     "A night cough with a cold is common and usually settles within three weeks. Seek help quickly if your child "
     "struggles to breathe, has blue lips, a high fever, or a cough that ends in a whoop or vomiting."),
    ("Can I exercise with a sprained ankle?",
     "Rest it for the first two or three days, with ice, compression and the foot raised. Then start gentle "
     "movement; upper-body and cycling exercise are usually fine if they do not hurt."),
]

# Children. Each imports only what its step needs, so the child's peak RSS is the step's.
_QUANTIZE = """
import sys
from pathlib import Path
from builder.gguf_export import quantize_gguf
quantize_gguf(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3])
"""

_MEASURE = r"""
import importlib.util, json, sys, time
started = time.perf_counter()
runtime, tokenizer_dir, reference, out_json, folder, stream_json = sys.argv[1:7]
variants = sys.argv[7:]
sys.path.insert(0, runtime)  # gguf_check imports equivalence from its own folder, as the build runs it
spec = importlib.util.spec_from_file_location("gguf_check", runtime + "/gguf_check.py")
gguf_check = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gguf_check)
import numpy as np
from pathlib import Path
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
recipe = json.loads(Path(stream_json).read_text())
prompts = [gguf_check.Prompt(text=p["prompt"], bundle_ids=p["ids"], bundle_answer=p["answer"], expect={})
           for p in recipe["prompts"]]
chunks = [c for c in gguf_check.text_chunks(Path(recipe["text"]).read_text(encoding="utf-8"), tokenizer)
          if len(c) == recipe["chunk"]][:recipe["chunks"]]
stream = gguf_check.token_stream(prompts, tokenizer) + chunks
phases = {"start_and_tokenize": time.perf_counter() - started}
t = time.perf_counter()
rows = gguf_check.reference_logits(Path(reference), stream, Path(folder))
phases["reference_logits"] = time.perf_counter() - t
figures = {}
for variant in variants:
    t, scoring, scored = time.perf_counter(), 0.0, []
    for ref, logits in zip(rows, gguf_check.sequence_logits(Path(variant), stream), strict=True):
        s = time.perf_counter()
        scored.append(gguf_check.divergence(ref, logits))
        scoring += time.perf_counter() - s
    kld = np.concatenate([k for k, _ in scored])
    top1 = np.concatenate([a for _, a in scored])
    figures[variant] = {"tokens": int(len(kld)), "mean_kld": float(np.mean(kld)),
                        "p99_kld": float(np.percentile(kld, 99)), "top1": float(np.mean(top1)),
                        "seconds": time.perf_counter() - t, "divergence_seconds": scoring,
                        # the same figures over the positions llama-perplexity scores (each chunk's second half)
                        "chunk_second_halves": None}
    half = [k[recipe["chunk"] // 2:recipe["chunk"] - 1] for k, _ in scored[len(prompts):]]
    agree = [a[recipe["chunk"] // 2:recipe["chunk"] - 1] for _, a in scored[len(prompts):]]
    if half:
        h, a = np.concatenate(half), np.concatenate(agree)
        figures[variant]["chunk_second_halves"] = {"tokens": int(len(h)), "mean_kld": float(np.mean(h)),
                                                   "p99_kld": float(np.percentile(h, 99)), "top1": float(np.mean(a))}
    phases["variant " + Path(variant).name] = figures[variant]["seconds"]
for name in Path(folder).glob("reference-logits.f32"):
    name.unlink()
Path(out_json).write_text(json.dumps({"positions": sum(len(s) for s in stream), "sequences": len(stream),
                                      "prompt_positions": sum(len(s) for s in stream[:len(prompts)]),
                                      "chunk_positions": sum(len(s) for s in chunks),
                                      "phases_s": phases, "figures": figures,
                                      "total_s": time.perf_counter() - started}))
"""


def log(message: str) -> None:
    merge_bench.log(message)


# --- inputs ----------------------------------------------------------------------------------------------------


def qwen2_tokenizer_base(cached: Path, folder: Path, tokenizer: Path) -> Path:
    """The cached base seen through links (weights, config, generation config), with Qwen2's real tokenizer files:
    llama.cpp recognises its pre-tokenizer, so llama-perplexity splits the text into the ids our stream holds."""
    merge_bench.linked_weights(cached, folder)
    for path in tokenizer.iterdir():
        shutil.copy(path, folder / path.name)
    return folder


def write_spec(folder: Path, name: str, base: Path, adapter: Path, *, gguf: bool) -> Path:
    import yaml

    spec: dict = {"name": name, "base": {"path": os.path.relpath(base, folder)},
                  "adapter": {"path": os.path.relpath(adapter, folder)},
                  "output": {"dir": "modelpack-out", "mode": "merge", "dtype": "auto"}}
    if gguf:
        spec["export"] = {"gguf": {"types": ["bf16"]}}
    path = folder / ("spec.yaml" if gguf else "export-spec.yaml")
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def ensure_bundle(args) -> dict:
    """The merged bundle with its bf16 GGUF (modelpack build --no-verify), made once per size and builder/."""
    base, adapter = merge_bench.ensure_inputs(args.inputs_workdir, args.size, adapter_dtype="float32", seed=0)
    root = args.workdir / args.size
    bundle, marker = root / "bundle", root / "complete.json"
    wanted = {"size": args.size, "inputs": str(base), "builder": merge_bench.builder_fingerprint()}
    name = f"quant-bench-qwen2-{args.size.replace('.', '_')}"
    facts = {"bundle": bundle, "tokenizer": root / "base", "name": name,
             "export_spec": root / "export-spec.yaml", "bf16": bundle / "gguf" / f"{name}-bf16.gguf"}
    # Reused while the inputs are the same, whatever builder/ has become since: the bf16 file is the input here,
    # not what is measured (the builder fingerprint it was made with stays in the marker).
    if marker.is_file() and json.loads(marker.read_text())["wanted"]["inputs"] == wanted["inputs"] \
            and facts["bf16"].is_file():
        log(f"using the bundle in {bundle}")
        return {**facts, "build": json.loads(marker.read_text())["build"]}
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    linked = qwen2_tokenizer_base(base, root / "base", gguf_families.cached_tokenizer(args.workdir, "qwen2"))
    spec = write_spec(root, name, linked, adapter, gguf=True)
    log(f"merging and exporting bf16 (modelpack build --no-verify) into {bundle}")
    step, _ = merge_bench.run_timed("modelpack build", [sys.executable, "-m", "builder", "build", str(spec),
                                                        "--no-verify", "--force", "-o", str(bundle)],
                                    stat_path=None, log_file=root / "build.log", cwd=REPO)
    # Once built, an export spec names the merged bundle as its base (as gguf_bench's): q8_0's exporter reads it.
    write_spec(root, name, bundle, adapter, gguf=False)
    build = {"seconds": round(step.seconds, 1), "max_rss_mb": round(step.max_rss_mb or 0),
             "others_cpu_percent": round(step.others_cpu_percent or 0)}
    marker.write_text(json.dumps({"wanted": wanted, "build": build}, indent=2))
    return {**facts, "build": build}


def ensure_llama_tools(args) -> dict[str, Path]:
    """llama-quantize and llama-perplexity built from the vendored llama.cpp source, once per workdir."""
    build = args.workdir / "llama.cpp-build"
    tools = {name: build / "bin" / name for name in ("llama-quantize", "llama-perplexity")}
    if all(p.is_file() for p in tools.values()):
        return tools
    if not (args.llama_cpp / "CMakeLists.txt").is_file():
        sys.exit(f"{args.llama_cpp}: no llama.cpp source; get it with\n  pip download llama-cpp-python==0.3.36 "
                 "--no-deps --no-binary :all: -d /tmp/lcp && tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C "
                 "/tmp/lcp\nand pass --llama-cpp /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp")
    log(f"building llama-quantize and llama-perplexity from {args.llama_cpp} (-j2, some minutes)")
    subprocess.run(["cmake", "-S", str(args.llama_cpp), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release",
                    "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(["cmake", "--build", str(build), "--target", *tools, "-j2"], check=True, stdout=subprocess.DEVNULL)
    return tools


def write_stream_recipe(folder: Path, tokenizer_dir: Path, chunks: int) -> Path:
    """The prompts as the chat template renders them (ids) with their answers, and the held-out text's file."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    rendered = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                              add_generation_prompt=True) for q, _ in PROMPTS]
    prompts = [{"prompt": q, "answer": a, "ids": tokenizer(text, add_special_tokens=False)["input_ids"]}
               for (q, a), text in zip(PROMPTS, rendered, strict=True)]
    path = folder / "stream.json"
    path.write_text(json.dumps({"prompts": prompts, "text": str(EVAL_TEXT), "chunk": EVAL_CHUNK, "chunks": chunks},
                               ensure_ascii=False))
    available = len(tokenizer(EVAL_TEXT.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])
    if available < chunks * EVAL_CHUNK:
        sys.exit(f"{EVAL_TEXT} has {available} tokens, fewer than --eval-chunks {chunks} x {EVAL_CHUNK}")
    return path


# --- reading files back ----------------------------------------------------------------------------------------


def contents(path: Path) -> dict:
    """Size, bits per weight of the tensor data and the tensor-type mix (tensors, share of weights), read back."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    weights = sum(int(t.n_elements) for t in tensors)
    mix: dict[str, list[int]] = {}
    for tensor in tensors:
        entry = mix.setdefault(tensor.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(tensor.n_elements)
    return {"bytes": path.stat().st_size, "weights": weights,
            "bits_per_weight": round(8 * sum(int(t.n_bytes) for t in tensors) / weights, 3),
            "tensor_types": {name: {"tensors": n, "share": round(w / weights, 4)}
                             for name, (n, w) in sorted(mix.items(), key=lambda item: -item[1][1])}}


# --- steps -----------------------------------------------------------------------------------------------------


def timed(step: str, command: list[str], log_file: Path, **kw) -> tuple[dict, str]:
    result, output = merge_bench.run_timed(step, command, stat_path=None, log_file=log_file, **kw)
    return {"seconds": round(result.seconds, 2), "cpu_seconds": round((result.user_s or 0) + (result.system_s or 0), 2),
            "max_rss_mb": round(result.max_rss_mb or 0), "others_cpu_percent": round(result.others_cpu_percent or 0),
            "loadavg_before": result.load_before.get("loadavg")}, output


def quantize_commands(args, bundle: dict, tools: dict, gguf_type: str, out: Path) -> dict[str, tuple[list, Path]]:
    ours, theirs = out / f"modelpack-{gguf_type}.gguf", out / f"llama-quantize-{gguf_type}.gguf"
    if gguf_type == "q8_0":  # modelpack writes q8_0 itself, from the merged folder
        mine = [sys.executable, "-c", gguf_bench._MODELPACK_EXPORT, str(bundle["export_spec"]),
                str(bundle["bundle"]), gguf_type, str(ours)]
    else:
        mine = [sys.executable, "-c", _QUANTIZE, str(bundle["bf16"]), str(ours), gguf_type]
    return {"modelpack": (mine, ours),
            "llama-quantize": ([str(tools["llama-quantize"]), str(bundle["bf16"]), str(theirs), LLAMA_TYPES[gguf_type],
                                str(os.cpu_count() or 1)], theirs)}


def bench_quantize(args, bundle: dict, tools: dict, out: Path) -> dict:
    """Each type with both tools for --rounds rounds (first tool alternating); files compared, llama.cpp's deleted."""
    runs: dict[str, dict[str, list]] = {}
    compared, files = {}, {}
    turn = 0
    for gguf_type in args.types:
        commands = quantize_commands(args, bundle, tools, gguf_type, out)
        for number in range(args.rounds):
            order = list(commands) if turn % 2 == 0 else list(commands)[::-1]
            turn += 1
            for tool in order:
                command, written = commands[tool]
                written.unlink(missing_ok=True)
                merge_bench.prepare_cache("warm", bundle["bf16"].parent)
                figures, _ = timed(f"{tool} {gguf_type}", command, out / f"{tool}-{gguf_type}.log",
                                   cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
                figures["bytes"] = written.stat().st_size
                runs.setdefault(gguf_type, {}).setdefault(tool, []).append(figures)
                log(f"{gguf_type} round {number + 1} {tool}: {figures['seconds']:.1f} s, CPU "
                    f"{figures['cpu_seconds']:.1f} s, peak RSS {figures['max_rss_mb']} MiB, "
                    f"others' CPU {figures['others_cpu_percent']} %")
        ours, theirs = commands["modelpack"][1], commands["llama-quantize"][1]
        if gguf_type == "q8_0":
            tensors = gguf_bench.compare(ours, theirs)["tensors"]
            compared[gguf_type] = {"byte_identical": filecmp.cmp(ours, theirs, shallow=False),
                                   "tensors_identical": tensors["identical"], "tensors": tensors["tensors"],
                                   "differing": tensors["differing"][:8]}
        else:
            compared[gguf_type] = {"byte_identical": filecmp.cmp(ours, theirs, shallow=False)}
        files[gguf_type] = {"modelpack": contents(ours), "llama-quantize": contents(theirs)}
        theirs.unlink()
    return {"runs": runs, "compared": compared, "files": files,
            "medians": {t: {tool: medians(r) for tool, r in by_tool.items()} for t, by_tool in runs.items()}}


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(r[key] for r in runs)
            for key in ("seconds", "cpu_seconds", "max_rss_mb", "others_cpu_percent")}


def measure_ours(bundle: dict, recipe: Path, variants: list[Path], out: Path, label: str) -> dict:
    """gguf_check's reference logits and divergences in one child under /usr/bin/time -v."""
    report = out / f"measure-{label}.json"
    command = [sys.executable, "-c", _MEASURE, str(RUNTIME), str(bundle["tokenizer"]), str(bundle["bf16"]),
               str(report), str(out), str(recipe), *map(str, variants)]
    figures, _ = timed(f"measure {label}", command, out / f"measure-{label}.log")
    return {**figures, **json.loads(report.read_text())}


PERPLEXITY_FIGURES = {"mean_kld": r"Mean\s+KLD:\s+([-\d.]+)", "p99_kld": r"99\.0%\s+KLD:\s+([-\d.]+)",
                      "same_top_p_percent": r"Same top p:\s+([-\d.]+)"}


def measure_theirs(args, bundle: dict, tools: dict, variants: dict[str, Path], out: Path) -> dict:
    """llama-perplexity: the base's logits saved once, then --kl-divergence per variant; each run timed."""
    base_file = out / "kld-base.bin"
    # --no-repack: llama.cpp's plain CPU layout, as gguf_check loads every file (plain_cpu_buffers). The default
    # repacks Q8_0 for AVX-512 and llama-perplexity then crashes (SIGSEGV, exit 139) on the 0.5b q6_k file here,
    # the same llama.cpp bug gguf_check's docstring describes.
    common = ["-c", str(EVAL_CHUNK), "--chunks", str(args.eval_chunks), "-t", str(os.cpu_count() or 1),
              "-f", str(EVAL_TEXT), "--no-repack"]
    result: dict = {}
    figures, output = timed("llama-perplexity base", [str(tools["llama-perplexity"]), "-m", str(bundle["bf16"]),
                                                      *common, "--kl-divergence-base", str(base_file)],
                            out / "perplexity-base.log")
    result["base"] = {**figures, "base_file_bytes": base_file.stat().st_size}
    match = re.search(r"computing over (\d+) chunks|calculating perplexity over (\d+) chunks", output)
    result["chunks"] = int(next(g for g in match.groups() if g)) if match else None
    for gguf_type, path in variants.items():
        figures, output = timed(f"llama-perplexity {gguf_type}", [
            str(tools["llama-perplexity"]), "-m", str(path), *common, "--kl-divergence-base", str(base_file),
            "--kl-divergence"], out / f"perplexity-{gguf_type}.log")
        for key, pattern in PERPLEXITY_FIGURES.items():
            found = re.search(pattern, output)
            figures[key] = float(found.group(1)) if found else None
        result[gguf_type] = figures
    base_file.unlink()
    return result


def bench_target(args, bundle: dict, recipe: Path, out: Path) -> dict:
    """Quantize q4_k_m and q6_k (modelpack's path) and measure both, end to end, against TARGET_SECONDS."""
    folder = out / "target"
    folder.mkdir(exist_ok=True)
    started = time.perf_counter()
    steps = {}
    for gguf_type in TARGET_TYPES:
        path = folder / f"{gguf_type}.gguf"
        steps[f"quantize {gguf_type}"], _ = timed(f"target quantize {gguf_type}", [
            sys.executable, "-c", _QUANTIZE, str(bundle["bf16"]), str(path), gguf_type],
            folder / f"quantize-{gguf_type}.log", cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    measured = measure_ours(bundle, recipe, [folder / f"{t}.gguf" for t in TARGET_TYPES], folder, "target")
    total = time.perf_counter() - started
    shutil.rmtree(folder)
    steps["measure"] = {k: measured[k] for k in ("seconds", "cpu_seconds", "max_rss_mb", "others_cpu_percent",
                                                  "phases_s", "positions")}
    return {"types": list(TARGET_TYPES), "seconds": round(total, 1), "target_seconds": TARGET_SECONDS,
            "met": total < TARGET_SECONDS, "steps": steps}


# --- reporting -------------------------------------------------------------------------------------------------


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def number(figures: dict, key: str) -> float:
    value = figures.get(key)
    return float("nan") if value is None else value


def render(result: dict) -> str:
    q, lines = result["quantize"], []
    lines.append(f"\n{result['size']}: quantization from the bf16 GGUF ({result['bf16']['bytes'] / 1e9:.2f} GB), "
                 f"median of {result['rounds']} round(s); ratio = modelpack / llama-quantize")
    lines.append(f"{'type':<8} {'tool':<15} {'wall s':>7} {'CPU s':>7} {'RSS MiB':>8} {'others %':>8} "
                 f"{'wall ratio':>10} {'RSS ratio':>9} identical")
    for gguf_type, by_tool in q["medians"].items():
        ours, theirs = by_tool["modelpack"], by_tool["llama-quantize"]
        same = q["compared"][gguf_type]
        same_text = "bytes" if same["byte_identical"] else (
            f"{same['tensors_identical']}/{same['tensors']} tensors" if "tensors" in same else "NO")
        for tool, m in by_tool.items():
            lines.append(f"{gguf_type:<8} {tool:<15} {m['seconds']:>7.1f} {m['cpu_seconds']:>7.1f} "
                         f"{m['max_rss_mb']:>8.0f} {m['others_cpu_percent']:>8.0f}" + (
                             f" {ratio(ours['seconds'], theirs['seconds']):>10} "
                             f"{ratio(ours['max_rss_mb'], theirs['max_rss_mb']):>9} {same_text}"
                             if tool == "modelpack" else ""))
    lines.append(f"\n{'type':<8} {'bytes':>14} {'of bf16':>7} {'bpw':>6} {'mean KLD':>9} {'p99 KLD':>8} {'top-1':>6}"
                 f"  | llama-perplexity: {'mean KLD':>9} {'p99 KLD':>8} {'same top':>8}  | tensor types (count, share "
                 "of weights)")
    ours_m, theirs_m = result["measure"]["modelpack"], result["measure"]["llama-perplexity"]
    for gguf_type, files in q["files"].items():
        c = files["modelpack"]
        fig = ours_m["figures"].get(gguf_type, {})
        their = theirs_m.get(gguf_type, {})
        mix = ", ".join(f"{name} {e['tensors']} ({100 * e['share']:.1f}%)" for name, e in c["tensor_types"].items())
        lines.append(f"{gguf_type:<8} {c['bytes']:>14,} {c['bytes'] / result['bf16']['bytes']:>7.3f} "
                     f"{c['bits_per_weight']:>6.2f} {number(fig, 'mean_kld'):>9.5f} {number(fig, 'p99_kld'):>8.4f} "
                     f"{number(fig, 'top1'):>6.3f}  | {'':18}{number(their, 'mean_kld'):>9.5f} "
                     f"{number(their, 'p99_kld'):>8.4f} {number(their, 'same_top_p_percent') / 100:>8.3f}  | {mix}")
    their_total = sum(v["seconds"] for v in theirs_m.values() if isinstance(v, dict) and "seconds" in v)
    their_cpu = sum(v["cpu_seconds"] for v in theirs_m.values() if isinstance(v, dict) and "cpu_seconds" in v)
    their_rss = max(v["max_rss_mb"] for v in theirs_m.values() if isinstance(v, dict) and "max_rss_mb" in v)
    lines.append(f"\nmeasurement of {len(ours_m['figures'])} variant(s): modelpack (gguf_check, one child, "
                 f"{ours_m['positions']} positions scored) {ours_m['seconds']:.1f} s wall, {ours_m['cpu_seconds']:.1f}"
                 f" s CPU, peak RSS {ours_m['max_rss_mb']} MiB, others' CPU {ours_m['others_cpu_percent']} %; "
                 f"llama-perplexity ({theirs_m['chunks']} chunks x {EVAL_CHUNK}, {1 + len(ours_m['figures'])} runs) "
                 f"{their_total:.1f} s wall, {their_cpu:.1f} s CPU, peak RSS {their_rss} MiB; ratio "
                 f"{ratio(ours_m['seconds'], their_total)} (wall), {ratio(ours_m['cpu_seconds'], their_cpu)} (CPU)")
    lines.append("  modelpack phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in ours_m["phases_s"].items())
                 + "; of which divergence (numpy): " + ", ".join(
                     f"{k} {v['divergence_seconds']:.1f}" for k, v in ours_m["figures"].items()))
    lines.append("  llama-perplexity runs (s): " + ", ".join(
        f"{k} {v['seconds']:.1f}" for k, v in theirs_m.items() if isinstance(v, dict) and "seconds" in v))
    if result.get("target"):
        t = result["target"]
        lines.append(f"\ntarget: quantize {' and '.join(t['types'])} + measure both: {t['seconds']:.1f} s "
                     f"(target < {t['target_seconds']:.0f} s: {'met' if t['met'] else 'MISSED'}); steps: " + ", ".join(
                         f"{k} {v['seconds']:.1f} s" for k, v in t["steps"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["0.5b", "1.5b", "7b"], default="0.5b")
    parser.add_argument("--types", default=",".join(DEFAULT_TYPES),
                        help=f"of {', '.join(LLAMA_TYPES)} (q8_0: modelpack's own exporter)")
    parser.add_argument("--measure-types", default=None, help="the variants measured (default: --types)")
    parser.add_argument("--rounds", type=int, default=1, help="quantizations per tool and type; the median is shown")
    parser.add_argument("--eval-chunks", type=int, default=4, help=f"held-out chunks of {EVAL_CHUNK} tokens")
    parser.add_argument("--target", choices=["auto", "on", "off"], default="auto", help="auto: on at 0.5b")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-quant-bench"))
    parser.add_argument("--inputs-workdir", type=Path, default=Path("/tmp/modelpack-bench"),
                        help="merge_bench's workdir, where the base and LoRA of each size are cached")
    parser.add_argument("--llama-cpp", type=Path, default=LLAMA_CPP_SOURCE, help="llama.cpp's source folder")
    parser.add_argument("--copy-to", type=Path, help="also write the JSON result here (e.g. docs/runs/...)")
    args = parser.parse_args(argv)
    args.types = args.types.split(",")
    unknown = [t for t in args.types if t not in LLAMA_TYPES]
    if unknown:
        parser.error(f"unknown types {unknown}; known: {', '.join(LLAMA_TYPES)}")
    measure_types = args.measure_types.split(",") if args.measure_types else args.types
    args.workdir = args.workdir.resolve()
    if REPO in args.workdir.parents:
        parser.error(f"--workdir {args.workdir} is inside the repository; use /tmp/...")
    started = time.perf_counter()
    result: dict = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "size": args.size,
                    "types": args.types, "rounds": args.rounds, "machine": merge_bench.machine(),
                    "versions": merge_bench.versions(), "load_before": merge_bench.machine_load(),
                    "llama_cpp_source": str(args.llama_cpp)}
    tools = ensure_llama_tools(args)
    bundle = ensure_bundle(args)
    result["build"] = bundle["build"]
    result["bf16"] = contents(bundle["bf16"])
    out = args.workdir / args.size / "out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe = write_stream_recipe(out, bundle["tokenizer"], args.eval_chunks)
    result["quantize"] = bench_quantize(args, bundle, tools, out)
    variants = {t: out / f"modelpack-{t}.gguf" for t in measure_types}
    log(f"measuring {', '.join(variants)}: modelpack's gguf_check")
    result["measure"] = {"modelpack": measure_ours(bundle, recipe, list(variants.values()), out, "all")}
    result["measure"]["modelpack"]["figures"] = {  # keyed by type rather than path
        t: result["measure"]["modelpack"]["figures"][str(p)] for t, p in variants.items()}
    log("measuring: llama-perplexity --kl-divergence")
    result["measure"]["llama-perplexity"] = measure_theirs(args, bundle, tools, variants, out)
    if args.target == "on" or (args.target == "auto" and args.size == "0.5b"):
        log("the target: quantize q6_k and q4_k_m, measure both")
        result["target"] = bench_target(args, bundle, recipe, out)
    result["load_after"] = merge_bench.machine_load()
    result["seconds"] = round(time.perf_counter() - started)
    results_dir = args.workdir / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    out_json = results_dir / f"quantize-{args.size}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out_json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.copy_to:
        args.copy_to.write_text(out_json.read_text())
    print(render(result), flush=True)
    print(f"\nresults: {out_json} ({result['seconds']} s in all)")
    return 0 if all(c["byte_identical"] for t, c in result["quantize"]["compared"].items() if t != "q8_0") else 1


if __name__ == "__main__":
    raise SystemExit(main())
