"""The coupon ledger on PostgreSQL: idempotent re-runs and no overspend under concurrency."""

import threading

import pytest
from sqlalchemy import func, select, update

from mlpkg import stages
from mlpkg.allocation.campaign import LedgerLimitError, allocate_campaign
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.simulator.lab import harness
from tests.fixtures import use_oracle

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_world(pg_url, tmp_path, monkeypatch):
    from mlpkg.config import Settings

    settings = Settings(
        _env_file=None, state_dir=tmp_path / "state", warehouse_url=pg_url, simulator_customers=600
    )
    stages.init_stores(settings)
    stages.ingest(settings, harness.land_simulated_batch(settings, "initial")["batch_dir"])
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    engine = make_engine(pg_url)
    yield settings, engine, shop
    engine.dispose()


def _run(settings, engine, shop, campaign, run_key, budget=60.0):
    now = shop.now.to_pydatetime()
    return allocate_campaign(
        engine,
        settings,
        campaign_id=campaign,
        as_of=now,
        run_key=run_key,
        model_uri="oracle",
        model_version="0",
        now=now,
        budget=budget,
        objective="conversions",
    )


def test_three_runs_of_the_same_dag_run_leave_an_identical_ledger(pg_world):
    settings, engine, shop = pg_world
    sums = []
    for _ in range(3):
        _run(settings, engine, shop, "c1", "couponops_allocate/manual__1")
        with session_scope(engine) as s:
            sums.append(q.table_checksums(s))
    assert sums[0] == sums[1] == sums[2]
    with session_scope(engine) as s:
        assert q.table_counts(s)["allocations"] == 600


def _concurrently(*calls):
    errors, results = [], []
    barrier = threading.Barrier(len(calls))

    def worker(fn):
        barrier.wait()
        try:
            results.append(fn())
        except Exception as exc:  # collected and asserted on below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(c,)) for c in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results, errors


def test_two_concurrent_runs_of_one_campaign_allocate_it_once(pg_world):
    settings, engine, shop = pg_world
    results, errors = _concurrently(
        lambda: _run(settings, engine, shop, "c2", "run-a"),
        lambda: _run(settings, engine, shop, "c2", "run-b"),
    )
    assert len(results) == 1 and len(errors) == 1
    assert isinstance(errors[0], q.CampaignBusyError)
    with session_scope(engine) as s:
        c = s.get(m.Campaign, "c2")
        assert c.status == "allocated" and c.committed <= c.budget + 1e-6
        assert q.table_counts(s)["allocations"] == 600


def test_concurrent_campaigns_never_over_issue_a_coupon(pg_world):
    settings, engine, shop = pg_world
    with session_scope(engine) as s:
        s.execute(update(m.Coupon).values(inventory=25))
    results, errors = _concurrently(
        lambda: _run(settings, engine, shop, "c3", "r3", budget=500.0),
        lambda: _run(settings, engine, shop, "c4", "r4", budget=500.0),
    )
    assert all(isinstance(e, (LedgerLimitError, q.CampaignBusyError)) for e in errors), errors
    assert results, "at least one campaign must be allocated"
    with session_scope(engine) as s:
        for coupon in s.execute(select(m.Coupon)).scalars():
            assert coupon.issued <= coupon.inventory
            given = s.execute(
                select(func.count())
                .select_from(m.Allocation)
                .where(m.Allocation.coupon_id == coupon.coupon_id)
            ).scalar_one()
            assert given == coupon.issued


def test_three_runs_of_the_sharded_allocate_dag_run_leave_an_identical_ledger(pg_world, monkeypatch):
    """The DAG's path: plan_scoring -> score (one per shard) -> allocate_scored, re-run whole."""
    settings, engine, shop = pg_world
    monkeypatch.setattr(stages, "_champion", lambda settings, cold_start: ("0", "oracle"))
    ctx = stages.RunContext(dag_id="couponops_allocate", run_id="scheduled__2025-06-02")
    sums = []
    for _ in range(3):
        jobs = stages.plan_scoring(settings, ctx, campaign_id="c5", as_of=shop.now, n_shards=3)
        shards = [stages.score_shard(settings, job) for job in jobs]
        stages.allocate_scored(settings, ctx, shards, budget=60.0, now=shop.now.to_pydatetime())
        with session_scope(engine) as s:
            sums.append(q.table_checksums(s))
    assert sums[0] == sums[1] == sums[2]
    with session_scope(engine) as s:
        assert q.table_counts(s)["allocations"] == 600
        assert s.get(m.Campaign, "c5").committed <= 60.0 + 1e-6
