"""The `modelpack` command: parses arguments, calls the library, prints; one handler maps errors to exit codes."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Annotated, Literal

import typer

import builder
from builder.errors import EXIT_INTERRUPTED, ModelpackError, SpecError, VerificationError
from builder.formatting import JSON_SCHEMA_VERSION, dump_json
from builder.runtime.load import DEVICE_PATTERN, DEVICES

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Package a base model and a LoRA adapter into a verified, self-contained bundle.\n\n"
    "Exit codes: 0 success, 1 unexpected error (a bug: please report it), 2 invalid spec or input, "
    "3 verification failed (with --strict, also a check that did not run), 130 interrupted (Ctrl-C).",
)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="print errors only (and the result)")]
AsJson = Annotated[bool, typer.Option("--json", help="print one JSON result on stdout (errors too)")]
Strict = Annotated[bool, typer.Option(
    "--strict", help="a check that did not run (no llama.cpp, no sources, ...) fails verification (exit 3)")]
VllmPython = Annotated[Path | None, typer.Option(
    help="Python of a virtualenv with vLLM: serves the bundle in vLLM and compares its answers (verify.serve; "
         "overrides verify.vllm_python)")]
VllmTensorParallelSize = Annotated[int | None, typer.Option(
    min=1, help="vLLM's --tensor-parallel-size for the serving stage (overrides verify.vllm_tensor_parallel_size)")]


@app.callback(invoke_without_command=True)
def modelpack(
    context: typer.Context,
    show_version: Annotated[bool, typer.Option("--version", help="print modelpack's version and exit")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="with --version: print it as one JSON object")] = False,
) -> None:
    """Options of `modelpack` itself, before any command: --version (with --json, as JSON)."""
    if show_version:
        if as_json:
            _print_json({"ok": True, "modelpack_version": builder.__version__})
        else:
            typer.echo(f"modelpack {builder.__version__}")
        raise typer.Exit()
    if context.invoked_subcommand is None:
        context.fail("Missing command.")
    if as_json:
        context.fail(f"--json goes after the command: modelpack {context.invoked_subcommand} ... --json")


def _console(quiet: bool = False):
    from builder.console import Console

    return Console(quiet=quiet)


def _print_json(result: dict) -> None:
    """One --json result on stdout, with the version of its shape."""
    typer.echo(dump_json({"schema_version": JSON_SCHEMA_VERSION, **result}), nl=False)


def _checked_device(device: str | None, option: str) -> str | None:
    """A verification device, refused before any work (torch would refuse it only after the model loaded)."""
    if device is not None and not re.fullmatch(DEVICE_PATTERN, device):
        raise SpecError(f"{option} {device!r} is not a device: {DEVICES}")
    return device


def _not_run(checks: list[str]) -> str:
    """The final line's part naming the checks that did not run, so "verified" never hides one."""
    return f"; not run: {', '.join(checks)} (see the report)" if checks else ""


def user_errors_exit(command=None, *, report_is_result: bool = False):
    """The one error handler: a ModelpackError prints as one message and exits with its code (with --json, also as
    one JSON object on stdout, so a pipeline reading stdout sees every outcome).

    report_is_result: the command's --json result is the verification report (verify), so a failed verification
    prints the report its error carries, as a passed one prints; any other error prints {ok, exit_code, error}.
    Anything else is our bug and keeps its traceback (exit 1).
    """
    if command is None:
        return functools.partial(user_errors_exit, report_is_result=report_is_result)

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ModelpackError as error:
            typer.echo(f"error: {error.message}", err=True)
            if kwargs.get("as_json"):
                report = error.report if isinstance(error, VerificationError) and report_is_result else None
                _print_json(dict(report) if report is not None
                            else {"ok": False, "exit_code": error.exit_code, "error": error.message})
            raise typer.Exit(error.exit_code) from None
        except KeyboardInterrupt:  # the staging folder is already gone; the destination is as it was
            typer.echo("interrupted: nothing was published", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return run


@app.command()
@user_errors_exit
def init(
    checkpoint: Annotated[Path, typer.Argument(
        help="a peft checkpoint folder (adapter_config.json), or a Trainer output folder with checkpoint-N folders")],
    base: Annotated[Path | None, typer.Option(
        help="the base model folder (default: the one adapter_config.json records, if it is on this machine)")] = None,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", help="the spec file to write (default: specs/NAME.yaml)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing spec file")] = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Draft a commented spec from a training run's checkpoint and its base model.

    Example: modelpack init output/checkpoint-1560 --base models/Qwen2-7B -o specs/med.yaml
    """
    from builder.scaffold import draft_spec, write_draft

    draft = draft_spec(checkpoint, base=base, spec_file=output)
    write_draft(draft, force=force)
    console = _console(quiet)
    console.say(f"checkpoint: {draft.checkpoint.path} ({draft.checkpoint.reason})")
    console.say(f"base: {draft.base} ({draft.base_reason})")
    if as_json:
        chosen = draft.checkpoint
        _print_json({"ok": True, "spec": str(draft.spec_file), "base": str(draft.base),
                     "checkpoint": {"path": str(chosen.path), "rule": chosen.rule, "reason": chosen.reason}})
        return
    typer.echo(f"wrote {draft.spec_file}; check it, then: modelpack build {draft.spec_file}")


@app.command()
@user_errors_exit
def validate(spec: Annotated[Path, typer.Argument(help="the spec YAML file")], as_json: AsJson = False) -> None:
    """Check a spec and its sources without writing anything.

    Example: modelpack validate specs/med.yaml
    """
    from builder.build import plan_from_spec
    from builder.console import validation_json

    plan = plan_from_spec(spec)
    if as_json:
        _print_json(validation_json(spec, plan))
        return
    typer.echo(f"{spec}: valid ({plan.mode}, {len(plan.merged_tensors)} tensors to merge)")


@app.command()
@user_errors_exit
def build(
    spec: Annotated[Path, typer.Argument(help="the spec YAML file")],
    output: Annotated[Path | None, typer.Option("-o", "--output", help="bundle folder (overrides output.dir)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing bundle")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip reload-and-chat verification")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan as tables and write nothing")] = False,
    device: Annotated[str | None, typer.Option(
        help=f"verification device: {DEVICES} (default: verify.device)")] = None,
    merge_device: Annotated[Literal["cpu", "cuda", "auto"] | None, typer.Option(
        help="where the LoRA deltas are computed: cpu | cuda | auto (default: output.merge_device)")] = None,
    vllm_python: VllmPython = None,
    vllm_tensor_parallel_size: VllmTensorParallelSize = None,
    strict: Strict = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Build the bundle a spec describes.

    Example: modelpack build specs/med.yaml --dry-run
    """
    from builder.build import build_bundle, plan_from_spec
    from builder.console import build_json, plan_json, plan_tables
    from builder.report import not_run, report_table

    _checked_device(device, "--device")
    if strict and no_verify:
        raise SpecError("--strict needs verification: with --no-verify no check runs")
    plan = plan_from_spec(spec, output_dir=output, merge_device=merge_device)
    console = _console(quiet)
    if dry_run:
        if as_json:
            _print_json(plan_json(plan, verification=not no_verify))
            return
        for table in plan_tables(plan, verification=not no_verify):
            console.print_result(table)
        return
    for warning in plan.warnings:
        console.say(f"warning: {warning}")
    with console.weights(plan) as weights_progress:
        result = build_bundle(plan, force=force, verify=not no_verify, device=device, strict=strict,
                              vllm_python=vllm_python, vllm_tensor_parallel_size=vllm_tensor_parallel_size,
                              progress=console.say, weights_progress=weights_progress)
    if as_json:
        _print_json(build_json(result))
        return
    if result.verification:
        console.show(report_table(result.verification))
    if result.run_file is not None:
        console.say(f"the run's timings, speed and memory: {result.run_file} (not part of the bundle)")
    verdict = "verified" if result.verification else "not verified (--no-verify)"
    typer.echo(f"built {result.bundle} in {result.timings['total']:.1f}s, {verdict}; digest {result.digest}"
               f"{_not_run(not_run(result.verification) if result.verification else [])}")


@app.command()
@user_errors_exit(report_is_result=True)
def verify(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder built by modelpack")],
    digest: Annotated[str | None, typer.Option(
        help="the bundle digest the sender gave you (sha256:...); a bundle with another manifest is refused")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="the sender's public key (PEM): the bundle's model.sig must be theirs, over exactly these files")] = None,
    trust_remote_code: Annotated[bool, typer.Option(
        "--trust-remote-code",
        help="allow verification to run the model code the bundle ships (read it first)")] = False,
    device: Annotated[str, typer.Option(help=DEVICES)] = "auto",
    python: Annotated[Path | None, typer.Option(
        help="Python interpreter that loads the model (e.g. the deployment's venv/bin/python)")] = None,
    max_memory: Annotated[str | None, typer.Option(
        help='per-device limits when accelerate spreads the model, e.g. "0=20GiB,1=20GiB,cpu=64GiB"')] = None,
    report_path: Annotated[Path | None, typer.Option("--report", help="also write the JSON report here")] = None,
    eval_text: Annotated[Path | None, typer.Option(
        help="a held-out UTF-8 text, also scored when measuring the quantized GGUF files")] = None,
    vllm_python: VllmPython = None,
    vllm_tensor_parallel_size: VllmTensorParallelSize = None,
    strict: Strict = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Re-run a bundle's checks: every file against manifest.json (before any bundle code runs), the digest or
    signature, expected answers, serving contract, and equivalence when the sources are on this machine.

    Example: modelpack verify dist/med --digest sha256:3f5c...
    """
    from builder.report import failure_message, not_run, report_table, skipped_failure
    from builder.verify import reverify_bundle
    from builder.vllm_stage import ServingStage, vllm_engine

    _checked_device(device, "--device")
    bundle = bundle.resolve()
    serving = ServingStage(engine=vllm_engine(vllm_python, option="--vllm-python"),
                           tensor_parallel_size=vllm_tensor_parallel_size) if vllm_python else None
    console = _console(quiet)
    report = reverify_bundle(bundle, expected_digest=digest, public_key=public_key, trust_remote_code=trust_remote_code,
                             python=python, device=device, max_memory=max_memory, serving=serving,
                             gguf_eval_text=eval_text, progress=console.say)
    if report_path:
        try:
            report_path.write_text(dump_json(report), encoding="utf-8")
        except OSError as exc:  # the receiver's path, not the bundle's fault: exit 2
            raise ModelpackError(f"--report {report_path}: cannot write the report there ({exc.strerror})") from exc
    if not as_json:
        console.show(report_table(report))
    message = failure_message(report) or (skipped_failure(report) if strict else None)
    if message:
        raise VerificationError(message, report=report)
    if as_json:
        _print_json({**report, "not_run": not_run(report)})
        return
    anchor = " (signature)" if public_key else " (digest)" if digest else ""
    typer.echo(f"{bundle}: verification passed ({len(report['prompts'])} prompts, {len(report['probes'])} probes), "
               f"{report['digest']}{anchor}{_not_run(not_run(report))}")


@app.command()
@user_errors_exit
def sign(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder built by modelpack")],
    key: Annotated[Path, typer.Option(help="elliptic-curve private key (PEM) to sign with")],
    as_json: AsJson = False,
) -> None:
    """Sign a bundle offline with OpenSSF model_signing: writes BUNDLE/model.sig over every file.

    Example: modelpack sign dist/med --key private.pem
    """
    from builder.trust import bundle_digest, sign_bundle

    signature = sign_bundle(bundle.resolve(), key)
    if as_json:
        _print_json({"ok": True, "bundle": str(bundle), "digest": bundle_digest(bundle), "signature": str(signature)})
        return
    typer.echo(f"signed {bundle} ({bundle_digest(bundle)}): {signature}")


@app.command()
@user_errors_exit
def inspect(
    path: Annotated[Path, typer.Argument(help="a base model folder, adapter checkpoint, Trainer output or bundle")],
    as_json: AsJson = False,
) -> None:
    """Say what a folder is and what it holds, from its configs and headers; nothing in it runs.

    Example: modelpack inspect output/checkpoint-1560
    """
    from builder.inspection import describe_inspection, inspect_folder

    found = inspect_folder(path)
    if as_json:
        _print_json(found.as_json())
        return
    typer.echo(describe_inspection(found) + "\n", nl=False)


PlainHttp = Annotated[bool, typer.Option(
    "--plain-http", help="talk HTTP, not HTTPS, to the registry (a local registry without TLS)")]


@app.command()
@user_errors_exit
def push(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder built by modelpack")],
    reference: Annotated[str, typer.Argument(help="where to push it: REGISTRY/REPOSITORY:TAG")],
    plain_http: PlainHttp = False,
    chunk_mb: Annotated[int | None, typer.Option(
        "--chunk-mb", min=1, help="upload blobs in chunks of this many MiB (default: one request per blob)")] = None,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Push a bundle to an OCI registry as a CNCF ModelPack artifact, after checking every file against its
    manifest.json; prints the artifact's digest beside the bundle's.

    Example: modelpack push dist/med registry.example.com/models/med:v1
    """
    from builder.handoff import push_bundle

    result = push_bundle(bundle, reference, plain_http=plain_http,
                         chunk_bytes=chunk_mb << 20 if chunk_mb else None, progress=_console(quiet).say)
    if as_json:
        _print_json(result.as_json())
        return
    typer.echo(f"pushed {bundle} ({result.bundle_digest}): {result.artifact}")


@app.command()
@user_errors_exit
def pull(
    reference: Annotated[str, typer.Argument(help="REGISTRY/REPOSITORY@sha256:... or REGISTRY/REPOSITORY:TAG")],
    dest: Annotated[Path, typer.Argument(help="the bundle folder to create")],
    digest: Annotated[str | None, typer.Option(
        help="the bundle digest the sender gave you (sha256:...); another bundle is refused")] = None,
    public_key: Annotated[Path | None, typer.Option(
        help="the sender's public key (PEM): the bundle's model.sig must be theirs, over exactly these files")] = None,
    plain_http: PlainHttp = False,
    force: Annotated[bool, typer.Option("--force", help="replace an existing bundle")] = False,
    quiet: Quiet = False,
    as_json: AsJson = False,
) -> None:
    """Pull a bundle from an OCI registry: every blob's sha256 checked as it streams, the bundle checked like
    `verify` does before anything of it runs, then published as DEST; on any failure nothing is written there.

    Example: modelpack pull registry.example.com/models/med@sha256:3f5c... dist/med
    """
    from builder.handoff import INTEGRITY_ONLY, INTEGRITY_ONLY_WARNING, pull_bundle

    console = _console(quiet)
    result = pull_bundle(reference, dest, expected_digest=digest, public_key=public_key, plain_http=plain_http,
                         force=force, progress=console.say)
    if as_json:
        _print_json(result.as_json())
        return
    if result.anchor == INTEGRITY_ONLY:
        console.say(f"warning: {INTEGRITY_ONLY_WARNING}")
    typer.echo(f"pulled {result.artifact} into {dest}: {result.files} files, bundle {result.bundle_digest}, "
               f"checked against the {result.anchor}" if result.anchor != INTEGRITY_ONLY
               else f"pulled {result.artifact} into {dest}: {result.files} files, bundle {result.bundle_digest}, "
               "integrity only")


@app.command()
@user_errors_exit
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion).

    Example: modelpack schema > specs/modelpack.schema.json
    """
    from builder.spec import spec_json_schema

    typer.echo(dump_json(spec_json_schema()), nl=False)


def main() -> None:
    app()
