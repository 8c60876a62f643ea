"""Build the small sample data set shipped in ``sample_data/`` from the full shared copy.

Keeps only rows whose per-image licence allows redistribution (CC BY, CC BY-SA, Apache 2.0)
and whose image file exists, so the repository ships nothing it may not. Run once by a
maintainer; the output is committed.

Usage: python scripts/make_sample.py ../shared/data/covid-chestxray sample_data
"""

from __future__ import annotations

import csv
import shutil
import sys
from pathlib import Path

PERMISSIVE = {"CC BY", "CC BY 3.0", "CC BY 4.0", "CC BY-SA", "Apache 2.0"}


def main(src: Path, dst: Path) -> None:
    with (src / "metadata.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader)
        rows = list(reader)
    lic = header.index("license")
    fname = header.index("filename")
    folder = header.index("folder")
    kept = [
        r for r in rows
        if r[lic].strip() in PERMISSIVE and r[folder] == "images"
        and (src / "images" / r[fname]).is_file()
    ]
    (dst / "images").mkdir(parents=True, exist_ok=True)
    for r in kept:
        shutil.copy2(src / "images" / r[fname], dst / "images" / r[fname])
    with (dst / "metadata.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(kept)
    print(f"kept {len(kept)} of {len(rows)} rows")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
