"""The verification report's types: what the bundle runtime writes, what modelpack adds, and how it is read back.

The report crosses a process boundary (the runtime writes JSON in the verifying interpreter) and a template
boundary (the model card reads it), so its shape is declared once here and validated where it is read.
"""

from __future__ import annotations

from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from rich.table import Table
from typing_extensions import NotRequired, TypedDict

from builder.errors import VerificationError

_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class Expectation(TypedDict):
    contains: list[str]
    not_contains: list[str]
    equals: str | None
    regex: str | None


@with_config(_STRICT)
class PromptResult(TypedDict):
    prompt: str
    answer: str
    expect: Expectation
    failures: list[str]
    ok: bool
    base_answer: NotRequired[str]  # with verify.compare_base: the base model's answer to the same prompt


@with_config(_STRICT)
class Integrity(TypedDict):
    ok: bool
    files: int | None  # None when the runtime was told the files were already checked
    problems: list[str]
    checked_by: NotRequired[str]  # "modelpack X.Y.Z" when modelpack checked them in its own process


@with_config(_STRICT)
class Serving(TypedDict):
    ok: bool
    problems: list[str]
    warnings: list[str]


@with_config(_STRICT)
class Placement(TypedDict):
    parameters: dict[str, int]
    gpu_peak_gb: NotRequired[dict[str, float]]


@with_config(_STRICT)
class Runtime(TypedDict):
    load_seconds: float
    tokens_per_second: float
    placement: Placement
    peak_rss_gb: NotRequired[float | None]  # the verifying process's peak resident memory (None: not on this OS)


@with_config(_STRICT)
class EquivalencePrompt(TypedDict):
    prompt: str
    max_abs_logit_diff: float
    tolerance: float
    positions: int
    greedy_disagreements: int
    ok: bool


@with_config(_STRICT)
class Equivalence(TypedDict):
    ok: bool
    dtype: str
    rule: str
    max_abs_logit_diff: float
    positions: int
    greedy_agreement: float
    significant_disagreements: int
    prompts: list[EquivalencePrompt]
    reference: str
    base_answers: NotRequired[dict[str, str]]  # moved onto each PromptResult when modelpack reads it
    seconds: NotRequired[float]  # the equivalence process, start to report
    peak_rss_gb: NotRequired[float | None]  # its peak resident memory: the reference alone, never with the bundle


@with_config(_STRICT)
class Skipped(TypedDict):
    check: str
    reason: str


@with_config(_STRICT)
class RuntimeReport(TypedDict):
    """What the bundle's own `load.py --verify` writes."""

    bundle: str
    ok: bool
    integrity: Integrity
    serving: Serving
    prompts: list[PromptResult]
    probes: list[PromptResult]
    environment: dict[str, Any]  # package -> version, and `imports`: import name -> [distribution, version]
    runtime: Runtime


@with_config(_STRICT)
class VerificationReport(RuntimeReport):
    """verification.json: the runtime's report plus what modelpack checked around it."""

    digest: str  # the bundle digest (sha256 of manifest.json); the placeholder until the build seals the bundle
    remote_code: dict[str, str]  # model code the bundle runs, name -> sha256
    skipped: list[Skipped]
    equivalence: NotRequired[Equivalence]


_RUNTIME = TypeAdapter(RuntimeReport)
_EQUIVALENCE = TypeAdapter(Equivalence)
_REPORT = TypeAdapter(VerificationReport)


def read_runtime_report(data: object, *, python: str) -> RuntimeReport:
    """The runtime's JSON, checked against its declared shape (a bundle runtime of another modelpack version, or a
    changed one, is named instead of failing later on a missing key)."""
    return _validated(_RUNTIME, data, f"the report of load.py --verify (run with {python})")


def read_equivalence(data: object, *, python: str) -> Equivalence:
    return _validated(_EQUIVALENCE, data, f"the report of the equivalence check (run with {python})")


def read_verification(data: object) -> VerificationReport:
    """A verification.json, e.g. to show it again or to check a bundle's recorded results."""
    return _validated(_REPORT, data, "verification.json")


def _validated(adapter: TypeAdapter, data: object, what: str) -> Any:
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise VerificationError(f"{what} does not have the expected shape: {problems}") from None


EMPTY_EXPECTATION: Expectation = {"contains": [], "not_contains": [], "equals": None, "regex": None}


def failure_message(report: VerificationReport) -> str | None:
    """One line per failed check: the prompt, the unmet expectation and the answer; None if all passed."""
    lines = [f"integrity: {p}" for p in report["integrity"]["problems"]]
    lines += [f"serving: {p}" for p in report["serving"]["problems"]]
    for result in report["prompts"] + report["probes"]:
        if not result["ok"]:
            lines.append(
                f"prompt {result['prompt']!r}: expected {', '.join(result['failures'])}; answered {result['answer']!r}"
            )
    equivalence = report.get("equivalence")
    if equivalence and not equivalence["ok"]:
        for compared in equivalence["prompts"]:
            if not compared["ok"]:
                lines.append(
                    f"equivalence: prompt {compared['prompt']!r}: max |delta logit| "
                    f"{compared['max_abs_logit_diff']:.4g} vs tolerance {compared['tolerance']:.4g}, "
                    f"{compared['greedy_disagreements']} greedy tokens differ from {equivalence['reference']}"
                )
    return "verification failed:\n  " + "\n  ".join(lines) if lines else None


def report_table(report: VerificationReport) -> Table:
    """The terminal summary of a verification report: one row per check and per prompt."""
    table = Table(title=f"verification of {report['bundle']}: {'passed' if report['ok'] else 'FAILED'}")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    integrity = report["integrity"]
    table.add_row("integrity", _verdict(integrity["ok"]), f"{integrity['files']} files against manifest.json")
    for name, digest in report["remote_code"].items():
        table.add_row("model code", "runs", f"{name} sha256:{digest[:16]}…")
    serving = report["serving"]
    table.add_row("serving", _verdict(serving["ok"]),
                  "; ".join(serving["problems"]) or "eos ids, chat template, vocabulary")
    for warning in serving["warnings"]:
        table.add_row("serving", "warning", warning)
    equivalence = report.get("equivalence")
    if equivalence:
        table.add_row(
            "equivalence", _verdict(equivalence["ok"]),
            f"max |delta logit| {equivalence['max_abs_logit_diff']:.3g} over {equivalence['positions']} positions, "
            f"greedy agreement {equivalence['greedy_agreement']:.1%} ({equivalence['dtype']}; {equivalence['rule']})",
        )
    runtime = report["runtime"]
    spread = ", ".join(f"{device}: {count / 1e6:.1f}M" for device, count in runtime["placement"]["parameters"].items())
    table.add_row("runtime", "", f"loaded in {runtime['load_seconds']}s, {runtime['tokens_per_second']} tokens/s; "
                  f"parameters on {spread}")
    for skipped in report["skipped"]:
        table.add_row(skipped["check"], "skipped", skipped["reason"])
    for kind, results in (("prompt", report["prompts"]), ("probe", report["probes"])):
        for result in results:
            detail = f"{result['prompt'][:40]} -> {result['answer'][:60]}"
            if "base_answer" in result:
                detail += f"  (base: {result['base_answer'][:40]})"
            checked = kind == "prompt" or result["expect"] != EMPTY_EXPECTATION
            verdict = _verdict(result["ok"]) if checked else "recorded"
            table.add_row(kind, verdict, detail + ("" if result["ok"] else f"  [{'; '.join(result['failures'])}]"))
    return table


def _verdict(ok: bool) -> str:
    return "ok" if ok else "FAILED"
