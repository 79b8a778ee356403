"""The CouponOps Airflow plugin: it loads, registers the Campaigns app, view and links, and serves them.

The FastAPI app runs in-process with FastAPI's TestClient, mounted the way Airflow's API server
mounts plugin apps, over a small warehouse with one allocated, delivered and measured campaign;
requests carry a real JWT of Airflow's simple auth manager.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pandas as pd
import pytest

pytestmark = pytest.mark.dags

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = ROOT / ".venv" / "bin" / "airflow"


def test_airflow_plugins_cli_lists_the_app_the_view_and_the_links(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "COUPONOPS_"))}
    env.update(
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__CORE__PLUGINS_FOLDER=str(ROOT / "plugins"),
        AIRFLOW__CORE__DAGS_FOLDER=str(ROOT / "dags"),
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
    )
    proc = subprocess.run(
        [str(AIRFLOW), "plugins", "-o", "json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert "couponops" in plugins, proc.stdout
    plugin = plugins["couponops"]
    assert plugin["source"] == "$PLUGINS_FOLDER/couponops_ui.py"
    assert [(a["name"], a["url_prefix"]) for a in plugin["fastapi_apps"]] == [
        ("CouponOps campaigns", "/couponops")
    ]
    assert [(v["name"], v["href"], v["destination"], v["url_route"]) for v in plugin["external_views"]] == [
        ("Campaigns", "couponops/campaigns", "nav", "campaigns")
    ]
    links = plugin["global_operator_extra_links"]
    assert len(links) == 3
    assert all(n in " ".join(links) for n in ("MlflowRunLink", "ModelVersionLink", "CampaignLink"))


def test_plugins_manager_loads_the_plugin_without_import_errors():
    from airflow import plugins_manager

    plugins, errors = plugins_manager._get_plugins()
    assert not {path: e for path, e in errors.items() if "couponops" in path}, errors
    names = {p.name for p in plugins}
    assert "couponops" in names
    link_names = {link.name for link in plugins_manager.get_global_operator_extra_links()}
    assert {"MLflow run", "Model version", "Campaign"} <= link_names


# --- the Campaigns app ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def campaign(ingested_template, tmp_path_factory):
    """One campaign allocated by an Airflow run, delivered, answered, measured and reported."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield _campaign(ingested_template, tmp_path_factory.mktemp("campaigns") / "state", monkeypatch)


def _campaign(template: Path, state: Path, monkeypatch):
    import shutil

    from mlpkg import stages
    from mlpkg.allocation.campaign import allocate_campaign
    from mlpkg.config import get_settings
    from mlpkg.db import models as m
    from mlpkg.db import queries as q
    from mlpkg.db.engine import make_engine, session_scope
    from mlpkg.reports import campaign_report
    from mlpkg.simulator.lab import harness
    from tests.conftest import _small_settings
    from tests.fixtures import use_oracle

    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key)
    shutil.copytree(template, state)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(state))
    get_settings.cache_clear()
    settings = _small_settings(state)
    engine = make_engine(settings.resolved_warehouse_url)
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    now = shop.now.to_pydatetime()
    with session_scope(engine) as session:
        # The ingested batch as the landing zone records it (exported at the shop's clock).
        q.record_landed_drop(
            session, kind="batches", drop_id="initial", url="file:///zone/batches/initial",
            exported_at=now, status="loaded", detail={}, now=now,
        )
        # The champion's training run and alias move, as training and the gate record them.
        session.add(
            m.TrainingRun(
                mlflow_run_id="a1b2c3", model_name=settings.registered_model_name, model_version="3",
                trained_at=now, n_rows=300, labelled_rows_seen=300, snapshot_id="s1",
                run_key="couponops_train/manual__1",
            )
        )
        q.record_promotion(
            session, model_name=settings.registered_model_name, alias="champion", version="3",
            previous_version=None, actor="gate", reason="first champion", details={}, now=now,
        )
    run_id = "scheduled__2025-06-30T06:00:00+00:00"
    allocate_campaign(
        engine, settings, campaign_id="cmp-20250630", as_of=now, run_key=f"couponops_allocate/{run_id}",
        model_uri="oracle", model_version="3", now=now, budget=80.0, objective="conversions",
    )
    stages.deliver(settings, "cmp-20250630", now=now)
    batch = harness.simulate_responses(settings, "cmp-20250630")
    later = now + pd.Timedelta(days=8)
    stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
    overall = stages.measure(settings, "cmp-20250630", now=later)
    campaign_report(settings, "cmp-20250630", log_to_mlflow=False)
    engine.dispose()
    return settings, run_id, overall


@pytest.fixture(scope="module")
def airflow_db():
    """Airflow's metadata DB (SQLite under the session's AIRFLOW_HOME): tokens and XCom live there."""
    from airflow.utils import db

    db.initdb()


@pytest.fixture(scope="module")
def jwt_token(airflow_db):
    """A real token of Airflow's simple auth manager (the kind the UI keeps in its cookie)."""
    from airflow.api_fastapi.app import init_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = init_auth_manager()
    return manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))


@pytest.fixture
def client(campaign, jwt_token):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from plugins.couponops_campaigns_app import URL_PREFIX, create_app

    settings = campaign[0]
    root = FastAPI()  # Airflow's API server mounts plugin apps the same way
    root.mount(URL_PREFIX, create_app(lambda: settings))
    with TestClient(root) as c:
        c.headers["Authorization"] = f"Bearer {jwt_token}"
        yield c


def test_campaign_row_carries_its_numbers_and_links(client, campaign):
    settings, run_id, overall = campaign
    body = client.get("/couponops/api/campaigns").json()
    assert body["total_entries"] == 1
    row = body["campaigns"][0]
    assert row["campaign_id"] == "cmp-20250630"
    assert (row["dag_id"], row["run_id"]) == ("couponops_allocate", run_id)
    assert (row["model_version"], row["aliases"], row["mlflow_run_id"]) == ("3", ["champion"], "a1b2c3")
    assert row["budget"] == 80.0 and 0 < row["committed"] <= 80.0
    assert row["sent"] > 0 and row["status"] == "measured" and row["provisional"] is False
    assert row["incremental_conversions"] == pytest.approx(overall["incremental_conversions"])
    # The view shows the stored measurement's interval, not one of its own.
    assert row["incremental_conversions_ci"] == pytest.approx(overall["incremental_conversions_ci"])
    assert row["realised_cost"] > 0
    links = row["links"]
    quoted_run = "scheduled__2025-06-30T06%3A00%3A00%2B00%3A00"
    assert links["airflow_run"] == f"/dags/couponops_allocate/runs/{quoted_run}"
    assert links["mlflow_run"] == "http://127.0.0.1:5000/#/runs/a1b2c3?workflowType=machine_learning"
    assert links["model_version"] == (
        "http://127.0.0.1:5000/#/models/couponops-uplift/versions/3?workflowType=machine_learning"
    )
    assert links["report"] == "/couponops/files/reports/cmp-20250630/index.html"
    assert row["batch"] == "initial"
    tables = {d["table"] for d in links["data_docs"]}
    assert {"customers", "orders", "campaign_log"} <= tables


def test_page_lists_the_campaign_and_every_link_it_serves_answers(client):
    page = client.get("/couponops/campaigns")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert "cmp-20250630" in html and "@champion" in html and "couponops-uplift v3" in html
    # Nothing from elsewhere: the one script is the app's own, served beside the page.
    scripts = re.findall(r"<script[^>]*>", html)
    assert scripts == ['<script src="/couponops/static/links.js">'], scripts
    assert "http://cdn" not in html and "https://" not in html
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/couponops/static/links.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "window.top" in js.text
    row = client.get("/couponops/api/campaigns").json()["campaigns"][0]
    own = [row["links"]["report"], *(d["href"] for d in row["links"]["data_docs"])]
    for href in own:
        assert f'href="{href}"' in html
        served = client.get(href)
        assert served.status_code == 200, href
    assert "Campaign cmp-20250630" in client.get(row["links"]["report"]).text
    assert f'href="{row["links"]["airflow_run"]}"' in html


def test_campaign_filter_shows_one_campaign(client):
    assert "cmp-20250630" in client.get("/couponops/campaigns", params={"campaign": "cmp-20250630"}).text
    other = client.get("/couponops/api/campaigns", params={"campaign": "cmp-19990101"}).json()
    assert other == {"campaigns": [], "total_entries": 0}


def test_unknown_files_and_path_traversal_are_refused(client, campaign):
    settings = campaign[0]
    secret = settings.state_dir / "secret.txt"
    secret.write_text("warehouse password")
    for path in (
        "/couponops/files/reports/cmp-19990101/index.html",
        "/couponops/files/reports/%2e%2e/secret.txt",
        "/couponops/files/reports/..%2Fsecret.txt",
        "/couponops/files/data_docs/%2e%2e/%2e%2e/secret.txt",
        "/couponops/files/data_docs/_validation_results/.ge_store_backend_id",
        "/couponops/files/state/secret.txt",
        "/couponops/files/reports/%2Fetc%2Fpasswd",
    ):
        response = client.get(path)
        assert response.status_code == 404, path
        assert "warehouse password" not in response.text
    (settings.reports_dir / "escape").symlink_to(settings.state_dir)
    assert client.get("/couponops/files/reports/escape/secret.txt").status_code == 404


def test_requests_without_a_valid_airflow_token_are_refused(client):
    for path in ("/couponops/campaigns", "/couponops/api/campaigns", "/couponops/files/reports/x"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 401
        assert client.get(path, headers={"Authorization": "Bearer not-a-jwt"}).status_code in (401, 403)


def test_the_ui_session_cookie_authenticates(client, jwt_token):
    client.headers.pop("Authorization")
    client.cookies.set("_token", jwt_token)
    assert client.get("/couponops/api/campaigns").status_code == 200


# --- the extra links -----------------------------------------------------------------------------------


def _task_result(dag_id: str, task_id: str, run_id: str, value) -> None:
    """Store a finished task's return value in the metadata DB, as a real run leaves it."""
    import uuid

    import pendulum
    from airflow.models.dag import DagModel
    from airflow.models.dagbundle import DagBundleModel
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    now = pendulum.now("UTC")
    with create_session() as session:
        if session.get(DagBundleModel, "dags-folder") is None:
            session.add(DagBundleModel(name="dags-folder"))
            session.flush()
        session.merge(DagModel(dag_id=dag_id, bundle_name="dags-folder"))
        session.flush()
        session.add(
            DagRun(
                dag_id=dag_id, run_id=run_id, run_type="manual", logical_date=now, run_after=now,
                state="success",
            )
        )
        session.flush()
        session.execute(
            TaskInstance.__table__.insert().values(
                id=uuid.uuid4(), dag_id=dag_id, task_id=task_id, run_id=run_id, map_index=-1,
                try_number=1, pool="default_pool", pool_slots=1, state="success",
            )
        )
        XComModel.set(
            key="return_value", value=value, dag_id=dag_id, task_id=task_id, run_id=run_id, session=session
        )


def test_extra_links_read_the_task_return_value(airflow_db):
    from airflow.models.taskinstancekey import TaskInstanceKey

    from plugins.couponops_ui import CampaignLink, MlflowRunLink, ModelVersionLink

    def key(dag_id, task_id, run_id):
        return TaskInstanceKey(dag_id=dag_id, task_id=task_id, run_id=run_id, try_number=1)

    trained = {"mlflow_run_id": "r42", "model_version": "7"}
    _task_result("couponops_train", "train_model", "manual__l1", trained)
    _task_result(
        "couponops_retrain", "gate_model", "manual__l1",
        {"model_name": "couponops-uplift", "challenger_version": "7", "promoted": True},
    )
    _task_result("couponops_allocate", "allocate", "manual__l1", "cmp-20250707")
    assert MlflowRunLink().get_link(None, ti_key=key("couponops_train", "train_model", "manual__l1")) == (
        "http://127.0.0.1:5000/#/runs/r42?workflowType=machine_learning"
    )
    assert ModelVersionLink().get_link(None, ti_key=key("couponops_retrain", "gate_model", "manual__l1")) == (
        "http://127.0.0.1:5000/#/models/couponops-uplift/versions/7?workflowType=machine_learning"
    )
    assert CampaignLink().get_link(None, ti_key=key("couponops_allocate", "allocate", "manual__l1")) == (
        "/couponops/campaigns?campaign=cmp-20250707"
    )
    # A run whose task left no result, and other tasks, get no link (the UI then shows none).
    assert MlflowRunLink().get_link(None, ti_key=key("couponops_train", "train_model", "manual__none")) == ""
    other = key("couponops_ingest", "validate_and_load", "manual__l1")
    for link in (MlflowRunLink(), ModelVersionLink(), CampaignLink()):
        assert link.get_link(None, ti_key=other) == ""
