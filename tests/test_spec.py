"""The spec file: what loads, what it resolves to, and what the user is told when it is wrong."""

from __future__ import annotations

import json
import re
import textwrap
import time
import tracemalloc
from pathlib import Path

import pytest
from pydantic import ValidationError

from builder.errors import EXIT_INVALID_INPUT, SpecError
from builder.spec import Expectation, GenerationSpec, OutputSpec, Spec, load_spec, spec_json_schema

REPO = Path(__file__).resolve().parents[1]

FULL_EXAMPLE = """\
name: qwen-7b-chat-med
base:
  path: ${MODELS_DIR}/Qwen-7B-Chat
  trust_remote_code: false
adapter:
  path: ../checkpoints/checkpoint-1560
output:
  dir: ../dist/qwen-7b-chat-med
  mode: merge
  dtype: bfloat16
  max_shard_size: 2GB
generation:
  max_new_tokens: 512
  do_sample: true
  temperature: 0.7
  top_p: 0.8
  repetition_penalty: 1.05
chat:
  system_prompt: 你是一名专业的医生助手。
  template: null
card:
  description: Qwen-7B-Chat tuned on medical dialogues.
  license: apache-2.0
  language: [zh]
  tags: [medical, lora]
  intended_use: Answering patients' questions under a doctor's supervision.
  limitations: Not a diagnosis.
verify:
  max_new_tokens: 64
  prompts:
    - prompt: 我家宝宝六个月，吃奶、睡觉常常满头冒汗……
      expect:
        contains: [缺钙]
  probes:
    - prompt: 你好
"""

# Relative paths, as a spec committed next to the checkpoints would write them.
MINIMAL = """\
name: tiny
base:
  path: ../models/Qwen-7B-Chat
adapter:
  path: ../checkpoints/checkpoint-1560
output:
  dir: ../dist/tiny
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A project folder: specs/, a base model folder and an adapter checkpoint folder."""
    (tmp_path / "specs").mkdir()
    (tmp_path / "models" / "Qwen-7B-Chat").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-1560").mkdir(parents=True)
    return tmp_path


def write_spec(project: Path, text: str, name: str = "spec.yaml") -> Path:
    path = project / "specs" / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def with_section(section: str) -> str:
    """MINIMAL plus one more top-level section, so the new lines start at line 8."""
    return MINIMAL + textwrap.dedent(section)


def load_error(path: Path, **options) -> str:
    with pytest.raises(SpecError) as caught:
        load_spec(path, **options)
    assert caught.value.exit_code == EXIT_INVALID_INPUT
    return caught.value.message


# --- a valid spec -------------------------------------------------------------------------------


def test_full_example_loads_every_key_with_paths_relative_to_the_spec_file(project, monkeypatch):
    spec_path = write_spec(project, FULL_EXAMPLE)
    elsewhere = project / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    spec = load_spec(spec_path, environ={"MODELS_DIR": str(project / "models")})

    assert spec.name == "qwen-7b-chat-med"
    assert spec.base.path == project / "models" / "Qwen-7B-Chat"
    assert spec.base.trust_remote_code is False
    assert spec.adapter.path == project / "checkpoints" / "checkpoint-1560"
    assert spec.output.dir == project / "dist" / "qwen-7b-chat-med"
    assert (spec.output.mode, spec.output.dtype, spec.output.max_shard_size) == ("merge", "bfloat16", 2 * 10**9)
    assert spec.generation.overrides() == {
        "max_new_tokens": 512,
        "do_sample": True,
        "temperature": 0.7,
        "top_p": 0.8,
        "repetition_penalty": 1.05,
    }
    assert spec.chat.system_prompt == "你是一名专业的医生助手。"
    assert spec.chat.template is None
    assert spec.card.description == "Qwen-7B-Chat tuned on medical dialogues."
    assert spec.card.license == "apache-2.0"
    assert spec.card.language == ["zh"]
    assert spec.card.tags == ["medical", "lora"]
    assert spec.card.intended_use == "Answering patients' questions under a doctor's supervision."
    assert spec.card.limitations == "Not a diagnosis."
    assert spec.verify.max_new_tokens == 64
    assert spec.verify.prompts[0].prompt == "我家宝宝六个月，吃奶、睡觉常常满头冒汗……"
    assert spec.verify.prompts[0].expect == Expectation(contains=["缺钙"])
    assert spec.verify.probes[0].prompt == "你好"
    assert spec.verify.probes[0].expect == Expectation()


def test_omitted_sections_take_their_defaults(project):
    spec = load_spec(write_spec(project, MINIMAL))

    assert spec.base.trust_remote_code is False
    assert (spec.output.mode, spec.output.dtype, spec.output.max_shard_size) == ("merge", "auto", 5 * 10**9)
    assert spec.generation.overrides() == {}
    assert spec.chat.system_prompt is None and spec.chat.template is None
    assert spec.card.language == [] and spec.card.tags == []
    assert spec.verify.max_new_tokens == 64
    assert spec.verify.prompts == [] and spec.verify.probes == []


def test_a_loaded_spec_is_frozen(project):
    spec = load_spec(write_spec(project, MINIMAL))

    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"


def test_tilde_expands_to_the_home_folder(project, monkeypatch):
    monkeypatch.setenv("HOME", str(project))
    text = MINIMAL.replace("../checkpoints/checkpoint-1560", "~/checkpoints/checkpoint-1560")

    spec = load_spec(write_spec(project, text))

    assert spec.adapter.path == project / "checkpoints" / "checkpoint-1560"


def test_a_tilde_naming_an_unknown_user_is_a_spec_error(project):
    spec_path = write_spec(project, MINIMAL.replace("../checkpoints/checkpoint-1560", "~no-such-user/checkpoint"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:5: adapter.path: cannot expand '~no-such-user/checkpoint': no such user's home folder; "
        "write ~/... or a full path"
    )


def test_chat_template_resolves_next_to_the_spec(project):
    (project / "specs" / "chat.jinja").write_text("{{ messages }}", encoding="utf-8")

    spec = load_spec(write_spec(project, with_section("chat:\n  template: chat.jinja\n")))

    assert spec.chat.template == project / "specs" / "chat.jinja"


def test_bare_strings_stand_for_one_item_lists(project):
    text = with_section(
        """\
        card:
          language: zh
        verify:
          prompts:
            - prompt: 你好
              expect: {contains: 你好, not_contains: 缺钙}
        """
    )

    spec = load_spec(write_spec(project, text))

    assert spec.card.language == ["zh"]
    assert spec.verify.prompts[0].expect == Expectation(contains=["你好"], not_contains=["缺钙"])


# --- ${VAR} expansion ---------------------------------------------------------------------------


def test_variables_expand_from_the_given_environ(project, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", "/not/used")
    text = MINIMAL.replace("../models", "${MODELS_DIR}")

    spec = load_spec(write_spec(project, text), environ={"MODELS_DIR": str(project / "models")})

    assert spec.base.path == project / "models" / "Qwen-7B-Chat"


def test_variables_expand_from_the_process_environment_by_default(project, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", str(project / "models"))
    text = MINIMAL.replace("../models", "${MODELS_DIR}")

    spec = load_spec(write_spec(project, text))

    assert spec.base.path == project / "models" / "Qwen-7B-Chat"


def test_variables_expand_in_any_string_value(project):
    text = with_section("card:\n  description: Built by ${USER_NAME} for ${TEAM}.\n")

    spec = load_spec(write_spec(project, text), environ={"USER_NAME": "ada", "TEAM": "med"})

    assert spec.card.description == "Built by ada for med."


def test_an_unset_variable_names_the_variable_key_and_line(project, monkeypatch):
    monkeypatch.setenv("MODELS_DIR", "/only/in/the/process/environment")
    spec_path = write_spec(project, MINIMAL.replace("../models", "${MODELS_DIR}"))

    message = load_error(spec_path, environ={})

    assert message == (
        f"invalid spec {spec_path}:\n"
        f'{spec_path}:3: base.path: environment variable MODELS_DIR is not set (used in "${{MODELS_DIR}}/Qwen-7B-Chat")'
    )


def test_an_empty_variable_is_refused_like_an_unset_one_and_the_message_gives_the_default_syntax(project):
    spec_path = write_spec(project, MINIMAL.replace("../dist/tiny", "${DIST}"))

    message = load_error(spec_path, environ={"DIST": ""})

    assert message == (
        f"invalid spec {spec_path}:\n"
        f'{spec_path}:7: output.dir: environment variable DIST is set but empty (used in "${{DIST}}"); '
        "give it a value, or write ${DIST:-} if empty is meant"
    )


@pytest.mark.parametrize(
    ("written", "environ", "expected"),
    [
        ("${MODELS_DIR:-../models}", {}, "models"),  # unset: the default
        ("${MODELS_DIR:-../models}", {"MODELS_DIR": ""}, "models"),  # empty: the default, as in the shell
        ("${MODELS_DIR:-/elsewhere}", {"MODELS_DIR": "../models"}, "models"),  # set: the variable wins
        ("..${SUFFIX:-}/models", {}, "models"),  # an explicitly empty default
    ],
)
def test_a_default_replaces_an_unset_or_empty_variable(project, written, environ, expected):
    spec = load_spec(write_spec(project, MINIMAL.replace("../models", written)), environ=environ)

    assert spec.base.path == project / expected / "Qwen-7B-Chat"


def test_a_missing_path_names_the_default_it_came_from(project):
    spec_path = write_spec(project, MINIMAL.replace("../models", "${MODELS_DIR:-/x}"))

    message = load_error(spec_path, environ={})

    assert message.splitlines()[1] == (
        f'{spec_path}:3: base.path: directory not found: /x/Qwen-7B-Chat (from "${{MODELS_DIR:-/x}}/Qwen-7B-Chat", '
        "MODELS_DIR=/x)"
    )


# --- paths that must exist ----------------------------------------------------------------------


def test_a_missing_base_folder_names_key_written_path_resolved_path_and_variable(project):
    spec_path = write_spec(project, MINIMAL.replace("../models", "${MODELS_DIR}"))

    message = load_error(spec_path, environ={"MODELS_DIR": "/x"})

    assert message == (
        f"invalid spec {spec_path}:\n"
        f"{spec_path}:3: base.path: directory not found: /x/Qwen-7B-Chat "
        '(from "${MODELS_DIR}/Qwen-7B-Chat", MODELS_DIR=/x)'
    )


def test_a_missing_adapter_folder_shows_the_relative_path_as_written(project):
    spec_path = write_spec(project, MINIMAL.replace("checkpoint-1560", "checkpoint-9999"))

    message = load_error(spec_path)

    resolved = project / "checkpoints" / "checkpoint-9999"
    assert message.splitlines()[1] == (
        f'{spec_path}:5: adapter.path: directory not found: {resolved} (from "../checkpoints/checkpoint-9999")'
    )


def test_a_file_where_a_folder_is_expected_is_refused(project):
    (project / "adapter.bin").write_bytes(b"")
    spec_path = write_spec(project, MINIMAL.replace("../checkpoints/checkpoint-1560", str(project / "adapter.bin")))

    message = load_error(spec_path)

    assert message.splitlines()[1] == f"{spec_path}:5: adapter.path: not a directory: {project / 'adapter.bin'}"


def test_a_missing_chat_template_is_refused(project):
    spec_path = write_spec(project, with_section("chat:\n  template: chat.jinja\n"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f'{spec_path}:9: chat.template: file not found: {project / "specs" / "chat.jinja"} (from "chat.jinja")'
    )


def test_path_checks_can_be_skipped(project):
    spec_path = write_spec(project, MINIMAL.replace("../models", "/nowhere"))

    spec = load_spec(spec_path, check_paths=False)

    assert spec.base.path == Path("/nowhere/Qwen-7B-Chat")


# --- validation errors point at file:line -------------------------------------------------------


def test_an_unknown_nested_key_suggests_the_close_match_at_its_line(project):
    spec_path = write_spec(project, with_section("generation:\n  do_sample: true\n  tempreature: 0.7\n"))

    message = load_error(spec_path)

    assert message == (
        f"invalid spec {spec_path}:\n"
        f"{spec_path}:10: generation.tempreature: unknown key 'tempreature'; did you mean 'temperature'?"
    )


def test_an_unknown_key_without_a_close_match_lists_the_valid_keys(project):
    spec_path = write_spec(project, with_section("chat:\n  colour: blue\n"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:9: chat.colour: unknown key 'colour'; valid keys: system_prompt, template"
    )


def test_an_unknown_key_inside_a_list_item_is_located(project):
    text = with_section(
        """\
        verify:
          prompts:
            - prompt: 你好
              expect:
                contain: 你好
        """
    )
    spec_path = write_spec(project, text)

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:12: verify.prompts[0].expect.contain: unknown key 'contain'; did you mean 'contains'?"
    )


def test_a_wrong_type_names_the_key_the_line_and_the_value(project):
    spec_path = write_spec(project, with_section("generation:\n  max_new_tokens: lots\n"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:9: generation.max_new_tokens: "
        "Input should be a valid integer, unable to parse string as an integer, got 'lots'"
    )


def test_a_scalar_where_a_section_belongs_asks_for_a_mapping(project):
    spec_path = write_spec(project, MINIMAL.replace("  dir: ../dist/tiny\n", "").replace("output:", "output: dist"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == f"{spec_path}:6: output: expected a mapping of keys, got 'dist'"


def test_a_missing_required_key_is_reported_at_its_parent(project):
    spec_path = write_spec(project, MINIMAL.replace("  path: ../models/Qwen-7B-Chat\n", "  trust_remote_code: true\n"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == f"{spec_path}:2: base.path: required key is missing"


def test_a_missing_top_level_section_is_reported_at_the_first_line(project):
    spec_path = write_spec(project, MINIMAL.split("output:")[0])

    message = load_error(spec_path)

    assert message.splitlines()[1] == f"{spec_path}:1: output: required key is missing"


def test_every_problem_is_reported_at_once_in_file_order(project):
    text = with_section("generation:\n  top_p: 2\n").replace("name: tiny", "name: my model")
    spec_path = write_spec(project, text)

    message = load_error(spec_path)

    assert [line.split(": ")[0] for line in message.splitlines()] == [
        f"invalid spec {spec_path}:",
        f"{spec_path}:1",
        f"{spec_path}:9",
    ]


def test_the_file_is_shown_as_the_caller_wrote_it(project, monkeypatch):
    write_spec(project, MINIMAL.replace("name: tiny", "name: -tiny"))
    monkeypatch.chdir(project)

    message = load_error(Path("specs/spec.yaml"))

    assert message.splitlines()[1].startswith("specs/spec.yaml:1: name: ")


@pytest.mark.parametrize("name", ["qwen-7b-chat-med", "Qwen2.5_7B", "7b"])
def test_names_made_of_letters_digits_dots_underscores_and_dashes_are_accepted(project, name):
    spec = load_spec(write_spec(project, MINIMAL.replace("name: tiny", f"name: {name}")))

    assert spec.name == name


@pytest.mark.parametrize("name", ["my model", "-tiny", ".hidden", "qwen/7b", "", "tiny\n", "tiny\r", "tiny\t",
                                  "tiny\u202e", "tin\u200by", "tiny\x00", "tiny\x1b[31m", "t" * 201, "tïny"])
def test_other_names_are_refused_with_the_allowed_characters(project, name):
    spec_path = write_spec(project, MINIMAL.replace("name: tiny", f"name: {json.dumps(name)}"))

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:1: name: invalid name {name[:80]!r}: "
        "use letters, digits, '.', '_' and '-', starting with a letter or digit, at most 200 characters"
    )


# --- output.max_shard_size ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected", "expected_error"),
    [
        (1000, 1000, None),
        ("2GB", 2 * 10**9, None),
        ("500MB", 500 * 10**6, None),
        ("100KB", 100 * 10**3, None),
        ("1TB", 10**12, None),
        ("1.5GiB", 3 * 2**29, None),
        ("1.1GB", 1_100_000_000, None),
        ("512MiB", 512 * 2**20, None),
        ("2 gb", 2 * 10**9, None),
        ("4096", 4096, None),
        ("10B", 10, None),
        (0, None, "size must be greater than 0 bytes, got 0"),
        (-5, None, "size must be greater than 0 bytes, got -5"),
        ("0GB", None, "size must be greater than 0 bytes, got '0GB'"),
        ("2XB", None, "cannot read '2XB' as a size"),
        ("GB", None, "cannot read 'GB' as a size"),
        ("-1GB", None, "cannot read '-1GB' as a size"),
        (True, None, "expected a number of bytes or a size such as '2GB', got True"),
        (1.5, None, "expected a number of bytes or a size such as '2GB', got 1.5"),
    ],
)
def test_max_shard_size_accepts_bytes_or_sizes_with_units(value, expected, expected_error):
    if expected_error is None:
        assert OutputSpec(dir=Path("/dist"), max_shard_size=value).max_shard_size == expected
    else:
        with pytest.raises(ValidationError) as caught:
            OutputSpec(dir=Path("/dist"), max_shard_size=value)
        assert expected_error in caught.value.errors()[0]["msg"]


# --- generation overrides -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "expected_error"),
    [
        ({"do_sample": False, "temperature": 0.7}, "`temperature`: `do_sample` is not set to `True`"),
        ({"do_sample": False, "top_p": 0.8}, "`top_p`: `do_sample` is not set to `True`"),
        ({"do_sample": False, "top_k": 5}, "`top_k`: `do_sample` is not set to `True`"),
        ({"max_new_tokens": -1}, "Input should be greater than 0"),
        ({"max_new_tokens": 0}, "Input should be greater than 0"),
        ({"temperature": 0}, "Input should be greater than 0"),
        ({"top_p": 1.5}, "Input should be less than or equal to 1"),
        ({"top_k": -1}, "Input should be greater than or equal to 0"),
        ({"repetition_penalty": 0}, "Input should be greater than 0"),
    ],
)
def test_generation_values_transformers_would_refuse_are_rejected(overrides, expected_error):
    with pytest.raises(ValidationError) as caught:
        GenerationSpec(**overrides)

    assert expected_error in str(caught.value)


@pytest.mark.parametrize(
    "overrides",
    [
        {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20},
        # do_sample unset: the base's generation_config decides whether it samples.
        {"temperature": 0.7},
        {"do_sample": False, "max_new_tokens": 16, "repetition_penalty": 1.1},
    ],
)
def test_consistent_generation_overrides_are_kept_as_written(overrides):
    assert GenerationSpec(**overrides).overrides() == overrides


def test_a_generation_conflict_is_reported_at_the_section_line_with_transformers_reason(project):
    spec_path = write_spec(project, with_section("generation:\n  do_sample: false\n  temperature: 0.7\n"))

    message = load_error(spec_path)

    line = message.splitlines()[1]
    assert line.startswith(f"{spec_path}:8: generation: GenerationConfig is invalid: ")
    assert "You should set `do_sample=True` or unset `temperature`." in line


# --- verification prompts -----------------------------------------------------------------------


def test_an_invalid_regex_names_the_regex_error(project):
    text = with_section(
        """\
        verify:
          prompts:
            - prompt: 你好
              expect:
                regex: "(缺钙"
        """
    )
    spec_path = write_spec(project, text)

    message = load_error(spec_path)

    assert message.splitlines()[1] == (
        f"{spec_path}:12: verify.prompts[0].expect.regex: "
        "invalid regular expression '(缺钙': missing ), unterminated subpattern at position 0"
    )


def test_an_empty_prompt_is_refused(project):
    spec_path = write_spec(project, with_section('verify:\n  probes:\n    - prompt: "  "\n'))

    message = load_error(spec_path)

    assert message.splitlines()[1] == f"{spec_path}:10: verify.probes[0].prompt: prompt is empty"


# --- files that are not a spec ------------------------------------------------------------------


def test_a_missing_spec_file_is_named(tmp_path):
    assert load_error(tmp_path / "nope.yaml") == f"spec file not found: {tmp_path / 'nope.yaml'}"


def test_a_yaml_syntax_error_names_file_and_line(project):
    spec_path = write_spec(project, "name: tiny\nbase:\n  path: [unclosed\nadapter: {}\n")

    message = load_error(spec_path)

    assert message.startswith(f"{spec_path}:4: invalid YAML: while parsing a flow sequence: ")


@pytest.mark.parametrize(
    ("text", "found"),
    [("- name: tiny\n", "a list"), ("just text\n", "a str"), ("", "an empty file")],
)
def test_the_top_level_must_be_a_mapping(project, text, found):
    spec_path = write_spec(project, text)

    message = load_error(spec_path)

    assert message == f"{spec_path}: a spec must be a mapping of keys (name, base, adapter, ...), found {found}"


def test_a_duplicated_key_is_refused_instead_of_silently_overridden(project):
    spec_path = write_spec(project, with_section("generation:\n  temperature: 0.7\n  temperature: 0.9\n"))

    message = load_error(spec_path)

    assert message == f"{spec_path}:10: generation.temperature: duplicate key (first at line 9)"


BILLION_LAUGHS = """\
name: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def test_a_billion_laughs_document_fails_at_once_with_bounded_memory(project):
    spec_path = write_spec(project, BILLION_LAUGHS)  # 9**9 strings once expanded: gigabytes

    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = load_error(spec_path)
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert re.fullmatch(
        rf"{re.escape(str(spec_path))}:\d: invalid YAML: aliases of the anchor at this line expand to more than "
        r"10000 values \(nested or self-referencing aliases\); write the values out instead",
        message,
    )
    assert elapsed < 0.5
    assert peak < 20 * 2**20


def test_a_self_referencing_alias_is_refused(project):
    spec_path = write_spec(project, "name: tiny\nbase: &loop\n  path: [*loop]\n")

    message = load_error(spec_path)

    assert message == (
        f"{spec_path}:2: invalid YAML: nested deeper than 100 levels through aliases of the anchor at this line"
    )


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("name: " + "[" * 3000 + "]" * 3000 + "\n", ":1"),  # flow nesting: refused while scanning
        ("".join(" " * i + f"k{i}:\n" for i in range(150)), ":102"),  # indented nesting: refused before use
        ("".join(" " * i + f"k{i}:\n" for i in range(600)), ""),  # deeper than PyYAML's recursion allows
    ],
    ids=["flow", "indented", "indented-past-the-recursion-limit"],
)
def test_deeply_nested_documents_are_refused_quickly(project, text, line):
    spec_path = write_spec(project, text)

    started = time.perf_counter()
    message = load_error(spec_path)

    assert message == f"{spec_path}{line}: invalid YAML: nested deeper than 100 levels"
    assert time.perf_counter() - started < 1


def test_ordinary_aliases_still_work(project):
    text = MINIMAL + textwrap.dedent("""\
        card:
          tags: &tags [medical, lora]
        verify:
          prompts:
            - prompt: 你好
              expect: &polite {not_contains: [缺钙]}
            - prompt: 谢谢
              expect: *polite
          probes:
            - prompt: tags
              expect: {contains: *tags}
    """)

    spec = load_spec(write_spec(project, text))

    assert spec.verify.prompts[1].expect.not_contains == ["缺钙"]
    assert spec.verify.probes[0].expect.contains == ["medical", "lora"]


# --- JSON Schema for editors --------------------------------------------------------------------


def test_the_committed_schema_matches_the_models():
    committed = (REPO / "specs" / "modelpack.schema.json").read_text(encoding="utf-8")

    assert committed == json.dumps(spec_json_schema(), indent=2, ensure_ascii=False) + "\n", (
        "specs/modelpack.schema.json is stale; regenerate it: modelpack schema > specs/modelpack.schema.json"
    )


def test_the_schema_names_its_dialect_and_accepts_sizes_as_integers_or_strings():
    schema = spec_json_schema()

    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == "modelpack spec"
    assert schema["required"] == ["name", "base", "output"]
    assert schema["oneOf"] == [{"required": ["adapter"]}, {"required": ["adapters"]}]
    shard_size = schema["$defs"]["OutputSpec"]["properties"]["max_shard_size"]
    assert [option["type"] for option in shard_size["anyOf"]] == ["integer", "string"]
    assert shard_size["default"] == 5 * 10**9


def test_the_schema_validates_the_full_example():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    example = yaml.safe_load(FULL_EXAMPLE)

    jsonschema.validate(example, spec_json_schema())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(example | {"nmae": "typo"}, spec_json_schema())


def test_specs_built_in_python_resolve_relative_paths_against_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    spec = Spec(name="tiny", base={"path": "base"}, adapter={"path": "adapter"}, output={"dir": "out/../dist"})

    assert (spec.base.path, spec.output.dir) == (tmp_path / "base", tmp_path / "dist")
