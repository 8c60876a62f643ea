"""Command line: ``python -m covid_tasks <step> [options]``, one sub-command per pipeline step.

Each step prints its result, the same dict the Airflow task returns, as one JSON object on the
last line of stdout; logs go to stderr. ``predict`` prints ``Class``, ``Confidence`` (the model's
probability of that class, with whether it is calibrated) and ``P(covid)`` lines per image, or
JSON with ``--json``. ``validate`` scores a labelled folder of films (:mod:`covid_tasks.validation`)
and prints its figures, with ``--json`` also as one JSON object on the last line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence

from covid_tasks.stages import STAGES

STEPS = tuple(STAGES)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m covid_tasks", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for step in STEPS:
        p = sub.add_parser(step, help=f"run the '{step}' step")
        p.add_argument("--data-root", help="data root (default: $COVID_DATA_ROOT or ./data)")
        p.add_argument("--run-key", default="cli", help="run key: outputs go to <data-root>/runs/<run-key>")
        p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                       help="override a config field, e.g. --set img_size=64 (repeatable)")
        if step == "pull":
            p.add_argument("--source", help="source URI: s3://bucket/prefix, file:///path or a folder")
    p = sub.add_parser("predict", help="classify image files")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG or DICOM; also BMP, GIF)")
    p.add_argument("--model", default="models:/covid-xray-classifier@champion",
                   help="a models:/ URI or a .keras file (default: the registered champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $COVID_MLFLOW_TRACKING_URI)")
    p.add_argument("--threshold", type=float, help="override the model's operating threshold")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p = sub.add_parser("validate", help="score a hospital's own labelled films (external validation)")
    p.add_argument("--labels", required=True,
                   help="CSV with the columns image,label[,source]: image paths relative to the CSV's "
                        "folder, label covid or non_covid")
    p.add_argument("--model", default="models:/covid-xray-classifier@champion",
                   help="a models:/ URI or a .keras file with its operating point beside it "
                        "(default: the registered champion)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $COVID_MLFLOW_TRACKING_URI)")
    p.add_argument("--json", action="store_true",
                   help="print the figures as one JSON object on the last line")
    p.add_argument("--log", action="store_true",
                   help="record the validation in MLflow against the model version and update its model card")
    p = sub.add_parser("summary", help="show the registered champion and how to use it")
    p.add_argument("--tracking-uri")
    p.add_argument("--data-root")
    return parser


def _config(args: argparse.Namespace) -> Any:
    from covid_tasks.config import Config

    overrides: dict[str, Any] = {}
    for item in getattr(args, "set", []):
        if "=" not in item:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key.strip()] = value
    if getattr(args, "data_root", None):
        overrides["data_root"] = args.data_root
    if getattr(args, "source", None):
        overrides["source_uri"] = args.source
    if getattr(args, "tracking_uri", None):
        overrides["mlflow_tracking_uri"] = args.tracking_uri
    return Config.from_env(overrides)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command in STEPS:
            from covid_tasks.stages import run
            from covid_tasks.storage import jsonable

            result = run(args.command, _config(args), args.run_key)
            print(json.dumps(jsonable(result), default=str))
        elif args.command == "predict":
            _predict(args)
        elif args.command == "validate":
            _validate(args)
        elif args.command == "summary":
            from covid_tasks.summary import summary

            cfg = _config(args)
            text, result = summary(cfg)
            print(text)
            print(json.dumps(result, default=str))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _predict(args: argparse.Namespace) -> None:
    from covid_tasks.predict import predict

    tracking = args.tracking_uri or _config(args).tracking_uri
    result = predict(args.images, args.model, tracking, args.threshold)
    if args.json:
        print(json.dumps(result))
        return
    version = f" (version {result['version']})" if result["version"] else ""
    print(f"Model : {result['model']}{version}, threshold {result['threshold']:.3f}")
    for pred in result["predictions"]:
        note = confidence_note(result.get("calibration"), pred["confidence"])
        print(f"Image : {pred['image']}")
        print(f"Class : {pred['class']}")
        print(f"Confidence : {pred['confidence'] * 100:.1f}% for {pred['class']} ({note})")
        print(f"P(covid) : {pred['prob_covid'] * 100:.1f}% (covid at >= {result['threshold'] * 100:.1f}%)")


def _validate(args: argparse.Namespace) -> None:
    from covid_tasks.storage import jsonable
    from covid_tasks.validation import text_report, validate

    tracking = args.tracking_uri or _config(args).tracking_uri
    result = validate(args.labels, args.model, tracking, log=args.log)
    print(text_report(result))
    if args.json:
        print(json.dumps(jsonable(result), default=str))


def confidence_note(calibration: Any, confidence: float) -> str:
    """What the Confidence figure means: a calibrated probability (``operating_point.json`` says
    how) or the model's raw score; and why it can be under 50% for the class shown."""
    if not calibration:
        note = "uncalibrated model score, not the chance that this call is right"
    elif isinstance(calibration, dict):
        method = calibration.get("method") or "calibrated"
        where = calibration.get("split") or calibration.get("fitted_on")
        note = f"calibrated probability: {method}" + (f" fitted on the {where} split" if where else "")
    else:
        note = f"calibrated probability: {calibration}"
    if confidence < 0.5:
        note += "; under 50%: the threshold below, not the larger score, sets the class"
    return note
