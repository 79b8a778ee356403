"""The promotion gate's rule, its allocation and what it records on a real MLflow registry.

The rule is tested on given numbers (what :func:`mlpkg.gate.evaluate` returns); the estimates
themselves are tested with real models in ``tests/model/test_gate_decisions.py``.
"""

from datetime import UTC, datetime

import numpy as np
import pytest

from mlpkg import gate, registry
from mlpkg.config import GateSettings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from tests.fixtures import gate_numbers as numbers

pytestmark = pytest.mark.unit

NAME = "couponops-uplift-gate"
NOW = datetime(2025, 6, 30, tzinfo=UTC)


def _decide(nums, champion="1", **settings):
    return gate.decide(
        nums,
        challenger_version="2",
        champion_version=champion,
        gate=GateSettings(**settings),
        holdout="test holdout",
        economics="test economics",
    )


def test_a_challenger_is_promoted_only_when_the_lower_bound_of_its_gain_clears_the_margin():
    assert _decide(numbers(0.043, 0.040, gain_se=0.001)).promoted  # lower bound +0.0017 > 0
    kept = _decide(numbers(0.041, 0.040, gain_se=0.001))  # +0.001, but lower bound -0.0003
    assert not kept.promoted and kept.outcome == "kept" and "≤ margin 0" in kept.reason
    assert not _decide(numbers(0.040, 0.040, gain_se=0.0)).promoted  # an exact tie is kept
    assert not _decide(numbers(0.043, 0.040, gain_se=0.001), margin=0.002).promoted  # below the margin
    assert _decide(numbers(0.046, 0.040, gain_se=0.001), margin=0.002).promoted
    text = _decide(numbers(0.043, 0.040)).sentence()
    assert text.startswith("v2 promoted over v1: policy value 0.043") and "paired gain +0.003 ± 0.001" in text


def test_guards_scale_with_the_evidence_and_say_which_refused():
    miscalibrated = _decide(numbers(0.05, 0.04, calibration=0.09, limit=0.0612, rows=300))
    assert miscalibrated.outcome == "refused"
    assert miscalibrated.reason.startswith(
        "guard failed: calibration error 0.0900 > 0.0612 allowed at 300 rows"
    )
    # Within what noise explains at that many rows: not refused for it.
    assert _decide(numbers(0.05, 0.04, calibration=0.058, limit=0.0612, rows=300)).promoted
    few = _decide(numbers(rows=30))
    assert few.outcome == "refused" and "30 held-out rows < min_test_rows=50" in few.reason
    assert _decide(None).outcome == "refused"

    first = _decide(numbers(0.045, 0.030), champion=None)  # vs random targeting
    assert first.promoted and first.baseline_value == 0.030 and first.champion_value is None
    assert (
        "promoted as the first champion" in first.sentence() and "random targeting 0.03" in first.sentence()
    )
    # With no champion to keep, the first version serves even when random targeting looks better;
    # the comparison is in its reason for people to judge.
    worse = _decide(numbers(0.020, 0.030, gain_se=0.002), champion=None)
    assert worse.promoted and "vs random targeting at the same budget: gain -0.01000" in worse.reason


def test_the_calibration_allowance_shrinks_to_the_limit_as_rows_grow():
    rng = np.random.default_rng(0)
    small = gate.calibration_allowance(rng.uniform(0.01, 0.2, 300), 0.05, 0.9)
    large = gate.calibration_allowance(rng.uniform(0.01, 0.2, 100_000), 0.05, 0.9)
    assert small > 0.06 and 0.05 < large < 0.053 and small > large


def test_the_gate_allocation_keeps_budget_and_eligibility_at_common_costs():
    rng = np.random.default_rng(1)
    n = 2_000
    econ = gate.GateEconomics(
        arms=["a@email", "b@sms"],
        send_cost=np.array([0.5, 1.0]),
        coupon_cost=np.full((n, 2), 5.0),
        eligible=rng.random((n, 2)) < 0.7,
        budget=300.0,
        basis="test",
    )
    p = rng.uniform(0.01, 0.2, (n, 3))
    scores = gate.Scores(version="1", p=p, has_arm=np.array([True, True, False]), pay=p)
    common = np.full((n, 3), 0.1)
    target = gate.policy_matrix(scores, econ, common)
    assert np.allclose(target.sum(axis=1), 1.0)
    assert target[:, 2].sum() == 0  # a version without the arm never picks it
    chosen = target[:, 1:].astype(bool)
    assert not (chosen & ~econ.eligible).any()
    spend = float((target[:, 1:] * econ.cost(common[:, 1:])).sum())
    assert spend <= econ.budget + 1e-6 and spend > 0.9 * econ.budget
    # Random targeting at the same budget spends the same in expectation.
    random = gate.random_targeting(econ, common)
    assert float((random[:, 1:] * econ.cost(common[:, 1:])).sum()) == pytest.approx(econ.budget, rel=1e-6)
    assert np.allclose(random.sum(axis=1), 1.0) and (random[:, 1:][~econ.eligible] == 0).all()


@pytest.fixture
def reg(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = registry.make_client(uri)
    exp = client.create_experiment("gate", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model(NAME)

    def new_version():
        run = client.create_run(exp)
        version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
        return str(version.version), run.info.run_id

    return client, new_version


def _record(client, engine, version, nums, champion, run_id=None):
    registry.move_alias(
        client,
        engine,
        name=NAME,
        alias=registry.CHALLENGER,
        version=version,
        actor="gate",
        reason="newly trained version",
        now=NOW,
    )
    decision = gate.decide(
        nums,
        challenger_version=version,
        champion_version=champion,
        gate=GateSettings(),
        holdout="test holdout",
        economics="test economics",
    )
    gate.record_decision(
        client,
        engine,
        name=NAME,
        decision=decision,
        numbers=nums,
        gate=GateSettings(),
        now=NOW,
        run_id=run_id,
    )
    return decision


def test_decisions_are_recorded_on_the_version_the_run_and_in_the_history(reg, engine):
    client, new_version = reg
    v1, _ = new_version()
    assert _record(client, engine, v1, numbers(0.04, 0.03), None).promoted
    v2, run2 = new_version()
    d2 = _record(client, engine, v2, numbers(0.041, 0.040), v1, run_id=run2)
    assert not d2.promoted
    assert registry.alias_version(client, NAME, registry.CHAMPION) == v1
    assert registry.alias_version(client, NAME, registry.CHALLENGER) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["gate.promoted"] == "False" and tags["gate.champion_version"] == v1
    assert tags["gate.outcome"] == "kept" and float(tags["gate.gain_lcb"]) < 0
    assert client.get_model_version(NAME, v2).description == d2.sentence()
    assert client.get_run(run2).data.tags["gate.outcome"] == "kept"
    artifacts = {f.path for f in client.list_artifacts(run2, "gate")}
    assert artifacts == {"gate/gate_comparison.csv", "gate/gate_decision.json"}
    assert "frozen holdout" in client.get_registered_model(NAME).description

    v3, _ = new_version()
    assert _record(client, engine, v3, numbers(0.05, 0.04), v1).promoted
    with session_scope(engine) as s:
        moves = [(p.alias, p.version, p.previous_version, p.actor) for p in q.promotion_history(s, NAME)]
    champion_moves = [mv for mv in reversed(moves) if mv[0] == registry.CHAMPION]
    assert champion_moves == [("champion", v1, None, "gate"), ("champion", v3, v1, "gate")]


def test_a_hand_promotion_is_recorded_with_who_and_why(reg, engine):
    client, new_version = reg
    v1, _ = new_version()
    _record(client, engine, v1, numbers(0.04, 0.03), None)
    v2, _ = new_version()
    assert not _record(client, engine, v2, numbers(0.03, 0.04), v1).promoted
    previous = registry.promote(client, engine, name=NAME, version=v2, actor="ana", reason="A/B won", now=NOW)
    assert previous == v1 and registry.alias_version(client, NAME, registry.CHAMPION) == v2
    with session_scope(engine) as s:
        last = q.promotion_history(s, NAME, limit=1)[0]
    assert (last.alias, last.version, last.actor, last.reason) == ("champion", v2, "ana", "A/B won")


def test_only_a_version_kept_for_want_of_evidence_goes_live_beside_the_champion(reg, engine):
    client, new_version = reg

    def live(champion):
        return registry.live_challenger(client, NAME, champion=champion, confidence=0.9)

    v1, _ = new_version()
    _record(client, engine, v1, numbers(0.04, 0.03), None)
    assert live(v1) is None  # the challenger alias is the champion itself
    v2, _ = new_version()
    _record(client, engine, v2, numbers(0.041, 0.040, gain_se=0.001), v1)  # +0.001 ± 0.001: not shown worse
    assert live(v1) == v2
    v3, _ = new_version()
    _record(client, engine, v3, numbers(0.030, 0.040, gain_se=0.001), v1)  # -0.010 ± 0.001: shown worse
    assert live(v1) is None
    v4, _ = new_version()
    _record(client, engine, v4, numbers(0.05, 0.04, calibration=0.09, limit=0.06), v1)  # refused by a guard
    assert live(v1) is None
    v5, _ = new_version()
    _record(client, engine, v5, numbers(0.05, 0.04), v1)  # promoted: nothing left to compare live
    assert registry.alias_version(client, NAME, registry.CHAMPION) == v5 and live(v5) is None
    assert live(None) is None
