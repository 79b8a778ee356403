"""Behaviour of the trained uplift model on a planted world, and the MLflow training stage end to end.

The planted world has four latent customer kinds with known responses to a coupon:
persuadables (convert mostly when treated), sure things (convert anyway), sleeping dogs (a
coupon puts them off) and lost causes. The kind shows through a noisy observable segment and
visit counts, so a model that learns the treatment response must rank them accordingly.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from mlflow import MlflowClient

from mlpkg.config import Settings, TrainerSettings
from mlpkg.models.lightning import UpliftDataModule, UpliftLitModule, split_by_arm
from mlpkg.models.network import MultiArmUpliftNet
from mlpkg.models.pyfunc import UpliftPyfunc, write_model_artifacts
from mlpkg.registry import score_with_model
from mlpkg.train import train_uplift_model

pytestmark = pytest.mark.model

ARMS = ["control", "PCT10@email", "USD5@sms"]
NUMERIC = ["visits_30d", "spend_90d"]
CATEGORICAL = ["segment", "region"]
KINDS = ("persuadable", "sure_thing", "sleeping_dog", "lost_cause")
SEGMENT_OF = {
    "persuadable": "deal_seeker",
    "sure_thing": "loyal",
    "sleeping_dog": "annoyed",
    "lost_cause": "dormant",
}
BASE_RATE = {"persuadable": 0.06, "sure_thing": 0.55, "sleeping_dog": 0.35, "lost_cause": 0.03}
EFFECT = {"persuadable": 0.30, "sure_thing": 0.02, "sleeping_dog": -0.22, "lost_cause": 0.0}
ARM_STRENGTH = {"control": 0.0, "PCT10@email": 1.0, "USD5@sms": 0.6}
# Unequal arm shares so the inverse-propensity weighting is exercised.
PROPENSITY = {"control": 0.2, "PCT10@email": 0.4, "USD5@sms": 0.4}


def make_planted_world(n: int = 24_000, seed: int = 0) -> pd.DataFrame:
    """Return a randomised campaign log over customers of four planted kinds.

    Args:
        n: Number of customers (one logged arm each).
        seed: Seed of every random draw.

    Returns:
        A model input frame (features, ``arm``, ``converted``, ``revenue``, ``propensity``) plus
        the hidden ``kind`` and ``true_uplift__PCT10@email`` columns for assertions.
    """
    rng = np.random.default_rng(seed)
    kind = pd.Series(rng.choice(KINDS, size=n, p=[0.3, 0.25, 0.2, 0.25]))
    # 15 % of segments are noise, so the segment alone does not reveal the kind.
    segment = np.where(
        rng.random(n) < 0.15, rng.choice(list(SEGMENT_OF.values()), size=n), kind.map(SEGMENT_OF)
    )
    visits = rng.poisson(np.where(kind == "sure_thing", 8.0, 3.0))
    spend = rng.lognormal(np.where(kind == "lost_cause", 2.0, 3.5), 1.0)
    arm = pd.Series(rng.choice(ARMS, size=n, p=[PROPENSITY[a] for a in ARMS]))
    effect = kind.map(EFFECT).to_numpy()
    p = kind.map(BASE_RATE).to_numpy() + effect * arm.map(ARM_STRENGTH).to_numpy()
    converted = (rng.random(n) < p).astype(np.int64)
    revenue = np.where(converted == 1, rng.lognormal(np.log(30 + 0.2 * spend), 0.3), 0.0)
    return pd.DataFrame(
        {
            "customer_id": [f"c{i:06d}" for i in range(n)],
            "visits_30d": visits.astype(np.float64),
            "spend_90d": spend,
            "segment": segment,
            "region": rng.choice(["north", "south", "east", "west"], size=n),
            "arm": arm,
            "converted": converted,
            "revenue": revenue,
            "propensity": arm.map(PROPENSITY).to_numpy(),
            "kind": kind,
            "true_uplift__PCT10@email": effect,
        }
    )


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # On a shared 2-core machine a second intra-op thread spins against other processes and
    # makes these small matmuls ~10x slower; one thread is faster and gives stable timings.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world() -> pd.DataFrame:
    """The planted campaign log shared by the tests of this module."""
    return make_planted_world()


@pytest.fixture(scope="module")
def trained(world: pd.DataFrame) -> tuple[UpliftDataModule, MultiArmUpliftNet, pl.Trainer]:
    """A model fitted with the three layers (network, LightningModule, DataModule) directly."""
    torch.set_num_threads(1)
    pl.seed_everything(3, verbose=False)
    data = UpliftDataModule(world, NUMERIC, CATEGORICAL, ARMS, batch_size=512, seed=3)
    data.setup()
    net = MultiArmUpliftNet(
        len(NUMERIC), data.preprocessor.cardinalities, len(ARMS), hidden_dim=32, head_dim=16, arms=data.arms
    )
    net.init_output_bias(*data.training_stats())
    module = UpliftLitModule(net, functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=1e-5))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    return data, net.eval(), trainer


def _predicted_uplift(data: UpliftDataModule, net: MultiArmUpliftNet, frame: pd.DataFrame) -> np.ndarray:
    x_num, x_cat = data.preprocessor.transform(frame)
    with torch.inference_mode():
        conv_logits, _ = net(torch.from_numpy(x_num), torch.from_numpy(x_cat))
    p = torch.sigmoid(conv_logits).numpy()
    return p[:, 1:] - p[:, :1]


def test_split_is_stratified_disjoint_and_seeded(world: pd.DataFrame) -> None:
    """70/15/15 per arm, no row in two splits, and the same seed gives the same split."""
    train, val, test = split_by_arm(world, seed=11)
    assert (
        len(np.intersect1d(train, val))
        == len(np.intersect1d(train, test))
        == len(np.intersect1d(val, test))
        == 0
    )
    assert len(train) + len(val) + len(test) == len(world)
    for arm in ARMS:
        share = [float((world["arm"].iloc[idx] == arm).mean()) for idx in (train, val, test)]
        assert max(share) - min(share) < 0.005
    again = split_by_arm(world, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip((train, val, test), again, strict=True))
    assert not np.array_equal(split_by_arm(world, seed=12)[0], train)


def test_preprocessor_is_fitted_on_train_only(trained) -> None:
    """The numeric scaling statistics come from the training rows, not the whole frame."""
    data, _, _ = trained
    train_visits = data.split_frame("train")["visits_30d"]
    assert data.preprocessor.means["visits_30d"] == pytest.approx(train_visits.mean())
    assert data.preprocessor.means["visits_30d"] != pytest.approx(data.frame["visits_30d"].mean(), abs=1e-9)


def test_training_reaches_useful_validation_metrics(trained) -> None:
    """Validation AUC beats 0.7 and validation loss is below the constant-rate model's."""
    data, _, trainer = trained
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/auc", "val/logloss"} <= set(metrics)
    assert float(metrics["val/auc"]) > 0.7
    rate, _ = data.training_stats()
    constant_logloss = -(rate * np.log(rate) + (1 - rate) * np.log(1 - rate))
    assert float(metrics["val/logloss"]) < constant_logloss - 0.05


def test_model_ranks_persuadables_above_sure_things_and_finds_sleeping_dogs(trained) -> None:
    """Mean predicted uplift: persuadables > sure things, and negative for sleeping dogs."""
    data, net, _ = trained
    test = data.split_frame("test")
    uplift = _predicted_uplift(data, net, test)[:, 0]
    by_kind = pd.Series(uplift).groupby(test["kind"].to_numpy()).mean()
    assert by_kind["persuadable"] > by_kind["sure_thing"] + 0.1
    assert by_kind["sleeping_dog"] < 0
    # The weaker arm's uplift is smaller for persuadables, as planted (strength 0.6 vs 1.0).
    strong, weak = _predicted_uplift(data, net, test[test["kind"] == "persuadable"]).mean(0)
    assert weak < strong


def test_lightning_test_step_reports_test_metrics(trained) -> None:
    """trainer.test logs test/loss, test/auc and test/logloss on the held-out split."""
    data, net, trainer = trained
    module = UpliftLitModule(net, functools.partial(torch.optim.AdamW, lr=1e-3))
    (result,) = trainer.test(module, datamodule=data, verbose=False)
    assert set(result) == {"test/loss", "test/auc", "test/logloss"}
    assert result["test/auc"] > 0.7


def test_scores_follow_the_planted_truth(trained, tmp_path) -> None:
    """Pyfunc uplift on PCT10@email correlates with the planted true uplift."""
    data, net, _ = trained
    artifacts = write_model_artifacts(net, data.preprocessor, data.arms, tmp_path)
    model = UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"])
    test = data.split_frame("test")
    scores = score_with_model(model, test.drop(columns=["arm", "converted", "revenue", "propensity"]))
    assert list(scores["arms"]) == ARMS
    corr = np.corrcoef(scores["uplift"][:, 1], test["true_uplift__PCT10@email"])[0, 1]
    assert corr > 0.7


def test_train_uplift_model_logs_registers_and_loads_in_a_fresh_process(tmp_path) -> None:
    """End to end: run metrics, params, lineage tags, a registered version, and a fresh-process load."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.create_experiment("uplift-test", artifact_location=(tmp_path / "artifacts").as_uri())
    settings = Settings(
        state_dir=tmp_path / "state",
        trainer=TrainerSettings(accelerator="cpu", max_epochs=2, batch_size=512, hidden_dim=32, head_dim=16,
                                ensemble_members=1),
    )
    frame = make_planted_world(8_000, seed=5).drop(columns=["kind", "true_uplift__PCT10@email"])
    lineage = {
        "dag_id": "train_uplift",
        "run_id": "manual__2026-03-01",
        "try_number": "1",
        "snapshot_id": "snap-7",
    }
    result = train_uplift_model(
        frame,
        NUMERIC,
        CATEGORICAL,
        ["PCT10@email", "control", "USD5@sms"],
        settings=settings,
        tracking_uri=uri,
        experiment="uplift-test",
        run_name="unit",
        tags=lineage,
        registered_model_name="couponops-uplift-test",
        extra_metrics_fn=lambda test, scores, arms: {"test/rows_seen_by_extra": len(test)},
    )
    assert result.arms == ARMS  # control first, whatever order the caller used
    assert result.model_uri == f"runs:/{result.mlflow_run_id}/model"
    assert result.registered_version == "1"
    run = client.get_run(result.mlflow_run_id)
    assert "val/loss" in run.data.metrics and "train/loss" in run.data.metrics
    for key in (
        "test/auc",
        "test/ece",
        "test/qini",
        "test/policy_value_conv",
        "test/auc/PCT10.email",
        "test/auuc/PCT10.email",
    ):
        assert key in run.data.metrics, key
    assert run.data.metrics["test/rows_seen_by_extra"] == len(result.test_frame)
    assert run.data.params["arms"] == ",".join(ARMS) and run.data.params["data.n_rows"] == "8000"
    assert {k: run.data.tags[k] for k in lineage} == lineage and "git.commit" in run.data.tags
    version = client.get_model_version("couponops-uplift-test", "1")
    assert version.run_id == result.mlflow_run_id
    assert {k: version.tags[k] for k in lineage} == lineage and version.tags["git.commit"]
    assert len(result.test_frame) == pytest.approx(0.15 * len(frame), abs=10)
    assert result.metrics["test/auc"] > 0.65

    raw = result.test_frame[["customer_id", *NUMERIC, *CATEGORICAL]].head(50).copy()
    raw.loc[0, "segment"] = "never-seen-segment"
    raw.to_parquet(tmp_path / "raw.parquet")
    script = textwrap.dedent(
        f"""
        import json, mlflow, pandas as pd
        mlflow.set_tracking_uri({uri!r})
        model = mlflow.pyfunc.load_model("models:/couponops-uplift-test/1")
        out = model.predict(pd.read_parquet({str(tmp_path / "raw.parquet")!r}))
        print(json.dumps({{"columns": list(out.columns), "dtypes": sorted(set(map(str, out.dtypes))),
                          "rows": len(out), "first": out.iloc[0].tolist()}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=300,  # a fresh interpreter importing torch and MLflow on a loaded 2-core machine
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == 50 and loaded["dtypes"] == ["float32"]
    assert "p_conv__control" in loaded["columns"] and "uplift__PCT10@email" in loaded["columns"]
    assert "uplift__control" not in loaded["columns"]
    local = score_with_model(result.model_uri, raw, tracking_uri=uri)
    np.testing.assert_allclose(loaded["first"][: len(ARMS)], local["p_conv"][0], rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_mixed_precision_training_scores_on_cpu(world: pd.DataFrame, tmp_path) -> None:
    """bf16-mixed training on one GPU learns the planted ranking, and the CPU pyfunc reproduces it."""
    pl.seed_everything(3, verbose=False)
    data = UpliftDataModule(world, NUMERIC, CATEGORICAL, ARMS, batch_size=1024, seed=3)
    data.setup()
    cards = data.preprocessor.cardinalities
    net = MultiArmUpliftNet(len(NUMERIC), cards, len(ARMS), hidden_dim=32, head_dim=16, arms=data.arms)
    net.init_output_bias(*data.training_stats())
    module = UpliftLitModule(net, functools.partial(torch.optim.AdamW, lr=3e-3))
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_epochs=8,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    assert float(trainer.callback_metrics["val/auc"]) > 0.7
    artifacts = write_model_artifacts(net, data.preprocessor, data.arms, tmp_path)
    model = UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"])
    test = data.split_frame("test")
    uplift = model.predict(None, test)["uplift__PCT10@email"]
    by_kind = uplift.groupby(test["kind"].to_numpy()).mean()
    assert by_kind["persuadable"] > by_kind["sure_thing"] + 0.1
    assert by_kind["sleeping_dog"] < 0
