"""What ``make run`` prints at the end: the latest run's gate and decision, and the registry's aliases."""

from __future__ import annotations

from typing import Any

from covid_tasks.config import CHALLENGER_ALIAS, CHAMPION_ALIAS, Config, redact_uri
from covid_tasks.layout import METRICS, DataRoot
from covid_tasks.storage import read_json


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def summary(cfg: Config) -> tuple[str, dict[str, Any]]:
    """Return a human-readable summary and the same facts as a dict.

    Args:
        cfg: configuration (``data_root``, ``tracking_uri``, ``model_name``).

    Returns:
        ``(text, {"tracking_uri", "model_name", "latest_run", "champion_version",
        "challenger_version"})``; a version is ``None`` when the alias is absent or the
        registry cannot be read. The tracking URI appears without its credentials.
    """
    from covid_tasks.registry import RegistryUnavailableError, alias_version

    lines = []
    uri = redact_uri(cfg.tracking_uri)
    result: dict[str, Any] = {"tracking_uri": uri, "model_name": cfg.model_name}
    root = DataRoot.of(cfg)
    runs = sorted(root.runs.glob(f"*/{METRICS}"), key=lambda p: p.stat().st_mtime)
    if runs:
        m = read_json(runs[-1])
        result["latest_run"] = {"run_dir": str(runs[-1].parent), **{k: m.get(k) for k in (
            "passed", "decision", "sensitivity", "specificity", "threshold", "roc_auc", "n_test", "reasons",
            "promotion_reasons")}}
        verdict = "PASSED" if m["passed"] else "FAILED: " + "; ".join(m.get("reasons", []))
        ci = m.get("sensitivity_ci95") or [None, None]
        lines.append(f"Latest run: {runs[-1].parent}")
        lines.append(f"  test sensitivity {_fmt(m['sensitivity'])} [{_fmt(ci[0])}, {_fmt(ci[1])}] "
                     f"(min {m['min_sensitivity']}), specificity {_fmt(m['specificity'])} "
                     f"(min {m['min_specificity']}), ROC AUC {_fmt(m.get('roc_auc'))}, "
                     f"threshold {_fmt(m['threshold'])}, n_test {m['n_test']}")
        lines.append(f"  gate {verdict}")
        if m.get("champion"):
            c = m["champion"]
            lines.append(f"  champion v{c['version']} on the same test split: sensitivity "
                         f"{_fmt(c.get('sensitivity'))}, specificity {_fmt(c.get('specificity'))}")
        if "decision" in m:
            why = "; ".join(m.get("promotion_reasons") or [])
            lines.append(f"  decision {m['decision']}" + (f" ({why})" if why and m["passed"] else ""))
        if m.get("promotion"):
            lines.append(f"  promotion rule {m['promotion']['rule']}: {m['promotion']['reason']}")
        audit, cal = m.get("shortcut_audit") or {}, m.get("calibration") or {}
        if audit:
            flag = " - WARNING (see docs/evaluation.md, Shortcut audit)" if audit.get("warning") else ""
            lines.append(f"  shortcut audit: test ROC AUC full {_fmt(audit.get('roc_auc_full'))}, "
                         f"lungs hidden {_fmt(audit.get('roc_auc_lungs_hidden'))}{flag}")
        if cal:
            lines.append(f"  calibration {cal.get('method')}: test ECE {_fmt(cal.get('ece_before'))} -> "
                         f"{_fmt(cal.get('ece_after'))}")
    found = {}
    for alias in (CHAMPION_ALIAS, CHALLENGER_ALIAS):
        try:
            found[alias] = alias_version(cfg.model_name, alias, cfg.tracking_uri)
        except RegistryUnavailableError as exc:
            found[alias] = None
            if not any(line.startswith("Registry unavailable") for line in lines):
                lines.append(f"Registry unavailable: {exc}")
        mv = found[alias]
        result[f"{alias}_version"] = int(mv.version) if mv is not None else None
    lines += _registered_lines(cfg.model_name, uri, found)
    sample = next(iter(sorted(root.images.glob("*"))), None)
    if result.get(f"{CHAMPION_ALIAS}_version") is None:
        lines += [
            "No champion yet, so there is nothing to look up: the gate above says which metric fell",
            "short of which threshold. Retrain with more epochs, or lower the gate for a demo, e.g.",
            "  make run RUN_CONF='{\"min_sensitivity\": 0.3, \"min_specificity\": 0.0, ...}'",
            f"Browse the logged run: .venv/bin/mlflow ui --backend-store-uri {uri}",
        ]
        return "\n".join(lines + _credentials_note(uri, cfg.tracking_uri)), result
    lines += [
        "Look it up:",
        f"  .venv/bin/python -c \"from covid_tasks.registry import load_champion; "
        f"m = load_champion('{uri}'); print(m.version, m.threshold, m.class_indices)\"",
        "Predict:",
        f"  COVID_MLFLOW_TRACKING_URI={uri} .venv/bin/python -m covid_tasks predict "
        f"{sample or '<image>'} --model models:/{cfg.model_name}@{CHAMPION_ALIAS}",
        f"Browse: .venv/bin/mlflow ui --backend-store-uri {uri}",
    ]
    return "\n".join(lines + _credentials_note(uri, cfg.tracking_uri)), result


def _credentials_note(shown: str, uri: str) -> list[str]:
    if shown == uri:
        return []
    return ["(credentials hidden as ***: pass them as MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"]


def _registered_lines(name: str, uri: str, found: dict[str, Any]) -> list[str]:
    """One ``Registered:`` line per version, naming every alias it carries (one line when the
    champion is also the challenger, as after a promotion)."""
    lines, shown = [], set()
    for alias, mv in found.items():
        if mv is None:
            lines.append(f"Registered: no {name}@{alias} in {uri}")
            continue
        if str(mv.version) in shown:
            continue
        shown.add(str(mv.version))
        aliases = " and ".join(f"@{a}" for a, other in found.items()
                               if other is not None and str(other.version) == str(mv.version))
        tags = mv.tags or {}
        lines.append(f"Registered: {name} version {mv.version} is {aliases} (sensitivity "
                     f"{tags.get('sensitivity')}, specificity {tags.get('specificity')}, "
                     f"run {tags.get('run_key')})")
    return lines
