"""
### CouponOps — train and register

Builds a point-in-time training snapshot from every campaign log in the warehouse, trains the
multi-treatment uplift network with PyTorch Lightning (tracked in MLflow with the Airflow run as
lineage tags), registers a version with alias `challenger` and runs the promotion gate, which
moves `champion` only when the challenger's policy value beats the champion's. Run it by hand
to bootstrap; feedback-driven retraining lives in `couponops_retrain`.
"""

from __future__ import annotations

import pendulum
from airflow.sdk import dag

from plugins.couponops_airflow import DEFAULT_ARGS, train_and_gate


@dag(
    dag_id="couponops_train",
    schedule=None,
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["couponops", "training", "mlflow"],
    doc_md=__doc__,
)
def couponops_train():
    train_and_gate()


couponops_train()
