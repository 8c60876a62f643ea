"""docker-compose.yaml as data: load it as Compose does, interpolate ``${VAR}`` and read commands.

The process stack (``make stack``) and the deployment tests both read the compose file through
this module, so the two agree on how a value is resolved. Needs PyYAML (an Airflow dependency).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml


class _Reset:
    """Compose's ``!reset`` tag: the key is removed from the merged model."""


class ComposeLoader(yaml.SafeLoader):
    """YAML loader that understands Compose's ``!reset`` tag."""


ComposeLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _drop_resets(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_resets(v) for k, v in obj.items() if not isinstance(v, _Reset)}
    if isinstance(obj, list):
        return [_drop_resets(v) for v in obj]
    return obj


def load(path: str | Path) -> dict[str, Any]:
    """A Compose file as Compose reads it before interpolation (anchors and merge keys resolved)."""
    return _drop_resets(yaml.load(Path(path).read_text(), Loader=ComposeLoader))


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


class MissingVariable(KeyError):
    """A ``${VAR:?message}`` whose variable is unset or empty."""


def interpolate(obj: Any, env: dict[str, str]) -> Any:
    """Compose-spec interpolation of every string in ``obj``.

    Supports ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-d}``, ``${VAR-d}``, ``${VAR:?err}``,
    ``${VAR?err}``, ``${VAR:+alt}`` and ``${VAR+alt}``.

    Raises:
        MissingVariable: a required variable is unset (``:?``/``?``).
    """
    if isinstance(obj, dict):
        return {k: interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        spec = _BRACED.match(m.group("braced"))
        if not spec:
            raise ValueError(f"unsupported interpolation {m.group(0)!r}")
        name, op, arg = spec["name"], spec["op"], spec["arg"]
        value, is_set = env.get(name), name in env
        present = bool(value) if op and op.startswith(":") else is_set
        if op in (":-", "-"):
            return value if present else arg
        if op in (":?", "?"):
            if not present:
                raise MissingVariable(f"{name}: {arg}")
            return value
        if op in (":+", "+"):
            return arg if present else ""
        return value or ""

    return _VAR.sub(sub, obj)


def variables(text: str) -> dict[str, str | None]:
    """Variable name -> operator (None for plain ``${VAR}``) of every interpolation in a file."""
    out: dict[str, str | None] = {}
    for m in _VAR.finditer(text):
        if m.group(0) == "$$":
            continue
        if m.group("plain"):
            out.setdefault(m.group("plain"), None)
            continue
        spec = _BRACED.match(m.group("braced"))
        out.setdefault(spec["name"], spec["op"])
    return out


def env_file(text: str) -> dict[str, str]:
    """``KEY=VALUE`` lines of an env file (comments and blank lines ignored, no quoting)."""
    out = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def args(value: str | list[Any] | None) -> list[str]:
    """A Compose ``command``/``entrypoint`` as an argument list."""
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(c) for c in value]


def celery_queues(service: dict[str, Any]) -> set[str] | None:
    """Queues of an ``airflow celery worker`` service (None when the service is no worker)."""
    argv = args(service.get("command"))
    if argv[:2] != ["celery", "worker"]:
        return None
    queues: list[str] = []
    for i, arg in enumerate(argv):
        if arg in ("--queues", "-q"):
            queues += argv[i + 1].split(",")
        elif arg.startswith("--queues="):
            queues += arg.split("=", 1)[1].split(",")
    return set(queues) or {"default"}


def workers(model: dict[str, Any]) -> dict[str, set[str]]:
    """Celery worker services of a Compose model and the queues each serves."""
    out = {}
    for name, svc in model["services"].items():
        queues = celery_queues(svc)
        if queues is not None:
            out[name] = queues
    return out


def flag(argv: list[str], name: str) -> str | None:
    """The value of ``name=value`` / ``name value`` in ``argv`` (``None`` when absent)."""
    for i, arg in enumerate(argv):
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
        if arg == name and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            return argv[i + 1]
    return None


def set_flag(argv: list[str], name: str, value: str) -> list[str]:
    """``argv`` with ``name=value`` replacing any ``name=...`` / ``name ...`` (appended if absent)."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith(name + "="):
            continue
        if arg == name:
            skip = i + 1 < len(argv) and not argv[i + 1].startswith("-")
            continue
        out.append(arg)
    return out + [f"{name}={value}"]
