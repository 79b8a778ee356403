"""Training logs what drives the model's uplift, and the planted driver leads it, for every family."""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient

from mlpkg import registry
from mlpkg.config import Settings, TrainerSettings
from mlpkg.models.attribution import global_attributions
from mlpkg.train import train_tlearner_model, train_uplift_model
from tests.fixtures import ATTRIBUTION_CATEGORICAL as CATEGORICAL
from tests.fixtures import ATTRIBUTION_NUMERIC as NUMERIC
from tests.fixtures import planted

pytestmark = pytest.mark.model

ARMS = ["control", "PCT10@email", "PCT20@email"]
METHODS = {"network": "integrated_gradients", "gbm": "tree_shap", "logistic": "linear"}


def _train(family: str, tmp_path):  # noqa: ANN001, ANN202 - a path; a TrainResult
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).create_experiment("attr", artifact_location=(tmp_path / "art").as_uri())
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        trainer=TrainerSettings(accelerator="cpu", max_epochs=12, batch_size=256, learning_rate=0.01,
                                hidden_dim=32, head_dim=16, dropout=0.0, arm_heads="per_arm", num_threads=1),
    )  # fmt: skip
    frame = planted(6000, seed=3, arms=ARMS)
    common = dict(settings=settings, tracking_uri=uri, experiment="attr", run_name=family,
                  registered_model_name="attr-model")  # fmt: skip
    if family == "network":
        return train_uplift_model(frame, NUMERIC, CATEGORICAL, ARMS, **common), uri
    return train_tlearner_model(frame, NUMERIC, CATEGORICAL, ARMS, family=family, **common), uri


@pytest.mark.parametrize("family", ["network", "gbm", "logistic"])
def test_the_planted_driver_leads_the_global_attributions_logged_at_training(family, tmp_path):
    result, uri = _train(family, tmp_path)
    client = registry.make_client(uri)
    # Read back from the run's artifact in the real store, as the reports do.
    doc = registry.global_attributions(client, result.mlflow_run_id)
    assert doc is not None
    ranked = [f["feature"] for f in doc["features"]]
    assert ranked[0] == "drive", doc["features"]
    assert sorted(ranked) == sorted([*NUMERIC, *CATEGORICAL])
    assert doc["method"] == METHODS[family]
    assert doc["rows"] == len(result.test_frame) and set(doc["arms"]) == set(ARMS[1:])
    lead = doc["features"][0]
    assert lead["direction"] == "higher raises the uplift" and lead["correlation"] > 0.5
    # The averaged number is the mean of the arms' own, and the bigger arm's driver weighs more.
    per_arm = [doc["arms"][a]["mean_abs"]["drive"] for a in ARMS[1:]]
    assert lead["mean_abs"] == pytest.approx(np.mean(per_arm), abs=1e-5)
    assert per_arm[1] > per_arm[0]
    assert doc["arms"]["PCT20@email"]["mean_uplift"] > doc["arms"]["PCT10@email"]["mean_uplift"]
    # The readable table, the chart, the top features' metrics and the version's tag.
    listed = {a.path for a in client.list_artifacts(result.mlflow_run_id, registry.ATTRIBUTIONS_DIR)}
    assert listed == {f"{registry.ATTRIBUTIONS_DIR}/global.{ext}" for ext in ("json", "csv", "png")}
    metrics = client.get_run(result.mlflow_run_id).data.metrics
    attr = {k: v for k, v in metrics.items() if k.startswith("attr/")}
    assert max(attr, key=attr.get) == "attr/drive"
    assert attr["attr/drive"] == pytest.approx(lead["mean_abs"])
    version = client.get_model_version("attr-model", result.registered_version)
    assert version.tags["attributions.top"].split(", ")[0] == "drive"
    json.dumps(doc)  # what the JSON reports print


def test_global_attributions_explain_a_bounded_sample_of_the_test_rows(tmp_path):
    result, uri = _train("logistic", tmp_path)
    model = registry.load_uplift_model(result.model_uri, tracking_uri=uri)
    doc = global_attributions(model, result.test_frame, max_rows=150, seed=1)
    assert doc["rows"] == 150 and doc["sampled_from"] == len(result.test_frame)
    # With many arms fewer rows: the explanations (rows x treatment arms) stay within their budget.
    assert global_attributions(model, result.test_frame, max_explanations=500)["rows"] == 250
    assert doc["features"][0]["feature"] == "drive"
    # A categorical feature's direction names its categories.
    segment = next(f for f in doc["features"] if f["feature"] == "segment")
    assert {segment["highest"], segment["lowest"]} <= {"new", "regular", "vip", "lapsed"}


def test_a_run_without_global_attributions_reads_as_none(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = registry.make_client(uri)
    experiment = client.create_experiment("old", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(experiment)
    assert registry.global_attributions(client, run.info.run_id) is None
    assert registry.global_attributions(client, None) is None
