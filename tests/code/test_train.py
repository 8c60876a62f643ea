"""The train and finetune stages end to end on a tiny synthetic data set (MobileNetV3Small, 32 px)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from covid_tasks.config import Config
from covid_tasks.layout import DataRoot
from covid_tasks.model import BACKBONE_LAYER, OUTPUT_LAYER, build_model
from covid_tasks.stages.finetune import MONITOR, finetune
from covid_tasks.stages.train import train
from covid_tasks.training import set_seeds

RUN_KEY = "manual__2026-01-05T00:00:00+00:00"
METRICS = ("loss", "accuracy", "precision", "recall", "auc")
RESULT_KEYS = {"model_path", "class_indices", "history", "plots", "epochs_run", "final_val_loss",
               "best_val_auc", "trainable_weights"}


def _make_data_root(root: Path) -> None:
    """Images with a class-dependent bright blob (PNG and JPEG, grey and RGB) and a ``splits.csv``."""
    rng = np.random.default_rng(0)
    images = root / "raw" / "images"
    images.mkdir(parents=True)
    rows = []
    for split, n in (("train", 16), ("val", 8), ("test", 4)):
        for i in range(n):
            label = ("non_covid", "covid")[i % 2]
            img = rng.integers(0, 60, size=(40, 40), dtype=np.uint8)
            if label == "covid":
                img[10:30, 10:30] += 150
            name = f"{split}{i}.{'png' if i % 3 else 'jpg'}"
            pil = Image.fromarray(img) if i % 4 else Image.fromarray(np.stack([img] * 3, -1))
            pil.save(images / name)
            rows.append({"filename": name, "label": label, "split": split, "patientid": f"{split}{i}"})
    pd.DataFrame(rows).to_csv(root / "splits.csv", index=False)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture(scope="module")
def stages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("data_root")
    _make_data_root(root)
    # The Adam head on the plain architecture: these tests are about the stages' mechanics and files.
    cfg = Config(data_root=str(root), backbone="mobilenet_v3_small", weights="none", img_size=32,
                 head="adam", lung_gate=False, batch_size=8, epochs=2, finetune_epochs=2,
                 early_stopping_patience=1, seed=3)
    records = _Records()
    log = logging.getLogger("covid_tasks")
    log.addHandler(records)
    old_level = log.level
    log.setLevel(logging.INFO)
    try:
        trained = train(cfg, RUN_KEY)
        tuned = finetune(cfg, RUN_KEY)
    finally:
        log.removeHandler(records)
        log.setLevel(old_level)
    return {"root": root, "cfg": cfg, "train": trained, "finetune": tuned, "log": records.lines,
            "run_dir": DataRoot.of(cfg).run(RUN_KEY).path}


def _check_outputs(result: dict[str, Any], run_dir: Path, phase: str) -> dict[str, list[float]]:
    assert RESULT_KEYS <= set(result)
    assert result["model_path"] == str(run_dir / f"{phase}.keras") and Path(result["model_path"]).is_file()
    assert json.loads(Path(result["class_indices"]).read_text()) == {"non_covid": 0, "covid": 1}
    history = json.loads(Path(result["history"]).read_text())
    assert set(history) >= {*METRICS, *(f"val_{m}" for m in METRICS)}
    assert all(len(history[m]) == result["epochs_run"] for m in METRICS)
    assert result["plots"] == [str(run_dir / f"{phase}_{m}.png") for m in ("accuracy", "loss", "precision",
                                                                              "recall", "auc")]
    assert all(Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in result["plots"])
    json.dumps(result)  # the XCom value is JSON-able
    return history


def _bn_and_conv(model: Any) -> tuple[list[Any], list[Any]]:
    base = model.get_layer(BACKBONE_LAYER)
    return ([layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)],
            [layer for layer in base.layers if isinstance(layer, keras.layers.Conv2D)])


def test_train_saves_a_frozen_model_history_and_plots(stages: dict[str, Any]) -> None:
    result, run_dir = stages["train"], stages["run_dir"]
    history = _check_outputs(result, run_dir, "train")
    assert result["epochs_run"] == 2 and result["trainable_weights"] == 2
    assert result["gpus"] == 0 and result["mixed_precision"] is False
    assert np.isfinite(history["loss"]).all()
    model = keras.saving.load_model(result["model_path"])
    assert model.get_layer(BACKBONE_LAYER).trainable_weights == []
    # Seeded: the same seed builds the same initial model, and training left its backbone untouched
    # (BatchNorm statistics included) while the head learned.
    set_seeds(stages["cfg"].seed)
    initial = build_model(stages["cfg"])
    before, after = (m.get_layer(BACKBONE_LAYER).weights for m in (initial, model))
    for a, b in zip(before, after, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.array_equal(initial.get_layer(OUTPUT_LAYER).get_weights()[0],
                              model.get_layer(OUTPUT_LAYER).get_weights()[0])
    epoch_lines = [line for line in stages["log"] if line.startswith("train epoch ")]
    assert len(epoch_lines) == 2 and all("val_auc=" in line and "images/s=" in line for line in epoch_lines)


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_finetune_unfreezes_the_backbone_but_not_batchnorm(stages: dict[str, Any]) -> None:
    result, run_dir = stages["finetune"], stages["run_dir"]
    _check_outputs(result, run_dir, "finetune")
    assert result["monitor"] == MONITOR == "val_auc"
    assert not list(run_dir.glob("*.weights.h5"))  # the checkpoint was folded into finetune.keras
    trained = keras.saving.load_model(stages["train"]["model_path"])
    tuned = keras.saving.load_model(result["model_path"])
    (bn_t, conv_t), (bn_f, conv_f) = _bn_and_conv(trained), _bn_and_conv(tuned)
    assert tuned.get_layer(BACKBONE_LAYER).trainable_weights and all(c.trainable for c in conv_f)
    assert not any(bn.trainable for bn in bn_f)
    # BatchNorm ran in inference mode throughout: its moving statistics are the trained model's.
    for a, b in zip(bn_t, bn_f, strict=True):
        for va, vb in zip(a.weights, b.weights, strict=True):
            np.testing.assert_array_equal(va.numpy(), vb.numpy())
    assert any(not np.array_equal(a.kernel.numpy(), b.kernel.numpy())
               for a, b in zip(conv_t, conv_f, strict=True))


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_finetuned_model_holds_the_best_epoch_and_predicts_raw_images(stages: dict[str, Any]) -> None:
    from covid_tasks.dataset import make_dataset
    from covid_tasks.images import load_image
    from covid_tasks.layout import load_splits

    cfg, root = stages["cfg"], stages["root"]
    history = json.loads(Path(stages["finetune"]["history"]).read_text())
    model = keras.saving.load_model(stages["finetune"]["model_path"])
    val = load_splits(DataRoot(root))["val"]
    scores = model.evaluate(make_dataset(val, root / "raw" / "images", cfg, training=False), verbose=0,
                            return_dict=True)
    assert scores["auc"] == pytest.approx(max(history["val_auc"]), abs=1e-6)
    assert stages["finetune"]["best_val_auc"] == pytest.approx(max(history["val_auc"]))
    raw = np.stack([load_image(root / "raw" / "images" / f, cfg.img_size) for f in val["filename"]])
    prob = model.predict(raw, verbose=0)
    assert prob.shape == (len(val), 1) and np.all((prob >= 0) & (prob <= 1))


def test_finetune_needs_the_trained_model(tmp_path: Path) -> None:
    cfg = Config(data_root=str(tmp_path), backbone="mobilenet_v3_small", weights="none", img_size=32)
    with pytest.raises(FileNotFoundError, match="train"):
        finetune(cfg, "run-without-train")


def test_probe_head_top_blocks_and_cosine_schedule(tmp_path: Path) -> None:
    """The linear-probe head separates the blobs; top-block fine-tuning leaves earlier blocks as they were."""
    _make_data_root(tmp_path)
    cfg = Config(data_root=str(tmp_path), backbone="efficientnet_lite0", weights="bundled", img_size=32,
                 batch_size=8, head="probe", finetune_epochs=2, finetune_top_blocks=2,
                 finetune_schedule="cosine", early_stopping_patience=2, seed=3)
    trained = train(cfg, RUN_KEY)
    history = json.loads(Path(trained["history"]).read_text())
    assert set(history) == {"loss", "auc", "val_loss", "val_auc"} and history["val_auc"][0] > 0.9
    assert trained["head"] == "probe" and trained["probe_c"] > 0
    from covid_tasks.training import PROBE_C_GRID

    probe = json.loads((Path(trained["history"]).parent / "probe.json").read_text())
    assert probe == {k: trained[k] for k in probe}  # train's result and the file evaluate reads agree
    assert set(probe["probe_inner_auc_by_c"]) == {f"{c:g}" for c in PROBE_C_GRID}
    assert probe["probe_signal"] is True and probe["probe_inner_auc_ci95"][0] > 0.5  # blobs separate
    before = keras.saving.load_model(trained["model_path"])
    head_kernel = before.get_layer(OUTPUT_LAYER).get_weights()[0]
    assert np.abs(head_kernel).sum() > 0

    tuned = finetune(cfg, RUN_KEY)
    after = keras.saving.load_model(tuned["model_path"])
    old, new = before.get_layer(BACKBONE_LAYER), after.get_layer(BACKBONE_LAYER)
    np.testing.assert_array_equal(old.get_layer("block00_dwconv").get_weights()[0],
                                  new.get_layer("block00_dwconv").get_weights()[0])
    assert not np.array_equal(old.get_layer("block15_project_conv").get_weights()[0],
                              new.get_layer("block15_project_conv").get_weights()[0])
    with pytest.raises(ValueError, match="numbered blocks"):
        from covid_tasks.model import unfreeze

        unfreeze(build_model(cfg.replace(backbone="mobilenet_v3_small", weights="none")), 1e-5, top_blocks=2)


def test_probe_c_choice_reports_the_grid_edge_and_whether_the_head_carries_signal() -> None:
    from covid_tasks.training import PROBE_C_GRID, PROBE_DEFAULT_C, choose_probe_c

    rng = np.random.default_rng(0)
    y = np.array([1] * 60 + [0] * 40)
    informative = np.where(y == 1, 0.7, 0.3) + rng.normal(0, 0.1, len(y))  # inner AUC near 1
    noise = rng.random(len(y))  # inner AUC near 0.5
    interior = {c: 0.9 - abs(np.log10(c) + 2) * 0.01 for c in PROBE_C_GRID}  # peak at 0.01
    fit = choose_probe_c(interior, y, {c: informative for c in PROBE_C_GRID}, seed=1)
    assert fit.c == 0.01 and fit.c_at_edge is None and fit.signal is True
    lowest = {c: 0.6 - c for c in PROBE_C_GRID}  # best at the grid's smallest C
    fit = choose_probe_c(lowest, y, {c: noise for c in PROBE_C_GRID}, seed=1)
    assert fit.c == min(PROBE_C_GRID) and fit.c_at_edge == "lower"
    assert fit.inner_auc == pytest.approx(0.6 - min(PROBE_C_GRID))
    assert fit.signal is False and fit.inner_auc_ci95[0] <= 0.5  # random scores: no signal shown
    highest = {c: 0.5 + c / 10 for c in PROBE_C_GRID}
    assert choose_probe_c(highest, y, {c: noise for c in PROBE_C_GRID}, seed=1).c_at_edge == "upper"
    tie = {c: 0.7 for c in PROBE_C_GRID}  # flat: the smallest C, not reported as an edge to extend
    flat = choose_probe_c(tie, y, {c: informative for c in PROBE_C_GRID}, seed=1)
    assert flat.c == min(PROBE_C_GRID) and flat.c_at_edge is None
    none = choose_probe_c({}, y, {}, seed=1)
    assert (none.c, none.c_at_edge, none.inner_auc, none.signal) == (PROBE_DEFAULT_C, None, None, None)


def test_the_probe_search_extends_the_grid_down_only_at_a_rising_edge_above_chance() -> None:
    import math

    from covid_tasks.training import PROBE_C_EXTENSION, PROBE_C_GRID, search_probe_c

    def peaked(at: float, top: float):
        return lambda c: (top - 0.01 * abs(math.log10(c) - math.log10(at)), None)

    scores, _ = search_probe_c(peaked(1e-4, 0.6))  # the optimum lies below the grid: found, interior
    assert max(scores, key=scores.get) == 1e-4 and min(scores) == 3e-5
    assert sorted(scores) == sorted({*PROBE_C_GRID, 3e-4, 1e-4, 3e-5})
    scores, _ = search_probe_c(peaked(0.01, 0.6))  # interior in the grid: no extension
    assert sorted(scores) == sorted(PROBE_C_GRID)
    scores, _ = search_probe_c(peaked(1e-9, 0.4))  # below chance: the edge is reported, not chased
    assert sorted(scores) == sorted(PROBE_C_GRID)
    scores, _ = search_probe_c(peaked(1e-9, 0.7))  # rising all the way: stops at the extension's end
    assert min(scores) == min(PROBE_C_EXTENSION)
    y = np.array([1] * 30 + [0] * 20)
    from covid_tasks.training import choose_probe_c

    fit = choose_probe_c(scores, y, {c: np.where(y == 1, 0.8, 0.2) for c in scores}, seed=0)
    assert fit.c == min(PROBE_C_EXTENSION) and fit.c_at_edge == "lower"
