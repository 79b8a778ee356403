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


def settings():  # noqa: ANN201 - returns mlpkg.config.Settings
    """Return CouponOps settings, with endpoints and credentials from Airflow connections when defined.

    Which connection fills which settings, and how each connection type is read, lives in
    :mod:`plugins.couponops_connections`; a connection that is not defined leaves the
    ``COUPONOPS_*`` settings in force.
    """
    import os

    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException
    from airflow.sdk.log import mask_secret

    from mlpkg.config import Settings
    from plugins.couponops_connections import (
        CONNECTIONS,
        mlflow_credentials_env,
        settings_overrides,
        url_quoted_secrets,
    )

    found = {}
    for conn_id in CONNECTIONS:
        try:
            conn = BaseHook.get_connection(conn_id)
        except AirflowNotFoundException:
            continue
        # Airflow masks the password in task logs; the URLs built from it carry it percent-encoded.
        for secret in url_quoted_secrets(conn):
            mask_secret(secret)
        found[conn_id] = conn
    if "couponops_mlflow" in found:
        # MLflow takes a server's login only from its own variables, read in this task's process.
        os.environ.update(mlflow_credentials_env(found["couponops_mlflow"]))
    return Settings(**settings_overrides(found))


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


def schedule(name: str) -> str:
    """Return the cron schedule of one DAG from the settings (``COUPONOPS_SCHEDULES__<NAME>``)."""
    from mlpkg.config import Settings

    return getattr(Settings().schedules, name)


def skip_if_idle(result: dict) -> dict:
    """Mark the running task skipped, with the stage's reason, when the stage had nothing to do."""
    from airflow.sdk.exceptions import AirflowSkipException

    if isinstance(result, dict) and result.get("skipped"):
        raise AirflowSkipException(result.get("reason") or "nothing to do")
    return result


def annotate(asset: Asset, extra: dict) -> None:
    """Attach ``extra`` to the asset event the running task emits (read by the consuming DAG)."""
    from airflow.sdk import get_current_context

    get_current_context()["outlet_events"][asset].extra = extra


def triggering_extras() -> list[dict]:
    """Return the extras of the asset events that triggered this run (empty for other runs)."""
    from airflow.sdk import get_current_context

    events = get_current_context().get("triggering_asset_events") or {}
    return [dict(event.extra or {}) for key in events for event in events[key]]


def conf(key: str, default=None):  # noqa: ANN001, ANN201
    """Read one value of the DAG run's conf (``airflow dags trigger -c '{...}'``)."""
    from airflow.sdk import get_current_context

    dag_run = get_current_context().get("dag_run")
    value = (dag_run.conf or {}).get(key) if dag_run is not None else None
    return default if value is None else value


def train_and_gate(upstream=None, log_names: list[str] | None = None):  # noqa: ANN001, ANN201
    """Wire ``upstream >> train -> gate`` (shared by the train and the retrain DAGs)."""
    from airflow.sdk import task

    @task
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

    @task(outlets=[MODEL])
    def publish_champion(decision: dict) -> dict:
        """Emit the champion asset, with the new version, only when the champion actually changed."""
        skip_if_idle(
            {
                "skipped": not decision.get("promoted"),
                "reason": f"champion unchanged: {decision.get('reason')}",
            }
        )
        annotate(
            MODEL,
            {
                "model": decision.get("model_name"),
                "version": str(decision.get("challenger_version")),
                "previous": decision.get("champion_version"),
                "reason": decision.get("reason"),
            },
        )
        return decision

    trained = train_model()
    if upstream is not None:
        upstream >> trained
    return publish_champion(gate_model(trained))
