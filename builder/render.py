"""The bundle's own files from one context: the runtime (copied) and its facts (JSON), requirements (Jinja), and
the Jinja environment every template prints in (the card's rows are card.py's)."""

from __future__ import annotations

import importlib.resources
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata
from pathlib import PureWindowsPath
from typing import TYPE_CHECKING

from jinja2 import Environment, FunctionLoader, StrictUndefined
from packaging.utils import canonicalize_name

import builder
from builder.adapter_compose import WeightedAdapter
from builder.chat import ChatFacts
from builder.formatting import dump_json
from builder.gguf_facts import embedded_chat_template, variant_budgets
from builder.plan import BuildPlan
from builder.remote_code import distribution_name, third_party_imports
from builder.runtime.load import FACTS_FILE
from builder.serving import (
    OllamaTemplate,
    ServedBundle,
    ServingCommand,
    gguf_file_name,
    ollama_template,
    render_modelfile,
    serving_commands,
    variant_modelfile_name,
)
from builder.sizing import KvCache, kv_cache
from builder.spec import hub_model_id
from builder.trust import BUNDLE_RUNTIME

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# Packages a bundle needs at load time; peft only when the adapter stays separate.
RUNTIME_PACKAGES = ("torch", "transformers", "accelerate", "safetensors", "tokenizers")
# The RenderContext fields written to it: what the runtime needs to load, chat and verify.
FACT_FIELDS = (
    "name", "modelpack_version", "mode", "dtype", "trust_remote_code", "system_prompt", "has_chat_template",
    "end_of_turn_token", "verify_max_new_tokens", "prompts", "probes", "remote_code_files", "remote_code_imports",
    "gguf_budget",
)


@dataclass(frozen=True)
class AdapterCardView:
    """One adapter as the model card shows it, each value as printed; max_rank is what serving needs of it."""

    rank: str  # r and every rank_pattern value
    alpha: str
    scaling: str
    max_rank: int
    target_modules: str
    modules: int
    recorded_base: str
    checkpoint: str
    key: str = "adapter"  # adapters[i] for one of several
    weight: str = "1"  # the spec's weight, as %g prints it


@dataclass(frozen=True)
class RenderContext:
    """The bundle's facts its files are rendered from: the runtime's facts (FACT_FIELDS), the card's (card.py), the
    Modelfile and requirements."""

    name: str
    mode: str
    dtype: str
    trust_remote_code: bool
    remote_code_files: list[str]
    remote_code_imports: list[str]
    has_chat_template: bool
    base_name: str
    base_model_id: str | None  # the Hub id the card's front matter names, when one is known
    system_prompt: str | None
    verify_max_new_tokens: int
    prompts: list[dict]
    probes: list[dict]
    end_of_turn_token: str | None
    generation: dict
    card: dict
    adapter: AdapterCardView
    adapters: list[AdapterCardView]  # one per adapter when the spec composes several, else empty
    composed_rank: int | None  # separate mode with several adapters: the concatenated adapter's rank
    weight_files: list[str]
    weight_size: str
    weight_bytes: int
    kv: KvCache  # the attention cache per token and the context length, from config.json
    modelpack_version: str
    transformers_version: str  # the builder's: what an unverified bundle's requirements.txt pins
    serving: list[ServingCommand]
    ollama: OllamaTemplate | None  # with a GGUF export: the Modelfile's TEMPLATE, or why it has none
    modelfile: str | None  # gguf/Modelfile, with a GGUF export
    # gguf/Modelfile.<type> for each GGUF type after the first (serving.variant_modelfile_name) -> its text
    variant_modelfiles: dict[str, str] = field(default_factory=dict)
    # quantized GGUF type -> its quality budget (gguf_facts.variant_budgets), which every verification applies
    gguf_budget: dict[str, dict] = field(default_factory=dict)


def adapter_card_view(plan: BuildPlan, weighted: WeightedAdapter) -> AdapterCardView:
    """The card's view of one adapter: its config, and the updates the plan merges from it (scaling without its
    weight, which is shown on its own)."""
    config = weighted.checkpoint.config
    concatenated = plan.concatenation.modules.values() if plan.concatenation else []
    deltas = [d for t in plan.merged_tensors for d in t.deltas if d.adapter == weighted.key] + [
        d for parts in concatenated for d in parts if d.adapter == weighted.key]
    ranks = sorted({config.get("r", 8), *(config.get("rank_pattern") or {}).values()})
    alphas = sorted({config.get("lora_alpha", 8), *(config.get("alpha_pattern") or {}).values()})
    scalings = sorted({round(d.scaling / d.weight, 6) for d in deltas})
    targets = config.get("target_modules") or []
    return AdapterCardView(
        rank=", ".join(map(str, ranks)),
        alpha=", ".join(map(str, alphas)),
        scaling=", ".join(f"{s:g}" for s in scalings) or "n/a (kept separate)",
        max_rank=max(ranks),
        # a string is peft's regex over module paths, shown as written
        target_modules=targets if isinstance(targets, str) else ", ".join(sorted(targets)),
        modules=len({d.module for d in deltas}) if deltas else len(weighted.checkpoint.tensors) // 2,
        recorded_base=recorded_base_name(config.get("base_model_name_or_path")),
        checkpoint=weighted.checkpoint.path.name,
        key=weighted.key,
        weight=f"{weighted.weight:g}",
    )


def card_tags(spec_tags: list[str], *, separate: bool) -> list[str]:
    """The model card's tags (its front matter) and the GGUF files' general.tags: the spec's, then what the bundle is
    (`lora`; `peft` where the adapter stays separate; `modelpack`), each once."""
    return list(dict.fromkeys([*spec_tags, "lora", *(["peft"] if separate else []), "modelpack"]))


def build_context(plan: BuildPlan, *, generation: dict, chat: ChatFacts) -> RenderContext:
    spec = plan.spec
    facts = [adapter_card_view(plan, weighted) for weighted in plan.adapters]
    composed_rank = plan.concatenation.rank if plan.concatenation else None
    trust_remote_code = spec.base.trust_remote_code and bool(plan.code_files)
    # GGUF files are exported from merged weights only.
    gguf_types = spec.export.gguf.types if spec.export.gguf is not None and spec.output.mode == "merge" else []
    ollama = ollama_template(chat, generation) if gguf_types else None
    kv = kv_cache(plan.base.config)
    modelfiles = {gguf_type: render_modelfile(
        name=spec.name, gguf_type=gguf_type, template=ollama, chat=chat, generation=generation,
        system_prompt=spec.chat.system_prompt, modelpack_version=builder.__version__,
        license=spec.card.license or "other", context_length=kv.context_length, variant=i > 0,
    ) for i, gguf_type in enumerate(gguf_types)} if ollama is not None else {}
    modelfile = modelfiles.get(gguf_types[0]) if gguf_types else None
    served = ServedBundle(
        name=spec.name, mode=spec.output.mode, trust_remote_code=trust_remote_code,
        has_chat_template=chat.template is not None,
        max_lora_rank=composed_rank or max(f.max_rank for f in facts),
        gguf_files=[gguf_file_name(spec.name, t) for t in gguf_types], has_modelfile=modelfile is not None,
        gguf_has_chat_template=bool(gguf_types) and embedded_chat_template(chat, generation) is not None,
        context_length=kv.context_length, max_new_tokens=generation.get("max_new_tokens"),
        system_prompt=spec.chat.system_prompt,
        example_prompt=next((p.prompt for p in (*spec.verify.prompts, *spec.verify.probes)), "Hello"),
        tensor_parallel_size=spec.verify.vllm_tensor_parallel_size,
    )
    return RenderContext(
        name=spec.name,
        mode=spec.output.mode,
        dtype=plan.out_dtype.name,
        trust_remote_code=trust_remote_code,
        remote_code_files=[p.name for p in plan.code_files],
        remote_code_imports=third_party_imports(c.source for c in plan.copies if c.dest.endswith(".py")),
        has_chat_template=chat.template is not None,
        base_name=base_model_name(plan),
        base_model_id=base_model_id(plan),
        system_prompt=spec.chat.system_prompt,
        verify_max_new_tokens=spec.verify.max_new_tokens,
        prompts=[p.model_dump() for p in spec.verify.prompts],
        probes=[p.model_dump() for p in spec.verify.probes],
        end_of_turn_token=chat.end_of_turn_token,
        generation=generation,
        card=spec.card.model_dump(),
        adapter=facts[0],
        adapters=facts if len(facts) > 1 else [],
        composed_rank=composed_rank,
        weight_files=[s.filename for s in plan.shards],
        weight_size=(f"{plan.weight_bytes / 1e9:.2f} GB" if plan.weight_bytes >= 1e8
                     else f"{plan.weight_bytes / 1e6:.1f} MB"),
        weight_bytes=plan.weight_bytes,
        kv=kv,
        modelpack_version=builder.__version__,
        transformers_version=metadata.version("transformers"),
        serving=serving_commands(served),
        ollama=ollama,
        modelfile=modelfile,
        variant_modelfiles={variant_modelfile_name(t): text for t, text in list(modelfiles.items())[1:]},
        gguf_budget=variant_budgets(spec),
    )


def recorded_base_name(recorded: object) -> str:
    """The adapter's recorded base for the card: a hub id ("Qwen/Qwen-7B-Chat") as it is, a folder (of this machine
    or of the training machine) by its last component only, so no bundle file names a machine's paths."""
    text = str(recorded)
    return text if hub_model_id(text) or "/" not in text and "\\" not in text else PureWindowsPath(text).name


def base_model_id(plan: BuildPlan) -> str | None:
    """The base's Hub id for the card's `base_model`: the spec's `card.base_model`, else the adapter's recorded base
    or the config's `_name_or_path` when that is an id. The Hub rejects a folder name, so there is none otherwise."""
    return (plan.spec.card.base_model
            or hub_model_id(plan.adapters[0].checkpoint.config.get("base_model_name_or_path"))
            or hub_model_id(plan.base.config.get("_name_or_path")))


def base_model_name(plan: BuildPlan) -> str:
    """A hub-style id if the config records one ("Qwen/Qwen-7B-Chat"), else the base folder's name."""
    return hub_model_id(plan.base.config.get("_name_or_path")) or plan.base.path.name


def _template_source(name: str) -> str:
    return (importlib.resources.files("builder.templates") / name).read_text(encoding="utf-8")


def _table_cell(value: object) -> str:
    """A value inside a Markdown table cell: a | would end the cell, a line break the row."""
    return str(value).replace("|", "\\|").replace("\n", "<br>")


_ENV = Environment(
    loader=FunctionLoader(_template_source),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
    trim_blocks=True,
    lstrip_blocks=True,
)
_ENV.filters["cell"] = _table_cell


def render_template(name: str, context: DataclassInstance) -> str:
    """templates/NAME printed from one prepared context (a dataclass): each of its fields is a name there."""
    return _ENV.get_template(name).render({field.name: getattr(context, field.name) for field in fields(context)})


def runtime_source(name: str) -> bytes:
    """A file of the bundle runtime (builder/runtime/) as installed with modelpack."""
    return (importlib.resources.files("builder.runtime") / name).read_bytes()


def render_facts(context: RenderContext) -> str:
    """modelpack_bundle.json: the only part of the bundle's runtime that differs between bundles."""
    facts = asdict(context)
    return dump_json({key: facts[key] for key in FACT_FIELDS})


def render_runtime(context: RenderContext) -> dict[str, bytes]:
    """The bundle's runtime, file name -> bytes: load.py and bundle_check.py byte for byte, and their facts."""
    files = {name: runtime_source(name) for name in BUNDLE_RUNTIME}
    files[FACTS_FILE] = render_facts(context).encode("utf-8")
    return files


def render_requirements(context: RenderContext, *, environment: dict | None, extra_packages: list[str]) -> str:
    """Pinned versions: those the verification process reported, else this process's own.

    A remote-code bundle also needs what its code imports; the verifying interpreter reports which
    distribution provides each import and its version (a version that loaded this model).
    """
    versions = dict(environment or installed_versions())
    wanted = [*RUNTIME_PACKAGES, *(["peft"] if context.mode == "separate" else []), *extra_packages]
    packages = [(p, versions[p]) for p in dict.fromkeys(wanted) if p in versions]
    imports = (environment or {}).get("imports") or remote_code_distributions(context.remote_code_imports)
    listed = {canonicalize_name(p) for p, _ in packages}
    unpinned = []
    for name in context.remote_code_imports:
        distribution, version = imports.get(name) or (distribution_name(name), None)
        if canonicalize_name(distribution) in listed:
            continue
        listed.add(canonicalize_name(distribution))
        if version:
            packages.append((distribution, version))
        else:
            unpinned.append(distribution)
    return render_template("requirements.txt.jinja", Requirements(
        checked="verified" if environment is not None else "built",
        python=versions["python"],
        # A local version label (torch's "+cpu", "+cu130") names a build pip cannot fetch by that pin.
        pins=[Pin(p, v.split("+", 1)[0]) for p, v in packages],
        unpinned=unpinned,
    ))


@dataclass(frozen=True)
class Pin:
    package: str
    version: str


@dataclass(frozen=True)
class Requirements:
    """What templates/requirements.txt.jinja prints."""

    checked: str  # how the versions were seen: "verified" with, or only "built" with (--no-verify)
    python: str
    pins: list[Pin]
    unpinned: list[str]  # imported by the model's code, not installed where the bundle was checked


def remote_code_distributions(import_names: list[str]) -> dict[str, list]:
    """import name -> [distribution, version or None] in this environment, read from metadata (nothing imported)."""
    found: dict[str, list] = {}
    for name in import_names:
        distribution = distribution_name(name)
        try:
            found[name] = [distribution, metadata.version(distribution)]
        except metadata.PackageNotFoundError:
            found[name] = [distribution, None]
    return found


def installed_versions() -> dict:
    import platform

    found = {"python": platform.python_version()}
    for package in (*RUNTIME_PACKAGES, "peft", "tiktoken"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found
