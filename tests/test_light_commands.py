"""The commands that only read YAML, JSON and headers (--help, --version, validate, inspect, init, build --dry-run,
schema) never import torch, transformers or peft; what they use in those libraries' place gives the libraries' own
answers: the dtype table (torch), the causal-LM class names (transformers), the strict check of generation
settings (transformers' GenerationConfig). The chat template environment has its own parity test
(test_chat_template.py)."""

from __future__ import annotations

import itertools
import shutil
import sys
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from pydantic import ValidationError
from transformers import GenerationConfig
from transformers.models.auto import modeling_auto

from builder.build import build_bundle, plan_from_spec
from builder.dtypes import OLDEST_TORCH, SAFETENSORS_DTYPES, readable
from builder.merge_blocks import FLOAT16_MAX
from builder.sources import causal_lm_classes, causal_lm_literal
from builder.spec import GenerationSpec
from helpers import heavy_imports_of, qwen_base, random_checkpoint, write_spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """The demo's spec, checkpoint and base; a Trainer output folder of its checkpoints; a bundle built from the demo
    spec; and the same for the Qwen-v1 fixture, whose remote code and tiktoken tokenizer take other paths."""
    root = tmp_path_factory.mktemp("light")
    trainer = root / "trainer-output"
    for step in (100, 200):
        shutil.copytree(REPO / "demo" / "checkpoint-200", trainer / f"checkpoint-{step}")
    qwen_root = tmp_path_factory.getbasetemp() / "qwen_v1"
    qwen = qwen_base(qwen_root)
    qwen_checkpoint = random_checkpoint(qwen_root)
    qwen_spec = write_spec(root, qwen, qwen_checkpoint, name="qwen-med", base={"trust_remote_code": True},
                           output={"dir": "dist/qwen-med", "dtype": "bfloat16"})
    demo_spec = REPO / "specs" / "demo.yaml"
    return {
        "demo spec": demo_spec,
        "demo base": REPO / "demo" / "base",
        "demo checkpoint": REPO / "demo" / "checkpoint-200",
        "trainer output": trainer,
        "demo bundle": build_bundle(plan_from_spec(demo_spec, output_dir=root / "qwen-tiny-med"), verify=False).bundle,
        "qwen spec": qwen_spec,
        "qwen base": qwen,
        "qwen checkpoint": qwen_checkpoint,
        "qwen bundle": build_bundle(plan_from_spec(qwen_spec), verify=False).bundle,
        "drafts": root / "drafts",
    }


COMMANDS = {
    "--help": ["--help"],
    "--version": ["--version"],
    "--version --json": ["--version", "--json"],
    "schema": ["schema"],
    "validate demo spec": ["validate", "{demo spec}"],
    "validate demo spec --json": ["validate", "{demo spec}", "--json"],
    "dry run of the demo spec": ["build", "{demo spec}", "--dry-run"],
    "dry run of the demo spec --json": ["build", "{demo spec}", "--dry-run", "--json"],
    "inspect demo bundle": ["inspect", "{demo bundle}"],
    "inspect demo bundle --json": ["inspect", "{demo bundle}", "--json"],
    "inspect demo checkpoint": ["inspect", "{demo checkpoint}"],
    "inspect Trainer output": ["inspect", "{trainer output}"],
    "inspect demo base": ["inspect", "{demo base}"],
    "init from demo checkpoint": ["init", "{demo checkpoint}", "--base", "{demo base}", "-o", "{drafts}/a.yaml"],
    "init from Trainer output": ["init", "{trainer output}", "--base", "{demo base}", "-o", "{drafts}/b.yaml"],
    "validate Qwen-v1 spec": ["validate", "{qwen spec}"],
    "dry run of the Qwen-v1 spec": ["build", "{qwen spec}", "--dry-run"],
    "inspect Qwen-v1 base": ["inspect", "{qwen base}"],
    "inspect Qwen-v1 bundle (remote code)": ["inspect", "{qwen bundle}"],
    "init from Qwen-v1 checkpoint": ["init", "{qwen checkpoint}", "--base", "{qwen base}", "-o", "{drafts}/c.yaml"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_light_commands_never_import_torch_transformers_or_peft(inputs, command):
    args = [arg.format_map({name: str(path) for name, path in inputs.items()}) for arg in COMMANDS[command]]
    found, output = heavy_imports_of(args)
    assert found["exit"] == 0, output  # a command that failed early proves nothing
    assert found["heavy"] == []


# --- dtypes: the table headers and plans use instead of torch's dtypes -------------------------------------------


@pytest.mark.parametrize("name", SAFETENSORS_DTYPES)
def test_each_dtype_is_torchs_own(name):
    dtype = SAFETENSORS_DTYPES[name]
    assert readable(dtype) == hasattr(torch, dtype.name)
    assert dtype.torch.itemsize == dtype.itemsize
    assert dtype.torch.is_floating_point == dtype.is_floating_point
    # a dtype newer than the oldest supported torch says since when (torch < 2.3 has no uint16/32/64)
    assert (dtype.since_torch > OLDEST_TORCH) == (name in {"U16", "U32", "U64"})


def test_the_oldest_torch_is_the_declared_one():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    torch_requirement = next(r for r in map(Requirement, project["dependencies"]) if r.name == "torch")
    assert torch_requirement.specifier == SpecifierSet(">=" + ".".join(map(str, OLDEST_TORCH)))


def test_float16s_largest_value_is_torchs():
    assert FLOAT16_MAX == torch.finfo(torch.float16).max


# --- causal-LM classes: read from transformers' source, not imported -----------------------------------------------


def test_causal_lm_classes_are_transformers_own_table():
    assert causal_lm_classes() == dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)
    assert causal_lm_classes()["qwen2"] == "Qwen2ForCausalLM"


@pytest.mark.parametrize("source", [
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = _build_table()\n",  # no literal to read
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES = OrderedDict([('llama', LLAMA_CLASS)])\n",
    "OTHER_TABLE = OrderedDict([('llama', 'LlamaForCausalLM')])\n",
    "def broken(:\n",
])
def test_a_table_not_written_as_a_literal_is_not_read(tmp_path, source):
    """causal_lm_classes then imports transformers' table instead."""
    path = tmp_path / "modeling_auto.py"
    path.write_text(source, encoding="utf-8")
    assert causal_lm_literal(path) is None


# --- generation settings: transformers' strict GenerationConfig check, without transformers -----------------------

# Values as the spec's fields hold them once validated (floats, ints): the very objects both checks are given.
SETTINGS = {
    "do_sample": [None, True, False],
    "temperature": [None, 0.7, 1.0, 2.0],
    "top_p": [None, 0.5, 1.0],
    "top_k": [None, 0, 5, 50],
    "max_new_tokens": [None, 16],
    "repetition_penalty": [None, 1.1],
}


def transformers_verdict(values: dict) -> str | None:
    """transformers' strict check of a spec's overrides, as modelpack asked it before it had its own: an unset
    do_sample judged as sampling (the base decides), only the spec's own keys counted as set by the user; its
    message on one line."""
    config = GenerationConfig()
    for key, value in ({"do_sample": True} | values).items():
        setattr(config, key, value)  # after construction: the constructor's lenient check would only log
    try:
        config.validate(strict=True, user_set_attributes=set(values))
    except ValueError as error:
        return " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return None


def modelpack_verdict(values: dict) -> str | None:
    try:
        GenerationSpec(**values)
    except ValidationError as error:
        return error.errors()[0]["msg"].removeprefix("Value error, ")
    return None


def test_generation_settings_get_transformers_verdict_in_its_words():
    """Every combination of unset, neutral and other values of every setting a spec can make (576 of them)."""
    verdicts = []
    for combination in itertools.product(*SETTINGS.values()):
        values = {key: value for key, value in zip(SETTINGS, combination, strict=True) if value is not None}
        verdicts.append(modelpack_verdict(values))
        assert verdicts[-1] == transformers_verdict(values), values
    assert len(verdicts) == 576 and 0 < sum(v is not None for v in verdicts) < 576
