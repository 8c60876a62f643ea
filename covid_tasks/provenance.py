"""Provenance: where an image comes from (its *source*), one rule for every stage.

An image's source is the metadata's ``source`` column when it is there and non-empty, else the
host of its ``url`` (lower-case, without ``www.``, port or trailing dot: ``radiopaedia.org``,
``eurorad.org``, ``sirm.org``, ``pubs.rsna.org``...), else ``"unknown"``. The upstream
covid-chestxray-dataset has no ``source`` column (June 2020 and newest), so its sources are url
hosts: 35 of them among the 394 labelled images of the June 2020 set.

``evaluate`` (within-source metrics) and ``data_checks`` (rows per source, source-label
association) both use :func:`sources` / :func:`labeled_sources`.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any, Mapping
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import pandas as pd

UNKNOWN = "unknown"
SOURCE_COLUMN = "source"
URL_COLUMN = "url"
_SEPARATORS = re.compile(r"[\s;,|]+")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


def _text(value: Any) -> str:
    """A cell as stripped text; ``None``, NaN, ``pd.NA`` and ``NaT`` are empty."""
    if isinstance(value, str):
        return value.strip()
    if value is None or (isinstance(value, float) and value != value):
        return ""
    text = str(value)
    return "" if text in ("<NA>", "nan", "NaT") else text.strip()


@functools.lru_cache(maxsize=65536)
def url_host(url: str) -> str:
    """The host of a URL, lower-case, without ``www.``, port, credentials or trailing dot.

    Args:
        url: e.g. ``https://www.Radiopaedia.org/cases/x``; a URL without a scheme
            (``sirm.org/2020/...``) is read as a host and path; when a cell holds several URLs
            (separated by spaces, ``;``, ``,`` or ``|``) the first one counts.

    Returns:
        The host (``radiopaedia.org``), or ``""`` when there is none or it has no dot
        (``n/a``, ``localhost``).
    """
    first = next((part for part in _SEPARATORS.split(url.strip()) if part), "")
    if not first:
        return ""
    if not _SCHEME.match(first):
        first = "//" + first
    try:
        host = urlsplit(first).hostname or ""
    except ValueError:  # e.g. an unbalanced IPv6 bracket
        return ""
    host = host.lower().rstrip(".")
    if "." not in host:  # "n/a", "see paper", "localhost": no public host
        return ""
    return host[4:] if host.startswith("www.") else host


def image_source(row: Mapping[str, Any]) -> str:
    """The source of one metadata row.

    Args:
        row: a mapping (dict, ``pandas.Series``) with ``source`` and/or ``url`` entries; either
            may be missing, empty or NaN.

    Returns:
        The stripped ``source`` when non-empty, else :func:`url_host` of ``url`` when it has one,
        else ``"unknown"``.
    """
    source = _text(row.get(SOURCE_COLUMN))
    if source:
        return source
    return url_host(_text(row.get(URL_COLUMN))) or UNKNOWN


def sources(frame: "pd.DataFrame") -> "pd.Series":
    """:func:`image_source` of every row of a metadata table, vectorised.

    Args:
        frame: the metadata (any columns; ``source`` and ``url`` are used when present).

    Returns:
        A string Series aligned with ``frame``'s index, named ``source``.
    """
    import pandas as pd

    out = pd.Series(UNKNOWN, index=frame.index, dtype=object, name=SOURCE_COLUMN)
    if URL_COLUMN in frame.columns:
        urls = frame[URL_COLUMN].map(_text)
        hosts = urls.map(url_host)
        out = out.where(hosts == "", hosts)
    if SOURCE_COLUMN in frame.columns:
        given = frame[SOURCE_COLUMN].map(_text)
        out = out.where(given == "", given)
    return out.astype(object).rename(SOURCE_COLUMN)


def labeled_sources(labeled: "pd.DataFrame", metadata: "pd.DataFrame | None") -> "pd.Series":
    """The source of each row of ``labeled.csv``.

    ``labeled.csv`` keeps neither ``url`` nor ``source``; each image's source is taken from the
    first metadata row (in file order) naming its ``filename``. A ``source`` column already in
    ``labeled`` wins where non-empty.

    Args:
        labeled: the labelled table (``filename`` column).
        metadata: the upstream metadata table, or ``None`` (every source is then ``"unknown"``
            unless ``labeled`` has its own ``source`` column).

    Returns:
        A string Series aligned with ``labeled``'s index, named ``source``.

    Raises:
        KeyError: ``labeled`` has no ``filename`` column, or ``metadata`` is given without one.
    """
    import pandas as pd

    if "filename" not in labeled.columns:
        raise KeyError("labeled table has no 'filename' column")
    out = pd.Series(UNKNOWN, index=labeled.index, dtype=object, name=SOURCE_COLUMN)
    if metadata is not None:
        if "filename" not in metadata.columns:
            raise KeyError("metadata table has no 'filename' column")
        names = metadata["filename"].map(_text)
        by_name = sources(metadata).groupby(names.to_numpy(), sort=False).first()
        out = labeled["filename"].map(_text).map(by_name).fillna(UNKNOWN).astype(object)
    if SOURCE_COLUMN in labeled.columns:
        given = labeled[SOURCE_COLUMN].map(_text)
        out = out.where(given == "", given)
    return out.rename(SOURCE_COLUMN)
