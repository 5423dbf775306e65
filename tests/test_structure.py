"""The package's structure: every module has a layer, imports run one way (from a higher layer to a lower one), no
import circle, and the README's layout table is the modules' own first docstring lines.

Imports are read from the source's AST, all of them: at module level, inside functions, and under TYPE_CHECKING,
so a circle cannot hide behind a deferred import.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "builder"

# Lowest first. A module may import modules of its own layer (without a circle) and of the layers below it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("foundation", (
        "builder", "builder.errors", "builder.interrupts", "builder.formatting", "builder.subprocesses",
        "builder.runtime", "builder.runtime.load", "builder.runtime.bundle_check", "builder.runtime.equivalence",
        "builder.runtime.gguf_check", "builder.manifest", "builder.dtypes",
    )),
    ("inputs", (
        "builder.spec", "builder.safetensors_io", "builder.sources", "builder.trust", "builder.tokenizer_files",
        "builder.adapter_match", "builder.adapter_compose", "builder.merge", "builder.finite", "builder.chat_template",
        "builder.chat",
        "builder.remote_code", "builder.gguf_facts", "builder.runtimes", "builder.verification_cost",
        "builder.refusals", "builder.sizing",
    )),
    ("plan", ("builder.plan", "builder.report")),
    ("writers and exporters", (
        "builder.configs", "builder.merge_blocks", "builder.merge_device", "builder.weights", "builder.gguf_export",
        "builder.serving", "builder.render", "builder.card", "builder.staging", "builder.registry",
        "builder.model_artifact",
    )),
    ("verification", ("builder.vllm_stage", "builder.verify")),
    ("build orchestration", ("builder.build", "builder.scaffold", "builder.inspection", "builder.handoff")),
    ("CLI and console", ("builder.console", "builder.json_outputs", "builder.cli", "builder.__main__")),
)


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(tree: ast.AST, known: set[str]) -> set[str]:
    """The package's modules a file imports anywhere in it; `from builder import configs` names builder.configs."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in known}
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (the runtime's own sibling imports are not package imports)."""
    files = {module_name(path, package): path for path in sorted(package.rglob("*.py"))}
    known = set(files)
    return {name: imported_modules(ast.parse(path.read_text(encoding="utf-8")), known) - {name}
            for name, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    layer = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
    names = [name for name, _ in LAYERS]
    return [f"{importer} ({names[layer[importer]]}) imports {imported} ({names[layer[imported]]})"
            for importer, imports in sorted(graph.items()) for imported in sorted(imports)
            if layer[imported] > layer[importer]]


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(cycles)


def test_every_module_has_exactly_one_layer():
    mapped = [module for _, modules in LAYERS for module in modules]
    assert len(mapped) == len(set(mapped)), "a module is in two layers"
    assert set(import_graph(PACKAGE)) == set(mapped), "add the new module to LAYERS (and the README's layout table)"


def test_imports_run_down_the_layers_without_a_circle():
    graph = import_graph(PACKAGE)
    assert upward_imports(graph) == []
    assert import_cycles(graph) == []


@pytest.mark.parametrize("file, wrong_import, expected", [
    # at module level: a lower layer reaching up
    ("spec.py", "from builder.plan import BuildPlan\n", "builder.spec (inputs) imports builder.plan (plan)"),
    # deferred into a function, the way circles hid before
    ("plan.py", "def _later():\n    from builder.verify import verify_bundle\n",
     "builder.plan (plan) imports builder.verify (verification)"),
    # only for the type checker
    ("chat.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from builder.build import BuildResult\n",
     "builder.chat (inputs) imports builder.build (build orchestration)"),
])
def test_the_layer_rule_catches_a_wrong_import_wherever_it_hides(tmp_path, file, wrong_import, expected):
    copy = tmp_path / "builder"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / file).write_text((copy / file).read_text(encoding="utf-8") + "\n\n" + wrong_import, encoding="utf-8")
    assert expected in upward_imports(import_graph(copy))


def test_a_circle_within_one_layer_is_caught(tmp_path):
    copy = tmp_path / "builder"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    # tokenizer_files reads JSON through sources; sources importing tokenizer_files back closes a circle of inputs
    (copy / "sources.py").write_text((copy / "sources.py").read_text(encoding="utf-8")
                                     + "\n\ndef _later():\n    import builder.tokenizer_files\n", encoding="utf-8")
    graph = import_graph(copy)
    assert upward_imports(graph) == []
    assert ["builder.sources", "builder.tokenizer_files"] in import_cycles(graph)


def layout_table() -> str:
    """The README's layout table: each module's layer and the first line of its docstring."""
    rows = ["| module | layer | what it is |", "|---|---|---|"]
    for layer, modules in LAYERS:
        for module in modules:
            path = PACKAGE.parent / (module.replace(".", "/") + ".py")
            if not path.is_file():
                path = path.with_suffix("") / "__init__.py"
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            first = " ".join(docstring.split("\n\n")[0].split())
            shown = "builder/" if module == "builder" else path.relative_to(PACKAGE.parent).as_posix()
            rows.append(f"| `{shown}` | {layer} | {first} |")
    return "\n".join(rows)


def test_every_module_opens_with_a_docstring():
    missing = [p.relative_to(ROOT).as_posix() for p in PACKAGE.rglob("*.py")
               if not ast.get_docstring(ast.parse(p.read_text(encoding="utf-8")))]
    assert missing == []


def test_the_readmes_layout_table_is_the_modules_own_docstrings():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- layout: start -->\n(.*?)\n<!-- layout: end -->", readme, re.DOTALL)
    assert found, "README.md lacks the <!-- layout: start --> ... <!-- layout: end --> block"
    assert found.group(1) == layout_table(), "paste this table into README.md:\n" + layout_table()
