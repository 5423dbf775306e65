"""`tokenizer.path`: a base saved without a tokenizer (merge_and_unload + save_pretrained) takes it from another
folder; a missing tokenizer, one too large for the embedding, or tokenizer code left behind is exit 2 at plan time."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer
from typer.testing import CliRunner

from builder.build import build_bundle, plan_from_spec
from builder.cli import app
from builder.scaffold import draft_spec
from builder.sources import TOKENIZER_FILE_NAMES
from builder.spec import load_spec
from helpers import CHATML_TEMPLATE, assert_user_error, qwen_base, random_checkpoint, save_tokenizer, write_spec


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def without_tokenizer(source: Path, dest: Path) -> Path:
    """A copy of a model folder as merge_and_unload + save_pretrained leaves it: no tokenizer files, no code."""
    shutil.copytree(source, dest, ignore=lambda _, names: [
        n for n in names if n in TOKENIZER_FILE_NAMES or n.endswith((".tiktoken", ".py"))])
    return dest


@pytest.fixture(scope="module")
def bare_base(tmp_path_factory, models):
    return without_tokenizer(models("qwen2", tied=True, dtype=torch.float32), tmp_path_factory.mktemp("bare") / "base")


def test_a_base_without_tokenizer_builds_with_the_tokenizer_from_tokenizer_path(tmp_path, models, adapters, bare_base):
    original = models("qwen2", tied=True, dtype=torch.float32)
    spec = write_spec(tmp_path, bare_base, adapters(original), tokenizer={"path": str(original)})
    result = build_bundle(plan_from_spec(spec), verify=False)  # verification runs the same way for every tokenizer
    bundle = result.bundle
    assert (bundle / "tokenizer.json").read_bytes() == (original / "tokenizer.json").read_bytes()
    assert (bundle / "chat_template.jinja").read_text() == CHATML_TEMPLATE
    shipped, source = AutoTokenizer.from_pretrained(bundle), AutoTokenizer.from_pretrained(original)
    text = "你好 Hello world, 缺钙"
    assert shipped(text)["input_ids"] == source(text)["input_ids"]
    assert shipped.get_vocab() == source.get_vocab()
    manifest = (bundle / "manifest.json").read_text()
    assert '"tokenizer/tokenizer.json"' in manifest  # provenance names the tokenizer's own folder
    assert not any("tokenizer saved in the adapter" in w for w in result.plan.warnings)


def test_tokenizer_path_is_relative_to_the_spec_and_wins_over_the_checkpoints(tmp_path, models, adapters, bare_base):
    original = models("qwen2", tied=True, dtype=torch.float32)
    checkpoint = shutil.copytree(adapters(original), tmp_path / "checkpoint-10")
    save_tokenizer(checkpoint)
    (checkpoint / "chat_template.jinja").write_text("{{ messages[0]['content'] }}<|endoftext|>")
    shutil.copytree(original, tmp_path / "models" / "original")
    spec = write_spec(tmp_path, bare_base, checkpoint, tokenizer={"path": "models/original"})
    plan = plan_from_spec(spec)
    assert plan.tokenizer is not None and plan.tokenizer.path == tmp_path / "models" / "original"
    shipped = {c.dest: c.source.parent for c in plan.copies if c.role == "tokenizer"}
    assert set(shipped.values()) == {tmp_path / "models" / "original"}
    assert "chat_template.jinja" in shipped


def test_a_base_without_tokenizer_and_no_tokenizer_path_is_refused_naming_the_option(tmp_path, models, adapters,
                                                                                     bare_base):
    spec = write_spec(tmp_path, bare_base, adapters(models("qwen2", tied=True, dtype=torch.float32)))
    result = run("build", spec, "--dry-run")
    assert_user_error(result, 2, str(bare_base), "has no tokenizer files", "`tokenizer.path`",
                      "merge_and_unload + save_pretrained")


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_both_sizes(tmp_path, models, adapters, bare_base):
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "bigger-tokenizer"
    save_tokenizer(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(100)])
    tokenizer.save_pretrained(folder)
    assert len(tokenizer) > 416  # the tiny bases' vocab_size
    spec = write_spec(tmp_path, bare_base, adapters(models("qwen2", tied=True, dtype=torch.float32)),
                      tokenizer={"path": "bigger-tokenizer"})
    result = run("build", spec, "--dry-run")
    assert_user_error(result, 2, f"tokenizer.path {folder}", f"defines {len(tokenizer)} token ids", "416 rows",
                      "vocab_size in")


@pytest.mark.parametrize(("files", "culprit"), [
    ({}, "no tokenizer files, no vocabulary"),
    ({"tokenizer_config.json": "{}"}, "only tokenizer_config.json, no vocabulary"),
])
def test_a_tokenizer_path_without_a_vocabulary_is_refused(tmp_path, models, adapters, bare_base, files, culprit):
    folder = tmp_path / "not-a-tokenizer"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    spec = write_spec(tmp_path, bare_base, adapters(models("qwen2", tied=True, dtype=torch.float32)),
                      tokenizer={"path": "not-a-tokenizer"})
    assert_user_error(run("build", spec, "--dry-run"), 2, f"tokenizer.path {folder}", culprit)


def test_a_missing_tokenizer_path_is_a_spec_error_at_its_line(tmp_path, models, adapters, bare_base):
    spec = write_spec(tmp_path, bare_base, adapters(models("qwen2", tied=True, dtype=torch.float32)),
                      tokenizer={"path": "nowhere"})
    assert_user_error(run("validate", spec), 2, "tokenizer.path: directory not found", str(tmp_path / "nowhere"))


# --- Qwen v1: a remote-code tokenizer (tokenization_qwen.py over qwen.tiktoken) ---

@pytest.fixture(scope="module")
def qwen_parts(tmp_path_factory):
    """The Qwen v1 fixture saved without its tokenizer, and an adapter checkpoint without one either."""
    root = tmp_path_factory.getbasetemp() / "qwen_v1"
    original = qwen_base(root)
    folder = tmp_path_factory.mktemp("qwen-bare")
    bare = without_tokenizer(original, folder / "base")
    for name in ("configuration_qwen.py", "modeling_qwen.py", "qwen_generation_utils.py", "cpp_kernels.py",
                 "cache_autogptq_cuda_256.cpp", "cache_autogptq_cuda_kernel_256.cu"):
        shutil.copyfile(original / name, bare / name)  # the model's code stays: only the tokenizer is gone
    checkpoint = folder / "checkpoint-10"
    checkpoint.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(random_checkpoint(root) / name, checkpoint / name)
    return original, bare, checkpoint


def test_a_remote_code_tokenizer_comes_with_its_code_and_needs_trust(tmp_path, qwen_parts):
    original, bare, checkpoint = qwen_parts
    spec = write_spec(tmp_path, bare, checkpoint, base={"trust_remote_code": True}, tokenizer={"path": str(original)},
                      output={"dir": "dist/qwen-med"})
    plan = plan_from_spec(spec)
    tokenizer = {c.dest: c.source for c in plan.copies if c.role == "tokenizer"}
    assert tokenizer == {n: original / n for n in ("tokenizer_config.json", "qwen.tiktoken", "tokenization_qwen.py")}
    assert "tokenization_qwen.py" in [p.name for p in plan.code_files]

    untrusted = write_spec(tmp_path, bare, checkpoint, tokenizer={"path": str(original)},
                           output={"dir": "dist/qwen-med"})
    assert_user_error(run("build", untrusted, "--dry-run"), 2, "tokenization_qwen.py", "base.trust_remote_code: true")


def test_a_remote_code_tokenizer_without_its_code_is_refused_naming_the_file(tmp_path, qwen_parts):
    original, bare, checkpoint = qwen_parts
    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer_config.json", "qwen.tiktoken"):
        shutil.copyfile(original / name, folder / name)
    spec = write_spec(tmp_path, bare, checkpoint, base={"trust_remote_code": True}, tokenizer={"path": "tokenizer"},
                      output={"dir": "dist/qwen-med"})
    assert_user_error(run("build", spec, "--dry-run"), 2, str(folder / "tokenizer_config.json"),
                      "tokenization_qwen.py, which is not in tokenizer.path", "copy it there")


# --- modelpack init ---

def test_init_fills_tokenizer_path_from_the_checkpoint_when_the_base_has_none(tmp_path, models, adapters, bare_base,
                                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = models("qwen2", tied=True, dtype=torch.float32)
    checkpoint = shutil.copytree(adapters(original), tmp_path / "run" / "checkpoint-10")
    save_tokenizer(tmp_path / "run")  # Trainer saves the tokenizer into its output folder at the end
    spec_file = tmp_path / "specs" / "tiny.yaml"
    draft = draft_spec(checkpoint, base=bare_base, spec_file=spec_file)
    assert "tokenizer:\n  path: ../run                    # the base has no tokenizer files" in draft.text
    spec_file.parent.mkdir()
    spec_file.write_text(draft.text)
    spec = load_spec(spec_file)
    assert spec.tokenizer is not None and spec.tokenizer.path == tmp_path / "run"
    assert plan_from_spec(spec_file).tokenizer is not None


def test_init_says_a_tokenizer_is_needed_when_none_is_found(tmp_path, models, adapters, bare_base):
    checkpoint = adapters(models("qwen2", tied=True, dtype=torch.float32))
    draft = draft_spec(checkpoint, base=bare_base, spec_file=tmp_path / "tiny.yaml")
    assert "# tokenizer: {path: PATH}" in draft.text and "\ntokenizer:" not in draft.text
