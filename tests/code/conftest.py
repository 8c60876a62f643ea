"""Fixtures shared by the tests of ``tests/code``."""

from __future__ import annotations

from typing import Any, Iterator

import pytest


@pytest.fixture(scope="session")
def serve_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The inference service on a real registry with two versions (see tests/helpers/serve_stack.py)."""
    from tests.helpers.serve_stack import build_stack

    stack = build_stack(tmp_path_factory)
    yield stack
    stack.service.stop()
