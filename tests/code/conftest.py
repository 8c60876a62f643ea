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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 server (SeaweedFS, tests/helpers/s3_server.py) for one test module."""
    from tests.helpers.s3_server import SeaweedS3

    srv = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
