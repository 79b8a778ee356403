"""Uplift attributions name the feature that truly drives the uplift, for every model family."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from mlpkg.models.baseline import fit_t_learner
from mlpkg.models.network import MultiArmUpliftNet
from mlpkg.models.preprocessing import FeaturePreprocessor
from mlpkg.models.pyfunc import UpliftPyfunc
from tests.fixtures import ATTRIBUTION_ARMS as ARMS
from tests.fixtures import ATTRIBUTION_CATEGORICAL as CATEGORICAL
from tests.fixtures import ATTRIBUTION_NUMERIC as NUMERIC
from tests.fixtures import planted

pytestmark = pytest.mark.model


def _ranking(att) -> list[str]:  # noqa: ANN001 - UpliftAttributions
    order = np.argsort(-np.abs(att.values).mean(axis=0))
    return [att.features[j] for j in order]


def _pyfunc_of_tlearner(family: str, frame: pd.DataFrame) -> UpliftPyfunc:
    model = UpliftPyfunc()
    model.arms = list(ARMS)
    model.family = f"{family}_tlearner"
    model.tlearner = fit_t_learner(frame, NUMERIC, CATEGORICAL, ARMS, family=family, n_threads=1)
    return model


@pytest.mark.parametrize("family", ["gbm", "logistic"])
def test_tlearner_attributions_rank_the_planted_driver_first_and_add_up(family):
    frame = planted()
    model = _pyfunc_of_tlearner(family, frame)
    explain = frame.head(1500)
    att = model.attribute_uplift(explain, np.ones(len(explain), dtype=int), reference=frame)
    assert att.method == ("tree_shap" if family == "gbm" else "linear")
    assert _ranking(att)[0] == "drive", _ranking(att)
    # Completeness: the contributions add up to the uplift's gap from the reference (exact for both).
    np.testing.assert_allclose(att.values.sum(axis=1), att.uplift - att.reference_uplift, atol=1e-4)
    expected = model.score_arrays(explain)["p_conv"]
    np.testing.assert_allclose(att.uplift, expected[:, 1] - expected[:, 0], atol=1e-5)
    # High "drive" customers are pushed up, low ones down: the sign follows the planted effect.
    drive = att.values[:, att.features.index("drive")]
    x = explain["drive"].to_numpy()
    assert drive[x > 1].mean() > 0 > drive[x < -1].mean()


def test_tree_shap_handles_categorical_splits_exactly():
    """A categorical driver: shap alone misreads HistGradientBoosting's category splits; ours add up."""
    frame = planted(driver="segment")
    model = _pyfunc_of_tlearner("gbm", frame)
    explain = frame.head(1500)
    att = model.attribute_uplift(explain, np.ones(len(explain), dtype=int))
    assert _ranking(att)[0] == "segment", _ranking(att)
    np.testing.assert_allclose(att.values.sum(axis=1), att.uplift - att.reference_uplift, atol=1e-4)
    seg = att.values[:, att.features.index("segment")]
    vip = explain["segment"].to_numpy() == "vip"
    assert seg[vip].mean() > 0.1 and seg[~vip].mean() < 0


def _trained_network(frame: pd.DataFrame) -> UpliftPyfunc:
    torch.manual_seed(0)
    pre = FeaturePreprocessor(NUMERIC, CATEGORICAL).fit(frame)
    x_num, x_cat = (torch.from_numpy(a) for a in pre.transform(frame))
    arm = torch.from_numpy((frame["arm"] != "control").to_numpy().astype(np.int64))
    y = torch.from_numpy(frame["converted"].to_numpy().astype(np.float32))
    net = MultiArmUpliftNet(len(NUMERIC), pre.cardinalities, len(ARMS), hidden_dim=32, head_dim=16,
                            dropout=0.0, arms=ARMS)  # fmt: skip
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(250):
        logits, _ = net(x_num, x_cat)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.gather(1, arm[:, None])[:, 0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model = UpliftPyfunc()
    model.arms, model.preprocessor, model.net = list(ARMS), pre, net.eval()
    return model


def test_network_integrated_gradients_rank_the_planted_driver_first_and_nearly_add_up():
    frame = planted()
    model = _trained_network(frame)
    explain = frame.head(1500)
    att = model.attribute_uplift(explain, np.ones(len(explain), dtype=int), reference=frame)
    assert att.method == "integrated_gradients"
    assert _ranking(att)[0] == "drive", _ranking(att)
    scores = model.score_arrays(explain)["p_conv"]
    np.testing.assert_allclose(att.uplift, scores[:, 1] - scores[:, 0], atol=1e-5)
    # Sixteen Gauss-Legendre steps: completeness holds to a small fraction of the uplift's spread.
    gap = att.uplift - att.reference_uplift
    assert np.abs(att.values.sum(axis=1) - gap).max() < 0.05 * np.abs(gap).max()
