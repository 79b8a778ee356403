"""Airflow cluster policy of the CouponOps image: route training tasks to the GPU workers' queue.

Copied to ``$AIRFLOW_HOME/config/airflow_local_settings.py``, which Airflow imports in every process;
the dag-processor applies :func:`task_policy` to each task it parses, so the queue is part of the
serialized DAG the scheduler reads. Which queue is a deployment choice, not DAG code: the compose file
sets ``COUPONOPS_TRAINING_QUEUE`` (``default`` unless ``.env`` says ``gpu``, for the ``gpu`` profile).
Only light imports: this module is loaded by every Airflow command.
"""

from __future__ import annotations

import os

# The tasks that fit a model (plugins/couponops_airflow.train_and_gate, used by couponops_train and
# couponops_retrain); everything else stays on the default queue.
TRAINING_TASK_IDS = frozenset({"train_model"})


def task_policy(task) -> None:  # noqa: ANN001 - an Airflow operator
    """Send a training task to ``$COUPONOPS_TRAINING_QUEUE`` when that variable is set."""
    queue = os.environ.get("COUPONOPS_TRAINING_QUEUE", "").strip()
    # Inside a task group the id carries the group's prefix ("group.train_model").
    if queue and task.task_id.rsplit(".", 1)[-1] in TRAINING_TASK_IDS:
        task.queue = queue
