"""Adapters between Airflow and ``mlpkg``: assets, run context and settings from connections.

Only light imports here: this module is imported whenever a DAG file is parsed.
"""

from __future__ import annotations

from airflow.sdk import Asset

# Asset events connect the DAGs: ingest -> (train), feedback -> retrain.
RAW_DATA = Asset("couponops://warehouse/raw", group="couponops")
MODEL = Asset("couponops://registry/champion", group="couponops")
LEDGER = Asset("couponops://warehouse/allocations", group="couponops")
FEEDBACK = Asset("couponops://warehouse/feedback", group="couponops")

DEFAULT_ARGS = {"owner": "couponops", "retries": 2, "retry_delay": 30, "retry_exponential_backoff": True}

# Airflow connection id -> settings fields it fills (connections, never code, hold endpoints).
_CONNECTIONS = {
    "couponops_warehouse": "COUPONOPS_WAREHOUSE_URL",
    "couponops_mlflow": "COUPONOPS_MLFLOW_TRACKING_URI",
    "couponops_smtp": ("COUPONOPS_SMTP_HOST", "COUPONOPS_SMTP_PORT"),
    "couponops_sms": "COUPONOPS_SMS_WEBHOOK_URL",
    "couponops_push": "COUPONOPS_PUSH_WEBHOOK_URL",
}


def settings():  # noqa: ANN201 - returns mlpkg.config.Settings
    """Return CouponOps settings, with endpoints taken from Airflow connections when defined."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    from mlpkg.config import Settings

    overrides = {}
    for conn_id, target in _CONNECTIONS.items():
        try:
            conn = BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            continue  # not configured in Airflow: the COUPONOPS_* settings apply
        if isinstance(target, tuple):
            overrides["smtp_host"], overrides["smtp_port"] = conn.host, conn.port
        elif conn_id in ("couponops_warehouse", "couponops_mlflow"):
            overrides[target.removeprefix("COUPONOPS_").lower()] = conn.get_uri()
        else:
            overrides[target.removeprefix("COUPONOPS_").lower()] = conn.host
    return Settings(**overrides)


def run_context():  # noqa: ANN201 - returns mlpkg.stages.RunContext
    """Build a plain :class:`mlpkg.stages.RunContext` from the running task's Airflow context."""
    from airflow.sdk import get_current_context

    from mlpkg.stages import RunContext

    ctx = get_current_context()
    ti = ctx["ti"]
    logical = ctx.get("logical_date")
    return RunContext(
        dag_id=ti.dag_id,
        run_id=ti.run_id,
        try_number=int(ti.try_number or 1),
        logical_date=logical.isoformat() if logical else None,
    )


def conf(key: str, default=None):  # noqa: ANN001, ANN201
    """Read one value of the DAG run's conf (``airflow dags trigger -c '{...}'``)."""
    from airflow.sdk import get_current_context

    dag_run = get_current_context().get("dag_run")
    value = (dag_run.conf or {}).get(key) if dag_run is not None else None
    return default if value is None else value


def train_and_gate(upstream=None, log_names: list[str] | None = None):  # noqa: ANN001, ANN201
    """Wire ``upstream >> train -> gate`` (shared by the train and the retrain DAGs)."""
    from airflow.sdk import task

    @task(outlets=[MODEL])
    def train_model() -> dict:
        """Train on all logged data as of now, track in MLflow and register a version."""
        from mlpkg import stages

        result = stages.train(settings(), run_context(), log_names=log_names)
        print(f"MLflow run {result['mlflow_run_id']} registered version {result['model_version']}")
        return result

    @task
    def gate_model(trained: dict) -> dict:
        """Set the challenger alias and promote it only when it beats the champion."""
        from mlpkg import stages

        return stages.gate(
            settings(),
            model_version=trained["model_version"],
            test_frame=trained["test_frame"],
            run_id=trained["mlflow_run_id"],
            model_name=trained.get("model_name"),
        )

    trained = train_model()
    if upstream is not None:
        upstream >> trained
    return gate_model(trained)
