"""``make up``: Airflow's scheduler, dag-processor, triggerer and API server on the embedded stores.

Beside them runs the simulated shop on an accelerated clock (``couponops-sim serve``): it lands a
batch and its channel feedback every few shop days, each shop day lasting a few wall-clock
seconds. The DAGs are unpaused and scheduled every minute or two (``COUPONOPS_SCHEDULES__*``), so
a person watching the Airflow UI sees ingest, the bootstrap training, allocation, feedback and
the asset-triggered retrain happen by themselves, with real start times, durations and logs.

``--check`` reads the Airflow metadata DB and exits 0 once it records successful scheduled runs of
ingest, allocate and feedback and a successful asset-triggered retrain (``make up-check``);
``--minutes N`` stops everything after N minutes (0: run until Ctrl-C).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

# What a person watching should see within minutes; production keeps the real schedules.
ACCELERATED = {
    "COUPONOPS_SCHEDULES__INGEST": "* * * * *",
    "COUPONOPS_SCHEDULES__ALLOCATE": "*/2 * * * *",
    "COUPONOPS_SCHEDULES__FEEDBACK": "* * * * *",
    "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
    "AIRFLOW__CORE__PARALLELISM": "2",
    "AIRFLOW__WORKERS__EXECUTION_API_TIMEOUT": "30",
    "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "15",
    "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
}
SCHEDULED = ("couponops_ingest", "couponops_allocate", "couponops_feedback")


def _secret(home: Path, name: str, make) -> str:  # noqa: ANN001 - a callable making the secret
    """Return a per-installation secret kept in AIRFLOW_HOME (created on first use, mode 600)."""
    path = home / name
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        path.write_text(make())
        path.chmod(0o600)
    return path.read_text().strip()


def environment(port: int) -> dict[str, str]:
    """Return the environment shared by every Airflow process and the simulated shop."""
    env = dict(os.environ)
    home = Path(env.get("AIRFLOW_HOME", Path.cwd() / ".couponops" / "airflow"))
    for key, value in ACCELERATED.items():
        env.setdefault(key, value)
    env.setdefault("AIRFLOW__API__PORT", str(port))
    env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"http://127.0.0.1:{port}/execution/")
    env.setdefault(
        "AIRFLOW__API_AUTH__JWT_SECRET", _secret(home, "jwt_secret", lambda: secrets.token_urlsafe(32))
    )
    env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", "admin:admin")
    env.setdefault(
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE", str(home / "simple_auth_manager_passwords.json")
    )
    env.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1]))
    return env


def check(max_wait: float = 0.0) -> int:
    """Exit 0 once the metadata DB records the scheduled runs and an asset-triggered retrain."""
    import sqlite3

    url = os.environ.get("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", "")
    if not url.startswith("sqlite:///"):
        print(
            f"up-check reads the embedded SQLite metadata DB; AIRFLOW__DATABASE__SQL_ALCHEMY_CONN is {url!r}"
        )
        return 2
    deadline = time.monotonic() + max_wait
    while True:
        missing = []
        try:
            con = sqlite3.connect(url.removeprefix("sqlite:///"))
            rows = con.execute(
                "SELECT dag_id, run_type, COUNT(*) FROM dag_run WHERE state = 'success' "
                "GROUP BY dag_id, run_type"
            ).fetchall()
            con.close()
        except sqlite3.Error as exc:
            rows, missing = [], [f"metadata DB not readable yet ({exc})"]
        done = {(dag, kind): n for dag, kind, n in rows}
        missing += [f"a successful scheduled run of {d}" for d in SCHEDULED if not done.get((d, "scheduled"))]
        if not done.get(("couponops_retrain", "asset_triggered")):
            missing.append("a successful asset-triggered run of couponops_retrain")
        if not missing:
            print("up-check: ok: " + ", ".join(f"{d} {k} x{n}" for (d, k), n in sorted(done.items())))
            return 0
        if time.monotonic() >= deadline:
            print("up-check: still missing " + "; ".join(missing))
            return 1
        time.sleep(10)


def run(minutes: float, port: int, day_seconds: float, export_every: int) -> int:
    """Start the Airflow components and the simulated shop; stop them all on exit."""
    env = environment(port)
    logs = Path(env["COUPONOPS_STATE_DIR"] if "COUPONOPS_STATE_DIR" in env else ".couponops") / "up-logs"
    logs.mkdir(parents=True, exist_ok=True)
    airflow = str(Path(sys.executable).with_name("airflow"))
    sim = str(Path(sys.executable).with_name("couponops-sim"))
    commands = {
        "api-server": [airflow, "api-server", "--port", str(port)],
        "scheduler": [airflow, "scheduler"],
        "dag-processor": [airflow, "dag-processor"],
        "triggerer": [airflow, "triggerer"],
        "shop": [sim, "serve", "--day-seconds", str(day_seconds), "--export-every", str(export_every)],
    }
    procs: dict[str, subprocess.Popen] = {}
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        for name, cmd in commands.items():
            log = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - closed with the process below
            procs[name] = subprocess.Popen(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
            if name == "api-server":
                # Tasks report to the API server's execution API: it must answer before anything runs.
                _wait_for_api(port, procs[name], logs / "api-server.log")
        passwords = env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE"]
        print(f"Airflow UI: http://127.0.0.1:{port} (user admin; password in {passwords})")
        print(
            f"process logs: {logs}/; stop with Ctrl-C"
            + (f" (stops by itself after {minutes:g} min)" if minutes else "")
        )
        started = time.monotonic()
        while not minutes or time.monotonic() - started < minutes * 60:
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                print(f"stopped unexpectedly: {dead}; see their logs in {logs}/")
                return 1
            time.sleep(2)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_all(list(procs.values()))


def _interrupt(signum, frame) -> None:  # noqa: ANN001 - signal handler signature
    raise KeyboardInterrupt


def _wait_for_api(port: int, proc: subprocess.Popen, log: Path, timeout: float = 300.0) -> None:
    """Wait until the API server answers its health endpoint (it takes a while on 2 cores)."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the API server exited with code {proc.returncode}; see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise RuntimeError(f"the API server did not answer on port {port} within {timeout:.0f}s; see {log}")


def _stop_all(procs: list[subprocess.Popen]) -> None:
    """Stop every process and all its descendants (Airflow forks workers into new sessions)."""
    import psutil

    tree = []
    for proc in procs:
        try:
            parent = psutil.Process(proc.pid)
            tree += [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for p in tree:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(tree, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(alive, timeout=5)


def main() -> int:
    """Parse the command line and run or check."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=0.0, help="stop after N minutes (0: until Ctrl-C)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("COUPONOPS_UP_PORT", "8080")))
    parser.add_argument("--day-seconds", type=float, default=10.0, help="wall seconds per simulated shop day")
    parser.add_argument("--export-every", type=int, default=3, help="shop days between two exports")
    parser.add_argument("--check", action="store_true", help="check the metadata DB instead of running")
    parser.add_argument("--wait", type=float, default=0.0, help="with --check: keep checking for N seconds")
    args = parser.parse_args()
    if args.check:
        return check(args.wait)
    return run(args.minutes, args.port, args.day_seconds, args.export_every)


if __name__ == "__main__":
    sys.exit(main())
