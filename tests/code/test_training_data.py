"""What a model was trained on, and when it is a demo (issue 19, item 15)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from covid_tasks.layout import DataRoot
from covid_tasks.training_data import REPO_SAMPLE, sample_file_names, training_data
from tests.helpers import tiny_run
from tests.helpers.serve_stack import as_sample_names

REPO = Path(__file__).resolve().parents[2]


def test_the_shipped_list_of_sample_images_matches_sample_data() -> None:
    with open(REPO / "sample_data" / "metadata.csv", newline="", encoding="utf-8") as fh:
        names = {row["filename"] for row in csv.DictReader(fh)}
    assert sample_file_names() == names and len(names) == 101
    assert REPO_SAMPLE == REPO / "sample_data"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_run.make_data_root(tmp_path_factory.mktemp("provenance"))


def test_counts_per_split_and_label_and_a_real_source_is_no_demo(tiny: Path) -> None:
    got = training_data(DataRoot(tiny), "s3://covid-xray/incoming", "ds-1")
    assert got["images"] == 67 and got["dataset_version"] == "ds-1" and got["source"] == "s3://covid-xray/incoming"
    assert got["splits"]["train"] == {"images": 8, "covid": 4, "non_covid": 4, "patients": 8}
    assert got["splits"]["test"] == {"images": 35, "covid": 15, "non_covid": 20, "patients": 35}
    assert got["demo"] is False and got["demo_reason"] is None


@pytest.mark.parametrize("source", [str(REPO / "sample_data"), (REPO / "sample_data").as_uri(),
                                    str(REPO / "sample_data") + "/"])
def test_the_repository_s_sample_folder_as_source_makes_a_demo(tiny: Path, source: str) -> None:
    got = training_data(DataRoot(tiny), source, None)
    assert got["demo"] is True
    assert got["demo_reason"].startswith("trained on the repository's sample_data/ (67 images)")


def test_a_copy_of_the_sample_elsewhere_makes_a_demo(tmp_path: Path) -> None:
    data = as_sample_names(tiny_run.make_data_root(tmp_path))
    got = training_data(DataRoot(data), "s3://inference:pw@covid-xray/incoming", "ds-2")
    assert got["demo"] is True and got["demo_reason"].startswith("trained on a copy of the repository's")
    assert got["source"] == "s3://***@covid-xray/incoming"


def test_no_splits_means_no_counts_and_no_demo(tmp_path: Path) -> None:
    got = training_data(DataRoot(tmp_path), "s3://b/p", None)
    assert got["images"] == 0 and got["splits"] == {} and got["demo"] is False


def test_the_service_reads_the_tags_and_says_unknown_for_older_versions() -> None:
    import json

    from covid_tasks.serve.model_holder import training_data as from_tags

    recorded = {"images": 3, "splits": {}, "dataset_version": "ds", "source": "sample_data", "demo": True,
                "demo_reason": "trained on ..."}
    assert from_tags({"training_data": json.dumps(recorded), "demo": "true"}) == recorded
    older = from_tags({"dataset_version": "ds-0", "source_uri": "s3://b/p"})
    assert older == {"dataset_version": "ds-0", "source": "s3://b/p", "demo": None}
