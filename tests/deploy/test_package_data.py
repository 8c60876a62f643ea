"""Every non-Python file the package needs at run time is declared as package data.

The Docker image installs ``covid_tasks`` from its source folder without ``-e``: a file that
``pyproject.toml`` does not declare (the lung segmenter's weights, the inference page) would be
missing there while every editable checkout still works.
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_non_python_files_of_the_package_are_package_data() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    missing = []
    for path in sorted((REPO / "covid_tasks").rglob("*")):
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        rel = path.relative_to(REPO)
        ok = False
        for package, patterns in declared.items():
            base = Path(*package.split("."))
            if base in rel.parents:
                inner = rel.relative_to(base).as_posix()
                ok = ok or any(fnmatch.fnmatch(inner, p) for p in patterns)
        if not ok:
            missing.append(str(rel))
    assert not missing, f"not declared in [tool.setuptools.package-data]: {missing}"
