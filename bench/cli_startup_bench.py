#!/usr/bin/env python
"""How fast the light commands answer (issue 20, "The CLI starts fast"): wall time of `modelpack --help`,
`validate`, `inspect` (a bundle, a checkpoint) and `build --dry-run`, each the median of --runs fresh processes,
against `python -c pass` measured in the same run.

    python bench/cli_startup_bench.py                          # this checkout
    python bench/cli_startup_bench.py --checkout /work/ref     # and another checkout's package, in the same run

Every command runs as `python -c "from builder.cli import main; main()" ARGS` in the checkout's root, with that
folder also first on PYTHONPATH, so its own builder/ package is the one imported (ahead of an editable install of
another checkout) with this environment's libraries; the runs of all trees alternate, so a busy moment of a shared
machine falls on all of them alike. The inputs are this checkout's, by absolute path: specs/demo.yaml,
demo/checkpoint-200, and a bundle built once from the demo spec with --no-verify into --workdir by this checkout.
Each command's output is checked once per tree (exit status 0), so a broken tree cannot post a fast time; that run
also fills the bytecode cache, kept under WORKDIR/pycache so that no checkout is written to (an installed package's
modules start from cached bytecode too). The table goes to stdout, a JSON result to WORKDIR/results/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MAIN = "from builder.cli import main; main()"


def commands(bundle: Path) -> dict[str, list[str]]:
    """Label -> the arguments of `python -c`: the baseline, then each light command."""
    modelpack = ["-c", MAIN]
    return {
        "python -c pass": ["-c", "pass"],
        "modelpack --help": [*modelpack, "--help"],
        "validate specs/demo.yaml": [*modelpack, "validate", str(REPO / "specs" / "demo.yaml")],
        "inspect BUNDLE": [*modelpack, "inspect", str(bundle)],
        "inspect demo/checkpoint-200": [*modelpack, "inspect", str(REPO / "demo" / "checkpoint-200")],
        "build specs/demo.yaml --dry-run": [*modelpack, "build", str(REPO / "specs" / "demo.yaml"), "--dry-run"],
    }


def environment(checkout: Path, workdir: Path) -> dict[str, str]:
    """The checkout first on PYTHONPATH; bytecode cached as an installed package's is, but under the workdir (no
    checkout is written to), whatever PYTHONDONTWRITEBYTECODE says here: compiling every module on every start
    would be timed otherwise."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    return {**env, "PYTHONPATH": os.pathsep.join([str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]),
            "PYTHONPYCACHEPREFIX": str(workdir / "pycache"), "NO_COLOR": "1", "COLUMNS": "120"}


def run_once(args: list[str], checkout: Path, workdir: Path) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *args], cwd=checkout, env=environment(checkout, workdir), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def check(args: list[str], checkout: Path, workdir: Path, label: str) -> None:
    """One run with its output kept (which also fills the bytecode cache): a command that fails is not timed."""
    done = subprocess.run([sys.executable, *args], cwd=checkout, env=environment(checkout, workdir),
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{checkout}: `{label}` exited {done.returncode}:\n{done.stdout}{done.stderr}")


def check_package(checkout: Path, workdir: Path) -> None:
    """The checkout's own builder/ is the one its commands import."""
    done = subprocess.run([sys.executable, "-c", "import builder; print(builder.__file__)"], cwd=checkout,
                          env=environment(checkout, workdir), capture_output=True, text=True, check=True)
    if not Path(done.stdout.strip()).is_relative_to(checkout):
        sys.exit(f"{checkout}: `import builder` finds {done.stdout.strip()}, not the checkout's own package")


def build_bundle(workdir: Path) -> Path:
    bundle = workdir / "qwen-tiny-med"
    subprocess.run([sys.executable, "-c", MAIN, "build", "specs/demo.yaml", "-o", str(bundle), "--force",
                    "--no-verify", "--quiet"], cwd=REPO, env=environment(REPO, workdir), check=True)
    return bundle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="another checkout's root (its builder/ package is timed too); repeatable")
    parser.add_argument("--runs", type=int, default=5, help="fresh processes per command and tree (median)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/modelpack-cli-bench"))
    options = parser.parse_args()

    trees = [REPO, *(c.resolve() for c in options.checkout)]
    options.workdir.mkdir(parents=True, exist_ok=True)
    cases = commands(build_bundle(options.workdir))
    for tree in trees:
        check_package(tree, options.workdir)
        for label, args in cases.items():
            check(args, tree, options.workdir, label)
    times: dict[Path, dict[str, list[float]]] = {tree: {label: [] for label in cases} for tree in trees}
    for _ in range(options.runs):
        for label, args in cases.items():
            for tree in trees:
                times[tree][label].append(run_once(args, tree, options.workdir))

    medians = {tree: {label: statistics.median(values) for label, values in by_label.items()}
               for tree, by_label in times.items()}
    header = f"{'command':<34}" + "".join(f"{str(tree):>28}" for tree in trees)
    print(f"median of {options.runs} fresh processes, seconds (x python -c pass of the same tree)")
    print(header)
    for label in cases:
        cells = []
        for tree in trees:
            seconds, baseline = medians[tree][label], medians[tree]["python -c pass"]
            cells.append(f"{seconds:.3f}" + ("" if label == "python -c pass" else f" ({seconds / baseline:.1f}x)"))
        print(f"{label:<34}" + "".join(f"{cell:>28}" for cell in cells))

    results = options.workdir / "results"
    results.mkdir(exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "runs": options.runs,
              "trees": {str(tree): {"median_s": medians[tree], "runs_s": times[tree]} for tree in trees}}
    (results / f"cli-startup-{stamp}.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
