"""The production stack's configuration contract, shared by the integration test and the compose test.

The integration test (``test_production_stack.py``) starts Airflow with CeleryExecutor, Redis,
PostgreSQL and an MLflow tracking server using exactly these settings keys; the compose test
(``tests/unit/test_compose.py``) checks that ``docker/docker-compose.yml`` sets the same keys with
URLs of the same schemes, so the compose file is configured the way the test proved works.

Values: a string is the required URL scheme prefix (or the exact value when it has no ``://``);
``None`` means "must be set, from the environment (a secret)".
"""

from __future__ import annotations

# Every Airflow process (api-server, scheduler, dag-processor, triggerer, celery worker).
AIRFLOW_ENV: dict[str, str | None] = {
    "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "postgresql+psycopg://",
    # Airflow derives an asyncpg URL otherwise; psycopg 3 serves the async engine too.
    "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": "postgresql+psycopg://",
    "AIRFLOW__CELERY__BROKER_URL": "redis://",
    "AIRFLOW__CELERY__RESULT_BACKEND": "db+postgresql+psycopg://",
    "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": "http://",
    "AIRFLOW__API_AUTH__JWT_SECRET": None,
    "AIRFLOW__CORE__FERNET_KEY": None,
    "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
}

# CouponOps settings every Airflow process needs (the warehouse, MLflow and the landing zone).
COUPONOPS_ENV: dict[str, str | None] = {
    "COUPONOPS_WAREHOUSE_URL": "postgresql+psycopg://",
    "COUPONOPS_MLFLOW_TRACKING_URI": "http://",
    # Experiments store artifacts through the tracking server's proxy (``--serve-artifacts``),
    # so workers need no access to the artifact store itself.
    "COUPONOPS_MLFLOW_ARTIFACT_ROOT": "mlflow-artifacts:/couponops",
    "COUPONOPS_SOURCE": "landing",
    "COUPONOPS_LANDING_URL": None,
    "COUPONOPS_STATE_DIR": None,
}

# The MLflow tracking server: a PostgreSQL backend store and served artifacts.
MLFLOW_BACKEND_SCHEME = "postgresql+psycopg://"

# Services the README's Production section names; the compose file must define each.
COMPOSE_SERVICES = (
    "postgres",
    "redis",
    "airflow-init",
    "airflow-apiserver",
    "airflow-scheduler",
    "airflow-dag-processor",
    "airflow-triggerer",
    "airflow-worker",
    "airflow-worker-gpu",
    "mlflow",
)


def matches(expected: str | None, value: str | None) -> bool:
    """Return True when ``value`` satisfies one entry of the contract above."""
    if value is None or value == "":
        return False
    if expected is None:
        return True
    if "://" in expected:
        return value.startswith(expected)
    return value == expected
