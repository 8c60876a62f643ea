"""File helpers shared by every stage: atomic writes, JSON/CSV I/O and safe relative paths.

Every file a stage produces is written to a temporary sibling and renamed into place, so a
crash mid-write leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

_UMASK = os.umask(0o022)
os.umask(_UMASK)


class UnsafePathError(ValueError):
    """A file name or key that would escape its root (absolute, ``..``, empty or odd)."""


def safe_relpath(name: str) -> str:
    """Validate a file name or object key taken from untrusted input and return it normalised.

    Rejects absolute paths, drive letters, backslashes, ``..`` and ``.`` segments, NUL bytes
    and empty names, so joining the result to a root can never leave that root.

    Raises:
        UnsafePathError: when the name is unsafe.
    """
    if not isinstance(name, str) or not name.strip():
        raise UnsafePathError(f"empty file name {name!r}")
    if "\x00" in name or "\\" in name:
        raise UnsafePathError(f"file name {name!r} contains a NUL byte or backslash")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        raise UnsafePathError(f"file name {name!r} is absolute")
    parts = PurePosixPath(name).parts
    if any(p in ("..", ".") for p in name.split("/")) or not parts:
        raise UnsafePathError(f"file name {name!r} contains '..' or '.' segments")
    return "/".join(parts)


def resolve_under(root: Path, name: str) -> Path:
    """Join a validated relative name to ``root`` and check the result stays inside it."""
    rel = safe_relpath(name)
    root_r = Path(root).resolve()
    target = (root_r / rel).resolve()
    if target != root_r and root_r not in target.parents:
        raise UnsafePathError(f"file name {name!r} resolves outside {root_r}")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it onto ``path``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; published files follow the umask
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, final)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def jsonable(obj: Any) -> Any:
    """Return ``obj`` with NaN/inf floats as ``None`` and tuples as lists: strict JSON for XCom."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return jsonable(obj.item())
    return obj


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted strict JSON (NaN as null), atomically."""
    text = json.dumps(jsonable(obj), indent=2, sort_keys=True, default=str, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def write_csv(path: str | os.PathLike[str], frame: Any) -> None:
    """Write a pandas DataFrame as CSV atomically (no index column)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def require_file(path: str | os.PathLike[str], produced_by: str) -> Path:
    """Fail early, naming the stage that should have produced ``path``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run the '{produced_by}' step first")
    return p


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, hex, read in 1 MiB blocks."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
