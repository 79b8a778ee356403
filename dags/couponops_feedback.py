"""
### CouponOps — feedback and measurement

Loads every complete feedback export in the landing zone (`<zone>/feedback/<id>/` with a
`_SUCCESS` marker: clicks, redemptions and orders from the channels and the shop) not loaded
yet, validated and idempotent (replayed events change nothing). Then measures every campaign
whose attribution window has closed and that is not measured yet, or that received late events,
against its random control group with 95% intervals; campaigns still inside their window get
provisional numbers only. Emits `couponops://warehouse/feedback` (with the measured campaigns as
the event's extra) only when a campaign was measured, which schedules `couponops_retrain`.
Conf `{"feedback_dir": DIR, "campaign_id": ID}` loads one folder / measures one campaign by hand.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import (
    DEFAULT_ARGS,
    FEEDBACK,
    annotate,
    conf,
    run_context,
    schedule,
    settings,
    skip_if_idle,
)


@dag(
    dag_id="couponops_feedback",
    schedule=schedule("feedback"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "feedback", "measurement"],
    doc_md=__doc__,
    params={
        "campaign_id": Param(None, type=["null", "string"], description="Measure this campaign now"),
        "feedback_dir": Param(None, type=["null", "string"], description="One folder with feedback.csv"),
    },
)
def couponops_feedback():
    @task
    def load() -> dict:
        """Validate and load the landed feedback exports (or the given folder)."""
        from mlpkg import stages

        return skip_if_idle(stages.ingest_feedback_source(settings(), feedback_dir=conf("feedback_dir")))

    @task(outlets=[FEEDBACK], trigger_rule="none_failed")
    def measure() -> dict:
        """Measure every campaign whose attribution window closed (or the one given)."""
        from mlpkg import stages

        if conf("campaign_id"):
            result = stages.measure(settings(), conf("campaign_id"))
            measured = [conf("campaign_id")]
        else:
            result = skip_if_idle(stages.measure_due(settings(), run_context()))
            measured = [row["campaign_id"] for row in result["measured"]]
        annotate(FEEDBACK, {"campaign_ids": measured, "reason": "attribution window closed or late events"})
        return result

    load() >> measure()


couponops_feedback()
