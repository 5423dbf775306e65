"""Equivalence check, run as a script in the verifying interpreter: the bundle answers like base + adapter in peft.

It is not shipped in bundles: modelpack runs its own installed copy. It imports only torch, transformers, peft and
the bundle's own runtime (load.py and bundle_check.py, by path; never modelpack), so it runs in a deployment team's
environment (`verify.python`) as well as in this one.

    python equivalence.py --bundle B --base SRC --adapter SRC --answers answers.json --report out.json

Merge mode: the bundle is compared with the unmerged reference (the base loaded from the sources, the adapter
applied by peft). Separate mode: the bundle (base + adapter through peft) is compared with a merge of itself
in memory. For each verification prompt, the chat-formatted prompt followed by the bundle's greedy answer is
run through both models and every position's next-token logits are compared.

Tolerance rule: |delta logit| <= atol + rtol * max|reference logit|, with (atol, rtol) = (1e-3, 1e-4) in
float32, (0.05, 2e-2) in float16 and (0.1, 0.1) in bfloat16: merged weights are rounded once into the dtype
where the unmerged model keeps the adapter's contribution in float32, and the difference grows with depth
(a random Qwen2-7B in bfloat16 differed by 8% of its largest logit, with every greedy token the same). A greedy
token that differs counts as a disagreement only when the reference prefers its own token by more than the
tolerance (otherwise it was a near tie).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
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


def formatted_prompt(tokenizer, model, prompt: str, system: str | None) -> str:
    """The text the model sees before its answer: the chat template's, or ChatML for remote chat code."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if getattr(model.generation_config, "chat_format", None) == "chatml":
        system_text = system or "You are a helpful assistant."
        return (f"<|im_start|>system\n{system_text}<|im_end|>\n<|im_start|>user\n{prompt}<|im_end|>\n"
                "<|im_start|>assistant\n")
    return prompt


def load_reference(loader: ModuleType, base: Path, adapter: Path, *, mode: str, dtype: str, device: str,
                   max_memory: dict | None):
    """The model the bundle must equal: base + adapter unmerged (merge mode) or merged in memory (separate)."""
    import torch
    import transformers
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tokenizer = loader.load(device=device, dtype=dtype, max_memory=max_memory)
    if mode == "separate":
        reference = copy.deepcopy(model).merge_and_unload().eval()
        return model, tokenizer, reference, None
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {dtype_key: getattr(torch, dtype), "trust_remote_code": loader.bundle_facts().trust_remote_code}
    if model.device.type != "cpu":  # spread the reference the way the bundle was spread
        kwargs["device_map"] = "auto"
        if max_memory:
            kwargs["max_memory"] = max_memory
    base_model: Any = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    if base_model.get_input_embeddings().weight.shape[0] != rows:  # the adapter saved resized embeddings
        base_model.resize_token_embeddings(rows)
    reference = PeftModel.from_pretrained(base_model, adapter).eval()
    return model, tokenizer, reference, reference


def compare(model, reference, tokenizer, entries: list[dict], *, system, dtype: str) -> dict:
    """Every prompt followed by the bundle's answer, run through both models; logits compared position by position."""
    atol, rtol = TOLERANCES[dtype]
    results = [
        {"prompt": entry["prompt"], **compare_logits(*answer_logits(model, reference, tokenizer, entry, system),
                                                     atol=atol, rtol=rtol)}
        for entry in entries
    ]
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


def answer_logits(model, reference, tokenizer, entry: dict, system):
    """Both models' next-token logits (float32) at the positions that predict the answer: the prompt's last token
    (the first answer token's prediction) and every answer token."""
    import torch

    text = formatted_prompt(tokenizer, model, entry["prompt"], system)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(entry["answer"], add_special_tokens=False)["input_ids"] if entry["answer"] else []
    ids = torch.tensor([prompt_ids + answer_ids], device=model.get_input_embeddings().weight.device)
    with torch.no_grad():
        got = model(ids).logits[0].float()
        want = reference(ids.to(reference.get_input_embeddings().weight.device)).logits[0].float().to(got.device)
    start = len(prompt_ids) - 1
    return got[start:], want[start:]


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


def base_answers(loader: ModuleType, peft_reference, tokenizer, entries: list[dict],
                 max_new_tokens: int) -> dict[str, str]:
    """The same prompts answered by the base model alone (the adapter disabled), greedy."""
    import torch

    answers = {}
    with peft_reference.disable_adapter():
        for entry in entries:
            torch.manual_seed(0)
            answers[entry["prompt"]] = loader.chat(
                peft_reference, tokenizer, entry["prompt"], greedy=True, max_new_tokens=max_new_tokens
            )[0]
    return answers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--answers", type=Path, required=True, help="JSON list of {prompt, answer} from the bundle")
    parser.add_argument("--report", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-memory", help='per-device limits for device_map="auto", e.g. "0=20GiB,cpu=64GiB"')
    parser.add_argument("--compare-base", action="store_true", help="also answer every prompt with the base alone")
    args = parser.parse_args(argv)

    loader = load_bundle_module(args.bundle)
    check = loader.import_sibling("bundle_check")
    facts = loader.bundle_facts()
    entries = json.loads(args.answers.read_text(encoding="utf-8"))
    check.progress("equivalence: loading the bundle and the reference")
    model, tokenizer, reference, peft_reference = load_reference(
        loader, args.base, args.adapter, mode=facts.mode, dtype=facts.dtype, device=args.device,
        max_memory=loader.parse_max_memory(args.max_memory),
    )
    check.progress("equivalence: comparing next-token logits")
    report = compare(model, reference, tokenizer, entries, system=facts.system_prompt, dtype=facts.dtype)
    merged = facts.mode == "merge"
    report["reference"] = "base + adapter through peft, unmerged" if merged else "bundle merged in memory"
    if args.compare_base:
        check.progress("equivalence: answering with the base model alone")
        if peft_reference is None:  # separate mode: the bundle itself is base + adapter
            peft_reference = model
        report["base_answers"] = base_answers(loader, peft_reference, tokenizer, entries, facts.verify_max_new_tokens)
    args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
