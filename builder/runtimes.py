"""What the deployment runtimes accept, as data: facts the plan warns about and the serving text relies on."""

from __future__ import annotations

from builder.runtime.bundle_check import VLLM_MAX_LORA_RANK, vllm_lora_warnings

# The LoRA ranks vLLM's --max-lora-rank accepts (vllm/config: possible_max_ranks; recent versions add 1, which
# older ones refuse, so an adapter of rank 1 gets 8, accepted by every version). The largest is the bundle
# runtime's own limit, so the bundle's check and modelpack's plan cannot disagree.
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, VLLM_MAX_LORA_RANK)


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM accepts that holds `rank`; None above the largest (512)."""
    return next((accepted for accepted in VLLM_MAX_LORA_RANKS if accepted >= rank), None)


def vllm_lora_refusals(config: dict, *, tied_head: bool) -> list[str]:
    """Why vLLM cannot serve an adapter config as a LoRA, in vLLM's own terms; empty when it can. The bundle's runtime
    warns of the same rules (bundle_check.vllm_lora_warnings); tied_head: the base ties lm_head to the input
    embeddings, which vLLM shares, so a LoRA on lm_head would change both."""
    rules = [warning.removeprefix("vLLM: ") for warning in vllm_lora_warnings(config)]
    targets = config.get("target_modules") or []
    if tied_head and ("lm_head" in targets if isinstance(targets, list) else "lm_head" in str(targets)):
        rules.append("LoRA on lm_head, which this base ties to the input embeddings: vLLM's LoRA support does not "
                     "apply it to a tied head")
    return rules
