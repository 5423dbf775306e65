"""The build: spec -> sources -> plan -> weights and files in staging -> verify -> publish."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import builder
from builder import configs
from builder.adapter_compose import WeightedAdapter
from builder.card import render_card
from builder.chat import ChatFacts, read_chat_facts
from builder.errors import SourceError, VerificationError
from builder.formatting import dump_json
from builder.gguf_facts import QUANTIZED_TYPES, gguf_path, source_gguf_type
from builder.manifest import bundle_files, find_machine_paths, machine_paths, sha256_file, write_manifest
from builder.plan import BuildPlan, plan_build
from builder.refusals import require_merge_device
from builder.render import (
    RenderContext,
    base_model_id,
    build_context,
    installed_versions,
    render_requirements,
    render_runtime,
)
from builder.report import VerificationReport, bundle_record, failure_message, skipped_failure
from builder.sources import read_adapter_checkpoint, read_base_model, read_tokenizer_folder, require_text_path
from builder.spec import VerifySpec, load_spec
from builder.staging import check_output_location, publish, staged_output
from builder.subprocesses import verifying_python
from builder.trust import seal
from builder.verify import ReferenceAdapter, ReferenceSources, verify_bundle
from builder.vllm_stage import NO_INTERPRETER, ServingStage, not_asked, vllm_engine
from builder.weights import copy_side_files, write_concatenated_adapter, write_weights

# Receives one line per step of the build, for the terminal.
Progress = Callable[[str], None]


@dataclass
class BuildResult:
    bundle: Path
    plan: BuildPlan
    verification: VerificationReport | None
    digest: str
    run_file: Path | None = None  # the run's report beside the bundle (run_file_path), with verification
    timings: dict[str, float] = field(default_factory=dict)


def plan_from_spec(spec_path: Path, *, output_dir: Path | None = None,
                   merge_device: Literal["cpu", "cuda", "auto"] | None = None) -> BuildPlan:
    """Load and check the spec and both sources, and plan the build; nothing is written. output_dir and
    merge_device override the spec's output.dir and output.merge_device (build's -o and --merge-device)."""
    require_text_path(spec_path, "the spec file")
    spec = load_spec(spec_path)
    if output_dir is not None:
        # Absolute but unresolved, as the spec's own paths: a symlink given as the output must stay visible.
        output_dir = Path(os.path.abspath(output_dir))
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": output_dir})})
    if merge_device is not None:
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"merge_device": merge_device})})
    require_merge_device(spec.output.merge_device)
    require_text_path(spec.output.dir, "output.dir")
    base = read_base_model(spec.base.path)
    adapters = tuple(
        WeightedAdapter(s.key, read_adapter_checkpoint(s.path, allow_pickle=s.allow_pickle), s.weight)
        for s in spec.adapter_sources
    )
    tokenizer = read_tokenizer_folder(spec.tokenizer.path) if spec.tokenizer else None
    return plan_build(spec, base, adapters, spec_file=spec_path.resolve(), tokenizer=tokenizer)


def run_file_path(dest: Path) -> Path:
    """Where a build writes its run's report: beside the bundle, never in it. It holds what changes from run to
    run (verification's timings, speed and memory, the build's phases), which would otherwise change the bundle's
    bytes and digest, and which integrity (no unlisted file in a bundle) would refuse inside it."""
    return dest.with_name(f"{dest.name}.run.json")


def build_bundle(plan: BuildPlan, *, force: bool = False, verify: bool = True, device: str | None = None,
                 strict: bool = False, vllm_python: Path | None = None,
                 vllm_tensor_parallel_size: int | None = None, progress: Progress = lambda line: None,
                 weights_progress: Callable[[int], None] = lambda nbytes: None) -> BuildResult:
    """The build's phases, in a staging folder beside the destination (see staging.staged_output): write the
    weights, write the other files, export GGUF (with export.gguf), verify, finalise (card, requirements, report,
    manifest, digest), publish. weights_progress receives the bytes of each chunk of weights as it is written.
    strict: a check that did not run (report.Skipped) fails verification, as a failed one does (exit 3).
    vllm_python: the vLLM interpreter (overrides verify.vllm_python), checked before any work;
    vllm_tensor_parallel_size overrides verify.vllm_tensor_parallel_size."""
    spec = plan.spec
    dest = spec.output.dir
    serving = serving_stage(spec.verify, vllm_python, vllm_tensor_parallel_size) if verify else None
    check_output_location(
        dest, sources={"base.path": spec.base.path, **{f"{a.key}.path": a.path for a in spec.adapter_sources},
                       **({"tokenizer.path": spec.tokenizer.path} if spec.tokenizer else {})},
        spec_file=plan.spec_file,
    )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with staged_output(dest, force=force, needed=plan.disk_needed, progress=progress) as staging:
        progress(f"writing {len(plan.shards)} weight file(s), {plan.weight_bytes / 1e6:.1f} MB ({plan.mode})")
        # The other files are written while the weights stream (neither reads what the other writes): copying the
        # tokenizer and rendering the chat facts then costs no time after the weights.
        with ThreadPoolExecutor(1, thread_name_prefix="modelpack-files") as pool:
            files = pool.submit(_write_files, plan, staging)

            def on_bytes(nbytes: int) -> None:
                error = files.exception() if files.done() else None
                if error is not None:
                    raise error  # stops the weights: the build fails now, not after them
                weights_progress(nbytes)

            weights = write_weights(plan, staging, on_bytes=on_bytes)
            context, chat = files.result()
        timings["write"] = time.perf_counter() - started
        # The 16-bit GGUF the quantized variants are made from and measured against, when not shipped: beside the
        # staging folder (on its disk), removed with this block.
        with tempfile.TemporaryDirectory(prefix=f"{staging.name}.gguf-source-", dir=staging.parent) as scratch:
            gguf_reference = None
            if spec.export.gguf is not None:
                export_started = time.perf_counter()
                gguf_reference = _export_gguf(plan, staging, chat, Path(scratch), progress=progress)
                timings["export"] = time.perf_counter() - export_started
            provenance = _provenance(plan, _source_fingerprints(plan, weights.sources))
            manifest = write_manifest(staging, provenance, known_sha256=weights.written)

            verification = None
            if verify:
                verify_started = time.perf_counter()
                verification = _verify(plan, staging, manifest, device=device, strict=strict, serving=serving,
                                       gguf_reference=gguf_reference, progress=progress)
                timings["verify"] = time.perf_counter() - verify_started

        digest = _finalise(plan, staging, context, provenance, manifest, verification)
        publish(staging, dest)
        timings["total"] = time.perf_counter() - started
        run_file = _write_run_file(dest, digest, verification, timings) if verification is not None else None
    progress(f"bundle digest: {digest} (give it to the receivers: modelpack verify BUNDLE --digest {digest})")
    return BuildResult(bundle=dest, plan=plan, verification=verification, digest=digest, run_file=run_file,
                       timings=timings)


def _write_run_file(dest: Path, digest: str, verification: VerificationReport, timings: dict[str, float]) -> Path:
    """The run's report beside the published bundle (run_file_path), written while the destination lock is held:
    the full verification report, figures included, with the digest it verified and the build's phases."""
    path = run_file_path(dest)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(dump_json({"bundle": dest.name, "digest": digest,
                                    "timings": {k: round(v, 2) for k, v in timings.items()},
                                    "verification": {**verification, "digest": digest}}), encoding="utf-8")
    temporary.replace(path)
    return path


def _write_files(plan: BuildPlan, staging: Path) -> tuple[RenderContext, ChatFacts]:
    """Everything but the weights and what reports on verification: copies, configs, chat template, loader."""
    copy_side_files(plan, staging)
    chat = read_chat_facts({c.dest: c.source for c in plan.copies if c.role == "tokenizer"},
                           template_file=plan.spec.chat.template, generation_config=plan.base.generation_config,
                           bundle=staging, python=verifying_python(plan.spec.verify.python))
    if chat.template is not None and plan.spec.chat.system_prompt:  # else the template is left as it is
        carrying = configs.default_system_template(chat.template, plan.spec.chat.system_prompt, chat.tokenizer_config)
        chat = dataclasses.replace(chat, template=carrying) if carrying is not None else chat
    generation = configs.generation_config(plan.base.generation_config, overrides=plan.spec.generation.overrides(),
                                           model_config=plan.base.config, end_of_turn_id=chat.end_of_turn_id)
    _write(staging / "config.json", dump_json(configs.model_config(
        plan.base.config, plan.out_dtype, untie_embeddings=plan.untie_embeddings, vocab_size=plan.vocab_size
    )))
    _write(staging / "generation_config.json", dump_json(generation))
    if chat.template is not None:
        if chat.tokenizer_config is not None:  # else the tokenizer has no config to carry the template
            _write(staging / "tokenizer_config.json",
                   dump_json(configs.tokenizer_config(chat.tokenizer_config, chat.template)))
        _write(staging / "chat_template.jinja", chat.template)
    adapter_base = base_model_id(plan) or plan.spec.name  # what adapter_config.json names as its base
    if plan.concatenation is not None:
        write_concatenated_adapter(plan.concatenation, staging / "adapter")
        _write(staging / "adapter" / "adapter_config.json",
               dump_json(configs.adapter_config(plan.concatenation.config, base=adapter_base)))
    elif plan.mode == "separate":
        _write(staging / "adapter" / "adapter_config.json",
               dump_json(configs.adapter_config(plan.adapters[0].checkpoint.config, base=adapter_base)))
    context = build_context(plan, generation=generation, chat=chat)
    for name, content in render_runtime(context).items():
        (staging / name).write_bytes(content)
    if context.modelfile is not None:
        _write(staging / "gguf" / "Modelfile", context.modelfile)
    for name, text in context.variant_modelfiles.items():
        _write(staging / "gguf" / name, text)
    return context, chat


def _export_gguf(plan: BuildPlan, staging: Path, chat: ChatFacts, scratch: Path, *,
                 progress: Progress) -> Path | None:
    """The GGUF files, from the merged weights and tokenizer files already staged (export.gguf): the gguf library's
    types, then llama.cpp's quantized variants from the 16-bit GGUF (in `scratch` when not listed). Returns the
    16-bit GGUF that is not shipped, which verification measures the variants against (None when shipped or none)."""
    # Imported here: gguf and numpy are the exporter's alone, and every light command imports this module.
    from builder.gguf_export import export_gguf, quantize_gguf

    assert plan.spec.export.gguf is not None
    types: list[str] = list(plan.spec.export.gguf.types)
    names = {t: gguf_path(plan.spec.name, t) for t in types}
    source = source_gguf_type(types, plan.out_dtype.name)
    outputs: dict[str, Path] = {t: staging / name for t, name in names.items() if t not in QUANTIZED_TYPES}
    unshipped = None
    if source is not None and source not in outputs:
        unshipped = outputs[source] = scratch / Path(gguf_path(plan.spec.name, source)).name
    progress(f"exporting GGUF: {', '.join(names.values())}")
    export_gguf(plan, staging, chat, outputs)
    for gguf_type in types:
        if gguf_type in QUANTIZED_TYPES:
            assert source is not None
            progress(f"quantizing GGUF with llama.cpp: {names[gguf_type]}")
            quantize_gguf(outputs[source], staging / names[gguf_type], gguf_type)
    return unshipped


def serving_stage(verify: VerifySpec, vllm_python: Path | None,
                  tensor_parallel_size: int | None = None) -> ServingStage | None:
    """The serving stage verify.serve asks for: vLLM from the interpreter given (--vllm-python, else
    verify.vllm_python), checked now (exit 2 when it cannot import vllm); not run, saying why, without one."""
    if "vllm" not in verify.serve:
        return None
    python = vllm_python or verify.vllm_python
    if python is None:
        return not_asked(NO_INTERPRETER)
    option = "--vllm-python" if vllm_python is not None else "verify.vllm_python"
    return ServingStage(engine=vllm_engine(python, option=option),
                        tensor_parallel_size=tensor_parallel_size or verify.vllm_tensor_parallel_size)


def _verify(plan: BuildPlan, staging: Path, manifest: dict, *, device: str | None, strict: bool,
            serving: ServingStage | None, gguf_reference: Path | None, progress: Progress) -> VerificationReport:
    """Reload-and-chat verification of the staged bundle; a failed check (with strict, also one that did not run)
    stops the build (exit 3)."""
    spec = plan.spec
    progress("verifying: loading the bundle in a fresh offline process")
    verification = verify_bundle(
        staging,
        python=spec.verify.python,
        device=device or spec.verify.device,
        sources=ReferenceSources(spec.base.path, tuple(ReferenceAdapter(a.path, a.weight)
                                                       for a in spec.adapter_sources)),
        compare_base=spec.verify.compare_base,
        trust_remote_code=spec.base.trust_remote_code,
        # Hashed by this process as it wrote them; the check still covers listing, sizes and links.
        known_sha256={name: meta["sha256"] for name, meta in manifest["files"].items()},
        staged=True,
        serving=serving,
        gguf_reference=gguf_reference,
        gguf_eval_text=spec.export.gguf.eval_text if spec.export.gguf is not None else None,
        progress=progress,
    )
    message = failure_message(verification) or (skipped_failure(verification) if strict else None)
    if message:
        raise VerificationError(message, report=verification)
    return verification


def _finalise(plan: BuildPlan, staging: Path, context: RenderContext, provenance: dict, manifest: dict,
              verification: VerificationReport | None) -> str:
    """The files that report on the bundle, written once verification is known, then the final manifest and digest.

    The card and requirements.txt are rendered only now because they show what verification found (its answers,
    the versions it ran with); the files verified before are unchanged, so their hashes are reused.
    """
    spec = plan.spec
    if verification is not None:  # its digest is the placeholder, replaced by the final one by seal() below
        _write(staging / "verification.json", dump_json(bundle_record(verification)))
    # What the final manifest will list: every file now, and the two written below.
    listed = len({*bundle_files(staging), "README.md", "requirements.txt"})
    exported = [staging / gguf_path(spec.name, t) for t in spec.export.gguf.types] if spec.export.gguf else []
    gguf_bytes = {path.name: path.stat().st_size for path in exported if path.is_file()}
    template = staging / "chat_template.jinja"
    _write(staging / "README.md", render_card(
        context, verification=verification, files_listed=listed, gguf_bytes=gguf_bytes,
        system_prompt_in_template=template.is_file() and configs.DEFAULT_SYSTEM_MARK in template.read_text("utf-8")))
    environment = verification["environment"] if verification else None
    _write(staging / "requirements.txt",
           render_requirements(context, environment=environment, extra_packages=_extra_packages(plan)))
    offenders = find_machine_paths(staging, machine_paths(
        [spec.base.path, *(a.path for a in spec.adapter_sources), plan.spec_file.parent,
         *([spec.tokenizer.path] if spec.tokenizer else []), staging, spec.output.dir],
        python=verifying_python(spec.verify.python)),
        # tokenizer_config.json and chat_template.jinja are written again by the build (_write_files): scanned.
        copied={c.dest for c in plan.copies} - {"tokenizer_config.json", "chat_template.jinja"})
    if offenders:
        raise SourceError("the bundle would name paths of this machine:\n  " + "\n  ".join(offenders))
    write_manifest(staging, provenance, known_sha256={name: meta["sha256"] for name, meta in manifest["files"].items()})
    return seal(staging)


def _extra_packages(plan: BuildPlan) -> list[str]:
    return ["tiktoken"] if any(c.dest.endswith(".tiktoken") for c in plan.copies) else []


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _source_fingerprints(plan: BuildPlan, known: dict[Path, str]) -> dict[str, str]:
    """sha256 of every source file the build reads, named relative to the base, adapter or tokenizer folder (an
    adapter by its key: adapter/..., or adapters[1]/... for several; tokenizer/... for tokenizer.path).

    known holds the base weight files' hashes, computed from the bytes the merge read.
    """
    base = plan.base
    read = [base.path / "config.json", *base.weight_files,
            *(a.checkpoint.path / "adapter_config.json" for a in plan.adapters),
            *(c.source for c in plan.copies if c.role != "adapter weights")]
    for optional in (base.path / "model.safetensors.index.json", base.path / "generation_config.json"):
        if optional.is_file():
            read.append(optional)
    for adapter in (a.checkpoint for a in plan.adapters):
        # A legacy .bin adapter is read through a converted copy; the fingerprint is of the file the user has.
        legacy = adapter.path / "adapter_model.bin"
        read.append(adapter.weights_file if adapter.path in adapter.weights_file.parents else legacy)
    fingerprints = {}
    for path in dict.fromkeys(read):
        roots = ([(plan.tokenizer.path, "tokenizer")] if plan.tokenizer else []) + \
            [(a.checkpoint.path, a.key) for a in plan.adapters]
        root, label = next(((folder, key) for folder, key in roots if folder in path.parents), (base.path, "base"))
        fingerprints[f"{label}/{path.relative_to(root).as_posix()}"] = known.get(path) or sha256_file(path)
    return fingerprints


def _provenance(plan: BuildPlan, fingerprints: dict[str, str]) -> dict:
    """The spec as written, fingerprints of every source file read, and the tools that built the bundle."""
    spec = plan.spec
    return {
        "modelpack_version": builder.__version__,
        "name": spec.name,
        "mode": plan.mode,
        "spec": {"file": plan.spec_file.name, "text": plan.spec_file.read_text(encoding="utf-8")},
        "sources": {"base": str(spec.base.path), **_recorded_adapters(plan), "sha256": fingerprints},
        "ignored_training_files": [p.name for a in plan.adapters for p in a.checkpoint.ignored_files],
        "tools": installed_versions(),
    }


def _recorded_adapters(plan: BuildPlan) -> dict:
    """The adapters in manifest.json's sources: `adapter` (a path) for one, `adapters` (paths and weights) for
    several; verify.recorded_sources reads both back."""
    if len(plan.adapters) == 1 and plan.adapters[0].key == "adapter":
        return {"adapter": str(plan.adapters[0].checkpoint.path)}
    return {"adapters": [{"key": a.key, "path": str(a.checkpoint.path), "weight": a.weight} for a in plan.adapters]}
