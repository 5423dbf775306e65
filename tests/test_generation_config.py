"""builder/configs.py::generation_config and single_token_stop_ids on plain dicts, before any bundle exists."""

from __future__ import annotations

import copy

import pytest

from builder.configs import generation_config, single_token_stop_ids
from builder.spec import GenerationSpec

QWEN_V1_GENERATION = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
    "repetition_penalty": 1.1,
    "transformers_version": "4.31.0",
}


def bundle_generation_config(
    base_generation: dict | None,
    *,
    spec: dict | None = None,
    base_config: dict | None = None,
    end_of_turn_id: int | None = None,
) -> dict:
    """The one place this module calls generation_config, with the overrides of a real (validated) GenerationSpec."""
    return generation_config(base_generation, overrides=GenerationSpec(**(spec or {})).overrides(),
                             model_config=base_config or {}, end_of_turn_id=end_of_turn_id)


def test_base_values_are_kept_and_transformers_version_dropped():
    base = {"eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.7, "transformers_version": "4.49"}
    before = copy.deepcopy(base)
    expected = {"eos_token_id": 2, "pad_token_id": 0, "do_sample": True, "temperature": 0.7}
    assert bundle_generation_config(base) == expected
    assert base == before  # the base's dict is not modified


def test_no_base_generation_config():
    assert bundle_generation_config(None) == {}
    assert bundle_generation_config(None, spec={"max_new_tokens": 64}) == {"max_new_tokens": 64}


def test_spec_overrides_the_base():
    base = {"eos_token_id": 2, "do_sample": True, "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 2048}
    spec = {"temperature": 0.3, "top_k": 20, "max_new_tokens": 256}
    assert bundle_generation_config(base, spec=spec) == {
        "eos_token_id": 2, "do_sample": True, "temperature": 0.3, "top_p": 0.9, "max_new_tokens": 256, "top_k": 20,
    }


@pytest.mark.parametrize(
    ("base_eos", "end_of_turn_id", "expected"),
    [
        (2, 5, [2, 5]),
        (2, 2, 2),
        (2, None, 2),
        ([2, 3], 5, [2, 3, 5]),
        ([2, 5], 5, [2, 5]),
        ([7], None, 7),
        (None, 5, 5),
        (None, None, None),
    ],
)
def test_eos_ids_gain_the_end_of_turn_id(base_eos, end_of_turn_id, expected):
    base = {} if base_eos is None else {"eos_token_id": base_eos}
    config = bundle_generation_config(base, end_of_turn_id=end_of_turn_id)
    assert config.get("eos_token_id") == expected


def test_eos_falls_back_to_the_base_config_json():
    """A generation_config.json without eos_token_id: the model's config.json names it."""
    config = bundle_generation_config({"max_new_tokens": 8}, base_config={"eos_token_id": 2}, end_of_turn_id=9)
    assert config["eos_token_id"] == [2, 9]
    generation_eos_wins = bundle_generation_config({"eos_token_id": 4}, base_config={"eos_token_id": 2})
    assert generation_eos_wins["eos_token_id"] == 4


def test_qwen_v1_stop_words_join_the_eos_ids():
    """Qwen-v1 stops at its stop words in its own chat code; servers stop at eos_token_id only, so they join it."""
    config = bundle_generation_config(QWEN_V1_GENERATION, end_of_turn_id=151645)
    assert config["eos_token_id"] == [151643, 151645]
    for key in ("chat_format", "stop_words_ids", "max_window_size", "pad_token_id"):
        assert config[key] == QWEN_V1_GENERATION[key]
    assert "transformers_version" not in config


def test_one_token_stop_words_are_added_after_the_end_of_turn_id():
    base = {"eos_token_id": 1, "stop_words_ids": [[7], [8, 9], [10], [1]]}
    assert bundle_generation_config(base, end_of_turn_id=5)["eos_token_id"] == [1, 5, 7, 10]
    assert bundle_generation_config(base)["eos_token_id"] == [1, 7, 10]


def test_do_sample_false_in_the_spec_drops_the_base_sampling_keys():
    base = {
        "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.05, "typical_p": 0.9,
        "epsilon_cutoff": 3e-4, "eta_cutoff": 3e-4, "repetition_penalty": 1.05, "max_new_tokens": 512,
    }
    config = bundle_generation_config(base, spec={"do_sample": False})
    assert config == {"do_sample": False, "repetition_penalty": 1.05, "max_new_tokens": 512}


def test_do_sample_false_in_the_base_drops_its_sampling_keys():
    """A greedy base whose file still carries sampling values (transformers warns on load) is cleaned too."""
    config = bundle_generation_config({"do_sample": False, "temperature": 0.6, "top_p": 0.9, "eos_token_id": 2})
    assert config == {"do_sample": False, "eos_token_id": 2}


def test_do_sample_true_keeps_sampling_keys():
    base = {"do_sample": False, "temperature": 0.6, "top_p": 0.9}
    sampling = bundle_generation_config(base, spec={"do_sample": True})
    assert sampling == {"do_sample": True, "temperature": 0.6, "top_p": 0.9}
    assert bundle_generation_config({"temperature": 0.6}) == {"temperature": 0.6}  # unset do_sample: nothing dropped


@pytest.mark.parametrize(
    ("generation", "expected"),
    [
        ({"stop_words_ids": [[151645], [151643]]}, [151645, 151643]),
        ({"stop_words_ids": [[1], [2, 3], [4]]}, [1, 4]),
        ({"stop_words_ids": [[2, 3]]}, []),
        ({"stop_words_ids": []}, []),
        ({"stop_words_ids": None}, []),
        ({}, []),
        ({"stop_words_ids": [5, [], ["<|im_end|>"], [6.0], (7,), [8]]}, [8]),
    ],
    ids=["qwen", "mixed-lengths", "multi-token-only", "empty", "null", "absent", "malformed-entries-skipped"],
)
def test_single_token_stop_ids(generation, expected):
    assert single_token_stop_ids(generation) == expected
