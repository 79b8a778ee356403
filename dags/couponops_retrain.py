"""
### CouponOps — retrain on feedback

Scheduled on the `couponops://warehouse/feedback` asset, with a weekly cron fallback because
asset events alone can be lost. A condition task reads the product's own counters (new labelled
rows since the last training, feature drift, measured vs predicted incrementality of the
campaigns named in the triggering asset event) and skips the run, logging why, when nothing
warrants retraining; otherwise it trains on all logged data (exploration included, weighted by
logged propensity) and runs the promotion gate. Emits `couponops://registry/champion` only when
the champion changed.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, dag, task

from plugins.couponops_airflow import (
    DEFAULT_ARGS,
    FEEDBACK,
    run_context,
    schedule,
    settings,
    train_and_gate,
    triggering_extras,
)


@dag(
    dag_id="couponops_retrain",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable(schedule("retrain"), timezone="UTC"), assets=FEEDBACK
    ),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "training", "feedback"],
    doc_md=__doc__,
)
def couponops_retrain():
    @task.short_circuit
    def should_retrain() -> bool:
        """Decide from the warehouse's counters; the decision and reasons are stored."""
        from mlpkg import stages

        campaigns = [c for extra in triggering_extras() for c in extra.get("campaign_ids", [])]
        decision = stages.decide_retrain(
            settings(), run_context(), campaign_id=campaigns[-1] if campaigns else None
        )
        print(f"retrain={decision['retrain']} reasons={decision['reasons']}")
        return decision["retrain"]

    train_and_gate(upstream=should_retrain())


couponops_retrain()
