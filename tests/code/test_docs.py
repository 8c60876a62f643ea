"""The documentation: a short README with a map of docs/, links that resolve, code names that exist,
and a docs site that builds with ``mkdocs build --strict``."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
PAGES = [REPO / "README.md", *DOCS]
LINK = re.compile(r"(?<!!)\[[^\]]+\]\(([^)\s]+)\)")
CODE_PATH = re.compile(r"(?<![\w./])(?:covid_tasks|dags|benchmarks|scripts|stack|docker|tests)/[\w./-]*\w")
MODULE_NAME = re.compile(r"\bcovid_tasks(?:\.\w+)+")


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    return re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", text))


def _anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {_slug(line.lstrip("#")) for line in text.splitlines() if line.startswith("#")}


def test_the_readme_fits_on_a_few_screens_and_maps_every_doc() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) < 400
    assert "make run" in readme and "make test" in readme
    linked = {target.split("#")[0] for target in LINK.findall(readme)}
    assert {f"docs/{p.name}" for p in DOCS if p.name != "index.md"} <= linked


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_every_relative_link_and_anchor_resolves(page: Path) -> None:
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert broken == []


@cache
def _defined(module_path: Path) -> set[str]:
    tree = ast.parse(module_path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            names |= {a.asname or a.name for a in node.names}
    return names


def _resolves(dotted: str) -> bool:
    """``covid_tasks.a.b.name``: the longest module prefix is a file and the rest is defined there."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        base = REPO.joinpath(*parts[:cut])
        module = base.with_suffix(".py") if base.with_suffix(".py").is_file() else base / "__init__.py"
        if module.is_file():
            rest = parts[cut:]
            return not rest or rest[0] in _defined(module) or (base / f"{rest[0]}.py").is_file()
    return False


def _texts() -> list[Path]:
    code = sorted((REPO / "covid_tasks").rglob("*.py")) + sorted((REPO / "dags").glob("*.py"))
    return [*PAGES, REPO / "Makefile", *code]


def test_every_code_path_and_module_the_docs_name_exists() -> None:
    missing = []
    for page in _texts():
        text = page.read_text()
        for path in set(CODE_PATH.findall(text)):
            candidate = REPO / path.rstrip(".")
            if not (candidate.exists() or Path(str(candidate).replace("{", "")).parent.exists()):
                missing.append(f"{page.relative_to(REPO)}: {path}")
        for dotted in set(MODULE_NAME.findall(text)):
            if not _resolves(dotted.rstrip(".")):
                missing.append(f"{page.relative_to(REPO)}: {dotted}")
    assert missing == []


def test_the_docs_site_builds_strictly(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    assert mkdocs, "mkdocs is installed by requirements-dev.txt"
    out = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def test_documented_mlflow_http_limits_are_the_code_s() -> None:
    """Every ``MLFLOW_HTTP_REQUEST_*=n`` the docs quote is the value the tasks and the service set."""
    from covid_tasks.registry import MLFLOW_HTTP_LIMITS

    quoted = [(page.name, name, value) for page in PAGES
              for name, value in re.findall(r"(MLFLOW_HTTP_REQUEST_\w+)=([\d.]+)", page.read_text())]
    assert quoted, "the docs quote the limits"
    assert [q for q in quoted if MLFLOW_HTTP_LIMITS.get(q[1]) != q[2]] == []


def _example(page: Path, name: str) -> str:
    found = re.search(rf"<!-- example:{name} -->\n```[a-z]*\n(.*?)\n```\n<!-- /example:{name} -->",
                      page.read_text(), re.S)
    assert found, f"{page.name} lost its example:{name} block"
    return found.group(1)


def test_the_examples_come_from_one_run() -> None:
    """scripts/readme_examples.py writes every example from one real run; an example left from an
    older run disagrees with the others on the threshold, the version or a film's P(covid)."""
    readme, serving = REPO / "README.md", REPO / "docs" / "serving.md"
    run, shown = _example(readme, "make-run"), _example(readme, "predict")
    threshold = float(re.search(r"evaluate .* at threshold ([\d.]+)", run).group(1))
    version = re.search(r"version (\d+) registered", run).group(1)
    model_line = re.search(r"\(version (\d+)\), threshold ([\d.]+)", shown)
    assert model_line.groups() == (version, f"{threshold:.3f}")
    film = re.search(r"Image : \S*00cfd1c1\.jpg\n(?:.*\n)*?P\(covid\) : ([\d.]+)%", shown)
    prob = float(film.group(1)) / 100
    answer = json.loads("\n".join(line[2:] for line in _example(serving, "serve").splitlines()
                                  if line.startswith("# ")))
    assert answer["model"]["version"] == version and round(answer["model"]["threshold"], 3) == threshold
    assert abs(answer["predictions"][0]["prob_covid"] - prob) <= 0.0005
    served = float(re.search(r"\[\[([\d.e-]+)\]\]", _example(serving, "models-serve")).group(1))
    assert abs(served - prob) <= 0.0005
