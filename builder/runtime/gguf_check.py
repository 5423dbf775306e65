"""GGUF check, run as a script in the verifying interpreter: the bundle's GGUF files answer like the bundle inside
llama.cpp itself (through llama-cpp-python).

It is not shipped in bundles: modelpack runs its own installed copy, after the bundle's files matched manifest.json.
It imports llama_cpp, transformers (for the bundle's tokenizer) and the bundle's own load.py and bundle_check.py
(by path; never modelpack), so it runs in a deployment team's environment (`verify.python`) as well as in this one.

    python gguf_check.py --bundle B --answers answers.json --report out.json gguf/NAME-bf16.gguf ...

For every GGUF file and every verification prompt and probe (with the bundle's system prompt):
- llama.cpp's ids for a fixed probe text (PROBE_TEXT: digit, whitespace and punctuation runs, contractions, CJK,
  emoji), without special tokens, must equal the bundle tokenizer's: this is what tells a wrong pre-tokenizer apart.
- The prompt is rendered from the GGUF's own `tokenizer.chat_template` by llama-cpp-python's Jinja2ChatFormatter,
  built from the file's bos and eos tokens exactly as `Llama.create_chat_completion` builds it for a GGUF that carries
  a template (llama-cpp-python 0.3.36, llama.py: chat format "chat_template.default"), and tokenized by llama.cpp with
  special tokens parsed and no BOS added (the template writes its own, as create_chat_completion does). Those ids
  must equal the bundle tokenizer's ids for the bundle's own rendering: a wrong vocabulary, pre-tokenizer, special
  token or template shows here, before any answer.
- llama.cpp answers greedily (temperature 0, top_k 1, no repetition penalty) up to verify.max_new_tokens, stopping
  at llama.cpp's end-of-generation tokens as create_completion does. Its tokens are decoded by the bundle's tokenizer,
  as load.py decodes the bundle's own answer.
- The answer is compared with the bundle's (what load.py --verify answered in transformers). When the file holds the
  bundle's own dtype (bf16 from a bfloat16 bundle, f16 from float16) the weights are the same numbers, but llama.cpp
  does its arithmetic its own way (e.g. float32 activations where torch keeps bfloat16), so the rule is
  equivalence.py's: the answers must be equal, except where they part at a near tie. Where they part, llama.cpp is fed
  the bundle's answer token by token and the first position where it prefers another token is reported, with its
  margin (llama.cpp's logit for its own token minus that for the bundle's); within the dtype's tolerance it is a near
  tie, beyond it a failure. For other types (q8_0, or one that rounds the bundle's weights) the same is reported and
  never failed.
- The spec's expectations are checked on the GGUF's answer, as on the bundle's: required of a 16-bit file, reported
  for a quantized one unless its budget says `expectations` (the bundle's facts, gguf_budget).
- Each file's size, bits per weight and tensor-type mix are read back from it (gguf.GGUFReader).
- Each quantized file (q8_0 and llama.cpp's mixes) is measured against the 16-bit GGUF (--reference, else the bundle's
  bf16/f16 file) on the same token stream, every prompt and probe followed by the bundle's answer, and the chunks of
  --eval-text, as `llama-perplexity --kl-divergence` measures: per position KL(p_16bit || p_variant) of the
  next-token distributions (mean, 99th percentile) and whether the top tokens agree; a variant over the budget the
  bundle's facts give its type fails (a type without one is reported).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

# This script's own folder (modelpack's copy of the runtime) is first on sys.path: the bundle's load.py is imported
# as the equivalence check imports it.
from equivalence import TOLERANCES, load_bundle_module  # type: ignore[import-not-found]  # (mypy: not a package)

# A fixed text whose tokens tell llama.cpp's pre-tokenizers apart, so a wrong but known `tokenizer.ggml.pre` (which
# loads silently) shows: digit runs (GPT-2 keeps a run whole, Llama 3 splits it in threes, Qwen2 in single digits),
# whitespace and newline runs, contractions in both cases, punctuation runs, CJK, emoji and accented letters.
PROBE_TEXT = ("In 2024, 1234567 people said: \"I'm sure you're RIGHT, they'VE gone...\"\n\n\t  ok   3.14159!!\n"
              "我家宝宝六个月，吃奶、睡觉。🙂🚀 naïve café  \n")
# Tokenized before a text that continues an answer, and dropped (continuation_ids).
CONTINUATION_ANCHOR = "\n"
# What a tokenizer decodes the bytes of a character split between tokens into.
SPLIT_CHARACTER = "\ufffd"
# Export type -> the bundle dtype whose weights it holds unchanged (the answers must then be the same).
LOSSLESS_FROM = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}
# The 16-bit types a quantized file is measured against, and the types measured (modelpack's gguf_facts names them).
SIXTEEN_BIT = ("bf16", "f16")
QUANTIZED = ("q8_0", "q6_k", "q5_k_m", "q4_k_m", "q5_0", "q4_0")
# The length of the held-out text's chunks (export.gguf.eval_text), each scored from its first token.
EVAL_CHUNK = 512
# The most tokens of it scored (16 chunks): every position costs a forward pass per file and keeps the 16-bit file's
# logits on disk meanwhile (8,192 positions over a 152k vocabulary: 5 GB).
EVAL_MAX_TOKENS = 16 * EVAL_CHUNK
# Positions whose divergence is computed at once (float64 copies of their logits): about 100 MB for 152k tokens.
DIVERGENCE_ROWS = 64


class Prompt(NamedTuple):
    """One verification prompt as both runtimes see it: the bundle's ids, its answer and what the answer must meet."""

    text: str
    bundle_ids: list[int]
    bundle_answer: str
    expect: dict


def export_type(file: str) -> str:
    """The type of an exported file from its name, `NAME-<type>.gguf` (the exporter's naming)."""
    return Path(file).stem.rsplit("-", 1)[-1].lower()


def must_be_equal(gguf_type: str, bundle_dtype: str) -> bool:
    """Whether a file of this type holds the bundle's weights unchanged, so its answers must equal the bundle's."""
    return LOSSLESS_FROM.get(gguf_type) == bundle_dtype


def first_difference(expected: list, got: list) -> int | None:
    """The first position where two sequences differ (one ending earlier counts), None when they are equal."""
    for position, (a, b) in enumerate(zip(expected, got, strict=False)):
        if a != b:
            return position
    return None if len(expected) == len(got) else min(len(expected), len(got))


def token_difference(expected: list[int], got: list[int], piece) -> dict | None:
    """Where two token sequences part, with the token each has there (None past its end); None when equal."""
    position = first_difference(expected, got)
    if position is None:
        return None
    return {"position": position,
            "bundle": piece(expected[position]) if position < len(expected) else None,
            "gguf": piece(got[position]) if position < len(got) else None}


def judge(prompt: Prompt, *, answer: str, prompt_difference: dict | None, answer_difference: dict | None,
          exact: bool, failures: list[str], expectations_required: bool) -> dict:
    """One prompt's result: the prompt's ids must match; when exact, the answer must equal the bundle's unless the
    two part at a near tie (see parting); the expectations must hold where required (else they are reported)."""
    equal = answer == prompt.bundle_answer
    near_tie = answer_difference is not None and answer_difference["near_tie"]
    return {"prompt": prompt.text, "answer": answer, "equal": equal, "difference": answer_difference,
            "prompt_tokens": len(prompt.bundle_ids), "prompt_difference": prompt_difference, "failures": failures,
            "ok": (prompt_difference is None and (equal or not exact or near_tie)
                   and not (failures and expectations_required))}


def parting(scores, expected: list[int], end: int | None, *, dtype: str, piece) -> dict | None:
    """Where llama.cpp, fed the bundle's answer token by token, first prefers another token, and by how much.

    scores[j]: llama.cpp's next-token logits after the prompt and expected[:j]; with an end token, one more row: where
    the bundle ended its answer. The margin is llama.cpp's logit for its own token minus its logit for the bundle's;
    within the tolerance of the bundle's dtype (equivalence.py's rule, atol + rtol * max|logit|) it is a near tie,
    where two runtimes that round differently may part without either being wrong. None when llama.cpp agrees at
    every position.
    """
    atol, rtol = TOLERANCES.get(dtype, TOLERANCES["float32"])
    for position, row in enumerate(scores):
        wanted = expected[position] if position < len(expected) else end
        best = int(row.argmax())
        assert wanted is not None, "a row past the fed tokens needs the end token"
        if best != wanted:
            margin = float(row[best] - row[wanted])
            tolerance = atol + rtol * float(abs(row).max())
            return {"position": position, "bundle": piece(wanted), "gguf": piece(best), "margin": margin,
                    "tolerance": tolerance, "near_tie": margin <= tolerance}
    return None


def shared_tokens(generated: list[int], bundle_answer: str, tokenizer) -> int:
    """How many of llama.cpp's answer tokens the bundle's answer begins with, read by their text (both answers were
    decoded by the bundle's tokenizer and stripped). Up to there the two runtimes chose the same tokens, which the
    bundle's text alone cannot say: stripped of a leading space, re-tokenized, it may split otherwise."""
    shared = 0
    for count in range(1, len(generated) + 1):
        if not bundle_answer.startswith(tokenizer.decode(generated[:count], skip_special_tokens=True).strip()):
            break
        shared = count
    return shared


def feed_bundle_answer(llm, prompt_ids: list[int], generated: list[int], bundle_answer: str, tokenizer, *, end: int,
                       dtype: str, piece) -> dict:
    """llama.cpp fed the prompt and the bundle's answer: where it first prefers another token (see parting).

    The tokens both runtimes share (shared_tokens) are fed as llama.cpp chose them, then the rest of the bundle's
    text. That text carries its tokens only up to a character split between tokens (which decoding turned into
    U+FFFD, as small models often emit): only that prefix is fed, less its last token (which may hold the split
    character's first bytes). Where llama.cpp agrees with all of it, the answers part later, at a place that cannot
    be scored: reported without a margin, as a near tie.
    """
    shared = generated[:shared_tokens(generated, bundle_answer, tokenizer)]
    rest = bundle_answer[len(tokenizer.decode(shared, skip_special_tokens=True).strip()):]
    faithful = SPLIT_CHARACTER not in rest
    fed = continuation_ids(tokenizer, rest.split(SPLIT_CHARACTER)[0]) if rest else []
    if not faithful:
        fed = fed[:-1]
    fed = shared + fed
    llm.reset()
    llm.eval(prompt_ids + fed)
    rows = len(fed) + 1 if faithful else len(fed)  # faithful: one more row, where the bundle ended its answer
    scores = llm.scores[len(prompt_ids) - 1:len(prompt_ids) - 1 + rows]
    found = parting(scores, fed, end if faithful else None, dtype=dtype, piece=piece)
    return found or {"position": len(fed), "bundle": None, "gguf": None, "margin": None, "tolerance": None,
                     "near_tie": True}


def continuation_ids(tokenizer, text: str) -> list[int]:
    """The ids of a text that continues an answer. A SentencePiece tokenizer marks the start of a text with a space
    (its dummy prefix: "'y" -> "▁'", "y"), which the middle of an answer does not have, so the text is tokenized after
    a newline (a piece of its own in every family here) and the newline's ids are dropped; where the newline would
    join the text's first piece, as it is."""
    plain = tokenizer(text, add_special_tokens=False)["input_ids"]
    anchor = tokenizer(CONTINUATION_ANCHOR, add_special_tokens=False)["input_ids"]
    anchored = tokenizer(CONTINUATION_ANCHOR + text, add_special_tokens=False)["input_ids"]
    if anchored[:len(anchor)] != anchor or text.startswith(CONTINUATION_ANCHOR):
        return plain
    return anchored[len(anchor):]


def token_text(tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def machine_threads() -> int:
    """The cores this process may run on (a container's or taskset's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextlib.contextmanager
def plain_cpu_buffers(llama_cpp: Any) -> Iterator[None]:
    """Models loaded meanwhile keep their weights in llama.cpp's plain CPU layout (use_extra_bufts off).

    Its default repacks Q8_0 weights into interleaved blocks for AVX-512 kernels, and llama.cpp 0.3.36's repacked
    batch matmul crashes (SIGSEGV) on the shipped demo's Q8_0 file on a 2-core AVX-512 machine (one-token batches
    and the plain layout both answer). The layout changes which kernel multiplies, not the file's values, and the
    check is of the file. Llama() takes no such argument: it reads the defaults
    from llama_cpp.llama_model_default_params, which is replaced while the model loads.
    """
    bindings = llama_cpp.llama_cpp
    defaults = bindings.llama_model_default_params

    def plain_defaults():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = plain_defaults
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


def contents(path: Path) -> dict:
    """What the file holds, read back from it (gguf.GGUFReader): its size, the bits per weight of its tensor data
    (8 * data bytes / weights), the tensor types actually written with their tensor counts, and each type's share of
    the weights (llama.cpp's quantizer falls back to other types where a row's length is not a multiple of 256).
    Empty where the verifying interpreter lacks the `gguf` library (llama-cpp-python does not bring it): the report
    then omits them."""
    try:
        from gguf import GGUFReader
    except ImportError:
        return {}

    tensors = GGUFReader(path).tensors
    weights = sum(int(t.n_elements) for t in tensors)
    data = sum(int(t.n_bytes) for t in tensors)
    mix: dict[str, dict] = {}
    for tensor in tensors:
        entry = mix.setdefault(tensor.tensor_type.name, {"tensors": 0, "weights": 0})
        entry["tensors"] += 1
        entry["weights"] += int(tensor.n_elements)
    ordered = sorted(mix.items(), key=lambda item: -item[1]["weights"])  # the type holding most weights first
    return {"bytes": path.stat().st_size, "bits_per_weight": round(8 * data / weights, 3),
            "tensor_types": {name: e["tensors"] for name, e in ordered},
            "weight_shares": {name: round(e["weights"] / weights, 4) for name, e in ordered}}


def log_softmax(rows: Any) -> Any:
    import numpy as np

    rows = np.asarray(rows, dtype=np.float64)
    shifted = rows - rows.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def divergence(reference_logits: Any, variant_logits: Any) -> tuple[Any, Any]:
    """Per position, KL(p_reference || p_variant) of the next-token distributions (softmax of the full logits), as
    `llama-perplexity --kl-divergence` scores them, and whether the two top tokens agree. In blocks of DIVERGENCE_ROWS
    positions: float64 rows of a 152k vocabulary are 1.2 MB each, and a block needs a few copies."""
    import numpy as np

    klds, agreements = [], []
    for start in range(0, len(reference_logits), DIVERGENCE_ROWS):
        reference = log_softmax(reference_logits[start:start + DIVERGENCE_ROWS])
        variant = log_softmax(variant_logits[start:start + DIVERGENCE_ROWS])
        klds.append(np.maximum((np.exp(reference) * (reference - variant)).sum(axis=-1), 0.0))
        agreements.append(reference.argmax(axis=-1) == variant.argmax(axis=-1))
    return np.concatenate(klds), np.concatenate(agreements)


def quality(kld: Any, top1: Any, budget: dict | None) -> dict:
    """The figures of one variant over every scored position, and whether they are within its budget
    ({max_mean_kld, min_top1, ...}; None: reported, not gated)."""
    import numpy as np

    figures = {"tokens": int(len(kld)), "mean_kld": float(np.mean(kld)), "p99_kld": float(np.percentile(kld, 99)),
               "top1": float(np.mean(top1))}
    within = budget is None or (figures["mean_kld"] <= budget["max_mean_kld"] and figures["top1"] >= budget["min_top1"])
    return {**figures, "budget": budget, "within_budget": within}


def token_stream(prompts: list[Prompt], tokenizer) -> list[list[int]]:
    """What every variant is scored on: each verification prompt and probe as the bundle renders it, followed by the
    bundle's answer to it."""
    return [p.bundle_ids + (continuation_ids(tokenizer, p.bundle_answer) if p.bundle_answer else [])
            for p in prompts]


def text_chunks(text: str, tokenizer) -> list[list[int]]:
    """A held-out text's first EVAL_MAX_TOKENS tokens as the bundle's tokenizer splits it, in chunks of EVAL_CHUNK
    tokens (the last may be shorter; one of a single token predicts nothing and is left out)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:EVAL_MAX_TOKENS]
    return [ids[i:i + EVAL_CHUNK] for i in range(0, len(ids), EVAL_CHUNK) if len(ids[i:i + EVAL_CHUNK]) > 1]


def sequence_logits(path: Path, stream: list[list[int]]) -> Iterator[Any]:
    """llama.cpp's next-token logits at every position of each sequence of the stream, one sequence at a time (each
    array is llama.cpp's own buffer, overwritten by the next sequence)."""
    import llama_cpp

    threads = machine_threads()
    with plain_cpu_buffers(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=max(len(s) for s in stream) + 8, n_threads=threads,
                              n_threads_batch=threads, seed=0, logits_all=True, verbose=False)
    try:
        for ids in stream:
            llm.reset()
            llm.eval(ids)
            yield llm.scores[:len(ids)]
    finally:
        llm.close()


def reference_logits(path: Path, stream: list[list[int]], folder: Path) -> list:
    """The 16-bit file's logits for the whole stream, kept in a memory-mapped file in folder rather than in memory
    (2,000 positions over a 152k vocabulary are 1.2 GB of float32): one array per sequence."""
    import numpy as np

    total, rows, offset, sequences = sum(len(ids) for ids in stream), None, 0, []
    for logits in sequence_logits(path, stream):
        if rows is None:
            require_free_space(folder, total * logits.shape[1] * logits.itemsize, total)
            rows = np.memmap(folder / "reference-logits.f32", dtype=np.float32, mode="w+",
                             shape=(total, logits.shape[1]))
        rows[offset:offset + len(logits)] = logits
        sequences.append(rows[offset:offset + len(logits)])
        offset += len(logits)
    return sequences


def require_free_space(folder: Path, needed: int, positions: int) -> None:
    """Stop with one sentence when the reference logits cannot fit where they are kept (a full disk would kill this
    process with SIGBUS halfway through the memory map)."""
    import shutil

    free = shutil.disk_usage(folder).free
    if needed > free:
        raise SystemExit(f"error: measuring the quantized GGUF files keeps the 16-bit file's logits on disk, "
                         f"{needed / 1e9:.1f} GB for {positions} positions, and {folder.parent} has {free / 1e9:.1f} "
                         "GB free; free space there or point TMPDIR at a larger disk")


def measure(bundle: Path, variant: str, stream: list[list[int]], reference_rows: list, budget: dict | None) -> dict:
    """One quantized variant against the 16-bit GGUF's logits on the same token stream, sequence by sequence."""
    import numpy as np

    scored = [divergence(r, v) for r, v in zip(reference_rows, sequence_logits(bundle / variant, stream), strict=True)]
    return quality(np.concatenate([k for k, _ in scored]), np.concatenate([t for _, t in scored]), budget)


def check_file(bundle: Path, name: str, prompts: list[Prompt], *, bundle_dtype: str, system: str | None,
               max_new_tokens: int, tokenizer, check, budgets: dict) -> dict:
    """Load one GGUF in llama.cpp and answer every prompt greedily with its embedded chat template."""
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    path = bundle / name
    gguf_type = export_type(name)
    exact = must_be_equal(gguf_type, bundle_dtype)
    expectations_required = gguf_type not in QUANTIZED or budgets.get(gguf_type, {}).get("expectations", False)
    threads = machine_threads()
    # Room for every prompt and its answer, with slack for a tokenizer that splits a prompt finer than the bundle's
    # (that prompt then fails the ids comparison, but it still runs).
    n_ctx = 2 * max(len(p.bundle_ids) for p in prompts) + max_new_tokens
    started = time.perf_counter()
    # logits_all: every position's logits, to score the bundle's answer where the two part.
    with plain_cpu_buffers(llama_cpp):
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, seed=0,
                              logits_all=True, verbose=False)
    load_seconds = time.perf_counter() - started
    template = llm.metadata.get("tokenizer.chat_template")
    if template is None:
        raise SystemExit(f"error: {name} has no tokenizer.chat_template; llama.cpp would chat with a "
                         "format of its own guessing, so its answers cannot be compared")
    # As Llama.__init__ builds the handler for the file's template (its token texts, its eos as the stop).
    eos_id, bos_id = llm.token_eos(), llm.token_bos()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=llm._model.token_get_text(eos_id) if eos_id != -1 else "",
        bos_token=llm._model.token_get_text(bos_id) if bos_id != -1 else "",
        stop_token_ids=[eos_id],
    )
    piece = functools.partial(token_text, tokenizer)
    tokenization = token_difference(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"],
                                    llm.tokenize(PROBE_TEXT.encode("utf-8"), add_bos=False, special=False), piece)
    results = []
    for i, prompt in enumerate(prompts, 1):
        check.progress(f"  gguf {gguf_type} [{i}/{len(prompts)}] {prompt.text[:40]}")
        messages: list[Any] = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt.text}
        ]
        rendered = formatter(messages=messages)
        ids = llm.tokenize(rendered.prompt.encode("utf-8"), add_bos=not rendered.added_special, special=True)
        generated: list[int] = []
        # create_completion's loop without its text handling: greedy, ending at llama.cpp's end-of-generation tokens.
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(generated) == max_new_tokens:
                break
            generated.append(token)
        # Decoded by the bundle's tokenizer as load.chat decodes (special tokens skipped, stripped): the same tokens
        # give the same text. (llama-cpp-python's own text drops the bytes of a split UTF-8 character, as small
        # models emit often.)
        answer = tokenizer.decode(generated, skip_special_tokens=True).strip()
        difference = None
        if answer != prompt.bundle_answer:
            difference = feed_bundle_answer(llm, ids, generated, prompt.bundle_answer, tokenizer, end=eos_id,
                                            dtype=bundle_dtype, piece=piece)
        results.append(judge(
            prompt, answer=answer, exact=exact, answer_difference=difference,
            prompt_difference=token_difference(prompt.bundle_ids, ids, piece),
            failures=check.check_expectations(answer, prompt.expect), expectations_required=expectations_required,
        ))
    return {"file": name, "type": gguf_type, "exact": exact, "load_seconds": round(load_seconds, 2),
            "tokenization": tokenization, "answers": results, "expectations_required": expectations_required,
            "ok": tokenization is None and all(r["ok"] for r in results)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--answers", type=Path, required=True,
                        help="JSON list of {prompt, answer} from the bundle, prompts then probes")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--reference", type=Path,
                        help="the 16-bit GGUF the quantized files are measured against (default: the bundle's)")
    parser.add_argument("--eval-text", type=Path, help="a text file scored too, in chunks of EVAL_CHUNK tokens")
    parser.add_argument("files", nargs="+", help="the GGUF files, relative to the bundle")
    args = parser.parse_args(argv)

    from importlib import metadata

    from transformers import GenerationConfig

    loader = load_bundle_module(args.bundle)
    check = loader.import_sibling("bundle_check")
    facts = loader.bundle_facts()
    tokenizer = loader.load_tokenizer()
    # The bundle's prompt as its own chat() renders it; the remote chat format (Qwen-v1's chatml) is read from the
    # model's generation config, which is all of the model this needs.
    model = SimpleNamespace(generation_config=GenerationConfig.from_pretrained(args.bundle))
    answers = {entry["prompt"]: entry["answer"] for entry in json.loads(args.answers.read_text(encoding="utf-8"))}
    prompts = []
    for entry in facts.prompts + facts.probes:
        text = check.formatted_prompt(tokenizer, model, entry["prompt"], facts.system_prompt)
        prompts.append(Prompt(entry["prompt"], tokenizer(text, add_special_tokens=False)["input_ids"],
                              answers[entry["prompt"]], entry.get("expect", {})))
    files = []
    for name in args.files:
        check.progress(f"gguf: loading {name} in llama.cpp")
        files.append(check_file(args.bundle, name, prompts, bundle_dtype=facts.dtype, system=facts.system_prompt,
                                max_new_tokens=facts.verify_max_new_tokens, tokenizer=tokenizer, check=check,
                                budgets=facts.gguf_budget))
    sixteen_bit = [n for n in args.files if export_type(n) in SIXTEEN_BIT]
    reference = args.reference or (args.bundle / sixteen_bit[0] if sixteen_bit else None)
    quantized = [f for f in files if f["type"] in QUANTIZED]
    if reference is not None and quantized:
        check.progress(f"gguf: scoring {len(quantized)} quantized file(s) against {reference.name}")
        stream = token_stream(prompts, tokenizer)
        if args.eval_text is not None:
            stream += text_chunks(args.eval_text.read_text(encoding="utf-8"), tokenizer)
        with tempfile.TemporaryDirectory(prefix="modelpack-gguf-logits-") as folder:
            reference_rows = reference_logits(reference, stream, Path(folder))
            for entry in quantized:
                entry.update(reference=reference.name, **measure(args.bundle, entry["file"], stream, reference_rows,
                                                                 facts.gguf_budget.get(entry["type"])))
                entry["ok"] = entry["ok"] and entry["within_budget"]
            del reference_rows  # the memory map, before its folder goes
    for entry in files:
        entry.update(contents(args.bundle / entry["file"]))
    report = {"ok": all(f["ok"] for f in files), "runtime": f"llama-cpp-python {metadata.version('llama_cpp_python')}",
              "threads": machine_threads(), "files": files}
    args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
