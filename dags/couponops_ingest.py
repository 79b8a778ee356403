"""
### CouponOps — ingest and validate

Lands a raw batch (from the built-in simulated shop by default, or a folder given as
`batch_dir` in the run conf), validates every file against its data contract with Great
Expectations, and loads it into the warehouse in one transaction. A batch that breaks its
contract is moved to the quarantine folder, the task fails with the file, rule, column and
failing rows, and nothing is loaded. Emits the `couponops://warehouse/raw` asset.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import DEFAULT_ARGS, RAW_DATA, conf, settings


@dag(
    dag_id="couponops_ingest",
    schedule="@daily",
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "ingest", "validation"],
    doc_md=__doc__,
    params={
        "batch_dir": Param(
            None, type=["null", "string"], description="Folder of raw files; empty = simulate"
        ),
        "batch": Param(None, type=["null", "string"], description="Name of the simulated batch"),
    },
)
def couponops_ingest():
    @task
    def land_batch() -> str:
        """Find the batch folder (or export one from the simulated shop)."""
        from mlpkg import stages

        return stages.land_batch(settings(), batch_dir=conf("batch_dir"), batch=conf("batch"))["batch_dir"]

    @task(outlets=[RAW_DATA])
    def validate_and_load(batch_dir: str) -> dict:
        """Validate the batch against its contracts and load it atomically."""
        from mlpkg import stages

        return stages.ingest(settings(), batch_dir)

    validate_and_load(land_batch())


couponops_ingest()
