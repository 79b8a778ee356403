"""Benchmark the demo loop: wall time of `make demo`, split into Airflow orchestration vs task work.

Work is the sum of task-instance durations recorded in the Airflow metadata DB; orchestration is
the rest of the wall time (process start, DAG parsing, scheduling, state bookkeeping).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _task_seconds(airflow_db: Path) -> dict[str, float]:
    con = sqlite3.connect(airflow_db)
    rows = con.execute(
        "SELECT dag_id, start_date, end_date FROM task_instance WHERE end_date IS NOT NULL"
    ).fetchall()
    con.close()
    per_dag: dict[str, float] = {}
    for dag_id, start, end in rows:
        secs = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()
        per_dag[dag_id] = per_dag.get(dag_id, 0.0) + secs
    return per_dag


def run(out_dir: Path) -> list[dict]:
    """Run the demo in a fresh state folder and report orchestration vs work."""
    with tempfile.TemporaryDirectory(prefix="couponops-bench-") as tmp:
        state = Path(tmp) / "state"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONOPS_", "AIRFLOW", "MLFLOW"))}
        started = time.perf_counter()
        subprocess.run(
            ["make", "-s", "demo", f"STATE={state}"], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL
        )
        wall = time.perf_counter() - started
        per_dag = _task_seconds(state / "airflow" / "airflow.db")
    work = sum(per_dag.values())
    orchestration = wall - work
    return [
        {
            "name": "demo_loop_orchestration",
            "value": orchestration,
            "unit": "s",
            "reference": "demo loop wall time",
            "reference_value": wall,
            "ratio": orchestration / wall,
            "work_seconds": work,
            "per_dag_task_seconds": per_dag,
        },
    ]
