"""builder/chat_template.py renders every chat template exactly as transformers' own environment does: the same text,
or the same error, for real templates (ChatML, Qwen2, Llama 3, Qwen2.5 with tools, the demo's) and for what the
sandbox, the globals and the filters refuse."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from builder.chat_template import compile_chat_template
from helpers import CHATML_TEMPLATE, LLAMA3_TEMPLATE, QWEN2_TEMPLATE

REPO = Path(__file__).resolve().parents[1]

# Qwen2.5-Instruct's template, as published: tools as JSON lines, tool calls, tool responses, whitespace control.
QWEN25_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n\
You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within \
<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\
\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or \
(message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# What transformers' environment adds to plain Jinja: the {% generation %} tag, loop controls, strftime_now.
GENERATION_TEMPLATE = (
    "{% set today = strftime_now('%Y-%m') %}{{ today }}\n"
    "{% for message in messages %}{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
    "{% if loop.index > 4 %}{% break %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> & later, in °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "城市"}},
                   "required": ["city"]}}}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello"}],
    "system and non-ASCII": [{"role": "system", "content": "你是一名医生助手。"},
                             {"role": "user", "content": "  你好，\n请问？  "}],
    "multi-turn": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1\nA2"},
                   {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A3"},
                   {"role": "user", "content": "Q3"}, {"role": "assistant", "content": "A4"}],
    "tool call and response": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris <FR>"}}}]},
        {"role": "tool", "content": "{\"celsius\": 21}"},
        {"role": "tool", "content": "{\"humidity\": \"60%\"}"},
        {"role": "assistant", "content": "21 °C"}],
}
TEMPLATES = {
    "chatml": CHATML_TEMPLATE,
    "qwen2": QWEN2_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "qwen2.5 with tools": QWEN25_TEMPLATE,
    "generation tag, loop controls, strftime_now": GENERATION_TEMPLATE,
    "demo": (REPO / "demo" / "base" / "chat_template.jinja").read_text(encoding="utf-8"),
}


def rendered(compile_template, template: str, **variables) -> str | tuple[str, str]:
    """The rendered text, or the error as (class name, message), from compiling through rendering (a call with a
    wrong argument names the Python function, which is transformers' local `tojson` in one and ours in the other)."""
    try:
        return compile_template(template).render(**variables)
    except Exception as error:  # ours comes from the process that rendered it, and names the class it had there
        return getattr(error, "kind", type(error).__name__), re.sub(r"^\S+\(\) got ", "() got ", str(error))


def assert_same_rendering(template: str, **variables) -> None:
    ours = rendered(compile_chat_template, template, **variables)
    theirs = rendered(_compile_jinja_template, template, **variables)
    assert ours == theirs


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL]], ids=["no tools", "tools"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_real_templates_render_as_in_transformers(template, conversation, tools, add_generation_prompt):
    assert_same_rendering(TEMPLATES[template], messages=CONVERSATIONS[conversation], tools=tools,
                          add_generation_prompt=add_generation_prompt, bos_token="<|begin_of_text|>",
                          eos_token="<|im_end|>")


@pytest.mark.parametrize("template", [
    # tojson: JSON as json.dumps writes it (no HTML escaping, non-ASCII kept), with its options
    "{{ value | tojson }}",
    "{{ value | tojson(indent=2) }}",
    "{{ value | tojson(indent=2, sort_keys=True) }}",
    "{{ value | tojson(separators=(',', ':')) }}",
    "{{ value | tojson(ensure_ascii=True) }}",
    # the dict and namespace globals
    "{{ dict(a=1, b=value['b']) | tojson }} {{ dict.fromkeys(['x', 'y'], 0) | tojson }}",
    "{% set ns = namespace(found=false) %}{% for k in value %}{% set ns.found = true %}{% endfor %}{{ ns.found }}",
    # undefined names render empty; what needs a value refuses
    "[{{ nothing }}]",
    "{{ nothing.attribute }}",
    "{{ nothing() }}",
])
def test_filters_and_globals_behave_as_in_transformers(template):
    assert_same_rendering(template, value={"b": "<tag> & \"quotes\"", "a": ["中文", 1.5, None, True]})


@pytest.mark.parametrize("template", [
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}",
    "{% for m in messages %}{{ m['content'] }}",  # unclosed block: a syntax error when compiled
    "{% unknown_tag %}",
    "{% generation %}no end",
    "{{ messages.append({'role': 'user'}) }}",  # the sandbox keeps the caller's lists unchanged
    "{{ messages[0].update({'role': 'x'}) }}",
    "{{ ''.__class__.__mro__ }}",  # no way to Python internals
    "{{ namespace(_private=1) }}",
    "{% set ns = namespace() %}{% set ns._private = 1 %}",
    "{{ messages | tojson(default=str) }}",  # an option transformers' tojson does not take
])
def test_refusals_are_the_same_errors_as_in_transformers(template):
    assert_same_rendering(template, messages=[{"role": "user", "content": "hi"}])
