"""The promotion gate on a real MLflow registry: who becomes champion, and what is recorded.

The policy values are given (the gate's estimate of them is tested with the model); this is
about the decision rule, the aliases, the version tags and the warehouse history.
"""

from datetime import UTC, datetime

import pandas as pd
import pytest

from mlpkg import registry
from mlpkg.config import GateSettings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

pytestmark = pytest.mark.unit

NAME = "couponops-uplift-gate"
NOW = datetime(2025, 6, 30, tzinfo=UTC)


@pytest.fixture
def reg(tmp_path, engine, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = registry.make_client(uri)
    exp = client.create_experiment("gate", artifact_location=(tmp_path / "art").as_uri())
    client.create_registered_model(NAME)
    values: dict[str, dict] = {}

    def new_version(policy_value, calibration_error=0.01, rows=1000):
        run = client.create_run(exp)
        version = client.create_model_version(NAME, f"runs:/{run.info.run_id}/model", run.info.run_id)
        values[f"models:/{NAME}/{version.version}"] = dict(
            policy_value=policy_value, calibration_error=calibration_error, test_rows=rows
        )
        return str(version.version), run.info.run_id

    monkeypatch.setattr(
        registry, "policy_value_on_frame", lambda uri, frame, fraction, tracking_uri: values[uri]
    )
    return client, uri, new_version


def _gate(client, uri, engine, version, run_id=None, **gate):
    return registry.gate_challenger(
        client,
        engine,
        name=NAME,
        tracking_uri=uri,
        challenger_version=version,
        test_frame=pd.DataFrame(),
        gate=GateSettings(**gate),
        treat_fraction=0.3,
        now=NOW,
        run_id=run_id,
    )


def test_the_champion_moves_only_to_a_challenger_that_beats_it_by_the_margin(reg, engine):
    client, uri, new_version = reg
    v1, _ = new_version(0.040)
    assert _gate(client, uri, engine, v1).promoted
    assert registry.alias_version(client, NAME, registry.CHAMPION) == v1

    v2, run2 = new_version(0.041)  # +2.5 %: below a 5 % margin
    d2 = _gate(client, uri, engine, v2, run_id=run2, min_policy_value_gain=0.05)
    assert not d2.promoted and "does not beat" in d2.reason
    assert registry.alias_version(client, NAME, registry.CHAMPION) == v1
    assert registry.alias_version(client, NAME, registry.CHALLENGER) == v2
    tags = client.get_model_version(NAME, v2).tags
    assert tags["gate.promoted"] == "False" and tags["gate.champion_version"] == v1
    assert float(tags["gate.challenger_value"]) == pytest.approx(0.041)
    assert float(tags["gate.champion_value"]) == pytest.approx(0.040)
    artifacts = {f.path for f in client.list_artifacts(run2, "gate")}
    assert artifacts == {"gate/gate_comparison.csv", "gate/gate_decision.json"}

    v3, _ = new_version(0.050, calibration_error=0.2)  # far better, but badly calibrated
    d3 = _gate(client, uri, engine, v3)
    assert not d3.promoted and d3.reason.startswith("guard failed: calibration error")

    v4, _ = new_version(0.060, rows=50)  # too few test rows to trust
    assert "min_test_rows" in _gate(client, uri, engine, v4).reason

    v5, _ = new_version(0.045)  # +12.5 % over the champion's 0.040
    d5 = _gate(client, uri, engine, v5, min_policy_value_gain=0.05)
    assert d5.promoted and d5.champion_version == v1
    assert registry.alias_version(client, NAME, registry.CHAMPION) == v5

    with session_scope(engine) as s:
        moves = [(p.alias, p.version, p.previous_version, p.actor) for p in q.promotion_history(s, NAME)]
    champion_moves = [mv for mv in reversed(moves) if mv[0] == registry.CHAMPION]
    assert champion_moves == [("champion", v1, None, "gate"), ("champion", v5, v1, "gate")]
    assert sum(1 for mv in moves if mv[0] == registry.CHALLENGER) == 5


def test_a_hand_promotion_is_recorded_with_who_and_why(reg, engine):
    client, uri, new_version = reg
    v1, _ = new_version(0.040)
    _gate(client, uri, engine, v1)
    v2, _ = new_version(0.030)
    assert not _gate(client, uri, engine, v2).promoted
    previous = registry.promote(client, engine, name=NAME, version=v2, actor="ana", reason="A/B won", now=NOW)
    assert previous == v1 and registry.alias_version(client, NAME, registry.CHAMPION) == v2
    with session_scope(engine) as s:
        last = q.promotion_history(s, NAME, limit=1)[0]
    assert (last.alias, last.version, last.actor, last.reason) == ("champion", v2, "ana", "A/B won")
