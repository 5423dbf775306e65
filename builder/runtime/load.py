#!/usr/bin/env python3
"""Loader of a modelpack bundle: load(), chat() and a small command line.

This file is the same in every bundle; what this bundle is (its name, dtype, system prompt, verification prompts)
is in modelpack_bundle.json beside it. It needs only torch and transformers, and peft when the adapter is kept
separate (see requirements.txt); it never reads a hub and never imports modelpack.

THIS MODEL RUNS ITS OWN CODE when modelpack_bundle.json says "trust_remote_code": true: it is then loaded with
trust_remote_code=True, which executes the files listed under "remote_code_files" from this folder (README.md
names them too, and load() logs them). Read those files before you run it.

    python load.py "question"      answer once and exit
    python load.py                 interactive chat (empty line or Ctrl-D quits)
    python load.py --verify        re-check this bundle: file hashes, the expected answers, the serving contract

`--verify` is a convenience for receivers without modelpack: it runs inside this folder's own code (this file and
bundle_check.py), so it cannot detect a changed load.py or bundle_check.py (a tampered one can report "verification
passed"). To check a bundle you received, run `modelpack verify BUNDLE --digest sha256:...` with the digest the
sender gave you (or `--public-key` for a signed bundle): it checks every file before anything in the bundle runs.

From Python:

    from load import load, chat
    model, tokenizer = load()
    response, history = chat(model, tokenizer, "question")
"""

# No `from __future__ import annotations`: with it, dataclasses look the module up in sys.modules, which fails when
# this file is imported by path (importlib.util.spec_from_file_location) without registering it there.
import argparse
import copy
import enum
import functools
import importlib.util
import json
import logging
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

BUNDLE_DIR = Path(__file__).resolve().parent
# The bundle's facts, written by modelpack at build time (this file is copied unchanged into every bundle).
FACTS_FILE = "modelpack_bundle.json"
# The verification runtime beside this file, imported only by `--verify`.
CHECK_MODULE = "bundle_check"
# The devices load() takes; modelpack checks --device and verify.device against the same pattern before any work.
DEVICE_PATTERN = r"auto|cpu|cuda(:[0-9]+)?|mps"
DEVICES = "auto | cpu | cuda | cuda:N | mps"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleFacts:
    """What modelpack_bundle.json says about this bundle."""

    name: str
    modelpack_version: str
    mode: str  # "merge": weights already include the adapter; "separate": base + adapter/ via peft
    dtype: str
    trust_remote_code: bool
    system_prompt: str | None
    has_chat_template: bool
    end_of_turn_token: str | None
    verify_max_new_tokens: int
    # The spec's verification prompts and what their answers must satisfy.
    prompts: list[dict] = field(default_factory=list)
    # General-skill probes outside the tuning domain: recorded, failing only where they carry expectations.
    probes: list[dict] = field(default_factory=list)
    # The model's own code, which trust_remote_code runs, and the packages it imports (requirements.txt pins them).
    remote_code_files: list[str] = field(default_factory=list)
    remote_code_imports: list[str] = field(default_factory=list)
    # Quantized GGUF type -> {max_mean_kld, min_top1, expectations}: how far each quantized GGUF file may move the
    # 16-bit GGUF's next-token distributions, and whether its answers must meet the expectations (gguf_check.py).
    gguf_budget: dict = field(default_factory=dict)


class BundleLoadError(RuntimeError):
    """This bundle cannot be loaded here as it is; the message says what to change."""


class Default(enum.Enum):
    """An argument left to the bundle's own value (chat's system prompt)."""

    BUNDLE = "the bundle's own"


def read_facts(folder: Path) -> BundleFacts:
    """The facts modelpack wrote into folder/modelpack_bundle.json."""
    path = folder / FACTS_FILE
    try:
        return BundleFacts(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError) as error:
        raise BundleLoadError(f"{path}: cannot read this bundle's facts ({error}); the bundle is incomplete") from error


@functools.cache
def bundle_facts() -> BundleFacts:
    """This bundle's facts, read once."""
    return read_facts(BUNDLE_DIR)


def check_folder_name() -> None:
    """Refuse a folder name that the installed transformers cannot import this bundle's model code from.

    transformers < 4.57 imports remote code as the package `transformers_modules.<folder name>` without
    sanitising the name, so a dot in it breaks every relative import inside the model's code (the model's
    modeling file imports its siblings with `from .configuration_... import ...`).
    """
    import transformers
    from transformers import dynamic_module_utils

    if "." in BUNDLE_DIR.name and not hasattr(dynamic_module_utils, "_sanitize_module_name"):
        raise BundleLoadError(
            f"this bundle's folder name {BUNDLE_DIR.name!r} contains '.', from which transformers "
            f"{transformers.__version__} cannot import the model's own code; rename the folder to "
            f"{BUNDLE_DIR.name.replace('.', '-')!r} and load it again"
        )


def remote_code_warning(facts: BundleFacts, folder: Path) -> str | None:
    """What load() logs before it runs the model's own code; None when the model has none."""
    if not facts.trust_remote_code:
        return None
    return (f"this model runs its own code: loading it with trust_remote_code=True executes "
            f"{', '.join(facts.remote_code_files)} from {folder}")


def model_kwargs(device: str = "auto", dtype: str | None = None, max_memory: dict | None = None) -> dict[str, Any]:
    """from_pretrained's arguments for this bundle's dtype and the device; the equivalence check loads the source
    base with the same ones."""
    import torch
    import transformers

    facts = bundle_facts()
    # transformers 5 renamed from_pretrained's torch_dtype argument to dtype.
    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs: dict[str, Any] = {dtype_key: getattr(torch, dtype or facts.dtype),
                              "trust_remote_code": facts.trust_remote_code}
    if device == "auto" and not torch.cuda.is_available():
        device = "cpu"
    if device in ("auto", "cuda"):
        # accelerate spreads the layers over every visible GPU (and CPU if they are full).
        kwargs["device_map"] = "auto"
        if max_memory:
            kwargs["max_memory"] = max_memory
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    return kwargs


def load_tokenizer():
    """This folder's tokenizer alone."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    facts = bundle_facts()
    if facts.trust_remote_code:
        check_folder_name()
    return AutoTokenizer.from_pretrained(BUNDLE_DIR, trust_remote_code=facts.trust_remote_code)


def load(device: str = "auto", dtype: str | None = None, max_memory: dict | None = None):
    """Load the model and tokenizer from this folder; device is "auto", "cpu", "cuda" or "cuda:N"."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    facts = bundle_facts()
    if facts.trust_remote_code:
        check_folder_name()
        log.warning("%s", remote_code_warning(facts, BUNDLE_DIR))
    tokenizer = load_tokenizer()
    model: Any = AutoModelForCausalLM.from_pretrained(BUNDLE_DIR, **model_kwargs(device, dtype, max_memory))
    if facts.mode == "separate":
        # Load the adapter onto the explicitly loaded base: AutoPeftModelForCausalLM would look for a
        # tokenizer in adapter/ and, in some peft versions, resize the embeddings.
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, BUNDLE_DIR / "adapter")
    model.eval()
    return model, tokenizer


def chat(model, tokenizer, message: str, history: list | None = None, *,
         system: str | None | Default = Default.BUNDLE, greedy: bool = False, max_new_tokens: int | None = None):
    """Answer one message; returns (response, history) with history as [(query, response), ...].

    system: the system message; by default the bundle's (the spec's chat.system_prompt), None for none.
    """
    import torch

    if system is Default.BUNDLE:
        system = bundle_facts().system_prompt
    history = list(history or [])
    generation_config = copy.deepcopy(model.generation_config)
    if greedy:
        generation_config.do_sample = False
        for key in ("temperature", "top_p", "top_k"):
            setattr(generation_config, key, None)
    if max_new_tokens is not None:
        generation_config.max_new_tokens = max_new_tokens
    if generation_config.pad_token_id is None:
        generation_config.pad_token_id = (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                          else tokenizer.eos_token_id)
    if hasattr(model, "chat"):  # remote-code chat models (Qwen-v1) build their own prompt format
        kwargs = {"system": system} if system is not None else {}
        response, _ = model.chat(tokenizer, message, history=history, generation_config=generation_config, **kwargs)
    else:
        messages = [{"role": "system", "content": system}] if system else []
        for query, answer in history:
            messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": message})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=generation_config)
        response = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return response, history + [(message, response)]


def parse_max_memory(text: str | None) -> dict | None:
    """"0=20GiB,1=20GiB,cpu=64GiB" -> accelerate's max_memory ({0: "20GiB", 1: "20GiB", "cpu": "64GiB"})."""
    if not text:
        return None
    limits: dict[int | str, str] = {}
    for part in text.split(","):
        device, _, size = part.partition("=")
        device = device.strip()
        limits[int(device) if device.isdigit() else device] = size.strip()
    return limits


def import_sibling(name: str) -> ModuleType:
    """A module of this folder (the verification runtime), imported by path whatever sys.path holds.

    Without writing __pycache__ into the bundle: the integrity check would rightly report it as added.
    """
    spec = importlib.util.spec_from_file_location(f"modelpack_bundle_{name}", BUNDLE_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise BundleLoadError(f"{BUNDLE_DIR / f'{name}.py'}: missing; the bundle is incomplete")
    module = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


def device_argument(value: str) -> str:
    """--device, checked before the model loads (torch would refuse an unknown device only after loading)."""
    if not re.fullmatch(DEVICE_PATTERN, value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: {DEVICES}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chat with this modelpack bundle, or re-check it with --verify.")
    parser.add_argument("question", nargs="?", help="answer this once and exit; without it, chat interactively")
    parser.add_argument("--verify", action="store_true", help="re-run the bundle's checks; exit 3 on failure")
    parser.add_argument("--report", type=Path, help="with --verify: write the JSON report here")
    parser.add_argument("--files-checked", action="store_true", help=argparse.SUPPRESS)
    # modelpack's equivalence check: the bundle's logits over its own answers, kept for the next process.
    parser.add_argument("--answer-logits", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="auto", type=device_argument, help=DEVICES)
    parser.add_argument("--system", help="the system message (default: the bundle's system prompt); "
                        "--system '' sends none (a chat template that carries the system prompt then applies it, as "
                        "it does for a server's client that sends none)")
    parser.add_argument("--max-new-tokens", type=int,
                        help="the longest answer, in tokens (default: generation_config.json's max_new_tokens)")
    parser.add_argument("--max-memory",
                        help='with --device auto/cuda: per-device limits, e.g. "0=20GiB,1=20GiB,cpu=64GiB"')
    args = parser.parse_args(argv)
    try:
        if args.verify:
            check = import_sibling(CHECK_MODULE)
            return check.run_verify(sys.modules[__name__], device=args.device, max_memory=args.max_memory,
                                    files_checked=args.files_checked, report_path=args.report,
                                    answer_logits=args.answer_logits)
        system = Default.BUNDLE if args.system is None else args.system or None
        return run_chat(args.question, device=args.device, max_memory=parse_max_memory(args.max_memory),
                        system=system, max_new_tokens=args.max_new_tokens)
    except BundleLoadError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run_chat(question: str | None, *, device: str, max_memory: dict | None,
             system: str | None | Default = Default.BUNDLE,
             max_new_tokens: int | None = None) -> int:
    """Answer question once, or chat interactively until an empty line or end of input; system and max_new_tokens
    as chat() takes them."""
    model, tokenizer = load(device=device, max_memory=max_memory)
    options: dict[str, Any] = {"system": system, "max_new_tokens": max_new_tokens}
    if question:
        print(chat(model, tokenizer, question, **options)[0])
        return 0
    history: list = []
    while True:
        try:
            message = input("> ").strip()
        except EOFError:
            return 0
        if not message:
            return 0
        response, history = chat(model, tokenizer, message, history, **options)
        print(response)


if __name__ == "__main__":
    sys.exit(main())
