"""Paired promotion against a real ``mlflow server``: one image better is not enough; clearly better is.

The data set is built so that each colour channel is one model's evidence (see
``tiny_run.make_paired_data_root``): the champion reads red, the "one image better" challenger
green, the clearly better one blue. All three see the same validation images, so their
thresholds sit at the same place, and the test split fixes, image by image, which model is
right. The margin is 0: a challenger must not be shown worse at all.
"""

from __future__ import annotations

from typing import Any

import pytest

from covid_tasks.config import Config
from tests.helpers import tiny_run
from tests.helpers.mlflow_server import shared_server

pytestmark = pytest.mark.mlflow_server

MODEL = "covid-xray-classifier-promotion-test"
# 20 covid and 20 non-covid test patients. Red (the champion) misses covid 0-3; green finds those
# four but misses covid 4-6 (one image better, with discordant images both ways); blue finds all.
N_COVID = 20
RED_MISSES, GREEN_MISSES = {0, 1, 2, 3}, {4, 5, 6}


def _test_rows() -> list[tuple[str, tuple[bool, bool, bool]]]:
    rows = [("covid", (i not in RED_MISSES, i not in GREEN_MISSES, True)) for i in range(N_COVID)]
    return rows + [("non_covid", (True, True, True))] * 20


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    server = shared_server(tmp_path_factory)
    root = tiny_run.make_paired_data_root(tmp_path_factory.mktemp("promotion_data"), _test_rows())

    from mlflow import MlflowClient

    from covid_tasks.stages.evaluate import evaluate
    from covid_tasks.stages.register import register

    cfg = Config(data_root=str(root), mlflow_tracking_uri=server.url, model_name=MODEL,
                 experiment_name="promotion-test", img_size=32, batch_size=16, min_sensitivity=0.75,
                 min_specificity=0.75, promotion_margin=0.0)
    out: dict[str, Any] = {"client": MlflowClient(server.url, registry_uri=server.url), "runs": {}}
    for key, direction in (("red", (1.0, 0.0, 0.0)), ("green", (0.0, 1.0, 0.0)), ("blue", (0.0, 0.0, 1.0))):
        tiny_run.write_model_run(cfg, key, tiny_run.channel_model(direction, 32))
        ev = evaluate(cfg, key)
        reg = register(cfg, key)
        aliases = {k: str(v) for k, v in out["client"].get_registered_model(MODEL).aliases.items()}
        out["runs"][key] = {"evaluate": ev, "register": reg, "aliases": aliases}
    return out


def test_the_data_fixes_each_models_test_results(flow: dict[str, Any]) -> None:
    sens = {key: run["evaluate"]["sensitivity"] for key, run in flow["runs"].items()}
    assert sens == {"red": 16 / 20, "green": 17 / 20, "blue": 1.0}
    assert all(run["evaluate"]["specificity"] == 1.0 for run in flow["runs"].values())
    red = flow["runs"]["red"]
    assert red["register"]["promoted"] and red["evaluate"]["promotion"]["rule"] == "gate_only_no_champion"


def test_one_image_better_within_the_noise_is_not_promoted_under_a_zero_margin(flow: dict[str, Any]) -> None:
    run = flow["runs"]["green"]
    ev, reg = run["evaluate"], run["register"]
    promo = ev["promotion"]
    assert ev["passed"] and ev["champion"]["version"] == "1"
    assert promo["rule"] == "paired_patient_bootstrap_noninferiority" and promo["margin"] == 0.0
    delta = promo["metric_deltas"]["sensitivity"]
    assert delta["point"] == pytest.approx(1 / 20)  # better by one image ...
    assert delta["ci95"][0] < 0 < delta["ci95"][1]  # ... but the paired interval spans zero
    assert not promo["promoted"] and "sensitivity" in promo["reason"]
    assert reg["registered"] and not reg["promoted"] and reg["version"] == 2
    assert run["aliases"] == {"challenger": "2", "champion": "1"}
    client = flow["client"]
    assert client.get_model_version(MODEL, "2").tags["promotion_rule"] == promo["rule"]
    tags = client.get_run(reg["mlflow_run_id"]).data.tags
    assert tags["promotion_rule"] == promo["rule"] and tags["promotion_reason"] == promo["reason"]


def test_a_clearly_better_challenger_is_promoted(flow: dict[str, Any]) -> None:
    run = flow["runs"]["blue"]
    ev, reg = run["evaluate"], run["register"]
    promo = ev["promotion"]
    assert promo["rule"] == "paired_patient_bootstrap_noninferiority" and promo["promoted"]
    assert promo["metric_deltas"]["sensitivity"]["point"] == pytest.approx(4 / 20)
    assert all(d["ci95"][0] >= 0.0 for d in promo["metric_deltas"].values())
    assert reg["promoted"] and reg["version"] == 3
    assert run["aliases"] == {"challenger": "3", "champion": "3"}
    assert "non-inferior to champion v1" in flow["client"].get_model_version(MODEL, "3").description
