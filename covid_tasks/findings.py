"""Findings: normalise upstream ``finding`` strings and map them to the two classes.

Labels follow torchxrayvision's COVID19_Dataset: a finding is split into tokens on ``/``, ``,``,
``;``, ``|`` and ``+``, so the old flat vocabulary (``COVID-19``, ``COVID-19, ARDS``) and the new
hierarchical one (``Pneumonia/Viral/COVID-19``) both work. Each token is normalised (Unicode NFKC,
case-folded, every dash, underscore, dot or space one separator) and compared with
``COVID_SYNONYMS`` (``COVID 19``, ``SARS-CoV2``, ``2019-nCoV``, full-width or non-breaking-hyphen
spellings...); a token naming COVID-19 makes the row ``covid`` unless the token negates it
(``non-COVID``, ``COVID-19 negative``), every other real finding ``non_covid`` (``SARS`` of 2003
and ``MERS-CoV`` too). Findings that look like COVID-19 (``covid``, ``corona``, ``ncov``,
``sars-cov``...) but match no rule are flagged (:func:`covid_like_unmatched`).
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from typing import Any, Iterable

from covid_tasks.config import CLASS_NAMES

#: Names of COVID-19 and of its virus, as normalised words (:func:`normalise_finding`); the
#: separators between words are optional (``covid19``, ``sars cov2`` and ``sarscov2`` all match).
COVID_SYNONYMS: tuple[str, ...] = ("covid 19", "covid", "sars cov 2", "2019 ncov", "ncov 2019", "hcov 19")
#: Words right before (``non-COVID``, ``suspected COVID-19``) or right after (``COVID-19
#: negative``) a COVID-19 name that deny or question it: no ``covid`` label (and a warning).
NEGATED_BEFORE: tuple[str, ...] = ("non", "not", "no", "negative for", "without", "excluded", "rule out",
                                   "ruled out", "suspected", "suspect", "possible", "probable", "query",
                                   "unlikely", "post", "history of")


NEGATED_AFTER: tuple[str, ...] = ("negative", "neg", "excluded", "ruled out", "unlikely", "suspected",
                                  "not confirmed", "not detected", "pcr negative")


#: Fragments of a normalised finding (spaces removed) that suggest COVID-19: a finding holding one
#: without matching a synonym is reported (``covid_like_unmatched``) and logged as a warning.
COVID_LIKE: tuple[str, ...] = ("covid", "corona", "ncov", "cov2", "cov19", "sarscov")
PLACEHOLDER_FINDINGS = frozenset({"todo", "unknown", ""})
_TOKEN_SEPARATORS = re.compile(r"[/,;|+]")
_NON_WORD = re.compile(r"[\W_]+")


def _phrases(phrases: tuple[str, ...]) -> str:
    """A regex alternation of normalised phrases whose inner spaces are optional."""
    return "|".join(r"\s?".join(map(re.escape, ph.split())) for ph in phrases)


def _words_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """Whole-word alternatives over normalised text; the spaces inside a phrase are optional."""
    return re.compile(rf"(?<![^\W_])(?:{_phrases(phrases)})(?![^\W_])")


_COVID = _words_pattern(COVID_SYNONYMS)
_NEGATED = re.compile(rf"(?<![^\W_])(?:(?:{_phrases(NEGATED_BEFORE)})\s(?:{_phrases(COVID_SYNONYMS)})"
                      rf"|(?:{_phrases(COVID_SYNONYMS)})\s(?:{_phrases(NEGATED_AFTER)}))(?![^\W_])")


#: The labelling rule applied to every row that survives the table.
LABEL_RULE = ("label 'covid' when any finding token (split on '/', ',', ';', '|', '+'; Unicode NFKC,"
              " case, dashes and separators normalised) names COVID-19 by one of COVID_SYNONYMS"
              " ('COVID-19', 'COVID 19', 'covid', 'SARS-CoV-2', 'SARS-CoV2', '2019-nCoV', 'HCoV-19')"
              " and does not negate it ('non-COVID', 'COVID-19 negative', 'suspected COVID-19');"
              " every other finding 'non_covid' (including 'SARS' and 'MERS-CoV')")


def normalise_finding(text: str) -> str:
    """Unicode NFKC, case-folded, every run of non-letters/digits one space.

    ``"ＣＯＶＩＤ‑19"`` (full-width letters, a non-breaking hyphen) becomes ``"covid 19"``.
    """
    text = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", text or "").casefold())
    return _NON_WORD.sub(" ", text).strip()


def finding_tokens(finding: str) -> list[str]:
    """Split a finding on ``/ , ; | +`` into normalised, non-empty tokens.

    Args:
        finding: a ``finding`` cell, flat (``COVID-19, ARDS``) or hierarchical
            (``Pneumonia/Viral/COVID-19``).

    Returns:
        The tokens, e.g. ``["pneumonia", "viral", "covid 19"]``.
    """
    return [t for t in (normalise_finding(raw) for raw in _raw_tokens(finding)) if t]


def _raw_tokens(finding: str) -> list[str]:
    return _TOKEN_SEPARATORS.split(unicodedata.normalize("NFKC", finding or ""))


def _names_covid(raw_token: str) -> bool:
    """A token naming COVID-19, not negated or questioned (``COVID-19?``)."""
    token = normalise_finding(raw_token)
    return bool(_COVID.search(token)) and not _NEGATED.search(token) and "?" not in raw_token


def label_for(finding: str) -> str | None:
    """Map a finding to a class name.

    Args:
        finding: a ``finding`` cell.

    Returns:
        ``"covid"`` when a token names COVID-19 (``COVID_SYNONYMS``, not negated), ``None`` for
        placeholders (``todo``, ``Unknown``, empty), else ``"non_covid"``.
    """
    tokens = finding_tokens(finding)
    if not tokens or all(t in PLACEHOLDER_FINDINGS for t in tokens):
        return None
    return CLASS_NAMES[1] if any(_names_covid(t) for t in _raw_tokens(finding)) else CLASS_NAMES[0]


def covid_like_unmatched(finding: str) -> bool:
    """Whether a finding looks like COVID-19 (``COVID_LIKE``) yet is not labelled ``covid``."""
    compact = normalise_finding(finding).replace(" ", "")
    return any(f in compact for f in COVID_LIKE) and label_for(finding) != CLASS_NAMES[1]


def finding_inventory(findings: Iterable[str]) -> list[dict[str, Any]]:
    """Every distinct finding with its label (or ``placeholder``), row count and COVID-like flag.

    Args:
        findings: one ``finding`` cell per row.

    Returns:
        ``[{"finding", "label", "rows", "covid_like_unmatched"}]``, most frequent first.
    """
    counts = Counter(findings)
    out = []
    for finding, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        label = label_for(finding)
        out.append({"finding": finding, "label": label or "placeholder", "rows": n,
                    "covid_like_unmatched": covid_like_unmatched(finding)})
    return out


