"""The package's structure, read with ``ast``: no import cycle, libraries below the stages, short pieces,
one data-root contract and one call shape for the stages.

Imports inside functions count (a lazy import still ties two modules together).
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "covid_tasks"
#: The only modules that may call the stages: the Airflow adapter and the command line.
ADAPTERS = {"covid_tasks.airflow_support", "covid_tasks.cli", "covid_tasks.__main__"}
STAGE_PACKAGE = "covid_tasks.stages"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 150
#: File names under the data root; only covid_tasks/layout.py may spell them.
DATA_ROOT_FILES = {"labeled.csv", "splits.csv", "split_assignments.json", "metrics.json", "predictions.csv",
                   "val_predictions.csv", "champion_predictions.csv", "operating_point.json",
                   "class_indices.json", "train.keras", "finetune.keras", "model.keras", "manifest.json",
                   "pull_report.json", "relabel_report.json", "split_report.json", "metadata.csv"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in the file."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(GRAPH) == []


def _is_stage(module: str) -> bool:
    return module == STAGE_PACKAGE or module.startswith(STAGE_PACKAGE + ".")


def test_no_library_imports_a_stage() -> None:
    offenders = {m: sorted(filter(_is_stage, deps)) for m, deps in GRAPH.items()
                 if not _is_stage(m) and m not in ADAPTERS and any(map(_is_stage, deps))}
    assert offenders == {}


def test_stages_do_not_import_each_other() -> None:
    offenders = {m: sorted(filter(_is_stage, deps)) for m, deps in GRAPH.items()
                 if _is_stage(m) and m != STAGE_PACKAGE and any(map(_is_stage, deps))}
    assert offenders == {}


def test_the_adapters_reach_the_stages_through_the_registry_only() -> None:
    for adapter in ADAPTERS & set(GRAPH):
        assert {d for d in GRAPH[adapter] if _is_stage(d)} <= {STAGE_PACKAGE}, adapter


def _long_pieces() -> list[str]:
    out = []
    files = sorted(PACKAGE.rglob("*.py")) + sorted((REPO / "dags").glob("*.py"))
    for path in files:
        text = path.read_text()
        rel = path.relative_to(REPO)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            out.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name}: {lines} lines")
    return out


def test_no_module_over_500_and_no_function_or_class_over_150_lines() -> None:
    assert _long_pieces() == []


def _docstring_ids(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant):
            out.add(id(body[0].value))
    return out


def test_only_the_layout_module_spells_data_root_file_names() -> None:
    offenders = []
    for name, path in MODULES.items():
        if name == "covid_tasks.layout":
            continue
        tree = ast.parse(path.read_text())
        docs = _docstring_ids(tree)
        offenders += [f"{path.relative_to(REPO)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and id(node) not in docs
                      and isinstance(node.value, str) and node.value in DATA_ROOT_FILES]
    assert offenders == []


def test_every_stage_has_the_one_call_shape() -> None:
    from covid_tasks.stages import STAGES

    assert list(STAGES) == ["pull", "relabel", "check_data", "split", "train", "finetune", "evaluate",
                            "register"]
    for name, fn in STAGES.items():
        params = list(inspect.signature(fn).parameters.values())
        assert [p.name for p in params[:2]] == ["cfg", "run_key"], name
        assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in params[:2]), name
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:]), name
        assert fn.__name__ == name and fn.__module__ == f"{STAGE_PACKAGE}.{name}"


def test_an_unknown_stage_is_refused_by_name() -> None:
    from covid_tasks.config import Config
    from covid_tasks.stages import run

    with pytest.raises(ValueError, match="unknown stage 'trian'"):
        run("trian", Config(), "key")


def test_the_longest_first_test_files_exist() -> None:
    """``tests/conftest.py`` hands these files out first; a renamed one would silently lose its place."""
    from tests.conftest import LONGEST_FIRST

    assert [p for p in LONGEST_FIRST if not (REPO / p).is_file()] == []
