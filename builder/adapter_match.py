"""Matching every adapter tensor to the base tensor it changes, with peft's key names and semantics, before any math."""

from __future__ import annotations

import math
import re
import signal
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from builder.errors import SourceError
from builder.safetensors_io import TensorLocation
from builder.sources import AdapterCheckpoint, BaseModelFolder

ADAPTER_PREFIX = "base_model.model."
TIED_HEAD = "lm_head.weight"
# Names of the input embedding matrix that a tied lm_head shares, across common architectures.
INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
# Adapters whose initialisation changed the base weights cannot be merged onto the original base.
WEIGHT_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "eva")
# Suffixes of the tensors peft saves per LoRA module, and the role each plays.
LORA_ROLES = {
    "lora_A.weight": "A",
    "lora_B.weight": "B",
    "lora_B.bias": "bias",
    "lora_embedding_A": "embedding_A",
    "lora_embedding_B": "embedding_B",
    "lora_magnitude_vector": "magnitude",
    "token_adapter.trainable_tokens_delta": "token_rows",
}


def pattern_value(patterns: Mapping[str, float], module_path: str, default: float) -> float:
    """peft's rank_pattern / alpha_pattern lookup: the first key that matches the module path's suffix wins.

    A key is a regex matched against the whole path, anchored at a dot boundary ("(.*\\.)?key$").
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_path):
            return value
    return default


def lora_scaling(*, alpha: float, rank: int, use_rslora: bool) -> float:
    """The factor peft multiplies B @ A by: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


@dataclass(frozen=True)
class LoraDelta:
    """One adapter update to a base tensor: dW = (B @ A) * scaling (or lora_B.bias * scaling for lora_bias).

    With DoRA (`magnitude` set) the merged weight is rescaled to the trained magnitude per output row.
    """

    module: str
    kind: Literal["linear", "embedding", "bias"]
    a: TensorLocation | None
    b: TensorLocation
    rank: int
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: TensorLocation | None = None
    # Which adapter of the spec it comes from, and the weight already folded into `scaling` (several adapters).
    adapter: str = "adapter"
    weight: float = 1.0

    @property
    def needs_whole_tensor(self) -> bool:
        """DoRA norms over columns (embeddings, Conv1D) need every row at once; others merge row block by block."""
        return self.magnitude is not None and (self.kind == "embedding" or self.fan_in_fan_out)


@dataclass(frozen=True)
class TokenRows:
    """trainable_token_indices: these rows of the embedding are replaced by the trained values."""

    indices: tuple[int, ...]
    values: TensorLocation


@dataclass(frozen=True)
class Replacement:
    """A full tensor saved in the adapter that replaces the base's (modules_to_save, trained biases, base_layer copies).

    `shared` marks a copy of a base layer's own weight (save_embedding_layers): for a tied head it is the one
    matrix both sides share.
    """

    location: TensorLocation
    shared: bool


@dataclass(frozen=True)
class AdapterMatch:
    """The adapter mapped onto the base tensors (a tied head appears as `lm_head.weight`)."""

    deltas: dict[str, list[LoraDelta]]
    replacements: dict[str, Replacement]
    token_rows: dict[str, TokenRows]


def refuse_unmergeable_config(adapter: AdapterCheckpoint, base: BaseModelFolder) -> None:
    """Adapter options whose merge peft itself cannot do, or does wrongly, stop the build with the reason."""
    config, where = adapter.config, adapter.path / "adapter_config.json"
    if config.get("layer_replication"):
        raise SourceError(
            f"{where}: layer_replication is set; peft cannot merge such adapters, so neither does modelpack"
        )
    if config.get("megatron_config"):
        raise SourceError(f"{where}: megatron_config is set; megatron-parallel LoRA layers cannot be merged")
    init = str(config.get("init_lora_weights", True)).lower()
    if any(init.startswith(name) for name in WEIGHT_CHANGING_INITS):
        raise SourceError(
            f"{where}: init_lora_weights={config['init_lora_weights']!r} changed the base weights during training, so "
            "the adapter only fits the modified base. Convert it to a plain LoRA first "
            "(peft's `path_initial_model_for_weight_conversion` argument of save_pretrained)"
        )
    if config.get("ensure_weight_tying") and tied_embedding_name(base):
        raise SourceError(
            f"{where}: ensure_weight_tying is set on a model with tied embeddings; peft's merge applies the shared "
            "delta to the shared matrix twice (peft issue 2777). Use `output.mode: separate` to ship it unmerged"
        )


def match_adapter(base: BaseModelFolder, adapter: AdapterCheckpoint) -> AdapterMatch:
    """Map every adapter tensor to its base tensor and check shapes; anything that maps to nothing is an error."""
    config = adapter.config
    weights = adapter.weights_file.name
    targets = with_tied_head(base)
    _check_target_modules(adapter, base, targets)
    modules: dict[str, dict[str, TensorLocation]] = {}
    replacements: dict[str, Replacement] = {}
    for key, location in adapter.tensors.items():
        if not key.startswith(ADAPTER_PREFIX):
            raise SourceError(f"{weights}: tensor {key!r} lacks the {ADAPTER_PREFIX!r} prefix peft writes")
        _check_layout(location, weights, key)
        path = key[len(ADAPTER_PREFIX):]
        role = next((r for suffix, r in LORA_ROLES.items() if path.endswith("." + suffix)), None)
        if role is None:
            target = _target(path.replace(".base_layer.", "."), targets, key, base, config)
            replacements[target] = Replacement(location, shared=".base_layer." in path)
            continue
        module = path[: -len(next(s for s, r in LORA_ROLES.items() if r == role)) - 1]
        modules.setdefault(module, {})[role] = location
    replacements = _share_tied_copies(base, replacements)

    deltas: dict[str, list[LoraDelta]] = {}
    token_rows: dict[str, TokenRows] = {}
    for module, roles in sorted(modules.items()):
        if "token_rows" in roles:
            target = _target(f"{module}.weight", targets, f"{ADAPTER_PREFIX}{module}.token_adapter", base, config)
            rows = (replacements[target].location if target in replacements else targets[target]).shape[0]
            indices = _token_indices(adapter, module, roles["token_rows"], rows=rows)
            token_rows[target] = TokenRows(indices, roles["token_rows"])
        rank = int(pattern_value(config.get("rank_pattern") or {}, module, config.get("r", 8)))
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
        scaling = lora_scaling(alpha=alpha, rank=rank, use_rslora=bool(config.get("use_rslora", False)))
        for delta in _module_deltas(module, roles, rank=rank, scaling=scaling, config=config, weights=weights):
            suffix = "bias" if delta.kind == "bias" else "weight"
            target = _target(f"{module}.{suffix}", targets, f"{ADAPTER_PREFIX}{module}", base, config)
            replaced = replacements.get(target)
            _check_delta_shape(delta, replaced.location if replaced else targets[target], weights)
            deltas.setdefault(target, []).append(delta)
    return AdapterMatch(deltas=deltas, replacements=replacements, token_rows=token_rows)


def _share_tied_copies(base: BaseModelFolder, replacements: dict[str, Replacement]) -> dict[str, Replacement]:
    """A base_layer copy saved for either side of a tied pair is the one shared matrix: it replaces both sides."""
    tied = tied_embedding_name(base)
    if not tied or TIED_HEAD in base.tensors:
        return replacements
    shared = next((replacements[n] for n in (tied, TIED_HEAD) if n in replacements and replacements[n].shared), None)
    if shared is None:
        return replacements
    return {TIED_HEAD: shared, **replacements, tied: shared}


def _module_deltas(module: str, roles: dict, *, rank: int, scaling: float, config: dict, weights: str):
    """The LoRA deltas one module's saved tensors describe (none for a module with only trainable tokens)."""
    where = f"{weights}: module {module!r}"
    if "A" in roles or "B" in roles:
        if "A" not in roles or "B" not in roles:
            raise SourceError(f"{where} has only one of lora_A / lora_B; the adapter file is incomplete")
        yield LoraDelta(module, "linear", roles["A"], roles["B"], rank, scaling,
                        fan_in_fan_out=bool(config.get("fan_in_fan_out")), magnitude=roles.get("magnitude"))
    if "embedding_A" in roles or "embedding_B" in roles:
        if "embedding_A" not in roles or "embedding_B" not in roles:
            raise SourceError(
                f"{where} has only one of lora_embedding_A / lora_embedding_B; the adapter file is incomplete"
            )
        yield LoraDelta(module, "embedding", roles["embedding_A"], roles["embedding_B"], rank, scaling,
                        magnitude=roles.get("magnitude"))
    if "bias" in roles:
        yield LoraDelta(module, "bias", None, roles["bias"], rank, scaling)
    if "magnitude" in roles and not ({"A", "embedding_A"} & set(roles)):
        raise SourceError(f"{where} has a DoRA magnitude vector but no LoRA weights")


def _token_indices(adapter: AdapterCheckpoint, module: str, values: TensorLocation, *, rows: int) -> tuple[int, ...]:
    """trainable_token_indices is a list (for the input embedding) or {module name: list}, each a row of the
    embedding."""
    spec = adapter.config.get("trainable_token_indices")
    if isinstance(spec, dict):
        indices = next((v for k, v in spec.items() if module == k or module.endswith("." + k)), None)
    else:
        indices = spec
    if not isinstance(indices, list) or not indices or len(indices) != values.shape[0]:
        raise SourceError(
            f"{adapter.weights_file.name}: {module}.token_adapter holds {values.shape[0]} rows "
            f"but adapter_config.json's trainable_token_indices gives {indices!r} for it"
        )
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < rows for i in indices):
        raise SourceError(
            f"{adapter.path / 'adapter_config.json'}: trainable_token_indices for {module} are {indices!r}, "
            f"but must be token ids from 0 to {rows - 1} (the embedding's rows); "
            "correct them or re-save the adapter with peft"
        )
    return tuple(indices)


def _check_layout(location: TensorLocation, weights: str, key: str) -> None:
    if not location.dtype.is_floating_point:
        raise SourceError(
            f"{weights}: tensor {key!r} has dtype torch.{location.dtype.name}; expected floating point weights"
        )


def _check_target_modules(
    adapter: AdapterCheckpoint, base: BaseModelFolder, tensors: dict[str, TensorLocation]
) -> None:
    """target_modules must name at least one module of the base, as peft requires when it loads the adapter.

    peft's rule: a string is a regex matched against the whole module path; a list entry matches a path equal to it
    or ending in "." + it. Module paths are the base's tensor names without their last part.
    """
    modules = {prefix for name in tensors for prefix in _dotted_prefixes(name)}
    check_patterns_in_time(adapter.config, sorted(modules), adapter.path / "adapter_config.json")
    targets = adapter.config.get("target_modules")
    # "all-linear" is expanded by peft to every linear layer; no list (or an empty one) means the adapter is
    # driven by other keys (trainable tokens, modules_to_save), which the tensors check.
    if not targets or targets == "all-linear":
        return
    matched = [module for module in sorted(modules) if _targeted(targets, module)]
    if not matched:
        raise SourceError(
            f"{adapter.path / 'adapter_config.json'}: target_modules {targets!r} match no module of the base model at "
            f"{base.path}, so peft cannot load this adapter; check that base.path is the model it was trained on"
        )
    # peft wraps every module the rule matches, leaf or not, and can wrap only layers with a weight matrix (Linear,
    # Conv1D, Embedding): a decoder block or a norm matched would make the bundle's own load.py fail in separate
    # mode, and means the adapter was not trained on this rule as written.
    excluded = adapter.config.get("exclude_modules")
    unwrappable = [module for module in matched if len(getattr(tensors.get(f"{module}.weight"), "shape", ())) != 2
                   and not (excluded and _targeted(excluded, module))]
    if unwrappable:
        raise SourceError(
            f"{adapter.path / 'adapter_config.json'}: target_modules {targets!r} match "
            f"{', '.join(unwrappable[:3])}{' ...' if len(unwrappable) > 3 else ''}, which peft cannot wrap (only "
            "layers with a weight matrix: Linear, Conv1D, Embedding); name the layers themselves, e.g. q_proj, v_proj"
        )


def _targeted(targets: str | list, module: str) -> bool:
    """peft's rule: a string is a regex matched against the whole module path; a list entry matches a path equal
    to it or ending in "." + it."""
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets if isinstance(t, str))


# How long all of one adapter config's patterns may take to match every module name of the base, as peft matches
# them; real patterns take microseconds per name (a 72B model has about 1,000 modules).
PATTERN_SECONDS = 2.0


def check_patterns_in_time(config: dict, modules: list[str], where: Path) -> None:
    """Every regular expression of an adapter config matched against every module name as peft matches it, within
    PATTERN_SECONDS; a pattern that does not finish is refused (exit 2) before any process starts, since peft and
    transformers would run the same match with Python's `re` in the verification process and in load.py.

    sources.regex_problem already refused the constructs known to backtrack badly; this catches what a static rule
    cannot see. The limit is a SIGALRM timer (Python's `re` checks for signals while it backtracks), so only where
    one can be set: the main thread of a POSIX process.
    """
    patterns = [(f"target_modules {config['target_modules'][:80]!r}", config["target_modules"], re.fullmatch)
                ] if isinstance(config.get("target_modules"), str) else []
    for key in ("rank_pattern", "alpha_pattern"):
        for pattern in config.get(key) or {}:
            patterns.append((f"{key} key {pattern[:80]!r}", rf"(.*\.)?({pattern})$", re.match))
    layers = config.get("layers_pattern")
    for pattern in [layers] if isinstance(layers, str) else layers or []:
        patterns.append((f"layers_pattern {pattern[:80]!r}", rf".*\.{pattern}\.(\d+)\.", re.match))
    for what, pattern, match in patterns:
        try:
            with _time_limit(PATTERN_SECONDS):
                for module in modules:
                    match(pattern, module)
        except _PatternTimeout:
            raise SourceError(
                f"{where}: {what} did not finish matching the base's {len(modules)} module names within "
                f"{PATTERN_SECONDS:g} s (peft and transformers match it the same way); rewrite it as a list of "
                "module names or a simpler pattern"
            ) from None


class _PatternTimeout(Exception):
    pass


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum, frame):
        raise _PatternTimeout

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _dotted_prefixes(name: str) -> list[str]:
    """"model.layers.0.mlp.weight" -> ["model", "model.layers", "model.layers.0", "model.layers.0.mlp"]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _target(target: str, tensors: dict[str, TensorLocation], key: str, base: BaseModelFolder, config: dict) -> str:
    if target not in tensors:
        raise SourceError(
            f"adapter tensor {key!r} targets {target!r}, which the base model at {base.path} does not have. "
            f"Was this adapter trained on another model (it records "
            f"base_model_name_or_path={config.get('base_model_name_or_path')!r})?"
        )
    return target


def with_tied_head(base: BaseModelFolder) -> dict[str, TensorLocation]:
    """The base's tensors plus `lm_head.weight` when the head is tied to (and stored as) the input embedding."""
    tied = tied_embedding_name(base)
    if tied and TIED_HEAD not in base.tensors:
        return {**base.tensors, TIED_HEAD: base.tensors[tied]}
    return dict(base.tensors)


def tied_embedding_name(base: BaseModelFolder) -> str | None:
    """The input embedding the output head shares, when the config ties them (transformers' default)."""
    tied = base.config.get("tie_word_embeddings", base.config.get("text_config", {}).get("tie_word_embeddings"))
    if tied is False:
        return None
    return next((name for name in base.tensors if name.endswith(INPUT_EMBEDDING_SUFFIXES)), None)


def _check_delta_shape(delta: LoraDelta, target: TensorLocation, weights: str) -> None:
    where = f"{weights}: module {delta.module!r}"
    if delta.kind == "bias":
        if tuple(target.shape) != tuple(delta.b.shape):
            raise SourceError(
                f"{where}: lora_B.bias has shape {list(delta.b.shape)}, the base bias {list(target.shape)}"
            )
        return
    assert delta.a is not None  # only a bias delta (handled above) has no lora_A
    a_shape, b_shape = delta.a.shape, delta.b.shape
    if len(a_shape) != 2 or len(b_shape) != 2:
        raise SourceError(
            f"{where}: LoRA weights of shape {list(a_shape)} / {list(b_shape)} belong to a convolution; modelpack "
            "merges Linear, Conv1D and Embedding LoRA only. Use `output.mode: separate`."
        )
    if a_shape[0] != b_shape[1]:
        raise SourceError(f"{where}: lora A {list(a_shape)} and B {list(b_shape)} do not share a rank dimension")
    if a_shape[0] != delta.rank:
        raise SourceError(
            f"{where}: tensors have rank {a_shape[0]} but adapter_config.json gives r={delta.rank} for it "
            "(check r / rank_pattern)"
        )
    natural = (b_shape[0], a_shape[1])  # (out, in) of B @ A
    expected = natural[::-1] if delta.kind == "embedding" or delta.fan_in_fan_out else natural
    if tuple(target.shape) != expected:
        hint = "the adapter was trained on a model with other dimensions"
        if delta.kind == "linear" and tuple(target.shape) == expected[::-1]:
            hint = (
                f"the base stores this layer transposed (a Conv1D, as in GPT-2) but adapter_config.json has "
                f"fan_in_fan_out={delta.fan_in_fan_out}; set it to {not delta.fan_in_fan_out}"
            )
        raise SourceError(
            f"{where}: the LoRA update has shape {list(expected)} but base tensor {target.name!r} has "
            f"{list(target.shape)}; {hint}"
        )
