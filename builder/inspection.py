"""`modelpack inspect`: what a folder is (base model, adapter checkpoint, Trainer output, bundle) and what it holds,
read from configs and safetensors headers only; nothing from the folder is imported or run."""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from builder.chat import CHAT_FORMAT_END_OF_TURN, end_of_turn_token
from builder.chat_template import ChatTemplateLimitError
from builder.errors import SourceError
from builder.formatting import describe_bytes, describe_count
from builder.manifest import MANIFEST, read_manifest, written_by_modelpack
from builder.sources import (
    AdapterCheckpoint,
    BaseModelFolder,
    read_adapter_checkpoint,
    read_base_model,
    read_json,
    require_text_path,
)
from builder.tokenizer_files import tokenizer_declarations
from builder.trust import SIGNATURE, bundle_digest, check_integrity
from builder.trust import code_files as bundle_code_files

CHECKPOINT_FOLDER = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True)
class ModelFacts:
    """A Hugging Face model folder (a base, or a merged bundle): its architecture, size and chat setup."""

    architecture: str
    model_type: str
    parameters: int
    dtype: str
    weight_files: dict[str, int]  # name -> bytes
    tokenizer_files: list[str]
    chat_template: str | None  # where the template lives, None when there is none
    end_of_turn_token: str | None
    end_of_turn_id: int | None
    eos_token_id: int | list[int] | None  # generation_config.json's (what servers stop on)
    model_code: list[str]


@dataclass(frozen=True)
class AdapterInspection:
    """A peft LoRA checkpoint: rank, alpha, targets, the LoRA forms it uses, and what the trainer left beside it."""

    rank: int
    alpha: float
    scaling: float
    target_modules: list[str] | str
    forms: list[str]
    tensors: int
    weights_file: str
    weights_bytes: int
    recorded_base: str | None
    tokenizer_files: list[str]
    training_leftovers: dict[str, int]  # name -> bytes, never read or copied by a build


@dataclass(frozen=True)
class BundleInspection:
    """A bundle modelpack built: its manifest checked against its files (nothing from it runs) and its digest."""

    name: str
    mode: str
    modelpack_version: str
    files: int
    integrity_problems: list[str]  # files that differ from the manifest; empty when every file matches
    digest: str
    signed: bool
    verification: str  # what verification.json records ("passed", "failed", "not run")
    model_code: list[str]


@dataclass(frozen=True)
class ChosenCheckpoint:
    """The adapter folder a spec is drafted from, and why it was chosen among a training run's checkpoints."""

    path: Path
    reason: str
    # The rule that chose it, for scripts: given | best_model_checkpoint | only | last
    rule: Literal["given", "best_model_checkpoint", "only", "last"] = "given"


@dataclass(frozen=True)
class Inspection:
    path: str
    kind: str  # "base model" | "adapter checkpoint" | "Trainer output" | "bundle"
    model: ModelFacts | None = None
    adapter: AdapterInspection | None = None
    bundle: BundleInspection | None = None
    checkpoints: list[str] | None = None  # a Trainer output's checkpoint-N folders
    chosen_checkpoint: ChosenCheckpoint | None = None  # the one `modelpack init` would package, and why

    def as_json(self) -> dict:
        """`inspect --json`: the facts as data; files whose order or name matters as lists of {name, bytes}."""
        found = {key: value for key, value in asdict(self).items() if value is not None}
        if self.model is not None:
            found["model"]["weight_files"] = _sized(self.model.weight_files)
        if self.adapter is not None:
            found["adapter"]["training_leftovers"] = _sized(self.adapter.training_leftovers)
        if self.chosen_checkpoint is not None:
            chosen = self.chosen_checkpoint
            found["chosen_checkpoint"] = {"name": chosen.path.name, "rule": chosen.rule, "reason": chosen.reason}
        return {"ok": True, **found}


def _sized(files: dict[str, int]) -> list[dict]:
    return [{"name": name, "bytes": size} for name, size in files.items()]


def inspect_folder(path: Path) -> Inspection:
    """Say what `path` is and what it holds; a folder that is none of the four kinds is a user error."""
    require_text_path(path, "the folder to inspect")
    if not path.is_dir():
        raise SourceError(f"{path}: folder not found")
    shown = str(path)
    if (path / MANIFEST).is_file() and written_by_modelpack(_json_or_none(path / MANIFEST)):
        return _inspect_bundle(path)
    if (path / "adapter_config.json").is_file():
        return Inspection(shown, "adapter checkpoint", adapter=inspect_adapter(_read_adapter(path)))
    checkpoints = sorted((p.name for p in path.iterdir() if CHECKPOINT_FOLDER.match(p.name) and p.is_dir()),
                         key=lambda name: int(name.split("-")[1]))
    if checkpoints:
        chosen = choose_checkpoint(path)
        return Inspection(shown, "Trainer output", adapter=inspect_adapter(_read_adapter(chosen.path)),
                          checkpoints=checkpoints, chosen_checkpoint=chosen)
    if (path / "config.json").is_file():
        return Inspection(shown, "base model", model=model_facts(read_base_model(path)))
    raise SourceError(f"{path} is not a model folder (config.json), an adapter checkpoint (adapter_config.json), a "
                      "Trainer output (checkpoint-N folders) or a modelpack bundle (manifest.json)")


def choose_checkpoint(folder: Path) -> ChosenCheckpoint:
    """A peft checkpoint folder as given, or one of a Trainer output folder's `checkpoint-N` folders: the best by
    trainer_state.json when training tracked one (best_model_checkpoint), else the last (highest step)."""
    require_text_path(folder, "checkpoint")
    if not folder.is_dir():
        raise SourceError(f"checkpoint {folder}: folder not found; give the folder holding adapter_config.json "
                          "(e.g. output/checkpoint-1560) or the Trainer output folder above it")
    if (folder / "adapter_config.json").is_file():
        return ChosenCheckpoint(folder, "the folder given", "given")
    steps = {int(m.group(1)): p for p in folder.iterdir()
             if (m := CHECKPOINT_FOLDER.match(p.name)) and (p / "adapter_config.json").is_file()}
    if not steps:
        raise SourceError(f"checkpoint {folder}: no adapter_config.json and no checkpoint-N folder with one; give the "
                          "folder peft's save_pretrained (or the Trainer) wrote the adapter into")
    last = steps[max(steps)]
    count = f"{len(steps)} checkpoints"
    for state_file in (last / "trainer_state.json", folder / "trainer_state.json"):
        state = read_json(state_file) if state_file.is_file() else {}
        best = state.get("best_model_checkpoint")
        # Recorded as a path of the training machine: its last component names the folder here.
        best_folder = folder / Path(best).name if isinstance(best, str) and best and "\0" not in best else None
        if best_folder is not None and best_folder in steps.values():
            metric = state.get("best_metric")
            measured = f", best_metric {_metric_text(metric)}" if isinstance(metric, int | float) else ""
            return ChosenCheckpoint(best_folder, f"the best of {count} by {state_file.relative_to(folder)} "
                                                 f"(best_model_checkpoint{measured})", "best_model_checkpoint")
    if len(steps) == 1:
        return ChosenCheckpoint(last, "the only checkpoint", "only")
    return ChosenCheckpoint(last, f"the last of {count} (highest step); trainer_state.json names no best checkpoint",
                            "last")


def _chosen(chosen: ChosenCheckpoint | None) -> str:
    return f"{chosen.path.name} ({chosen.reason})" if chosen is not None else ""


def _read_adapter(path: Path) -> AdapterCheckpoint:
    # A legacy adapter_model.bin would have to be unpickled to be read: inspect reports only what reads safely.
    return read_adapter_checkpoint(path, allow_pickle=False)


def _json_or_none(path: Path) -> dict | None:
    try:
        return read_json(path)
    except SourceError:
        return None


def model_facts(base: BaseModelFolder, *, skip_code: bool = False) -> ModelFacts:
    declared = tokenizer_declarations({p.name: p for p in base.tokenizer_files})
    template_home = None
    if declared.template is not None:
        template_home = "chat_template.jinja" if any(p.name == "chat_template.jinja" for p in base.tokenizer_files) \
            else "tokenizer_config.json"
        token = end_of_turn_token(declared.template, declared.special_ids, declared.template_tokens,
                                  source=declared.template_source)
    else:  # a remote-code model names its prompt format instead (Qwen-v1: chat_format chatml)
        token = CHAT_FORMAT_END_OF_TURN.get(str((base.generation_config or {}).get("chat_format")))
    dtypes = Counter(t.dtype.name for t in base.tensors.values() if t.dtype.is_floating_point)
    return ModelFacts(
        architecture=(base.config.get("architectures") or ["?"])[0],
        model_type=base.config["model_type"],
        parameters=parameter_count(base),
        dtype=", ".join(name for name, _ in dtypes.most_common()) or "none",
        weight_files={p.name: p.stat().st_size for p in base.weight_files},
        tokenizer_files=[p.name for p in base.tokenizer_files],
        chat_template=template_home,
        end_of_turn_token=token,
        end_of_turn_id=declared.special_ids.get(token) if token else None,
        eos_token_id=(base.generation_config or {}).get("eos_token_id"),
        model_code=[] if skip_code else [p.name for p in base.remote_code_files],
    )


def inspect_adapter(adapter: AdapterCheckpoint) -> AdapterInspection:
    config = adapter.config
    rank, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    targets = config.get("target_modules") or []
    return AdapterInspection(
        rank=rank,
        alpha=alpha,
        scaling=round(scaling, 6),
        target_modules=sorted(targets) if isinstance(targets, list) else targets,
        forms=lora_forms(adapter),
        tensors=len(adapter.tensors),
        weights_file=adapter.weights_file.name,
        weights_bytes=adapter.weights_file.stat().st_size,
        recorded_base=config.get("base_model_name_or_path"),
        tokenizer_files=[p.name for p in adapter.tokenizer_files],
        training_leftovers={p.name: _size(p) for p in adapter.ignored_files},
    )


def lora_forms(adapter: AdapterCheckpoint) -> list[str]:
    """The LoRA variants and extras the checkpoint uses beyond plain Linear LoRA, as peft names them."""
    config, names = adapter.config, list(adapter.tensors)
    forms = []
    if config.get("use_rslora"):
        forms.append("rsLoRA (scaling alpha/sqrt(r))")
    if config.get("use_dora"):
        forms.append("DoRA")
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            forms.append(f"{key} ({len(config[key])})")
    if config.get("fan_in_fan_out"):
        forms.append("fan_in_fan_out (Conv1D)")
    if config.get("lora_bias"):
        forms.append("lora_bias")
    if config.get("bias") not in (None, "none"):
        forms.append(f"trained biases ({config['bias']})")
    if any("lora_embedding_A" in n for n in names):
        forms.append("embedding LoRA")
    if config.get("modules_to_save"):
        forms.append("modules_to_save: " + ", ".join(config["modules_to_save"]))
    if config.get("trainable_token_indices"):
        forms.append("trainable_token_indices")
    # Full embedding matrices saved beside the LoRA factors (peft's save_embedding_layers, for a resized
    # vocabulary); a module in modules_to_save is saved whole under the same name, and is named above.
    kept_whole = set(config.get("modules_to_save") or [])
    saved = sorted({module for n in names if "lora_" not in n
                    and n.endswith(("embed_tokens.weight", "wte.weight", "lm_head.weight"))
                    and (module := n.rsplit(".", 2)[-2]) not in kept_whole})
    if saved:
        forms.append("saved embedding layers: " + ", ".join(saved))
    return forms


def _metric_text(metric: int | float) -> str:
    """A recorded metric as `init` writes it into a comment: any number a JSON file holds, never an error."""
    try:
        return f"{float(metric):g}"
    except OverflowError:  # an integer beyond any float (and beyond str()'s digit limit)
        return "beyond any float"


def _inspect_bundle(path: Path) -> Inspection:
    manifest = read_manifest(path)
    integrity = check_integrity(path)
    report = _json_or_none(path / "verification.json")
    verification = "not run" if report is None else "passed" if report.get("ok") else "failed"
    model = None
    if (path / "config.json").is_file():
        # Headers and configs only; the model's code is listed from the manifest, never imported.
        try:
            model = model_facts(read_base_model(path), skip_code=True)
        except ChatTemplateLimitError:  # the sender's template is code that would hang or flood whoever renders it
            raise
        except SourceError:  # a damaged bundle: its integrity problems above say which files
            model = None
    facts = BundleInspection(
        name=str(manifest.get("name", path.name)),
        mode=str(manifest.get("mode", "?")),
        modelpack_version=str(manifest.get("modelpack_version", "?")),
        files=integrity.files,
        integrity_problems=integrity.problems,
        digest=bundle_digest(path),
        signed=(path / SIGNATURE).is_file(),
        verification=verification,
        model_code=list(bundle_code_files(manifest)),
    )
    return Inspection(str(path), "bundle", model=model, bundle=facts)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def parameter_count(base: BaseModelFolder) -> int:
    """Elements of every weight tensor (a tied head is stored once, so counted once)."""
    return sum(math.prod(t.shape) for t in base.tensors.values())


def describe_inspection(found: Inspection) -> str:
    """The inspection as aligned lines for a terminal."""
    rows: list[tuple[str, str]] = []
    if found.bundle:
        b = found.bundle
        rows += [("name", b.name), ("mode", b.mode), ("built by", f"modelpack {b.modelpack_version}"),
                 ("integrity", f"{'; '.join(b.integrity_problems) or 'ok'} ({b.files} files checked against "
                               f"{MANIFEST}; nothing was run)"),
                 ("digest", b.digest), ("signed", "yes (model.sig)" if b.signed else "no"),
                 ("verification", b.verification), ("model code", ", ".join(b.model_code) or "none")]
    if found.checkpoints:
        rows += [("checkpoints", ", ".join(found.checkpoints)), ("init would use", _chosen(found.chosen_checkpoint))]
    if found.model:
        m = found.model
        rows += [
            ("architecture", f"{m.architecture} ({m.model_type})"),
            ("parameters", f"{describe_count(m.parameters)} ({m.parameters:,})"),
            ("dtype", m.dtype),
            ("weights", ", ".join(f"{name} ({describe_bytes(size)})" for name, size in m.weight_files.items())),
            ("tokenizer", ", ".join(m.tokenizer_files) or "none: the build needs one"),
            ("chat template", f"yes ({m.chat_template})" if m.chat_template else "none"),
            ("end of turn", f"{m.end_of_turn_token} (id {m.end_of_turn_id})" if m.end_of_turn_token else "unknown"),
            ("eos_token_id", str(m.eos_token_id) if m.eos_token_id is not None else "not set (generation_config)"),
        ]
        if not found.bundle:
            rows.append(("model code", ", ".join(m.model_code) or "none"))
    if found.adapter:
        a = found.adapter
        targets = a.target_modules if isinstance(a.target_modules, str) else ", ".join(a.target_modules)
        rows += [
            ("LoRA", f"r={a.rank} alpha={a.alpha:g} scaling={a.scaling:g}"),
            ("targets", targets),
            ("forms", ", ".join(a.forms) or "plain LoRA"),
            ("weights", f"{a.weights_file} ({describe_bytes(a.weights_bytes)}, {a.tensors} tensors)"),
            ("recorded base", a.recorded_base or "none"),
            ("tokenizer", ", ".join(a.tokenizer_files) or "none (the base's is used)"),
            ("training leftovers", ", ".join(f"{name} ({describe_bytes(size)})"
                                             for name, size in a.training_leftovers.items()) or "none"),
        ]
    width = max(len(label) for label, _ in rows)
    return "\n".join([f"{found.path}: {found.kind}"] + [f"  {label:<{width}}  {value}" for label, value in rows])
