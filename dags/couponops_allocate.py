"""
### CouponOps — allocate and deliver

Scores every eligible customer with the registry's `champion`, solves the budget-constrained
allocation (budget, inventory, channel capacity, consent, cooldown, one coupon per customer),
keeps a random control group and an exploration share with logged propensities, writes the
coupon ledger in one transaction, then enqueues and sends the messages through the outbox.
The campaign id defaults to `cmp-<logical date>`; re-running the same run changes nothing.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import DEFAULT_ARGS, LEDGER, conf, run_context, settings


@dag(
    dag_id="couponops_allocate",
    schedule="0 6 * * 1",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "allocation", "delivery"],
    doc_md=__doc__,
    params={
        "campaign_id": Param(None, type=["null", "string"]),
        "budget": Param(None, type=["null", "number"]),
        "objective": Param(None, type=["null", "string"], enum=[None, "conversions", "revenue", "profit"]),
    },
)
def couponops_allocate():
    @task(outlets=[LEDGER])
    def allocate() -> str:
        """Allocate the campaign with the champion and write the ledger."""
        from mlpkg import stages

        ctx = run_context()
        campaign_id = conf("campaign_id") or stages.campaign_id_for(ctx.logical_date)
        summary = stages.allocate(
            settings(),
            ctx,
            campaign_id=campaign_id,
            as_of=ctx.logical_date,
            budget=conf("budget"),
            objective=conf("objective"),
        )
        print(summary)
        return campaign_id

    @task
    def deliver(campaign_id: str) -> dict:
        """Send the campaign's messages through the outbox (exactly-once in effect)."""
        from mlpkg import stages

        return stages.deliver(settings(), campaign_id)

    deliver(allocate())


couponops_allocate()
