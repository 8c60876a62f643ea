"""The upstream ``metadata.csv``: read it row by row without trusting it.

The ieee8023 table is hand-edited upstream: its header ends with a comma (an unnamed last
column), a ``finding`` sometimes carries an unquoted comma, and an unterminated quote can swallow
the rows after it. :func:`read_metadata` keeps every row, flagging those whose fields cannot be
trusted, so that ``relabel`` can count them instead of silently mislabelling them.
"""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path
from typing import Any

from covid_tasks.config import METADATA_COLUMNS


def read_metadata(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Read ``metadata.csv``; flag rows whose fields do not line up with the header.

    The upstream header ends with a comma, so it has an unnamed last column. A row is malformed
    when it has text under an unnamed column or past the header's end, fewer fields than the
    named columns, or more fields than the file's usual row (an unquoted comma in ``finding``
    shifted its fields). A record spanning several lines is malformed when a used column holds
    a line break, when its field count is not the usual one, or when a line inside a field reads
    as a whole row: an unterminated quote swallowed the rows that follow. Each line of such a
    record then counts as one malformed row, with its own line number, so no row vanishes.
    """
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text ({exc.reason})") from None
    lines = list(io.StringIO(text, newline=""))  # physical lines, split as the csv reader splits
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [h.strip() for h in next(reader, [])]
        records: list[tuple[int, int, list[str]]] = []  # (first line, last line, fields)
        line = reader.line_num + 1
        for cells in reader:
            start, line = line, reader.line_num + 1
            if any(c.strip() for c in cells):
                records.append((start, reader.line_num, cells))
    except csv.Error as exc:
        raise ValueError(f"{path} is not valid CSV near line {reader.line_num}: {exc}") from None
    missing = [c for c in METADATA_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{path} lacks required column(s): {', '.join(missing)} "
                         f"(required: {', '.join(METADATA_COLUMNS)})")
    index = {c: header.index(c) for c in METADATA_COLUMNS}
    used = sorted({*index.values(), *([header.index("folder")] if "folder" in header else [])})
    n_named = [i for i, h in enumerate(header) if h][-1] + 1
    width = _usual_width([len(cells) for _, _, cells in records], len(header))
    rows: list[dict[str, Any]] = []
    for start, end, cells in records:
        spill = any(c.strip() for i, c in enumerate(cells) if i >= len(header) or not header[i])
        malformed = spill or len(cells) < n_named or len(cells) > width
        if end > start:
            malformed = malformed or len(cells) != width or any(
                "\n" in cells[i] or "\r" in cells[i] for i in used if i < len(cells)) or any(
                _reads_as_row(part, n_named) for c in cells for part in c.splitlines()[1:])
        row: dict[str, Any] = {c: cells[i].strip() if i < len(cells) else "" for c, i in index.items()}
        row["source_line"] = start
        row["malformed"] = malformed
        rows.append(row)
        if malformed:  # each further line of the record was a row of its own
            rows += [{**dict.fromkeys(index, ""), "source_line": n, "malformed": True}
                     for n in range(start + 1, end + 1) if lines[n - 1].strip()]
    return header, rows


def _usual_width(widths: list[int], header_width: int) -> int:
    """The field count of most rows (ties: the header's, else the smallest)."""
    if not widths:
        return header_width
    counts = Counter(widths)
    top = max(counts.values())
    tied = [w for w, n in counts.items() if n == top]
    return header_width if header_width in tied else min(tied)


def _reads_as_row(line: str, n_named: int) -> bool:
    """Whether one line of text inside a field parses as a whole metadata row."""
    return len(next(csv.reader([line]), [])) >= n_named


