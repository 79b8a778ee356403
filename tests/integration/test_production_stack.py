"""The production stack for real: Airflow 3 with Celery, PostgreSQL, Redis and an MLflow server.

One stack per module (:mod:`tests.integration.airflow_stack`): ``airflow scheduler``,
``dag-processor``, ``triggerer``, ``api-server`` and ``airflow celery worker`` (CeleryExecutor,
Redis broker, PostgreSQL metadata DB and Celery result backend), an MLflow tracking server with
a PostgreSQL backend store and served artifacts, and the warehouse on PostgreSQL too. Delivery
goes live to loopback SMTP and HTTP peers. The test drives the loop through the authenticated
REST API the way an operator would, while the simulated shop (the world) lands its exports and
its customers' responses in the landing zone:

ingest -> train (bootstrap) -> allocate (mapped ``score`` tasks on the worker) -> deliver ->
a week passes in the shop -> ingest -> feedback -> the scheduler creates the retrain run from
the feedback asset event -> a challenger is registered; then feedback with nothing new skips.

The DAGs' wall-clock schedules are set to a day that does not come (29 February: the first after
the DAGs' start date is in 2028), so every run is either one the test triggered or one the
scheduler created from an asset event. The product's clock: the data's (``COUPONOPS_CLOCK=data``).
"""

from __future__ import annotations

import re
import time

import httpx
import pandas as pd
import psutil
import pytest
from sqlalchemy import create_engine, text

from tests.integration.airflow_stack import (
    REDIS_URL,
    AirflowStack,
    PostgresDatabases,
    StackSpec,
    service_problems,
)
from tests.integration.peers import http_peer, smtp_peer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DAGS = (
    "couponops_ingest",
    "couponops_train",
    "couponops_allocate",
    "couponops_feedback",
    "couponops_retrain",
)
FEEDBACK_ASSET = "couponops://warehouse/feedback"
MODEL_NAME = "couponops-uplift"
NEVER = "0 0 29 2 *"
SHOP_SEED = 11
SHOP_CUSTOMERS = 600
SCORE_SHARDS = 2
PSEUDONYM_KEY = "production-stack-test-key-0123456789"

#: Small and fast on a 2-core box: a tiny model, two epochs, two scoring shards.
TUNING = {
    "COUPONOPS_CLOCK": "data",
    "COUPONOPS_TRAINER__MAX_EPOCHS": "2",
    "COUPONOPS_TRAINER__NUM_THREADS": "1",
    "COUPONOPS_TRAINER__BATCH_SIZE": "512",
    "COUPONOPS_TRAINER__HIDDEN_DIM": "32",
    "COUPONOPS_TRAINER__HEAD_DIM": "16",
    "COUPONOPS_TRAINER__ENSEMBLE_MEMBERS": "1",
    "COUPONOPS_GATE__MIN_TEST_ROWS": "20",
    "COUPONOPS_RETRAIN__MIN_NEW_LABELLED_ROWS": "1",
    "COUPONOPS_CAMPAIGN__SCORE_SHARDS": str(SCORE_SHARDS),
    "COUPONOPS_DELIVERY_BACKOFF_SECONDS": "0.1",
    # Production runs with a key from the secret backend, never a generated one.
    "COUPONOPS_PRIVACY__PSEUDONYM_KEY": PSEUDONYM_KEY,
    "COUPONOPS_PRIVACY__GENERATE_KEY": "false",
    **{f"COUPONOPS_SCHEDULES__{name}": NEVER for name in ("INGEST", "ALLOCATE", "FEEDBACK", "RETRAIN")},
}


@pytest.fixture(scope="module")
def production(tmp_path_factory):
    """Start the whole stack once for this module; stop every process and drop the databases after."""
    problems = service_problems()
    if problems:
        pytest.skip(
            "production stack test needs PostgreSQL, Redis and the Celery provider: " + "; ".join(problems)
        )
    databases = PostgresDatabases()
    stack = api = None
    with smtp_peer() as smtp, http_peer() as gateway:
        try:
            airflow_db = databases.create("airflow")
            spec = StackSpec(
                home=tmp_path_factory.mktemp("production"),
                airflow_db_url=airflow_db,
                warehouse_url=databases.create("warehouse"),
                broker_url=REDIS_URL,
                result_backend=f"db+{airflow_db}",
                mlflow_backend_uri=databases.create("mlflow"),
                couponops_env={
                    **TUNING,
                    "COUPONOPS_DELIVERY_MODE": "live",
                    "COUPONOPS_SMTP_HOST": "127.0.0.1",
                    "COUPONOPS_SMTP_PORT": str(smtp.port),
                    "COUPONOPS_SMS_WEBHOOK_URL": f"{gateway.url}/sms",
                    "COUPONOPS_PUSH_WEBHOOK_URL": f"{gateway.url}/push",
                },
            )
            stack = AirflowStack(spec)
            assert stack.contract_violations() == [], "every process gets the contract's keys, filled in"
            try:
                stack.start()
                api = stack.api()
                started = time.monotonic()
                api.wait_for_dags(DAGS)
                stack.timings["DAGs parsed, after the API"] = time.monotonic() - started
            except BaseException:
                print(stack.tails(80))
                raise
            yield {"stack": stack, "api": api, "smtp": smtp, "gateway": gateway}
        finally:
            if api is not None:
                api.close()
            if stack is not None:
                pids = stack.alive_pids()
                stack.stop()
                print(
                    "\n== stack timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in stack.timings.items())
                )
                survivors = [pid for pid in pids if _alive(pid)]
                assert not survivors, f"processes left running after stop: {survivors}"
            databases.drop_all()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_unauthenticated_and_wrongly_authenticated_requests_are_refused(production):
    stack, api = production["stack"], production["api"]
    anonymous = httpx.get(f"{stack.api_url}/api/v2/dags", timeout=30)
    assert anonymous.status_code in (401, 403), anonymous.text
    forged = httpx.get(
        f"{stack.api_url}/api/v2/dags", headers={"Authorization": "Bearer not-a-token"}, timeout=30
    )
    assert forged.status_code in (401, 403), forged.text
    trigger = httpx.post(
        f"{stack.api_url}/api/v2/dags/couponops_ingest/dagRuns", json={"logical_date": None}, timeout=30
    )
    assert trigger.status_code in (401, 403), trigger.text
    wrong = httpx.post(
        f"{stack.api_url}/auth/token", json={"username": stack.spec.username, "password": "wrong"}, timeout=30
    )
    assert wrong.status_code == 401, wrong.text
    # The same request with the token of the configured user is accepted.
    assert set(DAGS) <= set(api.dags())


def test_the_loop_runs_on_celery_and_the_scheduler_retrains_from_the_feedback_asset(production):
    stack = production["stack"]
    try:
        _drive_the_loop(production)
    except BaseException:
        print(stack.tails(80))
        raise


def _drive_the_loop(production) -> None:
    import mlflow

    from mlpkg.privacy import pseudonym
    from mlpkg.simulator import Shop, ShopConfig
    from mlpkg.simulator.landing import answer_messages, export_to_landing

    stack, api, smtp, gateway = (production[k] for k in ("stack", "api", "smtp", "gateway"))
    registry = mlflow.MlflowClient(tracking_uri=stack.mlflow_url)
    zone = stack.landing_dir
    shop = Shop(ShopConfig(n_customers=SHOP_CUSTOMERS, seed=SHOP_SEED))
    # The peers receive the product's pseudonyms; the world answers for its customers under them.
    shop.know_ids(lambda customer_id: pseudonym(PSEUDONYM_KEY.encode(), customer_id))
    for dag_id in ("couponops_ingest", "couponops_allocate", "couponops_feedback", "couponops_retrain"):
        api.set_paused(dag_id, False)  # asset-triggered runs are only queued for an unpaused DAG

    # 1. The shop lands its first export (its history and a past randomized campaign); ingest loads it.
    first = export_to_landing(shop, zone)
    ingest = _run(api, "couponops_ingest", shop.now, timeout=240)
    loaded = api.xcom("couponops_ingest", ingest, "validate_and_load")
    assert [b["drop_id"] for b in loaded["loaded"]] == [first.name]

    # 2. Bootstrap a champion. The train DAG also listens to the raw-data asset; it is unpaused
    # only for this run, so later ingests do not queue runs that would skip anyway.
    api.set_paused("couponops_train", False)
    _run(api, "couponops_train", shop.now, timeout=300)
    api.set_paused("couponops_train", True)
    bootstrap = registry.get_model_version_by_alias(MODEL_NAME, "champion")
    served = list((stack.artifacts_dir / "couponops").rglob("MLmodel"))
    assert served, "model artifacts go through the MLflow server's artifact proxy"

    # 3. Allocate as of the shop's clock: mapped score tasks run on the Celery worker, then deliver live.
    allocate = _run(api, "couponops_allocate", shop.now, timeout=300)
    tis = api.task_instances("couponops_allocate", allocate)
    scores = sorted((ti for ti in tis if ti["task_id"] == "score"), key=lambda ti: ti["map_index"])
    assert [(ti["map_index"], ti["state"]) for ti in scores] == [(i, "success") for i in range(SCORE_SHARDS)]
    assert {ti["queue"] for ti in tis} == {stack.spec.queue}
    assert all(ti["hostname"] for ti in scores)
    worker_log = stack.log_path("celery-worker").read_text(errors="replace")
    executed = {
        int(m.group(1))
        for line in worker_log.splitlines()
        if "Executing workload in Celery" in line and "task_id='score'" in line and allocate in line
        for m in [re.search(r"map_index=(\d+)", line)]
        if m
    }
    assert executed == set(range(SCORE_SHARDS)), "the worker log names every mapped score task"
    campaign_id = api.xcom("couponops_allocate", allocate, "allocate")
    delivered = api.xcom("couponops_allocate", allocate, "deliver")
    received = pd.DataFrame(smtp.offers() + gateway.offers())
    assert delivered["sent"] == len(received) > 0 and set(received["campaign_id"]) == {campaign_id}
    assert received["coupon_id"].notna().all()

    # 4. A week and a day pass in the shop: it lands its next export, and the channels report
    # what the customers who got a message did (the world answers what the peers received).
    sent_at = shop.now
    shop.advance(8)
    second = export_to_landing(shop, zone)
    feedback_drop = answer_messages(shop, zone, received.assign(sent_at=sent_at), until=shop.now)
    assert feedback_drop is not None and (feedback_drop / "feedback.csv").exists()
    ingest2 = _run(api, "couponops_ingest", shop.now, timeout=240)
    assert [b["drop_id"] for b in api.xcom("couponops_ingest", ingest2, "validate_and_load")["loaded"]] == [
        second.name
    ]
    versions_before = _versions(registry)
    feedback = _run(api, "couponops_feedback", shop.now, timeout=300)
    measured = api.xcom("couponops_feedback", feedback, "measure")
    assert [row["campaign_id"] for row in measured["measured"]] == [campaign_id]

    # 5. The scheduler creates the retrain run from the feedback asset event, and it registers a challenger.
    retrain = api.wait_for_new_run(
        "couponops_retrain", lambda run: run["run_type"] == "asset_triggered", timeout=120
    )
    assert retrain["triggered_by"] == "asset"
    events = api.upstream_asset_events("couponops_retrain", retrain["dag_run_id"])
    assert [(e["uri"], e["source_dag_id"], e["source_run_id"]) for e in events] == [
        (FEEDBACK_ASSET, "couponops_feedback", feedback)
    ]
    assert events[0]["extra"]["campaign_ids"] == [campaign_id]
    done = api.wait_for_run("couponops_retrain", retrain["dag_run_id"], timeout=360)
    _report(api, "couponops_retrain", retrain["dag_run_id"], 0)
    assert done["state"] == "success", api.describe("couponops_retrain", retrain["dag_run_id"])
    states = {
        ti["task_id"]: ti["state"] for ti in api.task_instances("couponops_retrain", retrain["dag_run_id"])
    }
    assert states["should_retrain"] == states["train_model"] == states["gate_model"] == "success", states
    new_versions = _versions(registry) - versions_before
    assert len(new_versions) == 1, new_versions
    (version,) = new_versions
    aliases = set(registry.get_model_version(MODEL_NAME, str(version)).aliases)
    assert aliases & {"challenger", "champion"}, aliases
    assert int(version) > int(bootstrap.version)

    # 6. Feedback again with nothing new landed: both tasks skip, saying why, and nothing is retrained.
    again = _run(api, "couponops_feedback", shop.now, timeout=240)
    skipped = {ti["task_id"]: ti for ti in api.task_instances("couponops_feedback", again)}
    assert {t: ti["state"] for t, ti in skipped.items()} == {"load": "skipped", "measure": "skipped"}
    load_log = api.task_log("couponops_feedback", again, "load", skipped["load"]["try_number"])
    assert "no new complete drop" in load_log, load_log[-2000:]
    measure_log = api.task_log("couponops_feedback", again, "measure", skipped["measure"]["try_number"])
    assert "no campaign's attribution window has closed" in measure_log, measure_log[-2000:]
    retrains = api.dag_runs("couponops_retrain")
    assert [r["dag_run_id"] for r in retrains] == [retrain["dag_run_id"]], (
        "a skipped feedback emits no asset event"
    )

    # 7. The stores really are PostgreSQL: the warehouse recorded each drop once, MLflow each version.
    warehouse = create_engine(stack.spec.warehouse_url)
    mlflow_db = create_engine(str(stack.spec.mlflow_backend_uri))
    try:
        with warehouse.connect() as conn:
            drops = conn.execute(
                text("SELECT kind, drop_id, status FROM landed_batches ORDER BY drop_id")
            ).all()
        with mlflow_db.connect() as conn:
            stored = conn.execute(
                text("SELECT version FROM model_versions WHERE name = :n"), {"n": MODEL_NAME}
            )
            stored_versions = {int(v) for (v,) in stored}
    finally:
        warehouse.dispose()
        mlflow_db.dispose()
    assert sorted(drops) == sorted(
        [
            ("batches", first.name, "loaded"),
            ("batches", second.name, "loaded"),
            ("feedback", feedback_drop.name, "loaded"),
        ]
    )
    assert stored_versions == _versions(registry) == {int(bootstrap.version), int(version)}


def _run(api, dag_id: str, shop_now: pd.Timestamp, timeout: float) -> str:
    """Trigger a run at the shop's clock, wait for it and return its id (failing with its task logs)."""
    when = pd.Timestamp(shop_now).to_pydatetime()
    started = time.monotonic()
    run = api.trigger(dag_id, logical_date=_unique(api, dag_id, when), conf={})
    done = api.wait_for_run(dag_id, run["dag_run_id"], timeout=timeout)
    assert done["state"] == "success", f"{dag_id} {run['dag_run_id']} {done['state']}:\n" + api.describe(
        dag_id, run["dag_run_id"]
    )
    _report(api, dag_id, run["dag_run_id"], time.monotonic() - started)
    return run["dag_run_id"]


def _report(api, dag_id: str, run_id: str, waited: float) -> None:
    """Print how long a run took and where its tasks spent the time (queued vs running)."""
    parts = []
    for ti in sorted(api.task_instances(dag_id, run_id), key=lambda t: t["start_date"] or ""):
        queued = ti.get("queued_when")
        wait = (pd.Timestamp(ti["start_date"]) - pd.Timestamp(queued)).total_seconds() if queued else 0.0
        name = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
        parts.append(f"{name} {ti['state']} queued {wait:.0f}s ran {ti['duration'] or 0:.0f}s")
    print(f"\n== {dag_id} {run_id}: {waited:.0f}s: " + "; ".join(parts), flush=True)


def _unique(api, dag_id: str, when):
    """The shop's time, moved on by a second per earlier run at that time (logical dates are unique)."""
    taken = {pd.Timestamp(r["logical_date"]) for r in api.dag_runs(dag_id) if r["logical_date"]}
    stamp = pd.Timestamp(when)
    while stamp in taken:
        stamp += pd.Timedelta(seconds=1)
    return stamp.to_pydatetime()


def _versions(registry) -> set[int]:
    return {int(v.version) for v in registry.search_model_versions(f"name='{MODEL_NAME}'")}
