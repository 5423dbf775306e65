"""The build: spec -> sources -> plan -> weights and files in staging -> verify -> publish."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import builder
from builder import configs
from builder.errors import SourceError, VerificationError
from builder.execute import copy_side_files, write_weights
from builder.manifest import find_machine_paths, sha256_file, write_manifest
from builder.plan import BuildPlan, plan_build
from builder.render import build_context, installed_versions, render_card, render_loader, render_requirements
from builder.sources import read_adapter_checkpoint, read_base_model
from builder.spec import load_spec
from builder.remote_code import probe_token_ids
from builder.trust import DIGEST_PLACEHOLDER, seal
from builder.staging import check_output_location, publish, staged_output
from builder.verify import ReferenceSources, failure_message, verify_bundle, verifying_python

Report = Callable[[str], None]


@dataclass
class BuildResult:
    bundle: Path
    plan: BuildPlan
    verification: dict | None
    digest: str
    timings: dict[str, float] = field(default_factory=dict)


def plan_from_spec(spec_path: Path, *, output_dir: Path | None = None) -> BuildPlan:
    """Load and check the spec and both sources, and plan the build; nothing is written."""
    spec = load_spec(spec_path)
    if output_dir is not None:
        # Absolute but unresolved, as the spec's own paths: a symlink given as the output must stay visible.
        output_dir = Path(os.path.abspath(output_dir))
        spec = spec.model_copy(update={"output": spec.output.model_copy(update={"dir": output_dir})})
    base = read_base_model(spec.base.path)
    adapter = read_adapter_checkpoint(spec.adapter.path, allow_pickle=spec.adapter.allow_pickle)
    return plan_build(spec, base, adapter, spec_file=spec_path.resolve())


def build_bundle(plan: BuildPlan, *, force: bool = False, verify: bool = True, device: str | None = None,
                 report: Report = lambda line: None) -> BuildResult:
    """Execute the plan into a staging folder, verify it, and swap it into place (see staging.staged_output)."""
    spec = plan.spec
    dest = spec.output.dir
    check_output_location(
        dest, sources={"base.path": spec.base.path, "adapter.path": spec.adapter.path}, spec_file=plan.spec_file
    )
    timings: dict[str, float] = {}
    started = time.perf_counter()
    with staged_output(dest, force=force, needed=plan.disk_needed, report=report) as staging:
        report(f"writing {len(plan.shards)} weight file(s), {plan.weight_bytes / 1e6:.1f} MB ({plan.mode})")
        weights = write_weights(plan, staging)
        copy_side_files(plan, staging)
        context = _write_configs_and_render(plan, staging)
        timings["write"] = time.perf_counter() - started

        offenders = find_machine_paths(staging, [spec.base.path, spec.adapter.path, plan.spec_file.parent])
        if offenders:
            raise SourceError("the bundle would name paths of this machine:\n  " + "\n  ".join(offenders))
        provenance = _provenance(plan, _source_fingerprints(plan, weights.sources))
        manifest = write_manifest(staging, provenance, known_sha256=weights.written)

        verification = None
        if verify:
            report("verifying: loading the bundle in a fresh offline process")
            verify_started = time.perf_counter()
            verification = verify_bundle(
                staging,
                python=spec.verify.python,
                device=device or spec.verify.device,
                sources=ReferenceSources(spec.base.path, spec.adapter.path),
                compare_base=spec.verify.compare_base,
                trust_remote_code=spec.base.trust_remote_code,
                # Hashed by this process as it wrote them; the check still covers listing, sizes and links.
                known_sha256={name: meta["sha256"] for name, meta in manifest["files"].items()},
                on_progress=report,
            )
            timings["verify"] = time.perf_counter() - verify_started
            message = failure_message(verification)
            if message:
                raise VerificationError(message)
            verification["digest"] = DIGEST_PLACEHOLDER  # the final manifest's digest, written by seal() below
            (staging / "verification.json").write_text(configs.dump_json(verification), encoding="utf-8")
        (staging / "README.md").write_text(render_card(context, verification=verification), encoding="utf-8")
        environment = verification["environment"] if verification else None
        (staging / "requirements.txt").write_text(
            render_requirements(context, environment=environment, extra_packages=_extra_packages(plan)),
            encoding="utf-8",
        )
        unchanged = {name: meta["sha256"] for name, meta in manifest["files"].items()
                     if name not in ("README.md", "requirements.txt")}
        write_manifest(staging, provenance, known_sha256=unchanged)
        digest = seal(staging)
        publish(staging, dest)
        report(f"bundle digest: {digest} (give it to the receivers: modelpack verify BUNDLE --digest {digest})")
    timings["total"] = time.perf_counter() - started
    return BuildResult(bundle=dest, plan=plan, verification=verification, digest=digest, timings=timings)


def _write_configs_and_render(plan: BuildPlan, staging: Path):
    """config.json, generation_config.json, tokenizer config and chat template, adapter config, load.py."""
    template = configs.chat_template_of(plan)
    special = configs.special_token_ids(plan)
    end_of_turn = (
        configs.end_of_turn_token(template, special, configs.tokenizer_config_tokens(plan)) if template else None
    )
    end_of_turn_id = special.get(end_of_turn)
    if end_of_turn is None:  # no chat template: remote chat code (Qwen-v1) names its prompt format instead
        end_of_turn = configs.chat_format_end_of_turn(plan.base.generation_config)
        end_of_turn_id = special.get(end_of_turn)
        if end_of_turn is not None and end_of_turn_id is None:
            # Its special tokens live in the tokenizer's own code: ask it, in the verifying interpreter.
            python = verifying_python(plan.spec.verify.python)
            end_of_turn_id = probe_token_ids(staging, [end_of_turn], python=python)[end_of_turn]
            end_of_turn = end_of_turn if end_of_turn_id is not None else None
    generation = configs.generation_config(plan, plan.base.generation_config, end_of_turn_id)
    _write(staging / "config.json", configs.dump_json(configs.model_config(
        plan.base.config, plan.out_dtype, untie_embeddings=plan.untie_embeddings, vocab_size=plan.vocab_size
    )))
    _write(staging / "generation_config.json", configs.dump_json(generation))
    tokenizer_config = staging / "tokenizer_config.json"
    if tokenizer_config.is_file() and template is not None:  # else it stays the byte-for-byte copy
        _write(tokenizer_config, configs.dump_json(configs.tokenizer_config(tokenizer_config, template)))
    if template is not None:
        _write(staging / "chat_template.jinja", template)
    if plan.mode == "separate":
        _write(staging / "adapter" / "adapter_config.json", configs.dump_json(configs.adapter_config(plan.adapter.config)))
    context = build_context(plan, generation=generation, end_of_turn_token=end_of_turn)
    _write(staging / "load.py", render_loader(context))
    _write(staging / "README.md", render_card(context, verification=None))
    _write(staging / "requirements.txt",
           render_requirements(context, environment=None, extra_packages=_extra_packages(plan)))
    return context


def _extra_packages(plan: BuildPlan) -> list[str]:
    return ["tiktoken"] if any(c.dest.endswith(".tiktoken") for c in plan.copies) else []


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _source_fingerprints(plan: BuildPlan, known: dict[Path, str]) -> dict[str, str]:
    """sha256 of every source file the build reads, named relative to the base or adapter folder.

    known holds the base weight files' hashes, computed from the bytes the merge read.
    """
    base, adapter = plan.base, plan.adapter
    read = [base.path / "config.json", *base.weight_files, adapter.path / "adapter_config.json",
            *(c.source for c in plan.copies if c.role != "adapter weights")]
    for optional in (base.path / "model.safetensors.index.json", base.path / "generation_config.json"):
        if optional.is_file():
            read.append(optional)
    # A legacy .bin adapter is read through a converted copy; the fingerprint is of the file the user has.
    legacy = adapter.path / "adapter_model.bin"
    read.append(adapter.weights_file if adapter.path in adapter.weights_file.parents else legacy)
    fingerprints = {}
    for path in dict.fromkeys(read):
        root, label = (adapter.path, "adapter") if adapter.path in path.parents else (base.path, "base")
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
        "sources": {"base": str(spec.base.path), "adapter": str(spec.adapter.path), "sha256": fingerprints},
        "ignored_training_files": [p.name for p in plan.adapter.ignored_files],
        "tools": installed_versions(),
    }
