"""Shared fixtures: isolated settings and warehouses (SQLite under tmp_path, PostgreSQL when up)."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
# Airflow reads its home at import: keep test runs away from ~/airflow and from the demo's state.
_AIRFLOW_HOME = (
    Path(os.environ.get("PYTEST_AIRFLOW_HOME", "/tmp")) / f"couponops-pytest-airflow-{os.getpid()}"
)
os.environ["AIRFLOW_HOME"] = str(_AIRFLOW_HOME)
# `make test` exports the demo's metadata DB and MLflow store; tests never touch the demo's state.
_AIRFLOW_HOME.mkdir(parents=True, exist_ok=True)
os.environ["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"] = f"sqlite:///{_AIRFLOW_HOME / 'airflow.db'}"
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(ROOT / "plugins")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"

PG_ADMIN_URL = os.environ.get("COUPONOPS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def settings(tmp_path, monkeypatch):
    """Settings whose state folder, warehouse and MLflow store all live under tmp_path."""
    from mlpkg.config import get_settings

    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(tmp_path / "state"))
    get_settings.cache_clear()
    yield _small_settings(tmp_path / "state")
    get_settings.cache_clear()


@pytest.fixture
def engine(settings):
    """A migrated SQLite warehouse under tmp_path."""
    from mlpkg.db.engine import make_engine, migrate

    settings.ensure_dirs()
    migrate(settings.resolved_warehouse_url)
    eng = make_engine(settings.resolved_warehouse_url)
    yield eng
    eng.dispose()


@pytest.fixture
def pg_url():
    """A fresh PostgreSQL database for one test (skips with a clear message when PostgreSQL is down)."""
    if not _port_open("127.0.0.1", 5432):
        pytest.skip("PostgreSQL does not answer on 127.0.0.1:5432")
    from sqlalchemy import create_engine, text

    name = f"couponops_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    yield url
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def redis_url():
    """Redis on loopback (skips when it does not answer)."""
    if not _port_open("127.0.0.1", 6379):
        pytest.skip("Redis does not answer on 127.0.0.1:6379")
    return "redis://127.0.0.1:6379/15"


def _small_settings(state: Path, **extra):
    from mlpkg.config import Settings

    return Settings(
        _env_file=None,
        state_dir=state,
        simulator_customers=600,
        # One network, not the default ensemble of four: the tests' shops are small and CPU is scarce.
        trainer={"max_epochs": 3, "batch_size": 512, "hidden_dim": 32, "head_dim": 16, "ensemble_members": 1},
        gate={"min_test_rows": 20},
        **extra,
    )


@pytest.fixture(scope="session")
def ingested_template(tmp_path_factory):
    """A state folder with a 600-customer simulated shop already validated and loaded (built once)."""
    from mlpkg import stages
    from mlpkg.simulator.lab import harness

    state = tmp_path_factory.mktemp("template") / "state"
    s = _small_settings(state)
    stages.init_stores(s)
    batch = harness.land_simulated_batch(s, "initial")
    stages.ingest(s, batch["batch_dir"])
    return state


@pytest.fixture
def ingested(tmp_path, ingested_template, monkeypatch):
    """Settings and engine over a private copy of the ingested template."""
    import shutil

    from mlpkg.config import get_settings
    from mlpkg.db.engine import make_engine

    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key, raising=False)
    state = tmp_path / "state"
    shutil.copytree(ingested_template, state)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(state))
    get_settings.cache_clear()
    s = _small_settings(state)
    eng = make_engine(s.resolved_warehouse_url)
    yield s, eng
    eng.dispose()
    get_settings.cache_clear()


@pytest.fixture
def oracle_world(ingested, monkeypatch):
    """``(settings, engine, shop)``: the ingested shop, the simulator's oracle scoring as the model."""
    from mlpkg.simulator.lab import harness
    from tests.fixtures import use_oracle

    settings, engine = ingested
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    return settings, engine, shop


@pytest.fixture(scope="session")
def demo_state(tmp_path_factory):
    """A state folder after `make demo` (the end-to-end DAG tests and the browser tour share it).

    ``COUPONOPS_TEST_DEMO_STATE`` names the state folder of an earlier `make demo` to reuse
    instead (while working on those tests; its stdout is then empty).

    Returns:
        ``(state_dir, stdout of make demo)``.
    """
    import subprocess

    from tests.fixtures import demo_env

    if os.environ.get("COUPONOPS_TEST_DEMO_STATE"):
        return Path(os.environ["COUPONOPS_TEST_DEMO_STATE"]), ""
    state = tmp_path_factory.mktemp("demo") / "state"
    proc = subprocess.run(
        ["make", "-s", "demo", f"STATE={state}"],
        cwd=ROOT,
        env=demo_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return state, proc.stdout
