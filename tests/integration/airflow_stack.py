"""A production-shaped Airflow stack in subprocesses, for integration and browser tests.

:class:`AirflowStack` starts the processes a deployment runs — ``airflow scheduler``,
``dag-processor``, ``triggerer``, ``api-server`` and ``airflow celery worker``, plus an MLflow
tracking server with artifact serving — each in its own process group with its log under the
stack's folder, and stops every one of them (SIGTERM, then SIGKILL). Every process gets the same
environment, built from the configuration contract in :mod:`tests.integration.stack_config`
and filled with real values. What varies is a :class:`StackSpec`: the executor, the database
URLs, the ports and which processes to run (an embedded variant is LocalExecutor on SQLite with
no worker and no MLflow server).

:class:`AirflowApi` drives the stack through the Airflow 3 REST API (``/api/v2``) with a JWT from
the simple auth manager's ``POST /auth/token``. :class:`PostgresDatabases` creates fresh
databases for one stack and drops them afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from tests.integration import stack_config
from tests.integration.peers import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
PG_ADMIN_URL = os.environ.get("COUPONOPS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("COUPONOPS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")

#: Every process the production shape runs; a spec picks a subset.
PROCESSES = ("scheduler", "dag-processor", "triggerer", "api-server", "celery-worker")
TERMINAL_STATES = ("success", "failed")
_LOG_IDENTITY = {
    "event",
    "timestamp",
    "level",
    "logger",
    "dag_id",
    "run_id",
    "try_number",
    "ti_id",
    "task_id",
    "map_index",
    "filename",
    "lineno",
    "loc",
    "chan",
}


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    """Return True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def service_problems() -> list[str]:
    """Say why the production stack cannot run here (empty when PostgreSQL, Redis and Celery are there)."""
    problems = []
    pg = make_url(PG_ADMIN_URL)
    if not port_open(pg.host or "127.0.0.1", pg.port or 5432):
        problems.append(f"PostgreSQL does not answer on {pg.host}:{pg.port or 5432}")
    redis = make_url(REDIS_URL)
    if not port_open(redis.host or "127.0.0.1", redis.port or 6379):
        problems.append(f"Redis does not answer on {redis.host}:{redis.port or 6379}")
    try:
        import airflow.providers.celery  # noqa: F401
    except ImportError as exc:
        problems.append(f"apache-airflow-providers-celery is not importable ({exc})")
    return problems


class PostgresDatabases:
    """Fresh PostgreSQL databases for one stack, dropped (``WITH (FORCE)``) by :meth:`drop_all`."""

    def __init__(self, admin_url: str = PG_ADMIN_URL, prefix: str = "couponops_it") -> None:
        self.admin_url = make_url(admin_url)
        self.prefix = f"{prefix}_{uuid.uuid4().hex[:8]}"
        self.names: list[str] = []
        self._admin = create_engine(
            self.admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
        )

    def create(self, role: str, driver: str = "postgresql+psycopg") -> str:
        """Create ``<prefix>_<role>`` and return its SQLAlchemy URL with ``driver``."""
        name = f"{self.prefix}_{role}"
        with self._admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        url = self.admin_url.set(drivername=driver, database=name)
        return url.render_as_string(hide_password=False)

    def drop_all(self) -> None:
        """Drop every database this object created (connections still open are terminated)."""
        with self._admin.connect() as conn:
            for name in reversed(self.names):
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.names.clear()
        self._admin.dispose()


@dataclass
class StackSpec:
    """What one stack runs and where; everything it writes lives under ``home``.

    Attributes:
        home: The stack's folder (AIRFLOW_HOME, CouponOps state, landing zone, artifacts, logs).
        airflow_db_url: Airflow metadata DB (``postgresql+psycopg://`` or ``sqlite:///``).
        warehouse_url: The CouponOps warehouse.
        executor: ``CeleryExecutor`` (needs ``broker_url``/``result_backend``) or ``LocalExecutor``.
        broker_url: Celery broker (Redis).
        result_backend: Celery result backend (``db+postgresql+psycopg://``).
        mlflow_backend_uri: Backend store of an MLflow tracking server this stack starts; None
            starts none and the tasks use ``mlflow_tracking_uri`` as is.
        mlflow_tracking_uri: Tracking URI when no server is started (e.g. ``sqlite:///...``).
        processes: Which Airflow processes to start (a subset of :data:`PROCESSES`).
        worker_concurrency: Celery worker slots.
        queue: Celery queue of this stack, so stacks sharing one Redis never take each other's tasks.
        couponops_env: Extra ``COUPONOPS_*`` settings (tuning, delivery peers).
        airflow_env: Extra or overriding ``AIRFLOW__*`` settings.
    """

    home: Path
    airflow_db_url: str
    warehouse_url: str
    executor: str = "CeleryExecutor"
    broker_url: str | None = None
    result_backend: str | None = None
    mlflow_backend_uri: str | None = None
    mlflow_tracking_uri: str | None = None
    api_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    processes: tuple[str, ...] = PROCESSES
    worker_concurrency: int = 2
    queue: str = field(default_factory=lambda: f"couponops-{uuid.uuid4().hex[:8]}")
    username: str = "admin"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    couponops_env: dict[str, str] = field(default_factory=dict)
    airflow_env: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.processes) - set(PROCESSES)
        if unknown:
            raise ValueError(f"unknown processes {sorted(unknown)}; choose from {PROCESSES}")
        if self.executor == "CeleryExecutor" and not (self.broker_url and self.result_backend):
            raise ValueError("CeleryExecutor needs broker_url and result_backend")
        if self.mlflow_backend_uri is None and self.mlflow_tracking_uri is None:
            raise ValueError("give mlflow_backend_uri (start a server) or mlflow_tracking_uri")


class AirflowStack:
    """Start, watch and stop the processes of one :class:`StackSpec` (a context manager)."""

    def __init__(self, spec: StackSpec) -> None:
        self.spec = spec
        home = spec.home
        self.airflow_home = home / "airflow"
        self.state_dir = home / "state"
        self.landing_dir = home / "landing"
        self.artifacts_dir = home / "mlartifacts"
        self.log_dir = home / "logs"
        self.passwords_file = self.airflow_home / "passwords.json"
        # One secret of each kind shared by every process: the workers' execution-API tokens and
        # the API's user tokens are signed with the JWT secret, connections encrypted with Fernet.
        self.jwt_secret = secrets.token_urlsafe(32)
        self.api_secret_key = secrets.token_urlsafe(32)
        from cryptography.fernet import Fernet

        self.fernet_key = Fernet.generate_key().decode()
        self.worker_log_port = free_port()
        self.trigger_log_port = free_port()
        self.procs: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self._log_files: dict[str, Any] = {}

    # --- configuration -----------------------------------------------------------------------

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.spec.api_port}"

    @property
    def mlflow_url(self) -> str:
        """The tracking URI the tasks use (the server this stack starts, or the spec's URI)."""
        if self.spec.mlflow_backend_uri is None:
            return str(self.spec.mlflow_tracking_uri)
        return f"http://127.0.0.1:{self.spec.mlflow_port}"

    def contract_env(self) -> dict[str, str]:
        """Every key of the configuration contract (``AIRFLOW_ENV`` + ``COUPONOPS_ENV``), filled in."""
        spec = self.spec
        values = {
            "AIRFLOW__CORE__EXECUTOR": spec.executor,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": spec.airflow_db_url,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": _async_url(spec.airflow_db_url),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__API_AUTH__JWT_SECRET": self.jwt_secret,
            "AIRFLOW__CORE__FERNET_KEY": self.fernet_key,
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "COUPONOPS_WAREHOUSE_URL": spec.warehouse_url,
            "COUPONOPS_MLFLOW_TRACKING_URI": self.mlflow_url,
            "COUPONOPS_SOURCE": "landing",
            "COUPONOPS_LANDING_URL": str(self.landing_dir),
            "COUPONOPS_STATE_DIR": str(self.state_dir),
        }
        if spec.executor == "CeleryExecutor":
            values["AIRFLOW__CELERY__BROKER_URL"] = str(spec.broker_url)
            values["AIRFLOW__CELERY__RESULT_BACKEND"] = str(spec.result_backend)
        if spec.mlflow_backend_uri is not None:
            values["COUPONOPS_MLFLOW_ARTIFACT_ROOT"] = stack_config.COUPONOPS_ENV[
                "COUPONOPS_MLFLOW_ARTIFACT_ROOT"
            ]
        return values

    def contract_violations(self) -> list[str]:
        """Keys of the contract this stack leaves unset or sets with the wrong scheme.

        Only the production shape (CeleryExecutor with an MLflow server) is held to the contract;
        an embedded variant legitimately uses other schemes.
        """
        env = self.env()
        expected = {**stack_config.AIRFLOW_ENV, **stack_config.COUPONOPS_ENV}
        return [
            f"{key}={env.get(key)!r} (expected {want!r})"
            for key, want in expected.items()
            if not stack_config.matches(want, env.get(key))
        ]

    def env(self) -> dict[str, str]:
        """The environment of every process of this stack (the same for all of them)."""
        spec = self.spec
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "COUPONOPS_", "MLFLOW_"))}
        tuning = {
            "AIRFLOW_HOME": str(self.airflow_home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO_ROOT / "plugins"),
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            # Paused at creation: the test unpauses each DAG when it starts driving it.
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__PARALLELISM": "8",
            "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "120",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{spec.username}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(self.passwords_file),
            "AIRFLOW__API__SECRET_KEY": self.api_secret_key,
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(spec.api_port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__EXPOSE_STACKTRACE": "True",
            "AIRFLOW__OPERATORS__DEFAULT_QUEUE": spec.queue,
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(self.worker_log_port),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(self.trigger_log_port),
            # A 2-core box: new DAG files seen within seconds, one parser, generous timeouts.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "30",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "1",
            "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "120",
            "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(spec.worker_concurrency),
            "AIRFLOW__CELERY__OPERATION_TIMEOUT": "10",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")]),
            # The tracking server's job runner serves GenAI jobs only; it would compete for the CPUs.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "GIT_PYTHON_REFRESH": "quiet",
            "TQDM_DISABLE": "1",
            "PYTHONUNBUFFERED": "1",
            "PYTHONWARNINGS": "ignore::DeprecationWarning,ignore::FutureWarning,ignore::UserWarning",
        }
        return {**base, **tuning, **self.contract_env(), **spec.couponops_env, **spec.airflow_env}

    # --- processes ---------------------------------------------------------------------------

    def _command(self, name: str) -> list[str]:
        airflow = str(BIN / "airflow")
        if name == "api-server":
            return [
                airflow,
                "api-server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.spec.api_port),
                "--workers",
                "1",
            ]
        if name == "celery-worker":
            return [
                airflow,
                "celery",
                "worker",
                "--concurrency",
                str(self.spec.worker_concurrency),
                "--queues",
                self.spec.queue,
                "--celery-hostname",
                f"{self.spec.queue}@%h",
                "--without-gossip",
                "--without-mingle",
            ]
        if name == "mlflow":
            return [
                str(BIN / "mlflow"),
                "server",
                "--backend-store-uri",
                str(self.spec.mlflow_backend_uri),
                "--serve-artifacts",
                "--artifacts-destination",
                str(self.artifacts_dir),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.spec.mlflow_port),
                "--workers",
                "1",
            ]
        return [airflow, name]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def _spawn(self, name: str) -> subprocess.Popen:
        log = self.log_path(name).open("ab")
        self._log_files[name] = log
        proc = subprocess.Popen(
            self._command(name),
            cwd=self.spec.home,
            env=self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def run_cli(self, name: str, args: list[str], timeout: float = 300) -> str:
        """Run one command to completion with the stack's environment; fail with its log tail."""
        path = self.log_path(name)
        with path.open("ab") as log:
            done = subprocess.run(
                args,
                cwd=self.spec.home,
                env=self.env(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                timeout=timeout,
                check=False,
            )
        output = path.read_text(errors="replace")
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}:\n{output[-4000:]}")
        return output

    def prepare(self) -> None:
        """Create the folders and the auth manager's password file."""
        for d in (self.airflow_home, self.state_dir, self.landing_dir, self.artifacts_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.passwords_file.write_text(json.dumps({self.spec.username: self.spec.password}))

    def start(self, timeout: float = 300) -> AirflowStack:
        """Migrate, initialise the stores and start every process; return once the API answers.

        ``timings`` records when each step finished, in seconds from the start.
        """
        self.prepare()
        t0 = time.monotonic()
        deadline = t0 + timeout
        if self.spec.mlflow_backend_uri is not None:
            self._spawn("mlflow")  # migrates its backend store while Airflow migrates its own
        self.run_cli("airflow-db-migrate", [str(BIN / "airflow"), "db", "migrate"], timeout=timeout)
        self.timings["airflow db migrate"] = time.monotonic() - t0
        # Airflow's processes need only their metadata DB to start; they boot while MLflow finishes.
        for name in self.spec.processes:
            self._spawn(name)
        if self.spec.mlflow_backend_uri is not None:
            self.wait_http(f"{self.mlflow_url}/health", "mlflow", deadline - time.monotonic())
            self.timings["mlflow server up"] = time.monotonic() - t0
        # What the compose file's init container does: migrate the warehouse, create the experiment.
        left = max(deadline - time.monotonic(), 30)
        self.run_cli("couponops-init", [str(BIN / "couponops"), "init"], timeout=left)
        self.timings["couponops init"] = time.monotonic() - t0
        if "api-server" in self.spec.processes:
            self.wait_http(f"{self.api_url}/api/v2/monitor/health", "api-server", deadline - time.monotonic())
            self.timings["api-server up"] = time.monotonic() - t0
        return self

    def wait_http(self, url: str, name: str, timeout: float) -> None:
        """Wait until ``url`` answers 200 while process ``name`` stays alive."""
        deadline = time.monotonic() + max(timeout, 1)
        while True:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.tail(name)}")
            try:
                if httpx.get(url, timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f}s:\n{self.tail(name)}")
            time.sleep(1)

    def dead(self) -> dict[str, int]:
        """Processes that exited on their own, with their exit codes."""
        return {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}

    def stop(self, grace: float = 20) -> dict[str, int]:
        """Stop every process: SIGTERM to each process group, SIGKILL to what is left after ``grace``.

        Task processes run in process groups of their own (the task supervisor's), so every
        descendant seen before the stop is killed too. Returns each process's exit code.
        """
        descendants: list[psutil.Process] = []
        for proc in self.procs.values():
            try:
                descendants += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
        # The worker first, so it stops taking tasks; the API server last, since workers report to it.
        order = ["celery-worker", "scheduler", "triggerer", "dag-processor", "api-server", "mlflow"]
        for name in sorted(self.procs, key=lambda n: order.index(n) if n in order else len(order)):
            _signal_group(self.procs[name], signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + grace
        for name, proc in self.procs.items():
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=10)
            self.timings[f"{name} stopped"] = time.monotonic() - t0
        for child in descendants:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                continue
        psutil.wait_procs(descendants, timeout=10)
        for log in self._log_files.values():
            log.close()
        self._forget_queue()
        codes = {name: proc.returncode for name, proc in self.procs.items()}
        self.procs.clear()
        self._log_files.clear()
        return codes

    def _forget_queue(self) -> None:
        """Remove this stack's queue and its bindings from a Redis broker (other stacks' keys stay)."""
        broker = self.spec.broker_url
        if self.spec.executor != "CeleryExecutor" or not broker or not broker.startswith("redis"):
            return
        import redis

        client = redis.Redis.from_url(broker, socket_timeout=5)
        try:
            queue = self.spec.queue
            client.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}")
        except redis.RedisError:
            return  # the broker is gone already; nothing of ours is left to clean
        finally:
            client.close()

    def alive_pids(self) -> list[int]:
        """Pids of this stack's processes and their descendants that are still running."""
        pids = []
        for proc in self.procs.values():
            try:
                parent = psutil.Process(proc.pid)
                pids += [parent.pid, *(c.pid for c in parent.children(recursive=True))]
            except psutil.NoSuchProcess:
                continue
        return pids

    def tail(self, name: str, lines: int = 60) -> str:
        path = self.log_path(name)
        if not path.exists():
            return f"(no log for {name})"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def tails(self, lines: int = 60) -> str:
        """The last lines of every process's log, for a failure report."""
        names = sorted(p.stem for p in self.log_dir.glob("*.log"))
        return "\n".join(f"===== {n} (last {lines} lines) =====\n{self.tail(n, lines)}" for n in names)

    def api(self) -> AirflowApi:
        """A client of this stack's REST API, logged in as the spec's user."""
        return AirflowApi(self.api_url, self.spec.username, self.spec.password)

    def __enter__(self) -> AirflowStack:
        try:
            return self.start()
        except BaseException:
            self.stop()  # whatever did start (MLflow, some Airflow processes) stops with it
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return


class AirflowApi:
    """A small client of the Airflow 3 REST API (``/api/v2``) with a bearer token."""

    def __init__(self, base_url: str, username: str, password: str, timeout: float = 30) -> None:
        self.base_url = base_url
        self.username = username
        self.password = password
        self.http = httpx.Client(base_url=base_url, timeout=timeout)
        self._token: str | None = None

    def close(self) -> None:
        self.http.close()

    def login(self) -> str:
        """Get a JWT from the simple auth manager (``POST /auth/token``)."""
        response = self.http.post("/auth/token", json={"username": self.username, "password": self.password})
        if response.status_code != 201:
            raise AssertionError(f"POST /auth/token -> {response.status_code}: {response.text[:500]}")
        self._token = response.json()["access_token"]
        return self._token

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Call ``/api/v2<path>`` with the bearer token (logging in again once if it expired)."""
        if self._token is None:
            self.login()
        extra_headers = kwargs.pop("headers", {})
        for attempt in range(2):
            headers = {"Authorization": f"Bearer {self._token}", **extra_headers}
            response = self.http.request(method, f"/api/v2{path}", headers=headers, **kwargs)
            if response.status_code != 401 or attempt:
                return response
            self.login()
        return response

    def call(self, method: str, path: str, expect: Iterable[int] = (200,), **kwargs: Any) -> Any:
        """Call the API and return the JSON answer; fail with the answer when the status is unexpected."""
        response = self.request(method, path, **kwargs)
        if response.status_code not in tuple(expect):
            raise AssertionError(f"{method} /api/v2{path} -> {response.status_code}: {response.text[:2000]}")
        return response.json() if response.content else None

    # --- DAGs and runs -------------------------------------------------------------------------

    def dags(self) -> dict[str, dict]:
        return {d["dag_id"]: d for d in self.call("GET", "/dags", params={"limit": 100})["dags"]}

    def import_errors(self) -> list[dict]:
        return self.call("GET", "/importErrors")["import_errors"]

    def wait_for_dags(self, dag_ids: Iterable[str], timeout: float = 180) -> dict[str, dict]:
        """Wait until the DAG processor has serialized every DAG in ``dag_ids``."""
        wanted = set(dag_ids)
        deadline = time.monotonic() + timeout
        while True:
            found = self.dags()
            if wanted <= set(found):
                return found
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"DAGs {sorted(wanted - set(found))} not parsed within {timeout}s; "
                    f"import errors: {self.import_errors()}"
                )
            time.sleep(2)

    def set_paused(self, dag_id: str, paused: bool) -> dict:
        return self.call("PATCH", f"/dags/{dag_id}", json={"is_paused": paused})

    def trigger(
        self,
        dag_id: str,
        *,
        logical_date: datetime | str | None = None,
        conf: Mapping[str, Any] | None = None,
        run_after: datetime | str | None = None,
        run_id: str | None = None,
    ) -> dict:
        """Create a manual run (``POST /dags/{dag_id}/dagRuns``) and return it."""
        body: dict[str, Any] = {"logical_date": _iso(logical_date), "conf": dict(conf or {})}
        if run_after is not None:
            body["run_after"] = _iso(run_after)
        if run_id is not None:
            body["dag_run_id"] = run_id
        return self.call("POST", f"/dags/{dag_id}/dagRuns", expect=(200,), json=body)

    def dag_run(self, dag_id: str, run_id: str) -> dict:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def dag_runs(self, dag_id: str, **params: Any) -> list[dict]:
        params = {"limit": 100, "order_by": "id", **params}
        return self.call("GET", f"/dags/{dag_id}/dagRuns", params=params)["dag_runs"]

    def delete_run(self, dag_id: str, run_id: str) -> None:
        self.call("DELETE", f"/dags/{dag_id}/dagRuns/{run_id}", expect=(204,))

    def wait_for_run(self, dag_id: str, run_id: str, timeout: float, poll: float = 2) -> dict:
        """Wait until a run is terminal; return it (the caller asserts on its state)."""
        deadline = time.monotonic() + timeout
        while True:
            run = self.dag_run(dag_id, run_id)
            if run["state"] in TERMINAL_STATES:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{dag_id} run {run_id} still {run['state']} after {timeout}s:\n"
                    + self.describe(dag_id, run_id)
                )
            time.sleep(poll)

    def wait_for_new_run(
        self, dag_id: str, predicate: Callable[[dict], bool], timeout: float, poll: float = 2
    ) -> dict:
        """Wait until a run of ``dag_id`` satisfying ``predicate`` exists; return it."""
        deadline = time.monotonic() + timeout
        while True:
            for run in self.dag_runs(dag_id):
                if predicate(run):
                    return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"no matching {dag_id} run within {timeout}s; runs: {self.dag_runs(dag_id)}"
                )
            time.sleep(poll)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances"
        return self.call("GET", path, params={"limit": 100})["task_instances"]

    def xcom(
        self, dag_id: str, run_id: str, task_id: str, key: str = "return_value", map_index: int = -1
    ) -> Any:
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/{key}"
        return self.call("GET", path, params={"map_index": map_index})["value"]

    def task_log(
        self, dag_id: str, run_id: str, task_id: str, try_number: int = 1, map_index: int = -1
    ) -> str:
        """Return a task try's log as text (the events of the structured log, one per line)."""
        path = f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}"
        answer = self.call(
            "GET",
            path,
            params={"full_content": True, "map_index": map_index},
            headers={"Accept": "application/json"},
        )
        lines = []
        for item in answer["content"]:
            if isinstance(item, str):
                lines.append(item)
                continue
            # The task's identity repeats on every line; what is left (errors, values) is kept.
            extra = {k: v for k, v in item.items() if k not in _LOG_IDENTITY}
            lines.append(f"{item.get('level', '')} {item.get('event', '')} {extra or ''}".strip())
        return "\n".join(lines)

    def upstream_asset_events(self, dag_id: str, run_id: str) -> list[dict]:
        return self.call("GET", f"/dags/{dag_id}/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"]

    def describe(self, dag_id: str, run_id: str, log_lines: int = 40) -> str:
        """Task states of a run, with the log tail of every task that did not succeed."""
        out = []
        for ti in self.task_instances(dag_id, run_id):
            out.append(f"{ti['task_id']}[{ti['map_index']}] {ti['state']} try={ti['try_number']}")
            if ti["state"] not in ("success", "skipped", None, "scheduled", "queued") and ti["try_number"]:
                log = self.task_log(dag_id, run_id, ti["task_id"], ti["try_number"], ti["map_index"])
                out.append("\n".join(log.splitlines()[-log_lines:]))
        return "\n".join(out)


def _async_url(url: str) -> str:
    """The async engine's URL: psycopg 3 drives both engines; SQLite's async engine needs aiosqlite."""
    if url.startswith("sqlite"):
        return "sqlite+aiosqlite" + url[len("sqlite") :]
    return url


def _iso(value: datetime | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.isoformat()
