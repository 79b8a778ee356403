"""Behaviour of the uplift model trained on the simulated shop, checked against its hidden types.

The simulator plants four hidden customer types (``Shop.segment_truth``): persuadables (a coupon
they click on adds an order; large positive uplift on every arm), sure things (buy anyway; a
tiny nuisance on sms/push), lost causes (nothing changes) and sleeping dogs (never persuaded;
being contacted cuts their baseline conversion by the channel's annoyance: 30 % on email, 65 %
on sms and 45 % on push, so their true uplift is negative on every arm and most on sms/push).

The network is trained with the product's ``train_uplift_model`` on the shop's randomized
campaign (60k rows) and scored on its held-out test split. What it recovers at this size (checked
on world seeds 3-7): persuadables far above everyone else on every channel; sleeping dogs
below zero on sms (the largest annoyance) and on sms and push together, but only a fifth to a
third of the planted effect. On push alone the sign of the dogs' estimate changes with the seed (3 of
5 negative), so push is only checked against persuadables; on 200k rows the dogs' mean
predicted uplift is about -0.010 against a true -0.015.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from mlpkg.config import Settings, TrainerSettings
from mlpkg.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES
from mlpkg.registry import score_with_model
from mlpkg.simulator import Shop, ShopConfig
from mlpkg.simulator.lab.policy_quality import read_shop_history, training_frame_from_shop
from mlpkg.train import train_uplift_model

pytestmark = [pytest.mark.model, pytest.mark.slow]

N_CUSTOMERS = 60_000
#: The shop's randomized campaign comes before any campaign of the product, so the response
#: features (messages, clicks, redemptions of the product's own campaigns) are constant in it:
#: they are left out, and the network is the one the thresholds below were set on.
FEATURES = [f for f in NUMERIC_FEATURES if not f.startswith("campaign_") and f != "days_since_last_campaign"]
TRAINER = TrainerSettings(
    accelerator="cpu", max_epochs=12, batch_size=1024, learning_rate=2e-3, hidden_dim=64, head_dim=32, seed=3,
    ensemble_members=1,  # the thresholds below were set on one network
)


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    """Train on a 60k-customer shop's campaign and score its held-out customers (built once)."""
    import torch

    tmp = tmp_path_factory.mktemp("behaviour")
    threads = torch.get_num_threads()
    # One thread: on a small shared machine extra intra-op threads mostly wait on each other.
    torch.set_num_threads(1)
    try:
        shop = Shop(ShopConfig(seed=3, n_customers=N_CUSTOMERS, campaign_share=1.0))
        frame = training_frame_from_shop(shop, read_shop_history(shop, tmp / "raw"))
        settings = Settings(_env_file=None, state_dir=tmp / "state", trainer=TRAINER)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        result = train_uplift_model(
            frame,
            FEATURES,
            CATEGORICAL_FEATURES,
            list(shop.arm_names),
            settings=settings,
            tracking_uri=uri,
            experiment="behaviour",
            run_name="behaviour",
            registered_model_name=None,
        )
        test = result.test_frame
        scores = score_with_model(result.model_uri, test, tracking_uri=uri)
    finally:
        torch.set_num_threads(threads)
    ids = test["customer_id"].tolist()
    arms = [str(a) for a in scores["arms"]]
    treatment = arms[1:]
    column = [shop.arm_names.index(a) - 1 for a in treatment]
    return {
        "arms": treatment,
        "uplift": scores["uplift"][:, 1:].astype(np.float64),
        "true_uplift": shop.true_uplift(ids)[:, column],
        "deliverable": shop.deliverable(ids)[:, column],
        "kind": shop.segment_truth(ids),
    }


def _mean_over_arms(scored: dict, values: np.ndarray, kind: str, channels: tuple[str, ...]) -> float:
    """Mean of ``values`` over a kind's customers and their deliverable arms on ``channels``."""
    on_channel = np.array([a.split("@")[1] in channels for a in scored["arms"]])
    mask = (scored["kind"] == kind)[:, None] & scored["deliverable"] & on_channel[None, :]
    return float(values[mask].mean())


def _best_arm_uplift(scored: dict) -> pd.Series:
    best = np.where(scored["deliverable"], scored["uplift"], -np.inf).max(axis=1)
    reach = np.isfinite(best)
    return pd.Series(best[reach]).groupby(scored["kind"][reach]).mean()


def test_the_simulator_plants_what_the_assertions_assume(scored) -> None:
    true = scored["true_uplift"]
    assert _mean_over_arms(scored, true, "persuadable", ("email", "sms", "push")) > 0.03
    assert abs(_mean_over_arms(scored, true, "sure_thing", ("email",))) < 0.005
    for channel in ("sms", "push"):
        assert _mean_over_arms(scored, true, "sleeping_dog", (channel,)) < -0.01
        assert _mean_over_arms(scored, true, "sleeping_dog", (channel,)) < _mean_over_arms(
            scored, true, "sleeping_dog", ("email",)
        )


def _auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_persuadables_rank_above_sure_things_and_lost_causes(scored) -> None:
    uplift = scored["uplift"]
    every = ("email", "sms", "push")
    persuadable = _mean_over_arms(scored, uplift, "persuadable", every)
    assert persuadable > _mean_over_arms(scored, uplift, "sure_thing", every) + 0.02
    assert persuadable > _mean_over_arms(scored, uplift, "lost_cause", every) + 0.02
    for channel in every:
        persuadable = _mean_over_arms(scored, uplift, "persuadable", (channel,))
        assert persuadable > _mean_over_arms(scored, uplift, "sure_thing", (channel,)) + 0.01, channel
        assert persuadable > _mean_over_arms(scored, uplift, "lost_cause", (channel,)) + 0.01, channel
    # Customer by customer: the best deliverable arm's predicted uplift orders the kinds.
    best = np.where(scored["deliverable"], uplift, -np.inf).max(axis=1)
    reach = np.isfinite(best)
    for other, floor in (("sure_thing", 0.55), ("lost_cause", 0.9), ("sleeping_dog", 0.9)):
        pair = reach & np.isin(scored["kind"], ["persuadable", other])
        assert _auc(best[pair], scored["kind"][pair] == "persuadable") > floor, other


def test_sleeping_dogs_get_negative_uplift_where_contact_annoys_them_most(scored) -> None:
    uplift = scored["uplift"]
    # sms carries the largest planted annoyance (65 % of a dog's baseline conversion).
    assert _mean_over_arms(scored, uplift, "sleeping_dog", ("sms",)) < 0
    assert _mean_over_arms(scored, uplift, "sleeping_dog", ("sms", "push")) < 0
    for channel in ("sms", "push"):
        dogs = _mean_over_arms(scored, uplift, "sleeping_dog", (channel,))
        assert dogs < _mean_over_arms(scored, uplift, "persuadable", (channel,)) - 0.02, channel
