"""What a person sees on stderr: step lines, a progress bar for the weights on a terminal (plain lines at a modest rate
elsewhere), tables; `--quiet` keeps errors only and NO_COLOR turns colour off."""

from __future__ import annotations

import bisect
import itertools
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rich.console import Console as RichConsole
from rich.console import RenderableType
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from builder.formatting import describe_bytes
from builder.plan import BuildPlan, TensorPlan
from builder.report import not_run

if TYPE_CHECKING:
    from builder.build import BuildResult

# Off a terminal (CI logs, pipes) the weights' progress is a line at most this often, and one when done.
PLAIN_INTERVAL_S = 10.0


class WeightsProgress:
    """Bytes of weights written so far, turned into tensors done, throughput and the time left (pure: the clock and
    the output are given)."""

    def __init__(self, plan: BuildPlan, *, clock: Callable[[], float] = time.monotonic):
        sizes = [t.entry.nbytes for s in plan.shards for t in s.tensors]
        # The writer writes tensors in plan order: a tensor is done once the bytes reach its end.
        self.tensor_ends = list(itertools.accumulate(sizes))
        self.total = plan.weight_bytes
        self.done = 0
        self.clock = clock
        self.started = clock()
        self.finished: float | None = None

    def advance(self, nbytes: int) -> None:
        self.done += nbytes
        if self.done >= self.total:
            self.finished = self.clock()

    @property
    def tensors_done(self) -> int:
        return bisect.bisect_right(self.tensor_ends, self.done)

    def describe(self) -> str:
        elapsed = max((self.finished or self.clock()) - self.started, 1e-9)
        rate = self.done / elapsed
        line = (f"weights: {describe_bytes(self.done)} of {describe_bytes(self.total)}, "
                f"{self.tensors_done}/{len(self.tensor_ends)} tensors, {describe_bytes(rate)}/s")
        if self.done < self.total and rate > 0:
            line += f", about {(self.total - self.done) / rate:.0f}s left"
        else:
            line += f", {elapsed:.1f}s"
        return line


class Console:
    """The one writer of human output: lines and progress on stderr, so stdout stays for results (`print_result`)."""

    def __init__(self, *, quiet: bool = False, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.interactive = self.stream.isatty()
        self.rich = _rich_console(self.stream)

    def print_result(self, renderable: RenderableType) -> None:
        """A result the command was asked for (the dry run's plan), on stdout whatever --quiet says."""
        _rich_console(sys.stdout).print(renderable, soft_wrap=isinstance(renderable, str))

    def say(self, line: str) -> None:
        if not self.quiet:  # soft wrap: a digest or path is never broken across lines
            self.rich.print(line, markup=False, soft_wrap=True)

    def show(self, renderable: RenderableType) -> None:
        if not self.quiet:
            self.rich.print(renderable)

    @contextmanager
    def weights(self, plan: BuildPlan) -> Iterator[Callable[[int], None]]:
        """A callback for the writer's byte hook: a live bar on a terminal, a line every PLAIN_INTERVAL_S elsewhere;
        a summary line once the last byte is written (the build goes on with other phases)."""
        counter = WeightsProgress(plan)
        if self.quiet:
            yield counter.advance
            return
        bar = None
        if self.interactive:
            columns = (TextColumn("weights"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[tensors]}"),
                       TransferSpeedColumn(), TimeRemainingColumn())
            bar = Progress(*columns, console=self.rich, transient=True)
            task = bar.add_task("weights", total=counter.total, tensors="")
        last_line = [counter.started]

        def advance(nbytes: int) -> None:  # called from the writer thread
            if bar is not None and not counter.done:  # shown from the first byte, after the build's first lines
                bar.start()
            counter.advance(nbytes)
            if bar is not None:
                bar.update(task, completed=counter.done,
                           tensors=f"{counter.tensors_done}/{len(counter.tensor_ends)} tensors")
            if counter.finished is not None:
                if bar is not None:
                    bar.stop()
                self.say(counter.describe())
            elif bar is None and counter.clock() - last_line[0] >= PLAIN_INTERVAL_S:
                last_line[0] = counter.clock()
                self.say(counter.describe())

        try:
            yield advance
        finally:
            if bar is not None:
                bar.stop()


def _rich_console(stream: TextIO) -> RichConsole:
    """Colour only on a terminal and without NO_COLOR (no-color.org); elsewhere a fixed width, so logs and tests read
    the same on every machine."""
    interactive = stream.isatty()
    return RichConsole(file=stream, no_color="NO_COLOR" in os.environ or not interactive, highlight=False,
                       width=None if interactive else 120)


def plan_tables(plan: BuildPlan, *, verification: bool) -> list[RenderableType]:
    """The dry run: every output file with its size and tensors, what is skipped, disk needed against free, and the
    checks verification will run."""
    files = Table(title=f"bundle {plan.spec.name} -> {plan.spec.output.dir}", title_justify="left")
    for column, justify in (("file", "left"), ("size", "right"), ("merged", "right"), ("copied", "right"),
                            ("cast", "right"), ("from", "left")):
        files.add_column(column, justify=justify)  # type: ignore[arg-type]
    totals = {"merge": 0, "copy": 0, "cast": 0}
    for shard in plan.shards:
        counts = {"merge": 0, "copy": 0, "cast": 0}
        for tensor in shard.tensors:
            counts[tensor.action] += 1
            totals[tensor.action] += 1
        files.add_row(shard.filename, describe_bytes(shard.nbytes), str(counts["merge"]), str(counts["copy"]),
                      str(counts["cast"]), f"weights ({plan.mode}, {plan.out_dtype.name})")
    for copy in plan.copies:
        files.add_row(copy.dest, describe_bytes(copy.source.stat().st_size), "", "", "", copy.role)
    files.add_row("load.py, README.md, manifest.json, ...", "< 1 MB", "", "", "", "written by modelpack")
    files.add_row("total", describe_bytes(plan.disk_needed),
                  str(totals["merge"]), str(totals["copy"]), str(totals["cast"]), "")

    merges = Table(title="merged tensors", title_justify="left")
    for column in ("tensor", "shape", "LoRA"):
        merges.add_column(column)
    for tensor in plan.merged_tensors:
        merges.add_row(tensor.name, str(list(tensor.source.shape)), _describe_merge(tensor))

    free = _free_space(plan.spec.output.dir)
    facts = [f"disk: {describe_bytes(plan.disk_needed)} needed, {describe_bytes(free)} free"
             + ("" if free >= plan.disk_needed else " (not enough: the build would stop before writing)")]
    leftovers = [p.name for a in plan.adapters for p in a.checkpoint.ignored_files]
    if leftovers:
        facts.append("skipped: training leftovers " + ", ".join(leftovers))
    facts += [f"warning: {warning}" for warning in plan.warnings]
    facts += [f"{name}: {detail}" for name, detail in verification_checks(plan, verification=verification)]
    return [files, *([merges] if plan.merged_tensors else []), "\n".join(facts)]


def verification_checks(plan: BuildPlan, *, verification: bool) -> list[tuple[str, str]]:
    """The checks the build's verification runs on this plan, as (check, what) rows."""
    if not verification:
        return [("verify", "skipped (--no-verify)")]
    verify = plan.spec.verify
    rows = [("verify: integrity", "every file against manifest.json"),
            ("verify: serving", "eos ids, chat template, special ids, vocabulary"),
            ("verify: equivalence", "next-token logits of the bundle against base + adapter through peft"),
            ("verify: answers", f"{len(verify.prompts)} prompts (their expectations must hold), {len(verify.probes)} "
                                f"probes (answers recorded), up to {verify.max_new_tokens} new tokens each")]
    if verify.compare_base:
        rows.append(("verify: base", "the same prompts answered by the base alone"))
    if "vllm" in verify.serve:
        rows.append(("verify: vllm", "the bundle served in vLLM with the card's flags, every answer's token ids "
                                     "compared with the bundle's"))
    rows.append(("verify: cost", plan.verification_cost.describe().removeprefix("verification: ")))
    return rows


def verification_plan(plan: BuildPlan, *, verification: bool) -> dict:
    """The checks of verification_checks as data, for `build --dry-run --json`: their names in the order they run,
    and what they count."""
    verify, cost = plan.spec.verify, plan.verification_cost
    checks = ["integrity", "serving", "equivalence", "answers", *(["base"] if verify.compare_base else []),
              *(["gguf"] if plan.spec.export.gguf is not None else []), *(["vllm"] if "vllm" in verify.serve else [])]
    return {"run": verification, "checks": checks if verification else [], "prompts": len(verify.prompts),
            "probes": len(verify.probes), "max_new_tokens": verify.max_new_tokens, "model_loads": len(cost.loads),
            "device": verify.device}


def _describe_merge(tensor: TensorPlan) -> str:
    parts = [(f"{d.module} lora_bias scale={d.scaling:g}" if d.kind == "bias" else
              f"{d.module} r={d.rank} scale={d.scaling:g}{' DoRA' if d.magnitude is not None else ''}")
             + (f" ({d.adapter}, weight {d.weight:g})" if d.adapter != "adapter" else "")
             for d in tensor.deltas]
    if tensor.token_rows:
        parts.insert(0, f"{len(tensor.token_rows.indices)} trained token rows")
    return ", ".join(parts)


def _free_space(folder: Path) -> int:
    """Free bytes on the filesystem the bundle will be written to (its nearest existing folder)."""
    existing = Path(os.path.abspath(folder))
    while not existing.exists():
        existing = existing.parent
    return shutil.disk_usage(existing).free


def validation_json(spec: Path, plan: BuildPlan) -> dict:
    """`validate --json`: the spec is valid, and what a build of it would do."""
    return {"ok": True, "spec": str(spec), "name": plan.spec.name, "mode": plan.mode,
            "merged_tensors": len(plan.merged_tensors), "warnings": list(plan.warnings)}


def plan_json(plan: BuildPlan, *, verification: bool) -> dict:
    """`build --dry-run --json`: the files the bundle will hold, the tensor counts, the disk, the checks."""
    actions = [t.action for s in plan.shards for t in s.tensors]
    return {
        "ok": True, "bundle": str(plan.spec.output.dir), "mode": plan.mode,
        "dtype": plan.out_dtype.name,
        "files": [*({"name": s.filename, "bytes": s.nbytes} for s in plan.shards),
                  *({"name": c.dest, "bytes": c.source.stat().st_size} for c in plan.copies)],
        "tensors": {"merged": actions.count("merge"), "copied": actions.count("copy"), "cast": actions.count("cast")},
        "skipped_training_files": [p.name for a in plan.adapters for p in a.checkpoint.ignored_files],
        "disk": {"needed": plan.disk_needed, "free": _free_space(plan.spec.output.dir)},
        "verification": verification_plan(plan, verification=verification),
        "warnings": list(plan.warnings),
    }


def build_json(result: BuildResult) -> dict:
    """`build --json`: where the bundle is, its digest, how long each phase took, what verification found, the
    checks that did not run and where the run's report was written (build.run_file_path)."""
    return {"ok": True, "bundle": str(result.bundle), "digest": result.digest,
            "timings": {phase: round(seconds, 3) for phase, seconds in result.timings.items()},
            "verified": result.verification is not None, "verification": result.verification,
            "not_run": not_run(result.verification),
            "run_file": str(result.run_file) if result.run_file is not None else None,
            "warnings": list(result.plan.warnings)}
