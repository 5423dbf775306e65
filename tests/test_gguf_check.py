"""The bundle's GGUF files are proven inside llama.cpp itself: same prompt tokens as the bundle's tokenizer, the
bundle's own answers where the file holds the bundle's dtype, agreement reported for q8_0, expectations checked;
without llama-cpp-python the check is reported as skipped, never passed."""

from __future__ import annotations

import json
import shutil
import stat
import sys

import pytest
import torch

from builder.build import build_bundle, plan_from_spec
from builder.manifest import write_manifest
from builder.report import failure_message, read_verification, report_table
from builder.verify import verify_bundle
from helpers import RUNTIME, import_file, write_spec
from sentencepiece_fixtures import save_sentencepiece_tokenizer

# Imported by path, as modelpack runs it; its sibling equivalence.py is found through sys.path there.
sys.path.insert(0, str(RUNTIME))
gguf_check = import_file(RUNTIME / "gguf_check.py")
sys.path.remove(str(RUNTIME))


# --- the pure layer: types, differences, verdicts ---


@pytest.mark.parametrize(("file", "dtype", "exact"), [
    ("gguf/tiny-med-bf16.gguf", "bfloat16", True),
    ("gguf/tiny-med-f16.gguf", "float16", True),
    ("gguf/tiny-med-bf16.gguf", "float32", False),  # rounds the bundle's weights
    ("gguf/tiny-med-f16.gguf", "bfloat16", False),
    ("gguf/tiny-med-q8_0.gguf", "bfloat16", False),
    ("gguf/qwen-7b-chat-med-Q8_0.gguf", "float16", False),
])
def test_a_file_must_answer_like_the_bundle_only_when_it_holds_the_bundles_dtype(file, dtype, exact):
    assert gguf_check.must_be_equal(gguf_check.export_type(file), dtype) is exact


@pytest.mark.parametrize(("expected", "got", "position"), [
    ([1, 2, 3], [1, 2, 3], None),
    ([1, 2, 3], [1, 9, 3], 1),
    ([1, 2, 3], [1, 2], 2),  # the GGUF stopped earlier
    ([1, 2], [1, 2, 3], 2),  # ... or later
    ([], [], None),
    ([], [7], 0),
])
def test_first_difference(expected, got, position):
    assert gguf_check.first_difference(expected, got) == position


def test_a_token_difference_names_both_tokens_and_the_end():
    assert gguf_check.token_difference([5, 6], [5, 7], str) == {"position": 1, "bundle": "6", "gguf": "7"}
    assert gguf_check.token_difference([5, 6], [5], str) == {"position": 1, "bundle": "6", "gguf": None}
    assert gguf_check.token_difference([5], [5], str) is None


@pytest.mark.parametrize(("second_row", "parted"), [
    ([0.0, 3.0, 0.0], None),  # llama.cpp agrees with every token of the bundle's answer and with its end
    ([0.0, 1.0, 1.05], {"position": 1, "bundle": "1", "gguf": "2", "near_tie": True}),  # 0.05 <= 0.1 + 0.1 * 1.05
    ([0.0, 1.0, 3.0], {"position": 1, "bundle": "1", "gguf": "2", "near_tie": False}),  # 2.0 > 0.1 + 0.1 * 3.0
])
def test_parting_scores_the_first_token_llama_cpp_would_not_choose(second_row, parted):
    import numpy as np

    scores = np.array([[0.0, 5.0, 1.0], second_row, [4.0, 0.0, 0.0]])  # the last row: where the bundle ended (id 0)
    found = gguf_check.parting(scores, [1, 1], 0, dtype="bfloat16", piece=str)
    if parted is None:
        assert found is None
    else:
        assert {k: found[k] for k in parted} == parted
        assert found["margin"] == pytest.approx(second_row[2] - second_row[1])
        assert found["tolerance"] == pytest.approx(0.1 + 0.1 * max(second_row))


class LetterTokenizer:
    """Token i is the letter chr(97 + i), and 26 a space; decodes as the bundle's tokenizer does (specials skipped)."""

    def decode(self, ids, skip_special_tokens=False):
        return "".join(" " if i == 26 else chr(97 + i) for i in ids)


@pytest.mark.parametrize(("generated", "bundle_answer", "shared"), [
    ([26, 0, 1, 2], "abc", 4),  # the leading space both runtimes generated, which stripping took from the text
    ([0, 1, 3], "abc", 2),
    ([2], "abc", 0),
    ([0, 1, 2, 3], "abc", 3),  # llama.cpp's answer goes on where the bundle's ended
])
def test_shared_tokens_reads_the_answers_text_not_its_retokenization(generated, bundle_answer, shared):
    assert gguf_check.shared_tokens(generated, bundle_answer, LetterTokenizer()) == shared


def test_the_rest_of_an_answer_is_tokenized_as_a_continuation(tmp_path):
    """A SentencePiece tokenizer marks a text's start with ▁ (its dummy prefix): the middle of an answer, fed to
    llama.cpp token by token, must not get one, or the tokens fed are not the ones the bundle generated."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_sentencepiece_tokenizer(tmp_path, "llama2", json_only=True))
    assert tokenizer.convert_ids_to_tokens(tokenizer("'y", add_special_tokens=False).input_ids) == ["▁", "'", "y"]
    assert tokenizer.convert_ids_to_tokens(gguf_check.continuation_ids(tokenizer, "'y")) == ["'", "y"]
    assert tokenizer.convert_ids_to_tokens(gguf_check.continuation_ids(tokenizer, " 12")) == ["▁", "1", "2"]


@pytest.mark.parametrize(("answer", "prompt_difference", "exact", "failures", "required", "ok"), [
    ("same", None, True, [], True, True),
    ("other", None, True, [], True, False),  # bf16 of a bfloat16 bundle: must be the same
    ("other", None, False, [], False, True),  # q8_0: reported, not failed
    ("other", None, True, ["contains 'x'"], True, False),  # a 16-bit file must meet the expectations
    ("other", None, False, ["contains 'x'"], False, True),  # a quantized one's are reported by default...
    ("other", None, False, ["contains 'x'"], True, False),  # ...and required when its budget says so
    ("same", {"position": 3, "bundle": "\n", "gguf": "\t"}, False, [], False, False),  # wrong tokens fail every type
])
def test_a_gguf_answer_is_judged_by_its_type(answer, prompt_difference, exact, failures, required, ok):
    prompt = gguf_check.Prompt("q", [1, 2, 3, 4], "same", {})
    result = gguf_check.judge(prompt, answer=answer, prompt_difference=prompt_difference, answer_difference=None,
                              exact=exact, failures=failures, expectations_required=required)
    assert result["ok"] is ok and result["equal"] is (answer == "same")


# --- end to end: a build with export.gguf, verified in llama.cpp ---


@pytest.fixture(scope="module")
def built(tmp_path_factory, models, adapters):
    """A bfloat16 merge exported as bf16 (the bundle's own dtype) and q8_0, verified, GGUF check included."""
    root = tmp_path_factory.mktemp("gguf-check")
    base = models("qwen2", tied=True, dtype=torch.float32)
    prompts = [{"prompt": "你好", "expect": {"not_contains": ["医院"]}}]
    spec = write_spec(root, base, adapters(base), output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["bf16", "q8_0"]}},
                      verify={"max_new_tokens": 8, "prompts": prompts, "probes": [{"prompt": "hi"}]})
    return build_bundle(plan_from_spec(spec), verify=True, device="cpu")


def test_the_bf16_file_answers_like_the_bfloat16_bundle_inside_llama_cpp(built):
    report = built.verification
    gguf = report["gguf"]
    assert report["ok"] and gguf["ok"] and gguf["runtime"] == "llama-cpp-python 0.3.36"
    by_type = {f["type"]: f for f in gguf["files"]}
    assert set(by_type) == {"bf16", "q8_0"} and by_type["bf16"]["file"] == "gguf/tiny-med-bf16.gguf"
    bf16 = by_type["bf16"]
    assert bf16["exact"] and not by_type["q8_0"]["exact"]
    bundle_answers = [r["answer"] for r in report["prompts"] + report["probes"]]
    assert [a["prompt"] for a in bf16["answers"]] == ["你好", "hi"]
    assert [a["answer"] for a in bf16["answers"]] == bundle_answers
    assert all(a["equal"] and a["difference"] is None and a["prompt_difference"] is None for a in bf16["answers"])
    assert all(a["prompt_tokens"] > 5 for a in bf16["answers"])


def test_the_q8_0_file_reports_its_agreement_and_the_card_shows_both(built):
    q8 = next(f for f in built.verification["gguf"]["files"] if f["type"] == "q8_0")
    assert q8["ok"] and all(a["prompt_difference"] is None and not a["failures"] for a in q8["answers"])
    for answer in q8["answers"]:  # a difference is reported where there is one, and only there
        assert (answer["difference"] is None) is answer["equal"]
    written = read_verification(json.loads((built.bundle / "verification.json").read_text(encoding="utf-8")))
    # The bundle's copy holds no run figures (report.bundle_record): the load time stays in the run's report.
    assert written["gguf"]["files"] == [{k: v for k, v in f.items() if k != "load_seconds"}
                                        for f in built.verification["gguf"]["files"]]
    card = (built.bundle / "README.md").read_text(encoding="utf-8")
    assert "GGUF files run in llama.cpp itself (llama-cpp-python 0.3.36" in card
    assert "| `gguf/tiny-med-bf16.gguf` | ok | 2 of 2 (required) | equal | met |" in card
    assert "| `gguf/tiny-med-q8_0.gguf` | ok |" in card and "(reported) | equal | met |" in card
    table = report_table(built.verification)
    assert "gguf bf16" in table.columns[0]._cells and "gguf q8_0" in table.columns[0]._cells


@pytest.mark.slow
def test_a_llama_export_runs_in_llama_cpp_with_the_bundles_prompt_tokens(tmp_path, models, adapters):
    """Llama's own architecture and rope layout in llama.cpp; a random model's answers may part only at near ties."""
    base = models("llama", tied=False, dtype=torch.float32)
    spec = write_spec(tmp_path, base, adapters(base), output={"dtype": "bfloat16"},
                      export={"gguf": {"types": ["bf16"]}},
                      verify={"max_new_tokens": 8, "prompts": [{"prompt": "你好"}], "probes": [{"prompt": "hi"}]})
    report = build_bundle(plan_from_spec(spec), verify=True, device="cpu").verification
    (file,) = report["gguf"]["files"]
    assert report["ok"] and file["ok"] and file["exact"]
    assert all(a["prompt_difference"] is None for a in file["answers"])
    assert all(a["equal"] or a["difference"]["near_tie"] for a in file["answers"])


@pytest.fixture
def bundle(built, tmp_path):
    copy = tmp_path / built.bundle.name
    shutil.copytree(built.bundle, copy)
    return copy


def test_a_tampered_gguf_fails_verification_with_one_sentence_each(bundle):
    """After the build: the q8_0 file's chat template writes a tab where the bundle's writes a newline, and the bf16
    file's final norm is negated; manifest.json is rewritten so that the integrity check passes."""
    from gguf import GGUFReader

    template = GGUFReader(bundle / "gguf" / "tiny-med-q8_0.gguf", "r+").fields["tokenizer.chat_template"].parts[-1]
    text = bytes(template)
    assert b"'\\n'" in text
    template[:] = list(text.replace(b"'\\n'", b"'\\t'", 1))
    norm = next(t for t in GGUFReader(bundle / "gguf" / "tiny-med-bf16.gguf", "r+").tensors
                if t.name == "output_norm.weight")
    norm.data[:] = -norm.data
    write_manifest(bundle, json.loads((bundle / "manifest.json").read_text()))

    report = verify_bundle(bundle)
    message = failure_message(report)
    assert message is not None and not report["ok"]
    assert ("gguf: gguf/tiny-med-q8_0.gguf: prompt '你好': llama.cpp's tokens of the rendered prompt differ from the "
            "bundle tokenizer's from token ") in message
    assert "the file's vocabulary, pre-tokenizer or chat template is not the bundle's" in message
    assert "gguf: gguf/tiny-med-bf16.gguf: prompt '你好': llama.cpp answered " in message
    assert "a bf16 file holds the bundle's own weights and must answer the same" in message


def test_without_llama_cpp_the_check_is_skipped_with_the_install_command(bundle, tmp_path):
    """A verifying interpreter that cannot import llama_cpp (hidden here by a sitecustomize): never a silent pass."""
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'llama_cpp':\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, Hide())\n"
    )
    python = tmp_path / "python"
    python.write_text(f'#!/bin/sh\nPYTHONPATH={hide} exec {sys.executable} "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    report = verify_bundle(bundle, python=python)
    assert report["ok"] and "gguf" not in report
    skipped = next(s for s in report["skipped"] if s["check"] == "gguf")
    assert ("llama-cpp-python is not installed in the verifying interpreter, so 2 GGUF file(s) were not run in "
            "llama.cpp" in skipped["reason"])
    assert "`python -m pip install 'llama-cpp-python==0.3.36'`" in skipped["reason"]
    assert str(tmp_path) not in skipped["reason"]  # the report ships in the bundle: no path of this machine
