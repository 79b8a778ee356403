"""Sharded scoring: shards merge into exactly the population scored in one piece, and only a run's own."""

import numpy as np
import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.allocation import shards as sh
from mlpkg.allocation.campaign import allocate_campaign, score_population
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

pytestmark = pytest.mark.unit

CTX = stages.RunContext(dag_id="couponops_allocate", run_id="scheduled__1")


@pytest.fixture
def world(oracle_world, monkeypatch):
    # The registry's champion is the oracle scorer: these tests are about shards, not models.
    monkeypatch.setattr(stages, "_champion", lambda settings, cold_start: ("0", "oracle"))
    return oracle_world


def _jobs(settings, shop, n_shards, ctx=CTX, campaign="c1"):
    return stages.plan_scoring(
        settings, ctx, campaign_id=campaign, as_of=shop.now, objective="profit", n_shards=n_shards
    )


def _ledger(engine, campaign="c1"):
    with engine.connect() as conn:
        frame = pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == campaign), conn)
    return frame.drop(columns=["created_at"]).sort_values("customer_id").reset_index(drop=True)


def test_a_customer_keeps_its_shard_and_shards_split_the_base_evenly():
    ids = [f"c{i:06d}" for i in range(20_000)]
    first = sh.shard_of(ids, 8)
    assert (sh.shard_of(list(reversed(ids)), 8)[::-1] == first).all(), "shard must not depend on order"
    counts = np.bincount(first, minlength=8)
    assert counts.min() > 0.9 * 20_000 / 8 and counts.max() < 1.1 * 20_000 / 8
    with pytest.raises(ValueError, match="n_shards"):
        sh.shard_of(ids, 0)


def test_merged_shards_equal_the_population_scored_in_one_piece(world):
    settings, engine, shop = world
    whole = score_population(
        engine, settings, as_of=shop.now.to_pydatetime(), model_uri="oracle", objective="profit"
    )
    jobs = _jobs(settings, shop, 3)
    results = [stages.score_shard(settings, job) for job in jobs]
    assert sorted(r["shard"] for r in results) == [0, 1, 2]
    assert sum(r["customers"] for r in results) == len(whole.ids) == 600
    merged = sh.merge_shards(engine, [r["path"] for r in results], sh.ScoringJob.from_dict(jobs[0]))
    assert merged.catalog.arms == whole.catalog.arms
    assert (merged.ids == whole.ids).all()
    for field in ("value", "cost", "uplift", "eligible"):
        np.testing.assert_array_equal(getattr(merged, field), getattr(whole, field), err_msg=field)


def test_sharded_run_writes_the_same_ledger_as_one_piece_and_removes_its_files(world, tmp_path):
    settings, engine, shop = world
    results = [stages.score_shard(settings, job) for job in _jobs(settings, shop, 4)]
    summary = stages.allocate_scored(settings, CTX, results, budget=40.0, now=shop.now.to_pydatetime())
    assert summary["shards"] == 4 and summary["spend"] <= 40.0 + 1e-6
    sharded = _ledger(engine)
    assert not sh.shard_dir(settings, sh.ScoringJob.from_dict(results[0])).exists()

    with session_scope(engine) as s:  # the same campaign again, scored in one piece
        s.query(m.AllocationReason).delete()
        s.query(m.Allocation).delete()
        s.query(m.Campaign).delete()
        s.query(m.Coupon).update({m.Coupon.issued: 0})
    now = shop.now.to_pydatetime()
    allocate_campaign(
        engine,
        settings,
        campaign_id="c1",
        as_of=now,
        run_key=CTX.run_key,
        model_uri="oracle",
        model_version="0",
        now=now,
        budget=40.0,
        objective="profit",
    )
    pd.testing.assert_frame_equal(sharded, _ledger(engine))


def test_rerunning_the_allocate_task_needs_no_scores_and_changes_nothing(world):
    settings, engine, shop = world
    results = [stages.score_shard(settings, job) for job in _jobs(settings, shop, 2)]
    stages.allocate_scored(settings, CTX, results, budget=40.0)
    with session_scope(engine) as s:
        before = q.table_checksums(s)
    again = stages.allocate_scored(settings, CTX, results, budget=40.0)  # shard files are gone
    assert again["idempotent_rerun"] is True
    with session_scope(engine) as s:
        assert q.table_checksums(s) == before


def test_a_missing_shard_or_another_runs_shard_is_refused_and_nothing_is_written(world):
    settings, engine, shop = world
    results = [stages.score_shard(settings, job) for job in _jobs(settings, shop, 3)]
    with session_scope(engine) as s:
        before = q.table_checksums(s)
    with pytest.raises(sh.ShardMismatchError, match=r"got scoring shards \[0, 2\], expected each of 0..2"):
        stages.allocate_scored(settings, CTX, [results[0], results[2]], budget=40.0)

    other = stages.RunContext(dag_id="couponops_allocate", run_id="manual__2")
    foreign = stages.score_shard(settings, _jobs(settings, shop, 3, ctx=other)[1])
    with pytest.raises(sh.ShardMismatchError, match="run_key is 'couponops_allocate/manual__2'"):
        stages.allocate_scored(
            settings, CTX, [results[0], {**results[1], "path": foreign["path"]}, results[2]]
        )
    with pytest.raises(sh.ShardMismatchError, match="cannot be allocated by run"):
        stages.allocate_scored(settings, CTX, [foreign])
    with session_scope(engine) as s:
        assert q.table_checksums(s) == before
        assert q.get_campaign(s, "c1") is None, "a refused run must release the campaign for a retry"


def test_scoring_jobs_of_one_run_are_pinned_to_one_model_version(world):
    settings, _, shop = world
    jobs = _jobs(settings, shop, 5)
    assert [j["shard"] for j in jobs] == list(range(5))
    assert {(j["model_uri"], j["model_version"], j["run_key"], j["n_shards"]) for j in jobs} == {
        ("oracle", "0", CTX.run_key, 5)
    }


def test_a_shard_whose_model_emits_impossible_scores_is_refused_with_the_arm_named(world, monkeypatch):
    import mlpkg.registry
    from mlpkg.validation import DataContractError
    from tests.fixtures import OracleScorer

    settings, engine, shop = world

    class BrokenScorer(OracleScorer):
        def score_arrays(self, df, chunk_size=None):
            out = super().score_arrays(df, chunk_size)
            out["p_conv"][0, 1] = np.nan  # one customer, one arm
            out["p_conv"][1:4, 2] = 1.7
            return out

    monkeypatch.setattr(
        mlpkg.registry, "load_uplift_model", lambda uri, tracking_uri=None: BrokenScorer(shop)
    )
    job = _jobs(settings, shop, 1)[0]
    arms = list(shop.arm_names)
    with pytest.raises(DataContractError) as err:
        stages.score_shard(settings, job)
    assert f"p_conv__{arms[1]}" in str(err.value) and f"p_conv__{arms[2]}" in str(err.value)
    assert "model scores of oracle" in str(err.value)
    assert not list(sh.shard_dir(settings, sh.ScoringJob.from_dict(job)).glob("*.npz"))


def test_a_live_challenger_travels_through_the_shards_and_gives_the_same_ledger(world, monkeypatch):
    import mlpkg.registry
    from tests.fixtures import OracleScorer
    from tests.unit.test_allocation_campaign import _ShuffledOracle

    settings, engine, shop = world
    scorers = {"oracle": OracleScorer(shop), "shuffled": _ShuffledOracle(shop)}
    monkeypatch.setattr(mlpkg.registry, "load_uplift_model", lambda uri, tracking_uri=None: scorers[uri])
    monkeypatch.setattr(stages, "_live_challenger", lambda settings, champion: ("2", "shuffled"))
    jobs = _jobs(settings, shop, 3)
    assert {(j["challenger_uri"], j["challenger_version"]) for j in jobs} == {("shuffled", "2")}
    results = [stages.score_shard(settings, job) for job in jobs]
    summary = stages.allocate_scored(settings, CTX, results, budget=40.0, now=shop.now.to_pydatetime())
    assert summary["live_comparison"]["challenger_version"] == "2"
    assert summary["live_comparison"]["disagreements"] > 0
    sharded = _ledger(engine)
    with session_scope(engine) as s:  # the same campaign again, scored in one piece
        s.query(m.AllocationReason).delete()
        s.query(m.Allocation).delete()
        s.query(m.Campaign).delete()
        s.query(m.Coupon).update({m.Coupon.issued: 0})
    whole = stages.allocate(
        settings, CTX, campaign_id="c1", as_of=shop.now, budget=40.0, objective="profit",
        now=shop.now.to_pydatetime(),
    )  # fmt: skip
    assert whole["live_comparison"] == summary["live_comparison"]
    pd.testing.assert_frame_equal(sharded, _ledger(engine))
