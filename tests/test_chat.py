"""Chat facts: the end-of-turn token is found by rendering the template as transformers and vLLM do."""

from __future__ import annotations

import pytest

from builder.chat import end_of_turn_token
from builder.errors import SourceError
from helpers import CHATML_TEMPLATE

CHATML_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_IDS = {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|start_header_id|>": 128006,
              "<|end_header_id|>": 128007, "<|eot_id|>": 128009}
# What recent templates use and plain Jinja does not know: transformers' {% generation %} tag (for assistant
# masks), loop controls ({% continue %}) and its strftime_now global.
TRANSFORMERS_ONLY_TEMPLATE = (
    "{% set today = strftime_now('%Y-%m-%d') %}"
    "{% for message in messages %}{% if message['role'] == 'tool' %}{% continue %}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
)


@pytest.mark.parametrize("template, special, variables, expected", [
    (CHATML_TEMPLATE, CHATML_IDS, {}, "<|im_end|>"),
    (LLAMA3_TEMPLATE, LLAMA3_IDS, {"bos_token": "<|begin_of_text|>"}, "<|eot_id|>"),
    (TRANSFORMERS_ONLY_TEMPLATE, CHATML_IDS, {}, "<|im_end|>"),
    ("{% for m in messages %}{{ m['content'] }}\n{% endfor %}", CHATML_IDS, {}, None),  # no special token after
])
def test_end_of_turn_token_is_the_special_token_after_an_assistant_reply(template, special, variables, expected):
    assert end_of_turn_token(template, special, variables) == expected


def test_the_longest_matching_special_token_wins():
    template = "{% for m in messages %}{{ m['content'] + '<|im_end|>\n' }}{% endfor %}"
    assert end_of_turn_token(template, {"<|im": 5, "<|im_end|>": 2}, {}) == "<|im_end|>"


def test_a_template_that_raises_is_a_user_error_naming_the_template():
    template = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(SourceError, match="chat template cannot be rendered: Conversation roles must alternate"):
        end_of_turn_token(template, CHATML_IDS, {})
