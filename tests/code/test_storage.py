"""storage: safe names and crash-safe writes."""

from __future__ import annotations

import json
import math

import pytest

from covid_tasks.storage import (
    UnsafePathError,
    atomic_path,
    jsonable,
    read_json,
    resolve_under,
    safe_relpath,
    write_json,
)


@pytest.mark.parametrize("name", ["/etc/passwd", "../x.jpg", "images/../../x", "a/./b", "", "  ",
                                  "C:\\x.jpg", "c:/x.jpg", "a\x00b", "..", "a\\..\\b"])
def test_unsafe_names_are_rejected(name, tmp_path):
    with pytest.raises(UnsafePathError):
        safe_relpath(name)
    with pytest.raises(UnsafePathError):
        resolve_under(tmp_path, name)


@pytest.mark.parametrize("name", ["x.jpg", "images/x.jpeg", "a b (1).png", "nested/dir/x.png", "x..y.jpg"])
def test_safe_names_stay_inside(name, tmp_path):
    target = resolve_under(tmp_path, name)
    assert tmp_path.resolve() in target.parents


def test_symlink_escape_is_rejected(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_under(root, "link/x.jpg")


def test_crash_mid_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_jsonable_makes_strict_json(tmp_path):
    import numpy as np

    obj = {"a": float("nan"), "b": [np.float32(0.5), (1, 2)], "c": np.int64(3), "d": math.inf}
    out = jsonable(obj)
    assert out == {"a": None, "b": [0.5, [1, 2]], "c": 3, "d": None}
    json.dumps(out, allow_nan=False)
    write_json(tmp_path / "x.json", obj)
    assert read_json(tmp_path / "x.json")["a"] is None
