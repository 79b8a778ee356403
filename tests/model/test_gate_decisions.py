"""The promotion gate on a real MLflow registry with real models and real estimates (no stand-ins).

Every version here is a network trained by :func:`mlpkg.train.train_uplift_model` on a planted
randomised campaign, and the gate scores it on a holdout of other customers: a challenger trained
on shuffled labels is refused, one trained on ten times the data is promoted, and an exact tie is
kept. Each decision is the gate's own paired doubly robust estimate, checked against the rule.
"""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pytest

from mlpkg import registry
from mlpkg.config import GateSettings, Settings, TrainerSettings
from mlpkg.gate import GateEconomics, gate_challenger, holdout_mask
from mlpkg.train import train_uplift_model
from tests.model.test_train import (  # noqa: F401 - _one_torch_thread: the module's autouse fixture
    ARMS,
    CATEGORICAL,
    NUMERIC,
    _one_torch_thread,
    make_planted_world,
)

pytestmark = pytest.mark.model

NAME = "couponops-uplift-gate"
NOW = datetime(2025, 7, 7, tzinfo=UTC)
HIDDEN = ["kind", "true_uplift__PCT10@email"]


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A registry, the training log and a holdout of other customers (the gate's frozen holdout)."""
    tmp = tmp_path_factory.mktemp("gate")
    uri = f"sqlite:///{tmp}/mlflow.db"
    client = registry.make_client(uri)
    client.create_experiment("gate", artifact_location=(tmp / "art").as_uri())
    settings = Settings(
        state_dir=tmp / "state",
        trainer=TrainerSettings(accelerator="cpu", max_epochs=4, batch_size=256, hidden_dim=32, head_dim=16,
            ensemble_members=1),
    )
    log = make_planted_world(12_000, seed=11)
    held = make_planted_world(16_000, seed=12).assign(customer_id=lambda d: "h" + d["customer_id"])
    return client, uri, settings, log.drop(columns=HIDDEN), held.drop(columns=HIDDEN)


def _train(shop, frame: pd.DataFrame, run_name: str) -> str:
    client, uri, settings, _, _ = shop
    result = train_uplift_model(
        frame.reset_index(drop=True),
        NUMERIC,
        CATEGORICAL,
        ARMS,
        settings=settings,
        tracking_uri=uri,
        experiment="gate",
        run_name=run_name,
        registered_model_name=NAME,
    )
    return result.registered_version


def _economics(held: pd.DataFrame) -> GateEconomics:
    # Both coupons cost 1 to send and nothing more; the budget treats 30 % of the held-out rows.
    return GateEconomics(
        arms=ARMS[1:],
        send_cost=np.ones(2),
        coupon_cost=np.zeros((len(held), 2)),
        eligible=np.ones((len(held), 2), dtype=bool),
        budget=0.3 * len(held),
        basis="two coupons at cost 1, 30% of the rows",
    )


def _gate(shop, engine, version: str, **gate):
    client, uri, _, _, held = shop
    return gate_challenger(
        client,
        engine,
        name=NAME,
        tracking_uri=uri,
        challenger_version=version,
        test_frame=held,
        economics_for=lambda rows, arms: _economics(rows),
        # The first model learns from a tenth of the log and is calibrated to about 0.055 only:
        # calibration is not what these decisions are about.
        gate=GateSettings(**{"max_calibration_error": 0.1, **gate}),
        now=NOW,
    )


def test_the_gate_refuses_shuffled_labels_promotes_ten_times_the_data_and_keeps_a_tie(shop, engine):
    client, _, _, log, held = shop
    small = log.sample(n=len(log) // 10, random_state=3)
    first = _train(shop, small, "a tenth of the log")
    d1 = _gate(shop, engine, first)
    assert d1.promoted and d1.outcome == "promoted" and d1.champion_version is None
    # A first version is compared with random targeting at the same budget: a real model beats it.
    assert d1.challenger_value > d1.baseline_value

    shuffled = log.assign(converted=np.random.default_rng(5).permutation(log["converted"].to_numpy()))
    noise = _train(shop, shuffled.assign(revenue=np.where(shuffled["converted"] > 0, 40.0, 0.0)), "shuffled")
    d2 = _gate(shop, engine, noise)
    assert not d2.promoted and d2.outcome == "kept"
    assert d2.gain < 0 and d2.gain_lcb < 0, d2.sentence()
    assert registry.alias_version(client, NAME, registry.CHAMPION) == first

    full = _train(shop, log, "the whole log")
    d3 = _gate(shop, engine, full)
    assert d3.promoted and d3.champion_version == first, d3.sentence()
    assert d3.gain_lcb > 0 and d3.gain == pytest.approx(d3.challenger_value - d3.champion_value, abs=1e-12)
    assert registry.alias_version(client, NAME, registry.CHAMPION) == full

    # The same data, the same seed: the same model. Its gain is exactly zero, and zero is no gain.
    again = _train(shop, log, "the whole log again")
    d4 = _gate(shop, engine, again)
    assert d4.gain == pytest.approx(0.0, abs=1e-12) and not d4.promoted and d4.outcome == "kept"
    assert registry.alias_version(client, NAME, registry.CHAMPION) == full

    tags = client.get_model_version(NAME, again).tags
    assert tags["gate.outcome"] == "kept" and tags["gate.champion_version"] == full
    assert "lower bound" in client.get_model_version(NAME, again).description


def test_the_holdout_is_by_customer_stable_and_about_its_share() -> None:
    ids = pd.Series([f"c{i:05d}" for i in range(20_000)])
    mask = holdout_mask(ids, 0.2)
    assert 0.19 < mask.mean() < 0.21
    # Rows of one customer fall together, whatever the order, and the rule never changes.
    repeated = pd.concat([ids, ids.sample(frac=1.0, random_state=1)], ignore_index=True)
    twice = holdout_mask(repeated, 0.2)
    by_customer = pd.Series(twice).groupby(repeated.to_numpy()).nunique()
    assert (by_customer == 1).all()
    assert np.array_equal(holdout_mask(ids, 0.2), mask)
