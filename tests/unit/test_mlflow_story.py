"""MLflow tells the story: typed experiments, readable runs, the snapshot as a dataset, the gate's words.

Everything runs on a real SQLite MLflow store under tmp_path with the small trainer settings of
the shared fixtures: real training runs, the real gate, a real measured campaign.
"""

import json
from datetime import timedelta

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import registry, stages
from mlpkg.db import models as m
from mlpkg.db.engine import session_scope
from mlpkg.simulator.lab import harness

pytestmark = pytest.mark.unit

KIND = registry.EXPERIMENT_KIND_TAG


def _experiments(settings):
    client = registry.make_client(settings.resolved_tracking_uri)
    return client, [
        client.get_experiment_by_name(name)
        for name in (settings.mlflow_experiment, f"{settings.mlflow_experiment}-campaigns")
    ]


def test_init_types_both_experiments_for_model_training_even_when_they_exist(settings):
    client = registry.make_client(settings.resolved_tracking_uri)
    settings.ensure_dirs()
    # An experiment made by an older release (or by hand): untyped, so the UI opens it on traces.
    old = client.create_experiment(
        settings.mlflow_experiment, artifact_location=settings.resolved_artifact_root
    )
    assert KIND not in client.get_experiment(old).tags

    stages.init_stores(settings)
    stages.init_stores(settings)  # idempotent: no error, no second experiment

    client, (training, campaigns) = _experiments(settings)
    assert training.experiment_id == old
    for exp in (training, campaigns):
        assert exp.tags[KIND] == "custom_model_development"
        assert exp.tags[registry.NOTE_TAG]  # a description the UI shows on the experiment page
    assert len(client.search_experiments()) == 3  # Default + training + campaigns


def _train_and_gate(settings, dag_id, day):
    ctx = stages.RunContext(
        dag_id=dag_id, run_id=f"manual__{day}T21:40:56.412272+00:00", logical_date=f"{day}T21:40:56+00:00"
    )
    trained = stages.train(settings, ctx)
    decision = stages.gate(
        settings,
        model_version=trained["model_version"],
        test_frame=trained["test_frame"],
        run_id=trained["mlflow_run_id"],
    )
    return trained, decision


def test_training_runs_are_named_tagged_and_described_by_the_gate(ingested):
    settings, engine = ingested
    client = registry.make_client(settings.resolved_tracking_uri)
    name = settings.registered_model_name
    first, d1 = _train_and_gate(settings, "couponops_train", "2025-07-01")
    second, d2 = _train_and_gate(settings, "couponops_retrain", "2025-07-07")

    run1, run2 = (client.get_run(t["mlflow_run_id"]) for t in (first, second))
    assert run1.info.run_name == f"train · v{first['model_version']} · 2025-07-01"
    assert run2.info.run_name == f"retrain · v{second['model_version']} · 2025-07-07"
    assert run2.data.tags["model.version"] == second["model_version"] and run2.data.tags["model.name"] == name

    # Exactly one commit tag among the tags people see; MLflow's own source tag agrees with it.
    for tags in (run1.data.tags, client.get_model_version(name, first["model_version"]).tags):
        commit_tags = [k for k in tags if "commit" in k.lower() and not k.startswith("mlflow.")]
        assert commit_tags == ["git.commit"]
    assert run1.data.tags["mlflow.source.git.commit"] == run1.data.tags["git.commit"]

    # The training snapshot is the run's dataset input: schema, row count and id, never a customer.
    snapshot = pd.read_parquet(settings.state_dir / "snapshots" / f"{first['snapshot_id']}.parquet")
    (inp,) = run1.inputs.dataset_inputs
    dataset = inp.dataset
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert dataset.digest == first["snapshot_id"]
    assert json.loads(dataset.profile)["num_rows"] == len(snapshot)
    assert first["snapshot_id"] in dataset.source
    columns = {c["name"] for c in json.loads(dataset.schema)["mlflow_colspec"]}
    assert {"arm", "converted", "revenue", "propensity"} <= columns and "customer_id" not in columns
    assert columns <= set(snapshot.columns)
    with session_scope(engine) as s:
        contacts = [v for row in s.execute(select(m.Contact.email, m.Contact.phone)) for v in row if v]
    blob = json.dumps(
        [dataset.name, dataset.digest, dataset.source, dataset.schema, dataset.profile, run1.data.tags]
    )
    assert contacts and not [v for v in contacts if v in blob]
    assert not [c for c in snapshot["customer_id"].astype(str) if f'"{c}"' in blob or f" {c}" in blob]

    # The registered model says what it is and how its champion is chosen ...
    model = client.get_registered_model(name)
    assert "uplift" in model.description and "champion" in model.description
    assert "frozen holdout" in model.description and f"{settings.gate.confidence:.0%} lower bound" in (
        model.description
    )
    assert registry.alias_version(client, name, registry.CHAMPION) == first["model_version"]

    # ... and every version carries the gate's decision in one sentence with its numbers.
    v1 = client.get_model_version(name, first["model_version"]).description
    assert d1["promoted"] and v1.startswith(f"v{first['model_version']} promoted as the first champion")
    assert f"{d1['challenger_value']:.4g}" in v1 and f"{d1['test_rows']:,} held-out rows" in v1
    v2 = client.get_model_version(name, second["model_version"]).description
    champion = first["model_version"]
    verdict = f"promoted over v{champion}" if d2["promoted"] else f"kept, champion v{champion} stays"
    assert v2.startswith(f"v{second['model_version']} {verdict}: policy value ")
    for number in (
        f"{d2['challenger_value']:.4g}",
        f"{d2['champion_value']:.4g}",
        f"paired gain {d2['gain']:+.4g} ± {d2['gain_stderr']:.2g}",
        f"90% lower bound {d2['gain_lcb']:+.4g}",
        f"{d2['test_rows']:,} held-out rows",
    ):
        assert number in v2, (number, v2)
    assert f"± {d2['challenger_stderr']:.2g}" in v2
    # The paired comparison is of the same rows: the gain is the difference of the two values.
    assert d2["gain"] == pytest.approx(d2["challenger_value"] - d2["champion_value"], abs=1e-12)
    assert d2["promoted"] == (d2["gain_lcb"] > settings.gate.margin)
    assert v2 == d2["summary"] and v2.count(".") >= 1 and "\n" not in v2
    # The run page says it too, and the gate's artifacts stay.
    assert client.get_run(second["mlflow_run_id"]).data.tags[registry.NOTE_TAG] == v2
    assert {f.path for f in client.list_artifacts(second["mlflow_run_id"], "gate")} == {
        "gate/gate_comparison.csv",
        "gate/gate_decision.json",
    }


def test_a_refused_version_says_which_guard_refused_it(ingested):
    settings, _ = ingested
    client = registry.make_client(settings.resolved_tracking_uri)
    settings.gate.min_test_rows = 10**6  # no test set is that large: the guard must refuse
    trained, decision = _train_and_gate(settings, "cli", "2025-07-03")
    assert not decision["promoted"]
    text = client.get_model_version(settings.registered_model_name, trained["model_version"]).description
    assert text.startswith(f"v{trained['model_version']} refused by the gate (")
    assert "min_test_rows=1000000" in text and "held-out rows" in text
    run = client.get_run(trained["mlflow_run_id"])
    assert run.info.run_name == f"cli · v{trained['model_version']} · 2025-07-03"
    assert run.data.tags["gate.outcome"] == "refused"


def test_a_campaign_run_carries_its_lineage_and_money_as_metrics(ingested):
    settings, engine = ingested
    client = registry.make_client(settings.resolved_tracking_uri)
    trained, _ = _train_and_gate(settings, "couponops_train", "2025-07-01")
    shop = harness.load_world(settings)
    now = shop.now.to_pydatetime()
    ctx = stages.RunContext(
        dag_id="couponops_allocate", run_id="scheduled__2025-07-07", logical_date=str(now)
    )
    stages.allocate(settings, ctx, campaign_id="cmp-story", as_of=now, budget=80.0, now=now)
    stages.deliver(settings, "cmp-story", now=now)
    batch = harness.simulate_responses(settings, "cmp-story")
    later = now + timedelta(days=8)  # after the attribution window closed
    stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
    stages.measure(settings, "cmp-story", now=later)
    stages.measure(settings, "cmp-story", now=later)  # a re-measurement updates the same run

    exp = client.get_experiment_by_name(f"{settings.mlflow_experiment}-campaigns")
    assert exp.tags[KIND] == "custom_model_development"
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == f"campaign · cmp-story · {now.date().isoformat()}"
    tags = run.data.tags
    assert tags["model.name"] == settings.registered_model_name
    assert tags["model.version"] == trained["model_version"]
    assert tags["training.run_id"] == trained["mlflow_run_id"]
    assert tags["airflow.run_key"] == ctx.run_key and tags["airflow.dag_id"] == "couponops_allocate"
    assert "cmp-story" in tags[registry.NOTE_TAG]

    metrics = run.data.metrics
    with session_scope(engine) as s:
        campaign = s.get(m.Campaign, "cmp-story")
        budget, committed = campaign.budget, campaign.committed
    assert metrics["budget"] == pytest.approx(budget)
    assert metrics["spend"] == pytest.approx(committed, rel=1e-3)
    for group in ("model_policy", "treated"):
        for key in (
            "coupon_cost",
            "send_cost",
            "revenue",
            "incremental_conversions",
            "incremental_conversions_ci_low",
            "incremental_conversions_ci_high",
            "incremental_revenue",
            "incremental_revenue_ci_low",
            "incremental_revenue_ci_high",
        ):
            assert f"{group}/{key}" in metrics, f"{group}/{key}"
    low, mid, high = (metrics[f"treated/incremental_conversions{s}"] for s in ("_ci_low", "", "_ci_high"))
    assert low <= mid <= high
    # Exposure and disparity by each declared sensitive attribute (region, device, segment).
    for attribute in ("region", "device", "segment"):
        assert f"fairness/{attribute}/share_treated_disparity" in metrics
        # 0 when a group got no coupon at all (a small campaign's draw can leave one out).
        assert 0 <= metrics[f"fairness/{attribute}/share_treated_disparity"] <= 1
    # Four significant digits, not fifteen decimals.
    assert all(v == float(f"{v:.4g}") for v in metrics.values())
    assert "report/index.html" in {f.path for f in client.list_artifacts(run.info.run_id, "report")}
