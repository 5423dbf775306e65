"""The model card (README.md): its rows and sentences, built from the bundle's facts and verification report, which
templates/README.md.jinja only prints.

Every verdict (passed, ok, FAILED, met, recorded, ...) comes from report.py, where the terminal's table gets it too;
this module only lays the report out as the card shows it.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub import ModelCardData
from packaging.version import Version

from builder.dtypes import BY_NAME
from builder.formatting import describe_bytes
from builder.render import AdapterCardView, RenderContext, card_tags, render_template
from builder.report import (
    AnswerParting,
    Equivalence,
    GgufCheck,
    GgufFile,
    PromptResult,
    Skipped,
    VerificationReport,
    answer_verdict,
    check_verdict,
    gguf_equal_answers,
    gguf_expectations,
    gguf_prompt_tokens,
    report_verdict,
    served_summary,
)
from builder.serving import OllamaTemplate, ServingCommand
from builder.trust import DIGEST_PLACEHOLDER


@dataclass(frozen=True)
class ServingSection:
    """One runtime's part of the card's Serving section."""

    runtime: str
    command: str | None  # None when the runtime cannot serve the bundle (its notes say why)
    ollama_format: str | None  # Ollama with a Modelfile TEMPLATE: the prompt format it was translated from
    notes: list[str]
    port: int | None
    model: str | None  # the `model` requests name
    health: str | None
    request: str | None
    # What verification saw when it served the bundle in this runtime (verify.serve), or why it did not.
    verified: list[str]


@dataclass(frozen=True)
class MemoryRow:
    """One way to run the bundle: its weights and the attention cache, as the card's Memory table prints them."""

    variant: str
    weights: str
    kv_per_token: str
    kv_at_context: str
    total_at_context: str


@dataclass(frozen=True)
class MemorySection:
    context_length: int | None
    rows: list[MemoryRow]
    approximations: list[str]


@dataclass(frozen=True)
class EquivalenceLine:
    """The equivalence check in the card's words, its numbers as printed."""

    reference: str
    max_abs_logit_diff: str
    positions: int
    greedy_agreement: str  # a percentage
    dtype: str
    rule: str


@dataclass(frozen=True)
class GgufRow:
    file: str
    verdict: str
    equal_answers: str  # "4 of 5 (required)": required of a file in the bundle's own dtype, else reported
    prompt_tokens: str
    expectations: str


@dataclass(frozen=True)
class PartingScore:
    """How much llama.cpp preferred its own token where a GGUF's answer parts from the bundle's."""

    gguf: str  # the token, quoted
    bundle: str
    margin: str
    tolerance: str


@dataclass(frozen=True)
class GgufParting:
    """A GGUF file's answer that parts from the bundle's, and where."""

    file: str
    prompt: str
    answer: str
    position: int
    score: PartingScore | None  # None where the parting cannot be scored


@dataclass(frozen=True)
class GgufVariantRow:
    """A GGUF file as written (read back from it) and, when quantized, its quality against the 16-bit GGUF."""

    file: str
    size: str  # "12.3 MB"
    bits_per_weight: str
    tensor_types: str  # "Q6_K 71% (12 tensors), Q8_0 ..."
    mean_kld: str  # "" where not measured
    p99_kld: str
    top1: str  # "93.1%"
    tokens: str
    budget: str  # "mean KLD <= 0.02, top-1 >= 0.0%", or "reported, not gated"
    expectations: str  # gguf_expectations, with "(required)" where they fail the file
    verdict: str  # within its budget; "" where not measured


@dataclass(frozen=True)
class GgufSection:
    runtime: str
    threads: int
    files: list[GgufRow]
    partings: list[GgufParting]
    variants: list[GgufVariantRow]
    reference: str | None  # the 16-bit GGUF the quantized files were measured against
    reference_made: bool  # made from the bundle's weights for the measurement, not one of its files
    few_positions: int | None  # the fewest positions a variant was scored on, when under FEW_POSITIONS


@dataclass(frozen=True)
class AnswerRow:
    """One prompt or probe as the card's answer tables show it."""

    kind: str  # prompt | probe
    prompt: str
    answer: str
    base_answer: str | None  # with verify.compare_base
    alone: list[str]  # several adapters: each one's answer alone, in the spec's order
    expectations: str  # report.answer_verdict


@dataclass(frozen=True)
class CompositionTable:
    """Several adapters: every prompt and probe answered by the base, each adapter alone, and the bundle."""

    columns: list[str]  # one heading per adapter
    rows: list[AnswerRow]


@dataclass(frozen=True)
class AnswerTables:
    """One adapter: the prompts' answers and verdicts, then the probes' answers."""

    with_base: bool  # a column of the base model's answers
    prompts: list[AnswerRow]
    probes: list[AnswerRow]


@dataclass(frozen=True)
class VerificationSection:
    transformers: str
    torch: str
    verdict: str
    files_listed: int  # every file manifest.json lists, as `modelpack inspect` counts them
    equivalence: EquivalenceLine | None
    gguf: GgufSection | None
    skipped: list[Skipped]
    # Exactly one of the two answer layouts.
    composition: CompositionTable | None
    answers: AnswerTables | None
    serving_problems: list[str]
    serving_warnings: list[str]


@dataclass(frozen=True)
class CardContext:
    """Everything templates/README.md.jinja prints: text, rows to loop over, and flags to test, nothing to compute."""

    front_matter: str
    name: str
    description: str
    separate: bool  # the adapter is kept beside the base weights, else merged into them
    dtype: str
    dtype_keyword: str  # from_pretrained's dtype argument in the transformers the bundle was verified with
    weight_files: str  # "2 safetensors files"
    weight_size: str
    modelpack_version: str
    trust_remote_code: bool
    remote_code_files: str
    intended_use: str | None
    loader_packages: str
    memory: MemorySection
    serving: list[ServingSection]
    ollama_notes: list[str]
    without_chat_template: bool
    chat_format: str | None  # generation_config.json's, for a model without a chat template
    eos_token_id: str | None  # likewise
    adapter: AdapterCardView
    adapters: list[AdapterCardView]  # several composed adapters, else empty (the card shows `adapter`)
    composed_rank: int | None
    generation_defaults: str
    system_prompt: str | None
    system_prompt_note: str | None  # who applies it when a request sends no system message
    verification: VerificationSection | None  # None: built with --no-verify
    digest: str
    limitations: str


# transformers renamed from_pretrained's torch_dtype= to dtype= in 4.56 (torch_dtype= warns in 5).
DTYPE_KEYWORD_SINCE = Version("4.56")


def render_card(context: RenderContext, *, verification: VerificationReport | None, files_listed: int,
                gguf_bytes: dict[str, int] | None = None, system_prompt_in_template: bool = False) -> str:
    """README.md, the model card: what the bundle is, how to load, size and serve it, its adapters, what verification
    found, and how to receive it. files_listed: how many files the final manifest lists; gguf_bytes: the size of each
    GGUF file (its name in gguf/); system_prompt_in_template: the chat template carries the system prompt
    (configs.default_system_template)."""
    return render_template("README.md.jinja", card_context(context, verification=verification,
                                                           files_listed=files_listed, gguf_bytes=gguf_bytes,
                                                           system_prompt_in_template=system_prompt_in_template))


def system_prompt_note(context: RenderContext, in_template: bool) -> str | None:
    """Whether a server's client that sends no system message gets the system prompt: the chat template applies it,
    or (a template without a system role) the client must send it."""
    if not context.system_prompt or not context.has_chat_template:
        return None
    if in_template:
        return ("the chat template applies it to a conversation that does not open with a system message, so a "
                "request without one gets the answer `load.py` gives in every server (vLLM, SGLang, llama-server)")
    return ("the chat template has no system role that can carry it: clients of vLLM, SGLang and llama-server must "
            "send it as the first message themselves (`load.py` and the Modelfile add it)")


def dtype_keyword(transformers_version: str) -> str:
    """`dtype` from transformers 4.56 on, `torch_dtype` before (a Qwen v1 bundle verified on 4.49)."""
    return "dtype" if Version(transformers_version) >= DTYPE_KEYWORD_SINCE else "torch_dtype"


def card_context(context: RenderContext, *, verification: VerificationReport | None,
                 files_listed: int, gguf_bytes: dict[str, int] | None = None,
                 system_prompt_in_template: bool = False) -> CardContext:
    """The card's rows and sentences: the bundle's facts and, when it was verified, what verification found."""
    card = context.card
    generation = context.generation
    weight_files = len(context.weight_files)
    return CardContext(
        front_matter=front_matter(context),
        name=context.name,
        description=card["description"] or f"A fine-tuned version of {context.base_name} with a LoRA adapter.",
        separate=context.mode == "separate",
        dtype=context.dtype,
        # The version the bundle was verified with, else the builder's (requirements.txt pins the same one).
        dtype_keyword=dtype_keyword(verification["environment"]["transformers"] if verification is not None
                                    else context.transformers_version),
        weight_files=f"{weight_files} safetensors file{'s' if weight_files > 1 else ''}",
        weight_size=context.weight_size,
        modelpack_version=context.modelpack_version,
        trust_remote_code=context.trust_remote_code,
        remote_code_files=", ".join(context.remote_code_files),
        intended_use=card["intended_use"],
        loader_packages="torch, transformers and peft" if context.mode == "separate" else "torch and transformers",
        memory=memory_section(context, gguf_bytes or {}),
        serving=serving_sections(context.serving, context.ollama, verification),
        ollama_notes=ollama_notes(context.ollama),
        without_chat_template=not context.has_chat_template,
        chat_format=str(generation["chat_format"]) if "chat_format" in generation else None,
        eos_token_id=str(generation["eos_token_id"]) if generation.get("eos_token_id") is not None else None,
        adapter=context.adapter,
        adapters=context.adapters,
        composed_rank=context.composed_rank,
        generation_defaults=", ".join(f"`{key}={value}`" for key, value in generation.items()),
        system_prompt=context.system_prompt,
        system_prompt_note=system_prompt_note(context, system_prompt_in_template),
        verification=(verification_section(verification, context.adapters, files_listed=files_listed)
                      if verification is not None else None),
        # The digest exists only once manifest.json is final; trust.seal writes it over the placeholder.
        digest=DIGEST_PLACEHOLDER,
        limitations=card["limitations"] or "Not stated in the spec.",
    )


def front_matter(context: RenderContext) -> str:
    """The card's YAML metadata, in huggingface_hub's own card type: the Hub's field names, None fields left out."""
    separate = context.mode == "separate"
    return ModelCardData(
        base_model=context.base_model_id,
        # The Hub's relation names: weights with the LoRA merged in are a fine-tune of the base (the Hub's "merge"
        # means merging several models). A separate bundle's root is the base itself (cast at most), which no
        # relation names, and its adapter sits in adapter/, not at the root where the Hub's "adapter" relation and
        # library_name peft would look for adapter_config.json: the root loads with transformers, adapter/ with peft.
        base_model_relation="finetune" if context.base_model_id and not separate else None,
        library_name="transformers",
        license=context.card["license"] or "other",
        language=context.card["language"] or None,
        tags=card_tags(context.card["tags"], separate=separate),
        pipeline_tag="text-generation",
    ).to_yaml() + "\n"


# llama.cpp keeps its attention cache in f16 unless told otherwise (--cache-type-k/-v).
GGUF_KV_ITEMSIZE = 2


def memory_section(context: RenderContext, gguf_bytes: dict[str, int]) -> MemorySection:
    """Weights plus the attention cache of one sequence, per token and at the model's context length: the bundle's
    safetensors (cache in its dtype, as vLLM's `--kv-cache-dtype auto` keeps it), then each GGUF file (cache in f16,
    llama.cpp's default)."""
    kv = context.kv
    variants = [(f"safetensors, {context.dtype}", context.weight_bytes, BY_NAME[context.dtype].itemsize)]
    variants += [(f"`gguf/{name}`", size, GGUF_KV_ITEMSIZE) for name, size in gguf_bytes.items()]
    rows = []
    for variant, weights, itemsize in variants:
        per_token, at_context = kv.bytes_per_token(itemsize), kv.bytes_at_context(itemsize)
        rows.append(MemoryRow(
            variant, describe_bytes(weights),
            describe_bytes(per_token) if per_token is not None else "unknown",
            describe_bytes(at_context) if at_context is not None else "unknown",
            describe_bytes(weights + at_context) if at_context is not None else "unknown"))
    return MemorySection(kv.context_length, rows, list(kv.approximations))


def serving_sections(commands: list[ServingCommand], ollama: OllamaTemplate | None,
                     verification: VerificationReport | None = None) -> list[ServingSection]:
    """Each runtime's command, port, request and health check, and notes; Ollama's says what its Modelfile holds
    when it has a TEMPLATE; vLLM's, what verification's serving stage found."""
    translated = ollama.format if ollama is not None and ollama.template is not None else None
    return [ServingSection(c.runtime, c.command, translated if c.runtime == "Ollama" else None, c.notes, c.port,
                           c.model, c.health, c.request, served_lines(c.runtime, verification))
            for c in commands]


def served_lines(runtime: str, verification: VerificationReport | None) -> list[str]:
    """The engine line of each serving run of this runtime ("served in vLLM 0.32.0 on CPU: 5/5 answers
    token-identical", with the flags that ran), or why verification did not serve the bundle in it."""
    engine = {"vLLM": "vllm"}.get(runtime)
    if verification is None or engine is None:
        return []
    lines = [f"Verification {served_summary(run)}, started with `{' '.join(run['flags'])}` on a free local port"
             for run in verification["serving"] if run["engine"] == engine]
    return lines + [f"Not served by verification: {s['reason']}" for s in verification["skipped"]
                    if s["check"] == engine]


def ollama_notes(ollama: OllamaTemplate | None) -> list[str]:
    """The caveats of the Modelfile's TEMPLATE, or why it has none, one sentence each."""
    if ollama is None:
        return []
    if ollama.template is not None:
        return [f"Ollama template: {note}." for note in ollama.notes]
    return [f"Ollama: {note}; `gguf/Modelfile` has no TEMPLATE, so Ollama picks a template from the GGUF's embedded "
            "chat template by itself." for note in ollama.notes]


def verification_section(report: VerificationReport, adapters: list[AdapterCardView], *,
                         files_listed: int) -> VerificationSection:
    """What verification found, laid out for the card; adapters: the composed ones (empty for one adapter)."""
    prompts, probes = report["prompts"], report["probes"]
    answered = prompts + probes
    compared_alone = bool(answered) and "adapter_answers" in answered[0]
    equivalence = report.get("equivalence")
    gguf = report.get("gguf")
    return VerificationSection(
        transformers=report["environment"]["transformers"],
        torch=report["environment"]["torch"],
        verdict=report_verdict(report),
        files_listed=files_listed,
        equivalence=equivalence_line(equivalence) if equivalence is not None else None,
        gguf=gguf_section(gguf) if gguf is not None else None,
        skipped=report["skipped"],
        composition=composition_table(prompts, probes, adapters) if compared_alone else None,
        answers=None if compared_alone else AnswerTables(
            with_base=bool(answered) and "base_answer" in answered[0],
            prompts=[answer_row(r, probe=False) for r in prompts],
            probes=[answer_row(r, probe=True) for r in probes],
        ),
        serving_problems=report["serving_contract"]["problems"],
        serving_warnings=report["serving_contract"]["warnings"],
    )


def equivalence_line(equivalence: Equivalence) -> EquivalenceLine:
    return EquivalenceLine(
        reference=equivalence["reference"],
        max_abs_logit_diff=f"{equivalence['max_abs_logit_diff']:.3g}",
        positions=equivalence["positions"],
        greedy_agreement=f"{100 * equivalence['greedy_agreement']:.1f}",
        dtype=equivalence["dtype"],
        rule=equivalence["rule"],
    )


def gguf_section(gguf: GgufCheck) -> GgufSection:
    """One row per GGUF file, then each answer that parts from the bundle's."""
    rows = [GgufRow(
        file=f["file"],
        verdict=check_verdict(f["ok"]),
        equal_answers=f"{gguf_equal_answers(f)} of {len(f['answers'])} ({'required' if f['exact'] else 'reported'})",
        prompt_tokens=gguf_prompt_tokens(f),
        expectations=gguf_expectations(f),
    ) for f in gguf["files"]]
    partings = [GgufParting(f["file"], a["prompt"], a["answer"], a["difference"]["position"],
                            parting_score(a["difference"]))
                for f in gguf["files"] for a in f["answers"] if a["difference"] is not None]
    measured = [f for f in gguf["files"] if "tokens" in f]
    fewest = min((f["tokens"] for f in measured), default=None)
    reference = measured[0].get("reference") if measured else None
    return GgufSection(gguf["runtime"], gguf["threads"], rows, partings,
                       [gguf_variant_row(f) for f in gguf["files"] if "bytes" in f], reference,
                       reference is not None and all(f["file"].rsplit("/", 1)[-1] != reference for f in gguf["files"]),
                       fewest if fewest is not None and fewest < FEW_POSITIONS else None)


# Fewer scored positions than this and a variant's mean KLD is a rough figure (llama.cpp scores wikitext's
# hundreds of thousands): the card says so.
FEW_POSITIONS = 2000


def gguf_variant_row(file: GgufFile) -> GgufVariantRow:
    shares = file.get("weight_shares", {})
    mix = ", ".join(f"{name} {100 * shares.get(name, 0):.0f}% ({count} tensors)"
                    for name, count in file.get("tensor_types", {}).items())
    if "tokens" not in file:
        figures = ("", "", "", "", "")
    else:
        budget = file.get("budget")
        figures = (f"{file.get('mean_kld', 0):.4g}", f"{file.get('p99_kld', 0):.4g}",
                   f"{100 * file.get('top1', 0):.1f}%", str(file["tokens"]),
                   f"mean KLD <= {budget['max_mean_kld']:.4g}, top-1 >= {100 * budget['min_top1']:.1f}%"
                   if budget is not None else "reported, not gated")
    required = " (required)" if file.get("expectations_required", True) else ""
    return GgufVariantRow(file["file"], f"{file.get('bytes', 0) / 1e6:.1f} MB",
                          f"{file.get('bits_per_weight', 0):.2f}", mix, *figures,
                          expectations=gguf_expectations(file) + required,
                          verdict=check_verdict(file.get("within_budget", True)) if "tokens" in file else "")


def parting_score(part: AnswerParting) -> PartingScore | None:
    if part["margin"] is None:
        return None
    return PartingScore(gguf=f'"{part["gguf"]}"', bundle=f'"{part["bundle"]}"', margin=f"{part['margin']:.3g}",
                        tolerance=f"{part['tolerance']:.3g}")


def composition_table(prompts: list[PromptResult], probes: list[PromptResult],
                      adapters: list[AdapterCardView]) -> CompositionTable:
    """Several adapters: each answer beside the base's and each adapter's alone (report.PromptResult.adapter_answers,
    keyed as `adapters` are)."""
    return CompositionTable(
        columns=[f"`{a.key}` alone (weight {a.weight})" for a in adapters],
        rows=[answer_row(r, probe=False, adapters=adapters) for r in prompts]
        + [answer_row(r, probe=True, adapters=adapters) for r in probes],
    )


def answer_row(result: PromptResult, *, probe: bool, adapters: list[AdapterCardView] | None = None) -> AnswerRow:
    alone = result.get("adapter_answers", {})
    return AnswerRow(
        kind="probe" if probe else "prompt",
        prompt=result["prompt"],
        answer=result["answer"],
        base_answer=result.get("base_answer"),
        alone=[alone[a.key] for a in adapters or []],
        expectations=answer_verdict(result, probe=probe),
    )
