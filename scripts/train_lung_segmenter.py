"""Train the lung segmenter shipped in ``covid_tasks/assets/`` from the V7 Labs lung masks.

Uses every X-ray PA, AP and AP Supine image of ``covid-chestxray-lung-masks`` (CC BY 4.0, V7 Labs;
COVID-19 images only) whose image is present. With ``--check-fraction`` it first trains on the
other patients and reports the Dice coefficient on that held-out fraction, then trains the shipped
model on all of them. Writes ``lung_segmenter.weights.h5`` and ``lung_segmenter.json`` (what it
was trained on and how well it did).

Usage::

    python scripts/train_lung_segmenter.py                      # ../shared/data next to the clone
    python scripts/train_lung_segmenter.py --epochs 40 --check-fraction 0.2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def load(masks_dir: Path, images_dir: Path, size: int) -> tuple:
    """Images (n, size, size, 3) 0..255, masks (n, size, size, 1) 0/1, file names and patient ids."""
    import numpy as np
    import pandas as pd
    from PIL import Image

    from covid_tasks.images import load_image

    table = pd.read_csv(masks_dir / "masks.csv", dtype=str, keep_default_na=False)
    table = table[(table["modality"] == "X-ray") & table["view"].isin(["PA", "AP", "AP Supine"])]
    table = table[table["filename"].map(lambda f: (images_dir / f).is_file())].reset_index(drop=True)
    meta = pd.read_csv(images_dir.parent / "metadata.csv", dtype=str, keep_default_na=False)
    patient = dict(zip(meta["filename"], meta["patientid"], strict=False))

    def mask(name: str) -> np.ndarray:
        img = Image.open(masks_dir / name).convert("L").resize((size, size), Image.BILINEAR)
        return (np.asarray(img, dtype="float32") / 255.0 > 0.5).astype("float32")[..., None]

    x = np.stack([load_image(images_dir / f, size) for f in table["filename"]])
    y = np.stack([mask(m) for m in table["mask"]])
    return x, y, table["filename"].tolist(), [patient.get(f, f) for f in table["filename"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masks", default=str(SHARED / "covid-chestxray-lung-masks"))
    parser.add_argument("--images", default=str(SHARED / "covid-chestxray" / "images"))
    parser.add_argument("--out", default=str(REPO / "covid_tasks" / "assets" / "lung_segmenter.weights.h5"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--check-fraction", type=float, default=0.2,
                        help="patients held out for the reported Dice (0 skips the check)")
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    sys.path.insert(0, str(REPO))
    import numpy as np

    from covid_tasks.lungs import SEG_FILTERS, SEG_SIZE, dice, train_segmenter

    x, y, names, patients = load(Path(args.masks), Path(args.images), SEG_SIZE)
    card = {"training_images": len(names), "seg_size": SEG_SIZE, "filters": list(SEG_FILTERS),
            "epochs": args.epochs, "seed": args.seed, "date": time.strftime("%Y-%m-%d"),
            "data": "covid-chestxray-lung-masks (V7 Labs lung annotations, CC BY 4.0): X-ray PA, AP, "
                    "AP Supine images of COVID-19 patients",
            "licence": "CC BY 4.0, derived from V7 Labs' annotations; attribute V7 Labs"}
    if args.check_fraction > 0:
        rng = np.random.default_rng(args.seed)
        unique = sorted(set(patients))
        held = set(rng.permutation(unique)[: int(len(unique) * args.check_fraction)])
        test = np.array([p in held for p in patients])
        start = time.perf_counter()
        model = train_segmenter(x[~test], y[~test], epochs=args.epochs, seed=args.seed)
        scores = dice(model.predict(x[test], verbose=0), y[test])
        card["check"] = {"train_images": int((~test).sum()), "held_out_images": int(test.sum()),
                         "held_out_patients": len(held), "dice_mean": float(scores.mean()),
                         "dice_p5": float(np.percentile(scores, 5)), "dice_median": float(np.median(scores)),
                         "train_seconds": time.perf_counter() - start}
        print(json.dumps(card["check"]), flush=True)
    start = time.perf_counter()
    model = train_segmenter(x, y, epochs=args.epochs, seed=args.seed)
    card["train_seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_weights(str(out))
    out.with_name("lung_segmenter.json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
