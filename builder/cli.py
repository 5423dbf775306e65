"""The `modelpack` command: parses arguments, calls the library, prints; one handler maps errors to exit codes."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from builder.errors import ModelpackError, VerificationError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Package a base model and a LoRA adapter into a verified, self-contained bundle.\n\n"
    "Exit codes: 0 success, 1 unexpected error (a bug: please report it), 2 invalid spec or input, "
    "3 verification failed.",
)


def _say(line: str) -> None:
    typer.echo(line, err=True)


def _print_table(report: dict) -> None:
    from rich.console import Console

    from builder.verify import report_table

    Console(stderr=True, width=160).print(report_table(report))


def user_errors_exit(command):
    """The one error handler: a ModelpackError prints as one message and exits with its code.

    Anything else is our bug and keeps its traceback (exit 1).
    """

    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ModelpackError as error:
            typer.echo(f"error: {error.message}", err=True)
            raise typer.Exit(error.exit_code) from None

    return run


@app.command()
@user_errors_exit
def validate(spec: Annotated[Path, typer.Argument(help="the spec YAML file")]) -> None:
    """Check a spec and its sources without writing anything."""
    from builder.build import plan_from_spec

    plan = plan_from_spec(spec)
    typer.echo(f"{spec}: valid ({plan.mode}, {len(plan.merged_tensors)} tensors to merge)")


@app.command()
@user_errors_exit
def build(
    spec: Annotated[Path, typer.Argument(help="the spec YAML file")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="bundle folder (overrides output.dir)")] = None,
    force: Annotated[bool, typer.Option("--force", help="replace an existing bundle")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="skip reload-and-chat verification")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the plan and write nothing")] = False,
    device: Annotated[Optional[str], typer.Option(help="verification device: auto | cpu | cuda (default: verify.device)")] = None,
) -> None:
    """Build the bundle a spec describes."""
    from builder.build import build_bundle, plan_from_spec
    from builder.plan import describe_plan

    plan = plan_from_spec(spec, output_dir=output)
    if dry_run:
        typer.echo(describe_plan(plan))
        return
    for warning in plan.warnings:
        _say(f"warning: {warning}")
    result = build_bundle(plan, force=force, verify=not no_verify, device=device, report=_say)
    if result.verification:
        _print_table(result.verification)
    verdict = "verified" if result.verification else "not verified (--no-verify)"
    typer.echo(f"built {result.bundle} in {result.timings['total']:.1f}s, {verdict}")


@app.command()
@user_errors_exit
def verify(
    bundle: Annotated[Path, typer.Argument(help="a bundle folder built by modelpack")],
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    python: Annotated[Optional[Path], typer.Option(
        help="Python interpreter that loads the model (e.g. the deployment's venv/bin/python)")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        help='per-device limits when accelerate spreads the model, e.g. "0=20GiB,1=20GiB,cpu=64GiB"')] = None,
    report_path: Annotated[Optional[Path], typer.Option("--report", help="also write the JSON report here")] = None,
) -> None:
    """Re-run a bundle's checks: files against manifest.json, expected answers, serving contract."""
    from builder.manifest import read_manifest
    from builder.verify import failure_message, recorded_sources, verify_bundle

    bundle = bundle.resolve()
    sources, unavailable = recorded_sources(bundle, read_manifest(bundle))
    report = verify_bundle(bundle, python=python, device=device, sources=sources, max_memory=max_memory,
                           on_progress=_say)
    if unavailable:
        report["skipped"] = [{"check": "equivalence", "reason": unavailable}]
    if report_path:
        report_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _print_table(report)
    message = failure_message(report)
    if message:
        raise VerificationError(message)
    typer.echo(f"{bundle}: verification passed ({len(report['prompts'])} prompts, {len(report['probes'])} probes)")


@app.command()
@user_errors_exit
def schema() -> None:
    """Print the spec's JSON Schema (for editor completion)."""
    from builder.spec import spec_json_schema

    typer.echo(json.dumps(spec_json_schema(), indent=2, ensure_ascii=False))


def main() -> None:
    app()
