"""Does the shipped lung segmenter find two lungs on X-rays of both classes? (full data set).

The segmenter was trained on masks of COVID-19 images only; there are no masks of the other
findings. This prints, per class, the predicted lung area (fraction of the image) and how many
images get a plausible two-sided mask (area 0.12-0.65, the smaller side > 25% of the larger, the
rule ``tests/model/test_lungs.py`` applies to the sample data), and names the implausible ones::

    .venv/bin/python benchmarks/lung_mask_check.py [--data ../shared/data/covid-chestxray]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "covid-chestxray"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="ieee8023 layout: metadata.csv, images/")
    args = parser.parse_args(argv)
    data = Path(args.data)
    if not (data / "metadata.csv").is_file():
        print(f"no data set at {data} (metadata.csv missing)", file=sys.stderr)
        return 2

    import numpy as np
    import pandas as pd

    from covid_tasks import lungs
    from covid_tasks.images import load_image

    meta = pd.read_csv(data / "metadata.csv", dtype=str, keep_default_na=False)
    meta = meta[meta["view"].isin(["PA", "AP"]) & meta["modality"].eq("X-ray")]
    meta = meta[[(data / "images" / f).is_file() for f in meta["filename"]]]
    segmenter = lungs.load_segmenter()
    half = lungs.SEG_SIZE // 2
    print("| class | images | lung area median (p5-p95) | plausible two-sided mask |")
    print("|---|---|---|---|")
    odd = []
    for name, rows in (("covid", meta[meta["finding"].str.contains("COVID-19")]),
                       ("non_covid", meta[~meta["finding"].str.contains("COVID-19")])):
        x = np.stack([load_image(data / "images" / f, lungs.SEG_SIZE) for f in rows["filename"]])
        masks = segmenter.predict(x, batch_size=32, verbose=0)[..., 0] > 0.5
        area = masks.mean(axis=(1, 2))
        left, right = masks[:, :, :half].mean(axis=(1, 2)), masks[:, :, half:].mean(axis=(1, 2))
        ok = (area >= 0.12) & (area <= 0.65) & (np.minimum(left, right) > 0.25 * np.maximum(left, right))
        odd += [f"{name} {f}: area {a:.2f}, left/right {lf:.2f}/{r:.2f}"
                for f, a, lf, r, good in zip(rows["filename"], area, left, right, ok, strict=True)
                if not good]
        p5, p50, p95 = np.percentile(area, [5, 50, 95])
        print(f"| {name} | {len(rows)} | {p50:.2f} ({p5:.2f}-{p95:.2f}) | {ok.sum()} ({ok.mean():.1%}) |")
    print("\nimplausible masks:" if odd else "\nno implausible mask")
    for line in odd:
        print(" ", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
