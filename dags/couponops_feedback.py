"""
### CouponOps — feedback and measurement

Collects customers' responses to a campaign (from the simulated shop by default, or a folder
given as `feedback_dir`), validates and loads them idempotently, attributes them to the
campaign, and measures incremental conversions and revenue against the random control group
with 95% intervals. Emits the `couponops://warehouse/feedback` asset, which schedules
`couponops_retrain`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import DEFAULT_ARGS, FEEDBACK, conf, run_context, settings


@dag(
    dag_id="couponops_feedback",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "feedback", "measurement"],
    doc_md=__doc__,
    params={
        "campaign_id": Param(None, type=["null", "string"]),
        "feedback_dir": Param(None, type=["null", "string"], description="Folder with feedback.csv"),
    },
)
def couponops_feedback():
    @task
    def collect() -> dict:
        """Find the feedback batch (or let the simulated customers respond)."""
        from mlpkg import stages

        campaign_id = conf("campaign_id") or stages.campaign_id_for(run_context().logical_date)
        return stages.collect_feedback(settings(), campaign_id, feedback_dir=conf("feedback_dir"))

    @task
    def load(batch: dict) -> dict:
        """Validate and load the feedback events (replays change nothing)."""
        from mlpkg import stages

        stages.ingest_feedback(settings(), batch["feedback_dir"])
        return batch

    @task(outlets=[FEEDBACK])
    def measure(batch: dict) -> dict:
        """Attribute the feedback and measure incrementality vs control."""
        from mlpkg import stages

        return stages.measure(settings(), batch["campaign_id"])

    measure(load(collect()))


couponops_feedback()
