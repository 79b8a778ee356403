"""`couponops evaluate`: any policy's value offline, with intervals that cover the simulator's truth."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mlpkg import offline_eval
from mlpkg.simulator import Shop, ShopConfig
from tests.fixtures import run_cli

pytestmark = pytest.mark.unit

_cli = run_cli


def _truth_in_log_order(shop: Shop, rows: offline_eval.LoggedRows) -> np.ndarray:
    truth = shop.true_conversion(list(rows.customer_id))
    return truth[:, [shop.arm_names.index(a) for a in rows.arms]]


def test_the_dr_interval_covers_the_true_value_in_at_least_18_of_20_seeds(tmp_path):
    """Truth: each logged customer's expected conversion under the policy (the simulator's ground truth).

    Even seeds evaluate a deterministic policy (a noisy oracle's best arm), odd seeds a stochastic
    one (half best arm, half control), each written as the CSV file a user would give.
    """
    covered, runs = 0, []
    for seed in range(20):
        shop = Shop(ShopConfig(seed=seed, n_customers=10_000))
        rows = offline_eval._rows("log", f"sim-{seed}", shop.past_campaign(), "control", "converted")
        truth = _truth_in_log_order(shop, rows)
        rng = np.random.default_rng(seed)
        best = np.argmax(truth + rng.normal(0, 0.02, truth.shape), axis=1)
        arms = np.asarray(rows.arms)
        ids = rows.customer_id
        path = tmp_path / f"policy-{seed}.csv"
        if seed % 2 == 0:
            pd.DataFrame({"customer_id": ids, "arm": arms[best]}).to_csv(path, index=False)
            true_value = truth[np.arange(len(ids)), best].mean()
        else:
            half = pd.DataFrame({"customer_id": np.concatenate([ids, ids]),
                                 "arm": np.concatenate([arms[best], np.full(len(ids), "control")]),
                                 "probability": 0.5})
            # A customer whose best arm is control gets it with probability 1 (one row).
            half = half.groupby(["customer_id", "arm"], as_index=False)["probability"].sum()
            half.to_csv(path, index=False)
            true_value = (0.5 * truth[np.arange(len(ids)), best] + 0.5 * truth[:, 0]).mean()
        dr = offline_eval.evaluate(rows, path)["estimates"]["dr"]
        hit = dr["ci_low"] <= true_value <= dr["ci_high"]
        covered += hit
        runs.append((seed, round(true_value, 4), round(dr["value"], 4), hit))
    assert covered >= 18, runs


def test_a_log_whose_effective_sample_size_is_under_5_percent_warns():
    rng = np.random.default_rng(0)
    n = 4000
    treated = rng.random(n) < 0.03  # the logging policy sent the coupon to 3% of the customers
    rows = offline_eval.LoggedRows(
        kind="log", name="skewed", customer_id=np.array([f"C{i}" for i in range(n)]),
        arm_idx=treated.astype(np.int64), propensity=np.where(treated, 0.03, 0.97),
        reward=(rng.random(n) < 0.05).astype(float), arms=["control", "coupon"], control="control",
        outcome="converted",
    )
    probs = np.tile([0.0, 1.0], (n, 1))  # the candidate sends it to everyone
    found = offline_eval._estimates(probs, rows, 0.05)
    for name in ("ips", "snips", "dr"):
        assert found[name]["effective_sample_size"] / n < 0.05
        assert "effective sample size" in found[name]["warning"], found[name]


@pytest.fixture
def skewed_log(settings, engine, tmp_path):
    """An imported log where 4% got the coupon (logged propensities), for the CLI's warnings."""
    rng = np.random.default_rng(1)
    n = 3000
    treated = rng.random(n) < 0.04
    frame = pd.DataFrame({
        "user": [f"U{i:05d}" for i in range(n)],
        "variant": np.where(treated, "coupon", "holdout"),
        "p": np.where(treated, 0.04, 0.96),
        "bought": (rng.random(n) < np.where(treated, 0.12, 0.05)).astype(int),
        "value": 0.0,
        "visits": rng.poisson(3, n),
    })
    frame["value"] = frame["bought"] * 40.0
    path = tmp_path / "skewed.csv"
    frame.to_csv(path, index=False)
    spec = tmp_path / "skewed.yaml"
    spec.write_text(
        "name: skewed\nid_column: user\ntreatment:\n  column: variant\n  control: holdout\n"
        "  costs: {coupon: 1.0}\npropensity_column: p\noutcomes:\n  conversion: bought\n  revenue: value\n"
    )
    result = _cli("import-log", path, "--spec", spec)
    assert result.exit_code == 0, result.output
    return settings, frame, tmp_path


def _policy(tmp_path, name, frame, arm) -> str:
    path = tmp_path / name
    pd.DataFrame({"customer_id": frame["user"], "arm": arm}).to_csv(path, index=False)
    return str(path)


def test_evaluate_prints_json_compares_and_strict_fails_on_untrustworthy_weights(skewed_log):
    _settings, frame, tmp = skewed_log
    everyone = _policy(tmp, "everyone.csv", frame, "coupon")
    nobody = _policy(tmp, "nobody.csv", frame, "holdout")  # the shop's own name of the control arm

    plain = _cli("evaluate", "--log", "skewed", "--policy", nobody, "--json")
    assert plain.exit_code == 0, plain.output
    out = json.loads(plain.output)
    assert out["source"] == {"kind": "log", "name": "skewed", "rows": len(frame), "outcome": "converted",
                             "arms": ["control", "coupon"], "control": "control"}
    assert out["policy"]["kind"] == "deterministic" and out["warnings"] == []
    control_rate = frame.loc[frame["variant"] == "holdout", "bought"].mean()
    assert out["estimates"]["snips"]["value"] == pytest.approx(control_rate)

    both = _cli("evaluate", "--log", "skewed", "--policy", everyone, "--compare", nobody, "--json")
    assert both.exit_code == 0, both.output
    found = json.loads(both.output)
    diff = found["compare"]["difference"]["snips"]
    treated_rate = frame.loc[frame["variant"] == "coupon", "bought"].mean()
    assert diff["value"] == pytest.approx(treated_rate - control_rate)
    assert diff["ci_low"] < diff["value"] < diff["ci_high"] and diff["stderr"] > 0
    assert any("effective sample size" in w for w in found["warnings"])

    table = _cli("evaluate", "--log", "skewed", "--policy", everyone)
    assert table.exit_code == 0 and "warning:" in table.output and "DR" in table.output
    strict = _cli("evaluate", "--log", "skewed", "--policy", everyone, "--strict")
    assert strict.exit_code == 1, strict.output


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("customer_id,arm\nU00000,coupon\nU00001,gold\n", "line 3, column arm: not an arm of campaign log"),
        ("customer_id,arm,probability\nU00000,coupon,abc\n", "line 2, column probability: must be a number"),
        ("customer_id,arm,probability\nU00000,coupon,0.5\nU00000,holdout,0.4\n", "sum to 0.9, not 1"),
        ("customer_id,arm\nU00000,coupon\nU00000,holdout\n", "line 3, column customer_id: customer 'U00000'"),
        ("customer_id,arm,arm\nU00000,coupon,coupon\n", "line 1, column arm: a column name appears twice"),
        ("customer_id,arm\n U00000,coupon\n", "line 2, column customer_id: customer_id must not start"),
        ("customer_id,arm\nU00000,coupon\n", "gives no arm for 2,999 of 3,000 customers"),
        ("user,arm\nU00000,coupon\n", "line 1, column customer_id: missing column"),
    ],
)
def test_a_bad_policy_file_is_one_line_naming_file_line_column_rule_and_value(skewed_log, content, expected):
    _settings, _frame, tmp = skewed_log
    path = tmp / "bad.csv"
    path.write_text(content)
    result = _cli("evaluate", "--log", "skewed", "--policy", path)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert text.startswith("error: policy file bad.csv") and expected in text, text
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_unknown_logs_and_campaigns_and_missing_choices_are_one_line(skewed_log):
    _settings, frame, tmp = skewed_log
    policy = _policy(tmp, "p.csv", frame, "coupon")
    for args, expected in [
        (["--log", "nope", "--policy", policy], "no campaign log 'nope' in the warehouse (logs: skewed)"),
        (["--campaign", "nope", "--policy", policy], "unknown campaign id 'nope'"),
        (["--policy", policy], "give one of --log NAME"),
        (["--log", "skewed", "--policy", str(tmp / "missing.csv")], "does not exist"),
        (["--log", "skewed", "--policy", policy, "--outcome", "clicks"], "--outcome must be one of"),
    ]:
        result = _cli("evaluate", *args)
        assert result.exit_code == 2, (args, result.output)
        assert expected in " ".join(result.output.split()), (args, result.output)
