"""Reload-and-chat verification: a fresh offline process runs the bundle's own load.py and checks its answers."""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import builder
from builder.chat import refuse_runaway_bundle_templates
from builder.configs import adapter_config
from builder.dtypes import BY_NAME
from builder.errors import ModelpackError, VerificationError
from builder.formatting import dump_json
from builder.gguf_facts import gguf_file_type, gguf_path, source_gguf_type
from builder.interrupts import interrupts_deferred, raise_if_interrupted
from builder.manifest import read_manifest, sha256_file
from builder.report import (
    EquivalenceReport,
    GgufCheck,
    PromptResult,
    Skipped,
    VerificationReport,
    read_equivalence,
    read_gguf_check,
    read_runtime_report,
    verification_report,
)

# The runtime's marker before its own progress lines (bundle_check.progress, which equivalence.py uses too).
from builder.runtime.bundle_check import PROGRESS_MARKER
from builder.runtime.load import FACTS_FILE
from builder.sources import read_json, require_eval_text, shown_path
from builder.spec import NAME_PATTERN
from builder.subprocesses import describe_crash, die_with_parent, model_code_env, verifying_python
from builder.trust import (
    DIGEST_PLACEHOLDER,
    Integrity,
    Snapshot,
    received_snapshot,
    refuse_unloadable_files,
    require_consent_to_code,
    require_integrity,
    require_signature,
)
from builder.verification_cost import VerificationCost, verification_cost
from builder.vllm_stage import ServingStage, serve_in_vllm, serving_recorded

# Not shipped in bundles: modelpack's installed copy runs in the verifying interpreter and imports the bundle's runtime.
EQUIVALENCE_SCRIPT = Path(str(importlib.resources.files("builder.runtime") / "equivalence.py"))
GGUF_CHECK_SCRIPT = Path(str(importlib.resources.files("builder.runtime") / "gguf_check.py"))
# Why equivalence was not checked, when the caller had no sources to give (reverify_bundle says where they went).
NO_SOURCES = "the source base and adapter are not available"


@dataclass(frozen=True)
class ReferenceAdapter:
    """A source adapter folder and the weight the spec gave it."""

    path: Path
    weight: float = 1.0


@dataclass(frozen=True)
class ReferenceSources:
    """The source folders the bundle was built from, for comparing it with base + adapters through peft."""

    base: Path
    adapters: tuple[ReferenceAdapter, ...]


def verification_cost_of(bundle: Path, *, equivalence: bool, compare_base: bool, adapters: int) -> VerificationCost:
    """verification_cost from what the bundle records: its facts (prompts, mode, dtype) and config.json, and the
    number of source adapters the reference loads."""
    # The sender's files, matched to the manifest but not proven sane: read within bounds, and a malformed one is
    # a failed verification (exit 3) naming the file, not a traceback.
    try:
        facts = read_json(bundle / FACTS_FILE)
        rows = read_json(bundle / "config.json").get("vocab_size")
    except ModelpackError as exc:
        raise VerificationError(f"verification failed: {exc}") from exc
    try:
        return verification_cost(
            mode=facts["mode"], answers=len(facts["prompts"]) + len(facts["probes"]),
            max_new_tokens=facts["verify_max_new_tokens"], compare_base=compare_base, equivalence=equivalence,
            vocab_rows=rows if isinstance(rows, int) else None, logits_itemsize=BY_NAME[facts["dtype"]].itemsize,
            adapters=adapters,
        )
    except (KeyError, TypeError) as exc:
        raise VerificationError(f"verification failed: {bundle.name}/{FACTS_FILE} is not the facts file load.py "
                                f"writes (its {exc} is missing or of another type)") from exc


def verify_bundle(bundle: Path, *, python: str | os.PathLike | None = None, device: str = "cpu",
                  sources: ReferenceSources | None = None,
                  sources_unavailable: str = NO_SOURCES,
                  compare_base: bool = False, max_memory: str | None = None, trust_remote_code: bool = False,
                  expected_digest: str | None = None, known_sha256: dict[str, str] | None = None, staged: bool = False,
                  serving: ServingStage | None = None, gguf_reference: Path | None = None,
                  gguf_eval_text: Path | None = None,
                  progress: Callable[[str], None] = lambda line: None) -> VerificationReport:
    """Check the bundle's files in this process, then run `load.py --verify` in a subprocess that cannot import
    modelpack, then its GGUF files in llama.cpp, then (with the sources) the equivalence check; return the report,
    assembled from their parts.

    Nothing from the bundle runs before its files matched manifest.json (and the expected digest, when given), and
    a bundle that ships model code runs only with trust_remote_code. `python` is the interpreter that loads the
    model (default: this one), e.g. the deployment's virtualenv when the model's own code needs other library
    versions. Without sources, the report names sources_unavailable as the reason equivalence was not checked.
    staged: a build's staging folder, whose manifest.json is written again once the card and this report are added,
    so the report records DIGEST_PLACEHOLDER, which trust.seal replaces with the final digest. The report is
    returned whether or not the checks passed; `failure_message` says what failed. serving: the serving stage
    (verify.serve), run after the other checks, or reported as not run with its reason. gguf_reference: the 16-bit
    GGUF the quantized ones are measured against when the bundle ships none (each within the budget its facts give
    its type); gguf_eval_text: a text file scored too.
    """
    python = verifying_python(python)
    steps = _Steps(python=python, device=device, max_memory=max_memory, compare_base=compare_base,
                   trust_remote_code=trust_remote_code, progress=progress, serving=serving,
                   gguf_reference=gguf_reference, gguf_eval_text=gguf_eval_text)
    if staged:  # the build's own staging folder, written by this process: checked in place
        manifest = read_manifest(bundle)
        progress("checking every file against manifest.json")
        integrity = require_integrity(bundle, known_sha256=known_sha256)
        return steps.run(bundle, manifest, integrity, DIGEST_PLACEHOLDER, sources, sources_unavailable)
    with received_snapshot(bundle, expected_digest=expected_digest, progress=progress) as snapshot:
        return steps.run(snapshot.folder, snapshot.manifest, snapshot.integrity, snapshot.digest, sources,
                         sources_unavailable, snapshot=snapshot, origin=bundle)


def reverify_bundle(bundle: Path, *, expected_digest: str | None = None, public_key: Path | None = None,
                    trust_remote_code: bool = False, python: str | os.PathLike | None = None, device: str = "auto",
                    max_memory: str | None = None, serving: ServingStage | None = None,
                    gguf_eval_text: Path | None = None,
                    progress: Callable[[str], None] = lambda line: None) -> VerificationReport:
    """A received bundle, from a private snapshot of it: its signature (when a key is given), then the checks of
    verify_bundle against the sources manifest.json names when they are on this machine (else equivalence is
    reported as skipped, saying why). serving: the serving stage when the receiver gave a vLLM interpreter; without
    one it is reported as not run where the bundle's own report shows the build served it. gguf_eval_text: the
    receiver's held-out text, scored too when measuring the quantized GGUF files (the build's is not shipped)."""
    python = verifying_python(python)
    if gguf_eval_text is not None:
        require_eval_text(gguf_eval_text, named="--eval-text")
    steps = _Steps(python=python, device=device, max_memory=max_memory, compare_base=False,
                   trust_remote_code=trust_remote_code, progress=progress, serving=serving,
                   gguf_eval_text=gguf_eval_text)
    with received_snapshot(bundle, expected_digest=expected_digest, progress=progress) as snapshot:
        if public_key is not None:
            progress("checking the signature")
            require_signature(snapshot.folder, public_key, shown=bundle)
        if serving is None:
            steps = dataclasses.replace(steps, serving=serving_recorded(snapshot.folder))
        sources, unavailable = recorded_sources(snapshot.manifest)
        return steps.run(snapshot.folder, snapshot.manifest, snapshot.integrity, snapshot.digest, sources,
                         unavailable or NO_SOURCES, snapshot=snapshot, origin=bundle)


@dataclass(frozen=True)
class _Steps:
    """The verification steps after the files were checked, with the options every step shares."""

    python: str
    device: str
    max_memory: str | None
    compare_base: bool
    trust_remote_code: bool
    progress: Callable[[str], None]
    serving: ServingStage | None = None
    gguf_reference: Path | None = None
    gguf_eval_text: Path | None = None

    def _gguf_quality_options(self) -> tuple[str, ...]:
        """gguf_check.py's options for measuring the quantized files (its --reference and --eval-text)."""
        reference = ("--reference", str(self.gguf_reference)) if self.gguf_reference is not None else ()
        text = ("--eval-text", str(self.gguf_eval_text)) if self.gguf_eval_text is not None else ()
        return (*reference, *text)

    def run(self, bundle: Path, manifest: dict, integrity: Integrity, digest: str, sources: ReferenceSources | None,
            sources_unavailable: str, *, snapshot: Snapshot | None = None,
            origin: Path | None = None) -> VerificationReport:
        """`load.py --verify` in a subprocess that cannot import modelpack, then the bundle's GGUF files in
        llama.cpp, then (with the sources) the equivalence check, all from `bundle` (a received bundle's snapshot);
        the report, assembled from their parts. A held weight file written in place meanwhile fails it (exit 3)."""
        python, progress = self.python, self.progress
        code = require_consent_to_code(manifest, trust_remote_code=self.trust_remote_code)
        pass_fds = snapshot.pass_fds if snapshot is not None else ()
        with tempfile.TemporaryDirectory(prefix="modelpack-verify-") as workdir:
            report_path = Path(workdir) / "report.json"
            spread = ["--max-memory", self.max_memory] if self.max_memory else []
            answer_logits = Path(workdir) / "answer-logits"
            scoring = ["--answer-logits", str(answer_logits)] if sources is not None else []
            # What the processes below hand to transformers, tokenizers, safetensors, Jinja and llama.cpp, checked
            # here within modelpack's limits: a hostile file or template is one sentence, not a crash or hang there.
            refuse_unloadable_files(bundle, manifest, shown=origin or bundle)
            cost = verification_cost_of(bundle, equivalence=sources is not None, compare_base=self.compare_base,
                                        adapters=len(sources.adapters) if sources is not None else 1)
            refuse_runaway_bundle_templates(bundle, shown=origin or bundle)
            progress(cost.describe())
            # One model per process, one after the other: the bundle answers (and, for the equivalence check, keeps
            # its logits over those answers), then the reference is compared with them. The files were checked
            # above, by code the receiver trusts; load.py need not hash them a second time.
            progress(f"verification step 1 of {len(cost.loads)}: {cost.loads[0]}")
            started = time.perf_counter()
            _run([python, str(bundle / "load.py"), "--verify", "--files-checked", "--report", str(report_path),
                  "--device", self.device, *spread, *scoring],
                 workdir, report_path, progress, what=f"verification could not load the bundle {origin or bundle}",
                 pass_fds=pass_fds)
            progress(f"verification step 1 done in {time.perf_counter() - started:.1f}s")
            runtime_report = read_runtime_report(json.loads(report_path.read_text(encoding="utf-8")), python=python)
            gguf, gguf_skipped = _check_gguf(bundle, manifest, runtime_report["prompts"] + runtime_report["probes"],
                                             python, workdir, progress, pass_fds=pass_fds,
                                             quality=self._gguf_quality_options())
            served, served_skipped = [], []
            if self.serving is not None and self.serving.engine is None:
                served_skipped.append(Skipped(check="vllm", reason=self.serving.reason))
            elif self.serving is not None:
                served.append(serve_in_vllm(self.serving, bundle, runtime_report["prompts"] + runtime_report["probes"],
                                            workdir=workdir, progress=progress, pass_fds=pass_fds))
            equivalence = None
            if sources is not None:
                progress(f"verification step 2 of {len(cost.loads)}: {cost.loads[1]}")
                started = time.perf_counter()
                equivalence = _check_equivalence(bundle, sources, answer_logits, compare_base=self.compare_base,
                                                 python=python, device=self.device, spread=spread, workdir=workdir,
                                                 progress=progress, pass_fds=pass_fds)
                progress(f"verification step 2 done in {time.perf_counter() - started:.1f}s")
        if snapshot is not None:
            snapshot.require_unchanged(origin or bundle)
        return verification_report(
            runtime_report,
            files={"ok": integrity.ok, "files": integrity.files, "problems": integrity.problems,
                   "checked_by": f"modelpack {builder.__version__}"},
            digest=digest,
            remote_code=code,
            skipped=[*gguf_skipped, *served_skipped, *([] if sources is not None else [
                Skipped(check="equivalence", reason=sources_unavailable)])],
            gguf=gguf,
            equivalence=equivalence,
            served=served if self.serving is not None and self.serving.engine is not None else None,
        )


def _check_gguf(bundle: Path, manifest: dict, answers: list[PromptResult], python: str, workdir: str,
                progress: Callable[[str], None], *, pass_fds: tuple[int, ...] = (),
                quality: tuple[str, ...] = ()) -> tuple[GgufCheck | None,
                                                                                              list[Skipped]]:
    """The bundle's GGUF files answering the verification prompts inside llama.cpp (builder/runtime/gguf_check.py),
    compared with the bundle's answers; reported as skipped, with the command that installs it, where the verifying
    interpreter has no llama-cpp-python."""
    files = gguf_files(manifest)
    if not files:
        return None, []
    if subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(not importlib.util.find_spec('llama_cpp'))"],
                      env=model_code_env(workdir), capture_output=True).returncode != 0:
        # The reason goes into verification.json and the card, which name no path of this machine: "the verifying
        # interpreter" is verify.python or --python when given, else modelpack's own.
        return None, [Skipped(check="gguf", reason=(
            f"llama-cpp-python is not installed in the verifying interpreter, so {len(files)} GGUF file(s) were not "
            f"run in llama.cpp; install it there with `python -m pip install '{llama_cpp_requirement()}'` (pip builds "
            "llama.cpp from source, several minutes) and verify again"
        ))]
    if not any(part == "--reference" for part in quality):
        reference = _measuring_reference(bundle, files, workdir, progress)
        quality = (*quality, "--reference", str(reference)) if reference is not None else quality
    progress("gguf: answering the verification prompts in llama.cpp")
    answers_path = Path(workdir) / "gguf-answers.json"
    entries = [{"prompt": r["prompt"], "answer": r["answer"]} for r in answers]
    answers_path.write_text(json.dumps(entries, ensure_ascii=False), encoding="utf-8")
    output = Path(workdir) / "gguf.json"
    _run([python, str(GGUF_CHECK_SCRIPT), "--bundle", str(bundle), "--answers", str(answers_path), "--report",
          str(output), *quality, *files], workdir, output, progress,
         what="the GGUF check could not run the bundle's GGUF files in llama.cpp", pass_fds=pass_fds)
    return read_gguf_check(json.loads(output.read_text(encoding="utf-8")), python=python), []


def _check_equivalence(bundle: Path, sources: ReferenceSources, answer_logits: Path, *, compare_base: bool,
                       python: str, device: str, spread: list[str], workdir: str,
                       progress: Callable[[str], None], pass_fds: tuple[int, ...] = ()) -> EquivalenceReport:
    """The source base and adapters through peft (the unmerged reference), compared with the bundle's logits over
    its own answers (builder/runtime/equivalence.py); with compare_base, also the base's and each adapter's own
    answers."""
    equivalence_path = Path(workdir) / "equivalence.json"
    adapters = [arg for i, source in enumerate(sources.adapters) for arg in (
        "--adapter", str(_reference_adapter(source.path, Path(workdir) / f"reference-adapter-{i}")),
        "--adapter-weight", repr(source.weight))]
    base = _reference_base(sources.base, Path(workdir) / "reference")
    command = [python, str(EQUIVALENCE_SCRIPT), "--bundle", str(bundle), "--base", str(base),
               *adapters, "--answer-logits", str(answer_logits), "--report",
               str(equivalence_path), "--device", device, *spread]
    _run(command + (["--compare-base"] if compare_base else []), workdir, equivalence_path, progress,
         what="the equivalence check could not load the bundle and its sources", pass_fds=pass_fds)
    return read_equivalence(json.loads(equivalence_path.read_text(encoding="utf-8")), python=python)


def _measuring_reference(bundle: Path, files: list[str], workdir: str,
                         progress: Callable[[str], None]) -> Path | None:
    """The 16-bit GGUF that a received bundle's quantized GGUF files are measured against when it ships none, made
    from its merged weights in the working folder as the build made it (gguf_export.reference_gguf); None when a
    16-bit file is shipped or nothing is quantized."""
    types = [gguf_file_type(name) for name in files]
    facts = read_json(bundle / FACTS_FILE)
    gguf_type = source_gguf_type(types, str(facts.get("dtype")))
    if gguf_type is None or gguf_type in types:
        return None
    name = facts.get("name")
    if not isinstance(name, str) or re.fullmatch(NAME_PATTERN, name) is None:
        raise VerificationError(f"verification failed: {bundle.name}/{FACTS_FILE} names the bundle {name!r}, which "
                                "is no bundle name modelpack writes")
    # Imported here: the exporter's gguf and numpy serve this one step.
    from builder.gguf_export import reference_gguf

    out = Path(workdir) / Path(gguf_path(name, gguf_type)).name
    # 2 bytes a weight, from weights of the bundle's dtype; free space is the receiver's to find, so exit 2.
    dtype = BY_NAME.get(str(facts.get("dtype")), BY_NAME["float32"])
    needed = sum(p.stat().st_size for p in bundle.glob("*.safetensors")) * 2 // dtype.itemsize
    free = shutil.disk_usage(workdir).free
    if needed > free:
        raise ModelpackError(f"measuring the bundle's quantized GGUF files needs the 16-bit GGUF made from its "
                             f"weights, about {needed / 1e9:.1f} GB in {Path(workdir).parent}, which has "
                             f"{free / 1e9:.1f} GB free; free space there or point TMPDIR at a larger disk")
    progress(f"gguf: making {out.name} from the bundle's weights, to measure its quantized files against")
    try:
        reference_gguf(bundle, out, gguf_type, name=name)
    except ModelpackError as exc:
        raise VerificationError(f"verification failed: the bundle's quantized GGUF files cannot be measured: making "
                                f"the 16-bit GGUF from its weights failed: {exc}") from exc
    return out


def gguf_files(manifest: dict) -> list[str]:
    """The bundle's GGUF files, as manifest.json lists them."""
    return sorted(name for name in manifest.get("files", {}) if name.endswith(".gguf"))


def llama_cpp_requirement() -> str:
    """The llama-cpp-python that modelpack's `gguf` extra pins (pyproject.toml is its one home)."""
    from importlib import metadata

    distribution = (metadata.packages_distributions().get("builder") or ["modelpack-lora"])[0]
    for requirement in metadata.requires(distribution) or []:
        if requirement.startswith("llama-cpp-python") and "extra == \"gguf\"" in requirement:
            return requirement.split(";")[0].strip()
    return "llama-cpp-python"


def _reference_base(base: Path, parent: Path) -> Path:
    """The source base seen through a folder of links with an importable name.

    transformers < 4.57 imports a remote-code model's files as the package transformers_modules.<folder name>,
    which a dot in the name breaks (a user's `Qwen-7B-Chat.v1.1`); the links keep the files where they are.
    """
    folder = parent / "modelpack_reference_base"
    folder.mkdir(parents=True)
    for path in base.iterdir():
        (folder / path.name).symlink_to(path.resolve())
    return folder


def _reference_adapter(adapter: Path, folder: Path) -> Path:
    """The source adapter as every supported peft reads it: its weights (linked) and its config without the
    default-valued keys that peft < 0.14 rejects, as the bundle's own adapter_config.json is written."""

    folder.mkdir()
    for name in ("adapter_model.safetensors", "adapter_model.bin"):
        if (adapter / name).is_file():
            (folder / name).symlink_to((adapter / name).resolve())
    config = read_json(adapter / "adapter_config.json")
    cleaned = adapter_config(config, base="") | {"base_model_name_or_path": config.get("base_model_name_or_path")}
    (folder / "adapter_config.json").write_text(dump_json(cleaned), encoding="utf-8")
    return folder


def _run(command: list[str], workdir: str, output: Path, progress: Callable[[str], None], *, what: str,
         pass_fds: tuple[int, ...] = ()) -> None:
    """Run a verification step offline in an empty folder (it sees the bundle and nothing of the build).

    The full output goes to a log; when the step fails, the log is kept and the error names
    where the failure happened instead of printing the traceback.
    """
    with interrupts_deferred():  # a Ctrl-C while the process forks is raised just below, where it is killed
        process = subprocess.Popen(command, cwd=workdir, env=model_code_env(workdir), stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, encoding="utf-8", errors="replace",
                                   pass_fds=pass_fds,  # a snapshot's held weight files, by the same numbers
                                   preexec_fn=die_with_parent if sys.platform == "linux" else None)
    lines: list[str] = []
    assert process.stdout is not None
    try:
        raise_if_interrupted()
        for line in process.stdout:
            raise_if_interrupted()
            lines.append(line.rstrip())
            if line.startswith(PROGRESS_MARKER):  # the runtime's own lines; libraries' bars and warnings: the log
                progress(line.rstrip().removeprefix(PROGRESS_MARKER))
        returncode = process.wait()
        raise_if_interrupted()
    except BaseException:  # Ctrl-C (or our bug): the model's process stops with us, not after its last prompt
        process.kill()
        process.wait()
        raise
    if not output.is_file():
        handle, log = tempfile.mkstemp(prefix="modelpack-verify-", suffix=".log")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(" ".join(command) + "\n\n" + "\n".join(lines) + "\n")
        raise VerificationError(f"{what}: {describe_crash(lines, returncode)}; it ran with {command[0]}, and its "
                                f"full output is in {log}")


def recorded_sources(manifest: dict) -> tuple[ReferenceSources | None, str | None]:
    """The sources a proven manifest.json names, if they are still there and the adapter is unchanged; else why not.
    A `sources` table of another shape than modelpack writes is refused (exit 3)."""
    recorded = manifest.get("sources", {})
    # One adapter is recorded as `adapter` (a path), several as `adapters` ({key, path, weight} each).
    listed = recorded.get("adapters") if isinstance(recorded, dict) else None
    if listed is None and isinstance(recorded, dict):
        listed = [{"key": "adapter", "path": recorded.get("adapter", ""), "weight": 1.0}]
    fingerprints = recorded.get("sha256", {}) if isinstance(recorded, dict) else None
    if not (isinstance(recorded, dict) and isinstance(recorded.get("base", ""), str) and isinstance(listed, list)
            and isinstance(fingerprints, dict) and all(isinstance(v, str) for v in fingerprints.values())
            and all(isinstance(e, dict) and isinstance(e.get("key", "adapter"), str)
                    and isinstance(e.get("path", ""), str) and "\0" not in e.get("path", "")
                    and type(e.get("weight", 1.0)) in (int, float) for e in listed)
            and "\0" not in recorded.get("base", "")):
        raise VerificationError(
            "verification failed: manifest.json's `sources` is not the table modelpack writes ({\"base\": path, "
            "\"adapter\": path, \"sha256\": {...}} or \"adapters\": [{\"key\", \"path\", \"weight\"}, ...]); "
            "nothing from the bundle was run"
        )
    base = Path(recorded.get("base", ""))
    adapters = [(entry.get("key", "adapter"), Path(entry.get("path", "")), float(entry.get("weight", 1.0)))
                for entry in listed]
    try:
        present = base.is_dir() and all(path.is_dir() for _, path, _ in adapters)
    except OSError:  # a name over the file system's limits
        present = False
    if not present:
        shown = ", ".join(shown_path(p) for p in (base, *(path for _, path, _ in adapters)))
        return None, f"the sources recorded in manifest.json ({shown[:500]}) are not on this machine"
    for key, path, _ in adapters:
        fingerprint = fingerprints.get(f"{key}/adapter_config.json")
        try:
            changed = bool(fingerprint) and fingerprint != sha256_file(path / "adapter_config.json")
        except OSError as exc:
            return None, f"the adapter at {shown_path(path)} cannot be read ({exc.strerror})"
        if changed:
            return None, f"the adapter at {shown_path(path)} changed since the build"
    return ReferenceSources(base, tuple(ReferenceAdapter(path, weight) for _, path, weight in adapters)), None
