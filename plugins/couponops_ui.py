"""The CouponOps Airflow plugin: the Campaigns view in Airflow's navigation and links from tasks.

Registers, on Airflow's API server:

* the FastAPI app of :mod:`plugins.couponops_campaigns_app` under ``/couponops`` (authenticated
  with Airflow's own JWT, like the rest of the UI);
* a "Campaigns" entry in the navigation that shows its page inside the Airflow UI (at
  ``/plugin/campaigns``). Airflow 3.3 renders an entry without ``url_route`` as a button that does
  nothing when clicked (the browser tour found it), so the view is embedded. Airflow's frame is
  sandboxed without pop-ups: the MLflow links open in the frame (or from the page's own address,
  ``/couponops/campaigns``, in a tab of its own);
* extra links on the tasks that produce something elsewhere, read from the task's XCom return
  value: "MLflow run" on ``train_model``, "Model version" on ``gate_model`` and
  ``publish_champion``, "Campaign" on ``allocate``.

The plugin class does no work when Airflow loads it; the links read XCom only when the UI asks.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote, urlsplit

from airflow.plugins_manager import AirflowPlugin
from airflow.sdk import BaseOperatorLink

from plugins.couponops_campaigns_app import URL_PREFIX, mlflow_run_url, model_version_url
from plugins.couponops_campaigns_app import app as campaigns_app

TRAINING_DAGS = frozenset({"couponops_train", "couponops_retrain"})
ALLOCATION_DAGS = frozenset({"couponops_allocate"})


def task_return_value(ti_key: Any) -> Any:  # noqa: ANN401 - an XCom value
    """Return the XCom return value of one task instance from Airflow's metadata DB (``None`` if none).

    Extra links are resolved by the API server, which reads XCom from the metadata DB (as
    Airflow's own ``XComOperatorLink`` does); the value is parsed as plain JSON, never
    deserialised into classes.
    """
    from airflow.models.xcom import XComModel
    from airflow.utils.session import create_session

    with create_session() as session:
        row = session.execute(
            XComModel.get_many(
                key="return_value",
                run_id=ti_key.run_id,
                dag_ids=ti_key.dag_id,
                task_ids=ti_key.task_id,
                map_indexes=ti_key.map_index,
            ).with_only_columns(XComModel.value)
        ).first()
    if row is None or row.value is None:
        return None
    value = row.value
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    return value


def _mlflow_ui_url() -> str | None:
    from mlpkg.config import get_settings

    return get_settings().mlflow_ui_url


def _airflow_root() -> str:
    """Return the path Airflow's UI is served under (``[api] base_url``), without a trailing slash."""
    from airflow.configuration import conf

    return urlsplit(conf.get("api", "base_url", fallback="") or "").path.rstrip("/")


class MlflowRunLink(BaseOperatorLink):
    """The MLflow run a ``train_model`` task logged (its ``mlflow_run_id``)."""

    name = "MLflow run"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:  # noqa: ANN401
        """Return the run's MLflow UI page, or "" for other tasks and runs without a result."""
        if ti_key.dag_id not in TRAINING_DAGS or ti_key.task_id != "train_model":
            return ""
        value = task_return_value(ti_key)
        run_id = value.get("mlflow_run_id") if isinstance(value, dict) else None
        return mlflow_run_url(_mlflow_ui_url(), run_id) or ""


class ModelVersionLink(BaseOperatorLink):
    """The registered model version that ``gate_model`` judged and ``publish_champion`` published."""

    name = "Model version"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:  # noqa: ANN401
        """Return the version's MLflow UI page, or "" for other tasks and runs without a decision."""
        if ti_key.dag_id not in TRAINING_DAGS or ti_key.task_id not in ("gate_model", "publish_champion"):
            return ""
        value = task_return_value(ti_key)
        if not isinstance(value, dict):
            return ""
        version = value.get("challenger_version")
        return model_version_url(_mlflow_ui_url(), value.get("model_name"), version) or ""


class CampaignLink(BaseOperatorLink):
    """The campaign an ``allocate`` task wrote, in the Campaigns view."""

    name = "Campaign"

    def get_link(self, operator: Any, *, ti_key: Any) -> str:  # noqa: ANN401
        """Return the Campaigns page showing this campaign, or "" for other tasks or without a campaign."""
        if ti_key.dag_id not in ALLOCATION_DAGS or ti_key.task_id != "allocate":
            return ""
        campaign_id = task_return_value(ti_key)
        if not isinstance(campaign_id, str) or not campaign_id:
            return ""
        return f"{_airflow_root()}{URL_PREFIX}/campaigns?campaign={quote(campaign_id, safe='')}"


class CouponOpsPlugin(AirflowPlugin):
    """CouponOps in the Airflow UI: the Campaigns view and the links from tasks to what they produced."""

    name = "couponops"
    fastapi_apps = [{"app": campaigns_app, "url_prefix": URL_PREFIX, "name": "CouponOps campaigns"}]
    # No category: a top-level entry of the navigation. The href is relative to the UI's <base href>,
    # so the entry also works under an [api] base_url path; url_route embeds it (see the docstring).
    external_views = [
        {
            "name": "Campaigns",
            "href": f"{URL_PREFIX.lstrip('/')}/campaigns",
            "destination": "nav",
            "url_route": "campaigns",
        }
    ]
    # Global links are asked of every task; each answers only for its own tasks (UI hides empty links).
    global_operator_extra_links = [MlflowRunLink(), ModelVersionLink(), CampaignLink()]
