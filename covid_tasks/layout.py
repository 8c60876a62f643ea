"""The data-root contract: every folder and file name under the data root, and nowhere else.

Stages ask this module for paths; none spells a file name itself. The data root comes from
``Config.data_root`` only (:meth:`DataRoot.of`)::

    <data_root>/
      raw/metadata.csv            pull: the upstream table, replaced atomically, last
      raw/images/<name>           pull: validated images (kept across weeks: pulls are incremental)
      raw/manifest.json           pull: key -> size, etag, sha256, status
      quarantine/images/<name>    pull: images that failed validation (never read by training)
      .pull/                      pull: lock, staging area, journal of a running pull
      pull_report.json            pull: per-file details of the last pull
      labeled.csv                 relabel: one row per kept image, with its class
      relabel_report.json         relabel: rules, counts, findings
      splits.csv                  split: labeled.csv plus the ``split`` column
      train.csv val.csv test.csv  split: one file per split
      split_assignments.json      split: patient -> split, kept across weeks
      split_report.json           split: counts and moves
      split/<split>/<class>/      split: hard links to raw/images
      image_hashes.json           relabel: perceptual hash (dHash) of each image, by SHA-256
      checks/baseline.json        check_data: statistics of the last dataset version that passed
      checks/latest.json          check_data: statistics of the last version checked
      history.jsonl               one line per run: data, verdicts, metrics, decision (the timeline)
      cache/                      decoded-image file caches (training)
      runs/<run_key>/             one DAG run: see :class:`RunDir`
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from covid_tasks.config import safe_run_key
from covid_tasks.storage import require_file

if TYPE_CHECKING:
    from covid_tasks.config import Config

SPLITS: tuple[str, ...] = ("train", "val", "test")
METADATA = "metadata.csv"
IMAGES = "images"
#: The evaluated model: the fine-tuned model with the calibration folded into its last layer.
MODEL_FILE = "model.keras"
OPERATING_POINT = "operating_point.json"
CLASS_INDICES = "class_indices.json"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
VAL_PREDICTIONS = "val_predictions.csv"
CHAMPION_PREDICTIONS = "champion_predictions.csv"
DATA_CHECKS = "data_checks.json"


@dataclass(frozen=True)
class RunDir:
    """One run's folder, ``<data_root>/runs/<run_key>/``, and the files the stages write there."""

    path: Path
    key: str

    @property
    def train_model(self) -> Path:
        """``train.keras``: the model with the fitted head (train)."""
        return self.path / "train.keras"

    @property
    def finetune_model(self) -> Path:
        """``finetune.keras``: the fine-tuned model (finetune)."""
        return self.path / "finetune.keras"

    @property
    def finetune_checkpoint(self) -> Path:
        return self.path / "finetune.best.weights.h5"

    @property
    def model(self) -> Path:
        """``model.keras``: the calibrated, evaluated model that ``register`` registers."""
        return self.path / MODEL_FILE

    @property
    def class_indices(self) -> Path:
        return self.path / CLASS_INDICES

    @property
    def operating_point(self) -> Path:
        return self.path / OPERATING_POINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS

    @property
    def predictions(self) -> Path:
        return self.path / PREDICTIONS

    @property
    def val_predictions(self) -> Path:
        return self.path / VAL_PREDICTIONS

    @property
    def champion_predictions(self) -> Path:
        return self.path / CHAMPION_PREDICTIONS

    @property
    def classification_report(self) -> Path:
        return self.path / "classification_report.txt"

    @property
    def probe(self) -> Path:
        """``probe.json``: how train fitted the linear-probe head (C, inner CV AUC, signal)."""
        return self.path / "probe.json"

    @property
    def data_checks(self) -> Path:
        """``data_checks.json``: the data checks' verdict, anomalies and statistics (check_data)."""
        return self.path / DATA_CHECKS

    @property
    def retention(self) -> Path:
        """``retention.json``: what the retention policy removed from this folder, and when."""
        return self.path / "retention.json"

    def history(self, phase: str) -> Path:
        """``<phase>_history.json``: Keras' per-epoch history of ``train`` or ``finetune``."""
        return self.path / f"{phase}_history.json"

    def figure(self, name: str) -> Path:
        """``<name>.png`` (``roc_curve``, ``train_loss``, ...)."""
        return self.path / f"{name}.png"


@dataclass(frozen=True)
class DataRoot:
    """The data root's folders and files (see the module docstring for what writes each)."""

    root: Path

    @classmethod
    def of(cls, cfg: Config) -> DataRoot:
        """The layout of ``cfg.data_root``."""
        return cls(Path(cfg.data_root))

    # pull
    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def images(self) -> Path:
        return self.raw / IMAGES

    @property
    def metadata(self) -> Path:
        return self.raw / METADATA

    @property
    def manifest(self) -> Path:
        return self.raw / "manifest.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def pull_work(self) -> Path:
        return self.root / ".pull"

    @property
    def pull_report(self) -> Path:
        return self.root / "pull_report.json"

    # relabel
    @property
    def labeled(self) -> Path:
        return self.root / "labeled.csv"

    @property
    def relabel_report(self) -> Path:
        return self.root / "relabel_report.json"

    # split
    @property
    def splits(self) -> Path:
        return self.root / "splits.csv"

    def split_csv(self, split: str) -> Path:
        """``<split>.csv`` for ``train``, ``val`` or ``test``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.root / f"{split}.csv"

    @property
    def split_assignments(self) -> Path:
        return self.root / "split_assignments.json"

    @property
    def split_report(self) -> Path:
        return self.root / "split_report.json"

    @property
    def split_links(self) -> Path:
        return self.root / "split"

    @property
    def image_hashes(self) -> Path:
        return self.root / "image_hashes.json"

    # check_data
    @property
    def checks_baseline(self) -> Path:
        return self.root / "checks" / "baseline.json"

    @property
    def checks_latest(self) -> Path:
        return self.root / "checks" / "latest.json"

    @property
    def history(self) -> Path:
        return self.root / "history.jsonl"

    # training
    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def run(self, run_key: str) -> RunDir:
        """The folder of one run (its key made safe as a folder name)."""
        key = safe_run_key(run_key)
        return RunDir(self.runs / key, key)


def load_splits(root: DataRoot) -> dict[str, Any]:
    """Read ``splits.csv`` into ``{"train", "val", "test"}`` frames (strings, no NaN).

    Raises:
        FileNotFoundError: ``splits.csv`` is missing (run ``split`` first).
    """
    import pandas as pd

    frame = pd.read_csv(require_file(root.splits, "split"), dtype=str, keep_default_na=False)
    return {s: frame[frame["split"] == s].reset_index(drop=True) for s in SPLITS}
