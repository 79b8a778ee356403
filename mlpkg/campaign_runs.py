"""The campaigns CouponOps ran, one plain row each: what was allocated, sent, spent and measured.

Read by the Airflow plugin's Campaigns view (``plugins/couponops_campaigns_app.py``) and usable
from anywhere else: everything comes from the warehouse and the state folder, nothing from
MLflow or Airflow, so the list renders even while those are down.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any

from mlpkg.config import Settings
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope

#: The ``dag_id`` of a run key written by the ``couponops`` CLI (``RunContext``'s default), not by Airflow.
CLI_DAG_ID = "cli"
#: The measured group whose numbers a campaign is judged by (the report's headline), and the one
#: holding every treated customer, whose costs are the campaign's realised spend.
HEADLINE_GROUP = "model_policy"
SPEND_GROUP = "treated"


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _iso(value: datetime | None) -> str | None:
    return None if value is None else q.as_utc(value).isoformat()


def split_run_key(run_key: str | None) -> tuple[str | None, str | None]:
    """Split a stage's run key (``<dag_id>/<run_id>``) into the Airflow DAG and run ids.

    Returns:
        ``(dag_id, run_id)``, or ``(None, None)`` for a run of the CLI or a key without a DAG.
    """
    if not run_key or "/" not in run_key:
        return None, None
    dag_id, run_id = run_key.split("/", 1)
    if dag_id == CLI_DAG_ID or not dag_id or not run_id:
        return None, None
    return dag_id, run_id


def batch_data_docs(data_docs_dir: Path, batch: str | None) -> list[dict[str, str]]:
    """Return the Data Docs validation page of each table of one batch (the newest run of each).

    Great Expectations writes them as ``validations/<suite path>/<batch>/<run time>/<page>.html``.
    The batch's offline summary (``summaries/<batch>.html``, which opens without a network)
    comes first, as table ``summary``.

    Returns:
        ``[{"table": ..., "path": ...}]`` sorted by table, paths relative to ``data_docs_dir``.
    """
    from mlpkg.validation.summary_page import SUMMARY_DIR

    root = data_docs_dir / "validations"
    summary = f"{SUMMARY_DIR}/{batch}.html"
    first = [{"table": "summary", "path": summary}] if batch and (data_docs_dir / summary).is_file() else []
    if not batch or not root.is_dir():
        return first
    newest: dict[str, tuple[str, str]] = {}
    for page in root.rglob("*.html"):
        parts = page.relative_to(data_docs_dir).parts
        if len(parts) < 5 or parts[-3] != batch:
            continue
        table, run_time = parts[-4], parts[-2]
        if table not in newest or run_time > newest[table][0]:
            newest[table] = (run_time, "/".join(parts))
    return first + [{"table": t, "path": newest[t][1]} for t in sorted(newest)]


def campaign_runs(settings: Settings, *, limit: int = 100) -> list[dict[str, Any]]:
    """Return the latest campaigns, newest first, as plain JSON-ready dicts.

    Each row holds the campaign's id, status, creation time and ``as_of``; the Airflow DAG and run
    that allocated it (``None`` for the CLI); the model name, version, the aliases that version
    holds now and the MLflow run that trained it; the budget, the committed (expected) spend, the
    realised cost of every treated customer (coupons redeemed + messages sent) and the messages
    sent; the measured incremental conversions of the model policy against the random control
    group with their 95% interval, ROI and whether the numbers are ``provisional`` (the
    attribution window is still open; ``None`` before any measurement); the report's path under
    the reports folder and the shop batch the campaign saw with its Data Docs pages.

    Args:
        settings: Where the warehouse and the state folder are.
        limit: The most campaigns to return.
    """
    model_name = settings.registered_model_name
    engine = make_engine(settings.resolved_warehouse_url)
    try:
        with session_scope(engine) as session:
            campaigns = q.campaign_run_rows(session, limit=limit)
            ids = [c["campaign_id"] for c in campaigns]
            measured = q.overall_campaign_metrics(session, ids)
            aliases = q.current_aliases(session)
            versions = [c["model_version"] for c in campaigns]
            trained_by = q.training_runs_of_versions(session, model_name, versions)
            batches = {
                c["campaign_id"]: q.batch_as_of(session, as_of=c["as_of"], loaded_by=c["created_at"])
                for c in campaigns
            }
    finally:
        engine.dispose()
    rows = []
    for c in campaigns:
        cid, version = c["campaign_id"], c["model_version"]
        dag_id, run_id = split_run_key(c["run_key"])
        groups = measured.get(cid, {})
        headline, spend = groups.get(HEADLINE_GROUP), groups.get(SPEND_GROUP)
        ci = (headline or {}).get("incremental_conversions_ci") or [None, None]
        report = settings.reports_dir / cid / "index.html"
        rows.append(
            {
                "campaign_id": cid,
                "status": c["status"],
                "created_at": _iso(c["created_at"]),
                "as_of": _iso(c["as_of"]),
                "objective": c["objective"],
                "dag_id": dag_id,
                "run_id": run_id,
                "run_key": c["run_key"],
                "model_name": model_name if version else None,
                "model_version": version,
                "aliases": sorted(a for (n, a), v in aliases.items() if n == model_name and v == version),
                "mlflow_run_id": trained_by.get(version) if version else None,
                "budget": float(c["budget"]),
                "committed": round(float(c["committed"]), 4),
                "realised_cost": (
                    round(float(spend.get("coupon_cost", 0.0)) + float(spend.get("send_cost", 0.0)), 4)
                    if spend
                    else None
                ),
                "sent": c["sent"],
                "incremental_conversions": _finite((headline or {}).get("incremental_conversions")),
                "incremental_conversions_ci": [_finite(ci[0]), _finite(ci[1])],
                "roi": _finite((headline or {}).get("roi")),
                "provisional": bool(headline.get("provisional")) if headline else None,
                "report_path": f"{cid}/index.html" if report.is_file() else None,
                "batch": batches[cid],
                "data_docs": batch_data_docs(settings.data_docs_dir, batches[cid]),
            }
        )
    return rows
