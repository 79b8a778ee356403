"""Bring-your-own campaign logs: spec parsing, import, idempotent re-import, replacement, training."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from mlpkg import stages
from mlpkg.campaign_logs import (
    LogSpecError,
    import_campaign_log,
    log_arms_and_costs,
    log_feature_columns,
    parse_log_spec,
)
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES, build_features
from mlpkg.validation import DataContractError
from tests.fixtures import stored_id

pytestmark = pytest.mark.unit

NOW = pd.Timestamp("2026-03-01T12:00:00Z").to_pydatetime()
COSTS = {"pct_off": 0.8, "5usd": 1.2, "freeship": 0.5}
SPEC_YAML = """\
name: spring_test
id_column: user_ref
treatment:
  column: variant
  control: "holdout"
  costs: {"pct_off": 0.8, "5usd": 1.2, "freeship": 0.5}
propensity_column: null
outcomes:
  conversion: purchased
  revenue: order_value
  extra: [clicked]
"""
KIND_TO_ARM = {"PCT10": "pct_off", "PCT20": "pct_off", "USD5": "5usd", "FREESHIP": "freeship"}


@pytest.fixture(scope="module")
def shop_export(tmp_path_factory):
    """A simulated randomized campaign exported the way a shop would: CSV, own names, no propensity."""
    from mlpkg.simulator import Shop, ShopConfig

    out = tmp_path_factory.mktemp("export")
    shop = Shop(ShopConfig(seed=3, n_customers=2000))
    raw = shop.export_batch(out / "raw")
    customers = pd.read_csv(raw["customers"])
    orders = pd.read_csv(raw["orders"], keep_default_na=False).astype({"revenue": float})
    feats = build_features(
        customers,
        pd.read_parquet(raw["events"]),
        orders,
        shop.campaign_sent_at,
        consent=pd.read_csv(raw["consent"]),
    )
    log = shop.past_campaign()
    log["variant"] = log["coupon_id"].map(KIND_TO_ARM).fillna("holdout")
    frame = (
        log[["customer_id", "variant", "converted", "revenue", "clicked"]]
        .merge(feats, on="customer_id")
        .rename(columns={"customer_id": "user_ref", "converted": "purchased", "revenue": "order_value"})
    )
    path = out / "spring_campaign.csv"
    frame.to_csv(path, index=False)
    spec = out / "spring.yaml"
    spec.write_text(SPEC_YAML)
    return path, spec, frame


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Settings and a migrated, empty warehouse under tmp_path."""
    import os

    from mlpkg.config import Settings, get_settings
    from mlpkg.db.engine import make_engine, migrate

    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        trainer={"max_epochs": 2, "batch_size": 256, "hidden_dim": 16, "head_dim": 8, "ensemble_members": 1},
        gate={"min_test_rows": 20},
    )
    settings.ensure_dirs()
    migrate(settings.resolved_warehouse_url)
    engine = make_engine(settings.resolved_warehouse_url)
    yield settings, engine
    engine.dispose()
    get_settings.cache_clear()


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def _rows(engine, name):
    with engine.connect() as conn:
        return pd.read_sql(select(m.CampaignLogRow).where(m.CampaignLogRow.log_name == name), conn)


def test_simulated_campaign_without_propensities_imports_as_assumed_randomized(store, shop_export):
    settings, engine = store
    path, spec, frame = shop_export
    result = stages.import_log(settings, path, spec, now=NOW)

    assert result["status"] == "imported" and result["rows"] == len(frame)
    assert result["assumed_randomized"] is True
    assert result["propensity"] == "estimated (assumed randomized)"
    assert result["control_rows"] == int((frame["variant"] == "holdout").sum()) > 0
    # Every other column became a feature, typed by what its values parse as.
    assert result["features"]["inferred"] is True
    assert result["features"]["numeric"] == NUMERIC_FEATURES
    assert result["features"]["categorical"] == CATEGORICAL_FEATURES

    rows = _rows(engine, "spring_test")
    assert len(rows) == len(frame) and rows["customer_id"].is_unique
    assert set(rows["arm"]) == {"control", *COSTS}
    shares = frame["variant"].replace({"holdout": "control"}).value_counts(normalize=True)
    np.testing.assert_allclose(rows["propensity"], rows["arm"].map(shares), rtol=1e-12)
    one = rows.set_index("customer_id").loc[stored_id(settings, frame["user_ref"].iloc[0])]
    assert one["converted"] == frame["purchased"].iloc[0]
    assert one["revenue"] == pytest.approx(frame["order_value"].iloc[0])
    assert one["outcomes"] == {"clicked": int(frame["clicked"].iloc[0])}
    assert isinstance(one["features"]["region"], str) and isinstance(one["features"]["tenure_days"], float)
    assert one["features"]["tenure_days"] == pytest.approx(frame["tenure_days"].iloc[0])

    with session_scope(engine) as s:
        log = s.get(m.CampaignLog, "spring_test")
        assert (log.control_label, log.arm_costs, log.n_rows) == ("holdout", COSTS, len(frame))
        assert log.assumed_randomized and log.sent_at is None and log.source == str(path)
        assert log.spec["features"]["categorical"] == CATEGORICAL_FEATURES and log.spec["features_inferred"]
    assert log_arms_and_costs(engine, "spring_test") == (["control", *COSTS], COSTS)
    assert log_feature_columns(engine, "spring_test") == (NUMERIC_FEATURES, CATEGORICAL_FEATURES)
    with pytest.raises(LookupError, match="no campaign log named 'nope'"):
        log_arms_and_costs(engine, "nope")


def test_reimporting_the_same_file_changes_nothing(store, shop_export):
    settings, engine = store
    path, spec, _ = shop_export
    stages.import_log(settings, path, spec, now=NOW)
    before = _snapshot(engine)
    again = stages.import_log(settings, path, spec, now=pd.Timestamp("2026-04-01", tz="UTC").to_pydatetime())
    assert again["status"] == "unchanged"
    assert _snapshot(engine) == before


def test_a_new_file_under_the_same_name_replaces_the_log(store, shop_export, tmp_path):
    settings, engine = store
    path, spec, frame = shop_export
    stages.import_log(settings, path, spec, now=NOW)
    smaller = tmp_path / "spring_v2.csv"
    part = frame.iloc[: len(frame) // 3].copy()
    part["purchased"] = 1 - part["purchased"]
    # Revenue without a conversion is refused: a customer who no longer converted spent nothing.
    part["order_value"] = part["order_value"].where(part["purchased"] == 1, 0.0)
    part.to_csv(smaller, index=False)

    result = stages.import_log(settings, smaller, spec, now=NOW)

    assert result["status"] == "replaced" and result["rows"] == len(part)
    rows = _rows(engine, "spring_test")
    assert sorted(rows["customer_id"]) == sorted(stored_id(settings, part["user_ref"]))
    by_id = rows.set_index("customer_id")["converted"]
    assert (by_id.loc[stored_id(settings, part["user_ref"])].to_numpy() == part["purchased"].to_numpy()).all()
    with session_scope(engine) as s:
        log = s.get(m.CampaignLog, "spring_test")
        assert log.n_rows == len(part) and log.source == str(smaller)


def test_parquet_with_declared_features_and_logged_propensities(store, tmp_path):
    settings, engine = store
    rng = np.random.default_rng(0)
    n = 60
    df = pd.DataFrame(
        {
            "uid": np.arange(n),  # integer ids are stored as text
            "grp": rng.choice(["A", "B", "C"], n),
            "p": np.full(n, 1 / 3),
            "bought": rng.integers(0, 2, n),
            "spend": rng.uniform(0, 50, n).round(2),
            "age": rng.integers(18, 80, n).astype(float),
            "city": rng.choice(["x", "y"], n),
            "note": "ignored",
        }
    )
    df["spend"] = df["spend"].where(df["bought"] == 1, 0.0)  # no revenue without a conversion
    df.loc[3, "age"] = np.nan  # a blank numeric feature is stored as null and imputed later
    path = tmp_path / "ab.parquet"
    df.to_parquet(path, index=False)
    spec = parse_log_spec(
        {
            "name": "ab-test",
            "id_column": "uid",
            "treatment": {"column": "grp", "control": "A", "costs": {"B": 1, "C": 2.5}},
            "propensity_column": "p",
            "outcomes": {"conversion": "bought", "revenue": "spend"},
            "features": {"numeric": ["age"], "categorical": ["city"]},
        }
    )

    result = import_campaign_log(engine, path, spec, settings, now=NOW)

    assert result["propensity"] == "logged (p)" and result["assumed_randomized"] is False
    assert any("note" in w and "unexpected_column" in w for w in result["warnings"])
    rows = _rows(engine, "ab-test").set_index("customer_id")
    assert set(rows.index) == set(stored_id(settings, [str(i) for i in range(n)]))
    assert rows["propensity"].tolist() == pytest.approx([1 / 3] * n)
    assert rows.loc[stored_id(settings, "3"), "features"] == {"age": None, "city": df.loc[3, "city"]}
    first_arm = "control" if df.loc[0, "grp"] == "A" else df.loc[0, "grp"]
    assert rows.loc[stored_id(settings, "0"), "arm"] == first_arm


def test_a_log_inside_the_state_folder_is_moved_to_quarantine(store, tmp_path):
    settings, engine = store
    landed = settings.raw_dir / "bad_log.csv"
    landed.write_text("user_ref,variant,purchased\nu1,holdout,0\nu2,pct_off,2\n")
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML.replace("  revenue: order_value\n", "").replace("  extra: [clicked]\n", ""))
    before = _snapshot(engine)
    with pytest.raises(DataContractError) as err:
        stages.import_log(settings, landed, spec, now=NOW)
    assert "conversion_binary" in str(err.value) and "purchased" in str(err.value)
    assert not landed.exists()
    dest = err.value.quarantine_path
    assert dest.parent == settings.quarantine_dir and dest.name.startswith("spring_test-")
    assert (dest / "bad_log.csv").exists()
    result = json.loads((dest / "validation_result.json").read_text())
    assert result["original_moved"] is True and result["report"]["failures"][0]["column"] == "purchased"
    assert _snapshot(engine) == before


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda s: s["outcomes"].pop("conversion"), "outcomes.conversion", "Field required"),
        (lambda s: s.update(colour="blue"), "colour", "Extra inputs are not permitted"),
        (lambda s: s["treatment"]["costs"].update({"5usd": -1}), "treatment.costs", ">= 0"),
        (lambda s: s["treatment"]["costs"].update({"holdout": 0}), "treatment", "control label"),
        (lambda s: s["treatment"].update(costs={}), "treatment.costs", "at least 1"),
        (lambda s: s.update(id_column="variant"), "(top level)", "used by both 'id_column'"),
        (lambda s: s.update(features={"numeric": ["a"], "categorical": ["a"]}), "features", "both numeric"),
        (lambda s: s.update(features={"numeric": ["revenue"]}), "features", "reserved"),
        (lambda s: s.update(name="../escape"), "name", "letters, digits"),
    ],
    ids=[
        "missing-key",
        "unknown-key",
        "negative-cost",
        "control-in-costs",
        "no-arms",
        "column-twice",
        "feature-typed-twice",
        "reserved-feature",
        "unsafe-name",
    ],
)
def test_spec_errors_name_the_key(change, key, words):
    import yaml

    spec = yaml.safe_load(SPEC_YAML)
    change(spec)
    with pytest.raises(LogSpecError) as err:
        parse_log_spec(spec, source="spring.yaml")
    assert f"key '{key}'" in str(err.value) and words in str(err.value)
    assert str(err.value).startswith("spring.yaml")


def test_import_log_cli_prints_a_summary(store, shop_export):
    from mlpkg.cli import app

    _, engine = store
    path, spec, frame = shop_export
    result = CliRunner().invoke(app, ["import-log", str(path), "--spec", str(spec)])
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "estimated (assumed randomized)" in flat and f"{len(frame)}" in flat and "pct_off" in flat
    assert len(_rows(engine, "spring_test")) == len(frame)


def test_logs_with_different_features_are_not_trained_together(ingested, tmp_path):
    settings, engine = ingested
    path = tmp_path / "tiny.csv"
    pd.DataFrame(
        {
            "user_ref": [f"u{i}" for i in range(8)],
            "variant": ["holdout", "pct_off"] * 4,
            "purchased": [0, 1] * 4,
            "score": range(8),
        }
    ).to_csv(path, index=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC_YAML.replace("  revenue: order_value\n", "").replace("  extra: [clicked]\n", ""))
    stages.import_log(settings, path, spec, now=NOW)
    with pytest.raises(ValueError, match="different feature columns"):
        stages.train(settings, stages.RunContext(run_id="mixed"))


@pytest.mark.model
def test_train_on_an_imported_log_registers_a_model(store, shop_export):
    settings, engine = store
    path, spec, frame = shop_export
    stages.init_stores(settings)
    stages.import_log(settings, path, spec, now=NOW)

    ctx = stages.RunContext(dag_id="test", run_id="byo-1")
    result = stages.train(settings, ctx, log_names=["spring_test"])

    assert result["model_version"] == "1"
    assert {"test/qini/pct_off", "test/qini/5usd", "test/qini/freeship"} <= set(result["metrics"])
    snapshot = pd.read_parquet(settings.state_dir / "snapshots" / f"{result['snapshot_id']}.parquet")
    assert len(snapshot) == len(frame) and set(snapshot["arm"]) == {"control", *COSTS}
    assert set(NUMERIC_FEATURES + CATEGORICAL_FEATURES) <= set(snapshot.columns)
    with session_scope(engine) as s:
        run = s.execute(select(m.TrainingRun).where(m.TrainingRun.run_key == "test/byo-1")).scalar_one()
        assert run.model_version == "1" and run.n_rows == len(frame)


@pytest.mark.model
def test_allocate_an_imported_logs_arms_to_a_customers_file(store, shop_export, tmp_path):
    from typer.testing import CliRunner

    from mlpkg.cli import app

    settings, engine = store
    path, spec, frame = shop_export
    stages.init_stores(settings)
    stages.import_log(settings, path, spec, now=NOW)
    trained = stages.train(
        settings, stages.RunContext(dag_id="test", run_id="byo-2"), log_names=["spring_test"]
    )
    assert trained["model_name"] == f"{settings.registered_model_name}-spring_test"
    decision = stages.gate(
        settings,
        model_version=trained["model_version"],
        test_frame=trained["test_frame"],
        model_name=trained["model_name"],
    )
    assert decision["promoted"], decision
    customers = tmp_path / "customers.csv"
    frame.drop(columns=["variant", "purchased", "order_value", "clicked"]).head(500).to_csv(
        customers, index=False
    )
    out = tmp_path / "allocations.csv"
    result = CliRunner().invoke(
        app,
        [
            "allocate",
            "--log",
            "spring_test",
            "--customers",
            str(customers),
            "--budget",
            "40",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    alloc = pd.read_csv(out)
    assert list(alloc.columns) == ["customer_id", "arm"] and len(alloc) == 500
    assert set(alloc["arm"]) <= {"holdout", *COSTS}
    spend = alloc["arm"].map(COSTS).fillna(0).sum()
    assert 0 < spend <= 40 + 1e-6
    bad = CliRunner().invoke(
        app,
        ["allocate", "--log", "spring_test", "--customers", str(path.parent / "nope.csv"), "--budget", "40"],
    )
    assert bad.exit_code == 2 and "does not" in bad.output and "nope.csv" in bad.output


@pytest.mark.model
def test_a_refused_first_model_says_why_and_how_to_go_on(store, shop_export, tmp_path):
    """No circle: train --log says the version was refused and why, allocate --log names it and the
    way on, and `promote VERSION --log NAME --reason` makes it the log's champion."""
    from typer.testing import CliRunner

    from mlpkg.cli import app

    settings, _ = store
    path, spec, frame = shop_export
    stages.init_stores(settings)
    stages.import_log(settings, path, spec, now=NOW)
    settings.gate.min_test_rows = 10**6  # no holdout is that large: the guard refuses the first model
    ctx = stages.RunContext(dag_id="test", run_id="byo-3")
    trained = stages.train(settings, ctx, log_names=["spring_test"])
    decision = stages.gate(
        settings,
        model_version=trained["model_version"],
        test_frame=trained["test_frame"],
        model_name=trained["model_name"],
    )
    assert decision["outcome"] == "refused" and "min_test_rows=1000000" in decision["next_step"]
    assert "couponops promote 1 --log spring_test --reason" in decision["next_step"]

    customers = tmp_path / "customers.csv"
    features = frame.drop(columns=["variant", "purchased", "order_value", "clicked"])
    features.head(100).to_csv(customers, index=False)
    args = ["allocate", "--log", "spring_test", "--customers", str(customers), "--budget", "20"]
    refused = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a.csv")])
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    text = " ".join(refused.output.split())
    assert "v1 (the newest of 1) was refused by the gate" in text and "min_test_rows=1000000" in text
    assert "couponops promote 1 --log spring_test --reason" in text

    promoted = CliRunner().invoke(app, ["promote", "1", "--log", "spring_test", "--reason", "pilot on 100"])
    assert promoted.exit_code == 0, promoted.output
    done = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b.csv")])
    assert done.exit_code == 0, done.output
    assert len(pd.read_csv(tmp_path / "b.csv")) == 100
