"""
### CouponOps — bootstrap a model

Scheduled on the `couponops://warehouse/raw` asset: when new data lands and the registry has no
`champion` yet, builds a point-in-time training snapshot from every campaign log in the
warehouse, trains the multi-treatment uplift network with PyTorch Lightning (tracked in MLflow
with the Airflow run as lineage tags), registers a version with alias `challenger` and runs the
promotion gate. With a champion in place it skips and says why (retraining on feedback is
`couponops_retrain`'s job); trigger it with conf `{"force": true}` to train anyway.
Emits `couponops://registry/champion` only when the champion changed.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import Param, dag, task

from plugins.couponops_airflow import DEFAULT_ARGS, RAW_DATA, conf, settings, train_and_gate


@dag(
    dag_id="couponops_train",
    schedule=[RAW_DATA],
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "training", "mlflow"],
    doc_md=__doc__,
    params={"force": Param(False, type="boolean", description="Train even when a champion exists")},
)
def couponops_train():
    @task.short_circuit
    def needs_model() -> bool:
        """Train only while there is no champion (or when forced); the reason is logged."""
        from mlpkg import stages

        if conf("force"):
            print("training forced by the run's conf")
            return True
        decision = stages.needs_bootstrap(settings())
        print(f"train={decision['train']}: {decision['reason']}")
        return decision["train"]

    train_and_gate(upstream=needs_model())


couponops_train()
