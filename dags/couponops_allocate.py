"""
### CouponOps — allocate and deliver

Scores every eligible customer with the registry's `champion` in customer shards (one mapped
`score` task each, `COUPONOPS_CAMPAIGN__SCORE_SHARDS`, all pinned to the same model version),
merges them and solves the budget-constrained allocation once (budget, inventory, channel
capacity, consent, cooldown, one coupon per customer), keeps a random control group and an
exploration share with logged propensities, writes the coupon ledger in one transaction, ranks
each treated customer's in-stock products with the `champion` recommender (`recommend`, training
one first when there is none; skipped for a shop without products), then enqueues and sends the
messages, rendered from their templates with the coupon and the products, through the outbox.
Features are as of the product's clock (`COUPONOPS_CLOCK`: the run's logical date, or the newest
loaded batch's export time) and the campaign id defaults to `cmp-<that day>`. With no data, no
champion or that day's campaign already allocated, the run is skipped with the reason; re-running
the same run changes nothing.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import (
    DEFAULT_ARGS,
    LEDGER,
    annotate,
    conf,
    run_context,
    schedule,
    settings,
    skip_if_idle,
)


@dag(
    dag_id="couponops_allocate",
    schedule=schedule("allocate"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "allocation", "delivery"],
    doc_md=__doc__,
    params={
        "campaign_id": Param(None, type=["null", "string"]),
        "as_of": Param(None, type=["null", "string"], description="ISO time for features (default: clock)"),
        "budget": Param(None, type=["null", "number"]),
        "objective": Param(None, type=["null", "string"], enum=[None, "conversions", "revenue", "profit"]),
    },
)
def couponops_allocate():
    @task
    def plan_scoring() -> list[dict]:
        """Split scoring into customer shards, all pinned to the champion version of this run."""
        from mlpkg import stages

        return skip_if_idle(
            stages.plan_scoring(
                settings(),
                run_context(),
                campaign_id=conf("campaign_id"),
                as_of=conf("as_of"),
                objective=conf("objective"),
            )
        )

    @task
    def score(job: dict) -> dict:
        """Score one shard's customers with the pinned champion (one mapped task per shard)."""
        from mlpkg import stages

        return stages.score_shard(settings(), job)

    @task(outlets=[LEDGER])
    def allocate(shards: list[dict]) -> str:
        """Merge the shards, solve the allocation once and write the ledger."""
        from mlpkg import stages

        # Index the lazy XCom sequence by its length: iterating it probes one past the end.
        jobs = [shards[i] for i in range(len(shards))]
        summary = stages.allocate_scored(settings(), run_context(), jobs, budget=conf("budget"))
        print(summary)
        annotate(
            LEDGER, {"campaign_id": summary["campaign_id"], "model_version": summary.get("model_version")}
        )
        return summary["campaign_id"]

    @task
    def recommend(campaign_id: str) -> str:
        """Rank in-stock products for the campaign's treated customers (the messages show them)."""
        from mlpkg import stages

        print(stages.recommend(settings(), campaign_id, actor="airflow:couponops_allocate"))
        return campaign_id

    @task
    def deliver(campaign_id: str) -> dict:
        """Send the campaign's messages through the outbox (exactly-once in effect)."""
        from mlpkg import stages

        return stages.deliver(settings(), campaign_id)

    deliver(recommend(allocate(score.expand(job=plan_scoring()))))


couponops_allocate()
