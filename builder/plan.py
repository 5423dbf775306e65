"""The build plan as data: every adapter tensor matched to a base tensor, every output tensor and file, before any math."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from builder.errors import SourceError
from builder.merge import lora_scaling, pattern_value
from builder.safetensors_io import TensorEntry, TensorLocation
from builder.sources import AdapterCheckpoint, BaseModel
from builder.spec import Spec

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ADAPTER_PREFIX = "base_model.model."
# Names of the input embedding matrix that a tied lm_head shares, across common architectures.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# Adapters whose initialisation changed the base weights cannot be merged onto the original base.
WEIGHT_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")
TIED_HEAD = "lm_head.weight"


@dataclass(frozen=True)
class LoraDelta:
    """One LoRA contribution to a base tensor: dW from lora_A/lora_B (or lora_embedding_A/B) times scaling."""

    module: str
    kind: Literal["linear", "embedding"]
    a: TensorLocation
    b: TensorLocation
    rank: int
    scaling: float
    fan_in_fan_out: bool


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from, its output dtype, and the deltas merged into it."""

    name: str
    source: TensorLocation
    out_dtype: torch.dtype
    deltas: tuple[LoraDelta, ...] = ()

    @property
    def action(self) -> Literal["copy", "cast", "merge"]:
        if self.deltas:
            return "merge"
        return "copy" if self.source.dtype == self.out_dtype else "cast"

    @property
    def entry(self) -> TensorEntry:
        return TensorEntry(self.name, self.out_dtype, self.source.shape)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.entry.nbytes for t in self.tensors)


@dataclass(frozen=True)
class FileCopy:
    """A side file copied byte for byte into the bundle."""

    source: Path
    dest: str
    role: Literal["tokenizer", "remote code", "adapter weights"]


@dataclass(frozen=True)
class BuildPlan:
    """Everything the build will write, decided from headers and configs alone."""

    spec: Spec
    spec_file: Path
    base: BaseModel
    adapter: AdapterCheckpoint
    out_dtype: torch.dtype
    shards: tuple[ShardPlan, ...]
    copies: tuple[FileCopy, ...]
    untie_embeddings: bool = False
    warnings: tuple[str, ...] = field(default=())

    @property
    def mode(self) -> str:
        return self.spec.output.mode

    @property
    def weight_bytes(self) -> int:
        return sum(s.nbytes for s in self.shards)

    @property
    def disk_needed(self) -> int:
        return self.weight_bytes + sum(c.source.stat().st_size for c in self.copies)

    @property
    def merged_tensors(self) -> list[TensorPlan]:
        return [t for s in self.shards for t in s.tensors if t.deltas]


def output_dtype(spec_dtype: str, base: BaseModel) -> torch.dtype:
    """The spec's dtype, or with `auto` the base's own (its config, else its tensors' float dtype)."""
    if spec_dtype != "auto":
        return DTYPES[spec_dtype]
    declared = base.config.get("torch_dtype") or base.config.get("dtype")
    if declared in DTYPES:
        return DTYPES[declared]
    float_dtypes = [t.dtype for t in base.tensors.values() if t.dtype.is_floating_point]
    return max(set(float_dtypes), key=float_dtypes.count) if float_dtypes else torch.float32


def _module_of(key: str) -> tuple[str, str]:
    """Split an adapter key (prefix removed) into module path and LoRA role."""
    for role in ("lora_A.weight", "lora_B.weight", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                 "lora_B.bias"):
        if key.endswith("." + role):
            return key[: -len(role) - 1], role
    return key, "replacement"


def _refuse_unmergeable_config(adapter: AdapterCheckpoint, mode: str) -> None:
    config, where = adapter.config, adapter.path / "adapter_config.json"
    if config.get("layer_replication"):
        raise SourceError(f"{where}: layer_replication is set; peft cannot merge such adapters, so neither does modelpack")
    if config.get("megatron_config"):
        raise SourceError(f"{where}: megatron_config is set; megatron-parallel LoRA layers cannot be merged")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(name) for name in WEIGHT_CHANGING_INITS):
        raise SourceError(
            f"{where}: init_lora_weights={config['init_lora_weights']!r} changed the base weights during training; "
            "convert the adapter to a plain LoRA first (peft's `path_initial_model_for_weight_conversion` on save)"
        )
    if mode == "merge":
        for option in ("use_dora", "lora_bias", "trainable_token_indices"):
            if config.get(option):
                raise SourceError(
                    f"{where}: {option} is set; merging it is not supported yet. "
                    "Use `output.mode: separate` to package the adapter unmerged."
                )


@dataclass(frozen=True)
class AdapterMatch:
    """The adapter mapped onto the base: LoRA deltas per base tensor, and tensors the adapter replaces whole."""

    deltas: dict[str, list[LoraDelta]]
    replacements: dict[str, TensorLocation]


def match_adapter(base: BaseModel, adapter: AdapterCheckpoint, *, mode: str) -> AdapterMatch:
    """Map every adapter tensor to the base tensor it changes, checking shapes; anything unmatched stops the build."""
    _refuse_unmergeable_config(adapter, mode)
    config = adapter.config
    weights = adapter.weights_file.name
    tensors = with_tied_head(base)
    pairs: dict[str, dict[str, TensorLocation]] = {}
    replacements: dict[str, TensorLocation] = {}
    for key, location in adapter.tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise SourceError(f"{weights}: tensor {key!r} lacks the {ADAPTER_PREFIX!r} prefix peft writes")
        module, role = _module_of(key[len(ADAPTER_PREFIX):])
        if role in ("lora_magnitude_vector", "lora_B.bias") or (role == "replacement" and mode == "separate"):
            continue  # DoRA / lora_bias are refused by config in merge mode; separate mode loads all through peft
        if role == "replacement":
            if not module.endswith(".base_layer.weight"):
                raise SourceError(
                    f"{weights}: tensor {key!r} is a full replacement weight (modules_to_save or bias); "
                    "merging these is not supported yet. Use `output.mode: separate` to package the adapter unmerged."
                )
            # save_embedding_layers: a full copy of an embedding (or tied head) that replaces the base's.
            target = _base_target(module.removesuffix(".base_layer.weight") + ".weight", tensors, key, base, config)
            if location.shape != tensors[target].shape:
                raise SourceError(
                    f"{weights}: {key!r} has shape {list(location.shape)} but base {target!r} has "
                    f"{list(tensors[target].shape)}: the vocabulary was resized during training, which "
                    "modelpack does not merge yet. Use `output.mode: separate`."
                )
            replacements[target] = location
            continue
        pairs.setdefault(module, {})[role] = location

    deltas: dict[str, list[LoraDelta]] = {}
    for module, roles in sorted(pairs.items()):
        kind = "embedding" if "lora_embedding_A" in roles or "lora_embedding_B" in roles else "linear"
        a_role, b_role = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        if a_role not in roles or b_role not in roles:
            missing = a_role if a_role not in roles else b_role
            raise SourceError(f"{weights}: module {module!r} has no {missing} tensor; the adapter file is incomplete")
        target = _base_target(f"{module}.weight", tensors, f"{ADAPTER_PREFIX}{module}.{a_role}", base, config)
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        delta = LoraDelta(
            module=module,
            kind=kind,
            a=roles[a_role],
            b=roles[b_role],
            rank=rank,
            scaling=lora_scaling(alpha=alpha, rank=rank, use_rslora=bool(config.get("use_rslora", False))),
            fan_in_fan_out=bool(config.get("fan_in_fan_out", False)) and kind == "linear",
        )
        _check_delta_shape(delta, tensors[target], weights)
        deltas.setdefault(target, []).append(delta)
    return AdapterMatch(deltas=deltas, replacements=replacements)


def _base_target(target: str, tensors: dict[str, TensorLocation], key: str, base: BaseModel, config: dict) -> str:
    if target not in tensors:
        raise SourceError(
            f"adapter tensor {key!r} targets {target!r}, which the base model at {base.path} does not have. "
            f"Was this adapter trained on another model (it records "
            f"base_model_name_or_path={config.get('base_model_name_or_path')!r})?"
        )
    return target


def with_tied_head(base: BaseModel) -> dict[str, TensorLocation]:
    """The base's tensors plus `lm_head.weight` when the head is tied to (and stored as) the input embedding."""
    tied = tied_embedding_name(base)
    if tied and TIED_HEAD not in base.tensors:
        return {**base.tensors, TIED_HEAD: base.tensors[tied]}
    return dict(base.tensors)


def tied_embedding_name(base: BaseModel) -> str | None:
    """The input embedding the output head shares, when the config ties them (transformers' default)."""
    tied = base.config.get("tie_word_embeddings", base.config.get("text_config", {}).get("tie_word_embeddings"))
    if tied is False:
        return None
    for name in base.tensors:
        if name.endswith(INPUT_EMBEDDING_SUFFIXES):
            return name
    return None


def _check_delta_shape(delta: LoraDelta, target: TensorLocation, weights: str) -> None:
    a_shape, b_shape = delta.a.shape, delta.b.shape
    where = f"{weights}: module {delta.module!r}"
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise SourceError(f"{where}: lora A {list(a_shape)} and B {list(b_shape)} do not share a rank dimension")
    if a_shape[0] != delta.rank:
        raise SourceError(
            f"{where}: tensors have rank {a_shape[0]} but adapter_config.json gives r={delta.rank} for it "
            "(check r / rank_pattern)"
        )
    if delta.kind == "embedding":
        expected = (a_shape[1], b_shape[0])
    elif delta.fan_in_fan_out:
        expected = (a_shape[1], b_shape[0])
    else:
        expected = (b_shape[0], a_shape[1])
    if tuple(target.shape) != expected:
        raise SourceError(
            f"{where}: the LoRA update has shape {list(expected)} but base tensor {target.name!r} has "
            f"{list(target.shape)}; the adapter was trained on a model with other dimensions"
        )


def split_into_shards(tensors: list[TensorPlan], *, max_shard_size: int, prefix: str = "model") -> tuple[ShardPlan, ...]:
    """Fill shards in tensor order up to max_shard_size (a single larger tensor gets a shard of its own)."""
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tensor in tensors:
        nbytes = tensor.entry.nbytes
        if groups[-1] and size + nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tensor)
        size += nbytes
    if len(groups) == 1:
        return (ShardPlan(f"{prefix}.safetensors", tuple(groups[0])),)
    total = len(groups)
    return tuple(
        ShardPlan(f"{prefix}-{i:05d}-of-{total:05d}.safetensors", tuple(group)) for i, group in enumerate(groups, 1)
    )


def plan_build(spec: Spec, base: BaseModel, adapter: AdapterCheckpoint, *, spec_file: Path) -> BuildPlan:
    """Decide every tensor and file of the bundle; raises SourceError for anything that cannot be packaged."""
    if base.needs_remote_code and not spec.base.trust_remote_code:
        names = ", ".join(p.name for p in base.remote_code_files)
        raise SourceError(
            f"base.path {base.path} ships its own model code ({names}); packaging it runs that code at load time. "
            "Read it, then set `base.trust_remote_code: true` in the spec."
        )
    mode = spec.output.mode
    # Separate mode merges nothing, but the adapter must still fit the base it ships with.
    match = match_adapter(base, adapter, mode=mode)
    if mode == "separate":
        match = AdapterMatch(deltas={}, replacements={})
    replacements = _shared_replacements(base, match.replacements)
    out_dtype = output_dtype(spec.output.dtype, base)
    tensors = [
        TensorPlan(
            name=name,
            source=replacements.get(name, location),
            out_dtype=out_dtype if location.dtype.is_floating_point else location.dtype,
            deltas=tuple(match.deltas.get(name, ())),
        )
        for name, location in _in_file_order(base.tensors)
    ]
    untie = _needs_untying(base, match)
    if untie:
        # A delta on one side of a tied pair must not reach the other: peft's merge writes it into the shared
        # matrix, which changes the input embeddings too (the merged model then answers differently from
        # base + adapter). The bundle stores the head as its own tensor instead and unties it in config.json.
        embedding = base.tensors[tied_embedding_name(base)]
        tensors.append(
            TensorPlan(
                name=TIED_HEAD,
                source=replacements.get(TIED_HEAD, embedding),
                out_dtype=out_dtype,
                deltas=tuple(match.deltas.get(TIED_HEAD, ())),
            )
        )
    shards = split_into_shards(tensors, max_shard_size=spec.output.max_shard_size)

    copies = [FileCopy(p, p.name, "remote code") for p in base.remote_code_files]
    tokenizer_source = adapter if adapter.tokenizer_files else base
    copies += [FileCopy(p, p.name, "tokenizer") for p in tokenizer_source.tokenizer_files]
    if mode == "separate":
        copies.append(FileCopy(adapter.weights_file, "adapter/adapter_model.safetensors", "adapter weights"))

    warnings = []
    recorded = adapter.config.get("base_model_name_or_path")
    if recorded and Path(recorded).name != base.path.name:
        warnings.append(
            f"adapter records base_model_name_or_path={recorded!r}, base.path is {base.path.name!r}; "
            "shapes match, so packaging goes on"
        )
    if adapter.tokenizer_files:
        warnings.append(f"using the tokenizer saved in the adapter checkpoint ({adapter.path.name}), not the base's")
    return BuildPlan(
        spec=spec,
        spec_file=spec_file,
        base=base,
        adapter=adapter,
        out_dtype=out_dtype,
        shards=shards,
        copies=tuple(_dedupe(copies)),
        untie_embeddings=untie,
        warnings=tuple(warnings),
    )


def _shared_replacements(base: BaseModel, replacements: dict[str, TensorLocation]) -> dict[str, TensorLocation]:
    """A full copy saved for either side of a tied pair replaced the one shared matrix, so it replaces both."""
    tied = tied_embedding_name(base)
    if not tied or TIED_HEAD in base.tensors:
        return replacements
    shared = replacements.get(TIED_HEAD) or replacements.get(tied)
    return {**replacements, TIED_HEAD: shared, tied: shared} if shared else replacements


def _needs_untying(base: BaseModel, match: AdapterMatch) -> bool:
    tied = tied_embedding_name(base)
    if not tied or TIED_HEAD in base.tensors:
        return False
    touched = set(match.deltas) | set(match.replacements)
    return TIED_HEAD in touched or (tied in match.deltas)


def _in_file_order(tensors: dict[str, TensorLocation]) -> list[tuple[str, TensorLocation]]:
    """Source order (file, then offset) keeps reads sequential, which is what makes streaming fast."""
    return sorted(tensors.items(), key=lambda item: (str(item[1].file), item[1].start))


def _dedupe(copies: list[FileCopy]) -> list[FileCopy]:
    """Later entries win for the same destination (a checkpoint's tokenizer code over the base's)."""
    by_dest = {c.dest: c for c in copies}
    return list(by_dest.values())


def describe_plan(plan: BuildPlan) -> str:
    """The dry-run report: what will be written, tensor by tensor and file by file, and the disk it needs."""
    lines = [
        f"bundle {plan.spec.name} -> {plan.spec.output.dir}",
        f"mode: {plan.mode}   dtype: {str(plan.out_dtype).removeprefix('torch.')}   "
        f"base: {plan.base.path}   adapter: {plan.adapter.path}",
    ]
    counts = {"copy": 0, "cast": 0, "merge": 0}
    for shard in plan.shards:
        lines.append(f"{shard.filename}  {len(shard.tensors)} tensors  {_human(shard.nbytes)}")
        for tensor in shard.tensors:
            counts[tensor.action] += 1
            if tensor.deltas:
                detail = ", ".join(f"{d.module} r={d.rank} scale={d.scaling:g}" for d in tensor.deltas)
                lines.append(f"  merge {tensor.name} {list(tensor.source.shape)} <- {detail}")
    lines.append(f"tensors: {counts['merge']} merged, {counts['cast']} cast, {counts['copy']} copied as bytes")
    for copy in plan.copies:
        lines.append(f"copy {copy.role}: {copy.dest}  ({_human(copy.source.stat().st_size)})")
    for ignored in plan.adapter.ignored_files:
        lines.append(f"skip training leftover: {ignored.name}")
    for warning in plan.warnings:
        lines.append(f"warning: {warning}")
    lines.append(f"disk needed: {_human(plan.disk_needed)} (plus rendered files)")
    return "\n".join(lines)


def _human(nbytes: float) -> str:
    unit = "B"
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            break
        nbytes /= 1000
    return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"

