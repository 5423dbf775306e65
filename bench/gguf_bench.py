#!/usr/bin/env python
"""GGUF export benchmark: modelpack's exporter vs llama.cpp's own convert_hf_to_gguf.py on the same merged folder.

    python bench/gguf_bench.py --converter DIR [--converter-python PY] [--size 1.5b] [--types bf16,q8_0]

DIR is llama.cpp's source folder, as the llama-cpp-python sdist ships it:
    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcp-sdist
    tar xzf /tmp/lcp-sdist/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp-sdist
    --converter /tmp/lcp-sdist/llama_cpp_python-0.3.36/vendor/llama.cpp
(the converter imports its own gguf-py from there, whatever gguf version is installed). The converter also needs
sentencepiece, which modelpack does not: give it an interpreter that has it, e.g.
    python -m venv --system-site-packages /tmp/lcp-venv && /tmp/lcp-venv/bin/pip install sentencepiece
    --converter-python /tmp/lcp-venv/bin/python

The base is merge_bench.py's random bfloat16 Qwen2 of the real size (cached in the workdir), linked into a folder
with a real-sized Qwen2 tokenizer: Qwen's 151,643 BPE ranks (qwen.tiktoken, from the dashscope package) with merges
rebuilt and Qwen2's pre-tokenizer, so the converter recognises it (its pre-tokenizer hash says "qwen2") and both
exporters write the same 152k-token vocabulary. modelpack builds the merged bundle once (no export); then, one after
another, each exporter writes each type from that folder in a subprocess under /usr/bin/time -v (wall time, peak
RSS). Finally the two files of each type are compared tensor by tensor (GGUFReader) and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import merge_bench  # noqa: E402  (the generated base, machine facts and the timed runner)

REPO = BENCH.parent
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_qwen2_tokenizer(folder: Path) -> None:
    """Qwen2's tokenizer rebuilt from qwen.tiktoken: byte-level vocabulary, merges, Split + ByteLevel, ChatML."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from builder.gguf_export import read_tiktoken_ranks, vocabulary_from_tiktoken
    from builder.gguf_facts import SPLIT_PRE_TOKENIZERS

    sys.path.insert(0, str(REPO / "tests"))
    from fixtures.qwen_v1.make_qwen_v1 import find_qwen_tiktoken

    ranks = read_tiktoken_ranks(find_qwen_tiktoken())
    vocabulary = vocabulary_from_tiktoken(ranks, len(ranks))
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(vocabulary.tokens)},
                                     [tuple(m.split(" ")) for m in vocabulary.merges]))
    pattern = next(p for p, name in SPLIT_PRE_TOKENIZERS.items() if name == "qwen2")
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIALS)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                            chat_template=merge_bench.CHATML_TEMPLATE).save_pretrained(folder)


def ensure_merged(workdir: Path, size: str) -> Path:
    """The merged bundle (modelpack build --no-verify) of the cached base with a Qwen2 tokenizer; made once."""
    root = workdir / "gguf" / f"qwen2-{size}"
    merged, marker = root / "merged", root / "complete.json"
    if marker.is_file():
        return merged
    base_cache, adapter = merge_bench.ensure_inputs(workdir, size, adapter_dtype="float32", seed=0)
    base = root / "base"
    base.mkdir(parents=True, exist_ok=True)
    for path in base_cache.iterdir():  # the weights are hard links: no second copy of gigabytes
        if path.suffix in (".safetensors", ".json") and not path.name.startswith("tokenizer"):
            if not (base / path.name).exists():
                os.link(path, base / path.name)
    write_qwen2_tokenizer(base)
    config = json.loads((base / "config.json").read_text())
    config.update(bos_token_id=151643, eos_token_id=151645)
    (base / "config.json").unlink()  # a hard link to the cache: replaced, not written through
    (base / "config.json").write_text(json.dumps(config, indent=2))
    spec = merge_bench.write_spec(root, base, adapter, size)
    merge_bench.log(f"building the merged bundle in {merged}")
    subprocess.run([*merge_bench.modelpack_command(), "build", str(spec), "--no-verify", "--force", "-o",
                    str(merged)], check=True)
    marker.write_text("{}")
    return merged


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


def compare(left: Path, right: Path) -> dict:
    """Tensor by tensor, bytes and types, and the tokenizer arrays of two GGUF files."""
    import gguf
    import numpy as np

    a, b = gguf.GGUFReader(left), gguf.GGUFReader(right)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    differing = [n for n in ta if n not in tb or ta[n].tensor_type != tb[n].tensor_type
                 or not np.array_equal(np.asarray(ta[n].data), np.asarray(tb[n].data))]
    fields = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.pre")
    return {
        "tensors": len(ta), "tensors_differing": differing + sorted(set(tb) - set(ta)),
        "tokenizer_fields_differing": [f for f in fields if a.fields[f].contents() != b.fields[f].contents()],
        "keys_only_modelpack": sorted(set(a.fields) - set(b.fields)),
        "keys_only_llama_cpp": sorted(set(b.fields) - set(a.fields)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--converter", type=Path, required=True, help="llama.cpp's folder (convert_hf_to_gguf.py)")
    parser.add_argument("--converter-python", default=sys.executable, help="an interpreter with sentencepiece")
    parser.add_argument("--size", choices=sorted(merge_bench.SIZES), default="1.5b")
    parser.add_argument("--types", default="bf16,q8_0")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-bench"))
    args = parser.parse_args(argv)
    merged = ensure_merged(args.workdir, args.size)
    spec = merged.parent / "spec.yaml"
    out = args.workdir / "gguf" / f"qwen2-{args.size}" / "out"
    out.mkdir(exist_ok=True)
    results: dict = {"size": args.size, "load": os.getloadavg(), "machine": merge_bench.machine(), "steps": {}}
    for gguf_type in args.types.split(","):
        ours, theirs = out / f"modelpack-{gguf_type}.gguf", out / f"llama-cpp-{gguf_type}.gguf"
        runs = {
            "modelpack": [sys.executable, "-c", _MODELPACK_EXPORT, str(spec), str(merged), gguf_type, str(ours)],
            "convert_hf_to_gguf.py": [args.converter_python, str(args.converter / "convert_hf_to_gguf.py"), str(merged),
                                      "--outtype", gguf_type, "--outfile", str(theirs)],
        }
        for step, command in runs.items():
            merge_bench.log(f"{step} -> {gguf_type}")
            uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            result, _ = merge_bench.run_timed(f"{step} {gguf_type}", command, stat_path=None,
                                              log_file=out / f"{step}-{gguf_type}.log")
            results["steps"][f"{step} {gguf_type}"] = {
                "seconds": round(result.seconds, 1), "max_rss_mb": round(result.max_rss_mb or 0),
                "cpu_percent": result.cpu_percent, "uptime_before": uptime,
            }
        results[f"compare {gguf_type}"] = compare(ours, theirs)
        results[f"size {gguf_type}"] = {"modelpack": ours.stat().st_size, "llama.cpp": theirs.stat().st_size}
    print(json.dumps(results, indent=2))
    (out / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
