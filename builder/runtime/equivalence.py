"""Equivalence check, run as a script in the verifying interpreter: the bundle answers like base + adapter in peft.

It is not shipped in bundles: modelpack runs its own installed copy. It imports only torch, transformers, peft,
safetensors and the bundle's own runtime (load.py and bundle_check.py, by path; never modelpack), so it runs in a
deployment team's environment (`verify.python`) as well as in this one.

    python equivalence.py --bundle B --base SRC --adapter SRC [--adapter-weight W] [--adapter SRC2 ...]
                          --answer-logits DIR --report out.json

One model in memory at a time. The bundle's own `load.py --verify --answer-logits DIR` ran before, in its own
process: it answered every verification prompt and kept, for each prompt followed by its answer, the token ids and
the bundle's next-token logits at every position that predicts the answer (bundle_check.save_answer_logits). This
process loads only the reference, runs the same ids through it and compares position by position, one answer at a
time. Merge mode: the reference is the unmerged model (the base loaded from the sources, the adapter applied by
peft). Separate mode: the bundle (base + adapter through peft, as the stored logits were computed) merged in memory,
in place. Several adapters (--adapter given more than once, each with its --adapter-weight), in either mode: the
source base with every adapter loaded and active at once in peft, each adapter's scaling multiplied by its weight,
unmerged (the composition the bundle claims to be). With --compare-base the same prompts are also answered with the
adapters disabled, before any merge, and, with several adapters, by each adapter alone at its weight (the same loaded
model, one adapter active at a time), so the card shows what each part and the composition do to every prompt.

Tolerance rule: |delta logit| <= atol + rtol * max|reference logit|, with (atol, rtol) = (1e-3, 1e-4) in
float32, (0.05, 2e-2) in float16 and (0.1, 0.1) in bfloat16: merged weights are rounded once into the dtype
where the unmerged model keeps the adapter's contribution in float32, and the difference grows with depth
(a random Qwen2-7B in bfloat16 differed by 8% of its largest logit, with every greedy token the same). A greedy
token that differs counts as a disagreement only when the reference prefers its own token by more than the
tolerance (otherwise it was a near tie).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

TOLERANCES = {"float32": (1e-3, 1e-4), "float16": (0.05, 2e-2), "bfloat16": (0.1, 0.1)}


def load_bundle_module(bundle: Path) -> ModuleType:
    """The bundle's own load.py, imported by path without running its CLI (and without writing __pycache__ into the
    bundle). Not through sys.path: this script's own folder comes first there and holds modelpack's copies."""
    spec = importlib.util.spec_from_file_location("modelpack_bundle_load", bundle / "load.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(bundle / "load.py")
    module = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


def load_reference(loader: ModuleType, base: Path, adapters: list[tuple[Path, float]], *, mode: str,
                   rows: int | None, device: str, max_memory: dict | None):
    """The model the bundle must equal, with the adapters still separate: the source base + adapters through peft
    (merge mode, or several adapters) or the bundle itself, base + adapter through peft (separate mode with one
    adapter; merged later, in place).

    rows: the bundle's vocabulary (the width of its stored logits), when an adapter saved resized embeddings.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    if mode == "separate" and len(adapters) == 1:
        return loader.load(device=device, max_memory=max_memory)[0]
    base_model: Any = AutoModelForCausalLM.from_pretrained(base, **loader.model_kwargs(device, None, max_memory))
    if rows is not None and base_model.get_input_embeddings().weight.shape[0] != rows:
        base_model.resize_token_embeddings(rows)
    if len(adapters) == 1 and adapters[0][1] == 1.0:
        return PeftModel.from_pretrained(base_model, adapters[0][0]).eval()
    return weighted_adapters(PeftModel.from_pretrained(base_model, adapters[0][0], adapter_name="adapter_0"),
                             adapters).eval()


def adapter_names(count: int) -> list[str]:
    """The peft names of the spec's adapters, in its order."""
    return [f"adapter_{i}" for i in range(count)]


def weighted_adapters(model, adapters: list[tuple[Path, float]]):
    """Every adapter loaded into the peft model and active at once, each one's scaling multiplied by its weight
    (what peft's set_scale does, rsLoRA and rank/alpha patterns included): W x + sum_i w_i * delta_i x."""
    from peft.tuners.lora import LoraLayer

    names = adapter_names(len(adapters))
    for name, (path, _) in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(path, adapter_name=name)
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, (_, weight) in zip(names, adapters, strict=True):
                if name in module.scaling:
                    module.scaling[name] *= weight
    return model


def stored_answers(folder: Path) -> list[Path]:
    """The files bundle_check.save_answer_logits wrote, in the order of the prompts and probes."""
    return sorted(folder.glob("answer-*.safetensors"))


def vocabulary_rows(stored: list[Path]) -> int | None:
    """The bundle's vocabulary: the width of its stored logits (read from the header)."""
    from safetensors import safe_open

    if not stored:
        return None
    with safe_open(str(stored[0]), framework="pt") as f:
        return f.get_slice("logits").get_shape()[-1]


def compare(reference, stored: list[Path], *, dtype: str) -> dict:
    """Every stored answer's ids run through the reference; its logits compared with the bundle's, position by
    position, one answer in memory at a time."""
    import torch
    from safetensors import safe_open

    atol, rtol = TOLERANCES[dtype]
    results = []
    for path in stored:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
            ids, got = f.get_tensor("ids"), f.get_tensor("logits").float()
        with torch.no_grad():
            logits = reference(ids[None].to(reference.get_input_embeddings().weight.device)).logits
        want = logits[0, int(metadata["start"]):].float().cpu()
        results.append({"prompt": metadata["prompt"], **compare_logits(got, want, atol=atol, rtol=rtol)})
    significant = sum(r.pop("significant") for r in results)  # reported once, for all prompts together
    positions = sum(r["positions"] for r in results)
    disagreements = sum(r["greedy_disagreements"] for r in results)
    return {
        "ok": all(r["ok"] for r in results),
        "dtype": dtype,
        "rule": f"|delta logit| <= {atol:g} + {rtol:g} * max|reference logit|",
        "max_abs_logit_diff": max((r["max_abs_logit_diff"] for r in results), default=0.0),
        "positions": positions,
        "greedy_agreement": 1.0 - disagreements / positions if positions else 1.0,
        "significant_disagreements": significant,
        "prompts": results,
    }


def compare_logits(got, want, *, atol: float, rtol: float) -> dict:
    """The tolerance rule on one sequence: |delta| <= atol + rtol * max|want|, and no greedy token that differs where
    the reference preferred its own by more than that (a smaller margin is a near tie, counted but allowed)."""
    delta = (got - want).abs().max().item()
    tolerance = atol + rtol * want.abs().max().item()
    got_top, want_top = got.argmax(-1), want.argmax(-1)
    margin = (want.gather(-1, want_top[:, None]) - want.gather(-1, got_top[:, None]))[:, 0]
    disagree = got_top != want_top
    significant = int((margin > tolerance)[disagree].sum().item())
    return {
        "max_abs_logit_diff": delta,
        "tolerance": tolerance,
        "positions": int(got.shape[0]),
        "greedy_disagreements": int(disagree.sum().item()),
        "significant": significant,
        "ok": delta <= tolerance and significant == 0,
    }


def base_answers(loader: ModuleType, peft_model, tokenizer, prompts: list[str], max_new_tokens: int) -> dict[str, str]:
    """The same prompts answered by the base model alone (the adapter disabled), greedy."""
    import torch

    answers = {}
    with peft_model.disable_adapter():
        for prompt in prompts:
            torch.manual_seed(0)
            answers[prompt] = loader.chat(peft_model, tokenizer, prompt, greedy=True, max_new_tokens=max_new_tokens)[0]
    return answers


def adapter_answers(loader: ModuleType, peft_model, tokenizer, prompts: list[str], max_new_tokens: int,
                    count: int) -> list[dict[str, str]]:
    """The same prompts answered by each adapter of weighted_adapters alone (its scaling already times its weight),
    greedy, one list entry per adapter in the spec's order; every adapter is active again afterwards."""
    import torch

    names = adapter_names(count)
    answers = []
    try:
        for name in names:
            peft_model.base_model.set_adapter(name)
            alone = {}
            for prompt in prompts:
                torch.manual_seed(0)
                alone[prompt] = loader.chat(peft_model, tokenizer, prompt, greedy=True,
                                            max_new_tokens=max_new_tokens)[0]
            answers.append(alone)
    finally:
        peft_model.base_model.set_adapter(names)
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, action="append", required=True,
                        help="a source adapter; repeat it for several, in the spec's order")
    parser.add_argument("--adapter-weight", type=float, action="append",
                        help="each --adapter's weight, in the same order (default: 1 each)")
    parser.add_argument("--answer-logits", type=Path, required=True,
                        help="the folder `load.py --verify --answer-logits` wrote")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", help='per-device limits for device_map="auto", e.g. "0=20GiB,cpu=64GiB"')
    parser.add_argument("--compare-base", action="store_true",
                        help="also answer every prompt with the base alone, and with each of several adapters alone")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    loader = load_bundle_module(args.bundle)
    check = loader.import_sibling("bundle_check")
    facts = loader.bundle_facts()
    stored = stored_answers(args.answer_logits)
    prompts = [entry["prompt"] for entry in facts.prompts + facts.probes]
    weights = args.adapter_weight or [1.0] * len(args.adapter)
    if len(weights) != len(args.adapter):
        parser.error("give one --adapter-weight per --adapter")
    adapters = list(zip(args.adapter, weights, strict=True))
    # The stored logits are compared with the unmerged sources: always in merge mode, and in separate mode when the
    # bundle's adapter is the concatenation of several.
    merged = facts.mode == "merge" or len(adapters) > 1
    report: dict[str, Any] = {}
    reference = None
    if stored or (args.compare_base and prompts):  # else there is nothing to run through a model
        check.progress("equivalence: loading " + (f"base + {len(adapters)} adapters through peft, with their "
                                                  "weights (the unmerged reference)" if len(adapters) > 1 else
                                                  "base + adapter through peft (the unmerged reference)" if merged
                                                  else "the bundle, base + adapter through peft"))
        reference = load_reference(loader, args.base, adapters, mode=facts.mode, rows=vocabulary_rows(stored),
                                   device=args.device, max_memory=loader.parse_max_memory(args.max_memory))
        if args.compare_base:
            check.progress("equivalence: answering with the base model alone (the adapter disabled)")
            tokenizer = loader.load_tokenizer()
            report["base_answers"] = base_answers(loader, reference, tokenizer, prompts, facts.verify_max_new_tokens)
            if len(adapters) > 1:
                check.progress(f"equivalence: answering with each of the {len(adapters)} adapters alone, at its weight")
                report["adapter_answers"] = adapter_answers(loader, reference, tokenizer, prompts,
                                                            facts.verify_max_new_tokens, len(adapters))
        if not merged:  # the stored logits are the unmerged bundle's; the reference is the same model merged
            check.progress("equivalence: merging the adapter in memory")
            reference = reference.merge_and_unload().eval()
        check.progress("equivalence: comparing next-token logits")
    report = compare(reference, stored, dtype=facts.dtype) | report
    report["reference"] = (f"base + {len(adapters)} adapters through peft with weights "
                           f"{', '.join(f'{w:g}' for _, w in adapters)}, unmerged" if len(adapters) > 1
                           else "base + adapter through peft, unmerged" if merged else "bundle merged in memory")
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["peak_rss_gb"] = check.peak_rss_gb()
    args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
