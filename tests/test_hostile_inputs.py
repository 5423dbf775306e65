"""Hostile and malformed inputs, driven through the CLI: each is exit 2 with one message naming the culprit (file and
key, line or tensor), no traceback, every source unchanged and no destination created.

One row per input: (id, how the input is broken, exit code, fragments the message must hold). A break function gets
a `Project` (private copies of a tiny base and adapter, and a spec folder) and returns the spec to build, or None
for the default spec. Fragments may name {spec}, {base} and {adapter}, filled with the case's resolved paths.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from builder.cli import app
from helpers import assert_user_error, tree_snapshot, write_spec

BASE_TENSOR = "model.layers.0.self_attn.q_proj.weight"  # [64, 64] float32, not the first in its file
ADAPTER_TENSOR = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"  # [8, 64] float32


@dataclass
class Project:
    """Private copies of the tiny base and adapter beside a spec folder, for one case to break."""

    root: Path
    env: dict[str, str | None] = field(default_factory=dict)

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    @property
    def adapter(self) -> Path:
        return self.root / "checkpoints" / "checkpoint-10"

    @property
    def spec_dir(self) -> Path:
        return self.root / "project"

    def spec(self, **sections) -> Path:
        return write_spec(self.spec_dir, self.base, self.adapter, **sections)

    def raw_spec(self, text: str | bytes) -> Path:
        path = self.spec_dir / "spec.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def fill(self, fragment: str) -> str:
        for name, path in (("{spec}", self.spec_dir / "spec.yaml"), ("{base}", self.base), ("{adapter}", self.adapter)):
            fragment = fragment.replace(name, str(path.resolve()))
        return fragment


# --- ways to break a file ------------------------------------------------------------------------------------------


def edit_json(path: Path, **changes) -> None:
    """Set keys of a JSON config; a value of DELETE removes the key."""
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps({k: v for k, v in data.items() if v is not DELETE}))


DELETE = object()


def edit_header(path: Path, change: Callable[[dict, bytes], bytes]) -> None:
    """Rewrite a safetensors file after `change` edits its header dict in place and returns the new data section."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    body = change(header, raw[8 + length :])
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def set_entry(tensor: str, key: str, value) -> Callable[[dict, bytes], bytes]:
    """Set (or, with DELETE, remove) one field of a tensor's header entry."""

    def change(header: dict, body: bytes) -> bytes:
        if value is DELETE:
            del header[tensor][key]
        else:
            header[tensor][key] = value
        return body

    return change


def replace_entry(tensor: str, value) -> Callable[[dict, bytes], bytes]:
    def change(header: dict, body: bytes) -> bytes:
        header[tensor] = value
        return body

    return change


def shift(tensor: str, by: int) -> Callable[[dict, bytes], bytes]:
    """Move one tensor's byte range (into its predecessor's when by < 0)."""

    def change(header: dict, body: bytes) -> bytes:
        header[tensor]["data_offsets"] = [offset + by for offset in header[tensor]["data_offsets"]]
        return body

    return change


def reverse_offsets(tensor: str) -> Callable[[dict, bytes], bytes]:
    def change(header: dict, body: bytes) -> bytes:
        header[tensor]["data_offsets"].reverse()
        return body

    return change


def gap_before(tensor: str, size: int = 8) -> Callable[[dict, bytes], bytes]:
    """Unclaimed bytes before a tensor: it and everything after it move up."""

    def change(header: dict, body: bytes) -> bytes:
        begin = header[tensor]["data_offsets"][0]
        for name, info in header.items():
            if name != "__metadata__" and info["data_offsets"][0] >= begin:
                info["data_offsets"] = [o + size for o in info["data_offsets"]]
        return body[:begin] + bytes(size) + body[begin:]

    return change


def resize_body(by: int) -> Callable[[dict, bytes], bytes]:
    """Cut bytes off the end of the data section (by < 0), or append zero bytes."""
    return lambda header, body: body[:by] if by < 0 else body + bytes(by)


def set_metadata(value) -> Callable[[dict, bytes], bytes]:
    def change(header: dict, body: bytes) -> bytes:
        header["__metadata__"] = value
        return body

    return change


def raw_header(path: Path, header: bytes, *, length: int | None = None) -> None:
    """Replace a safetensors file's header bytes (and, with `length`, its declared length) keeping its data."""
    raw = path.read_bytes()
    (old_length,) = struct.unpack("<Q", raw[:8])
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + raw[8 + old_length :])


def duplicate_tensor(path: Path, tensor: str) -> None:
    """The header lists one tensor twice; json.loads alone would silently keep the second entry."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    entry = json.dumps({tensor: header[tensor]})[1:-1]
    raw_header(path, b"{" + entry.encode() + b"," + json.dumps(header).encode()[1:])


BILLION_LAUGHS = "name: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{key}: &{key} [{', '.join([f'*{previous}'] * 9)}]\n" for previous, key in zip("abcdefgh", "bcdefghi", strict=True)
)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def overwrite(path: Path, content: str | bytes) -> None:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


def base_weights(p: Project) -> Path:
    return p.base / "model.safetensors"


def adapter_weights(p: Project) -> Path:
    return p.adapter / "adapter_model.safetensors"


def adapter_config(p: Project, **changes) -> None:
    edit_json(p.adapter / "adapter_config.json", **changes)


def base_config(p: Project, **changes) -> None:
    edit_json(p.base / "config.json", **changes)


def write_index(p: Project, overrides: dict) -> None:
    """A sharded-model index over the base's one weights file, with some tensors' shard names overridden."""
    with safe_open(base_weights(p), framework="pt") as f:
        weight_map = {name: "model.safetensors" for name in f.keys()}
    weight_map.update(overrides)
    (p.base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def spec_with_env(name: str, value: str | None, **sections) -> Callable[[Project], Path]:
    """A spec using an environment variable, built with the variable set to value (None: unset)."""

    def make(p: Project) -> Path:
        p.env[name] = value
        return p.spec(**sections)

    return make


DAMAGED = "the file is damaged or was not written by safetensors; re-download or re-save it"
ST_BASE = "{base}/model.safetensors: "
ST_ADAPTER = "{adapter}/adapter_model.safetensors: "
ADAPTER_CONFIG = "{adapter}/adapter_config.json: "
BASE_CONFIG = "{base}/config.json: "
RESAVE = "correct it or re-save the adapter with peft"

# (id, how the input is broken, exit code, message fragments)
SPEC_CASES = [
    ("spec-billion-laughs", lambda p: p.raw_spec(BILLION_LAUGHS), 2,
     ["{spec}:", "invalid YAML: aliases of the anchor at this line expand to more than 10000 values"]),
    ("spec-self-referencing-alias", lambda p: p.raw_spec("name: &x [*x]\n"), 2,
     ["{spec}:1: invalid YAML: nested deeper than 100 levels through aliases"]),
    ("spec-deep-flow-nesting", lambda p: p.raw_spec("name: " + "[" * 50_000), 2,
     ["{spec}:1: invalid YAML: nested deeper than 100 levels"]),
    ("spec-python-object-tag", lambda p: p.raw_spec("name: !!python/object/apply:os.system [touch pwned]\n"), 2,
     ["{spec}:1: invalid YAML:",
      "could not determine a constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"]),
    ("spec-syntax-error", lambda p: p.raw_spec("name: tiny\nbase: {path: [x}\n"), 2,
     ["{spec}:2: invalid YAML: while parsing a flow sequence"]),
    ("spec-top-level-list", lambda p: p.raw_spec("- name: tiny\n"), 2,
     ["{spec}: a spec must be a mapping of keys (name, base, adapter, ...), found a list"]),
    ("spec-not-utf8", lambda p: p.raw_spec(b"name: \xff\xfe\n"), 2,
     ["cannot read spec file {spec}: 'utf-8' codec can't decode byte 0xff"]),
    ("spec-duplicate-key", lambda p: p.raw_spec("name: a\nname: b\n"), 2,
     ["{spec}:2: name: duplicate key (first at line 1)"]),
    ("spec-empty-variable-as-output", spec_with_env("DIST", "", output={"dir": "${DIST}"}), 2,
     ["{spec}:", "output.dir: environment variable DIST is set but empty", "write ${DIST:-} if empty is meant"]),
    ("spec-empty-variable-in-base-path",
     spec_with_env("MODELS", "", base={"path": "${MODELS}/base"}), 2,
     ["{spec}:3: base.path: environment variable MODELS is set but empty (used in \"${MODELS}/base\")"]),
    ("spec-unset-variable",
     spec_with_env("MODELPACK_UNSET_VAR", None, adapter={"path": "${MODELPACK_UNSET_VAR}"}), 2,
     ["{spec}:5: adapter.path: environment variable MODELPACK_UNSET_VAR is not set"]),
    ("spec-name-is-a-list", lambda p: p.spec(name=["a", "b"]), 2, ["{spec}:1: name: Input should be a valid string"]),
    ("spec-unknown-mode", lambda p: p.spec(output={"mode": "merged"}), 2,
     ["output.mode: Input should be 'merge' or 'separate', got 'merged'"]),
    ("spec-shard-size-unreadable", lambda p: p.spec(output={"max_shard_size": "2 GB each"}), 2,
     ["output.max_shard_size: cannot read '2 GB each' as a size"]),
    ("spec-negative-max-new-tokens", lambda p: p.spec(generation={"max_new_tokens": -1}), 2,
     ["generation.max_new_tokens: Input should be greater than 0, got -1"]),
    ("spec-section-is-a-string", lambda p: p.spec(base="models/base"), 2,
     ["{spec}:2: base: expected a mapping of keys, got 'models/base'"]),
    ("spec-misspelled-key", lambda p: p.spec(output={"dtyp": "float16"}), 2,
     ["output.dtyp: unknown key 'dtyp'; did you mean 'dtype'?"]),
    ("spec-invalid-regex",
     lambda p: p.spec(verify={"prompts": [{"prompt": "hi", "expect": {"regex": "(unclosed"}}]}), 2,
     ["verify.prompts[0].expect.regex: invalid regular expression '(unclosed'"]),
    ("spec-base-path-is-a-file", lambda p: p.spec(base={"path": str(base_weights(p))}), 2,
     ["{spec}:3: base.path: not a directory: {base}/model.safetensors"]),
    ("spec-adapter-not-found", lambda p: p.spec(adapter={"path": "../checkpoints/checkpoint-99"}), 2,
     ["{spec}:5: adapter.path: directory not found:", "checkpoint-99"]),
    ("spec-home-of-an-unknown-user", lambda p: p.spec(adapter={"path": "~no-such-user/checkpoint"}), 2,
     ["{spec}:5: adapter.path: cannot expand '~no-such-user/checkpoint': no such user's home folder"]),
    ("spec-chat-template-not-found", lambda p: p.spec(chat={"template": "chat.jinja"}), 2,
     ["chat.template: file not found:", "chat.jinja"]),
    ("spec-max-new-tokens-beyond-positions", lambda p: p.spec(generation={"max_new_tokens": 256}), 2,
     ["{spec}: generation.max_new_tokens is 256, but the base model handles at most 256 positions "
      "(max_position_embeddings in {base}/config.json), prompt included; use at most 255"]),
    ("spec-verify-max-new-tokens-beyond-positions", lambda p: p.spec(verify={"max_new_tokens": 4096}), 2,
     ["{spec}: verify.max_new_tokens is 4096, but the base model handles at most 256 positions"]),
]

SAFETENSORS_CASES = [
    ("st-overlapping-offsets", lambda p: edit_header(base_weights(p), shift(BASE_TENSOR, -4)), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} (data bytes", "overlaps tensor", DAMAGED]),
    ("st-reversed-offsets", lambda p: edit_header(base_weights(p), reverse_offsets(BASE_TENSOR)), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has data_offsets", "that end before they begin"]),
    ("st-missing-offsets", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "data_offsets", DELETE)), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} lacks data_offsets; " + DAMAGED]),
    ("st-span-does-not-match-shape",
     lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "shape", [64, 65])), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} spans 16384 bytes but shape [64, 65] of F32 needs 16640"]),
    ("st-gap-between-tensors", lambda p: edit_header(base_weights(p), gap_before(BASE_TENSOR)), 2,
     [ST_BASE + "data bytes", f"before tensor {BASE_TENSOR!r} belong to no tensor"]),
    ("st-truncated-file", lambda p: edit_header(base_weights(p), resize_body(-100)), 2,
     [ST_BASE + "tensor", "ends 100 bytes past the end of the file (truncated download?)"]),
    ("st-trailing-bytes", lambda p: edit_header(base_weights(p), resize_body(16)), 2,
     [ST_BASE + "the last 16 bytes of the file belong to no tensor"]),
    ("st-unknown-dtype", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "dtype", "Q4_K")), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has dtype \"Q4_K\", which modelpack cannot read (it reads F64, F32",
      "F8_E4M3", "U16"]),
    ("st-dtype-not-a-string", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "dtype", 32)), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has dtype 32, which modelpack cannot read"]),
    ("st-negative-dimension", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "shape", [-64, -64])), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has shape [-64, -64], not a list of non-negative integers"]),
    ("st-shape-not-a-list", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "shape", "64x64")), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has shape \"64x64\", not a list of non-negative integers"]),
    ("st-three-offsets", lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "data_offsets", [0, 8, 16])), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has data_offsets [0, 8, 16], not two non-negative integers"]),
    ("st-fractional-offsets",
     lambda p: edit_header(base_weights(p), set_entry(BASE_TENSOR, "data_offsets", [0.5, 8])), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} has data_offsets [0.5, 8], not two non-negative integers"]),
    ("st-entry-not-an-object", lambda p: edit_header(base_weights(p), replace_entry(BASE_TENSOR, "F32")), 2,
     [ST_BASE + f"tensor {BASE_TENSOR!r} is a JSON string where an object with dtype, shape and data_offsets belongs"]),
    ("st-header-not-json", lambda p: raw_header(base_weights(p), b'{"a": [1, 2'), 2,
     [ST_BASE + "the safetensors header is not valid JSON (Expecting ',' delimiter at byte 11); " + DAMAGED]),
    ("st-header-is-an-array", lambda p: raw_header(base_weights(p), b"[]"), 2,
     [ST_BASE + "the safetensors header is a JSON array, not an object"]),
    ("st-header-not-utf8", lambda p: raw_header(base_weights(p), b'{"\xff": 1}'), 2,
     [ST_BASE + "the safetensors header is not UTF-8 text"]),
    ("st-header-nested-deeply", lambda p: raw_header(base_weights(p), b"[" * 100_000 + b"]" * 100_000), 2,
     [ST_BASE + "the safetensors header nests JSON too deeply"]),
    ("st-huge-header-length", lambda p: raw_header(base_weights(p), b"{}", length=2**40), 2,
     [ST_BASE + "not a safetensors file (header length 1099511627776 is implausible)"]),
    ("st-header-length-past-the-end",
     lambda p: raw_header(base_weights(p), b"{}", length=base_weights(p).stat().st_size), 2,
     [ST_BASE + "the header claims", "bytes but the file has only"]),
    ("st-shorter-than-its-length-field", lambda p: overwrite(base_weights(p), b"\x01\x02\x03"), 2,
     [ST_BASE + "not a safetensors file (shorter than its 8-byte header length)"]),
    ("st-metadata-value-not-a-string", lambda p: edit_header(base_weights(p), set_metadata({"format": 1})), 2,
     [ST_BASE + "__metadata__ must map names to strings, found {\"format\": 1}"]),
    ("st-metadata-not-an-object", lambda p: edit_header(base_weights(p), set_metadata(["pt"])), 2,
     [ST_BASE + "__metadata__ must map names to strings, found [\"pt\"]"]),
    ("st-tensor-listed-twice", lambda p: duplicate_tensor(base_weights(p), BASE_TENSOR), 2,
     [ST_BASE + f"the safetensors header is not valid JSON (key {BASE_TENSOR!r} appears twice)"]),
    ("st-adapter-overlapping-offsets", lambda p: edit_header(adapter_weights(p), shift(ADAPTER_TENSOR, -8)), 2,
     [ST_ADAPTER + f"tensor {ADAPTER_TENSOR!r} (data bytes", "overlaps tensor"]),
    ("st-adapter-truncated", lambda p: edit_header(adapter_weights(p), resize_body(-1)), 2,
     [ST_ADAPTER + "tensor", "ends 1 bytes past the end of the file"]),
    ("st-adapter-integer-factor",
     lambda p: edit_header(adapter_weights(p), set_entry(ADAPTER_TENSOR, "dtype", "I32")), 2,
     [f"adapter_model.safetensors: tensor {ADAPTER_TENSOR!r} has dtype torch.int32; expected floating point weights"]),
]

ADAPTER_CONFIG_CASES = [
    # JSON can escape half a UTF-16 pair; such text cannot be written into the bundle's JSON, card or YAML again.
    ("adapter-base-name-with-a-lone-surrogate", lambda p: adapter_config(p, base_model_name_or_path="/m/Qwen\udcff"),
     2, ["{adapter}/adapter_config.json: the text '/m/Qwen\\udcff' is not Unicode"]),
    ("base-config-key-with-a-lone-surrogate", lambda p: base_config(p, **{"note\ud800": 1}), 2,
     ["{base}/config.json: the text 'note\\ud800' is not Unicode"]),
    ("adapter-target-modules-match-a-decoder-block", lambda p: adapter_config(p, target_modules=r".*layers\.\d+"), 2,
     ["match model.layers.0, model.layers.1", "which peft cannot wrap"]),
    ("adapter-target-modules-name-a-norm", lambda p: adapter_config(p, target_modules=["q_proj", "input_layernorm"]),
     2, ["match model.layers.0.input_layernorm", "which peft cannot wrap"]),
    ("adapter-target-modules-name-a-container", lambda p: adapter_config(p, target_modules=["v_proj", "mlp"]), 2,
     ["match model.layers.0.mlp", "which peft cannot wrap"]),
    ("adapter-target-modules-nested-repeat", lambda p: adapter_config(p, target_modules="(a+)+b"), 2,
     [ADAPTER_CONFIG + "target_modules '(a+)+b' repeats a group that itself repeats or branches"]),
    ("adapter-target-modules-backreference", lambda p: adapter_config(p, target_modules=r"(q)_proj\1"), 2,
     ["target_modules '(q)_proj\\\\1' uses a backreference"]),
    ("adapter-rank-pattern-alternation-repeated", lambda p: adapter_config(p, rank_pattern={"(q|qq)*_proj": 4}), 2,
     ["rank_pattern key '(q|qq)*_proj' repeats a group"]),
    ("adapter-alpha-pattern-many-repeats", lambda p: adapter_config(p, alpha_pattern={".*.*.*.*.*x": 4}), 2,
     ["alpha_pattern key '.*.*.*.*.*x' has 6 unbounded repeats"]),
    ("adapter-layers-pattern-nested-repeat", lambda p: adapter_config(p, layers_pattern="(l+)+"), 2,
     ["layers_pattern '(l+)+' repeats a group"]),
    ("adapter-target-modules-nested-deeply", lambda p: adapter_config(p, target_modules="(" * 5000 + ")" * 5000), 2,
     ["is nested too deeply to be a module name pattern"]),
    ("adapter-unknown-key-set-by-a-newer-peft", lambda p: adapter_config(p, peft_version="0.99.0", lora_future=True),
     2, ["{adapter}/adapter_config.json (written by peft 0.99.0): lora_future is true, a setting modelpack does not"]),
    ("adapter-unknown-key-without-peft-version", lambda p: adapter_config(p, peft_version=DELETE, lora_future={"a": 1}),
     2, [ADAPTER_CONFIG + 'lora_future is {"a": 1}, a setting modelpack does not know']),
    ("adapter-unknown-key-zero-is-not-false", lambda p: adapter_config(p, lora_future=0), 2,
     ["lora_future is 0, a setting modelpack does not know"]),
    ("adapter-unimplemented-variant-switched-on", lambda p: adapter_config(p, use_qalora=True), 2,
     ["use_qalora is true, a setting modelpack does not know"]),
    ("adapter-unimplemented-init-config-set", lambda p: adapter_config(p, eva_config={"rho": 2.0}), 2,
     ['eva_config is {"rho": 2.0}, a setting modelpack does not know']),
    ("adapter-rank-zero", lambda p: adapter_config(p, r=0), 2,
     [ADAPTER_CONFIG + "r is 0, but must be a positive integer (the LoRA rank); " + RESAVE]),
    ("adapter-rank-negative", lambda p: adapter_config(p, r=-8), 2,
     [ADAPTER_CONFIG + "r is -8, but must be a positive"]),
    ("adapter-rank-string", lambda p: adapter_config(p, r="8"), 2,
     [ADAPTER_CONFIG + 'r is "8", but must be a positive']),
    ("adapter-rank-fractional", lambda p: adapter_config(p, r=8.5), 2, [ADAPTER_CONFIG + "r is 8.5, but must be"]),
    ("adapter-rank-beyond-any-dimension", lambda p: adapter_config(p, r=10**400, use_rslora=True), 2,
     [ADAPTER_CONFIG + "r is 1000000000", "but must be a positive integer (the LoRA rank)"]),
    ("adapter-alpha-beyond-any-float", lambda p: adapter_config(p, lora_alpha=10**400), 2,
     [ADAPTER_CONFIG + "lora_alpha is 1000000000", "but must be a positive number"]),
    ("adapter-alpha-not-a-number", lambda p: adapter_config(p, lora_alpha="sixteen"), 2,
     [ADAPTER_CONFIG + 'lora_alpha is "sixteen", but must be a positive number (scaling = lora_alpha / r)']),
    ("adapter-alpha-zero", lambda p: adapter_config(p, lora_alpha=0), 2,
     [ADAPTER_CONFIG + "lora_alpha is 0, but must be"]),
    ("adapter-alpha-nan", lambda p: adapter_config(p, lora_alpha=float("nan")), 2,
     [ADAPTER_CONFIG + "lora_alpha is NaN, but must be a positive number"]),
    ("adapter-rank-pattern-zero", lambda p: adapter_config(p, rank_pattern={"q_proj": 0}), 2,
     [ADAPTER_CONFIG + "rank_pattern['q_proj'] is 0, but must be a positive integer"]),
    ("adapter-rank-pattern-bad-regex", lambda p: adapter_config(p, rank_pattern={"q_proj(": 8}), 2,
     [ADAPTER_CONFIG + "rank_pattern key 'q_proj(' is not a valid regular expression "
                       "(missing ), unterminated subpattern)"]),
    ("adapter-alpha-pattern-string", lambda p: adapter_config(p, alpha_pattern={"v_proj": "32"}), 2,
     [ADAPTER_CONFIG + "alpha_pattern['v_proj'] is \"32\", but must be a positive number"]),
    ("adapter-pattern-not-a-mapping", lambda p: adapter_config(p, alpha_pattern=[32]), 2,
     [ADAPTER_CONFIG + "alpha_pattern is [32], but must be a mapping of module name patterns to values"]),
    ("adapter-targets-exist-nowhere", lambda p: adapter_config(p, target_modules=["query_key_value"]), 2,
     [ADAPTER_CONFIG + "target_modules ['query_key_value'] match no module of the base model at {base}, "
      "so peft cannot load this adapter"]),
    ("adapter-target-regex-matches-nothing", lambda p: adapter_config(p, target_modules=r".*\.attn\.c_attn"), 2,
     [ADAPTER_CONFIG + "target_modules '.*\\\\.attn\\\\.c_attn' match no module of the base model"]),
    ("adapter-target-regex-invalid", lambda p: adapter_config(p, target_modules="(q_proj"), 2,
     [ADAPTER_CONFIG + "target_modules '(q_proj' is not a valid regular expression"]),
    ("adapter-targets-a-number", lambda p: adapter_config(p, target_modules=7), 2,
     [ADAPTER_CONFIG + "target_modules is 7, but must be a list of module names or one regular expression"]),
    ("adapter-rslora-a-string", lambda p: adapter_config(p, use_rslora="false"), 2,
     [ADAPTER_CONFIG + 'use_rslora is "false", but must be true or false']),
    ("adapter-base-name-a-number", lambda p: adapter_config(p, base_model_name_or_path=7), 2,
     [ADAPTER_CONFIG + "base_model_name_or_path is 7, but must be a model name or path"]),
    ("adapter-config-a-list", lambda p: overwrite(p.adapter / "adapter_config.json", "[]"), 2,
     [ADAPTER_CONFIG + "expected a JSON object at the top level, found a list"]),
    ("adapter-config-not-json", lambda p: overwrite(p.adapter / "adapter_config.json", '{"r": 8,}'), 2,
     [ADAPTER_CONFIG + "invalid JSON at line 1: Expecting property name enclosed in double quotes"]),
    ("adapter-not-lora", lambda p: adapter_config(p, peft_type="PREFIX_TUNING"), 2,
     [ADAPTER_CONFIG + "peft_type is 'PREFIX_TUNING'; modelpack packages LoRA adapters only"]),
]

BASE_CONFIG_CASES = [
    ("base-config-a-list", lambda p: overwrite(p.base / "config.json", "[1]"), 2,
     [BASE_CONFIG + "expected a JSON object at the top level, found a list"]),
    ("base-config-not-json", lambda p: overwrite(p.base / "config.json", "{'model_type': 'qwen2'}"), 2,
     [BASE_CONFIG + "invalid JSON at line 1"]),
    ("base-config-without-model-type", lambda p: base_config(p, model_type=DELETE), 2,
     [BASE_CONFIG + '"model_type" is null; add the model type transformers knows the model by']),
    ("base-architectures-a-string", lambda p: base_config(p, architectures="Qwen2ForCausalLM"), 2,
     [BASE_CONFIG + '"architectures" is "Qwen2ForCausalLM"; write a list of model class names']),
    ("base-without-architectures-of-unknown-type",
     lambda p: base_config(p, architectures=DELETE, model_type="tiny-custom"), 2,
     [BASE_CONFIG + 'has no "architectures" and transformers knows no causal language model for model_type '
      "'tiny-custom'; add \"architectures\""]),
    ("base-dtype-a-list", lambda p: base_config(p, dtype=["float32"]), 2,
     [BASE_CONFIG + '"dtype" is ["float32"]; write a dtype name such as "bfloat16"']),
    ("base-text-config-a-string", lambda p: base_config(p, text_config="qwen2"), 2,
     [BASE_CONFIG + '"text_config" is "qwen2"; it must be a JSON object']),
    ("base-index-names-a-file-outside", lambda p: write_index(p, {BASE_TENSOR: "../outside.safetensors"}), 2,
     ["{base}/model.safetensors.index.json: weight_map gives \"../outside.safetensors\" for tensor "
      f"{BASE_TENSOR!r}, not the name of a shard in {{base}}"]),
    ("base-index-shard-not-a-name", lambda p: write_index(p, {BASE_TENSOR: 1}), 2,
     ["{base}/model.safetensors.index.json: weight_map gives 1 for tensor"]),
    ("base-positions-below-max-new-tokens", lambda p: base_config(p, max_position_embeddings=16), 2,
     ["generation.max_new_tokens is 16, but the base model handles at most 16 positions"]),
    ("base-quantized-fp8", lambda p: base_config(p, quantization_config={"quant_method": "fp8"}), 2,
     ["{base} is a quantized model (quantization_config: quant_method 'fp8')", "point base.path at the unquantized"]),
    ("base-code-named-like-the-loader",
     lambda p: base_config(p, auto_map={"AutoConfig": "load.Config"})
     or (p.base / "load.py").write_text("x = 1\n") and None,
     2, ["{base}: the model's own code has a file named load.py, which is the name of the bundle's loader"]),
    ("base-without-tokenizer", lambda p: [f.unlink() for f in p.base.iterdir() if "token" in f.name
                                          or f.name in ("vocab.json", "merges.txt", "chat_template.jinja")] and None,
     2, ["base.path {base} has no tokenizer files", "merge_and_unload", "set `tokenizer.path` in the spec"]),
    ("base-auto-map-a-string", lambda p: base_config(p, auto_map="modeling_x.X"), 2,
     ["{base}: `auto_map` in a config there is 'modeling_x.X', not an object mapping Auto classes"]),
    ("base-eos-token-id-a-string", lambda p: base_config(p, eos_token_id="2"), 2, ["eos_token_id"]),
    ("base-generation-eos-token-id-a-string", lambda p: overwrite(p.base / "generation_config.json",
                                                                   '{"eos_token_id": "2"}'), 2, ["eos_token_id"]),
    ("base-chat-template-not-utf8", lambda p: overwrite(p.base / "chat_template.jinja", b"{{ '\xff\xfe' }}"), 2,
     ["{base}/chat_template.jinja: not UTF-8 text"]),
    ("base-tokenizer-config-not-utf8", lambda p: overwrite(p.base / "tokenizer_config.json", b'{"a": "\xff"}'), 2,
     ["{base}/tokenizer_config.json: not UTF-8 text"]),
    ("base-config-nested-deeply", lambda p: overwrite(p.base / "config.json", b'{"a": ' + nested(100_000) + b"}"), 2,
     ["{base}/config.json: JSON nested deeper than modelpack's limit of 64 levels"]),
    ("base-added-tokens-decoder-malformed", lambda p: edit_json(p.base / "tokenizer_config.json", added_tokens_decoder={
        "x": {"content": "<a>"}}), 2, ["{base}/tokenizer_config.json: added_tokens_decoder holds 'x'"]),
    ("base-added-tokens-decoder-entry-a-string", lambda p: edit_json(p.base / "tokenizer_config.json",
                                                                      added_tokens_decoder={"5": "<a>"}), 2,
     ["{base}/tokenizer_config.json: added_tokens_decoder holds '5'"]),
]

CASES = SPEC_CASES + SAFETENSORS_CASES + ADAPTER_CONFIG_CASES + BASE_CONFIG_CASES


@pytest.fixture(scope="module")
def pristine(models, adapters):
    base = models("qwen2", tied=True, dtype=torch.float32)
    return base, adapters(base)


@pytest.fixture
def project(tmp_path, pristine) -> Project:
    project = Project(tmp_path)
    shutil.copytree(pristine[0], project.base)
    shutil.copytree(pristine[1], project.adapter)
    project.spec_dir.mkdir()
    return project


def build(project: Project, spec: Path):
    return CliRunner().invoke(app, ["build", str(spec), "--no-verify"], env=project.env)


def test_the_corpus_is_large_and_ids_are_unique():
    assert len(CASES) >= 60
    assert len({case[0] for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case, break_input, exit_code, fragments", CASES, ids=[c[0] for c in CASES])
def test_a_hostile_input_is_a_clear_user_error(project, case, break_input, exit_code, fragments):
    spec = break_input(project) or project.spec()
    before = tree_snapshot(project.root)

    result = build(project, spec)

    assert_user_error(result, exit_code, *(project.fill(fragment) for fragment in fragments))
    assert tree_snapshot(project.root) == before  # sources, spec and every other file as they were
    assert not (project.spec_dir / "dist").exists()


# --- unusual but valid inputs still build --------------------------------------------------------------------------


def test_a_base_config_without_architectures_gets_them_from_transformers(project):
    base_config(project, architectures=DELETE)

    result = build(project, project.spec())

    assert result.exit_code == 0, result.output
    bundle_config = json.loads((project.spec_dir / "dist" / "tiny-med" / "config.json").read_text())
    assert bundle_config["architectures"] == ["Qwen2ForCausalLM"]
    assert "architectures" not in json.loads((project.base / "config.json").read_text())


def test_unsigned_and_float8_tensors_are_read_and_written(project):
    """Packed quantisation data (U16/U32/U64) is copied byte for byte; float8 is a float dtype, cast like the rest."""
    extra = {
        "extra.u16": torch.arange(6, dtype=torch.int32).to(torch.uint16).reshape(2, 3),
        "extra.u32": torch.tensor([7, 2**31 + 5], dtype=torch.int64).to(torch.uint32),
        "extra.u64": torch.tensor([1, 2], dtype=torch.int64).to(torch.uint64),
        "extra.f8": torch.tensor([0.5, -1.0, 2.0, 448.0]).to(torch.float8_e4m3fn),
        "extra.f8_e5m2": torch.tensor([0.25, -3.0]).to(torch.float8_e5m2),
    }

    def append_tensors(header: dict, body: bytes) -> bytes:
        for name, tensor in extra.items():
            data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            dtype = {torch.uint16: "U16", torch.uint32: "U32", torch.uint64: "U64",
                     torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}[tensor.dtype]
            header[name] = {"dtype": dtype, "shape": list(tensor.shape),
                            "data_offsets": [len(body), len(body) + len(data)]}
            body += data
        return body

    edit_header(base_weights(project), append_tensors)
    with safe_open(base_weights(project), framework="pt") as f:  # the source is a valid safetensors file
        assert torch.equal(f.get_tensor("extra.u16").to(torch.int32), extra["extra.u16"].to(torch.int32))

    result = build(project, project.spec())

    assert result.exit_code == 0, result.output
    with safe_open(project.spec_dir / "dist" / "tiny-med" / "model.safetensors", framework="pt") as f:
        for name in ("extra.u16", "extra.u32", "extra.u64"):
            written = f.get_tensor(name)
            assert written.dtype == extra[name].dtype
            assert written.view(torch.uint8).tolist() == extra[name].view(torch.uint8).tolist()
        for name in ("extra.f8", "extra.f8_e5m2"):
            assert torch.equal(f.get_tensor(name), extra[name].to(torch.float32))


# --- hostile received bundles: `modelpack verify` and `inspect` refuse them in bounded time and memory ---------------

RECEIVED_LIMIT_S = 10
RECEIVED_ADDRESS_SPACE = 2 << 30


def received_bundle(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    """A bundle's shape without a model: the runtime, a config and a manifest listing them."""
    import hashlib

    from helpers import RUNTIME

    bundle = folder / "received"
    bundle.mkdir()
    contents = {"load.py": (RUNTIME / "load.py").read_bytes(), "bundle_check.py": (RUNTIME / "bundle_check.py")
                .read_bytes(), "config.json": b"{}", **(files or {})}
    for name, data in contents.items():
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
    listed = {name: {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)} for name, data in contents.items()}
    (bundle / "manifest.json").write_text(json.dumps({"generator": "modelpack", "files": listed}))
    return bundle


def deep_tree(bundle: Path, depth: int) -> None:
    """A folder tree `depth` levels deep, made relative to each level (its full path is over PATH_MAX)."""
    import os

    fd = os.open(bundle, os.O_RDONLY)
    try:
        for _ in range(depth):
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
    finally:
        os.close(fd)


def flatten_deep_tree(bundle: Path) -> None:
    """Remove deep_tree's folders one level at a time (shutil.rmtree, which pytest's cleanup uses, recurses)."""
    import os

    while (bundle / "d" / "d").is_dir():
        os.rename(bundle / "d" / "d", bundle / "next")
        os.rmdir(bundle / "d")
        os.rename(bundle / "next", bundle / "d")


def manifest_with(bundle: Path, text: bytes) -> None:
    (bundle / "manifest.json").write_bytes(text)


def many_entries(count: int) -> bytes:
    entry = '"f%d": {"sha256": "' + "0" * 64 + '", "size": 1}'
    return ('{"files": {' + ", ".join(entry % i for i in range(count)) + "}}").encode()


def with_file(name: str, data: bytes) -> Callable[[Path], None]:
    """A break that adds (or replaces) a file of the bundle and lists it in manifest.json, as a sender would."""
    import hashlib

    def add(bundle: Path) -> None:
        (bundle / name).parent.mkdir(parents=True, exist_ok=True)
        (bundle / name).write_bytes(data)
        manifest = json.loads((bundle / "manifest.json").read_bytes())
        manifest["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        (bundle / "manifest.json").write_text(json.dumps(manifest))

    return add


def safetensors_file(header: bytes, *, length: int | None = None, data: bytes = b"\0" * 4) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def nested_in(depth: int) -> bytes:
    return b'{"x": ' + nested(depth) + b"}"


# What the verification process hands to transformers, tokenizers, peft and safetensors: refused by modelpack first.
LOADED_FILE_CASES = [
    ("tokenizer-json-nested-past-the-limit", with_file("tokenizer.json", nested_in(100)),
     ["received/tokenizer.json: JSON nested deeper than modelpack's limit of 64 levels", "nothing from the bundle"]),
    ("tokenizer-json-nested-past-the-decoder", with_file("tokenizer.json", nested_in(200_000)),
     ["received/tokenizer.json: JSON nested deeper than modelpack's limit of 64 levels"]),
    ("config-json-nested", with_file("config.json", nested_in(65)), ["received/config.json: JSON nested deeper"]),
    ("tokenizer-config-nested", with_file("tokenizer_config.json", nested_in(500)),
     ["received/tokenizer_config.json: JSON nested deeper"]),
    ("adapter-config-nested", with_file("adapter/adapter_config.json", nested_in(300)),
     ["received/adapter/adapter_config.json: JSON nested deeper"]),
    ("special-tokens-map-a-list", with_file("special_tokens_map.json", b"[]"),
     ["received/special_tokens_map.json: expected a JSON object"]),
    ("generation-config-oversized", with_file("generation_config.json", b'{"x": "' + b"a" * (129 << 20) + b'"}'),
     ["received/generation_config.json: 135266313 bytes, over modelpack's limit of 134217728"]),
    ("safetensors-header-too-large", with_file("model.safetensors", safetensors_file(b"{}", length=1 << 40)),
     ["received/model.safetensors: not a safetensors file (header length 1099511627776 is implausible)"]),
    ("safetensors-header-nested", with_file("model.safetensors", safetensors_file(
        b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": ' + nested(100) + b"}}")),
     ["received/model.safetensors: its safetensors header nests JSON deeper than modelpack's limit of 64"]),
]


RECEIVED_CASES = [
    ("manifest-nested-deeply", lambda b: manifest_with(b, b'{"files": {}, "x": ' + nested(200_000) + b"}"),
     ["manifest.json: nested too deeply"]),
    ("manifest-a-list", lambda b: manifest_with(b, b"[]"), ["manifest.json: has no 'files' table"]),
    ("manifest-not-utf8", lambda b: manifest_with(b, b'{"files": {"\xff": 1}}'), ["manifest.json: not a JSON object"]),
    ("manifest-over-the-size-limit", lambda b: manifest_with(b, b'{"files": {}, "x": "' + b"a" * (17 << 20) + b'"}'),
     ["manifest.json is 17825", "over the limit of 16777216"]),
    ("manifest-millions-of-entries", lambda b: manifest_with(b, many_entries(150_000)),
     ["lists 150000 files, over the limit of 100000"]),
    ("manifest-huge-name", lambda b: manifest_with(b, json.dumps({"files": {"a" * 5000: {
        "sha256": "0" * 64, "size": 1}}}).encode()), ["a name longer than 4096 bytes"]),
    ("manifest-name-over-the-component-limit", lambda b: manifest_with(b, json.dumps({"files": {"a" * 300: {
        "sha256": "0" * 64, "size": 1}}}).encode()), ["with a part over 255 bytes"]),
    ("manifest-name-with-nul", lambda b: manifest_with(b, json.dumps({"files": {"con\0fig.json": {
        "sha256": "0" * 64, "size": 1}}}).encode()), ["con\\x00fig.json: not a file name inside the bundle"]),
    ("manifest-name-with-bidi", lambda b: manifest_with(b, json.dumps({"files": {
        "config\u202e.json": {"sha256": "0" * 64, "size": 1}}}).encode()), ["config\\u202e.json: not a file name"]),
    ("tree-thousands-of-levels-deep", lambda b: deep_tree(b, 3000), ["d/d/d/", "not in manifest.json"]),
    *LOADED_FILE_CASES,
]


@pytest.mark.parametrize("case, break_bundle, fragments", RECEIVED_CASES, ids=[c[0] for c in RECEIVED_CASES])
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_a_hostile_received_bundle_is_refused_in_bounded_time_and_memory(tmp_path, request, case, break_bundle,
                                                                         fragments, command):
    import resource
    import subprocess
    import sys

    bundle = received_bundle(tmp_path)
    break_bundle(bundle)
    request.addfinalizer(lambda: flatten_deep_tree(bundle))
    if command == "inspect":
        fragments = []  # inspect reports what it can read of a bundle; it must only end cleanly

    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (RECEIVED_ADDRESS_SPACE, RECEIVED_ADDRESS_SPACE))

    result = subprocess.run([sys.executable, "-c", "from builder.cli import main; main()", command, str(bundle)],
                            capture_output=True,
                            text=True, timeout=RECEIVED_LIMIT_S, preexec_fn=limits)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    if command == "verify":
        assert result.returncode == 3, output
    else:
        assert result.returncode in (0, 2, 3), output  # 0: it listed the problems it found
    for fragment in fragments:
        assert fragment in output, output


# --- hostile chat templates: each rendering within limits, before anything runs -----------------------------------
# A chat template is the sender's code: every command that renders one (its own renderings, and the conversations
# the verification process will render) stops it at a limit with exit 2, naming the template's file and the limit.

TIME_LIMIT = "did not finish rendering within 2 s"
# A string grown in steps fills the memory limit, or on a loaded machine runs out of time first: either stops it.
MEMORY_LIMIT = ("needed more than 512 MiB of memory", "did not finish rendering within 2 s")
FRAMES_LIMIT = "nests or recurses deeper than modelpack's limit of 300 Python frames"
OUTPUT_LIMIT = "rendered more than 1,048,576 characters"
CHATML_BODY = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def empty_loops(depth: int) -> str:
    """Nested loops over the sandbox's largest range that call nothing: no hook on calls or attributes sees them."""
    return "{% for i in range(100000) %}" * depth + "{% endfor %}" * depth


def doubling(step: str) -> str:
    """A string doubled 64 times through a namespace (a plain {% set %} inside a loop is the loop's own)."""
    return ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = " + step + " %}{% endfor %}"
            "{{ ns.s | length }}")


HOSTILE_TEMPLATES = {
    "nested-empty-loops": (empty_loops(2), TIME_LIMIT),
    "three-nested-empty-loops": (empty_loops(3), TIME_LIMIT),
    "string-times-a-billion": ("{{ 'x' * 10**9 }}", MEMORY_LIMIT),
    "string-doubled-by-concatenation": (doubling("ns.s ~ ns.s"), MEMORY_LIMIT),
    "string-doubled-by-join": (doubling("[ns.s, ns.s] | join"), MEMORY_LIMIT),
    "string-grown-by-replace": (doubling("ns.s | replace('a', ns.s)"), MEMORY_LIMIT),
    "string-padded-to-a-billion": ("{{ 'ab' | center(10**9) }}", MEMORY_LIMIT),
    "macro-calling-itself": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", FRAMES_LIMIT),
    "macros-calling-each-other": ("{% macro f(n) %}{{ g(n) }}{% endmacro %}{% macro g(n) %}{{ f(n) }}{% endmacro %}"
                                  "{{ f(0) }}", FRAMES_LIMIT),
    "macro-branching-exponentially": ("{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                                      "{% endmacro %}{{ f(40) }}", TIME_LIMIT),
    "long-output": ("{% for i in range(100000) %}" + "0123456789" * 2 + "{% endfor %}", OUTPUT_LIMIT),
    "long-output-from-a-macro": ("{% macro line() %}" + "x" * 100 + "{% endmacro %}"
                                 "{% for i in range(100000) %}{{ line() }}{% endfor %}", OUTPUT_LIMIT),
}
# The two that cost the full time limit run for every command; the rest for the cheap ones.
EVERY_COMMAND = ("nested-empty-loops", "string-doubled-by-concatenation", "macro-calling-itself", "long-output")
TEMPLATE_COMMANDS = ("validate", "build --dry-run", "build", "inspect", "init")
TEMPLATE_CASES = [(name, command) for name in HOSTILE_TEMPLATES for command in TEMPLATE_COMMANDS
                  if command == "validate" or name in EVERY_COMMAND]


def limits(limit: str | tuple[str, ...]) -> tuple[str, ...]:
    return limit if isinstance(limit, tuple) else (limit,)


def run_command(project: Project, command: str, spec: Path) -> object:
    if command == "inspect":
        arguments = ["inspect", str(project.base)]
    elif command == "init":
        arguments = ["init", str(project.adapter), "--base", str(project.base), "-o", str(project.spec_dir / "d.yaml")]
    else:
        arguments = [*command.split(), str(spec)] + (["--no-verify"] if command == "build" else [])
    return CliRunner().invoke(app, arguments, env=project.env)


@pytest.mark.parametrize("name, command", TEMPLATE_CASES, ids=[f"{n}-{c.replace(' ', '')}" for n, c in TEMPLATE_CASES])
def test_a_runaway_chat_template_is_stopped_at_a_limit(project, name, command):
    import time

    template, limit = HOSTILE_TEMPLATES[name]
    template = f"{{# {command} #}}" + template  # a text of its own: a template refused once is not rendered again
    if command in ("inspect", "init"):  # they read the base's own template
        (project.base / "chat_template.jinja").write_text(template, encoding="utf-8")
        culprit = project.base / "chat_template.jinja"
    else:
        culprit = project.spec_dir / "hostile.jinja"
        culprit.write_text(template, encoding="utf-8")
    spec = project.spec(chat={"template": "hostile.jinja"})
    started = time.monotonic()

    result = run_command(project, command, spec)

    assert time.monotonic() - started < RECEIVED_LIMIT_S
    assert_user_error(result, 2, str(culprit.resolve()))
    assert any(phrase in result.output for phrase in limits(limit)), result.output
    assert not (project.spec_dir / "dist").exists()


def on_the_verification_prompt(hostile: str) -> str:
    """A template that behaves on every conversation but the verification prompt's (add_generation_prompt, the
    spec's prompt as the last message), as only the verification process would render it."""
    return ("{% if add_generation_prompt and messages[-1].content == '你好' %}" + hostile + "{% endif %}" + CHATML_BODY)


# Names only one runtime defines when it renders: transformers' apply_chat_template, llama-cpp-python's formatter.
ONLY_IN = {"transformers": "tools is defined and documents is defined and mask_token is undefined",
           "llama.cpp": "functions is defined and tool_choice is defined and pad_token is undefined"}


@pytest.mark.parametrize("command, runtime", [("validate", None), ("build", None), ("validate", "transformers"),
                                              ("validate", "llama.cpp")])
def test_the_verification_conversations_are_rendered_before_any_process_starts(project, command, runtime):
    culprit = project.spec_dir / "hostile.jinja"
    hostile = f"{{# {command} {runtime} #}}" + empty_loops(2)
    if runtime is not None:
        hostile = "{% if " + ONLY_IN[runtime] + " %}" + hostile + "{% endif %}"
    culprit.write_text(on_the_verification_prompt(hostile), encoding="utf-8")
    spec = project.spec(chat={"template": "hostile.jinja", "system_prompt": "Be brief."})

    result = CliRunner().invoke(app, [command, str(spec)], env=project.env)  # build: with verification

    assert_user_error(result, 2, str(culprit.resolve()), TIME_LIMIT)
    assert not (project.spec_dir / "dist").exists()


def test_real_chat_templates_pass_the_limits_in_every_command(project):
    from helpers import QWEN2_TEMPLATE

    (project.base / "chat_template.jinja").write_text(QWEN2_TEMPLATE, encoding="utf-8")
    (project.spec_dir / "chatml.jinja").write_text(CHATML_BODY, encoding="utf-8")
    spec = project.spec(chat={"template": "chatml.jinja", "system_prompt": "Be brief."})

    for command in ("validate", "build --dry-run", "inspect", "init"):
        result = run_command(project, command, spec)
        assert result.exit_code == 0, (command, result.output)


BUNDLE_FACTS = {"mode": "merge", "dtype": "float32", "system_prompt": "Be brief.", "verify_max_new_tokens": 8,
                "prompts": [{"prompt": "你好"}], "probes": [{"prompt": "What is 2+2?"}]}


@pytest.mark.parametrize("name", ["nested-empty-loops", "string-times-a-billion", "macro-branching-exponentially",
                                  "long-output", "on-the-verification-prompt"])
@pytest.mark.parametrize("home", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_received_bundles_runaway_template_is_refused_before_verification_runs(tmp_path, name, home):
    import subprocess
    import sys
    import time

    template, limit = HOSTILE_TEMPLATES.get(name) or (on_the_verification_prompt(empty_loops(2)), TIME_LIMIT)
    config = {"eos_token": "<|im_end|>", "chat_template": template if home == "tokenizer_config.json" else None}
    files = {"modelpack_bundle.json": json.dumps(BUNDLE_FACTS).encode(), "tokenizer_config.json": json.dumps(config)
             .encode(), **({"chat_template.jinja": template.encode()} if home == "chat_template.jinja" else {})}
    bundle = received_bundle(tmp_path, files)
    started = time.monotonic()

    result = subprocess.run([sys.executable, "-c", "from builder.cli import main; main()", "verify", str(bundle)],
                            capture_output=True, text=True, timeout=RECEIVED_LIMIT_S,
                            preexec_fn=lambda: __import__("resource").setrlimit(
                                __import__("resource").RLIMIT_AS, (RECEIVED_ADDRESS_SPACE, RECEIVED_ADDRESS_SPACE)))

    output = result.stdout + result.stderr
    assert (result.returncode, "Traceback" in output) == (2, False), output
    assert f"{bundle / home}: the chat template" in output, output
    assert any(phrase in output for phrase in limits(limit)), output
    assert time.monotonic() - started < RECEIVED_LIMIT_S


# --- names that are not text: refused up front, shown with escapes --------------------------------------------------
# A source path or file name flows into manifest.json, verification.json, --json output, DIR.run.json, the card,
# init's YAML and messages: one whose bytes are not UTF-8, or that holds a control character, is exit 2 naming it.

BAD_NAMES = {  # a name's bytes -> how messages show them
    "invalid-byte": (b"\xff", "\\xff"),
    "truncated-sequence": (b"\xc3", "\\xc3"),
    "encoded-surrogate": (b"\xed\xa0\x80", "\\xed\\xa0\\x80"),
    "control-character": (b"\x01", "\\x01"),
    "newline": (b"\n", "\\n"),
    "terminal-escape": (b"\x1b[31m", "\\x1b[31m"),
}


def bad_path(folder: Path, name: bytes) -> Path:
    import os

    return Path(os.fsdecode(bytes(folder) + name))


def move(source: Path, target: Path) -> Path:
    source.rename(target)
    return target


def bad_base(p: Project, name: bytes) -> Path:
    p.env["BAD_FOLDER"] = str(move(p.base, bad_path(p.base, name)))
    return Path(p.env["BAD_FOLDER"])


def bad_adapter(p: Project, name: bytes) -> Path:
    p.env["BAD_FOLDER"] = str(move(p.adapter, bad_path(p.adapter, name)))
    return Path(p.env["BAD_FOLDER"])


def bad_run_folder(p: Project, name: bytes) -> Path:
    """A Trainer output folder with a name that is not text, whose checkpoint-10 is found by listing it."""
    run = bad_path(p.root / "run", name)
    run.mkdir()
    p.env["BAD_FOLDER"] = str(move(p.adapter, run / "checkpoint-10"))
    return run


def bad_file_in_base(kind: str) -> Callable[[Project, bytes], Path]:
    """A file of the base that modelpack copies into the bundle: a license, a tiktoken vocabulary, model code."""

    def plant(p: Project, name: bytes) -> Path:
        if kind == "model-code":
            path = bad_path(p.base / "modeling_", name + b".py")
            path.write_text("class Model: pass\n")
            edit_json(p.base / "config.json", auto_map={"AutoModelForCausalLM": f"{path.stem}.Model"})
        else:
            path = bad_path(p.base / ("LICENSE" if kind == "license" else "extra"),
                            name + (b"" if kind == "license" else b".tiktoken"))
            path.write_text("text\n")
        return p.base

    return plant


PLACES = {  # how a bad name gets in -> (plant it, returning the folder commands take; the role of that folder)
    "base-folder-through-a-variable": (bad_base, "base"),
    "adapter-folder-through-a-variable": (bad_adapter, "adapter"),
    "checkpoint-found-by-listing": (bad_run_folder, "adapter"),
    "license-file-in-the-base": (bad_file_in_base("license"), "base"),
    "tokenizer-file-in-the-base": (bad_file_in_base("tiktoken"), "base"),
    "model-code-in-the-base": (bad_file_in_base("model-code"), "base"),
}
NAME_COMMANDS = ("validate", "build --dry-run", "build", "inspect", "init")
# Every name in every place, each with one command in turn, so that every command meets every place.
NAME_CASES = [(place, name, NAME_COMMANDS[(i + j) % len(NAME_COMMANDS)])
              for i, place in enumerate(PLACES) for j, name in enumerate(BAD_NAMES)]


@pytest.mark.parametrize("place, name, command", NAME_CASES, ids=[f"{p}-{n}-{c.replace(' ', '')}"
                                                                  for p, n, c in NAME_CASES])
def test_a_name_that_is_not_text_is_refused_naming_it(project, place, name, command):
    plant, role = PLACES[place]
    raw, escaped = BAD_NAMES[name]
    folder = plant(project, raw)
    through_variable = {role: {"path": "${BAD_FOLDER}"}} if "BAD_FOLDER" in project.env else {}
    spec = project.spec(**through_variable)
    if command == "inspect":
        arguments = ["inspect", str(folder)]
    elif command == "init":
        checkpoint, base = (folder, project.base) if role == "adapter" else (project.adapter, folder)
        arguments = ["init", str(checkpoint), "--base", str(base), "-o", str(project.spec_dir / "drafted.yaml")]
    else:
        arguments = [*command.split(), str(spec)] + (["--no-verify"] if command == "build" else [])

    result = CliRunner().invoke(app, arguments, env=project.env)

    if place == "model-code-in-the-base" and not raw.isascii():  # config.json can name it only by \udcXX escapes
        assert_user_error(result, 2, "config.json: the text 'modeling_\\udc", "is not Unicode")
    else:
        assert_user_error(result, 2, escaped, "rename it")
    assert not (project.spec_dir / "dist").exists() and not (project.spec_dir / "drafted.yaml").exists()


def gguf_with_template(folder: Path, template: str) -> bytes:
    """A small GGUF file whose metadata holds a vocabulary and the chat template llama.cpp would render."""
    import gguf
    import numpy as np

    path = folder / "template.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(1000)])
    writer.add_chat_template(template)
    writer.add_tensor("x", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@pytest.mark.parametrize("name", ["nested-empty-loops", "macro-calling-itself", "cut-short"])
def test_a_gguf_files_own_template_is_checked_before_llama_cpp_renders_it(tmp_path, name):
    import subprocess
    import sys

    hostile = HOSTILE_TEMPLATES.get(name, (CHATML_BODY, ""))[0]
    data = gguf_with_template(tmp_path, hostile)
    data = data[:200] if name == "cut-short" else data
    files = {"modelpack_bundle.json": json.dumps(BUNDLE_FACTS).encode(), "chat_template.jinja": CHATML_BODY.encode(),
             "gguf/tiny-Q8_0.gguf": data}
    bundle = received_bundle(tmp_path, files)

    result = subprocess.run([sys.executable, "-c", "from builder.cli import main; main()", "verify", str(bundle)],
                            capture_output=True, text=True, timeout=RECEIVED_LIMIT_S)

    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    if name == "cut-short":
        assert result.returncode == 3 and "gguf/tiny-Q8_0.gguf: its metadata cannot be read" in output, output
    else:
        assert result.returncode == 2, output
        assert f"{bundle}/gguf/tiny-Q8_0.gguf (tokenizer.chat_template): the chat template" in output, output
        assert any(phrase in output for phrase in limits(HOSTILE_TEMPLATES[name][1])), output
