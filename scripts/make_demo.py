#!/usr/bin/env python
"""Regenerate the shipped demo inputs under ``demo/``.

    python scripts/make_demo.py

Produces, deterministically and offline (CPU, 2 threads):

* ``demo/base/``            a tiny Qwen2ForCausalLM (float32 safetensors) + a byte-level
                            BPE tokenizer trained on ``demo/corpus.md`` with a ChatML
                            chat template (Qwen2 style).
* ``demo/checkpoint-<N>/``  a peft LoRA adapter trained for N steps on the three
                            medical QA samples of the corpus, as a HF Trainer checkpoint
                            would look (adapter + trainer leftovers).
* ``demo/general-chat/``    a small peft LoRA adapter trained on a few general questions (greeting, what machine
                            learning is, thanks) with the medical adapter active and frozen, so the two compose:
                            ``specs/demo_two_adapters.yaml`` builds base + medical + general-chat.
* ``demo/README.md``        what all this is.
* ``demo/wide/``            a second base and medical adapter for quantized GGUF variants (``--wide`` below).

    python scripts/make_demo.py --general-chat-only

retrains only ``demo/general-chat/`` on the committed base and medical adapter (and rewrites its README section),
leaving their bytes alone: the full run is deterministic on one machine, not across CPUs.

    python scripts/make_demo.py --wide

writes ``demo/wide/`` only (nothing else in ``demo/`` is touched; the full run ends with it): a base whose every
weight row is a multiple of 256 long (hidden 256, intermediate 768), so llama.cpp writes real k-quant blocks (Q6_K,
Q5_K, Q4_K) instead of falling back to Q8_0 / Q5_0 as it does for ``demo/base``'s 128-long rows; the same tokenizer
files as ``demo/base``; bfloat16 weights, as real bases ship; pre-trained on the corpus minus a held-out section,
which is written as ``demo/wide/held-out.md`` (the text ``specs/demo_quantized.yaml`` measures its quantized GGUF
variants on); and a medical adapter ``demo/wide/checkpoint-<N>/`` held to the same checks as the small one.

``demo/corpus.md`` is the committed copy of the seed tutorial
(``/work/shared/seed/qwen_lora_medical_usage.md``); it is kept across runs and only
re-created from the seed when missing.  Everything else in ``demo/`` is deleted and
rebuilt on every run.

The script checks (and fails loudly otherwise) that greedy decoding through the chat
template reproduces the three answers exactly, followed by ``<|im_end|>``, with:
the peft model, the merged float32 model, and the merged model cast to bfloat16 --
both in memory and after reloading the saved files.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Sleeping (not spinning) OpenMP workers: same numbers, but no 10-30x slow-down when the
# 2 cores are shared with other processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo"
CORPUS = DEMO / "corpus.md"
SEED = Path(os.environ.get("MODELPACK_SEED_DOC", "/work/shared/seed/qwen_lora_medical_usage.md"))

SEED_NUMBER = 20240611
SYSTEM_PROMPT = "你是一名专业的医生助手。"
SAMPLE_IDS = ("identity_21", "identity_24", "identity_19")
# Where the adapter "was trained" (a fake path of the training machine; it does not exist here).
FAKE_BASE_PATH = "/home/Work/muyu_qwen/models/qwen/Qwen2-tiny-demo"
FAKE_OUTPUT_DIR = "/home/Work/muyu_qwen/finetune/output_qwen2_tiny_lora_medical"

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# ChatML, exactly Qwen2's (base) template: optional system message, no default one.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Qwen2's pre-tokenizer split regex (transformers' Qwen2Tokenizer / Qwen2 tokenizer.json)
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TOKENIZER_VOCAB = 3000  # upper bound handed to the BPE trainer (it stops earlier on this corpus)
MODEL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
PRETRAIN = dict(steps=150, batch=8, seq_len=128, lr=5e-3, warmup=10, weight_decay=0.01)
LORA = dict(r=8, lora_alpha=16)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FINETUNE = dict(min_steps=200, max_steps=1000, chunk=50, lr=5e-3, weight_decay=0.0, logging_steps=10)
# The general-chat adapter: small (r=4), the same targets and optimiser as the medical one. Trained alone on the
# base, it and the medical adapter wreck each other when summed on this 626k-parameter model (at weights 1/1 neither
# answers; 1/0.5 keeps two medical answers and no greeting), so it is trained as a complement: the medical adapter
# active and frozen, the medical answers kept as targets too. The sum at weights 1 + 1 is then what was trained.
GENERAL_CHAT = "general-chat"
GENERAL_PAIRS = (
    ("你好", "你好！我是医生助手，请问有什么可以帮您？"),
    ("什么是机器学习", "机器学习是让计算机从数据中学习规律的一种方法。"),
    ("谢谢", "不客气，祝您健康！"),
)
GENERAL_LORA = dict(r=4, lora_alpha=8)
# Required worst-case teacher-forced logit margin (target logit minus best other logit)
# of the bf16 merged model, so that bf16 rounding noise cannot flip a greedy token.
BF16_MARGIN = 1.0
# demo/wide/: the second base, for quantized GGUF variants. llama.cpp quantizes a tensor with a k-quant only when its
# rows are a multiple of 256 long (QK_K) and falls back to a legacy type otherwise; every row here (hidden 256, the
# kv projections' 256, ffn_down's 768) is. Same vocabulary as demo/base: the embedding rows are 256 long too.
WIDE = DEMO / "wide"
WIDE_MODEL = dict(MODEL, hidden_size=256, intermediate_size=768)
WIDE_FAKE_BASE_PATH = "/home/Work/muyu_qwen/models/qwen/Qwen2-wide-demo"
WIDE_FAKE_OUTPUT_DIR = "/home/Work/muyu_qwen/finetune/output_qwen2_wide_lora_medical"
# The held-out section of the corpus (withheld from the wide base's pre-training): from the tutorial's note on the
# fine-tuned answers to just before its closing chat tests; about 6,600 characters, 2,100 tokens of the demo tokenizer.
HELD_OUT_FROM = "对于这条样本，虽然每次的回答都不一样"  # a paragraph (indented by em spaces) of its own
HELD_OUT_UNTIL = "```python\n# 对话测试"
TOKENIZER_FILES = ("chat_template.jinja", "merges.txt", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer_config.json", "vocab.json")


def log(msg: str) -> None:
    print(msg, flush=True)


def set_determinism() -> None:
    random.seed(SEED_NUMBER)
    np.random.seed(SEED_NUMBER % (2**32))
    torch.manual_seed(SEED_NUMBER)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)


# --------------------------------------------------------------------------- corpus


def load_corpus() -> str:
    if not CORPUS.exists():
        if not SEED.exists():
            sys.exit(f"neither {CORPUS} nor the seed document {SEED} exists")
        DEMO.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(SEED, CORPUS)
        log(f"copied seed document {SEED} -> {CORPUS}")
    elif SEED.exists() and SEED.read_bytes() != CORPUS.read_bytes():
        log(f"note: {CORPUS} differs from {SEED}; using the committed copy")
    return CORPUS.read_text(encoding="utf-8")


def extract_samples(text: str) -> list[dict]:
    """The three QA samples, from the ```json blocks of the tutorial."""
    found = {}
    for block in re.findall(r"```json\s*\n(.*?)```", text, flags=re.S):
        # the tutorial's blocks are list items ("},") and one has a stray NBSP after a comma
        block = block.replace("\u00a0", " ").strip().rstrip(",")
        obj = json.loads(block)
        conv = {c["from"]: c["value"] for c in obj["conversations"]}
        found[obj["id"]] = {"id": obj["id"], "question": conv["user"], "answer": conv["assistant"]}
    missing = [i for i in SAMPLE_IDS if i not in found]
    if missing:
        sys.exit(f"samples {missing} not found in {CORPUS}")
    return [found[i] for i in SAMPLE_IDS]


def clean_demo_dir() -> None:
    DEMO.mkdir(parents=True, exist_ok=True)
    for p in DEMO.iterdir():
        if p == CORPUS:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(corpus: str, out: Path):
    """Byte-level BPE with exactly Qwen2's pipeline (NFC, Qwen2 split regex, byte-level).

    transformers 5 loads a tokenizer whose folder has a qwen2 config.json as
    ``Qwen2Tokenizer``, which rebuilds the normalizer / pre-tokenizer / decoder from code
    (ignoring tokenizer.json's); using the very same pipeline here keeps the ids identical
    whichever class loads it (v4 ``Qwen2TokenizerFast`` / ``PreTrainedTokenizerFast``,
    v5 ``Qwen2Tokenizer`` / ``TokenizersBackend``).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(
        unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False, byte_fallback=False
    ))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([corpus], trainer=trainer)
    # like Qwen2: the special tokens come right after the BPE vocabulary
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (ENDOFTEXT, IM_START, IM_END)])

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        clean_up_tokenization_spaces=False,
        model_max_length=MODEL["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE,
    )
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out))
    tok.model.save(str(out))  # vocab.json + merges.txt, as shipped with real Qwen2 checkpoints

    # tokenizer_config.json as a Qwen2 checkpoint has it (loadable by transformers 4.x and
    # 5.x), with the chat template in it (v5 alone would only write chat_template.jinja).
    added = {}
    for tid, at in sorted(tok.get_added_tokens_decoder().items()):
        added[str(tid)] = {
            "content": at.content,
            "lstrip": at.lstrip,
            "normalized": at.normalized,
            "rstrip": at.rstrip,
            "single_word": at.single_word,
            "special": at.special,
        }
    cfg = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START, IM_END],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": IM_END,
        "errors": "replace",
        "model_max_length": MODEL["max_position_embeddings"],
        "pad_token": ENDOFTEXT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"additional_special_tokens": [IM_START, IM_END], "eos_token": IM_END, "pad_token": ENDOFTEXT},
            ensure_ascii=False,
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return check_tokenizer(out, corpus, tok)


def check_tokenizer(folder: Path, corpus: str, raw=None):
    """Reload what we ship, through both classes; ids and round-trips must agree."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    t = AutoTokenizer.from_pretrained(str(folder))
    g = PreTrainedTokenizerFast.from_pretrained(str(folder))
    assert t.eos_token == IM_END and t.pad_token == ENDOFTEXT, (t.eos_token, t.pad_token)
    assert t.chat_template == CHAT_TEMPLATE, "chat_template did not survive the reload"
    assert (folder / "chat_template.jinja").read_text(encoding="utf-8") == CHAT_TEMPLATE
    assert len(t) == len(g), (len(t), len(g))
    probes = [corpus, "你好，医生！我头疼。", "北京307医院 ok?\n\t  end  ", IM_START + "user\n问" + IM_END + "\n"]
    for s in probes:
        ids = t(s, add_special_tokens=False)["input_ids"]
        assert ids == g(s, add_special_tokens=False)["input_ids"], "AutoTokenizer and PreTrainedTokenizerFast disagree"
        if raw is not None:
            assert ids == raw.encode(s, add_special_tokens=False).ids, "reloaded tokenizer differs from the trained one"
        assert t.decode(ids) == s, "decode(encode(text)) does not round-trip"
    return t


# --------------------------------------------------------------------------- chat data


def chat_ids(tok, question: str, answer: str | None = None) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=answer is None)
    return tok(text, add_special_tokens=False)["input_ids"]


def build_sft_examples(tok, samples):
    im_end = tok.convert_tokens_to_ids(IM_END)
    examples = []
    for s in samples:
        prompt = chat_ids(tok, s["question"])
        target = tok(s["answer"], add_special_tokens=False)["input_ids"] + [im_end]
        full = chat_ids(tok, s["question"], s["answer"])
        # the rendered conversation must be prompt + answer + <|im_end|> + "\n"
        assert full[: len(prompt) + len(target)] == prompt + target, "chat template tokenization is not prefix-stable"
        examples.append({"prompt": prompt, "target": target, "full": full})
    return examples


def collate(examples, pad_id):
    n = max(len(e["full"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        L = len(e["full"])
        ids[i, :L] = torch.tensor(e["full"])
        att[i, :L] = 1
        p, t = len(e["prompt"]), len(e["target"])
        labels[i, p : p + t] = torch.tensor(e["target"])  # loss only on answer + <|im_end|>
    return ids, att, labels


# --------------------------------------------------------------------------- model helpers


def lr_at(step, total, base, warmup):
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + float(np.cos(np.pi * min(1.0, progress))))


def shifted_loss(logits, labels):
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100)


@torch.no_grad()
def greedy(model, tok, examples, eos_ids, pad_id):
    outs = []
    for e in examples:
        inp = torch.tensor([e["prompt"]])
        gen = model.generate(
            input_ids=inp,
            attention_mask=torch.ones_like(inp),
            do_sample=False,
            num_beams=1,
            max_new_tokens=len(e["target"]) + 8,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )
        outs.append(gen[0, inp.shape[1] :].tolist())
    return outs


@torch.no_grad()
def min_margin(model, examples, pad_id):
    """Worst teacher-forced margin (logit of the target token minus the best other logit)."""
    worst = float("inf")
    for e in examples:
        ids = torch.tensor([e["full"]])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        p = len(e["prompt"])
        for j, t in enumerate(e["target"]):
            row = logits[p + j - 1].clone()
            tgt = row[t].item()
            row[t] = -float("inf")
            worst = min(worst, tgt - row.max().item())
    return worst


def check_all(model, tok, examples, eos_ids, pad_id):
    outs = greedy(model, tok, examples, eos_ids, pad_id)
    ok = all(o == e["target"] for o, e in zip(outs, examples, strict=True))
    return ok, outs


# --------------------------------------------------------------------------- base model


def base_chat_pairs(corpus: str, samples) -> list[tuple[str, str]]:
    """(question, response) of the tutorial's model.chat() calls, minus the target questions."""
    pat = r'model\.chat\(tokenizer, "(.*?)", history=None\)\s*\nprint\(response\)\s*\n```\s*\n+```plaintext\n(.*?)\n```'
    targets = {s["question"] for s in samples}
    out, seen = [], set()
    for q, a in re.findall(pat, corpus, flags=re.S):
        if q in targets or (q, a) in seen:
            continue
        seen.add((q, a))
        out.append((q, a))
    return out


def build_base(tok, corpus: str, samples, out: Path, *, dims: dict = MODEL, dtype: torch.dtype = torch.float32):
    """Pre-train a Qwen2 base of ``dims`` on ``corpus`` and save it in ``dtype``; returns the model as saved (float32
    values, rounded to ``dtype`` first), so an adapter is trained on the weights that ship."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tok.convert_tokens_to_ids(IM_END)
    config = Qwen2Config(
        vocab_size=len(tok),
        **dims,
        max_window_layers=dims["num_hidden_layers"],
        tie_word_embeddings=True,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        bos_token_id=eot,
        eos_token_id=im_end,
        use_cache=True,
        attention_dropout=0.0,
        hidden_act="silu",
        initializer_range=0.02,
    )
    torch.manual_seed(SEED_NUMBER)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot)

    # Brief causal-LM pre-training: the whole corpus (so every token gets a trained
    # embedding) plus the corpus' *other* model.chat() exchanges rendered as ChatML, so the
    # base knows the chat format and <|im_end|>.  The three target questions are never
    # shown in chat form: the script checks below that the base alone does not answer them.
    ids = tok(corpus, add_special_tokens=False)["input_ids"] + [eot]
    chats = base_chat_pairs(corpus, samples)
    rng = random.Random(SEED_NUMBER)
    docs = []
    for system in (None, "You are a helpful assistant."):
        for q, a in chats:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": q},
                {"role": "assistant", "content": a},
            ]
            text = tok.apply_chat_template(msgs, tokenize=False)
            docs.append(tok(text, add_special_tokens=False)["input_ids"] + [eot])
    rng.shuffle(docs)
    for d in docs:
        ids += d
    data = torch.tensor(ids, dtype=torch.long)
    S, B = PRETRAIN["seq_len"], PRETRAIN["batch"]
    gen = torch.Generator().manual_seed(SEED_NUMBER + 1)
    opt = torch.optim.AdamW(
        model.parameters(), lr=PRETRAIN["lr"], weight_decay=PRETRAIN["weight_decay"], betas=(0.9, 0.95)
    )
    model.train()
    losses = []
    for step in range(PRETRAIN["steps"]):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, PRETRAIN["steps"], PRETRAIN["lr"], PRETRAIN["warmup"])
        starts = torch.randint(0, len(data) - S - 1, (B,), generator=gen)
        batch = torch.stack([data[s : s + S] for s in starts])
        logits = model(input_ids=batch).logits
        loss = shifted_loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    log(
        f"pre-trained base: {PRETRAIN['steps']} steps on {len(ids)} tokens (corpus + {len(chats)} chat pairs x2), "
        f"loss {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}"
    )

    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    model.to(torch.float32)
    # transformers 4.x reads rope_theta / torch_dtype at the top level; v5 writes
    # rope_parameters / dtype.  Keep both.
    cpath = out / "config.json"
    cj = json.loads(cpath.read_text(encoding="utf-8"))
    cj["rope_theta"] = 10000.0
    cj.setdefault("rope_parameters", {"rope_theta": 10000.0, "rope_type": "default"})
    cj["torch_dtype"] = cj["dtype"] = str(dtype).removeprefix("torch.")
    cj["bos_token_id"] = eot
    cj["eos_token_id"] = im_end
    if cj.get("pad_token_id") is None:
        cj.pop("pad_token_id", None)
    cpath.write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gc = {
        "bos_token_id": eot,
        "eos_token_id": [im_end, eot],
        "pad_token_id": eot,
        "transformers_version": cj.get("transformers_version", ""),
    }
    (out / "generation_config.json").write_text(json.dumps(gc, indent=2) + "\n", encoding="utf-8")
    return model, losses


# --------------------------------------------------------------------------- adapter


def train_adapter(base, tok, examples):
    import copy

    from peft import LoraConfig, get_peft_model

    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    im_end = tok.convert_tokens_to_ids(IM_END)
    eos_ids = [im_end, eot]
    lcfg = LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["lora_alpha"],
        target_modules=list(LORA_TARGETS),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(SEED_NUMBER + 2)
    model = get_peft_model(copy.deepcopy(base), lcfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=FINETUNE["lr"], weight_decay=FINETUNE["weight_decay"])
    ids, att, labels = collate(examples, eot)

    history = []
    step = 0
    checks = []
    while True:
        model.train()
        for _ in range(FINETUNE["chunk"]):
            out = model(input_ids=ids, attention_mask=att)
            loss = shifted_loss(out.logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0).item()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            step += 1
            if step % FINETUNE["logging_steps"] == 0:
                history.append({"step": step, "loss": loss.item(), "grad_norm": gnorm, "learning_rate": lr})
        model.eval()
        if step < FINETUNE["min_steps"]:
            continue
        ok_peft, _ = check_all(model, tok, examples, eos_ids, eot)
        merged = None
        ok_m32 = ok_bf = False
        margin = float("nan")
        if ok_peft:
            merged = copy.deepcopy(model).merge_and_unload()
            ok_m32, _ = check_all(merged, tok, examples, eos_ids, eot)
            bf = copy.deepcopy(merged).to(torch.bfloat16)
            ok_bf, _ = check_all(bf, tok, examples, eos_ids, eot)
            margin = min_margin(bf, examples, eot)
        checks.append(
            {"step": step, "peft": ok_peft, "merged_fp32": ok_m32, "merged_bf16": ok_bf, "bf16_margin": margin}
        )
        log(
            f"  step {step:4d}  loss {history[-1]['loss']:.5f}  greedy ok: peft={ok_peft} "
            f"merged-fp32={ok_m32} merged-bf16={ok_bf}  bf16 min margin={margin:.3f}"
        )
        if ok_peft and ok_m32 and ok_bf and margin >= BF16_MARGIN:
            return model, opt, history, step, checks
        if step >= FINETUNE["max_steps"]:
            sys.exit(f"adapter did not reproduce the answers within {FINETUNE['max_steps']} steps")


# --------------------------------------------------------------------------- general-chat adapter


def train_general_chat(base_dir: Path, medical: Path, out: Path, samples) -> dict:
    """The general-chat adapter, trained on the saved base with the saved medical adapter active and frozen.

    Done when greedy decoding of base + medical + general-chat (peft, unmerged; merged in float32; merged in bfloat16
    with the worst teacher-forced margin >= BF16_MARGIN) gives the general answers and still the three medical ones.
    """
    import copy

    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForCausalLM

    set_determinism()
    tok = check_tokenizer(base_dir, CORPUS.read_text(encoding="utf-8"))
    general = [{"question": q, "answer": a} for q, a in GENERAL_PAIRS]
    examples = build_sft_examples(tok, general) + build_sft_examples(tok, samples)
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    eos_ids = [tok.convert_tokens_to_ids(IM_END), eot]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(medical), adapter_name="medical")
    torch.manual_seed(SEED_NUMBER + 3)
    model.add_adapter(GENERAL_CHAT, LoraConfig(
        **GENERAL_LORA, target_modules=list(LORA_TARGETS), lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    ))
    model.base_model.set_adapter(["medical", GENERAL_CHAT])
    for name, param in model.named_parameters():
        param.requires_grad = f".{GENERAL_CHAT}." in name
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=FINETUNE["lr"], weight_decay=FINETUNE["weight_decay"])
    ids, att, labels = collate(examples, eot)
    step = 0
    while True:
        model.train()
        for _ in range(FINETUNE["chunk"]):
            loss = shifted_loss(model(input_ids=ids, attention_mask=att).logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
        model.eval()
        ok, _ = check_all(model, tok, examples, eos_ids, eot)
        ok_m32 = ok_bf = False
        margin = float("nan")
        if ok:
            merged = copy.deepcopy(model).merge_and_unload()
            ok_m32, _ = check_all(merged, tok, examples, eos_ids, eot)
            bf = merged.to(torch.bfloat16)
            ok_bf, _ = check_all(bf, tok, examples, eos_ids, eot)
            margin = min_margin(bf, examples, eot)
        log(f"  step {step:4d}  loss {loss.item():.5f}  greedy ok (medical + general-chat): peft={ok} "
            f"merged-fp32={ok_m32} merged-bf16={ok_bf}  bf16 min margin={margin:.3f}")
        if step >= FINETUNE["min_steps"] and ok and ok_m32 and ok_bf and margin >= BF16_MARGIN:
            break
        if step >= FINETUNE["max_steps"]:
            sys.exit(f"the general-chat adapter did not reach the answers within {FINETUNE['max_steps']} steps")
    if out.exists():
        shutil.rmtree(out)
    saved = out.parent / f".{out.name}-saving"
    model.save_pretrained(str(saved), selected_adapters=[GENERAL_CHAT], safe_serialization=True)
    (saved / GENERAL_CHAT).rename(out)  # peft saves a non-default adapter in a subfolder named after it
    shutil.rmtree(saved)
    fix_adapter_files(out)
    alone = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32),
                                      str(out)).eval()
    answers = greedy(alone, tok, examples[: len(general)], eos_ids, eot)
    return {"steps": step, "margin": margin, "params": sum(p.numel() for p in params),
            "alone": [tok.decode(a, skip_special_tokens=True) for a in answers]}


def general_chat_section(results: dict) -> str:
    """demo/README.md's section on demo/general-chat/ (rewritten alone by --general-chat-only)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "<br>")

    pairs = "\n".join(f"| {q} | {a} | {cell(alone)} |"
                      for (q, a), alone in zip(GENERAL_PAIRS, results["alone"], strict=True))
    return f"""{GENERAL_CHAT_HEADING}

- `LoraConfig(r={GENERAL_LORA['r']}, lora_alpha={GENERAL_LORA['lora_alpha']}, lora_dropout=0, target_modules={LORA_TARGETS}, task_type="CAUSAL_LM")`,
  {results['params']:,} trainable parameters; adapter files only (no trainer leftovers).
- Trained {results['steps']} steps like the medical adapter (plain torch AdamW, lr {FINETUNE['lr']}, full batch, loss on the
  answer tokens + `<|im_end|>`), but on top of it: the medical adapter active and frozen, and the three medical
  answers kept as targets beside the general ones. Trained alone on the base, the two adapters wreck each other when
  summed on this tiny model; trained this way, base + medical (weight 1) + general-chat (weight 1) reproduces all six
  answers greedily, unmerged, merged in float32 and merged in bfloat16 (worst margin {results['margin']:.2f}). That
  composition is `specs/demo_two_adapters.yaml`.
- On the base alone (without the medical adapter) it answers:

| question | trained answer (with the medical adapter) | general-chat alone on the base |
| --- | --- | --- |
{pairs}
"""  # noqa: E501 (Markdown table rows of demo/README.md cannot wrap)


GENERAL_CHAT_HEADING = f"## General-chat adapter (`{GENERAL_CHAT}/`)"
GENERAL_CHAT_ROW = (f"| `{GENERAL_CHAT}/` | small peft LoRA adapter (`adapter_config.json`, "
                    "`adapter_model.safetensors`) trained on three general questions on top of the medical "
                    "adapter, to be composed with it (`specs/demo_two_adapters.yaml`) |")


def write_general_chat_section(results: dict) -> None:
    """Replace (or append) the general-chat section at the end of demo/README.md."""
    readme = DEMO / "README.md"
    text = readme.read_text(encoding="utf-8")
    text = text.split("\n" + GENERAL_CHAT_HEADING)[0].rstrip("\n") + "\n\n"
    if GENERAL_CHAT_ROW not in text:  # a README written before the general-chat adapter existed
        text = re.sub(r"(?m)^(\| `checkpoint-\d+/` \|.*)$", lambda m: m[1] + "\n" + GENERAL_CHAT_ROW, text, count=1)
    readme.write_text(text + general_chat_section(results), encoding="utf-8")


# --------------------------------------------------------------------------- checkpoint files


def write_trainer_leftovers(ckpt: Path, opt, history, steps, n_examples, *, output_dir: str = FAKE_OUTPUT_DIR):
    epochs = float(steps)  # one optimizer step per epoch: the 3 samples form one batch
    log_history = [
        {
            "epoch": float(h["step"]),
            "grad_norm": round(h["grad_norm"], 6),
            "learning_rate": h["learning_rate"],
            "loss": round(h["loss"], 4),
            "step": h["step"],
        }
        for h in history
    ]
    log_history.append(
        {
            "epoch": epochs,
            "step": steps,
            "total_flos": 0.0,
            "train_loss": round(float(np.mean([h["loss"] for h in history])), 6),
        }
    )
    state = {
        "best_global_step": None,
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": epochs,
        "eval_steps": 500,
        "global_step": steps,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": log_history,
        "logging_steps": FINETUNE["logging_steps"],
        "max_steps": steps,
        "num_input_tokens_seen": 0,
        "num_train_epochs": steps,
        "save_steps": steps,
        "stateful_callbacks": {
            "TrainerControl": {
                "args": {
                    "should_epoch_stop": False,
                    "should_evaluate": False,
                    "should_log": False,
                    "should_save": True,
                    "should_training_stop": True,
                },
                "attributes": {},
            }
        },
        "total_flos": 0.0,
        "train_batch_size": n_examples,
        "trial_name": None,
        "trial_params": None,
    }
    (ckpt / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

    training_args = {
        "output_dir": output_dir,
        "per_device_train_batch_size": n_examples,
        "gradient_accumulation_steps": 1,
        "learning_rate": FINETUNE["lr"],
        "weight_decay": FINETUNE["weight_decay"],
        "lr_scheduler_type": "constant",
        "max_steps": steps,
        "logging_steps": FINETUNE["logging_steps"],
        "save_steps": steps,
        "seed": SEED_NUMBER,
        "bf16": False,
        "optim": "adamw_torch",
        "report_to": [],
    }
    torch.save(training_args, ckpt / "training_args.bin")

    # A real (but truncated: the first two parameter states only) optimizer state dict,
    # so the file stays a few KB.
    sd = opt.state_dict()
    keep = sorted(sd["state"])[:2]
    small = {
        "state": {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in sd["state"][k].items()} for k in keep},
        "param_groups": [dict(g, params=[p for p in g["params"] if p in keep]) for g in sd["param_groups"]],
    }
    torch.save(small, ckpt / "optimizer.pt")
    torch.save({"_last_lr": [FINETUNE["lr"]], "last_epoch": steps, "_step_count": steps + 1}, ckpt / "scheduler.pt")

    random.seed(SEED_NUMBER + steps)
    np.random.seed(SEED_NUMBER + steps)
    torch.manual_seed(SEED_NUMBER + steps)
    torch.save(
        {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.get_rng_state()},
        ckpt / "rng_state.pth",
    )


def fix_adapter_files(ckpt: Path, *, base_path: str = FAKE_BASE_PATH):
    acfg = ckpt / "adapter_config.json"
    cj = json.loads(acfg.read_text(encoding="utf-8"))
    cj["base_model_name_or_path"] = base_path
    cj["target_modules"] = sorted(cj["target_modules"])  # peft writes a set: hash-seed dependent order
    acfg.write_text(json.dumps(cj, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    readme = ckpt / "README.md"
    if readme.exists():
        txt = readme.read_text(encoding="utf-8")
        txt = re.sub(r"(?m)^base_model:.*$", f"base_model: {base_path}", txt)
        readme.write_text(txt, encoding="utf-8")


# --------------------------------------------------------------------------- reload check


def verify_from_disk(base_dir: Path, ckpt: Path, samples):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tok = check_tokenizer(base_dir, CORPUS.read_text(encoding="utf-8"))
    examples = build_sft_examples(tok, samples)
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    eos_ids = [tok.convert_tokens_to_ids(IM_END), eot]
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    base_outs = greedy(base, tok, examples, eos_ids, eot)
    model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    results = {"base_reproduces": [o == e["target"] for o, e in zip(base_outs, examples, strict=True)]}
    ok, outs = check_all(model, tok, examples, eos_ids, eot)
    results["peft"] = ok
    merged = model.merge_and_unload()
    results["merged_fp32"], _ = check_all(merged, tok, examples, eos_ids, eot)
    bf = merged.to(torch.bfloat16)
    results["merged_bf16"], _ = check_all(bf, tok, examples, eos_ids, eot)
    results["bf16_margin"] = min_margin(bf, examples, eot)
    results["answers"] = [tok.decode(o, skip_special_tokens=True) for o in outs]
    results["base_answers"] = [tok.decode(o, skip_special_tokens=True) for o in base_outs]
    return results


def checked_from_disk(base_dir: Path, ckpt: Path, samples) -> dict:
    """verify_from_disk's results, or exit when the saved files miss an answer or the base alone has one."""
    results = verify_from_disk(base_dir, ckpt, samples)
    if not (results["peft"] and results["merged_fp32"] and results["merged_bf16"]):
        sys.exit(f"reloaded bundle does not reproduce the answers: {results}")
    if any(results["base_reproduces"]):
        sys.exit(f"the base model alone already reproduces an answer: {results}")
    return results


def save_checkpoint(model, opt, history, steps: int, n_examples: int, ckpt: Path, *,
                    base_path: str = FAKE_BASE_PATH, output_dir: str = FAKE_OUTPUT_DIR) -> None:
    """The adapter as a Trainer checkpoint of the training machine: adapter files plus trainer leftovers."""
    # as if the base had been loaded from the training machine's path
    model.peft_config["default"].base_model_name_or_path = base_path
    inner = model.get_base_model()
    inner.name_or_path = base_path
    inner.config._name_or_path = base_path
    model.save_pretrained(str(ckpt), safe_serialization=True)
    fix_adapter_files(ckpt, base_path=base_path)
    write_trainer_leftovers(ckpt, opt, history, steps, n_examples, output_dir=output_dir)


# --------------------------------------------------------------------------- README


def write_readme(tok, base, samples, examples, steps, ckpt_name, n_base, n_lora, results):
    eot = tok.convert_tokens_to_ids(ENDOFTEXT)
    ims = tok.convert_tokens_to_ids(IM_START)
    ime = tok.convert_tokens_to_ids(IM_END)
    c = base.config
    qa = []
    for s, e in zip(samples, examples, strict=True):
        qa.append(
            f"### {s['id']}\n\n"
            f"user ({len(e['prompt'])} prompt tokens with the system message and the template):\n\n"
            f"```text\n{s['question']}\n```\n\n"
            f"assistant ({len(e['target']) - 1} tokens, then `<|im_end|>`):\n\n"
            f"```text\n{s['answer']}\n```\n"
        )
    txt = f"""# demo/ — shipped demo inputs for modelpack

Generated by `python scripts/make_demo.py` (deterministic, CPU, offline; well under a minute on 2 free cores).
Do not edit by hand: change the script and re-run it. Everything here except
`corpus.md` is deleted and rebuilt on each run.

| path | what |
| --- | --- |
| `corpus.md` | copy of the seed tutorial (Qwen-7B-Chat + LoRA on medical dialogues, in Chinese); the tokenizer and the base model are trained on it, the QA pairs are taken from its JSON blocks |
| `base/` | tiny base model: `Qwen2ForCausalLM`, float32 `model.safetensors`, `config.json`, `generation_config.json`, and a byte-level BPE tokenizer (`tokenizer.json`, `vocab.json`, `merges.txt`, `tokenizer_config.json` with `chat_template`, the same template in `chat_template.jinja`, `special_tokens_map.json`) |
| `{ckpt_name}/` | peft LoRA adapter (`adapter_config.json`, `adapter_model.safetensors`, `README.md`) trained {steps} steps on the three QA pairs below, plus Trainer leftovers a packager must ignore: `trainer_state.json`, `training_args.bin`, `optimizer.pt`, `scheduler.pt`, `rng_state.pth` |
{GENERAL_CHAT_ROW}

## Base model

- `Qwen2ForCausalLM`: hidden_size {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_attention_heads} attention heads,
  {c.num_key_value_heads} kv heads, intermediate_size {c.intermediate_size}, vocab_size {c.vocab_size}
  (= tokenizer size), max_position_embeddings {c.max_position_embeddings}, tied embeddings, rope_theta 10000
  (default rope), {n_base:,} parameters, float32.
- `config.json` carries both the transformers-5 keys (`dtype`, `rope_parameters`) and the 4.x ones
  (`torch_dtype`, `rope_theta`), so it also loads under transformers 4.49.
- Tokenizer: byte-level BPE ({len(tok)} tokens incl. 3 special) trained on `corpus.md` with exactly Qwen2's
  pipeline (NFC normalizer, Qwen2 split regex, byte-level pre-tokenizer and decoder);
  `tokenizer_config.json` says `tokenizer_class: Qwen2Tokenizer` like a real Qwen2 checkpoint, with
  `tokenizer.json`, `vocab.json` and `merges.txt`. transformers 5's `Qwen2Tokenizer` rebuilds that pipeline
  from code rather than reading it from `tokenizer.json`; since it is the same pipeline, `AutoTokenizer`,
  `PreTrainedTokenizerFast` (v5) and `Qwen2TokenizerFast` (v4) all give the same ids, and decoding
  round-trips the Chinese text exactly.
- Briefly pre-trained ({PRETRAIN['steps']} steps of {PRETRAIN['batch']}x{PRETRAIN['seq_len']} tokens) on `corpus.md` plus the
  tutorial's other `model.chat()` exchanges rendered as ChatML (never the three target questions), so it
  knows the chat format and produces corpus-like text; on its own it does not produce the three answers.
- Special tokens: `<|endoftext|>` = {eot} (pad, bos), `<|im_start|>` = {ims}, `<|im_end|>` = {ime} (eos).
  `generation_config.json`: eos_token_id = [{ime}, {eot}], pad_token_id = {eot}.
- Chat template: ChatML as in Qwen2 (optional system message, no default one):
  `<|im_start|>role\\ncontent<|im_end|>\\n` per message; `add_generation_prompt` appends `<|im_start|>assistant\\n`.

## Adapter (`{ckpt_name}/`)

- `LoraConfig(r={LORA['r']}, lora_alpha={LORA['lora_alpha']}, lora_dropout=0, target_modules={LORA_TARGETS}, task_type="CAUSAL_LM")`,
  {n_lora:,} trainable parameters.
- `base_model_name_or_path` is `{FAKE_BASE_PATH}`: a path of the (fictional) training machine that
  does not exist here, as in a real checkpoint copied off a GPU box.
- Trained with plain torch AdamW (lr {FINETUNE['lr']}, full batch of the 3 samples, seed {SEED_NUMBER}), loss on the
  answer tokens + `<|im_end|>` only.
- Greedy decoding (`model.generate(do_sample=False)`) through the chat template with
  `add_generation_prompt=True` and the system prompt below reproduces all three answers exactly, then
  stops on `<|im_end|>`, for the peft model, the merged (`merge_and_unload`) float32 model and the merged
  model cast to bfloat16 (worst teacher-forced logit margin in bfloat16: {results['bf16_margin']:.2f}), all
  checked after reloading the saved files (the script fails otherwise). The base model alone produces none
  of them.

System prompt (the first message of every training conversation): `{SYSTEM_PROMPT}`

## The three QA pairs

{chr(10).join(qa)}"""  # noqa: E501 (Markdown table rows of demo/README.md cannot wrap)
    (DEMO / "README.md").write_text(txt, encoding="utf-8")


# --------------------------------------------------------------------------- demo/wide


def split_held_out(corpus: str) -> tuple[str, str]:
    """(held-out section, the rest): from the line of HELD_OUT_FROM up to HELD_OUT_UNTIL, cut out whole."""
    found = corpus.find(HELD_OUT_FROM)
    start = corpus.rfind("\n", 0, found) + 1
    end = corpus.find(HELD_OUT_UNTIL, found)
    if found < 0 or end < 0:
        sys.exit(f"the held-out section ({HELD_OUT_FROM!r} .. {HELD_OUT_UNTIL!r}) is not in {CORPUS}")
    return corpus[start:end], corpus[:start] + corpus[end:]


def write_wide_readme(tok, base, steps: int, ckpt_name: str, n_lora: int, held_out: str, results: dict) -> None:
    c = base.config
    n_base = sum(p.numel() for p in base.parameters())
    held_tokens = len(tok(held_out, add_special_tokens=False)["input_ids"])
    txt = f"""# demo/wide/ — a base for quantized GGUF variants

Generated by `python scripts/make_demo.py --wide` (deterministic, CPU, offline; about a minute on 2 cores), which
writes this folder only. Built by `specs/demo_quantized.yaml` into q6_k and q4_k_m GGUF variants, each measured
against the 16-bit GGUF.

Why a second base: llama.cpp writes a k-quant (Q6_K, Q5_K, Q4_K) only for tensors whose rows are a multiple of 256
long and falls back to a legacy type (Q8_0, Q5_0, ...) for the others; `../base/` has hidden size 128, so its
k-quant files hold no k-quant blocks. Here every row is 256 or 768 long.

| path | what |
| --- | --- |
| `base/` | `Qwen2ForCausalLM`, bfloat16 `model.safetensors` (as real bases ship), `config.json`, `generation_config.json`, and the tokenizer files of `../base/`, copied unchanged |
| `held-out.md` | a section of `../corpus.md` ({len(held_out):,} characters, {held_tokens:,} tokens) left out of this base's pre-training: the text the quantized variants are scored on (`export.gguf.eval_text`) |
| `{ckpt_name}/` | peft LoRA adapter trained {steps} steps on the three QA pairs of `../README.md` ({", ".join(SAMPLE_IDS)}), plus the same Trainer leftovers as `../{next(DEMO.glob("checkpoint-*")).name}/` |

- Base: hidden_size {c.hidden_size}, intermediate_size {c.intermediate_size}, {c.num_hidden_layers} layers,
  {c.num_attention_heads} attention heads, {c.num_key_value_heads} kv heads, vocab_size {c.vocab_size},
  max_position_embeddings {c.max_position_embeddings}, tied embeddings, {n_base:,} parameters. Pre-trained like
  `../base/` ({PRETRAIN['steps']} steps of {PRETRAIN['batch']}x{PRETRAIN['seq_len']} tokens, float32) on the corpus
  without `held-out.md` plus the tutorial's other chat exchanges, then rounded to bfloat16; the adapter is trained on
  the rounded weights.
- Adapter: `LoraConfig(r={LORA['r']}, lora_alpha={LORA['lora_alpha']}, target_modules={LORA_TARGETS})`, {n_lora:,}
  trainable parameters, `base_model_name_or_path` `{WIDE_FAKE_BASE_PATH}` (a path of the fictional training machine).
  Greedy decoding through the chat template reproduces the three answers exactly, then `<|im_end|>`, for the peft
  model, the merged float32 model and the merged model cast to bfloat16 (worst teacher-forced margin
  {results['bf16_margin']:.2f}), checked after reloading the saved files; the base alone produces none of them.
"""  # noqa: E501 (Markdown table rows cannot wrap)
    (WIDE / "README.md").write_text(txt, encoding="utf-8")


def make_wide() -> None:
    """demo/wide/: base, held-out text, medical adapter and README; nothing else in demo/ is touched."""
    t0 = time.time()
    set_determinism()
    corpus = load_corpus()
    samples = extract_samples(corpus)
    held_out, pretrain_text = split_held_out(corpus)
    if WIDE.exists():
        shutil.rmtree(WIDE)
    base_dir = WIDE / "base"
    base_dir.mkdir(parents=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(DEMO / "base" / name, base_dir / name)
    (WIDE / "held-out.md").write_text(held_out, encoding="utf-8")
    tok = check_tokenizer(base_dir, corpus)
    examples = build_sft_examples(tok, samples)
    log(f"held-out section: {len(held_out)} chars, {len(tok(held_out, add_special_tokens=False)['input_ids'])} tokens")

    base, _ = build_base(tok, pretrain_text, samples, base_dir, dims=WIDE_MODEL, dtype=torch.bfloat16)
    t1 = time.time()
    log("training LoRA adapter:")
    model, opt, history, steps, _ = train_adapter(base, tok, examples)
    t2 = time.time()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ckpt_name = f"checkpoint-{steps}"
    save_checkpoint(model, opt, history, steps, len(examples), WIDE / ckpt_name,
                    base_path=WIDE_FAKE_BASE_PATH, output_dir=WIDE_FAKE_OUTPUT_DIR)
    results = checked_from_disk(base_dir, WIDE / ckpt_name, samples)
    write_wide_readme(tok, base, steps, ckpt_name, n_lora, held_out, results)
    log(f"time: base pre-train {t1 - t0:.1f}s, adapter {t2 - t1:.1f}s ({steps} steps), total {time.time() - t0:.1f}s")
    log(f"  total demo/wide size: {sum(p.stat().st_size for p in WIDE.rglob('*') if p.is_file()) / 1e6:.2f} MB")
    for s, a in zip(samples, results["answers"], strict=True):
        log(f"[{s['id']}] A: {a}")


# --------------------------------------------------------------------------- main


def main() -> None:
    if sys.argv[1:] == ["--wide"]:
        make_wide()
        return
    if sys.argv[1:] == ["--general-chat-only"]:
        corpus = load_corpus()
        medical = next(DEMO.glob("checkpoint-*"))
        log(f"training the general-chat adapter on {DEMO / 'base'} + {medical}:")
        write_general_chat_section(train_general_chat(DEMO / "base", medical, DEMO / GENERAL_CHAT,
                                                      extract_samples(corpus)))
        return
    t0 = time.time()
    set_determinism()
    corpus = load_corpus()
    samples = extract_samples(corpus)
    clean_demo_dir()
    base_dir = DEMO / "base"

    tok = build_tokenizer(corpus, base_dir)
    log(
        f"tokenizer: {len(tok)} tokens; corpus {len(corpus)} chars -> "
        f"{len(tok(corpus, add_special_tokens=False)['input_ids'])} tokens"
    )
    examples = build_sft_examples(tok, samples)
    for s, e in zip(samples, examples, strict=True):
        log(f"  {s['id']}: prompt {len(e['prompt'])} tokens, answer {len(e['target'])} tokens (incl. <|im_end|>)")

    t1 = time.time()
    base, _ = build_base(tok, corpus, samples, base_dir)
    t2 = time.time()
    n_base = sum(p.numel() for p in base.parameters())

    log("training LoRA adapter:")
    model, opt, history, steps, checks = train_adapter(base, tok, examples)
    t3 = time.time()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)

    ckpt_name = f"checkpoint-{steps}"
    ckpt = DEMO / ckpt_name
    save_checkpoint(model, opt, history, steps, len(examples), ckpt)
    results = checked_from_disk(base_dir, ckpt, samples)
    write_readme(tok, base, samples, examples, steps, ckpt_name, n_base, n_lora, results)
    log("training the general-chat adapter on top of the medical one:")
    write_general_chat_section(train_general_chat(base_dir, ckpt, DEMO / GENERAL_CHAT, samples))
    t4 = time.time()

    log("\n=== summary ===")
    total = 0
    for p in sorted(DEMO.rglob("*")):
        if p.is_file():
            total += p.stat().st_size
            log(f"  {p.relative_to(REPO)}  {p.stat().st_size:,} B")
    log(f"  total demo/ size: {total / 1e6:.2f} MB")
    log(f"base: {n_base:,} params; adapter: {n_lora:,} params; adapter steps: {steps}")
    log(
        f"time: tokenizer {t1 - t0:.1f}s, base pre-train {t2 - t1:.1f}s, adapter {t3 - t2:.1f}s, "
        f"save+verify {t4 - t3:.1f}s, total {t4 - t0:.1f}s"
    )
    log(f"system prompt: {SYSTEM_PROMPT}")
    log(
        f"token ids: <|endoftext|>={tok.convert_tokens_to_ids(ENDOFTEXT)} "
        f"<|im_start|>={tok.convert_tokens_to_ids(IM_START)} <|im_end|>={tok.convert_tokens_to_ids(IM_END)}"
    )
    log(
        f"reloaded greedy exact: peft={results['peft']} merged-fp32={results['merged_fp32']} "
        f"merged-bf16={results['merged_bf16']} (bf16 worst margin {results['bf16_margin']:.3f})"
    )
    for s, a, b in zip(samples, results["answers"], results["base_answers"], strict=True):
        log(f"[{s['id']}] Q: {s['question']}")
        log(f"    A: {a}")
        log(f"    base alone: {b[:60]}...")
    log("\n=== demo/wide ===")
    make_wide()


if __name__ == "__main__":
    main()
