"""
### CouponOps — ingest and validate

Loads every complete batch the shop dropped into the landing zone
(`<zone>/batches/<batch_id>/` with a `_SUCCESS` marker) and has not been loaded yet, oldest
first, each exactly once. Every file is validated against its data contract with Great
Expectations and the batch is loaded in one transaction; a batch that breaks its contract is
quarantined, recorded, and the task fails with the file, rule, column and failing rows while
nothing is loaded. With nothing new the task is skipped and says why: it never invents data.
A run with conf `{"batch_dir": "DIR"}` loads that one folder instead. Emits the
`couponops://warehouse/raw` asset when rows were loaded.

Then `purge_old_behaviour` deletes behaviour events older than `COUPONOPS_PRIVACY__RETENTION_DAYS`
(warehouse and event store, recorded in the privacy audit); it is skipped, and says why, when no
retention is set or nothing is that old.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import (
    DEFAULT_ARGS,
    RAW_DATA,
    annotate,
    conf,
    run_context,
    schedule,
    settings,
    skip_if_idle,
)


@dag(
    dag_id="couponops_ingest",
    schedule=schedule("ingest"),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "ingest", "validation"],
    doc_md=__doc__,
    params={
        "batch_dir": Param(
            None, type=["null", "string"], description="One folder of raw files; empty = the landing zone"
        ),
    },
)
def couponops_ingest():
    @task(outlets=[RAW_DATA])
    def validate_and_load() -> dict:
        """Validate and load every new complete batch of the landing zone (or the given folder)."""
        from mlpkg import stages

        result = skip_if_idle(stages.ingest_source(settings(), batch_dir=conf("batch_dir")))
        annotate(RAW_DATA, {"batches": [b["drop_id"] for b in result["loaded"]]})
        return result

    @task(trigger_rule="none_failed")
    def purge_old_behaviour() -> dict:
        """Delete behaviour events older than the retention setting (skipped when none is set)."""
        from mlpkg import stages

        return skip_if_idle(stages.purge(settings(), run_context()))

    validate_and_load() >> purge_old_behaviour()


couponops_ingest()
