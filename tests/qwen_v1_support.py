"""Sources for the Qwen-v1 (remote code) tests: the fixture model, LoRA checkpoints as Qwen's finetune.py leaves
them."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
from pathlib import Path

import torch

from fixtures.qwen_v1.make_qwen_v1 import make_qwen_v1_model, write_trainer_checkpoint_tokenizer_files

# The seed walkthrough's three samples (medical_treatment.json identity_21, identity_24, identity_19). The third
# answer is cut to the training answer's first two clauses (the seed's own replies differ after them) so that
# training stays a few seconds on CPU.
SEED_SAMPLES = [
    ("我家宝宝六个月，吃奶、睡觉常常满头冒汗，以前是不出汗的。还有发现两三次吃奶的时候全身发抖，请问这是不是病，如何医治？",
     "这是缺钙的原因。是不是睡觉时头发根部也全是汗？"),
    ("创伤性股骨头坏死（股骨颈骨折）干细胞治疗可行吗？北京哪家医院治疗最好？",
     "北京307医院骨科干细胞移植治疗创伤性股骨头坏死最佳。"),
    ("手毛，脚毛都很多，很密，都不知道怎么办，有什么永远脱毛方法，不想激光脱毛",
     "雄性激素过多导致的，汗毛是毛孔是汗液排出的主要方式之一，除去的话也许会使汗液得不到充分释放，这样体内毒素就会增加。"),
]
# The general prompts the seed tried on the fine-tuned model.
SEED_PROBES = ["你好", "什么是机器学习"]
TARGET_MODULES = ["c_attn", "c_proj", "w1", "w2"]
# Where the seed's adapter was trained; adapter_config.json records it, and it does not exist here.
TRAINING_MACHINE_BASE = "/home/Work/00.Work_muyu/muyu_qwen/models/qwen/Qwen-7B-Chat"
QWEN_DEFAULT_SYSTEM = "You are a helpful assistant."
# Like the published Qwen-7B-Chat code (chat_stream imports transformers_stream_generator inside the method),
# the fixture's modeling file gets an import inside a function; transformers' check_imports still requires it.
EXTRA_MODELING_CODE = '''

def _config_as_yaml(config):
    """Not used by the model: a function-level import, as the published Qwen code has in chat_stream."""
    import yaml

    return yaml.safe_dump(config.to_dict())
'''
# A line Qwen's finetune.py run would not write; it makes the checkpoint's tokenizer code tell from the base's.
CHECKPOINT_CODE_MARK = "\n# saved into the checkpoint by finetune.py\n"

RIVAL_TOKENS = 255

_CACHE: dict = {}


def qwen_base(root: Path) -> Path:
    """The Qwen-v1-shaped base in bfloat16 (as Qwen-7B-Chat ships), made once per test session."""
    key = ("base", root)
    if key not in _CACHE:
        base = make_qwen_v1_model(root / "Qwen-7B-Chat", seed=0, dtype="bfloat16")
        with open(base / "modeling_qwen.py", "a", encoding="utf-8") as f:
            f.write(EXTRA_MODELING_CODE)
        _CACHE[key] = base
    return _CACHE[key]


def finish_checkpoint(checkpoint: Path, base: Path) -> Path:
    """What Qwen's finetune.py leaves beside the adapter: tokenizer files (code included) and trainer state."""
    write_trainer_checkpoint_tokenizer_files(checkpoint, base)
    with open(checkpoint / "tokenization_qwen.py", "a", encoding="utf-8") as f:
        f.write(CHECKPOINT_CODE_MARK)
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = TRAINING_MACHINE_BASE
    (checkpoint / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64)}}}, checkpoint / "optimizer.pt")
    torch.save({"last_epoch": 1}, checkpoint / "scheduler.pt")
    torch.save({"python": 1}, checkpoint / "rng_state.pth")
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    return checkpoint


def load_fixture(base: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype=dtype)
    return model, tokenizer


def random_checkpoint(root: Path) -> Path:
    """A LoRA on c_attn, c_proj (attention and MLP), w1 and w2 with random, non-zero A and B."""
    key = ("random", root)
    if key not in _CACHE:
        from peft import LoraConfig, get_peft_model

        base = qwen_base(root)
        model, _ = load_fixture(base, torch.float32)
        torch.manual_seed(1)
        config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=TARGET_MODULES,
                            init_lora_weights=False)
        checkpoint = root / "output_qwen_lora" / "checkpoint-10"
        get_peft_model(model, config).save_pretrained(checkpoint)
        _CACHE[key] = finish_checkpoint(checkpoint, base)
    return _CACHE[key]


def seed_checkpoint(root: Path) -> Path:
    """A LoRA trained (plain torch, fixed seeds, seconds on CPU) until greedy chat gives the seed's answers."""
    key = ("seed", root)
    if key not in _CACHE:
        base = qwen_base(root)
        checkpoint = root / "output_qwen_lora_medical" / "checkpoint-60"
        train_seed_adapter(base, checkpoint)
        _CACHE[key] = finish_checkpoint(checkpoint, base)
    return _CACHE[key]


def train_seed_adapter(base: Path, checkpoint: Path, *, max_steps: int = 300, margin: float = 0.3) -> int:
    """Full-batch Adam on the three ChatML samples; stops once every answer token wins by `margin` logits."""
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, tokenizer = load_fixture(base, torch.float32)
    # The model's own prompt builder, from the package transformers imported its code as.
    package = type(model).__module__.rpartition(".")[0]
    make_context = importlib.import_module(f"{package}.qwen_generation_utils").make_context
    rows = []
    for question, answer in SEED_SAMPLES:
        _, context = make_context(tokenizer, question, [], QWEN_DEFAULT_SYSTEM, 1024)
        rows.append((context, tokenizer.encode(answer, allowed_special=set()) + [tokenizer.im_end_id]))
    length = max(len(c) + len(a) for c, a in rows)
    input_ids = torch.full((len(rows), length), tokenizer.eod_id)
    labels = torch.full((len(rows), length), -100)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (context, answer) in enumerate(rows):
        sequence = context + answer
        input_ids[i, : len(sequence)] = torch.tensor(sequence)
        attention_mask[i, : len(sequence)] = 1
        labels[i, len(context): len(sequence)] = torch.tensor(answer)

    config = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGET_MODULES)
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    head = inner.lm_head.weight.detach()
    optimizer = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    answer_positions = labels[:, 1:] != -100
    targets = labels[:, 1:][answer_positions]
    steps = 0  # optimizer steps taken before every answer token won by `margin`
    for _ in range(max_steps):
        hidden = inner.transformer(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        hidden = hidden.last_hidden_state[:, :-1][answer_positions]
        with torch.no_grad():  # greedy decoding's view: every answer token against the whole vocabulary
            logits = hidden @ head.T
            target_logits = logits.gather(1, targets[:, None])[:, 0]
            logits.scatter_(1, targets[:, None], float("-inf"))
            if (target_logits - logits.max(dim=1).values).min().item() > margin:
                break
            rivals = logits.topk(RIVAL_TOKENS, dim=1).indices
        # The vocabulary is 151,936 wide: the loss looks at each target against its strongest rivals only.
        candidates = torch.cat([targets[:, None], rivals], dim=1)
        candidate_logits = torch.einsum("nd,nkd->nk", hidden, head[candidates])
        loss = torch.nn.functional.cross_entropy(candidate_logits, torch.zeros_like(targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    else:
        raise AssertionError(f"the adapter did not learn the seed's answers in {max_steps} steps")
    peft_model.save_pretrained(checkpoint)
    return steps


def subprocess_env(**extra: str) -> dict[str, str]:
    """An offline environment that cannot import modelpack's sources."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1", **extra)
    return env


def run_python(python: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    process = subprocess.run([python, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True,
                             text=True, encoding="utf-8", timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{process.stdout}\n{process.stderr[-4000:]}"
    return process
