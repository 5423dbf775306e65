"""What verification will load and generate, counted from the spec or the bundle's facts before anything loads."""

from __future__ import annotations

from dataclasses import dataclass

from builder.formatting import describe_bytes


@dataclass(frozen=True)
class VerificationCost:
    """What verification will run, counted from the spec (or the bundle's facts) before anything loads.

    Each model load is a process of its own, run one after the other, so one model is in memory at a time: the
    bundle (answers, timed for its speed; serving checks; its logits over its answers when the equivalence check
    follows), then the reference the equivalence check compares those logits with.
    """

    loads: tuple[str, ...]
    answers: int  # prompts + probes
    max_new_tokens: int
    compare_base: bool  # the base answers too (in the equivalence step)
    adapters_alone: int  # with compare_base and several adapters: each adapter answers alone too (same step)
    kept_logits_bytes: int | None  # the bundle's logits over its answers, on disk between the two steps

    @property
    def generated_tokens(self) -> int:
        """An upper bound: an answer ends early at the end-of-turn token."""
        passes = 1 + self.compare_base + self.adapters_alone
        return self.answers * self.max_new_tokens * passes

    def describe(self) -> str:
        loads = len(self.loads)
        parts = [f"{self.answers} answers x {self.max_new_tokens} by the bundle"]
        if self.compare_base:
            parts.append(f"{self.answers} x {self.max_new_tokens} by the base alone")
        if self.adapters_alone:
            parts.append(f"{self.answers} x {self.max_new_tokens} by each of the {self.adapters_alone} adapters alone")
        text = (f"verification: {loads} model load{'s' * (loads > 1)}, one model in memory at a time "
                f"({'; '.join(self.loads)}); up to {self.generated_tokens} generated tokens ({', '.join(parts)})")
        if loads > 1:
            kept = f", up to {describe_bytes(self.kept_logits_bytes)} of logits kept on disk between them" \
                if self.kept_logits_bytes is not None else ""
            text += f"; {self.answers} answers scored by both models{kept}"
        return text


def verification_cost(*, mode: str, answers: int, max_new_tokens: int, compare_base: bool, equivalence: bool,
                      vocab_rows: int | None, logits_itemsize: int, adapters: int = 1) -> VerificationCost:
    """The loads and tokens of verify_bundle, from what the spec asks.

    With several adapters the reference is always the source base with every adapter in peft (also in separate
    mode: the bundle's adapter is their concatenation), and compare_base has each adapter answer alone as well.

    The kept logits are one row per position that predicts an answer token (the prompt's last token and up to
    max_new_tokens answer tokens), over the whole vocabulary, in the model's dtype.
    """
    loads = ["the bundle (its own load.py --verify)"]
    alone = adapters if compare_base and equivalence and adapters > 1 else 0
    if equivalence:
        base = ", the base answers" if compare_base else ""
        each = ", each adapter's answers alone" if alone else ""
        loads.append(f"base + {adapters} adapters through peft (the unmerged reference{base}{each})" if adapters > 1
                     else f"base + adapter through peft (the unmerged reference{base})" if mode == "merge"
                     else f"the bundle again, merged in memory after scoring (the reference{base})")
    kept = answers * (max_new_tokens + 1) * vocab_rows * logits_itemsize if equivalence and vocab_rows else None
    return VerificationCost(loads=tuple(loads), answers=answers, max_new_tokens=max_new_tokens,
                            compare_base=compare_base and equivalence, adapters_alone=alone, kept_logits_bytes=kept)
