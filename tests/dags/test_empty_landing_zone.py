"""An empty landing zone: the scheduler runs every DAG, nothing is written or invented, each run says why."""

from __future__ import annotations

import sqlite3

import pytest

from tests.integration.airflow_stack import AirflowStack, StackSpec

pytestmark = [pytest.mark.dags, pytest.mark.slow]

DAGS = (
    "couponops_ingest",
    "couponops_train",
    "couponops_allocate",
    "couponops_feedback",
    "couponops_retrain",
)
#: Every clock-scheduled DAG fires every minute, so the scheduler itself creates their runs.
EVERY_MINUTE = {
    f"COUPONOPS_SCHEDULES__{n}": "* * * * *" for n in ("INGEST", "ALLOCATE", "FEEDBACK", "RETRAIN")
}


@pytest.fixture(scope="module")
def empty_run(tmp_path_factory):
    home = tmp_path_factory.mktemp("empty")
    spec = StackSpec(
        home=home,
        airflow_db_url=f"sqlite:///{home / 'airflow.db'}",
        warehouse_url=f"sqlite:///{home / 'warehouse.db'}",
        executor="LocalExecutor",
        mlflow_tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        processes=("scheduler", "dag-processor", "triggerer", "api-server"),
        couponops_env={"COUPONOPS_SOURCE": "landing", **EVERY_MINUTE},
        airflow_env={"AIRFLOW__CORE__PARALLELISM": "2"},
    )
    stack = AirflowStack(spec)
    with stack:
        api = stack.api()
        try:
            api.wait_for_dags(DAGS)
            for dag_id in DAGS:
                api.set_paused(dag_id, False)
            # The bootstrap DAG is scheduled on the raw-data asset, which nothing emits here.
            manual = api.trigger("couponops_train")["dag_run_id"]
            runs = {"couponops_train": api.wait_for_run("couponops_train", manual, timeout=300)}
            for dag_id in DAGS:
                if dag_id == "couponops_train":
                    continue
                scheduled = api.wait_for_new_run(dag_id, lambda r: r["run_type"] == "scheduled", timeout=300)
                runs[dag_id] = api.wait_for_run(dag_id, scheduled["dag_run_id"], timeout=300)
            tasks = {
                dag_id: {ti["task_id"]: ti for ti in api.task_instances(dag_id, run["dag_run_id"])}
                for dag_id, run in runs.items()
            }
            logs = {
                f"{dag_id}.{task_id}": api.task_log(
                    dag_id, runs[dag_id]["dag_run_id"], task_id, ti["try_number"]
                )
                for dag_id, tis in tasks.items()
                for task_id, ti in tis.items()
                if ti["try_number"]
            }
        except BaseException:
            print(stack.tails(60))
            raise
        finally:
            api.close()
    return home, stack, runs, tasks, logs


def test_the_scheduler_ran_every_dag_and_each_run_succeeded_with_its_work_skipped(empty_run):
    _, _, runs, tasks, _ = empty_run
    assert {d: r["state"] for d, r in runs.items()} == dict.fromkeys(DAGS, "success")
    assert {d: r["run_type"] for d, r in runs.items() if d != "couponops_train"} == {
        d: "scheduled" for d in DAGS if d != "couponops_train"
    }
    state = {f"{d}.{t}": ti["state"] for d, tis in tasks.items() for t, ti in tis.items()}
    for skipped in (
        "couponops_ingest.validate_and_load",
        "couponops_ingest.purge_old_behaviour",
        "couponops_allocate.plan_scoring",
        "couponops_allocate.allocate",
        "couponops_allocate.recommend",
        "couponops_allocate.deliver",
        "couponops_feedback.load",
        "couponops_feedback.measure",
        "couponops_train.train_model",
        "couponops_train.publish_champion",
        "couponops_retrain.train_model",
        "couponops_retrain.publish_champion",
    ):
        assert state[skipped] == "skipped", (skipped, state[skipped])


def test_nothing_is_written_or_invented(empty_run):
    home, stack, _, _, _ = empty_run
    con = sqlite3.connect(home / "warehouse.db")
    tables = [
        t
        for (t,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        if t != "alembic_version"
    ]
    counts = {t: con.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables}
    assert counts == dict.fromkeys(tables, 0)
    assert not stack.landing_dir.exists() or list(stack.landing_dir.iterdir()) == [], (
        "nothing lands by itself"
    )
    assert not list(stack.state_dir.rglob("world.json")), "no simulated shop was created"
    assert not list(home.rglob("*.csv")) and not list(home.rglob("*.parquet")), "no batch was exported"
    mlflow = sqlite3.connect(home / "mlflow.db")
    assert mlflow.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_each_skip_says_why_in_its_task_log(empty_run):
    *_, logs = empty_run
    expected = {
        "couponops_ingest.validate_and_load": "no new complete drop in",
        "couponops_ingest.purge_old_behaviour": "no retention set",
        "couponops_train.needs_model": "no labelled campaign rows in the warehouse yet",
        "couponops_allocate.plan_scoring": "the warehouse holds no customers yet: nothing to score",
        "couponops_feedback.load": "no new complete drop in",
        "couponops_feedback.measure": "no campaign's attribution window has closed",
        "couponops_retrain.should_retrain": "no labelled rows in the warehouse yet",
    }
    for task, reason in expected.items():
        assert reason in logs[task], f"{task}: missing {reason!r} in\n{logs[task][-1500:]}"
