"""Reading the base model folder and the adapter checkpoint, without loading any weights."""

from __future__ import annotations

import ast
import atexit
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from builder.errors import ModelpackError, SourceError
from builder.safetensors_io import TensorLocation, read_safetensors_header

# Files a tokenizer may consist of; any of them present in a folder is copied as-is.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_FILE_PATTERNS = ("*.tiktoken",)
# The files that hold a vocabulary (a tokenizer folder without any of them, or a *.tiktoken, holds no tokenizer).
VOCABULARY_FILE_NAMES = ("tokenizer.json", "vocab.json", "vocab.txt", "tokenizer.model", "spiece.model",
                         "sentencepiece.bpe.model")

# What a trainer leaves in a checkpoint folder; never read, never copied (optimizer.pt alone is GBs).
TRAINING_LEFTOVER_PATTERNS = (
    "optimizer.pt",
    "optimizer.bin",
    "scheduler.pt",
    "scaler.pt",
    "rng_state*.pth",
    "trainer_state.json",
    "training_args.bin",
    "global_step*",
    "latest",
    "zero_to_fp32.py",
)


@dataclass(frozen=True)
class BaseModelFolder:
    """A local Hugging Face model folder: its config, where every weight tensor lies, and its side files."""

    path: Path
    config: dict
    tensors: dict[str, TensorLocation]
    weight_files: tuple[Path, ...]
    tokenizer_files: tuple[Path, ...]
    generation_config: dict | None
    remote_code_files: tuple[Path, ...]
    license_files: tuple[Path, ...]


@dataclass(frozen=True)
class AdapterCheckpoint:
    """A peft LoRA checkpoint folder: adapter_config.json, the adapter tensors, and any tokenizer it carries."""

    path: Path
    config: dict
    weights_file: Path
    tensors: dict[str, TensorLocation]
    tokenizer_files: tuple[Path, ...]
    ignored_files: tuple[Path, ...]


@dataclass(frozen=True)
class TokenizerFolder:
    """The folder the spec names for the tokenizer (`tokenizer.path`): its tokenizer files and the tokenizer code
    its config names (Qwen v1's tokenization_qwen.py beside qwen.tiktoken)."""

    path: Path
    tokenizer_files: tuple[Path, ...]


# The largest JSON file modelpack parses (configs, tokenizer files, reports), so a hostile one fails with a sentence
# within bounded memory: four times Gemma 3's tokenizer.json (33 MB, a 262k vocabulary) and far above a 72B model's
# safetensors index (about 100 KB).
MAX_JSON_BYTES = 128 << 20
# The deepest nesting of arrays and objects modelpack accepts in a JSON file. The files it copies into a bundle are
# parsed again by tokenizers and safetensors (Rust serde_json, which stops at 128 levels) and by transformers and
# peft (Python's json, about 1,000); real ones nest 6 levels at most (a tokenizer.json's pre-tokenizer sequence).
MAX_JSON_DEPTH = 64


def read_json(path: Path, *, shown: Path | None = None) -> dict:
    """A JSON object from a source or bundle file, or one SourceError naming the file (exit 2): at most
    MAX_JSON_BYTES, UTF-8, nested at most MAX_JSON_DEPTH levels. shown: the path to name in messages, where path is
    a private copy (a received bundle's snapshot)."""
    where = shown or path
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_JSON_BYTES:
                raise SourceError(f"{where}: {size} bytes, over modelpack's limit of {MAX_JSON_BYTES} for a JSON file")
            raw = f.read(MAX_JSON_BYTES + 1)
            data = json.loads(raw.decode("utf-8"))
    except json.JSONDecodeError as exc:
        raise SourceError(f"{where}: invalid JSON at line {exc.lineno}: {exc.msg}") from exc
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: not UTF-8 text (byte {exc.start}); JSON files must be UTF-8") from exc
    except RecursionError as exc:
        raise SourceError(f"{where}: JSON nested deeper than modelpack's limit of {MAX_JSON_DEPTH} levels") from exc
    except (OSError, ValueError) as exc:  # ValueError: a name with a NUL byte
        raise SourceError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc
    if not isinstance(data, dict):
        found = "a list" if isinstance(data, list) else repr(data)[:80]
        raise SourceError(f"{where}: expected a JSON object at the top level, found {found}")
    if json_depth(data) > MAX_JSON_DEPTH:
        raise SourceError(f"{where}: JSON nested deeper than modelpack's limit of {MAX_JSON_DEPTH} levels")
    if _SURROGATE_ESCAPE.search(raw):  # rare: emoji written with ensure_ascii; only then is every string looked at
        lone = _lone_surrogate(data)
        if lone is not None:
            raise SourceError(f"{where}: the text {ascii(lone[:80])} is not Unicode (a \\u escape of half a "
                              "UTF-16 pair, which no UTF-8 file can hold and tokenizers refuse); re-save the file")
    return data


# A JSON escape of a UTF-16 surrogate: half of a pair (as ensure_ascii writes an emoji), or alone (not text at all).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(data: object) -> str | None:
    """The first string (key or value) of a parsed JSON value that holds a lone surrogate, or None."""
    level: list = [data]
    while level:
        below: list = []
        for item in level:
            for text in (*item, *item.values()) if isinstance(item, dict) else item if isinstance(item, list) else ():
                if isinstance(text, str):
                    try:
                        text.encode("utf-8")
                    except UnicodeEncodeError:
                        return text
                elif isinstance(text, dict | list):
                    below.append(text)
        level = below
    return None


def json_depth(value: object) -> int:
    """How deep arrays and objects nest in a parsed JSON value (a scalar is 0, {} or [] is 1), level by level
    without recursion (a 33 MB tokenizer.json in about 0.15 s); stops counting once past MAX_JSON_DEPTH."""
    depth = 0
    level: list[dict | list] = [value] if isinstance(value, dict | list) else []
    while level and depth <= MAX_JSON_DEPTH:
        depth += 1
        below: list[dict | list] = []
        for item in level:
            children = item.values() if isinstance(item, dict) else item
            below.extend([v for v in children if type(v) in (dict, list)])
        level = below
    return depth


# A held-out text scored when measuring quantized GGUF files (export.gguf.eval_text, verify --eval-text): read whole
# and tokenized at once, so bounded; gguf_check scores at most its first EVAL_MAX_TOKENS tokens anyway.
EVAL_TEXT_MAX_BYTES = 16 << 20


def require_eval_text(path: Path, *, named: str) -> None:
    """A held-out text: a readable UTF-8 file of at most EVAL_TEXT_MAX_BYTES, else exit 2 naming it and the fix."""
    try:
        size = path.stat().st_size
        if size > EVAL_TEXT_MAX_BYTES:
            raise ModelpackError(f"{named} {shown_path(path)}: {size / 2**20:.1f} MiB; held-out texts are scored up "
                                 f"to their first 8,192 tokens, so give one of at most {EVAL_TEXT_MAX_BYTES >> 20} MiB")
        path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise ModelpackError(f"{named} {shown_path(path)}: cannot read it ({exc.strerror}); name a UTF-8 text "
                             "file") from exc
    except UnicodeDecodeError as exc:
        raise ModelpackError(f"{named} {shown_path(path)}: not UTF-8 text (byte {exc.start}); name a UTF-8 text "
                             "file") from exc


def shown_path(path: Path | str) -> str:
    """A path as messages show it: a byte that is not UTF-8 (read by Python as a lone surrogate) as \\xNN, and
    control and other unprintable characters escaped, so a message about any name can be printed."""
    shown = []
    for char in str(path):
        if "\udc80" <= char <= "\udcff":  # os.fsdecode's stand-in for an undecodable byte
            shown.append(f"\\x{ord(char) - 0xDC00:02x}")
        elif char.isprintable():
            shown.append(char)
        else:
            shown.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(shown)


def require_text_path(path: Path, what: str) -> None:
    """Refuse (exit 2) a path modelpack would write into JSON (manifest.json, verification.json, --json output,
    DIR.run.json), YAML (init's spec), the card and messages, when its name is not UTF-8 (bytes that no JSON or
    YAML text can hold) or holds a control or other unprintable character; named with escapes, with the fix."""
    text = str(path)
    if all(char.isprintable() for char in text):
        return
    undecodable = any("\udc80" <= char <= "\udcff" for char in text)
    problem = "is not UTF-8" if undecodable else "holds a control or unprintable character"
    raise SourceError(
        f"{shown_path(path)} ({what}): the name {problem}, and modelpack writes source paths and file names into "
        "JSON, YAML and the model card as text; rename it"
    )


def read_text(path: Path, *, shown: Path | None = None) -> str:
    """A UTF-8 text file (a chat template, a vocabulary), or one SourceError naming it (exit 2); shown as in
    read_json."""
    where = shown or path
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(f"{where}: not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc
    except (OSError, ValueError) as exc:  # ValueError: a name with a NUL byte
        raise SourceError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") from exc


def _tokenizer_files(folder: Path) -> tuple[Path, ...]:
    found = [folder / name for name in TOKENIZER_FILE_NAMES if (folder / name).is_file()]
    for pattern in TOKENIZER_FILE_PATTERNS:
        found.extend(sorted(folder.glob(pattern)))
    return tuple(found)


def _auto_map_modules(folder: Path, *configs: dict | None) -> set[str]:
    """Module names referenced by `auto_map` entries ("modeling_qwen.QWenLMHeadModel" -> "modeling_qwen")."""
    modules = set()
    for config in configs:
        auto_map = (config or {}).get("auto_map", {})
        if not isinstance(auto_map, dict):
            raise SourceError(f"{folder}: `auto_map` in a config there is {auto_map!r}, not an object mapping Auto "
                              "classes to 'module.Class'; fix the config the model was saved with")
        for target in auto_map.values():
            for ref in target if isinstance(target, list) else [target]:
                if isinstance(ref, str) and ref:
                    # "repo--module.Class" refers to code in another repo: only the module part is local.
                    modules.add(ref.split("--")[-1].rsplit(".", 1)[0])
    return modules


_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import|^\s*import\s+\.(\w+)", re.MULTILINE)
# Kernel sources the code names to compile at load time (Qwen-v1's cache_autogptq_cuda_256.cpp and its .cu).
_KERNEL_SOURCE = re.compile(r"[\"'](?:\./)?([\w.-]+\.(?:c|cc|cpp|cu|cuh|h|hpp))[\"']")


def find_remote_code(folder: Path, *configs: dict | None) -> tuple[Path, ...]:
    """The .py files a remote-code model needs: its auto_map modules and the local modules they import."""
    pending = sorted(_auto_map_modules(folder, *configs))
    found: dict[str, Path] = {}
    while pending:
        module = pending.pop()
        path = folder / f"{module.replace('.', '/')}.py"
        if module in found or not path.is_file():
            continue
        found[module] = path
        code = path.read_text(encoding="utf-8", errors="replace")
        for match in _RELATIVE_IMPORT.finditer(code):
            pending.append(match.group(1) or match.group(2))
        for name in _KERNEL_SOURCE.findall(code):
            if (folder / name).is_file():
                found[name] = folder / name
    return tuple(sorted(found.values()))


def read_base_model(path: Path) -> BaseModelFolder:
    """Read a base model folder's config, safetensors headers and side files."""
    require_text_path(path, "base.path")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise SourceError(f"base.path {path}: no config.json; point base.path at a Hugging Face model folder")
    config = _checked_base_config(read_json(config_path), config_path)
    weight_files, tensors = _weight_locations(path)
    tokenizer_config_path = path / "tokenizer_config.json"
    tokenizer_config = read_json(tokenizer_config_path) if tokenizer_config_path.is_file() else None
    generation_config_path = path / "generation_config.json"
    base = BaseModelFolder(
        path=path,
        config=config,
        tensors=tensors,
        weight_files=weight_files,
        tokenizer_files=_tokenizer_files(path),
        generation_config=_checked_token_ids(read_json(generation_config_path), generation_config_path)
        if generation_config_path.is_file() else None,
        remote_code_files=find_remote_code(path, config, tokenizer_config),
        # Licenses like Qwen's require their text (and NOTICE) to travel with redistributed weights.
        license_files=tuple(sorted(
            p for p in path.iterdir() if p.is_file() and p.name.upper().startswith(("LICENSE", "NOTICE"))
        )),
    )
    for file in (*base.weight_files, *base.tokenizer_files, *base.remote_code_files, *base.license_files):
        require_text_path(file, "a file in base.path")
    return base


def _weight_locations(path: Path) -> tuple[tuple[Path, ...], dict[str, TensorLocation]]:
    """The base's weight files and where each tensor lies: through the shard index, or the one model.safetensors."""
    index_path = path / "model.safetensors.index.json"
    single_path = path / "model.safetensors"
    if single_path.is_file() and not index_path.is_file():
        return (single_path,), read_safetensors_header(single_path)
    if not index_path.is_file():
        legacy = sorted(p.name for p in path.glob("pytorch_model*.bin"))
        hint = (
            f"it has only pickled weights ({legacy[0]}); convert them to safetensors first "
            "(load with transformers and save_pretrained(safe_serialization=True))"
            if legacy
            else "no model.safetensors or model.safetensors.index.json"
        )
        raise SourceError(f"base.path {path}: {hint}")
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise SourceError(f"{index_path}: has no 'weight_map'")
    # Shards lie beside the index: a name with a folder in it ("../x") would read files outside base.path.
    stray = next(((n, f) for n, f in weight_map.items() if not isinstance(f, str) or Path(f).name != f), None)
    if stray:
        raise SourceError(
            f"{index_path}: weight_map gives {_json(stray[1])} for tensor {stray[0]!r}, not the name of a shard "
            f"in {path}; re-download or re-save the index"
        )
    weight_files = tuple(path / name for name in dict.fromkeys(weight_map.values()))
    tensors: dict[str, TensorLocation] = {}
    for shard in weight_files:
        if not shard.is_file():
            raise SourceError(f"{index_path}: lists shard {shard.name}, which is missing from {path}")
        for name, location in read_safetensors_header(shard).items():
            if weight_map.get(name) == shard.name:
                tensors[name] = location
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise SourceError(f"{index_path}: tensor {missing[0]!r} is not in shard {weight_map[missing[0]]}")
    return weight_files, tensors


# The token ids a config gives, which the bundle's generation config, the chat facts and servers compute with.
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")


def _checked_token_ids(config: dict, where: Path) -> dict:
    """A config whose token ids are each an integer, a list of them, or null (a string "2" would become ["2"])."""
    for key in TOKEN_ID_KEYS:
        value = config.get(key)
        ids = value if isinstance(value, list) else [value]
        # Any integer: early Llama configs give pad_token_id -1 for "none".
        if value is not None and not all(type(i) is int for i in ids):
            raise SourceError(f"{where}: {key} is {_json(value)}, but must be a token id (an integer), a list of "
                              "them, or null; correct it")
    return config


def _checked_base_config(config: dict, where: Path) -> dict:
    """config.json with what transformers and servers read from it: a model_type, and `architectures`.

    vLLM and other servers pick the model class from `architectures`; a config without it gets the class
    transformers itself maps its model_type to (names only, no model code imported), or the auto_map class of a
    remote-code model.
    """
    _checked_token_ids(config, where)
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise SourceError(
            f'{where}: "model_type" is {_json(model_type)}; add the model type transformers knows the model by '
            '(e.g. "qwen2" or "llama"), as save_pretrained writes it'
        )
    for key in ("torch_dtype", "dtype"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise SourceError(f'{where}: "{key}" is {_json(config[key])}; write a dtype name such as "bfloat16"')
    if not isinstance(config.get("text_config", {}), dict):
        raise SourceError(f'{where}: "text_config" is {_json(config["text_config"])}; it must be a JSON object')
    architectures = config.get("architectures")
    if architectures is not None:
        if not (
            isinstance(architectures, list) and architectures and all(isinstance(a, str) and a for a in architectures)
        ):
            raise SourceError(
                f'{where}: "architectures" is {_json(architectures)}; write a list of model class names '
                'such as ["Qwen2ForCausalLM"]'
            )
        return config
    auto_map = config.get("auto_map")
    remote = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    if isinstance(remote, str) and remote:
        architecture = remote.rsplit(".", 1)[-1]
    elif model_type in causal_lm_classes():
        architecture = causal_lm_classes()[model_type]
    else:
        raise SourceError(
            f'{where}: has no "architectures" and transformers knows no causal language model for model_type '
            f'{model_type!r}; add "architectures": ["<the model class that loads it>"] to config.json'
        )
    return {**config, "architectures": [architecture]}


@functools.cache
def causal_lm_classes() -> dict[str, str]:
    """model_type -> the class transformers loads it with as a causal LM: its MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.

    Read as the literal the installed transformers' modeling_auto.py writes, not imported: importing transformers
    takes seconds (torch comes with it) for one lookup, and a copy kept here would drift from the library the
    bundle is built with. Should a release stop writing the table as a literal, the library is imported after all.
    """
    package = importlib.util.find_spec("transformers")
    folder = package.submodule_search_locations if package else None
    table = causal_lm_literal(Path(folder[0]) / "models" / "auto" / "modeling_auto.py") if folder else None
    if table is None:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        table = dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    return table


def causal_lm_literal(source: Path) -> dict[str, str] | None:
    """`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = OrderedDict([(model_type, class name), ...])` in a Python file, read
    without running it; None when the file does not write the table that way."""
    try:
        tree = ast.parse(source.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError):
        return None
    table = next((node.value for node in tree.body if isinstance(node, ast.Assign)
                  and [getattr(t, "id", None) for t in node.targets] == ["MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"]), None)
    if not (isinstance(table, ast.Call) and len(table.args) == 1):
        return None
    try:
        pairs = ast.literal_eval(table.args[0])
    except ValueError:  # not a literal
        return None
    if not (isinstance(pairs, list) and all(isinstance(p, tuple) and len(p) == 2
                                            and all(isinstance(x, str) for x in p) for p in pairs)):
        return None
    return dict(pairs)


# Every adapter_config.json key modelpack knows the meaning of (read without importing peft: the light commands check
# adapters too). ANY: modelpack computes with the value, or refuses the values it cannot merge, wherever it is used.
# Otherwise the key's neutral values, those under which it changes nothing about the trained adapter's math: a key
# modelpack does not implement is accepted only so. A key not listed here is accepted only at UNLISTED_NEUTRAL (what
# peft writes for an option it has but that is unused); a newer peft's LoRA variant would otherwise be dropped.
ANY = object()
ADAPTER_CONFIG_KEYS: dict[str, object] = {
    # What the merge computes with, or refuses by value (adapter_match.refuse_unmergeable_config, sources).
    **dict.fromkeys((
        "r", "lora_alpha", "target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "use_rslora",
        "fan_in_fan_out", "bias", "lora_bias", "use_dora", "modules_to_save", "layers_to_transform", "layers_pattern",
        "trainable_token_indices", "init_lora_weights", "layer_replication", "megatron_config", "megatron_core",
        "ensure_weight_tying",
    ), ANY),
    # Bookkeeping and training-time settings, with no part in the trained weights' math.
    **dict.fromkeys((
        "peft_type", "task_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "lora_dropout", "runtime_config",
    ), ANY),
    # Initialisation schemes: the trained A and B are what is merged, but some also change the base (refused by
    # init_lora_weights); accepted only unused, until a test proves one changes nothing.
    "loftq_config": ({}, None), "eva_config": (None,), "corda_config": (None,), "lora_ga_config": (None,),
    "astra_config": (None,),
    # LoRA variants modelpack does not implement: accepted only switched off.
    "use_qalora": (False, None), "qalora_group_size": (16, None), "alora_invocation_tokens": (None,),
    "target_parameters": (None, []), "use_bdlora": (None, False), "arrow_config": (None,), "kasa_config": (None,),
    "velora_config": (None,), "monteclora_config": (None,),
}
UNLISTED_NEUTRAL: tuple[object, ...] = (None, False, {}, [])


def unknown_adapter_settings(config: dict) -> list[tuple[str, object]]:
    """The adapter_config.json entries whose meaning modelpack does not know and that are not neutral, in order."""
    found = []
    for key, value in config.items():
        neutral = ADAPTER_CONFIG_KEYS.get(key, UNLISTED_NEUTRAL)
        if neutral is ANY:
            continue
        assert isinstance(neutral, tuple)
        # bool is int in Python: False must not pass for 0, nor True for 1.
        if not any(value == n and type(value) is type(n) for n in neutral):
            found.append((key, value))
    return found


def _check_adapter_values(config: dict, where: Path) -> None:
    """The adapter_config.json values the merge computes with, checked as peft's LoraConfig needs them."""

    def invalid(key: str, value: object, wanted: str) -> SourceError:
        return SourceError(
            f"{where}: {key} is {_json(value)}, but must be {wanted}; correct it or re-save the adapter with peft"
        )

    if "r" in config and not _positive_int(config["r"]):
        raise invalid("r", config["r"], "a positive integer (the LoRA rank)")
    if "lora_alpha" in config and not _positive_number(config["lora_alpha"]):
        raise invalid("lora_alpha", config["lora_alpha"], "a positive number (scaling = lora_alpha / r)")
    for key, valid, wanted in (
        ("rank_pattern", _positive_int, "a positive integer"),
        ("alpha_pattern", _positive_number, "a positive number"),
    ):
        patterns = config.get(key)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise invalid(key, patterns, "a mapping of module name patterns to values")
        for pattern, value in patterns.items():
            # peft matches each key as a regex against the module path, wrapped as below (first match wins).
            _check_regex(rf"(.*\.)?({pattern})$", f"{key} key {pattern[:80]!r}", where)
            if not valid(value):
                raise invalid(f"{key}[{pattern!r}]", value, wanted)
    for key in ("use_rslora", "fan_in_fan_out"):
        if config.get(key) is not None and not isinstance(config[key], bool):
            raise invalid(key, config[key], "true or false")
    layers = config.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers if isinstance(layers, list) else []:
        if not isinstance(pattern, str):
            raise invalid("layers_pattern", layers, "a layer name pattern or a list of them")
        _check_regex(pattern, f"layers_pattern {pattern[:80]!r}", where)
    targets = config.get("target_modules")
    if isinstance(targets, str):
        _check_regex(targets, f"target_modules {targets[:80]!r}", where)
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise invalid("target_modules", targets, "a list of module names or one regular expression")
    if config.get("base_model_name_or_path") is not None and not isinstance(config["base_model_name_or_path"], str):
        raise invalid("base_model_name_or_path", config["base_model_name_or_path"], "a model name or path")
    unknown = unknown_adapter_settings(config)
    if unknown:
        key, value = unknown[0]
        writer = config.get("peft_version")
        written = f" (written by peft {str(writer)[:40]})" if writer else ""
        raise SourceError(
            f"{where}{written}: {key} is {_json(value)}, a setting modelpack does not know; it may change the "
            "adapter's math (a newer LoRA variant), so it is refused rather than ignored. Train without it, or set "
            "it to its default if it is unused"
        )


def _check_regex(pattern: str, what: str, where: Path) -> None:
    """A pattern peft and transformers will match with Python's backtracking `re` (in modelpack, the verification
    process and load.py alike): refused unless it compiles and regex_problem finds it linear-time by construction."""
    try:
        re.compile(pattern)
    except re.error as err:
        raise SourceError(f"{where}: {what} is not a valid regular expression ({err.msg}); correct it") from None
    except (RecursionError, OverflowError):
        raise SourceError(f"{where}: {what} is nested too deeply to be a module name pattern") from None
    problem = regex_problem(pattern)
    if problem:
        raise SourceError(f"{where}: {what} {problem}, which Python's regular expressions (used by peft and "
                          "transformers too) can take exponential or polynomial time to match; rewrite it as a list "
                          "of module names or a pattern without it")


# The most unbounded repeats (`*`, `+`, `{n,}`) one pattern may hold: each can multiply the backtracking work by a
# module name's length when a match fails. Real configs use one or two (`^(?!.*vision).*\.(q|v)_proj$`); the time
# limit (adapter_match.check_patterns_in_time) covers what this count cannot.
MAX_UNBOUNDED_REPEATS = 4
_SINGLE_CHARACTER = {"LITERAL", "NOT_LITERAL", "ANY", "IN", "CATEGORY", "RANGE"}


def regex_problem(pattern: str) -> str | None:
    """Why a pattern could backtrack super-linearly, or None. The rule (Python's own parser, nothing run): no
    backreference (no linear-time engine has them; peft's own patterns never use them); a repeated part (`*`, `+`,
    `{m,n}`) repeats one character or character class only, so no repeat is nested in another or in an alternation
    under a repeat (`(a+)+`, `(a|aa)*`, the exponential cases); at most MAX_UNBOUNDED_REPEATS unbounded repeats.
    Lookarounds are allowed (common in real configs: `^(?!.*vision)`) and their contents follow the same rule."""
    # The parser re.compile itself uses: re._parser from Python 3.11, sre_parse before (the package supports 3.10).
    if sys.version_info >= (3, 11):
        from re import _parser
    else:
        import sre_parse as _parser

    try:
        parsed = _parser.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return "cannot be parsed"
    unbounded = 0
    pending: list[list] = [list(parsed.data)]
    while pending:
        for op, arg in pending.pop():
            name = str(op)
            if name in ("GROUPREF", "GROUPREF_EXISTS", "GROUPREF_IGNORE"):
                return "uses a backreference"
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                low, high, body = arg
                if high != 1 and not _single_character(list(body)):
                    return "repeats a group that itself repeats or branches"
                unbounded += high == _parser.MAXREPEAT
                pending.append(list(body))
            elif name == "SUBPATTERN":
                pending.append(list(arg[-1]))
            elif name in ("ASSERT", "ASSERT_NOT"):
                pending.append(list(arg[1]))
            elif name == "BRANCH":
                pending.extend(list(branch) for branch in arg[1])
            elif name == "ATOMIC_GROUP":
                pending.append(list(arg))
    if unbounded > MAX_UNBOUNDED_REPEATS:
        return f"has {unbounded} unbounded repeats (at most {MAX_UNBOUNDED_REPEATS})"
    return None


def _single_character(items: list) -> bool:
    """Whether a parsed body matches exactly one character: a literal or class, possibly inside a group."""
    while len(items) == 1 and str(items[0][0]) == "SUBPATTERN":
        items = list(items[0][1][-1])
    return len(items) == 1 and str(items[0][0]) in _SINGLE_CHARACTER


def _positive_int(value: object) -> bool:
    """A rank: a tensor dimension, so below 2**63 (a larger one would also overflow the scaling's float math)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63


def _positive_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an integer beyond any float
        return False


def _json(value: object) -> str:
    """A config value as written in JSON, cut short for a message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


def read_adapter_checkpoint(path: Path, *, allow_pickle: bool = False) -> AdapterCheckpoint:
    """Read a peft checkpoint folder's adapter config and tensor headers, skipping training leftovers."""
    require_text_path(path, "adapter.path")
    config_path = path / "adapter_config.json"
    if not config_path.is_file():
        raise SourceError(
            f"adapter.path {path}: no adapter_config.json; point adapter.path at the folder peft's "
            "save_pretrained wrote (e.g. output/checkpoint-1560)"
        )
    config = read_json(config_path)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise SourceError(f"{config_path}: peft_type is {peft_type!r}; modelpack packages LoRA adapters only")
    _check_adapter_values(config, config_path)

    weights_file = path / "adapter_model.safetensors"
    legacy = path / "adapter_model.bin"
    if not weights_file.is_file() and legacy.is_file() and allow_pickle:
        weights_file = convert_legacy_adapter(legacy)
    elif not weights_file.is_file():
        hint = (
            "it has only the pickled adapter_model.bin; set `adapter.allow_pickle: true` to read it "
            "(with torch.load(weights_only=True)), or re-save the adapter with safetensors"
            if legacy.is_file()
            else "no adapter_model.safetensors"
        )
        raise SourceError(f"adapter.path {path}: {hint}")
    tensors = read_safetensors_header(weights_file)
    if not tensors:
        raise SourceError(f"{weights_file}: holds no tensors; the training run saved an empty adapter")

    ignored = sorted({p for pattern in TRAINING_LEFTOVER_PATTERNS for p in path.glob(pattern)})
    # Only a checkpoint that carries a full tokenizer (its config) overrides the base's tokenizer. Its config may
    # name tokenizer code saved beside it (Qwen's finetune.py leaves tokenization_qwen.py there): that code
    # belongs with that config, so it comes along and takes the place of the base's file of the same name.
    tokenizer_config_path = path / "tokenizer_config.json"
    tokenizer_files: tuple[Path, ...] = ()
    if tokenizer_config_path.is_file():
        tokenizer_files = _tokenizer_files(path) + find_remote_code(path, read_json(tokenizer_config_path))
    for file in (*tokenizer_files, *ignored):
        require_text_path(file, "a file in adapter.path")
    return AdapterCheckpoint(
        path=path,
        config=config,
        weights_file=weights_file,
        tensors=tensors,
        tokenizer_files=tokenizer_files,
        ignored_files=tuple(ignored),
    )


def read_tokenizer_folder(path: Path) -> TokenizerFolder:
    """Read the folder `tokenizer.path` names: its tokenizer files, and the code its tokenizer_config.json's
    auto_map names, which must be there (a remote-code tokenizer without its code cannot load)."""
    require_text_path(path, "tokenizer.path")
    files = _tokenizer_files(path)
    if not any(p.name in VOCABULARY_FILE_NAMES or p.suffix == ".tiktoken" for p in files):
        found = f"only {', '.join(p.name for p in files)}" if files else "no tokenizer files"
        raise SourceError(
            f"tokenizer.path {path}: {found}, no vocabulary ({', '.join(VOCABULARY_FILE_NAMES)} or *.tiktoken); "
            "point tokenizer.path at the folder of the original base model, or at a checkpoint the trainer saved "
            "the tokenizer into"
        )
    config_path = path / "tokenizer_config.json"
    config = read_json(config_path) if config_path.is_file() else None
    code = find_remote_code(path, config)
    named = sorted(_auto_map_modules(path, config) - {p.stem for p in code})
    if named:
        raise SourceError(
            f"{config_path}: auto_map names the tokenizer code {named[0]}.py, which is not in tokenizer.path "
            f"{path}; copy it there from the original model (with the files it reads, e.g. qwen.tiktoken)"
        )
    for file in (*files, *code):
        require_text_path(file, "a file in tokenizer.path")
    return TokenizerFolder(path=path, tokenizer_files=files + code)


def code_files(base: BaseModelFolder, tokenizer: AdapterCheckpoint | TokenizerFolder | None) -> tuple[Path, ...]:
    """The model's own code: the base's auto_map modules, and tokenizer code that the shipped tokenizer's folder
    (a checkpoint, or tokenizer.path) brings along."""
    carried = [p for p in tokenizer.tokenizer_files if p.suffix == ".py"] if tokenizer else []
    names = {p.name for p in carried}
    return tuple(sorted([*(p for p in base.remote_code_files if p.name not in names), *carried], key=lambda p: p.name))


def tokenizer_vocabulary_size(files: tuple[Path, ...]) -> tuple[int, str] | None:
    """How many token ids the tokenizer files define (the highest id + 1) and the file that defines the highest.

    Read from the files alone, no tokenizer code run: tokenizer.json, vocab.json / vocab.txt, *.tiktoken ranks,
    added_tokens.json and tokenizer_config.json's added_tokens_decoder. A sentencepiece tokenizer.model is binary
    and not read, and remote-code tokenizers may define more special ids in their code (Qwen v1: 208 after its
    tiktoken ranks), so this is a lower bound: enough to refuse a tokenizer that cannot fit.
    """
    highest: tuple[int, str] | None = None

    def seen(ids: list, name: str) -> None:
        nonlocal highest
        ids = [i for i in ids if isinstance(i, int) and not isinstance(i, bool)]
        if ids and (highest is None or max(ids) + 1 > highest[0]):
            highest = (max(ids) + 1, name)

    for path in files:
        name = path.name
        if name == "tokenizer.json":
            tokenizer = read_json(path)
            vocab = (tokenizer.get("model") or {}).get("vocab")
            seen(list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab or []))), name)
            seen([t.get("id") for t in tokenizer.get("added_tokens") or [] if isinstance(t, dict)], name)
        elif name in ("vocab.json", "added_tokens.json"):
            seen(list(read_json(path).values()), name)
        elif name == "vocab.txt":
            seen(list(range(len(path.read_text(encoding="utf-8").splitlines()))), name)
        elif name == "tokenizer_config.json":
            decoder = read_json(path).get("added_tokens_decoder") or {}
            seen([int(i) for i in decoder if str(i).isdigit()], name)
        elif path.suffix == ".tiktoken":  # "<base64 token> <rank>" per line
            ranks = (line.split()[-1] for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
            seen([int(r) for r in ranks if r.isdigit()], name)
    return highest


def convert_legacy_adapter(legacy: Path) -> Path:
    """Load a pickled adapter_model.bin safely (tensors only) and re-save it as safetensors in a temp folder.

    The rest of the build then reads it like any safetensors adapter; the source folder is not touched.
    """
    import torch
    from safetensors.torch import save_file

    try:
        state = torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle that needs arbitrary code is refused, whatever the reason given
        raise SourceError(f"{legacy}: cannot be read as plain tensors ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(state, dict) or not state:
        raise SourceError(
            f"{legacy}: holds no tensors ({legacy.stat().st_size} bytes). Some training scripts save an empty "
            "adapter_model.bin when the model was wrapped (e.g. by DeepSpeed); "
            "re-save the adapter from the trained model"
        )
    folder = Path(tempfile.mkdtemp(prefix="modelpack-adapter-"))
    atexit.register(shutil.rmtree, folder, True)
    converted = folder / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, converted, metadata={"format": "pt"})
    return converted
