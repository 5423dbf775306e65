"""Fuzzing the input readers: every spec document, adapter config and safetensors header either loads or raises
ModelpackError (exit 2, a message for the user); any other exception would be exit 1, a bug.

The readers are called directly (no bundle is built), so a few hundred examples per input kind run in seconds.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from builder.adapter_compose import WeightedAdapter
from builder.adapter_match import match_adapter
from builder.dtypes import SAFETENSORS_DTYPES
from builder.errors import ModelpackError
from builder.plan import plan_build
from builder.safetensors_io import read_safetensors_header
from builder.sources import read_adapter_checkpoint, read_base_model
from builder.spec import load_spec
from helpers import write_spec

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ENVIRON = {"MODELS": "..", "EMPTY": ""}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([2**63, -(2**64), 10**400])
    | st.floats()
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=10,
)


def outcome(read, *args, **kwargs):
    """The reader's result, or None when it refused the input the one allowed way."""
    try:
        return read(*args, **kwargs)
    except ModelpackError:
        return None


# --- spec documents --------------------------------------------------------------------------------------------------

SPEC_KEYS = [
    "name", "base", "adapter", "output", "generation", "chat", "card", "verify", "path", "trust_remote_code",
    "allow_pickle", "dir", "mode", "dtype", "max_shard_size", "max_new_tokens", "do_sample", "temperature", "top_p",
    "top_k", "repetition_penalty", "system_prompt", "template", "prompts", "probes", "prompt", "expect", "contains",
    "not_contains", "equals", "regex", "python", "device", "compare_base", "language", "tags",
]
spec_strings = st.sampled_from(
    ["${MODELS}", "${EMPTY}", "${EMPTY:-}", "${UNSET}", "${UNSET:-x}", "${MODELS:-y}/m", "merge", "2GB", "-1", "auto",
     "~", "../models", "(", "&a", "*a", "!!binary", ""]
) | st.text(max_size=16)
spec_values = st.recursive(
    json_scalars | spec_strings,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.sampled_from(SPEC_KEYS) | st.text(max_size=6), children, max_size=5),
    max_leaves=20,
)
# Characters that change a YAML document's structure: inserted anywhere, they reach every branch of the parser.
YAML_ALPHABET = list("ab0: -[]{}&*!|>'\"#%@,?$\n\t\\.~")


@pytest.fixture(scope="module")
def spec_project(tmp_path_factory) -> tuple[Path, str]:
    """A project whose spec points at existing (empty) folders, and the valid spec's text."""
    root = tmp_path_factory.mktemp("spec-fuzz")
    for folder in ("models/base", "checkpoints/checkpoint-10", "project"):
        (root / folder).mkdir(parents=True)
    spec = write_spec(root / "project", root / "models" / "base", root / "checkpoints" / "checkpoint-10",
                      base={"path": "${MODELS}/models/base"}, card={"tags": ["medical", "lora"]})
    assert outcome(load_spec, spec, environ=ENVIRON) is not None
    return spec, spec.read_text(encoding="utf-8")


def mutate_text(text: str, edits: list[tuple[int, int, str]]) -> str:
    """Apply (position, characters removed, characters inserted) edits, positions taken modulo the length."""
    for position, removed, inserted in edits:
        at = position % (len(text) + 1)
        text = text[:at] + inserted + text[at + removed :]
    return text


def set_at(document: dict, path: list[int], value) -> dict:
    """Replace the value reached by following `path` (indices taken modulo each collection's size)."""
    node = document
    for step in path:
        children = list(node.items()) if isinstance(node, dict) else list(enumerate(node))
        key, child = children[step % len(children)]
        if not isinstance(child, (dict, list)) or not child:
            node[key] = value
            return document
        node = child
    return document


@FUZZ
@given(document=spec_values)
def test_any_yaml_structure_loads_or_is_a_spec_error(spec_project, document):
    spec, _ = spec_project
    spec.write_text(yaml.safe_dump(document, allow_unicode=True), encoding="utf-8")
    outcome(load_spec, spec, environ=ENVIRON)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10**4), st.integers(0, 3), st.text(YAML_ALPHABET, max_size=4)),
                      min_size=1, max_size=6))
def test_a_valid_spec_with_characters_changed_loads_or_is_a_spec_error(spec_project, edits):
    spec, text = spec_project
    spec.write_text(mutate_text(text, edits), encoding="utf-8")
    outcome(load_spec, spec, environ=ENVIRON)


@FUZZ
@given(path=st.lists(st.integers(0, 50), min_size=1, max_size=5), value=spec_values)
def test_a_valid_spec_with_one_value_replaced_loads_or_is_a_spec_error(spec_project, path, value):
    spec, text = spec_project
    spec.write_text(yaml.safe_dump(set_at(yaml.safe_load(text), path, value), allow_unicode=True), encoding="utf-8")
    outcome(load_spec, spec, environ=ENVIRON)


# --- adapter configs --------------------------------------------------------------------------------------------------

MODULE_NAMES = [
    "q_proj", "k_proj", "v_proj", "down_proj", "lm_head", "embed_tokens", "model", "layers.0.mlp", "nope", "",
]
module_patterns = st.sampled_from(MODULE_NAMES) | st.text("abq_proj.*()[]\\d+?|^$", max_size=10)
numbers = st.integers(-2, 20) | st.floats(-1, 64) | st.sampled_from([float("nan"), float("inf"), True, 2**63, 10**400])
ADAPTER_VALUES = {
    "r": numbers | json_values,
    "lora_alpha": numbers | json_values,
    "target_modules": st.lists(module_patterns, max_size=4) | module_patterns | json_values,
    "rank_pattern": st.dictionaries(module_patterns, numbers | json_values, max_size=3) | json_values,
    "alpha_pattern": st.dictionaries(module_patterns, numbers | json_values, max_size=3) | json_values,
    "use_rslora": json_values,
    "fan_in_fan_out": json_values,
    "trainable_token_indices": st.lists(st.integers(-2, 500), max_size=3)
    | st.dictionaries(module_patterns, st.lists(st.integers(-2, 500), max_size=3), max_size=2) | json_values,
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", "loftq", "olora"]) | json_values,
    "layer_replication": json_values,
    "megatron_config": json_values,
    "ensure_weight_tying": json_values,
    "modules_to_save": json_values,
    "base_model_name_or_path": json_values,
    "peft_type": st.sampled_from(["LORA", "lora", "IA3"]) | json_values,
}
adapter_changes = st.fixed_dictionaries({}, optional=ADAPTER_VALUES)


@pytest.fixture(scope="module")
def adapter_project(tmp_path_factory, models, adapters):
    """A private adapter copy whose config each example rewrites, the base read once, and a loaded spec."""
    base_dir = models("qwen2", tied=True, dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapter-fuzz")
    adapter_dir = root / "checkpoint-10"
    shutil.copytree(adapters(base_dir), adapter_dir)
    spec_path = write_spec(root, base_dir, adapter_dir)
    pristine = json.loads((adapter_dir / "adapter_config.json").read_text())
    return read_base_model(base_dir), adapter_dir, load_spec(spec_path), spec_path, pristine


@FUZZ
@given(changes=adapter_changes, whole=st.none() | json_values)
def test_any_adapter_config_plans_or_is_a_source_error(adapter_project, changes, whole):
    base, adapter_dir, spec, spec_path, pristine = adapter_project
    config = {**pristine, **changes} if whole is None else whole
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
    adapter = outcome(read_adapter_checkpoint, adapter_dir)
    if adapter is not None:
        outcome(match_adapter, base, adapter)
        for mode in ("merge", "separate"):
            moded = spec.model_copy(update={"output": spec.output.model_copy(update={"mode": mode})})
            outcome(plan_build, moded, base, (WeightedAdapter("adapter", adapter, 1.0),), spec_file=spec_path)


# --- safetensors headers -------------------------------------------------------------------------------------------

DTYPE_NAMES = [*SAFETENSORS_DTYPES, "F4", "F8_E8M0", "C64", "f32", ""]
entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(DTYPE_NAMES) | json_values,
        "shape": st.lists(st.integers(-1, 4), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-1, 40), min_size=2, max_size=2) | json_values,
    },
) | json_values
random_headers = st.dictionaries(
    st.sampled_from(["a", "b", "c", "__metadata__"]) | st.text(max_size=4), entries, max_size=4
) | json_values


@st.composite
def consistent_headers(draw) -> tuple[dict, int]:
    """A valid header (tensors tiling the data section) and its data size, then at most one field changed."""
    header, offset = {}, 0
    for index in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(list(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        size = SAFETENSORS_DTYPES[dtype].itemsize * int(torch.tensor(shape).prod().item() if shape else 1)
        header[f"t{index}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(
            st.dictionaries(st.text(max_size=4), st.text(max_size=4) | json_values, max_size=2)
        )
    if header and draw(st.booleans()):
        name = draw(st.sampled_from(sorted(header)))
        if name == "__metadata__":
            header[name] = draw(json_values)
        else:
            field = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            header[name][field] = draw(entries.map(lambda e: e.get(field) if isinstance(e, dict) else e)
                                       | st.lists(st.integers(-1, offset + 4), min_size=2, max_size=2))
    return header, offset + draw(st.sampled_from([0, 0, 0, -1, 1, 8]))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("header-fuzz") / "model.safetensors"


def write_weights(path: Path, header: dict, data_size: int) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + bytes(max(data_size, 0)))


def assert_safetensors_agrees(path: Path, locations: dict) -> None:
    """What modelpack accepts, the safetensors library opens the same way: names, dtypes and shapes."""
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(locations)
        for name, location in locations.items():
            tensor = f.get_tensor(name)
            assert (tensor.dtype, tuple(tensor.shape)) == (location.dtype.torch, location.shape)


@FUZZ
@given(header=random_headers, data_size=st.integers(0, 48))
def test_any_header_reads_or_is_a_source_error(weights_file, header, data_size):
    write_weights(weights_file, header, data_size)
    locations = outcome(read_safetensors_header, weights_file)
    if locations is not None:
        assert_safetensors_agrees(weights_file, locations)


@FUZZ
@given(header_and_size=consistent_headers())
def test_a_valid_header_with_one_field_changed_reads_or_is_a_source_error(weights_file, header_and_size):
    write_weights(weights_file, *header_and_size)
    locations = outcome(read_safetensors_header, weights_file)
    if locations is not None:
        assert_safetensors_agrees(weights_file, locations)


@FUZZ
@given(length=st.integers(0, 2**64 - 1) | st.integers(0, 64), rest=st.binary(max_size=64))
def test_any_bytes_read_or_are_a_source_error(weights_file, length, rest):
    weights_file.write_bytes(struct.pack("<Q", length) + rest)
    outcome(read_safetensors_header, weights_file)


def test_a_header_modelpack_accepts_is_one_safetensors_accepts(weights_file):
    """The differential check above can fail: a plain valid file round-trips through both readers."""
    write_weights(weights_file, {"w": {"dtype": "U16", "shape": [2], "data_offsets": [0, 4]}}, 4)
    locations = read_safetensors_header(weights_file)
    assert_safetensors_agrees(weights_file, locations)
    assert locations["w"].dtype.torch == torch.uint16 and locations["w"].nbytes == 4


# --- regular expressions from adapter configs --------------------------------------------------------------------

REGEX_PIECES = ["a", "b", ".", r"\.", r"\d", "[ab]", "(", ")", "|", "*", "+", "?", "{2,}", "{1,3}", "(?:", "(?=",
                "(?!", "(?<=a)", r"\1", "^", "$", "_proj", "(?P<n>", "(?P=n)"]
regexes = st.lists(st.sampled_from(REGEX_PIECES), min_size=1, max_size=14).map("".join)
# Module names as transformers writes them, and the strings that make a backtracking engine work hardest on them.
HARD_NAMES = ["model.layers.0.self_attn.q_proj", "a" * 28 + "!", "ab" * 14 + "!", "a." * 14 + "!", "1" * 28 + "x"]


@FUZZ
@given(pattern=regexes)
def test_a_pattern_the_rule_admits_matches_hard_module_names_fast(pattern):
    import re
    import time

    from builder.sources import regex_problem

    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return
    if regex_problem(pattern) is not None:
        return
    started = time.perf_counter()
    for name in HARD_NAMES:
        re.fullmatch(pattern, name)
        re.match(rf"(.*\.)?({pattern})$", name)
    assert time.perf_counter() - started < 0.5, pattern


@FUZZ
@given(pattern=regexes, key=st.sampled_from(["target_modules", "layers_pattern", "rank_pattern", "alpha_pattern"]))
def test_any_adapter_pattern_is_accepted_or_a_source_error(pattern, key):
    from builder.sources import _check_adapter_values

    value = {pattern: 4} if key.endswith("_pattern") and key != "layers_pattern" else pattern
    outcome(_check_adapter_values, {"r": 8, key: value}, Path("adapter_config.json"))


def test_a_pattern_that_does_not_finish_in_time_is_refused_naming_it(monkeypatch):
    from builder import adapter_match

    monkeypatch.setattr(adapter_match, "PATTERN_SECONDS", 0.001)
    names = [f"model.layers.{i}.self_attn.q_projection_and_more" for i in range(200)]
    with pytest.raises(ModelpackError, match=r"target_modules '\.\*\.\*\.\*\.\*x' did not finish matching the base's "
                                             r"200 module names within 0\.001 s"):
        adapter_match.check_patterns_in_time({"target_modules": ".*.*.*.*x"}, names, Path("adapter_config.json"))
    monkeypatch.setattr(adapter_match, "PATTERN_SECONDS", 2.0)
    adapter_match.check_patterns_in_time({"target_modules": ".*.*.*.*x"}, names[:2], Path("adapter_config.json"))


# --- received manifests ----------------------------------------------------------------------------------------------

NAME_PIECES = ["a", "config.json", "/", ".", "..", "\\", "\0", "\n", "\u202e", "A", "ß", "SS", "e\u0301", "\u00e9",
               "manifest.json", "model.sig", ":", "C:", "x" * 300]
manifest_names = st.lists(st.sampled_from(NAME_PIECES), min_size=1, max_size=6).map("".join)


@FUZZ
@given(names=st.lists(manifest_names, max_size=6), depth=st.integers(0, 3000))
def test_a_manifest_is_parsed_or_refused_and_no_clean_name_leaves_the_bundle(names, depth):
    from builder.runtime.bundle_check import clean_entries, parse_manifest

    entry = {"sha256": "0" * 64, "size": 1}
    text = json.dumps({"files": dict.fromkeys(names, entry)})
    text = text[:-1] + ', "x": ' + "[" * depth + "0" + "]" * depth + "}"
    listed, problems = parse_manifest(text.encode())
    if listed is None:
        assert problems and depth > 0
        return
    clean = [name for name, _ in clean_entries(listed)]
    assert len(clean) + len(problems) == len(listed)
    for name in clean:
        parts = name.split("/")
        assert ".." not in parts and "" not in parts and not name.startswith("/") and name.isprintable()
        assert name not in ("manifest.json", "model.sig") and "\\" not in name
    folded = [name.casefold() for name in clean]
    assert len(set(folded)) == len(folded)


@FUZZ
@given(name=st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b))
def test_any_folder_name_is_read_or_refused_in_a_message_that_prints(tmp_path_factory, name):
    """A base folder named by arbitrary bytes: read (its name is printable UTF-8) or a SourceError whose message
    encodes as UTF-8 and names the folder with its bytes escaped; never a UnicodeEncodeError later."""
    import os

    from builder.sources import require_text_path, shown_path

    folder = Path(os.fsdecode(bytes(tmp_path_factory.mktemp("names")) + b"/" + name))
    try:
        require_text_path(folder, "base.path")
    except ModelpackError as error:
        error.message.encode("utf-8")
        assert shown_path(folder) in error.message and shown_path(folder).isprintable()
    else:
        str(folder).encode("utf-8")
        assert str(folder).isprintable()


@FUZZ
@given(value=st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=30),
       wrap=st.integers(0, 80))
def test_the_json_depth_is_counted_as_deep_as_the_nesting(value, wrap):
    from builder.sources import MAX_JSON_DEPTH, json_depth

    def depth(item) -> int:
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        return 0 if children is None else 1 + max((depth(c) for c in children), default=0)

    for _ in range(wrap):
        value = [value]
    assert min(json_depth(value), MAX_JSON_DEPTH + 1) == min(depth(value), MAX_JSON_DEPTH + 1)
