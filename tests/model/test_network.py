"""Network shapes, arm effects and their shared factors, preprocessing and the pyfunc's output contract."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mlpkg.models.network import MultiArmUpliftNet, UpliftEnsemble, arm_factors, build_network
from mlpkg.models.preprocessing import UNKNOWN_CODE, FeaturePreprocessor
from mlpkg.models.pyfunc import UpliftPyfunc, write_model_artifacts

pytestmark = pytest.mark.model

ARMS = ["control", "PCT10@email", "USD5@sms", "FREESHIP@push"]


def _raw_frame(n: int = 500, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    spend = rng.lognormal(3.0, 1.2, size=n)
    spend[:7] = np.nan
    return pd.DataFrame(
        {
            "customer_id": [f"c{i}" for i in range(n)],
            "spend_90d": spend,
            "visits_30d": rng.poisson(4, size=n).astype(np.int64),
            "segment": rng.choice(["new", "regular", "vip", "lapsed"], size=n),
            "device": rng.choice(["ios", "android", "desktop"], size=n),
        }
    )


def _fitted() -> tuple[FeaturePreprocessor, pd.DataFrame]:
    frame = _raw_frame()
    return FeaturePreprocessor(["spend_90d", "visits_30d"], ["segment", "device"]).fit(frame), frame


def test_forward_returns_one_column_per_arm() -> None:
    """Both outputs are [n, A] and finite, for numeric-only, categorical-only and mixed inputs."""
    for n_numeric, cards in [(3, [5, 4]), (3, []), (0, [5])]:
        net = MultiArmUpliftNet(n_numeric, cards, len(ARMS), hidden_dim=16, head_dim=8)
        x_num = torch.randn(11, n_numeric)
        x_cat = (
            torch.stack([torch.randint(0, c, (11,)) for c in cards], 1)
            if cards
            else torch.zeros(11, 0).long()
        )
        conv_logits, rev_log = net(x_num, x_cat)
        assert conv_logits.shape == rev_log.shape == (11, len(ARMS))
        assert torch.isfinite(conv_logits).all() and torch.isfinite(rev_log).all()


def _changed_arms(net: MultiArmUpliftNet, edit) -> list[bool]:
    """Return, per arm, whether ``edit(net)`` moved that arm's conversion or revenue output."""
    x_num, x_cat = torch.randn(32, net.n_numeric), torch.randint(0, 5, (32, 1))
    before_conv, before_rev = net(x_num, x_cat)
    with torch.no_grad():
        edit(net)
    after_conv, after_rev = net(x_num, x_cat)
    conv = (after_conv - before_conv).abs().amax(0) > 1e-6
    rev = (after_rev - before_rev).abs().amax(0) > 1e-6
    assert conv.tolist() == rev.tolist()
    return conv.tolist()


def test_each_arm_has_its_own_head() -> None:
    """Per-arm heads: changing one arm's head weights moves that arm's outputs and no other arm's."""
    torch.manual_seed(0)
    net = MultiArmUpliftNet(3, [5], len(ARMS), hidden_dim=16, head_dim=8).eval()
    assert _changed_arms(net, lambda n: n.heads.w1[2].add_(0.5)) == [False, False, True, False]


def test_each_arm_has_its_own_embedding() -> None:
    """Factorised heads: changing one arm's own embedding moves that arm's outputs and no other arm's."""
    torch.manual_seed(0)
    net = MultiArmUpliftNet(3, [5], len(ARMS), hidden_dim=16, head_dim=8, arms=ARMS, arm_heads="factorised")
    assert _changed_arms(net.eval(), lambda n: n.effects.own[1].add_(0.5)) == [False, False, True, False]


def test_arms_share_their_coupon_and_channel() -> None:
    """A coupon's embedding moves exactly the arms with that coupon, a channel's the arms on it."""
    arms = ["control", "A@email", "A@sms", "B@email", "solo"]
    coupon_index, channel_index, n_coupons, n_channels = arm_factors(arms)
    assert (coupon_index, channel_index, n_coupons, n_channels) == ([0, 0, 1, 2], [0, 1, 0, 2], 3, 2)
    torch.manual_seed(0)
    net = MultiArmUpliftNet(3, [5], len(arms), hidden_dim=16, head_dim=8, arms=arms, arm_heads="factorised")
    net.eval()
    assert _changed_arms(net, lambda n: n.effects.coupon[0].add_(0.5)) == [False, True, True, False, False]
    assert _changed_arms(net, lambda n: n.effects.channel[0].add_(0.5)) == [False, True, False, True, False]
    # Control is the baseline itself; every treatment arm is the baseline plus its effect.
    assert _changed_arms(net, lambda n: n.baseline[-1].bias.add_(0.5)) == [True] * len(arms)
    with pytest.raises(ValueError, match="arm names"):
        MultiArmUpliftNet(3, [5], 3, arms=arms)
    with pytest.raises(ValueError, match="arm_heads"):
        MultiArmUpliftNet(3, [5], len(arms), arms=arms, arm_heads="shared")


@pytest.mark.parametrize("arm_heads", ["per_arm", "factorised"])
def test_output_bias_starts_at_base_rates(arm_heads: str) -> None:
    """init_output_bias makes an untrained network predict the base rate and mean revenue on every arm."""
    torch.manual_seed(0)
    net = MultiArmUpliftNet(2, [3], 2, hidden_dim=8, head_dim=4, arm_heads=arm_heads)
    with torch.no_grad():
        if arm_heads == "per_arm":
            net.heads.w2.zero_()
        else:
            net.baseline[-1].weight.zero_()
            net.effects.out.weight.zero_()
    net.init_output_bias(0.1, 40.0)
    conv_logits, rev_log = net(torch.randn(5, 2), torch.zeros(5, 1).long())
    assert torch.allclose(torch.sigmoid(conv_logits), torch.full((5, 2), 0.1), atol=1e-5)
    assert torch.allclose(torch.exp(rev_log), torch.full((5, 2), 40.0), rtol=1e-4)


@pytest.mark.parametrize("arm_heads", ["per_arm", "factorised"])
def test_config_rebuilds_an_identical_network(arm_heads: str) -> None:
    """MultiArmUpliftNet(**net.config()) with the state_dict reproduces the outputs."""
    arms = ["control", "PCT10@email", "USD5@sms"]
    net = MultiArmUpliftNet(
        2, [4, 3], 3, embedding_dim=2, hidden_dim=8, head_dim=4, dropout=0.2, arms=arms, arm_heads=arm_heads
    ).eval()
    clone = MultiArmUpliftNet(**json.loads(json.dumps(net.config())))
    clone.load_state_dict(net.state_dict())
    x_num, x_cat = torch.randn(6, 2), torch.tensor([[0, 1], [3, 2]] * 3)
    assert torch.equal(net(x_num, x_cat)[0], clone.eval()(x_num, x_cat)[0])


def test_preprocessor_round_trips_through_json() -> None:
    """from_dict(json(to_dict())) transforms exactly like the fitted original."""
    pre, frame = _fitted()
    restored = FeaturePreprocessor.from_dict(json.loads(json.dumps(pre.to_dict())))
    fresh = _raw_frame(300, seed=1)
    for a, b in zip(pre.transform(fresh), restored.transform(fresh), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    x_num, x_cat = restored.transform(frame)
    assert x_num.dtype == np.float32 and x_num.shape == (len(frame), 2)
    assert x_cat.dtype == np.int64 and x_cat.shape == (len(frame), 2)


def test_preprocessor_standardises_and_imputes() -> None:
    """Skewed spend gets log1p; outputs are clipped, about zero-mean, and NaN becomes the median."""
    pre, frame = _fitted()
    assert pre.log1p == ["spend_90d"]
    x_num, _ = pre.transform(frame)
    assert np.isfinite(x_num).all() and np.abs(x_num).max() <= pre.clip
    assert np.abs(x_num.mean(0)).max() < 0.05
    median_row = pd.DataFrame(
        {"spend_90d": [pre.medians["spend_90d"]], "visits_30d": [4], "segment": ["vip"], "device": ["ios"]}
    )
    missing_row = median_row.assign(spend_90d=[np.nan])
    assert pre.transform(missing_row)[0][0, 0] == pytest.approx(pre.transform(median_row)[0][0, 0])


def test_unknown_and_missing_categories_map_to_the_unknown_bucket() -> None:
    """A category never seen in training, or a missing one, gets code 0; known ones get 1..K."""
    pre, _ = _fitted()
    rows = pd.DataFrame(
        {
            "spend_90d": [10.0, 10.0, 10.0],
            "visits_30d": [1, 2, 3],
            "segment": ["vip", "platinum", None],
            "device": ["ios", "smart-tv", "android"],
        }
    )
    _, x_cat = pre.transform(rows)
    assert x_cat[0].tolist() == [pre.vocab["segment"].index("vip") + 1, pre.vocab["device"].index("ios") + 1]
    assert x_cat[1].tolist() == [UNKNOWN_CODE, UNKNOWN_CODE]
    assert x_cat[2, 0] == UNKNOWN_CODE
    assert pre.cardinalities == [5, 4]


def test_preprocessor_rejects_missing_columns_and_unfitted_use() -> None:
    """Transforming without fitting, or without a declared column, fails loudly."""
    with pytest.raises(RuntimeError):
        FeaturePreprocessor(["a"], []).transform(pd.DataFrame({"a": [1.0]}))
    pre, frame = _fitted()
    with pytest.raises(KeyError, match="device"):
        pre.transform(frame.drop(columns=["device"]))


def test_pyfunc_output_contract(tmp_path) -> None:
    """predict gives float32 p_conv/uplift/revenue columns consistent with score_arrays and the net."""
    pre, frame = _fitted()
    torch.manual_seed(0)
    net = MultiArmUpliftNet(2, pre.cardinalities, len(ARMS), hidden_dim=16, head_dim=8, arms=ARMS).eval()
    artifacts = write_model_artifacts(net, pre, ARMS, tmp_path)
    model = UpliftPyfunc(chunk_size=64).load_artifacts(artifacts["config"], artifacts["weights"])
    out = model.predict(None, frame)
    expected = (
        [f"p_conv__{a}" for a in ARMS] + [f"uplift__{a}" for a in ARMS[1:]] + [f"revenue__{a}" for a in ARMS]
    )
    assert list(out.columns) == expected
    assert (out.dtypes == np.float32).all() and out.index.equals(frame.index)
    np.testing.assert_allclose(
        out["uplift__USD5@sms"], out["p_conv__USD5@sms"] - out["p_conv__control"], atol=1e-7
    )
    # Chunked scoring (64 rows per pass) must equal one forward pass over everything.
    x_num, x_cat = pre.transform(frame)
    with torch.inference_mode():
        conv_logits, rev_log = net(torch.from_numpy(x_num), torch.from_numpy(x_cat))
    scores = model.score_arrays(frame)
    np.testing.assert_allclose(scores["p_conv"], torch.sigmoid(conv_logits).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores["revenue"], torch.exp(rev_log).numpy(), rtol=1e-5)
    assert out.shape[0] == len(frame) and np.all((scores["p_conv"] > 0) & (scores["p_conv"] < 1))


def test_an_ensemble_predicts_its_members_mean_and_reloads_from_its_artifacts(tmp_path) -> None:
    """Ensemble = mean of the members' probabilities and revenues; config and pyfunc round trips."""
    pre, frame = _fitted()
    torch.manual_seed(0)
    net = UpliftEnsemble(3, n_numeric=2, cat_cardinalities=pre.cardinalities, n_arms=len(ARMS),
                         hidden_dim=16, head_dim=8, arms=ARMS).eval()  # fmt: skip
    x_num, x_cat = (torch.from_numpy(a) for a in pre.transform(frame))
    with torch.inference_mode():
        logits_k, rev_k = net.member_outputs(x_num, x_cat)
        conv_logits, rev_log = net(x_num, x_cat)
    assert logits_k.shape == (3, len(frame), len(ARMS))
    # Members start from different weights, so they disagree; the ensemble is their mean.
    assert (logits_k[0] - logits_k[1]).abs().max() > 1e-3
    np.testing.assert_allclose(torch.sigmoid(conv_logits), torch.sigmoid(logits_k).mean(0), rtol=1e-5)
    np.testing.assert_allclose(torch.exp(rev_log), torch.exp(rev_k).mean(0), rtol=1e-5)
    rebuilt = build_network(json.loads(json.dumps(net.config())))
    assert isinstance(rebuilt, UpliftEnsemble) and rebuilt.config() == net.config()
    assert isinstance(build_network(net.members[0].config()), MultiArmUpliftNet)
    artifacts = write_model_artifacts(net, pre, ARMS, tmp_path)
    model = UpliftPyfunc(chunk_size=64).load_artifacts(artifacts["config"], artifacts["weights"])
    np.testing.assert_allclose(model.score_arrays(frame)["p_conv"], torch.sigmoid(conv_logits).numpy(),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="at least two members"):
        UpliftEnsemble(1, n_numeric=2, cat_cardinalities=[], n_arms=2)


def test_an_ensembles_members_each_learn_their_own_loss() -> None:
    """The training loss is the members' mean: each member's gradient is its own loss's, scaled."""
    from mlpkg.models.lightning import UpliftLitModule

    torch.manual_seed(1)
    net = UpliftEnsemble(
        2, n_numeric=3, cat_cardinalities=[], n_arms=2, hidden_dim=8, head_dim=4, dropout=0.0
    )
    module = UpliftLitModule(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    n = 64
    batch = (torch.randn(n, 3), torch.zeros(n, 0).long(), torch.randint(0, 2, (n,)),
             torch.randint(0, 2, (n,)).float(), torch.rand(n) * 50, torch.ones(n))  # fmt: skip
    module.training_step(batch, 0).backward()
    ensemble_grad = net.members[1].representation[0].weight.grad.clone()
    alone = UpliftLitModule(net.members[1], optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    net.zero_grad()
    alone.training_step(batch, 0).backward()
    np.testing.assert_allclose(ensemble_grad * 2, net.members[1].representation[0].weight.grad, rtol=1e-5)
