"""Several adapters in one spec: the spec shape, the weighted sum (one rounding) against peft's own merge in float64,
the compositions refused with the reason, separate mode's concatenated adapter in plain peft, and a verified build."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM

from builder.build import build_bundle, plan_from_spec
from builder.errors import EXIT_INVALID_INPUT, SourceError, SpecError
from builder.spec import load_spec
from helpers import RUNTIME, bundle_tensors, import_file, write_spec

IDS = torch.tensor([[1, 5, 17, 33, 80, 2, 101, 7, 250, 3]])
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Two adapters that differ in every way a sum must respect: rank, alpha, rsLoRA with rank/alpha patterns, an
# embedding LoRA, trained biases (lora_bias), overlapping and separate targets.
DOMAIN = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], lora_bias=False)
STYLE = dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_LINEAR, rank_pattern={"v_proj": 2},
             alpha_pattern={"o_proj": 3})
WEIGHTS = (0.7, -0.4)


def write_adapters_spec(folder: Path, base: Path, adapters: list[tuple[Path, float]], **sections) -> Path:
    """write_spec with `adapters:` (paths relative to the spec, weights) in place of `adapter:`."""
    path = write_spec(folder, base, adapters[0][0], **sections)
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    del spec["adapter"]
    spec["adapters"] = [{"path": os.path.relpath(a, folder), "weight": w} for a, w in adapters]
    path.write_text(yaml.safe_dump(spec, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path


def peft_composition(base: Path, adapters: list[tuple[Path, float]], dtype: torch.dtype, *, exact: bool = False):
    """The reference the equivalence check uses (its own code): every adapter active in peft, scaled by its weight.

    exact: everything is widened to float64 once the base weights (an adapter's saved copies too) are rounded into
    dtype, so that peft's merge is W + sum_i w_i * delta_i computed in float64, the exact sum of the spec.
    """
    equivalence = import_file(RUNTIME / "equivalence.py")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    peft_model = PeftModel.from_pretrained(model.double() if exact else model, adapters[0][0],
                                           adapter_name="adapter_0")
    peft_model = equivalence.weighted_adapters(peft_model, adapters).eval()
    if exact:
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" not in name:
                    param.copy_(param.to(dtype))
    return peft_model


def ulps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """|got - want| in units in the last place of dtype at want's magnitude."""
    want64 = want.double()
    exponent = torch.floor(torch.log2(want64.abs().clamp_min(torch.finfo(dtype).tiny)))
    ulp = torch.pow(2.0, exponent) * torch.finfo(dtype).eps
    return (got.double() - want64).abs() / ulp


# --- the spec ----------------------------------------------------------------------------------------------------

SPEC_CASES = [
    ("both-sections", {"adapter": {"path": "a"}, "adapters": [{"path": "b"}]}, "adapters: give either `adapter:`"),
    ("neither", {}, "no adapter: give `adapter:`"),
    ("empty-list", {"adapters": []}, "adapters: List should have at least 1 item"),
    ("weight-zero", {"adapters": [{"path": "a", "weight": 0}]}, "adapters[0].weight: weight must be a finite"),
    ("weight-not-a-number", {"adapters": [{"path": "a", "weight": "half"}]}, "adapters[0].weight: Input should be"),
    ("weight-infinite", {"adapters": [{"path": "a", "weight": float("inf")}]}, "weight must be a finite number"),
    ("listed-twice", {"adapters": [{"path": "a"}, {"path": "a", "weight": 2}]}, "is listed more than once"),
    ("misspelt-key", {"adapters": [{"path": "a", "weigth": 1}]}, "did you mean 'weight'?"),
]


@pytest.mark.parametrize("case, adapter_sections, expected", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_spec_adapter_sections(tmp_path, case, adapter_sections, expected):
    spec = {"name": "x", "base": {"path": "base"}, "output": {"dir": "dist/x"}, **adapter_sections}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec), encoding="utf-8")
    with pytest.raises(SpecError) as error:
        load_spec(path, check_paths=False)
    assert expected in error.value.message and error.value.exit_code == EXIT_INVALID_INPUT


def test_spec_adapter_sources_are_one_list(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    single = {"name": "x", "base": {"path": "."}, "output": {"dir": "dist/x"}, "adapter": {"path": "a"}}
    several = {**single, "adapter": None, "adapters": [{"path": "a", "weight": 0.5}, {"path": "b", "weight": -1}]}
    del several["adapter"]
    sources = []
    for number, spec in enumerate((single, several)):
        path = tmp_path / f"spec{number}.yaml"
        path.write_text(yaml.safe_dump(spec), encoding="utf-8")
        sources.append([(s.key, s.path.name, s.weight) for s in load_spec(path).adapter_sources])
    assert sources == [[("adapter", "a", 1.0)], [("adapters[0]", "a", 0.5), ("adapters[1]", "b", -1.0)]]
    missing = tmp_path / "spec2.yaml"
    missing.write_text(yaml.safe_dump({**several, "adapters": [{"path": "a"}, {"path": "gone"}]}), encoding="utf-8")
    with pytest.raises(SpecError, match=r"spec2.yaml:\d+: adapters\[1\].path: directory not found"):
        load_spec(missing)


# --- the weighted sum ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_adapters(models, adapters):
    base = models("llama", tied=False, dtype=torch.bfloat16)
    return base, [(adapters(base, "multi-domain", **DOMAIN), WEIGHTS[0]), (adapters(base, "multi-style", **STYLE),
                                                                          WEIGHTS[1])]


def magnitude(plan_tensor) -> torch.Tensor:
    """|W| + sum_i |w_i s_i| |B_i| |A_i|: what float32 rounding errors in the sum scale with."""
    from builder.safetensors_io import read_tensor

    total = read_tensor(plan_tensor.source).double().abs()
    for delta in plan_tensor.deltas:
        b = read_tensor(delta.b).double().abs() * abs(delta.scaling)
        if delta.kind == "bias":
            total += b
        else:
            product = b @ read_tensor(delta.a).double().abs()
            total += product.T if delta.kind == "embedding" or delta.fan_in_fan_out else product
    return total


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of dtype's values at each value's magnitude (subnormals included)."""
    exponent = torch.floor(torch.log2(values.double().abs().clamp_min(torch.finfo(dtype).tiny)))
    return torch.pow(2.0, exponent) * torch.finfo(dtype).eps


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float16", "float32"])
def test_sum_is_the_exact_sum_rounded_once(tmp_path, two_adapters, out_dtype):
    """Every merged tensor is W + 0.7 * delta_domain - 0.4 * delta_style rounded once into the dtype, up to the
    float32 arithmetic of the sum: |bundle - exact| <= 0.5 ulp + 2 * eps32 * (|W| + sum |w s B A|). The exact sum
    is peft's own merge of the composition in float64. peft's merge in the dtype (adapter after adapter, rounding
    after each) is not the oracle: it differs from the exact sum by more."""
    base, composition = two_adapters
    dtype = getattr(torch, out_dtype)
    plan = plan_from_spec(write_adapters_spec(tmp_path, base, composition, output={"dtype": out_dtype}))
    written = bundle_tensors(build_bundle(plan, verify=False).bundle)
    exact = peft_composition(base, composition, dtype, exact=True).merge_and_unload().state_dict()
    sequential = peft_composition(base, composition, dtype).merge_and_unload().state_dict()

    merged = [t for s in plan.shards for t in s.tensors if t.deltas]
    assert {d.adapter for t in merged for d in t.deltas} == {"adapters[0]", "adapters[1]"}
    assert any(len(t.deltas) == 2 for t in merged) and all(t.summed for t in merged)
    eps32 = torch.finfo(torch.float32).eps
    worst, peft_worst, elements, rounded_exactly = 0.0, 0.0, 0, 0
    for tensor in merged:
        got, want = written[tensor.name], exact[tensor.name]
        assert got.dtype == dtype
        half_ulp = 0.5 * torch.maximum(ulp(got, dtype), ulp(want, dtype))
        bound = eps32 * magnitude(tensor)
        worst = max(worst, (((got.double() - want).abs() - half_ulp) / bound).max().item())
        peft_error = (sequential[tensor.name].double() - want).abs() - half_ulp
        peft_worst = max(peft_worst, (peft_error / bound).max().item())
        elements += got.numel()
        rounded_exactly += int((got == want.to(dtype)).sum())
    assert worst <= 2.0, f"{worst:.2f} eps32 * magnitude beyond half an ulp"
    if dtype != torch.float32:  # peft rounds into the dtype after each adapter: a full ulp off, and more
        assert peft_worst > 2.0
    assert rounded_exactly / elements > {torch.float32: 0.3, torch.float16: 0.99, torch.bfloat16: 0.99}[dtype]

    ids_logits = {}
    for label, model in (("bundle", AutoModelForCausalLM.from_pretrained(tmp_path / "dist/tiny-med", dtype=dtype)),
                         ("unmerged", peft_composition(base, composition, dtype))):
        with torch.no_grad():
            ids_logits[label] = model.eval()(IDS).logits.float()
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 0.15, torch.float16: 0.02}[dtype]
    assert (ids_logits["bundle"] - ids_logits["unmerged"]).abs().max().item() <= tolerance


def test_one_weighted_adapter_is_bit_identical_to_peft(tmp_path, two_adapters):
    """One adapter in `adapters:` with a weight: peft's own merge (one adapter, scaling times the weight) is
    deterministic, and the bundle equals it bit for bit."""
    base, composition = two_adapters
    weighted = [(composition[1][0], 0.35)]
    spec = write_adapters_spec(tmp_path, base, weighted, output={"dtype": "bfloat16"})
    written = bundle_tensors(build_bundle(plan_from_spec(spec), verify=False).bundle)
    merged = peft_composition(base, weighted, torch.bfloat16).merge_and_unload().state_dict()
    assert set(written) == set(merged)
    assert all(torch.equal(written[name], merged[name]) for name in written)


# --- what cannot be composed exactly -------------------------------------------------------------------------------

CONFLICTS = [
    ("two-modules-to-save", ["saves-head", "saves-head-too"], "merge",
     ["adapters[0] and adapters[1] both replace lm_head.weight whole"]),
    ("dora-and-lora-on-one-module", ["dora", "plain"], "merge",
     ["adapters[0] uses DoRA on model.layers.0.self_attn.q_proj.weight and adapters[1] also changes it"]),
    ("different-vocabularies", ["vocab-424", "vocab-430"], "merge",
     ["adapters[0] and adapters[1] have different vocabularies", "424 rows", "430"]),
    ("replaced-and-changed", ["saves-up", "up-lora"], "merge",
     ["adapters[0] replaces model.layers.0.mlp.up_proj.weight whole", "adapters[1] also changes it"]),
    ("trained-on-another-base", ["plain", "gpt2"], "merge", ["adapters[1] (", "check that base.path is the model"]),
    ("separate-dora", ["plain", "dora"], "separate", ["adapters[1] (", "uses DoRA", "`output.mode: merge`"]),
    ("separate-modules-to-save", ["plain", "saves-head"], "separate",
     ["adapters[1] (", "replaces lm_head.weight whole", "`output.mode: merge`"]),
]
ADAPTER_OPTIONS = {
    "plain": {},
    "saves-head": dict(modules_to_save=["lm_head"]),
    "saves-head-too": dict(modules_to_save=["lm_head"], target_modules=["k_proj"]),
    "dora": dict(use_dora=True, target_modules=["q_proj", "o_proj"]),
    "vocab-424": dict(resize_vocab=424, target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "vocab-430": dict(resize_vocab=430, target_modules=["q_proj", "embed_tokens", "lm_head"]),
    "saves-up": dict(modules_to_save=["up_proj"]),
    "up-lora": dict(target_modules=["up_proj"]),
}


@pytest.mark.parametrize("case, labels, mode, expected", CONFLICTS, ids=[c[0] for c in CONFLICTS])
def test_compositions_without_an_exact_result_are_refused(tmp_path, models, adapters, case, labels, mode, expected):
    base = models("llama", tied=False, dtype=torch.float32)
    gpt2 = models("gpt2", tied=True, dtype=torch.float32)
    folders = [adapters(gpt2, "other-base", target_modules=["c_attn"]) if label == "gpt2"
               else adapters(base, f"conflict-{label}", **ADAPTER_OPTIONS[label]) for label in labels]
    spec = write_adapters_spec(tmp_path, base, [(f, 1.0) for f in folders], output={"mode": mode})
    with pytest.raises(SourceError) as error:
        plan_from_spec(spec)
    assert error.value.exit_code == EXIT_INVALID_INPUT
    for text in expected:
        assert text in error.value.message
    assert "\n" not in error.value.message


# --- separate mode: one concatenated adapter -------------------------------------------------------------------------

def test_separate_mode_ships_the_concatenation_plain_peft_loads(tmp_path, models, adapters):
    base = models("llama", tied=False, dtype=torch.float32)
    domain = adapters(base, "multi-domain-linear", **{**DOMAIN, "target_modules": ["q_proj", "v_proj", "down_proj"]})
    composition = [(domain, WEIGHTS[0]), (adapters(base, "multi-style-fp32", **STYLE), WEIGHTS[1])]
    spec = write_adapters_spec(tmp_path, base, composition, output={"mode": "separate"})
    bundle = build_bundle(plan_from_spec(spec), verify=False).bundle

    config = json.loads((bundle / "adapter" / "adapter_config.json").read_text())
    # q_proj / down_proj hold both adapters' ranks (8 + 4), v_proj 8 + 2 padded with zeros to 12: one r, scaling 1.
    assert (config["r"], config["lora_alpha"], config.get("use_rslora", False)) == (12, 12, False)
    name = json.loads((bundle / "modelpack_bundle.json").read_text())["name"]
    assert config["base_model_name_or_path"] == name and not config.get("rank_pattern")
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bundle, dtype=torch.float32),
                                      bundle / "adapter").eval()
    reference = peft_composition(base, composition, torch.float32)
    with torch.no_grad():
        difference = (model(IDS).logits - reference(IDS).logits).abs().max().item()
    assert difference <= 1e-4
    card = (bundle / "README.md").read_text()
    assert "--max-lora-rank 16" in card and "`adapter/` is the concatenation of these adapters (rank 12" in card


# --- a verified build ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["merge", pytest.param("separate", marks=pytest.mark.slow)])
def test_a_two_adapter_build_is_verified_against_the_composition(tmp_path, models, adapters, mode):
    base = models("qwen2", tied=True, dtype=torch.float32)
    composition = [(adapters(base), 1.0), (adapters(base, "chat-style", r=4, target_modules=["o_proj", "up_proj"]),
                                           0.5)]
    spec = write_adapters_spec(tmp_path, base, composition, output={"mode": mode},
                               verify={"prompts": [{"prompt": "你好"}], "probes": [{"prompt": "hi"}],
                                       "compare_base": True})
    plan = plan_from_spec(spec)
    # The base and each adapter alone answer both prompts too, in the reference's process.
    assert plan.verification_cost.describe().startswith(
        "verification: 2 model loads, one model in memory at a time (the bundle (its own load.py --verify); base + 2 "
        "adapters through peft (the unmerged reference, the base answers, each adapter's answers alone)); up to 64 "
        "generated tokens (2 answers x 8 by the bundle, 2 x 8 by the base alone, 2 x 8 by each of the 2 adapters "
        "alone)")
    result = build_bundle(plan)

    equivalence = result.verification["equivalence"]
    assert equivalence["ok"]
    assert equivalence["reference"].startswith("base + 2 adapters through peft with weights 1, 0.5")
    assert equivalence["max_abs_logit_diff"] <= 1e-3
    manifest = json.loads((result.bundle / "manifest.json").read_text())
    assert [(a["key"], a["weight"]) for a in manifest["sources"]["adapters"]] == [("adapters[0]", 1.0),
                                                                                   ("adapters[1]", 0.5)]
    assert {"adapters[0]/adapter_config.json", "adapters[1]/adapter_config.json"} <= set(manifest["sources"]["sha256"])
    card = (result.bundle / "README.md").read_text()
    assert "## Adapters" in card
    assert "| `adapters[1]` | `checkpoint-10` | 0.5 | 4 | 16 | 4 | o_proj, up_proj | 4 |" in card

    # Each part's answers, recomputed here through the bundle's own chat(): the base, each adapter alone at its
    # weight, and the composition (the bundle's answer); recorded in verification.json and in one table of the card.
    loader = import_file(result.bundle / "load.py")
    tokenizer = loader.load_tokenizer()
    parts = {"base": AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()}
    parts |= {f"adapters[{i}]": peft_composition(base, [adapter], torch.float32)
              for i, adapter in enumerate(composition)}
    recorded = json.loads((result.bundle / "verification.json").read_text())
    rows = recorded["prompts"] + recorded["probes"]
    for row in rows:
        expected = {label: loader.chat(model, tokenizer, row["prompt"], greedy=True, max_new_tokens=8)[0]
                    for label, model in parts.items()}
        assert row["base_answer"] == expected.pop("base")
        assert row["adapter_answers"] == expected
    half = peft_composition(base, [(composition[1][0], 1.0)], torch.float32)  # the weight changes the answers
    assert loader.chat(half, tokenizer, "hi", greedy=True, max_new_tokens=8)[0] != \
        rows[1]["adapter_answers"]["adapters[1]"]
    header = ("| | prompt | base model | `adapters[0]` alone (weight 1) | `adapters[1]` alone (weight 0.5) | "
              "composition (this bundle) | expectations |")
    assert header in card
    probe = [rows[1][key] for key in ("base_answer", "adapter_answers", "answer")]
    cells = [probe[0], probe[1]["adapters[0]"], probe[1]["adapters[1]"], probe[2]]
    assert f"| probe | hi | {' | '.join(map(table_cell, cells))} | recorded |" in card


def table_cell(text: str) -> str:
    """An answer as the card's Markdown table shows it."""
    return text.replace("|", "\\|").replace("\n", "<br>")
