"""What the deployment runtimes accept, as data: facts the plan warns about and the serving text relies on."""

from __future__ import annotations

from builder.runtime.bundle_check import VLLM_MAX_LORA_RANK

# The LoRA ranks vLLM's --max-lora-rank accepts (vllm/config: possible_max_ranks; recent versions add 1, which
# older ones refuse, so an adapter of rank 1 gets 8, accepted by every version). The largest is the bundle
# runtime's own limit, so the bundle's check and modelpack's plan cannot disagree.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, VLLM_MAX_LORA_RANK)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`; None above the largest (512)."""
    return next((accepted for accepted in VLLM_MAX_LORA_RANKS if accepted >= rank), None)
