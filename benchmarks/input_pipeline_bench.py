"""Throughput of the training input pipeline against a Keras ImageDataGenerator baseline.

Both read the same image files on the same machine and produce the same thing: shuffled, augmented
batches of ``img_size`` RGB images with binary labels. Printed, in images per second:

* ``tf.data``: :func:`covid_tasks.dataset.make_dataset` (parallel decode, uint8 cache, shuffle,
  batch-wise XLA-compiled augmentation, prefetch), for the first epoch (decoding) and the later,
  cached epochs; once with the in-memory cache and once with the file cache forced
  (``memory_limit=0``).
* ``ImageDataGenerator``: Keras' legacy ``ImageDataGenerator.flow_from_directory`` (still shipped
  as ``tf.keras.preprocessing.image`` in TF 2.21; ``keras.preprocessing.image`` no longer has it),
  with the same augmentation (rotation 10 deg, shifts 5%, zoom 10% (per axis there, isotropic
  here), brightness x0.9..1.1, bilinear resampling, edges extended),
  iterated the way ``model.fit`` consumes it: one Python thread, PIL decode + resize + a scipy
  affine warp per image, every epoch (it has no cache). Class folders are symlinks in a temporary
  directory, and the class list is passed explicitly (``classes=CLASS_NAMES``).
* Training step: ``train_on_batch`` of the configured model at ``img_size`` (random weights; the
  speed does not depend on them), frozen backbone (``train``) and unfrozen (``finetune``).

Not a test: timings depend on the machine. Run from the repository root::

    python benchmarks/input_pipeline_bench.py                      # shared data set or sample_data
    python benchmarks/input_pipeline_bench.py --images DIR --img-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = [REPO.parent / "shared" / "data" / "covid-chestxray" / "images",
                  REPO / "sample_data" / "images"]
EXTENSIONS = {".jpg", ".jpeg", ".png"}


def _frame(images: Path) -> Any:
    """All JPEG/PNG files of ``images`` with labels from ``metadata.csv`` beside it (when present)."""
    import pandas as pd

    files = sorted(p.name for p in images.iterdir() if p.suffix.lower() in EXTENSIONS)
    findings: dict[str, str] = {}
    meta = images.parent / "metadata.csv"
    if meta.is_file():
        table = pd.read_csv(meta, dtype=str, keep_default_na=False)
        findings = dict(zip(table["filename"], table["finding"], strict=True))
    labels = ["covid" if "COVID-19" in findings.get(f, "") else "non_covid" for f in files]
    return pd.DataFrame({"filename": files, "label": labels})


def _class_tree(frame: Any, images: Path, root: Path) -> None:
    """``root/<class>/<file>`` symlinks, the layout ``flow_from_directory`` needs."""
    for name, label in zip(frame["filename"], frame["label"], strict=True):
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / name).symlink_to(images / name)


def _time_epochs(batches: Any, epochs: int) -> list[float]:
    """Seconds per epoch of iterating ``batches()`` to the end."""
    out = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        n = 0
        for x, _y in batches():
            n += len(x)
        out.append(time.perf_counter() - t0)
    return out


def bench_tf_data(frame: Any, images: Path, cfg: Any, epochs: int, memory_limit: int | None,
                  cache_dir: Path) -> list[float]:
    from covid_tasks.dataset import MEMORY_CACHE_LIMIT, make_dataset

    ds = make_dataset(frame, images, cfg, training=True, cache_dir=cache_dir,
                      memory_limit=MEMORY_CACHE_LIMIT if memory_limit is None else memory_limit)
    return _time_epochs(lambda: ds, epochs)


def bench_image_data_generator(tree: Path, cfg: Any, epochs: int) -> list[float]:
    import tensorflow as tf

    from covid_tasks.augment import BRIGHTNESS_FRACTION, ROTATION_DEG, SHIFT_FRACTION, ZOOM_FRACTION
    from covid_tasks.config import CLASS_NAMES

    gen = tf.keras.preprocessing.image.ImageDataGenerator(
        rotation_range=ROTATION_DEG, width_shift_range=SHIFT_FRACTION, height_shift_range=SHIFT_FRACTION,
        zoom_range=ZOOM_FRACTION, brightness_range=(1 - BRIGHTNESS_FRACTION, 1 + BRIGHTNESS_FRACTION),
        fill_mode="nearest")
    flow = gen.flow_from_directory(
        str(tree), target_size=(cfg.img_size, cfg.img_size), color_mode="rgb", classes=list(CLASS_NAMES),
        class_mode="binary", batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, interpolation="bilinear")
    assert flow.class_indices == {name: i for i, name in enumerate(CLASS_NAMES)}

    def one_epoch() -> Any:
        for _ in range(len(flow)):
            yield next(flow)

    return _time_epochs(one_epoch, epochs)


def bench_train_step(cfg: Any, steps: int) -> dict[str, float]:
    """Images/s of ``train_on_batch`` for the frozen and the unfrozen model (after one warm-up step)."""
    import numpy as np

    from covid_tasks.model import build_model, unfreeze

    shape = (cfg.batch_size, cfg.img_size, cfg.img_size, 3)
    x = np.random.default_rng(0).uniform(0, 255, shape).astype("float32")
    y = np.tile(np.array([0.0, 1.0], "float32"), cfg.batch_size)[: cfg.batch_size]
    model = build_model(cfg, weights="none")
    out = {}
    for phase in ("train (frozen)", "finetune (unfrozen)"):
        if phase.startswith("finetune"):
            unfreeze(model, cfg.finetune_learning_rate)
        model.train_on_batch(x, y)  # trace and warm up
        t0 = time.perf_counter()
        for _ in range(steps):
            model.train_on_batch(x, y)
        out[phase] = steps * cfg.batch_size / (time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=next((p for p in DEFAULT_IMAGES if p.is_dir()), None))
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="tf.data epochs (the first decodes)")
    parser.add_argument("--baseline-epochs", type=int, default=2)
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--train-steps", type=int, default=3, help="timed steps per phase; 0 skips")
    args = parser.parse_args()
    if args.images is None or not args.images.is_dir():
        parser.error("no image folder: pass --images")

    import tensorflow as tf

    from covid_tasks.config import Config

    frame = _frame(args.images)
    n = len(frame)
    with tempfile.TemporaryDirectory(prefix="pipeline-bench-") as tmp:
        cfg = Config(data_root=tmp, img_size=args.img_size, batch_size=args.batch_size,
                     backbone=args.backbone)
        tree = Path(tmp) / "by_class"
        _class_tree(frame, args.images, tree)
        print(f"{n} images from {args.images} ({(frame['label'] == 'covid').sum()} covid), "
              f"img_size {cfg.img_size}, batch {cfg.batch_size}, {os.cpu_count()} CPUs, TF {tf.__version__}")

        rate = lambda secs: n / secs  # noqa: E731
        mem = bench_tf_data(frame, args.images, cfg, args.epochs, None, Path(tmp) / "cache")
        disk = bench_tf_data(frame, args.images, cfg, 2, 0, Path(tmp) / "cache")
        idg = bench_image_data_generator(tree, cfg, args.baseline_epochs)

        cached = rate(statistics.median(mem[1:])) if len(mem) > 1 else float("nan")
        baseline = rate(statistics.median(idg))
        print(f"{'pipeline':44s} {'epoch 1':>10s} {'later epoch':>12s}   images/s")
        print(f"{'tf.data make_dataset (memory cache)':44s} {rate(mem[0]):10.1f} {cached:12.1f}")
        print(f"{'tf.data make_dataset (file cache)':44s} {rate(disk[0]):10.1f} {rate(disk[1]):12.1f}")
        print(f"{'ImageDataGenerator.flow_from_directory':44s} {rate(idg[0]):10.1f} "
              f"{rate(idg[-1]) if len(idg) > 1 else float('nan'):12.1f}")
        print(f"cached-epoch speed-up over ImageDataGenerator: {cached / baseline:.1f}x "
              f"(first epoch: {rate(mem[0]) / baseline:.1f}x)")

        if args.train_steps > 0:
            for phase, ips in bench_train_step(cfg, args.train_steps).items():
                print(f"training step {cfg.backbone} {cfg.img_size}px batch {cfg.batch_size}, {phase}: "
                      f"{ips:.1f} images/s")


if __name__ == "__main__":
    main()
