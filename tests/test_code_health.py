"""Lint, types and declared versions, checked by the one test command (so CI runs exactly the README's command).

ruff and mypy read their settings from pyproject.toml ([tool.ruff], [tool.mypy]); each runs as a subprocess of this
interpreter and a failure shows its whole output.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )


def test_ruff_finds_nothing():
    result = run_tool("ruff", "check", "--no-cache", "--output-format", "concise", ".")
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"


def test_mypy_finds_nothing():
    """mypy over the files pyproject.toml names (builder/ and the bundle runtime under templates/)."""
    result = run_tool("mypy")
    assert result.returncode == 0, f"mypy failed:\n{result.stdout}{result.stderr}"


def declared_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    requirements = [Requirement(line) for line in project["dependencies"]]
    return {requirement.name: requirement for requirement in requirements}


def readme_compatibility() -> str:
    """The README's Compatibility section as one line of text (its sentences wrap across lines)."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = re.search(r"^## Compatibility\n(.*?)(?=^## )", readme, re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Compatibility' section"
    return " ".join(section.group(1).split())


def test_declared_transformers_and_peft_ranges_are_the_readme_promise():
    text = readme_compatibility()
    promise = re.search(r"supported range is transformers >= ([\d.]+), < ([\d.]+) and peft >= ([\d.]+)", text)
    assert promise, f"README's Compatibility section no longer states the supported range:\n{text}"
    transformers_low, transformers_high, peft_low = promise.groups()
    declared = declared_requirements()
    assert declared["transformers"].specifier == SpecifierSet(f">={transformers_low},<{transformers_high}"), (
        f"pyproject.toml declares {declared['transformers']}, README promises "
        f"transformers >= {transformers_low}, < {transformers_high}"
    )
    assert declared["peft"].specifier == SpecifierSet(f">={peft_low}"), (
        f"pyproject.toml declares {declared['peft']}, README promises peft >= {peft_low}"
    )


def test_versions_the_readme_says_are_tested_lie_in_the_declared_range():
    tested = re.findall(r"transformers (\d[\d.]*) \+ peft (\d[\d.]*)", readme_compatibility())
    assert tested, "README's Compatibility section no longer names the tested transformers + peft versions"
    declared = declared_requirements()
    for transformers_version, peft_version in tested:
        assert Version(transformers_version) in declared["transformers"].specifier, transformers_version
        assert Version(peft_version) in declared["peft"].specifier, peft_version
