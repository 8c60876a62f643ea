"""Weekly snapshots of a source for the season replay: growth in row order, upstream edits, faults.

Each week's snapshot is a folder in the upstream layout (``metadata.csv`` plus ``images/``, files
hard-linked to the real data where unchanged) that one DAG run pulls. The real data set is fed in
the metadata's row order (the upstream appends rows as cases arrive): this simulates arrival, it
is not the real history. Two kinds of change ride on the growth:

* **events**, which a weekly process must take in its stride and which stay from their week on:
  an image replaced with different bytes, a finding corrected (``Pneumonia`` or ``todo`` becomes
  ``COVID-19``), rows removed upstream; and a week with no change at all;
* **faults**, injected for one week on top of that week's growth and gone the week after: a
  required column renamed, 20% of existing ``covid`` rows flipped to another finding, a new source
  bringing 40 images of one class, near-duplicates of current test films under new patient ids,
  and truncated images.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

#: The faults, each named in the results; ``truncated_images`` is the one a run may pass (the files
#: are quarantined by pull, so the data checks see nothing wrong).
FAULTS = ("schema_change", "label_noise", "one_class_source", "near_duplicates_of_test", "truncated_images")
EVENTS = ("replace_image", "finding_corrected", "rows_removed", "no_change")
NEW_SOURCE_URL = "https://new-source.example.org/cases/"
NOISE_SHARE = 0.20
NEW_SOURCE_IMAGES = 40
NEAR_DUPLICATES = 6
TRUNCATED = 5
REMOVED_ROWS = 5
Rows = list[list[str]]
Extra = dict[str, bytes]  # file name -> bytes written into this week's snapshot only


@dataclass(frozen=True)
class Week:
    """One week of the replay: how much of the source has arrived, and what else happens."""

    number: int
    fraction: float
    event: str | None = None
    fault: str | None = None


def full_plan() -> list[Week]:
    """13 weeks: 12 growth steps from 40% to 100% in row order, the events, and five faults, each
    followed by a normal week (the injected change gone again)."""
    steps = [0.40 + i * 0.60 / 11 for i in range(12)]
    # The finding correction comes late: the first 'todo' / 'Pneumonia' X-ray rows are at 68% of the
    # June 2020 metadata, so only from week 9 on has one been pulled in an earlier week.
    layout = [(None, None), ("replace_image", None), (None, "schema_change"), ("rows_removed", None),
              (None, "label_noise"), (None, None), ("no_change", None), (None, "one_class_source"),
              (None, None), (None, "near_duplicates_of_test"), ("finding_corrected", None),
              (None, "truncated_images"), (None, None)]
    weeks, step = [], 0
    for number, (event, fault) in enumerate(layout, 1):
        if event != "no_change" and number > 1:
            step += 1
        weeks.append(Week(number, round(steps[step], 4), event, fault))
    return weeks


def quick_plan() -> list[Week]:
    """5 weeks on the sample data: growth from 70% and two faults, each followed by a normal week."""
    return [Week(1, 0.70), Week(2, 0.80, fault="label_noise"), Week(3, 0.85),
            Week(4, 0.92, fault="near_duplicates_of_test"), Week(5, 1.0)]


class SnapshotBuilder:
    """Builds each week's snapshot folder from a source in the upstream layout.

    Events accumulate (a replaced image stays replaced); a fault touches only its own week. The
    near-duplicate fault copies films the pipeline currently holds in its test split, so it reads
    the data root (``labeled.csv`` and ``split_assignments.json``) of the replay.
    """

    def __init__(self, source: Path, work: Path, data_root: Path) -> None:
        self.source, self.work, self.data_root = Path(source), Path(work), Path(data_root)
        with open(self.source / "metadata.csv", newline="", encoding="utf-8-sig") as fh:
            rows = list(csv.reader(fh))
        self.header, self.rows = rows[0], [r for r in rows[1:] if any(c.strip() for c in r)]
        self.col = {name: i for i, name in enumerate(self.header) if name}
        self.replaced: dict[str, bytes] = {}  # filename -> the new bytes
        self.corrected: set[int] = set()  # row indices whose finding became COVID-19
        self.removed: set[int] = set()  # row indices removed upstream
        self.generated = self.work / "generated"

    # -- the week ------------------------------------------------------------------------------
    def build(self, week: Week) -> tuple[Path, dict[str, Any]]:
        """Write ``snapshots/week-NN`` and return it with what was done to it."""
        count = round(len(self.rows) * week.fraction)
        done: dict[str, Any] = {"week": week.number, "rows_in_source": count}
        if week.event:
            done["event"] = self._event(week.event, count)
        rows = [list(r) for i, r in enumerate(self.rows[:count]) if i not in self.removed]
        for i in self.corrected:
            if i < count and i not in self.removed:
                rows[self._position(i, count)][self.col["finding"]] = "COVID-19"
        extra: dict[str, bytes] = {}
        header = list(self.header)
        if week.fault:
            done["fault"] = week.fault
            done["fault_details"] = self._fault(week.fault, header, rows, extra)
        target = self.work / "snapshots" / f"week-{week.number:02d}"
        self._write(target, header, rows, extra)
        return target, done

    def _position(self, index: int, count: int) -> int:
        return index - sum(1 for r in self.removed if r < index)

    # -- events ------------------------------------------------------------------------------
    def _event(self, event: str, count: int) -> dict[str, Any]:
        if event == "no_change":
            return {"event": event}
        candidates = [i for i in range(count) if i not in self.removed and self._is_xray(self.rows[i])
                      and self._has_image(self.rows[i])]
        if event == "replace_image":
            i = candidates[len(candidates) // 3]
            name = self.rows[i][self.col["filename"]]
            self.replaced[name] = _reencode(self.source / "images" / name, quality=88)
            return {"event": event, "filename": name}
        if event == "finding_corrected":  # a row pulled in an earlier week, any X-ray view
            wanted = ("todo", "Pneumonia")
            pulled = self._pulled_names()
            pick = next((i for i in range(count) if i not in self.removed
                         and self.rows[i][self.col["finding"]].strip() in wanted
                         and self.rows[i][self.col["modality"]].strip() == "X-ray"
                         and self.rows[i][self.col["filename"]] in pulled), None)
            if pick is None:
                raise ValueError("no 'todo' or 'Pneumonia' X-ray row pulled in an earlier week to correct")
            before = self.rows[pick][self.col["finding"]]
            self.corrected.add(pick)
            return {"event": event, "filename": self.rows[pick][self.col["filename"]], "from": before,
                    "to": "COVID-19"}
        if event == "rows_removed":
            picks = candidates[1:len(candidates):max(1, len(candidates) // REMOVED_ROWS)][:REMOVED_ROWS]
            self.removed.update(picks)
            return {"event": event, "filenames": [self.rows[i][self.col["filename"]] for i in picks]}
        raise ValueError(f"unknown event {event!r}; events: {EVENTS}")

    # -- faults ------------------------------------------------------------------------------
    def _fault(self, fault: str, header: list[str], rows: Rows, extra: Extra
               ) -> dict[str, Any]:
        handlers: dict[str, Callable[..., dict[str, Any]]] = {
            "schema_change": self._schema_change, "label_noise": self._label_noise,
            "one_class_source": self._one_class_source, "near_duplicates_of_test": self._near_duplicates,
            "truncated_images": self._truncated}
        if fault not in handlers:
            raise ValueError(f"unknown fault {fault!r}; faults: {FAULTS}")
        return handlers[fault](header, rows, extra)

    def _schema_change(self, header: list[str], rows: Rows, extra: Extra) -> dict[str, Any]:
        header[self.col["finding"]] = "diagnosis"
        return {"renamed": {"finding": "diagnosis"}}

    def _label_noise(self, header: list[str], rows: Rows, extra: Extra) -> dict[str, Any]:
        """20% of the images the pipeline labels ``covid`` now get another finding (every row of each)."""
        labelled = self._labelled("covid")
        fi, fn = self.col["finding"], self.col["filename"]
        names = sorted(n for n in labelled if any(r[fn] == n for r in rows))
        flipped = set(names[:: max(1, round(1 / NOISE_SHARE))][: max(1, round(len(names) * NOISE_SHARE))])
        for r in rows:
            if r[fn] in flipped:
                r[fi] = "Pneumonia"
        return {"flipped": len(flipped), "of_covid_images": len(names)}

    def _one_class_source(self, header: list[str], rows: Rows, extra: Extra
                          ) -> dict[str, Any]:
        from PIL import Image, ImageOps

        fi, fn = self.col["finding"], self.col["filename"]
        covid = [r for r in rows if "covid" in r[fi].lower() and self._is_xray(r) and self._has_image(r)]
        added = []
        for k, original in enumerate(covid[:NEW_SOURCE_IMAGES]):
            with Image.open(self.source / "images" / original[fn]) as img:
                buf = io.BytesIO()
                ImageOps.mirror(img.convert("RGB")).save(buf, "JPEG", quality=92)
            name = f"season-new-source-{k:03d}.jpg"
            extra[name] = buf.getvalue()
            rows.append(self._row(original, patientid=f"season-src-{k:03d}", filename=name,
                                  url=f"{NEW_SOURCE_URL}{k}"))
            added.append(name)
        return {"images": len(added), "label": "covid", "source": NEW_SOURCE_URL}

    def _near_duplicates(self, header: list[str], rows: Rows, extra: Extra
                         ) -> dict[str, Any]:
        test = self._test_files()
        fn = self.col["filename"]
        originals = [r for r in rows if r[fn] in test and self._has_image(r)][:NEAR_DUPLICATES]
        copies = []
        for k, original in enumerate(originals):
            name = f"season-copy-{k:03d}.jpg"
            extra[name] = _reencode(self.source / "images" / original[fn], quality=70)
            rows.append(self._row(original, patientid=f"season-dup-{k:03d}", filename=name))
            copies.append([original[fn], name])
        if not copies:
            raise ValueError("no test film to copy: run a normal week first")
        return {"copies": copies}

    def _truncated(self, header: list[str], rows: Rows, extra: Extra) -> dict[str, Any]:
        existing = self._pulled_names()
        fn = self.col["filename"]
        new = [r[fn] for r in rows if r[fn] not in existing and self._is_xray(r)
               and (self.source / "images" / r[fn]).is_file()][:TRUNCATED]
        for name in new:
            data = (self.source / "images" / name).read_bytes()
            extra[name] = data[: len(data) // 2]
        return {"truncated": new}

    # -- helpers ---------------------------------------------------------------------------------
    def _row(self, template: list[str], **cells: str) -> list[str]:
        row = list(template)
        for name, value in cells.items():
            if name in self.col:
                row[self.col[name]] = value
        return row

    def _has_image(self, row: list[str]) -> bool:
        """The row's file exists in the source (upstream lists some files it does not ship)."""
        return (self.source / "images" / row[self.col["filename"]]).is_file()

    def _is_xray(self, row: list[str]) -> bool:
        """A PA or AP X-ray row whose file lies under ``images/``."""
        folder = row[self.col["folder"]].strip() if "folder" in self.col else "images"
        return (row[self.col["modality"]].strip() == "X-ray" and row[self.col["view"]].strip() in ("PA", "AP")
                and folder in ("", "images"))

    def _pulled_names(self) -> set[str]:
        manifest = self.data_root / "raw" / "manifest.json"
        if not manifest.is_file():
            return set()
        objects = json.loads(manifest.read_text()).get("objects", {})
        return {k.removeprefix("images/") for k, v in objects.items() if v.get("status") == "ok"}

    def _labelled(self, label: str) -> set[str]:
        """The files the pipeline's last ``relabel`` labelled ``label``."""
        import pandas as pd

        labeled = self.data_root / "labeled.csv"
        if not labeled.is_file():
            return set()
        frame = pd.read_csv(labeled, dtype=str, keep_default_na=False)
        return set(frame.loc[frame["label"] == label, "filename"])

    def _test_files(self) -> set[str]:
        import pandas as pd

        labeled = self.data_root / "labeled.csv"
        assigned = self.data_root / "split_assignments.json"
        if not labeled.is_file() or not assigned.is_file():
            return set()
        patients = json.loads(assigned.read_text()).get("patients", {})
        frame = pd.read_csv(labeled, dtype=str, keep_default_na=False)
        pairs = zip(frame["filename"], frame["patientid"], strict=True)
        return {f for f, p in pairs if patients.get(p) == "test"}

    def _write(self, target: Path, header: list[str], rows: Rows, extra: Extra) -> None:
        shutil.rmtree(target, ignore_errors=True)
        (target / "images").mkdir(parents=True)
        fn = self.col["filename"]
        folder = self.col.get("folder")
        for row in rows:
            name = row[fn]
            if not name or (folder is not None and row[folder].strip() not in ("", "images")):
                continue
            dst = target / "images" / name
            if dst.exists() or name in extra:
                continue
            if name in self.replaced:
                dst.write_bytes(self.replaced[name])
            elif (self.source / "images" / name).is_file():
                _link(self.source / "images" / name, dst)
        for name, data in extra.items():
            (target / "images" / name).write_bytes(data)
        with open(target / "metadata.csv", "w", newline="", encoding="utf-8") as fh:
            csv.writer(fh).writerows([header, *rows])


def _reencode(path: Path, quality: int) -> bytes:
    """The same film as JPEG at ``quality``: different bytes, near-identical pixels."""
    from PIL import Image

    with Image.open(path) as img:
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
