"""The model card: its templates only print (a parse of every template says so), and its rows and sentences are
built in Python (builder/card.py) from the bundle's facts and the verification report, tested here without a model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from jinja2 import Environment, nodes

from builder import card, render
from builder.report import (
    GgufAnswer,
    GgufFile,
    PromptResult,
    RuntimeReport,
    VerificationReport,
    verification_report,
)
from builder.serving import OllamaTemplate, ServingCommand
from builder.sizing import KvCache
from builder.trust import DIGEST_PLACEHOLDER

TEMPLATES = Path(__file__).resolve().parents[1] / "templates"
# Filters a template may apply to what it prints: escaping for where the text lands, never computing it.
ESCAPING_FILTERS = {"cell"}  # render._table_cell: a Markdown table cell


def template_logic(source: str) -> list[str]:
    """Everything in a template but printing: allowed are text, `{{ name }}` and `{{ name.attribute }}` (through an
    escaping filter or not), `{% for x in name %}` and `{% if name %}` with `else`; anything else is named, with its
    line."""
    found: list[str] = []

    def reference(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Getattr):
            return reference(node.node)
        # `loop` is Jinja's own state (loop.last, loop.index): a test on it is logic of the template's own.
        return isinstance(node, nodes.Name) and node.ctx == "load" and node.name != "loop"

    def printed(node: nodes.Node) -> bool:
        if isinstance(node, nodes.Filter) and node.node is not None:
            plain = not (node.args or node.kwargs or node.dyn_args or node.dyn_kwargs)
            return node.name in ESCAPING_FILTERS and plain and reference(node.node)
        return reference(node)

    def statements(body: list[nodes.Node]) -> None:
        for node in body:
            if isinstance(node, nodes.Output):
                found.extend(f"line {part.lineno}: {type(part).__name__} printed" for part in node.nodes
                             if not isinstance(part, nodes.TemplateData) and not printed(part))
            elif isinstance(node, nodes.For):
                simple = (isinstance(node.target, nodes.Name) and reference(node.iter) and node.test is None
                          and not node.else_ and not node.recursive)
                if not simple:
                    found.append(f"line {node.lineno}: a for other than `for x in rows`")
                statements(node.body)
            elif isinstance(node, nodes.If):
                if not reference(node.test):
                    found.append(f"line {node.lineno}: {type(node.test).__name__} tested by an if")
                if node.elif_:
                    found.append(f"line {node.lineno}: elif")
                statements(node.body)
                statements(node.else_)
            else:
                found.append(f"line {node.lineno}: {type(node).__name__}")

    statements(Environment().parse(source).body)
    return found


@pytest.mark.parametrize("path", sorted(TEMPLATES.glob("*.jinja")), ids=lambda p: p.name)
def test_the_templates_only_print(path):
    assert template_logic(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("source, found", [
    ("{{ a ~ b }}", ["line 1: Concat printed"]),
    ("{% if x == 1 %}one{% endif %}", ["line 1: Compare tested by an if"]),
    ("{% if not x %}none{% endif %}", ["line 1: Not tested by an if"]),
    ("{{ rows | length }}", ["line 1: Filter printed"]),
    ("{{ names | join(', ') }}", ["line 1: Filter printed"]),
    ("{{ x | cell(1) }}", ["line 1: Filter printed"]),
    ("{{ 's' if many }}", ["line 1: CondExpr printed"]),
    ("{{ facts.get('eos') }}", ["line 1: Call printed"]),
    ("{{ answers[key] }}", ["line 1: Getitem printed"]),
    ("{{ 100 * share }}", ["line 1: Mul printed"]),
    ("{{ 'text' }}", ["line 1: Const printed"]),
    ("{% set n = 1 %}", ["line 1: Assign"]),
    ("{% for key, value in pairs %}{{ key }}{% endfor %}", ["line 1: a for other than `for x in rows`"]),
    ("{% for r in rows if r.ok %}{{ r }}{% endfor %}", ["line 1: a for other than `for x in rows`"]),
    ("{% for r in rows %}{% if loop.last %}.{% endif %}{% endfor %}", ["line 1: Getattr tested by an if"]),
    ("{% if a %}a{% elif b %}b{% endif %}", ["line 1: elif"]),
    ("line\n{% include 'other.jinja' %}", ["line 2: Include"]),
])
def test_the_rule_catches_logic_planted_in_a_template(source, found):
    assert template_logic(source) == found
    # ... and in the card itself, where it would hide among the allowed tags
    planted = (TEMPLATES / "README.md.jinja").read_text(encoding="utf-8") + source
    assert len(template_logic(planted)) == len(found)


def test_what_the_rule_allows():
    source = ("{% for r in rows %}| {{ r.prompt | cell }} | {{ r.answer }} |{% if r.score %} {{ r.score.margin }}"
              "{% else %} none{% endif %}\n{% endfor %}{% if flag %}{{ name }}{% endif %}")
    assert template_logic(source) == []


def adapter_view(key: str = "adapter", weight: str = "1") -> render.AdapterCardView:
    return render.AdapterCardView(rank="8", alpha="16", scaling="2", max_rank=8, target_modules="q_proj, v_proj",
                                  modules=4, recorded_base="tiny-base", checkpoint="checkpoint-10", key=key,
                                  weight=weight)


def context(**changes) -> render.RenderContext:
    """The facts of a small merged bundle with one adapter, served by one runtime."""
    facts = render.RenderContext(
        name="tiny", mode="merge", dtype="bfloat16", trust_remote_code=False, remote_code_files=[],
        remote_code_imports=[], has_chat_template=True, base_name="Qwen/Qwen2-0.5B", base_model_id=None,
        system_prompt="be brief", verify_max_new_tokens=8, prompts=[], probes=[], end_of_turn_token="<|im_end|>",
        generation={"eos_token_id": [2, 3], "do_sample": False},
        card={"description": None, "intended_use": None, "limitations": None, "license": None, "language": [],
              "tags": ["medical"], "base_model": None},
        adapter=adapter_view(), adapters=[], composed_rank=None, weight_files=["model.safetensors"],
        weight_size="1.3 MB", weight_bytes=1_300_000, kv=KvCache(32768, 2 * 2 * 2 * 64, ()),
        modelpack_version="0.1.0", transformers_version="5.0.0",
        serving=[ServingCommand("vLLM", "vllm serve ./tiny", ["a note"])], ollama=None, modelfile=None,
    )
    return dataclasses.replace(facts, **changes)


def answer(prompt: str, text: str, *, failures: tuple[str, ...] = (), contains: tuple[str, ...] = ()) -> PromptResult:
    return {"prompt": prompt, "answer": text, "failures": list(failures), "ok": not failures,
            "expect": {"contains": list(contains), "not_contains": [], "equals": None, "regex": None}}


def runtime_report(prompts: list[PromptResult], probes: list[PromptResult]) -> RuntimeReport:
    return {
        "bundle": "tiny", "ok": all(r["ok"] for r in prompts + probes),
        "integrity": {"ok": True, "files": None, "problems": []},
        "serving": {"ok": True, "problems": [], "warnings": ["vLLM: a warning"]},
        "prompts": prompts, "probes": probes, "environment": {"transformers": "5.0.0", "torch": "2.9.0"},
        "runtime": {"load_seconds": 0.5, "tokens_per_second": 10.0, "placement": {"parameters": {"cpu": 1000}}},
    }


def report(prompts: list[PromptResult], probes: list[PromptResult], **parts) -> VerificationReport:
    return verification_report(
        runtime_report(prompts, probes),
        files={"ok": True, "files": 12, "problems": [], "checked_by": "modelpack 0.1.0"},
        digest="sha256:placeholder", remote_code={}, skipped=parts.pop("skipped", []),
        gguf=parts.pop("gguf", None), equivalence=parts.pop("equivalence", None),
    )


EQUIVALENCE = {"ok": True, "dtype": "bfloat16", "rule": "|delta logit| <= 0.1", "max_abs_logit_diff": 0.123456,
               "positions": 272, "greedy_agreement": 0.99631, "significant_disagreements": 0, "prompts": [],
               "reference": "base + adapter through peft, unmerged"}


def test_the_cards_sentences_from_the_bundles_facts():
    merged = card.card_context(context(), verification=None, files_listed=9)
    assert merged.description == "A fine-tuned version of Qwen/Qwen2-0.5B with a LoRA adapter."
    assert merged.limitations == "Not stated in the spec."
    assert merged.weight_files == "1 safetensors file" and not merged.separate
    assert merged.loader_packages == "torch and transformers"
    assert merged.generation_defaults == "`eos_token_id=[2, 3]`, `do_sample=False`"
    assert merged.verification is None and merged.digest == DIGEST_PLACEHOLDER  # trust.seal writes the digest
    separate = card.card_context(context(mode="separate", weight_files=["a.safetensors", "b.safetensors"],
                                         card={**context().card, "description": "Mine.", "limitations": "Tiny."}),
                                 verification=None, files_listed=9)
    assert separate.separate and separate.loader_packages == "torch, transformers and peft"
    assert separate.weight_files == "2 safetensors files"
    assert (separate.description, separate.limitations) == ("Mine.", "Tiny.")


@pytest.mark.parametrize("generation, chat_format, eos", [
    ({"chat_format": "chatml", "eos_token_id": 151643}, "chatml", "151643"),
    ({"eos_token_id": 0}, None, "0"),  # a token id 0 is an end-of-turn token all the same
    ({"eos_token_id": None}, None, None),
])
def test_a_model_without_a_chat_template_names_its_format_and_stop_token(generation, chat_format, eos):
    facts = card.card_context(context(has_chat_template=False, generation=generation), verification=None,
                              files_listed=9)
    assert facts.without_chat_template
    assert (facts.chat_format, facts.eos_token_id) == (chat_format, eos)


def test_the_front_matter_is_the_hubs_card_data():
    data = yaml.safe_load(card.front_matter(context(mode="separate", base_model_id="Qwen/Qwen2-0.5B")))
    # The root is the base and loads with transformers; the adapter is in adapter/, where the Hub does not look.
    assert data == {"base_model": "Qwen/Qwen2-0.5B", "library_name": "transformers", "license": "other",
                    "pipeline_tag": "text-generation", "tags": ["medical", "lora", "peft", "modelpack"]}
    merged = yaml.safe_load(card.front_matter(context(base_model_id="Qwen/Qwen2-0.5B")))
    assert (merged["base_model_relation"], merged["library_name"]) == ("finetune", "transformers")
    assert "base_model" not in yaml.safe_load(card.front_matter(context()))  # a folder name is no Hub id


def test_ollama_says_what_its_modelfile_holds_or_why_it_has_no_template():
    commands = [ServingCommand("vLLM", "vllm serve ./tiny", []), ServingCommand("Ollama", "ollama create", ["n"])]
    translated = OllamaTemplate("ChatML", "{{ .Prompt }}", None, ("a caveat",))
    sections = card.serving_sections(commands, translated)
    assert [s.ollama_format for s in sections] == [None, "ChatML"]
    assert card.ollama_notes(translated) == ["Ollama template: a caveat."]
    untranslated = OllamaTemplate(None, None, None, ("the template writes today's date",))
    assert [s.ollama_format for s in card.serving_sections(commands, untranslated)] == [None, None]
    assert card.ollama_notes(untranslated) == [
        "Ollama: the template writes today's date; `gguf/Modelfile` has no TEMPLATE, so Ollama picks a template "
        "from the GGUF's embedded chat template by itself."]
    assert card.ollama_notes(None) == []


def test_the_answer_tables_take_each_verdict_from_the_report():
    verified = report(
        [answer("p1", "a|b", contains=("a",)), answer("p2", "no", failures=("contains 'x'", "equals 'y'"))],
        [answer("hi", "hello"), answer("2+2", "5", failures=("contains '4'",), contains=("4",))],
        equivalence={**EQUIVALENCE, "base_answers": {"p1": "b1", "p2": "b2", "hi": "b3", "2+2": "b4"}},
        skipped=[{"check": "gguf", "reason": "no llama-cpp-python"}],
    )
    section = card.verification_section(verified, [], files_listed=15)
    assert section.verdict == "FAILED" and section.files_listed == 15
    assert section.composition is None and section.answers is not None and section.answers.with_base
    assert [(r.kind, r.base_answer, r.expectations) for r in section.answers.prompts + section.answers.probes] == [
        ("prompt", "b1", "ok"), ("prompt", "b2", "FAILED: contains 'x'; equals 'y'"),
        ("probe", "b3", "recorded"),  # a probe without expectations is recorded, not checked
        ("probe", "b4", "FAILED: contains '4'")]
    assert section.equivalence == card.EquivalenceLine("base + adapter through peft, unmerged", "0.123", 272,
                                                       "99.6", "bfloat16", "|delta logit| <= 0.1")
    assert section.skipped == [{"check": "gguf", "reason": "no llama-cpp-python"}]
    assert section.serving_warnings == ["vLLM: a warning"] and section.gguf is None
    without_base = card.verification_section(report([answer("p1", "a")], []), [], files_listed=15)
    assert without_base.answers is not None and not without_base.answers.with_base
    assert without_base.verdict == "passed" and without_base.equivalence is None


def test_several_adapters_answer_beside_the_composition_in_the_specs_order():
    adapters = [adapter_view("adapters[0]", "1"), adapter_view("adapters[1]", "0.5")]
    composed = report([answer("p1", "both")], [answer("hi", "hello")], equivalence={
        **EQUIVALENCE, "base_answers": {"p1": "base", "hi": "base hi"},
        "adapter_answers": [{"p1": "first", "hi": "first hi"}, {"p1": "second", "hi": "second hi"}]})
    section = card.verification_section(composed, adapters, files_listed=15)
    assert section.answers is None and section.composition is not None
    assert section.composition.columns == ["`adapters[0]` alone (weight 1)", "`adapters[1]` alone (weight 0.5)"]
    assert [(r.kind, r.base_answer, r.alone, r.answer, r.expectations) for r in section.composition.rows] == [
        ("prompt", "base", ["first", "second"], "both", "ok"),
        ("probe", "base hi", ["first hi", "second hi"], "hello", "recorded")]


def gguf_answer(prompt: str, *, equal: bool = True, margin: float | None = 0.5, tokens_differ: bool = False,
                failures: tuple[str, ...] = ()) -> GgufAnswer:
    parting = None if equal else {"position": 3, "bundle": "a", "gguf": "b", "margin": margin,
                                  "tolerance": 0.25 if margin is not None else None, "near_tie": False}
    return {"prompt": prompt, "answer": "x", "equal": equal, "difference": parting, "prompt_tokens": 7,
            "prompt_difference": {"position": 1, "bundle": "a", "gguf": "b"} if tokens_differ else None,
            "failures": list(failures), "ok": equal and not failures}


def test_gguf_rows_and_where_each_answer_parts_from_the_bundles():
    files: list[GgufFile] = [
        {"file": "gguf/t-bf16.gguf", "type": "bf16", "exact": True, "load_seconds": 0.1, "ok": False,
         "answers": [gguf_answer("p1"), gguf_answer("p2", equal=False, tokens_differ=True)]},
        {"file": "gguf/t-q8_0.gguf", "type": "q8_0", "exact": False, "load_seconds": 0.1, "ok": True,
         "answers": [gguf_answer("p1", equal=False, margin=None), gguf_answer("p2", failures=("contains 'z'",))]},
    ]
    section = card.gguf_section({"ok": False, "runtime": "llama-cpp-python 0.3.36", "threads": 2, "files": files})
    assert section.files == [
        card.GgufRow("gguf/t-bf16.gguf", "FAILED", "1 of 2 (required)", "DIFFERENT", "met"),
        card.GgufRow("gguf/t-q8_0.gguf", "ok", "1 of 2 (reported)", "equal", "MISSED")]
    assert section.partings == [
        card.GgufParting("gguf/t-bf16.gguf", "p2", "x", 3, card.PartingScore('"b"', '"a"', "0.5", "0.25")),
        card.GgufParting("gguf/t-q8_0.gguf", "p1", "x", 3, None)]  # not scored


def test_the_card_prints_the_prepared_rows():
    text = card.render_card(context(), verification=report(
        [answer("p1", "a | b", failures=("equals 'c'",))], [answer("hi", "hello")], equivalence=EQUIVALENCE),
        files_listed=15)
    assert "| p1 | a \\| b | FAILED: equals 'c' |" in text  # escaped for its table cell
    assert "| hi | hello |" in text and "**FAILED**" in text
    assert "max |delta logit| 0.123\nover 272 positions, greedy agreement 99.6%" in text
    assert "| target modules | q_proj, v_proj |" in text
    assert "### vLLM\n\n```bash\nvllm serve ./tiny\n```\n- a note\n" in text
    unverified = card.render_card(context(), verification=None, files_listed=14)
    assert "Not verified: the bundle was built with `--no-verify`." in unverified


@pytest.mark.parametrize("transformers, keyword", [("4.49.0", "torch_dtype"), ("4.55.4", "torch_dtype"),
                                                   ("4.56.0", "dtype"), ("5.24.0", "dtype")])
def test_the_loading_snippet_uses_the_dtype_keyword_of_the_verified_transformers(transformers, keyword):
    verified = report([answer("p1", "a")], [])
    verified["environment"]["transformers"] = transformers
    text = card.render_card(context(), verification=verified, files_listed=15)
    assert f'from_pretrained("tiny", {keyword}="bfloat16")' in text
    assert "Files listed in manifest.json and checked against it: 15." in text


def test_the_mode_sentence_and_the_weights_sentence_are_two_lines():
    text = card.render_card(context(), verification=None, files_listed=14)
    assert "without peft.\nWeights are stored in bfloat16" in text
