"""The verification report's types: what the bundle runtime writes, what modelpack adds, and how it is read back.

The report crosses a process boundary (the runtime writes JSON in the verifying interpreter) and a template
boundary (the model card reads it), so its shape is declared once here and validated where it is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config
from rich.table import Table
from typing_extensions import NotRequired, TypedDict

from builder.errors import VerificationError

_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
class RecordedExpectation(TypedDict):
    """The spec's expectation of an answer (spec.Expectation) as the runtime records it beside the answer."""

    contains: list[str]
    not_contains: list[str]
    equals: str | None
    regex: str | None


@with_config(_STRICT)
class GeneratedTokens(TypedDict):
    """A greedy answer as the bundle runtime generated it (bundle_check.GenerationClock): the reference a serving
    engine's answer is compared with, token by token."""

    prompt_ids: list[int]  # the rendered prompt's ids
    ids: list[int]  # the generated ids, the end-of-turn token included when the answer ended on it
    gaps: list[float]  # at each generated position: the largest score minus the second (a log-probability gap)
    max_abs_scores: list[float]  # at each generated position: the largest |score|, which scales the tolerance


@with_config(_STRICT)
class PromptResult(TypedDict):
    prompt: str
    answer: str
    expect: RecordedExpectation
    failures: list[str]
    ok: bool
    # The runtime's generated ids and score gaps: read by the serving stage, left out of verification.json.
    tokens: NotRequired[GeneratedTokens | None]
    base_answer: NotRequired[str]  # with verify.compare_base: the base model's answer to the same prompt
    # with verify.compare_base and several adapters: each adapter's answer alone, at its weight, by its spec key
    adapter_answers: NotRequired[dict[str, str]]


@with_config(_STRICT)
class FilesCheck(TypedDict):
    """Every file of the bundle against manifest.json (trust.Integrity, as the report records it)."""

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
    # Over the verification answers, their prompt processing included (None: no token was generated). Bundles
    # built before 2026-12 timed a 32-token generation of its own and give no counts.
    tokens_per_second: float | None
    generated_tokens: NotRequired[int]
    generation_seconds: NotRequired[float]
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
    seconds: NotRequired[float]  # the equivalence process, start to report
    peak_rss_gb: NotRequired[float | None]  # its peak resident memory: the reference alone, never with the bundle


@with_config(_STRICT)
class EquivalenceReport(Equivalence):
    """What builder/runtime/equivalence.py writes: the comparison, and the reference's own answers, which
    verification.json shows beside the bundle's answer to each prompt instead (verification_report)."""

    base_answers: NotRequired[dict[str, str]]  # with verify.compare_base: prompt -> the base model's answer
    adapter_answers: NotRequired[list[dict[str, str]]]  # several adapters: prompt -> answer, one per adapter


@with_config(_STRICT)
class TokenDifference(TypedDict):
    """Where two token sequences part: the position and each side's token there (None past its end)."""

    position: int
    bundle: str | None
    gguf: str | None


@with_config(_STRICT)
class AnswerParting(TypedDict):
    """Where llama.cpp, fed the bundle's answer, first prefers another token (gguf_check.parting)."""

    position: int
    bundle: str | None  # None with margin None: the parting could not be scored (gguf_check.feed_bundle_answer)
    gguf: str | None
    margin: float | None  # llama.cpp's logit for its own token minus its logit for the bundle's
    tolerance: float | None  # the bundle dtype's: atol + rtol * max|logit| at that position
    near_tie: bool


@with_config(_STRICT)
class GgufAnswer(TypedDict):
    prompt: str
    answer: str  # llama.cpp's greedy answer
    equal: bool  # the same text as the bundle's answer in transformers
    difference: AnswerParting | None  # where the two answers part, in the bundle tokenizer's tokens
    prompt_tokens: int
    prompt_difference: TokenDifference | None  # llama.cpp's ids of its rendered prompt against the bundle's
    failures: list[str]  # the spec's expectations the answer misses
    ok: bool


@with_config(_STRICT)
class GgufBudget(TypedDict):
    """A quantized type's quality budget (export.gguf.budget, resolved per type: gguf_facts.variant_budgets)."""

    max_mean_kld: float
    min_top1: float
    expectations: bool  # the spec's expectations are required of the file's answers


@with_config(_STRICT)
class GgufFile(TypedDict):
    file: str  # relative to the bundle: gguf/NAME-<type>.gguf
    type: str
    exact: bool  # the file holds the bundle's own dtype: every answer must equal the bundle's but at a near tie
    load_seconds: NotRequired[float]  # a run's figure: left out of the bundle's verification.json (bundle_record)
    # llama.cpp's ids for gguf_check.PROBE_TEXT against the bundle tokenizer's (a wrong pre-tokenizer shows here);
    # absent in reports of modelpack versions before the check
    tokenization: NotRequired[TokenDifference | None]
    answers: list[GgufAnswer]  # the verification prompts, then the probes
    # the spec's expectations fail the file (a 16-bit file, or a quantized one whose budget says so); absent before
    expectations_required: NotRequired[bool]
    # the tokenization, every answer and (measured) the budget passed
    ok: bool
    # Read back from the file: its size, 8 * tensor data bytes / weights, type name -> its tensor count and -> its
    # share of the weights, as written (llama.cpp falls back where a row's length is not a multiple of 256). Absent
    # where the verifying interpreter lacks the gguf library, and in reports before modelpack measured them.
    bytes: NotRequired[int]
    bits_per_weight: NotRequired[float]
    tensor_types: NotRequired[dict[str, int]]
    weight_shares: NotRequired[dict[str, float]]
    # A quantized file against the 16-bit GGUF in llama.cpp on the same token stream (gguf_check.measure), where one
    # was at hand: the reference's file name, the positions scored, the mean and 99th percentile of
    # KL(p_16bit || p_variant) of the next-token distributions, the share of positions whose top token agrees, the
    # budget (None: reported, not gated) and whether the figures are within it.
    reference: NotRequired[str]
    tokens: NotRequired[int]
    mean_kld: NotRequired[float]
    p99_kld: NotRequired[float]
    top1: NotRequired[float]
    budget: NotRequired[GgufBudget | None]
    within_budget: NotRequired[bool]


@with_config(_STRICT)
class GgufCheck(TypedDict):
    """builder/runtime/gguf_check.py's report: the bundle's GGUF files answering inside llama.cpp."""

    ok: bool
    runtime: str  # "llama-cpp-python X.Y.Z"
    threads: int
    files: list[GgufFile]


@with_config(_STRICT)
class ServedDivergence(TypedDict):
    """Where a served answer first parts from the bundle's answer in transformers (builder/vllm_stage.py)."""

    part: Literal["prompt", "answer"]  # the server's ids of the rendered prompt, or the generated ids
    position: int
    reference: int | None  # the reference's token id there (None: past its end)
    served: int | None  # the server's (None: past its end)
    gap: float | None  # the reference's top-2 score gap there (None in the prompt: no choice was made)
    tolerance: float | None  # the bundle dtype's: atol + rtol * max|score| at that position
    near_tie: bool  # gap <= tolerance: two runtimes that round differently may part there without either wrong


@with_config(_STRICT)
class ServedAnswer(TypedDict):
    prompt: str
    answer: str  # the served text
    identical: bool  # the same prompt ids and generated ids as the reference
    divergence: ServedDivergence | None
    failures: list[str]  # the spec's expectations the served answer misses
    ok: bool


@with_config(_STRICT)
class ServedRun(TypedDict):
    """One serving engine run of the bundle (verify.serve): every verification prompt and probe, served."""

    engine: str  # "vllm"
    version: str
    mode: Literal["merged", "lora"]
    device: str
    flags: list[str]  # after the bundle folder, as run; the free localhost port left out
    prompts: int  # answers compared: every verification prompt and probe
    identical: int
    first_divergence: ServedDivergence | None  # the first answer's, in prompt order, that is not identical
    answers: list[ServedAnswer]
    # The first prompt asked without a system message, where the chat template carries the system prompt
    # (configs.default_system_template): compared with load.py's answer, which sends it.
    without_system: NotRequired[ServedAnswer]
    ok: bool
    # A run's figures, left out of the bundle's verification.json: until /health answered, and the whole stage
    # (start, answers, stop).
    startup_seconds: NotRequired[float]
    seconds: NotRequired[float]


@with_config(_STRICT)
class Skipped(TypedDict):
    check: str
    reason: str


@with_config(_STRICT)
class _Answers(TypedDict):
    """What every verification report holds: the checks of the bundle's own runtime and its answers."""

    bundle: str
    ok: bool
    integrity: FilesCheck
    prompts: list[PromptResult]
    probes: list[PromptResult]
    environment: dict[str, Any]  # package -> version, and `imports`: import name -> [distribution, version]


@with_config(_STRICT)
class RuntimeReport(_Answers):
    """What the bundle's own `load.py --verify` writes."""

    serving: Serving  # the runtime's serving contract (verification.json's serving_contract)
    runtime: Runtime


@with_config(_STRICT)
class VerificationReport(_Answers):
    """verification.json: the runtime's report plus what modelpack checked around it.

    The bundle's own copy (bundle_record) leaves out `runtime` and every other figure of the run (seconds, speed,
    memory), so that its bytes, and the bundle digest, depend only on the inputs and the software.
    """

    format_version: NotRequired[int]  # BUNDLE_RECORD_VERSION in a bundle's copy; absent in a run's full report
    runtime: NotRequired[Runtime]  # a run's figures: in every run's report, never in the bundle's copy
    digest: str  # the bundle digest (sha256 of manifest.json); the placeholder until the build seals the bundle
    remote_code: dict[str, str]  # model code the bundle runs, name -> sha256
    skipped: list[Skipped]
    equivalence: NotRequired[Equivalence]
    gguf: NotRequired[GgufCheck]  # when the bundle has GGUF files and llama-cpp-python is installed
    # The bundle's serving contract as its runtime checked it (eos ids, chat template, vocabulary).
    serving_contract: Serving
    # verify.serve: one entry per serving engine run (empty when no engine served the bundle).
    serving: list[ServedRun]


# verification.json's format: 3 since `serving` lists the engine runs (the serving contract became
# serving_contract); 2 since its run figures left it (bundles before that carry no format_version).
BUNDLE_RECORD_VERSION = 3
# Figures that change from run to run (timings, speed, memory): a run's report holds them, the bundle's never.
RUN_FIGURES = ("seconds", "peak_rss_gb")

_RUNTIME = TypeAdapter(RuntimeReport)
_EQUIVALENCE = TypeAdapter(EquivalenceReport)
_GGUF = TypeAdapter(GgufCheck)
_SERVED = TypeAdapter(ServedRun)
_REPORT = TypeAdapter(VerificationReport)


def read_runtime_report(data: object, *, python: str) -> RuntimeReport:
    """The runtime's JSON, checked against its declared shape (a bundle runtime of another modelpack version, or a
    changed one, is named instead of failing later on a missing key)."""
    return _validated(_RUNTIME, data, f"the report of load.py --verify (run with {python})")


def read_equivalence(data: object, *, python: str) -> EquivalenceReport:
    return _validated(_EQUIVALENCE, data, f"the report of the equivalence check (run with {python})")


def read_gguf_check(data: object, *, python: str) -> GgufCheck:
    return _validated(_GGUF, data, f"the report of the GGUF check (run with {python})")


def read_served_run(data: object, *, engine: str) -> ServedRun:
    return _validated(_SERVED, data, f"the {engine} serving stage's entry")


def read_verification(data: object) -> VerificationReport:
    """A verification.json, e.g. to show it again or to check a bundle's recorded results."""
    return _validated(_REPORT, data, "verification.json")


def _validated(adapter: TypeAdapter, data: object, what: str) -> Any:
    try:
        return adapter.validate_python(data)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors()[:5])
        raise VerificationError(f"{what} does not have the expected shape: {problems}") from None


def verification_report(runtime: RuntimeReport, *, files: FilesCheck, digest: str, remote_code: dict[str, str],
                        skipped: list[Skipped], gguf: GgufCheck | None,
                        equivalence: EquivalenceReport | None,
                        served: list[ServedRun] | None = None) -> VerificationReport:
    """verification.json, whole, from its parts: the runtime's report with modelpack's own check of the files in
    place of the runtime's, each answer beside the reference's answers to its prompt, the digest it records (the
    bundle's, or the placeholder a build seals later), what was not checked, and `ok` only when every part passed."""
    report: VerificationReport = {
        "bundle": runtime["bundle"],
        "ok": runtime["ok"] and all(part["ok"] for part in (gguf, equivalence, *(served or [])) if part is not None),
        "integrity": files,
        "serving_contract": runtime["serving"],
        "prompts": [_beside_reference(result, equivalence) for result in runtime["prompts"]],
        "probes": [_beside_reference(result, equivalence) for result in runtime["probes"]],
        "environment": runtime["environment"],
        "runtime": runtime["runtime"],
        "digest": digest,
        "remote_code": remote_code,
        "skipped": skipped,
        "serving": served or [],
    }
    if gguf is not None:
        report["gguf"] = gguf
    if equivalence is not None:
        report["equivalence"] = _comparison(equivalence)
    return report


def bundle_record(report: VerificationReport) -> VerificationReport:
    """The bundle's verification.json: the report without the run's figures (`runtime`, the equivalence process's
    seconds and memory, each GGUF file's load time), with its format's version. Two builds of one spec give the same
    bytes; the figures stay in the run's report (build's run file, --json, verify --report)."""
    record: VerificationReport = {"format_version": BUNDLE_RECORD_VERSION,
                                  **{k: v for k, v in report.items() if k != "runtime"}}  # type: ignore[typeddict-item]
    equivalence = report.get("equivalence")
    if equivalence is not None:
        record["equivalence"] = {k: v for k, v in equivalence.items()  # type: ignore[typeddict-item]
                                 if k not in RUN_FIGURES}
    gguf = report.get("gguf")
    if gguf is not None:
        record["gguf"] = {**gguf, "files": [{k: v for k, v in f.items() if k != "load_seconds"}  # type: ignore
                                            for f in gguf["files"]]}
    record["serving"] = [{k: v for k, v in run.items()  # type: ignore[misc]
                          if k not in ("startup_seconds", "seconds")} for run in report["serving"]]
    return record


def _beside_reference(result: PromptResult, equivalence: EquivalenceReport | None) -> PromptResult:
    """A bundle's answer with the reference's answers to the same prompt: the base alone, each adapter alone."""
    prompt = result["prompt"]
    beside = result.copy()
    beside.pop("tokens", None)  # the serving stage's reference, not part of the report
    if equivalence is not None and "base_answers" in equivalence:
        beside["base_answer"] = equivalence["base_answers"][prompt]
    if equivalence is not None and "adapter_answers" in equivalence:  # keyed as the spec and the card name them
        beside["adapter_answers"] = {f"adapters[{i}]": alone[prompt]
                                     for i, alone in enumerate(equivalence["adapter_answers"])}
    return beside


def _comparison(equivalence: EquivalenceReport) -> Equivalence:
    """The equivalence check's comparison alone: its answers are shown beside the bundle's (_beside_reference)."""
    comparison = equivalence.copy()
    comparison.pop("base_answers", None)
    comparison.pop("adapter_answers", None)
    return comparison


EMPTY_EXPECTATION: RecordedExpectation = {"contains": [], "not_contains": [], "equals": None, "regex": None}


def failure_message(report: VerificationReport) -> str | None:
    """One line per failed check: the prompt, the unmet expectation and the answer; None if all passed."""
    lines = [f"integrity: {p}" for p in report["integrity"]["problems"]]
    lines += [f"serving: {p}" for p in report["serving_contract"]["problems"]]
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
    for run in report["serving"]:
        lines += served_problems(run)
    gguf = report.get("gguf")
    if gguf:
        bundle_answers = {r["prompt"]: r["answer"] for r in report["prompts"] + report["probes"]}
        for file in gguf["files"]:
            if (tokens := file.get("tokenization")) is not None:
                lines.append(f"gguf: {file['file']}: llama.cpp's tokens of the probe text differ from the bundle "
                             f"tokenizer's from token {tokens['position']} ({tokens['gguf']!r} instead of "
                             f"{tokens['bundle']!r}): the file's vocabulary or pre-tokenizer is not the bundle's")
            for answer in file["answers"]:
                lines += gguf_problems(file, answer, bundle_answers.get(answer["prompt"], ""))
            if not file.get("within_budget", True) and (budget := file.get("budget")) is not None:
                lines.append(f"gguf: {file['file']}: over its quality budget against {file.get('reference')}: mean "
                             f"KL divergence {file.get('mean_kld', 0):.4g} (budget {budget['max_mean_kld']:.4g}), "
                             f"top token agreeing at {100 * file.get('top1', 0):.1f}% of {file.get('tokens', 0)} "
                             f"positions (budget {100 * budget['min_top1']:.1f}%); raise export.gguf.budget (or its "
                             f"types.{file['type']}) or drop the type")
    return "verification failed:\n  " + "\n  ".join(lines) if lines else None


def skipped_failure(report: VerificationReport) -> str | None:
    """--strict: the checks that did not run, each with its reason, as a verification failure; None if all ran."""
    if not report["skipped"]:
        return None
    return "verification failed (--strict: every check must run):\n  " + "\n  ".join(
        f"{s['check']} did not run: {s['reason']}" for s in report["skipped"])


def not_run(report: VerificationReport | None) -> list[str]:
    """The checks that did not run, in the report's order; every check when there was no verification."""
    return ["verification"] if report is None else [s["check"] for s in report["skipped"]]


def served_problems(run: ServedRun) -> list[str]:
    """One sentence per served answer that failed: a divergence from the reference beyond a near tie, the spec's
    expectations."""
    problems = []
    without_system = [run["without_system"]] if "without_system" in run else []
    for number, answer in enumerate(run["answers"] + without_system):
        where = f"{run['engine']}: prompt {answer['prompt']!r}"
        if number == len(run["answers"]):
            where += " without a system message (the chat template's default)"
        part = answer["divergence"]
        if part is not None and not part["near_tie"]:
            problems.append(f"{where}: {served_parting(part)}; served answer {answer['answer']!r}")
        if answer["failures"]:
            problems.append(f"{where}: expected {', '.join(answer['failures'])}; {run['engine']} answered "
                            f"{answer['answer']!r}")
    return problems


def served_parting(part: ServedDivergence) -> str:
    """Where a served answer parts from the reference, in words."""
    if part["part"] == "prompt":
        return (f"the server's ids of the rendered prompt differ from the reference's from token {part['position']} "
                f"(id {part['served']} instead of {part['reference']}): it rendered another prompt")
    where = f"the served answer parts from the reference at token {part['position']} (id {part['served']} instead " \
            f"of {part['reference']})"
    if part["gap"] is None:
        return f"{where}, past the reference's last scored position"
    tie = "a near tie" if part["near_tie"] else "beyond the tolerance"
    return f"{where}, where the reference's top-2 gap is {part['gap']:.3g} ({tie}: tolerance {part['tolerance']:.3g})"


def served_summary(run: ServedRun) -> str:
    """The engine line of the card and the terminal: "served in vLLM 0.32.0 on CPU: 5/5 answers token-identical"."""
    engine = {"vllm": "vLLM"}.get(run["engine"], run["engine"])
    line = (f"served in {engine} {run['version']} on {run['device'].upper()}: {run['identical']}/{run['prompts']} "
            "answers token-identical")
    ties = sum(1 for a in run["answers"] if a["divergence"] is not None and a["divergence"]["near_tie"])
    if ties:
        line += f", {ties} parting at a near tie"
    if "without_system" in run:
        same = "the same" if run["without_system"]["identical"] else "NOT the same"
        line += f"; a request without a system message answers {same} as with the default one"
    return line


def gguf_problems(file: GgufFile, answer: GgufAnswer, bundle_answer: str) -> list[str]:
    """One sentence per way a GGUF's answer failed: its prompt's tokens, an answer that must equal the bundle's,
    the spec's expectations."""
    problems = []
    where = f"gguf: {file['file']}: prompt {answer['prompt']!r}"
    tokens = answer["prompt_difference"]
    if tokens is not None:
        problems.append(f"{where}: llama.cpp's tokens of the rendered prompt differ from the bundle tokenizer's from "
                        f"token {tokens['position']} ({tokens['gguf']!r} instead of {tokens['bundle']!r}): the file's "
                        "vocabulary, pre-tokenizer or chat template is not the bundle's")
    part = answer["difference"]
    if file["exact"] and not answer["equal"] and part is not None and not part["near_tie"]:
        problems.append(f"{where}: llama.cpp answered {answer['answer']!r} where the bundle answered "
                        f"{bundle_answer!r}, preferring {part['gguf']!r} to the bundle's {part['bundle']!r} at token "
                        f"{part['position']} by {part['margin']:.3g} (tolerance {part['tolerance']:.3g}); a "
                        f"{file['type']} file holds the bundle's own weights and must answer the same")
    if answer["failures"] and file.get("expectations_required", True):
        problems.append(f"{where}: expected {', '.join(answer['failures'])}; llama.cpp answered {answer['answer']!r}")
    return problems


def gguf_equal_answers(file: GgufFile) -> int:
    """How many of a GGUF's answers equal the bundle's (required of a file in the bundle's dtype, `exact`)."""
    return sum(a["equal"] for a in file["answers"])


def gguf_prompt_tokens(file: GgufFile) -> str:
    """equal: llama.cpp tokenized every rendered prompt as the bundle's tokenizer does; else DIFFERENT."""
    return "equal" if all(a["prompt_difference"] is None for a in file["answers"]) else "DIFFERENT"


def gguf_expectations(file: GgufFile) -> str:
    """met: every answer of the file met the spec's expectations; else MISSED where they are required of it, and
    "missed (reported)" where not (a quantized file whose budget does not require them)."""
    if not any(a["failures"] for a in file["answers"]):
        return "met"
    return "MISSED" if file.get("expectations_required", True) else "missed (reported, not required)"


def gguf_summary(file: GgufFile) -> str:
    """One line for a GGUF file: answers equal to the bundle's, what that means for its type, the prompt tokens."""
    rule = ("required but at near ties: the bundle's own dtype" if file["exact"]
            else f"reported, not required: {file['type']} rounds the bundle's weights")
    return (f"{gguf_equal_answers(file)} of {len(file['answers'])} answers equal to the bundle's ({rule}); prompt "
            f"tokens {gguf_prompt_tokens(file)}; expectations {gguf_expectations(file)}")


def gguf_parting(part: AnswerParting) -> str:
    """Where a GGUF's answer parts from the bundle's, in words."""
    if part["margin"] is None:
        return (f"from token {part['position']} (not scored: past a character the bundle's answer splits between "
                "tokens, or where llama.cpp, fed the bundle's tokens, agrees with them)")
    tie = "a near tie" if part["near_tie"] else "beyond the tolerance"
    return (f"from token {part['position']}: {part['gguf']!r} instead of {part['bundle']!r}, by {part['margin']:.3g} "
            f"({tie}: tolerance {part['tolerance']:.3g})")


def answer_speed(runtime: Runtime) -> str:
    """The decoding speed as the report line gives it: over the answers where the runtime counted them."""
    if "generated_tokens" not in runtime:
        return f"{runtime['tokens_per_second']} tokens/s"
    return (f"answered {runtime['generated_tokens']} tokens in {runtime['generation_seconds']}s "
            f"({runtime['tokens_per_second']} tokens/s, prompts included)")


def report_table(report: VerificationReport) -> Table:
    """The terminal summary of a verification report: one row per check and per prompt."""
    table = Table(title=f"verification of {report['bundle']}: {report_verdict(report)}")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    integrity = report["integrity"]
    table.add_row("integrity", check_verdict(integrity["ok"]), f"{integrity['files']} files against manifest.json")
    for name, digest in report["remote_code"].items():
        table.add_row("model code", "runs", f"{name} sha256:{digest[:16]}…")
    serving = report["serving_contract"]
    table.add_row("serving", check_verdict(serving["ok"]),
                  "; ".join(serving["problems"]) or "eos ids, chat template, vocabulary")
    for warning in serving["warnings"]:
        table.add_row("serving", "warning", warning)
    equivalence = report.get("equivalence")
    if equivalence:
        table.add_row(
            "equivalence", check_verdict(equivalence["ok"]),
            f"max |delta logit| {equivalence['max_abs_logit_diff']:.3g} over {equivalence['positions']} positions, "
            f"greedy agreement {equivalence['greedy_agreement']:.1%} ({equivalence['dtype']}; {equivalence['rule']})",
        )
    gguf = report.get("gguf")
    for file in gguf["files"] if gguf else []:
        table.add_row(f"gguf {file['type']}", check_verdict(file["ok"]),
                      f"{file['file']} in llama.cpp: {gguf_summary(file)}")
        for answer in file["answers"]:
            part = answer["difference"]
            if part is not None:
                table.add_row(f"gguf {file['type']}", "differs",
                              f"{answer['prompt'][:40]} -> {answer['answer'][:60]}  ({gguf_parting(part)})")
    if gguf:
        table.add_row("gguf", "",
                      f"{gguf['runtime']}, {gguf['threads']} threads, greedy, each file's own chat template")
    for run in report["serving"]:
        table.add_row(f"served {run['engine']}", check_verdict(run["ok"]),
                      f"{served_summary(run)} ({run['mode']}; {' '.join(run['flags'])})")
        for served in run["answers"]:
            if served["divergence"] is not None:
                table.add_row(f"served {run['engine']}", "differs",
                              f"{served['prompt'][:40]} -> {served['answer'][:60]}  "
                              f"({served_parting(served['divergence'])})")
    runtime = report.get("runtime")
    if runtime is not None:  # a bundle's verification.json holds no run figures (bundle_record)
        spread = ", ".join(f"{device}: {count / 1e6:.1f}M"
                           for device, count in runtime["placement"]["parameters"].items())
        table.add_row("runtime", "",
                      f"loaded in {runtime['load_seconds']}s, {answer_speed(runtime)}; parameters on {spread}")
    for skipped in report["skipped"]:
        table.add_row(skipped["check"], "skipped", skipped["reason"])
    for kind, results in (("prompt", report["prompts"]), ("probe", report["probes"])):
        for result in results:
            detail = f"{result['prompt'][:40]} -> {result['answer'][:60]}"
            if "base_answer" in result:
                detail += f"  (base: {result['base_answer'][:40]})"
            for key, alone in result.get("adapter_answers", {}).items():
                detail += f"  ({key} alone: {alone[:40]})"
            checked = expectations_checked(result, probe=kind == "probe")
            verdict = check_verdict(result["ok"]) if checked else "recorded"
            table.add_row(kind, verdict, detail + ("" if result["ok"] else f"  [{'; '.join(result['failures'])}]"))
    return table


def report_verdict(report: VerificationReport) -> str:
    """The whole verification's verdict, as the terminal and the card show it."""
    return "passed" if report["ok"] else "FAILED"


def check_verdict(ok: bool) -> str:
    """One check's verdict, as the terminal and the card show it."""
    return "ok" if ok else "FAILED"


def expectations_checked(result: PromptResult, *, probe: bool) -> bool:
    """A prompt's answer is always checked; a probe's only against expectations the spec gave it, else it is
    recorded (a general-skill probe shows what the model does, and nothing is required of it)."""
    return not probe or result["expect"] != EMPTY_EXPECTATION


def answer_verdict(result: PromptResult, *, probe: bool) -> str:
    """An answer's verdict against its expectations: ok, FAILED: the unmet ones, or recorded (expectations_checked)."""
    if not expectations_checked(result, probe=probe):
        return "recorded"
    return "ok" if result["ok"] else "FAILED: " + "; ".join(result["failures"])
