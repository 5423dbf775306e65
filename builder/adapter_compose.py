"""Several adapters in one bundle: their weighted updates matched onto the base, the compositions that have no exact
result refused with the reason, and (separate mode) the one adapter that is their exact concatenation."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from builder.adapter_match import (
    AdapterMatch,
    LoraDelta,
    match_adapter,
    refuse_unmergeable_config,
    with_tied_head,
)
from builder.errors import SourceError
from builder.sources import AdapterCheckpoint, BaseModelFolder


@dataclass(frozen=True)
class WeightedAdapter:
    """One adapter of the spec: `key` names it in messages (adapter, adapters[1]); its LoRA updates are multiplied
    by `weight`."""

    key: str
    checkpoint: AdapterCheckpoint
    weight: float


def match_adapters(base: BaseModelFolder, adapters: Sequence[WeightedAdapter], *, mode: str) -> AdapterMatch:
    """Every adapter matched onto the base, weights folded into each update's scaling, checked to compose exactly.

    Merge mode sums the updates (merge_device.merged_block); separate mode keeps nothing here for the base's
    tensors: the adapters travel as one concatenated adapter (see Concatenation), so they must fit it exactly.
    """
    matched = [(adapter, _weighted(adapter, _match_one(base, adapter, several=len(adapters) > 1, mode=mode)))
               for adapter in adapters]
    if len(matched) == 1:
        return matched[0][1]
    if mode == "separate":
        refuse_inexact_concatenation(matched)
    refuse_conflicts(matched)
    deltas: dict[str, list[LoraDelta]] = {}
    for _, match in matched:
        for target, found in match.deltas.items():
            deltas.setdefault(target, []).extend(found)
    return AdapterMatch(
        deltas=deltas,
        replacements={t: r for _, m in matched for t, r in m.replacements.items()},
        token_rows={t: r for _, m in matched for t, r in m.token_rows.items()},
    )


def _match_one(base: BaseModelFolder, adapter: WeightedAdapter, *, several: bool, mode: str) -> AdapterMatch:
    """match_adapter, with the adapter's key and folder in front of its errors when the spec lists several."""
    try:
        match = match_adapter(base, adapter.checkpoint)
        if mode == "merge":
            refuse_unmergeable_config(adapter.checkpoint, base)
    except SourceError as error:
        if not several:
            raise
        raise SourceError(f"{adapter.key} ({adapter.checkpoint.path}): {error.message}") from None
    return match


def _weighted(adapter: WeightedAdapter, match: AdapterMatch) -> AdapterMatch:
    """The adapter's weight folded into every update's scaling, as peft's per-adapter scaling applies it (weight 1
    leaves each scaling bit for bit as it was)."""
    return dataclasses.replace(match, deltas={
        target: [dataclasses.replace(d, scaling=d.scaling * adapter.weight, adapter=adapter.key,
                                     weight=adapter.weight) for d in found]
        for target, found in match.deltas.items()
    })


def refuse_conflicts(matched: list[tuple[WeightedAdapter, AdapterMatch]]) -> None:
    """Two adapters changing one tensor must be a sum of plain LoRA updates; anything else has no exact result."""
    changes: dict[str, list[tuple[WeightedAdapter, AdapterMatch]]] = {}
    for adapter, match in matched:
        for target in {*match.deltas, *match.replacements, *match.token_rows}:
            changes.setdefault(target, []).append((adapter, match))
    for target, found in sorted(changes.items()):
        for (first, one), (second, other) in itertools.combinations(found, 2):
            reason = _conflict(target, first, one, second, other) or _conflict(target, second, other, first, one)
            if reason:
                raise SourceError(reason)


def _conflict(target: str, a: WeightedAdapter, one: AdapterMatch, b: WeightedAdapter, other: AdapterMatch) -> str:
    """Why a's change to target cannot be summed with b's, or "" when it can (from a's side)."""
    if target in one.replacements:
        rows = one.replacements[target].location.shape[0]
        if target in other.replacements:
            other_rows = other.replacements[target].location.shape[0]
            if other_rows != rows:
                return (f"{a.key} and {b.key} have different vocabularies ({target} has {rows} rows in {a.key}, "
                        f"{other_rows} in {b.key}), so they were not trained on the same model and cannot be composed")
            return (f"{a.key} and {b.key} both replace {target} whole (modules_to_save or a saved copy of the layer), "
                    "and two replacements have no sum; keep that module in one adapter only")
        update_rows = {_rows_of(d) for d in other.deltas.get(target, [])}
        if update_rows and update_rows != {rows}:
            return (f"{a.key} resizes the vocabulary ({target}: {rows} rows) but {b.key} changes {target} with the "
                    "base's vocabulary, so they cannot be composed; train both on the same vocabulary")
        return (f"{a.key} replaces {target} whole (modules_to_save or a saved copy of the layer) and {b.key} also "
                "changes it, so there is no exact sum; keep that module in one adapter only")
    if target in one.token_rows:
        return (f"{a.key} trains token rows of {target} (trainable_token_indices) and {b.key} also changes it, so "
                "there is no exact sum; keep those tokens in one adapter only")
    if any(d.magnitude is not None for d in one.deltas.get(target, [])):
        return (f"{a.key} uses DoRA on {target} and {b.key} also changes it: DoRA rescales the whole weight to its "
                "trained magnitude, which does not add up, so there is no exact sum; drop the module from one of them")
    return ""


def _rows_of(delta: LoraDelta) -> int:
    """The rows of the tensor an update was shaped for (an embedding's or a Conv1D's A is (r, rows))."""
    if delta.a is not None and (delta.kind == "embedding" or delta.fan_in_fan_out):
        return delta.a.shape[1]
    return delta.b.shape[0]


def refuse_inexact_concatenation(matched: list[tuple[WeightedAdapter, AdapterMatch]]) -> None:
    """Separate mode with several adapters ships one concatenated adapter: only plain LoRA factors concatenate."""
    fan_in_fan_out = {bool(a.checkpoint.config.get("fan_in_fan_out")) for a, _ in matched}
    for adapter, match in matched:
        reason = None
        if match.replacements:
            reason = f"replaces {next(iter(match.replacements))} whole (modules_to_save, a saved copy of the layer, " \
                     "or a trained bias)"
        elif match.token_rows:
            reason = "trains token rows (trainable_token_indices)"
        elif any(d.magnitude is not None for ds in match.deltas.values() for d in ds):
            reason = "uses DoRA (its magnitude vectors rescale whole weights)"
        elif any(d.kind == "bias" for ds in match.deltas.values() for d in ds):
            reason = "trains LoRA biases (lora_bias)"
        elif len(fan_in_fan_out) > 1:
            reason = "differs from the others in fan_in_fan_out"
        if reason:
            raise SourceError(
                f"{adapter.key} ({adapter.checkpoint.path}) {reason}, which one concatenated adapter cannot hold "
                "exactly; use `output.mode: merge` to sum the adapters into the weights"
            )


@dataclass(frozen=True)
class Concatenation:
    """Separate mode with several adapters: one adapter whose factors are theirs side by side (peft's
    add_weighted_adapter(combination_type="cat")): A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...], so
    B @ A = sum_i w_i s_i B_i @ A_i exactly, with lora_alpha = r (scaling 1). Every module is padded with zeros to the
    largest rank sum, so one `r` (what vLLM's --max-lora-rank needs) fits all, without rank_pattern."""

    rank: int
    modules: dict[str, tuple[LoraDelta, ...]]
    config: dict

    @property
    def nbytes(self) -> int:
        """Size of the concatenated weights (float32)."""
        total = 0
        for parts in self.modules.values():
            a, b = parts[0].a, parts[0].b
            assert a is not None  # only lora_bias deltas lack A, and refuse_inexact_concatenation refused them
            inner = a.shape[1]
            total += 4 * self.rank * (inner + b.shape[0])
        return total


def concatenation(base: BaseModelFolder, adapters: Sequence[WeightedAdapter], match: AdapterMatch) -> Concatenation:
    """The one adapter separate mode ships for several: its modules, rank and adapter_config.json."""
    modules: dict[str, list[LoraDelta]] = {}
    for found in match.deltas.values():
        for delta in found:
            modules.setdefault(delta.module, []).append(delta)
    rank = max(sum(d.rank for d in parts) for parts in modules.values())
    first = adapters[0].checkpoint.config
    config = {**first, "r": rank, "lora_alpha": rank, "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {},
              "target_modules": _target_modules(base, set(modules)), "use_dora": False, "modules_to_save": None,
              "bias": "none", "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
              "exclude_modules": None, "trainable_token_indices": None, "init_lora_weights": True}
    return Concatenation(rank, {m: tuple(parts) for m, parts in sorted(modules.items())}, config)


def _target_modules(base: BaseModelFolder, modules: set[str]) -> list[str] | str:
    """Module names peft finds exactly these modules by: their last names when those pick out no other module of
    the base, else a regex of the full paths (peft matches a string against the whole path)."""
    names = sorted({m.rsplit(".", 1)[-1] for m in modules})
    base_modules = {t.rsplit(".", 1)[0] for t in with_tied_head(base) if t.endswith(".weight")}
    if {m for m in base_modules if m.rsplit(".", 1)[-1] in names} == modules:
        return names
    return "(" + "|".join(re.escape(m) for m in sorted(modules)) + ")"


def tokenizer_adapter(adapters: tuple[WeightedAdapter, ...]) -> AdapterCheckpoint | None:
    """The first adapter that saved a tokenizer; another one that saved a different tokenizer is refused."""
    carrying = [a for a in adapters if a.checkpoint.tokenizer_files]
    for other in carrying[1:]:
        if _file_contents(other.checkpoint.tokenizer_files) != _file_contents(carrying[0].checkpoint.tokenizer_files):
            raise SourceError(f"{carrying[0].key} and {other.key} each saved a tokenizer, and they differ: adapters "
                              "with different tokenizers cannot be composed; keep the tokenizer in one of them")
    return carrying[0].checkpoint if carrying else None


def _file_contents(files: tuple[Path, ...]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in files}
