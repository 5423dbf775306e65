"""Memory a deployment needs, from config.json alone: context length and KV cache, per token and at that length."""

from __future__ import annotations

from dataclasses import dataclass

# config.json keys under which model families record how many positions they handle (refusals reads the same).
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "seq_length", "max_sequence_length")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HEAD_KEYS = ("num_attention_heads", "n_head")
HIDDEN_KEYS = ("hidden_size", "n_embd")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _first_int(config: dict, keys: tuple[str, ...]) -> int | None:
    return next((config[k] for k in keys if type(config.get(k)) is int), None)


@dataclass(frozen=True)
class KvCache:
    """The attention cache of one sequence, in elements per token (keys and values of every layer)."""

    context_length: int | None  # the positions the model handles, prompt and answer together
    elements_per_token: int | None  # None when config.json does not say the layers, heads and head size
    approximations: tuple[str, ...]  # sentences: where the figures are bounds rather than exact

    def bytes_per_token(self, itemsize: float) -> float | None:
        return None if self.elements_per_token is None else self.elements_per_token * itemsize

    def bytes_at_context(self, itemsize: float) -> float | None:
        per_token = self.bytes_per_token(itemsize)
        return None if per_token is None or self.context_length is None else per_token * self.context_length


def kv_cache(config: dict) -> KvCache:
    """2 (keys and values) x layers x KV heads x head size elements per token, from config.json: grouped-query
    attention's num_key_value_heads, head_dim or kv_channels where given, else hidden size / heads."""
    layers, heads, hidden = (_first_int(config, keys) for keys in (LAYER_KEYS, HEAD_KEYS, HIDDEN_KEYS))
    kv_heads = _first_int(config, ("num_key_value_heads", "multi_query_group_num")) or heads
    head_dim = _first_int(config, ("head_dim", "kv_channels")) or (hidden // heads if hidden and heads else None)
    elements = 2 * layers * kv_heads * head_dim if layers and kv_heads and head_dim else None
    approximations = []
    window = config.get("sliding_window")
    if type(window) is int and config.get("use_sliding_window", True):
        approximations.append(f"layers with sliding-window attention keep at most {window} tokens, so the cache at "
                              "the full context is an upper bound")
    experts = _first_int(config, EXPERT_KEYS)
    if experts:
        approximations.append(f"a mixture of {experts} experts: every expert's weights are counted (each token uses a "
                              "few, but all must be in memory)")
    if type(config.get("kv_lora_rank")) is int:
        approximations.append("latent (MLA) attention caches a compressed vector per token: the figure counts full "
                              "keys and values, an upper bound")
    return KvCache(_first_int(config, CONTEXT_KEYS), elements, tuple(approximations))
