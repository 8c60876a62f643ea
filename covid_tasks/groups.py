"""Split groups: patients that must stay in one split, linked by shared files or identical images.

A patient group is the connected component of patients that share a ``group_id``, a file name or
an image's SHA-256 (:func:`patient_groups`); ``split`` keeps each group in one split, so one image
never sits in two splits, and cross-validation folds use the same groups.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable


def link_groups(members: Iterable[str], links: Iterable[Iterable[str]]) -> dict[str, str]:
    """Union-find: map each member to its group id, the smallest member id linked to it.

    Args:
        members: the ids to map (e.g. patient ids).
        links: sets of ids that must share a group; ids not in ``members`` still link others.

    Returns:
        ``{member: group id}`` for every id in ``members``.
    """
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for link in links:
        ids = sorted(link)
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {m: find(m) for m in members}


def group_members(groups: dict[str, str]) -> dict[str, list[str]]:
    """Invert ``{member: group}`` into ``{group: [members]}``."""
    out: dict[str, list[str]] = defaultdict(list)
    for member, group in groups.items():
        out[group].append(member)
    return out


def patient_groups(labeled: Any) -> dict[str, str]:
    """Patient -> group id, linking patients that share a ``group_id``, a file or a SHA-256."""
    patients = labeled["patientid"].tolist()
    links: list[set[str]] = []
    for col in ("group_id", "filename", "sha256"):
        if col in labeled.columns:
            by_key: dict[str, set[str]] = defaultdict(set)
            for key, pid in zip(labeled[col].tolist(), patients, strict=True):
                if key != "":
                    by_key[key].add(pid)
            links += [pids for pids in by_key.values() if len(pids) > 1]
    return link_groups(set(patients), links)


