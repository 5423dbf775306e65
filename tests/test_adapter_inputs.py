"""Adapters modelpack refuses, reads only on request, or stops on: each with a message naming the option or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from builder.build import build_bundle, plan_from_spec
from builder.errors import SourceError
from helpers import bundle_tensors, write_spec


@pytest.fixture
def copy_adapter(tmp_path, models, adapters):
    """A private copy of a plain adapter that the test may edit, with its base."""

    def make(arch="qwen2", tied=True, **lora):
        base = models(arch, tied=tied, dtype=torch.float32)
        source = adapters(base, "inputs-" + "-".join(sorted(lora)) if lora else "plain", **lora)
        adapter = tmp_path / "checkpoint" / source.name
        shutil.copytree(source, adapter)
        return base, adapter

    return make


def edit_config(adapter, **changes):
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def build(folder, base, adapter_dir, **sections):
    folder.mkdir(parents=True, exist_ok=True)
    return build_bundle(plan_from_spec(write_spec(folder, base, adapter_dir, **sections)), verify=False)


# (id, adapter_config.json change, message fragment)
REFUSED_CONFIGS = [
    ("layer-replication", {"layer_replication": [[0, 2], [1, 2]]}, "layer_replication is set; peft cannot merge"),
    ("megatron", {"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config is set"),
    ("pissa-init", {"init_lora_weights": "pissa_niter_4"},
     "init_lora_weights='pissa_niter_4' changed the base weights"),
    ("loftq-init", {"init_lora_weights": "loftq"}, "Convert it to a plain LoRA first"),
    ("tied-weight-tying", {"ensure_weight_tying": True}, "applies the shared delta to the shared matrix twice"),
]


@pytest.mark.parametrize("case, change, message", REFUSED_CONFIGS, ids=[c[0] for c in REFUSED_CONFIGS])
def test_unmergeable_adapter_options_are_refused_by_name(tmp_path, copy_adapter, case, change, message):
    base, adapter = copy_adapter()
    edit_config(adapter, **change)
    with pytest.raises(SourceError, match=message):
        build(tmp_path, base, adapter)
    assert not (tmp_path / "dist").exists() or not any((tmp_path / "dist").iterdir())


def test_a_key_that_maps_to_nothing_is_an_error_naming_it(tmp_path, copy_adapter):
    base, adapter = copy_adapter()

    def rename(tensors):
        for factor in ("lora_A", "lora_B"):
            key = f"base_model.model.model.layers.0.self_attn.q_proj.{factor}.weight"
            tensors[key.replace("q_proj", "qq_proj")] = tensors.pop(key)

    edit_tensors(adapter, rename)
    with pytest.raises(SourceError, match=r"targets 'model\.layers\.0\.self_attn\.qq_proj\.weight', which the base"):
        build(tmp_path, base, adapter)


def test_conv_lora_is_refused(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    edit_tensors(adapter, lambda t: t.__setitem__(key, torch.zeros(8, 64, 1, 1)))
    with pytest.raises(SourceError, match="belong to a convolution; modelpack merges Linear, Conv1D and Embedding"):
        build(tmp_path, base, adapter)


def test_conv1d_adapter_with_wrong_fan_in_fan_out_says_which_way(tmp_path, copy_adapter):
    base, adapter = copy_adapter("gpt2", target_modules=["c_fc"])
    edit_config(adapter, fan_in_fan_out=False)
    with pytest.raises(SourceError, match="stores this layer transposed .* fan_in_fan_out=False; set it to True"):
        build(tmp_path, base, adapter)


def test_nan_in_an_adapter_stops_the_build_naming_the_tensor(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    edit_tensors(adapter, lambda t: t[key].__setitem__((0, 0), float("nan")))
    with pytest.raises(SourceError, match=r"'model\.layers\.1\.mlp\.down_proj\.weight' contains NaN or Inf"):
        build(tmp_path, base, adapter)
    assert [p.name for p in (tmp_path / "dist").iterdir()] == []  # the staging folder is gone too


def test_float16_overflow_names_the_largest_value_and_suggests_bfloat16(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"
    edit_tensors(adapter, lambda t: t[key].mul_(1e5))
    with pytest.raises(
        SourceError, match=r"overflows float16: its largest magnitude is [0-9.e+]+, beyond float16's 65504.*bfloat16"
    ):
        build(tmp_path, base, adapter, output={"dtype": "float16"})
    build(tmp_path, base, adapter, output={"dtype": "bfloat16"})  # the suggested fix works


def test_legacy_bin_adapter_is_read_only_when_the_spec_allows_pickle(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    reference = build(tmp_path / "ref", base, adapter)
    state = load_file(adapter / "adapter_model.safetensors")
    torch.save(state, adapter / "adapter_model.bin")
    (adapter / "adapter_model.safetensors").unlink()

    with pytest.raises(SourceError, match="only the pickled adapter_model.bin; set `adapter.allow_pickle: true`"):
        build(tmp_path, base, adapter)
    result = build(tmp_path, base, adapter, adapter={"allow_pickle": True})
    expected, written = bundle_tensors(reference.bundle), bundle_tensors(result.bundle)
    assert expected.keys() == written.keys() and all(torch.equal(expected[k], written[k]) for k in expected)
    assert not (adapter / "adapter_model.safetensors").exists()  # the source folder was not touched


def test_empty_legacy_bin_is_an_error_not_an_empty_adapter(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({}, adapter / "adapter_model.bin")
    size = (adapter / "adapter_model.bin").stat().st_size
    with pytest.raises(SourceError, match=rf"holds no tensors \({size} bytes\)"):
        build(tmp_path, base, adapter, adapter={"allow_pickle": True})


def test_a_pickle_that_is_not_plain_tensors_is_refused(tmp_path, copy_adapter):
    base, adapter = copy_adapter()
    (adapter / "adapter_model.safetensors").unlink()
    torch.save({"weights": torch.zeros(2), "code": shutil.copytree}, adapter / "adapter_model.bin")
    with pytest.raises(SourceError, match="cannot be read as plain tensors"):
        build(tmp_path, base, adapter, adapter={"allow_pickle": True})


def test_every_lora_setting_of_the_installed_peft_is_known_or_neutral_at_its_default(tmp_path):
    """A config the installed peft writes for a plain LoRA passes the table of known keys: a peft that adds a key
    with a default the table does not call neutral shows up here, not as a refused adapter."""
    from peft import LoraConfig

    from builder.sources import unknown_adapter_settings

    LoraConfig(r=8, target_modules=["q_proj"]).save_pretrained(tmp_path)
    assert unknown_adapter_settings(json.loads((tmp_path / "adapter_config.json").read_text())) == []
