"""What product owners and operators read: the loop summary and run history, as plain data."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from sqlalchemy import Engine, func, select

from mlpkg import mlflow_links, report_page
from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.feedback import campaign_metrics
from mlpkg.registry import (
    CHALLENGER,
    CHAMPION,
    NOTE_TAG,
    alias_version,
    ensure_experiment,
    global_attributions,
    make_client,
)

#: Features the reports list under "What drives the uplift".
TOP_DRIVERS = 5


def loop_summary(settings: Settings, campaign_id: str | None = None) -> dict:
    """Summarise the warehouse, registry and latest (or given) campaign in one dict (reads only).

    The campaign's HTML report is not (re)written here: ``report`` is its path when one exists.
    """
    engine = make_engine(settings.resolved_warehouse_url)
    out: dict = {}
    with session_scope(engine) as session:
        ingested = session.execute(
            select(m.IngestedFile.table_name, func.sum(m.IngestedFile.rows)).group_by(
                m.IngestedFile.table_name
            )
        ).all()
        out["ingested_rows"] = {t: int(n) for t, n in ingested}
        out["warehouse_rows"] = {k: v for k, v in q.table_counts(session).items() if v}
        rows = q.campaigns(session, limit=50)
        campaign = next((c for c in rows if c.campaign_id == campaign_id), rows[0] if rows else None)
        if campaign is not None:
            out["campaign"] = {
                "campaign_id": campaign.campaign_id,
                "status": campaign.status,
                "budget": campaign.budget,
                "committed": round(campaign.committed, 4),
                "model_version": campaign.model_version,
                "as_of": str(campaign.as_of),
                **{
                    k: v
                    for k, v in campaign.summary.items()
                    if k
                    in (
                        "population",
                        "treated",
                        "control_group",
                        "explored",
                        "expected_incremental_conversions",
                        "solver_gap",
                    )
                },
            }
            per = session.execute(
                select(m.Allocation.coupon_id, m.Allocation.channel, m.Allocation.policy, func.count())
                .where(m.Allocation.campaign_id == campaign.campaign_id, m.Allocation.coupon_id.is_not(None))
                .group_by(m.Allocation.coupon_id, m.Allocation.channel, m.Allocation.policy)
            ).all()
            out["allocated"] = [dict(coupon=c, channel=h, policy=p, customers=int(n)) for c, h, p, n in per]
            status = session.execute(
                select(m.Delivery.status, func.count())
                .where(m.Delivery.campaign_id == campaign.campaign_id)
                .group_by(m.Delivery.status)
            ).all()
            out["deliveries"] = {s: int(n) for s, n in status}
    client = make_client(settings.resolved_tracking_uri)
    name = settings.registered_model_name
    out["model"] = {
        "name": name,
        "champion": alias_version(client, name, CHAMPION),
        "challenger": alias_version(client, name, CHALLENGER),
    }
    if out["model"]["champion"]:
        mv = client.get_model_version(name, out["model"]["champion"])
        run = client.get_run(mv.run_id)
        out["model"]["run_id"] = mv.run_id
        out["model"]["metrics"] = {
            k: round(v, 5) for k, v in sorted(run.data.metrics.items()) if k.startswith(("val/", "test/"))
        }
        out["model"]["drivers"] = uplift_drivers(client, name, out["model"]["champion"])
    if campaign is not None:
        metrics = campaign_metrics(engine, campaign.campaign_id)
        if not metrics.empty:
            overall = metrics[metrics["breakdown"] == "overall"].set_index("breakdown_value")
            out["observed"] = {
                idx: {
                    k: row[k]
                    for k in (
                        "customers",
                        "delivered",
                        "ctr",
                        "redemption_rate",
                        "cvr",
                        "control_cvr",
                        "incremental_conversions",
                        "incremental_conversions_ci",
                        "expected_incremental_conversions",
                        "roi",
                    )
                    if k in row
                }
                for idx, row in overall.iterrows()
            }
        fairness = (campaign.summary or {}).get("fairness")
        if fairness:
            out["fairness"] = fairness
        if (campaign.summary or {}).get("fairness_constraints"):
            out["fairness_constraints"] = campaign.summary["fairness_constraints"]
    docs = settings.data_docs_dir / "index.html"
    out["data_docs"] = str(docs) if docs.exists() else None
    if campaign is not None:
        path = report_path(settings, campaign.campaign_id)
        out["report"] = str(path) if path else None
    return out


def history(settings: Settings, limit: int = 30) -> dict[str, list[dict]]:
    """Return recent campaigns, gate decisions, alias moves and retraining decisions (newest first).

    Rows hold full values (ISO times, whole reasons) so they serialise as JSON as they are; the CLI
    shortens them for a terminal.

    Args:
        settings: The product's settings (warehouse and MLflow registry).
        limit: Most rows per table.

    Returns:
        ``campaigns``, ``gate_decisions``, ``promotions`` and ``retrain_decisions``, each a list of dicts.
    """
    engine = make_engine(settings.resolved_warehouse_url)
    with session_scope(engine) as session:
        campaigns = [
            dict(
                campaign=row["campaign_id"],
                created=_iso(row["created_at"]),
                as_of=_iso(row["as_of"]),
                status=row["status"],
                objective=row["objective"],
                budget=row["budget"],
                spent=round(row["committed"], 2),
                model_version=row["model_version"],
                run_key=row["run_key"],
                sent=row["sent"],
            )
            for row in q.campaign_run_rows(session, limit=limit)
        ]
        promotions = [
            dict(
                when=_iso(p.created_at),
                model=p.model_name,
                alias=p.alias,
                version=p.version,
                previous=p.previous_version,
                actor=p.actor,
                reason=p.reason,
            )
            for p in q.promotion_history(session, limit=limit)
        ]
        decisions = [
            dict(
                when=_iso(d.decided_at),
                run_key=d.run_key,
                retrain=d.retrain,
                triggers=list(d.reasons.get("triggers", [])),
            )
            for d in q.retrain_decisions(session, limit=limit)
        ]
        trained = q.trained_versions(session, settings.registered_model_name)
    return {
        "campaigns": campaigns,
        "gate_decisions": gate_decisions(settings, limit=limit, trained=trained),
        "promotions": promotions,
        "retrain_decisions": decisions,
    }


def gate_decisions(
    settings: Settings, limit: int = 30, trained: dict[str, tuple] | None = None
) -> list[dict]:
    """Return every registered version (newest first) with the gate's outcome and reason.

    The outcome (``promoted``, ``kept`` or ``refused``) and its numbers are the version's ``gate.*``
    tags; a version registered without going through the gate says ``not gated``.

    Args:
        settings: The product's settings (MLflow registry).
        limit: Most versions to return.
        trained: ``version -> (trained_at, run_key)`` from the warehouse, when known.

    Returns:
        One dict per version: version, trained, outcome, champion, values, reason, run ids.
    """
    trained = trained or {}
    client = make_client(settings.resolved_tracking_uri)
    name = settings.registered_model_name
    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        versions = []
    rows = []
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True)[:limit]:
        tags = dict(mv.tags or {})
        trained_at, run_key = trained.get(str(mv.version), (None, None))
        if trained_at is None:
            trained_at = pd.Timestamp(mv.creation_timestamp, unit="ms", tz="UTC")
        rows.append(
            dict(
                version=str(mv.version),
                trained=_iso(trained_at),
                outcome=_gate_outcome(tags),
                champion=_tag(tags, "gate.champion_version"),
                challenger_value=_tag_float(tags, "gate.challenger_value"),
                champion_value=_tag_float(tags, "gate.champion_value"),
                reason=_tag(tags, "gate.reason") or "registered without the promotion gate",
                run_key=run_key,
                mlflow_run_id=mv.run_id,
            )
        )
    return rows


def _gate_outcome(tags: dict[str, str]) -> str:
    if tags.get("gate.outcome"):
        return tags["gate.outcome"]
    if "gate.promoted" not in tags:
        return "not gated"
    # Versions gated before the outcome tag existed: read it back from the decision's fields.
    if tags.get("gate.reason", "").startswith("guard failed"):
        return "refused"
    return "promoted" if tags["gate.promoted"] == "True" else "kept"


def _tag(tags: dict[str, str], key: str) -> str | None:
    value = tags.get(key)
    return None if value in (None, "", "None") else value


def _tag_float(tags: dict[str, str], key: str) -> float | None:
    value = _tag(tags, key)
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _iso(value) -> str | None:  # noqa: ANN001 - datetime, Timestamp or None
    return None if value is None else q.as_utc(value).isoformat()


def uplift_drivers(
    client: MlflowClient, model_name: str, version: str | None, top: int = TOP_DRIVERS
) -> dict | None:
    """Return what drives a model version's uplift, as its training run logged it (not recomputed).

    Returns:
        ``{"version", "run_id", "method", "rows", "features"}`` with the ``top`` features by mean
        |contribution| averaged over arms (each with ``mean_abs``, ``mean`` and ``direction``), or
        ``None`` when the version is unknown or was trained before global attributions existed.
    """
    if not version:
        return None
    try:
        run_id = client.get_model_version(model_name, str(version)).run_id
    except MlflowException:
        return None
    doc = global_attributions(client, run_id)
    if doc is None:
        return None
    keys = ("feature", "mean_abs", "mean", "direction")
    features = [{k: f.get(k) for k in keys} for f in doc["features"][:top]]
    return {"version": str(version), "run_id": run_id, "method": doc.get("method"), "rows": doc.get("rows"),
            "features": features}  # fmt: skip


def model_drivers(settings: Settings, version: str | None, model_name: str | None = None) -> dict | None:
    """Return :func:`uplift_drivers` of a version of ``model_name`` (default: the shop's model)."""
    client = make_client(settings.resolved_tracking_uri)
    return uplift_drivers(client, model_name or settings.registered_model_name, version)


def report_path(settings: Settings, campaign_id: str) -> Path | None:
    """Return the path of a campaign's HTML report if it was written, else None (writes nothing)."""
    path = settings.reports_dir / campaign_id / "index.html"
    return path if path.exists() else None


#: Measured numbers shown per overall group (``model_policy``, ``treated``) of a campaign.
_MEASURED = (
    "customers",
    "delivered",
    "cvr",
    "control_cvr",
    "incremental_conversions",
    "incremental_conversions_ci",
    "roi",
)


def campaign_detail(settings: Settings, campaign_id: str) -> dict:
    """Return one campaign's dates, budget, spend, model, sends, measured numbers and report path.

    Raises:
        LookupError: The warehouse holds no campaign ``campaign_id``.
    """
    engine = make_engine(settings.resolved_warehouse_url)
    with session_scope(engine) as session:
        campaign = q.get_campaign(session, campaign_id)
        if campaign is None:
            raise LookupError(f"unknown campaign id {campaign_id!r}")
        sent = q.campaign_sent_count(session, campaign_id)
        overall = q.overall_campaign_metrics(session, [campaign_id]).get(campaign_id, {})
        summary = dict(campaign.summary or {})
        detail = dict(
            campaign=campaign.campaign_id,
            status=campaign.status,
            objective=campaign.objective,
            created=_iso(campaign.created_at),
            as_of=_iso(campaign.as_of),
            budget=campaign.budget,
            spent=round(campaign.committed, 2),
            model_version=campaign.model_version,
            run_key=campaign.run_key,
            population=summary.get("population"),
            treated=summary.get("treated"),
            control_group=summary.get("control_group"),
            expected_incremental_conversions=summary.get("expected_incremental_conversions"),
            live_comparison=summary.get("live_comparison"),
            sent=sent,
        )
    detail["measured"] = {
        group: {k: values[k] for k in _MEASURED if k in values} for group, values in sorted(overall.items())
    }
    path = report_path(settings, campaign_id)
    detail["report"] = str(path) if path else None
    return detail


def frame(rows: list[dict]) -> pd.DataFrame:
    """Turn report rows into a DataFrame (for CSV export)."""
    return pd.DataFrame(rows)


def _bar_with_ci(ax, table: pd.DataFrame, title: str) -> None:  # noqa: ANN001 - a matplotlib Axes
    values = table["incremental_conversions"].astype(float).to_numpy()
    ci = pd.DataFrame(table["incremental_conversions_ci"].tolist(), columns=["lo", "hi"]).astype(float)
    err = [values - ci["lo"].to_numpy(), ci["hi"].to_numpy() - values]
    ax.bar(table["breakdown_value"].astype(str), values, yerr=err, capsize=3, color="#4C72B0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_title(title)
    ax.set_ylabel("incremental conversions (95% CI)")
    ax.tick_params(axis="x", rotation=45, labelsize=7)


def campaign_report(settings: Settings, campaign_id: str, *, log_to_mlflow: bool = True) -> Path:
    """Write the HTML report of one campaign (plots + tables) and log it to MLflow.

    Returns:
        The path of ``<state>/reports/<campaign_id>/index.html``.
    """
    import base64
    import io
    import json

    from matplotlib.figure import Figure

    engine = make_engine(settings.resolved_warehouse_url)
    metrics = campaign_metrics(engine, campaign_id)
    if metrics.empty:
        raise LookupError(
            f"campaign {campaign_id!r} has no measured metrics yet; run the feedback stage first"
        )
    with session_scope(engine) as session:
        campaign = q.get_campaign(session, campaign_id)
        budget, committed, summary = campaign.budget, campaign.committed, dict(campaign.summary)
        session.expunge(campaign)
    out_dir = settings.reports_dir / campaign_id
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    for breakdown in ("arm", "segment", "policy"):
        part = metrics[metrics["breakdown"] == breakdown]
        if part.empty:
            continue
        fig = Figure(figsize=(7, 3.2))
        _bar_with_ci(fig.subplots(), part, f"Incremental conversions by {breakdown} (vs control)")
        figures.append((f"lift_by_{breakdown}", fig))
    arms = metrics[metrics["breakdown"] == "arm"]
    if not arms.empty:
        fig = Figure(figsize=(7, 3.2))
        ax = fig.subplots()
        ax.bar(arms["breakdown_value"], arms["roi"].astype(float).fillna(0), color="#55A868")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_title("ROI by arm: (margin x incremental revenue - cost) / cost")
        ax.tick_params(axis="x", rotation=45, labelsize=7)
        figures.append(("roi_by_arm", fig))
    fig = Figure(figsize=(5, 2.4))
    ax = fig.subplots()
    ax.barh(["budget", "committed"], [budget, committed], color=["#CCCCCC", "#C44E52"])
    ax.set_title(f"Budget burn: {committed:,.2f} of {budget:,.2f} ({committed / budget:.0%})")
    figures.append(("budget_burn", fig))
    loop_file = settings.reports_dir / "closed_loop.json"
    if loop_file.exists():
        rounds = json.loads(loop_file.read_text())["rounds"]
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots()
        ax.plot(
            [r["round"] for r in rounds], [r["true_incremental"] for r in rounds], marker="o", label="policy"
        )
        ax.plot(
            [r["round"] for r in rounds],
            [r["oracle_incremental"] for r in rounds],
            marker="s",
            label="oracle",
        )
        ax.set_xlabel("round")
        ax.set_ylabel("true incremental conversions")
        ax.set_title("Round-over-round learning curve")
        ax.legend()
        figures.append(("learning_curve", fig))
    pngs = []
    for name, fig in figures:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        (out_dir / f"{name}.png").write_bytes(buf.getvalue())
        png = base64.b64encode(buf.getvalue()).decode()
        pngs.append({"title": fig.axes[0].get_title() or name, "png": png})
    with session_scope(engine) as session:
        sent = q.sent_breakdown(session, campaign_id)
        measured = q.measured_at(session, campaign_id)
    page = report_page.render(
        _report_context(settings, campaign, metrics, summary, sent, figures=pngs, measured=measured)
    )
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    if log_to_mlflow:
        _log_report(settings, engine, campaign_id, out_dir, metrics)
    return path


#: Readable names of the allocation policies (the ledger's ``policy`` column).
_POLICY_NAMES = {"model": "model policy", "explore": "exploration", "control": "random control"}


def _report_context(settings: Settings, campaign, metrics: pd.DataFrame, summary: dict,  # noqa: ANN001
                    sent: list[dict], *, figures: list[dict], measured=None) -> dict:  # noqa: ANN001
    """Gather what the report page shows, formatted for a reader (see :mod:`mlpkg.report_page`)."""
    cur, margin = settings.currency, settings.campaign.margin
    overall = metrics[metrics["breakdown"] == "overall"].set_index("breakdown_value")
    groups = {name: {k: v for k, v in row.items() if k not in ("campaign_id", "breakdown")}
              for name, row in overall.to_dict("index").items()}
    fair = groups.get("model_policy", {})
    treated = groups.get("treated", {})
    numbers = report_page.group_numbers(fair, margin) if fair else {}
    spend = report_page.group_numbers(treated, margin)["cost"] if treated else 0.0
    version = summary.get("model_version") or campaign.model_version
    model = f"{settings.registered_model_name} v{version}" if version else "none (cold start)"
    live = summary.get("live_comparison")
    if version and live:
        model += (
            f" with live challenger v{live['challenger_version']} on {live['challenger_share']:.0%} of the "
            f"model group ({live['disagreements']:,} customers the versions disagree on)"
        )
    url = mlflow_links.model_version_url(settings.mlflow_ui_url, settings.registered_model_name, version)
    lo, hi = report_page.interval_bounds(fair, "incremental_conversions")
    rlo, rhi = report_page.interval_bounds(fair, "incremental_revenue")

    def fmt_money(v: float) -> str:
        return report_page.money(v, cur)

    headline = {
        "incremental": report_page.count(fair.get("incremental_conversions"), 1),
        "incremental_ci": report_page.interval(lo, hi, lambda v: report_page.count(v, 1)),
        "revenue": fmt_money(fair.get("incremental_revenue")),
        "revenue_ci": report_page.interval(rlo, rhi, fmt_money),
        "profit": fmt_money(numbers.get("profit")),
        "profit_ci": report_page.interval(*numbers.get("profit_ci", (math.nan, math.nan)), fmt_money),
        "roi": report_page.pct(numbers.get("roi"), 0),
        "roi_ci": report_page.interval(*numbers.get("roi_ci", (math.nan, math.nan)),
                                       lambda v: report_page.pct(v, 0)),
        "spend": report_page.money(spend, cur, decimals=2),
        "budget": report_page.money(campaign.budget, cur, decimals=2),
        "burn": report_page.pct(spend / campaign.budget if campaign.budget else math.nan, 0),
        "committed": report_page.money(campaign.committed, cur, decimals=2),
        "sent": report_page.count(sum(int(r["sent"]) for r in sent)),
        "population": report_page.count(summary.get("population")),
        "control": report_page.count(summary.get("control_group")),
    }
    breakdowns = []
    for key, title in (("arm", "By coupon and channel"), ("segment", "By customer segment"),
                       ("policy", "By policy")):
        part = metrics[metrics["breakdown"] == key]
        if part.empty:
            continue
        rows = [(str(r["breakdown_value"]), {k: r[k] for k in part.columns}) for _, r in part.iterrows()]
        breakdowns.append({"title": title, **report_page.comparison_table(rows, margin, cur)})
    fairness = summary.get("fairness") or {}
    if fairness.get("by_attribute"):
        groups, disparity = fairness_rows(fairness, cur)
        breakdowns.append({"title": "Fairness: exposure and measured effect by group",
                           "columns": FAIRNESS_GROUP_COLUMNS, "rows": groups})
        breakdowns.append({"title": "Fairness: disparity ratios (lowest group / highest group; 1 = parity)",
                           "columns": FAIRNESS_DISPARITY_COLUMNS, "rows": disparity})
    bounds = summary.get("fairness_constraints") or []
    if bounds:
        breakdowns.append({
            "title": "Fairness: allocation bounds (model policy)",
            "columns": ["constraint", "reached", "price"],
            "rows": [[b["constraint"], report_page.pct(b.get("achieved")), f"{b.get('price', 0):.4g}"]
                     for b in bounds],
        })  # fmt: skip
    return {
        "c": {
            "campaign_id": campaign.campaign_id,
            "sent_on": pd.Timestamp(campaign.as_of).strftime("%Y-%m-%d"),
            "measured_on": pd.Timestamp(measured).strftime("%Y-%m-%d") if measured is not None else "–",
            "window_days": settings.campaign.attribution_window_days,
            "objective": campaign.objective,
            "model": model,
            "model_url": url,
            "margin": report_page.pct(margin, 0),
            "currency": cur,
        },
        "h": headline,
        "fair": report_page.comparison_table([("Model policy vs random control", fair)], margin, cur)
        if fair else {"columns": [], "rows": []},
        "biased": report_page.comparison_table([("All treated vs random control", treated)], margin, cur)
        if treated else None,
        "sent": [{"coupon": r["coupon_id"], "channel": r["channel"],
                  "policy": _POLICY_NAMES.get(r["policy"], r["policy"].replace("_", " ")),
                  "customers": report_page.count(r["customers"]), "sent": report_page.count(r["sent"])}
                 for r in sent],
        "breakdowns": breakdowns,
        "figures": figures,
        # What drives the uplift of the version that scored the campaign, as its training logged it.
        "drivers": report_page.driver_table(model_drivers(settings, version)),
    }


#: Description of the campaigns experiment in the MLflow UI.
CAMPAIGN_EXPERIMENT_DESCRIPTION = (
    "One run per CouponOps campaign, named after the campaign and its as-of date: tagged with the "
    "model name and version that scored it, that version's training run and the Airflow run that "
    "allocated it; metrics are the budget, the spend and the measured costs, revenue and "
    "incremental outcomes against the random control group (with 95% CI bounds); the report is "
    "under its report/ artifacts."
)
#: Measured numbers logged per overall group (``model_policy``, ``treated``) of a campaign.
_CAMPAIGN_METRICS = (
    "customers",
    "control_customers",
    "delivered",
    "coupon_cost",
    "send_cost",
    "revenue",
    "cvr",
    "control_cvr",
    "ctr",
    "roi",
    "incremental_conversions",
    "incremental_revenue",
)


def campaign_experiment(settings: Settings, client: MlflowClient | None = None) -> str:
    """Return the id of the campaigns experiment, created if missing and typed for model training."""
    client = client or make_client(settings.resolved_tracking_uri)
    return ensure_experiment(
        client,
        f"{settings.mlflow_experiment}-campaigns",
        artifact_location=f"{settings.resolved_artifact_root}/campaigns",
        description=CAMPAIGN_EXPERIMENT_DESCRIPTION,
    )


def _sig(value: float, digits: int = 4) -> float:
    # Four significant digits: money and counts read as the report shows them, not at 15 decimals.
    return float(f"{float(value):.{digits}g}")


def _campaign_numbers(overall: pd.DataFrame) -> dict[str, float]:
    out: dict[str, float] = {}
    for group in overall.index:
        row = overall.loc[group]
        values = {k: row[k] for k in _CAMPAIGN_METRICS if k in row.index}
        for key in ("incremental_conversions_ci", "incremental_revenue_ci"):
            bounds = row.get(key)
            if isinstance(bounds, list | tuple) and len(bounds) == 2:
                values[f"{key}_low"], values[f"{key}_high"] = bounds
        for key, value in values.items():
            if value is not None and pd.notna(value) and math.isfinite(float(value)):
                out[f"{group}/{key}"] = _sig(value)
    return out


def _log_report(
    settings: Settings, engine: Engine, campaign_id: str, out_dir: Path, metrics: pd.DataFrame
) -> str:
    """Log the report and the campaign's numbers and lineage as a run of the campaigns experiment.

    The run (one per campaign, found again by its ``campaign_id`` tag on re-measurement) is named
    ``campaign · <id> · <as-of date>`` and tagged with the model name and version that scored the
    campaign, that version's training run and the Airflow run that allocated it.

    Returns:
        The MLflow run id.
    """
    from mlflow.entities import Metric

    name = settings.registered_model_name
    with session_scope(engine) as session:
        campaign = q.get_campaign(session, campaign_id)
        version, run_key = campaign.model_version, campaign.run_key
        fairness = (campaign.summary or {}).get("fairness") or {}
        as_of, budget, spend, objective = (
            campaign.as_of,
            campaign.budget,
            campaign.committed,
            campaign.objective,
        )
        training_run = None
        if version is not None:
            training_run = session.execute(
                select(m.TrainingRun.mlflow_run_id)
                .where(m.TrainingRun.model_name == name, m.TrainingRun.model_version == version)
                .order_by(m.TrainingRun.trained_at.desc())
                .limit(1)
            ).scalar_one_or_none()
    client = make_client(settings.resolved_tracking_uri)
    if version is not None and training_run is None:
        # A version registered outside this warehouse (another store, by hand): MLflow knows its run.
        with contextlib.suppress(MlflowException):
            training_run = client.get_model_version(name, version).run_id
    day = pd.Timestamp(as_of).date().isoformat()
    tags = {
        "campaign_id": campaign_id,
        "campaign.as_of": pd.Timestamp(as_of).isoformat(),
        "campaign.objective": objective,
        "model.name": name,
        "model.version": version or "none (cold start)",
    }
    if training_run:
        tags["training.run_id"] = training_run
    if run_key:
        dag_id, _, airflow_run = run_key.partition("/")
        tags.update({"airflow.run_key": run_key, "airflow.dag_id": dag_id, "airflow.run_id": airflow_run})
    overall = metrics[metrics["breakdown"] == "overall"].set_index("breakdown_value")
    numbers = {"budget": _sig(budget), "spend": _sig(spend), **_campaign_numbers(overall)}
    numbers.update(fairness_mlflow_metrics(fairness))
    tags[NOTE_TAG] = _campaign_sentence(campaign_id, day, tags["model.version"], numbers)
    exp_id = campaign_experiment(settings, client)
    existing = client.search_runs(
        [exp_id], filter_string=f"tags.campaign_id = '{campaign_id}'", max_results=1
    )
    run_name = f"campaign · {campaign_id} · {day}"
    if existing:
        run_id = existing[0].info.run_id
        client.update_run(run_id, name=run_name)
    else:
        run_id = client.create_run(exp_id, run_name=run_name).info.run_id
    stamp = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, stamp, 0) for k, v in numbers.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    client.set_terminated(run_id)
    return run_id


def _campaign_sentence(campaign_id: str, day: str, version: str, numbers: dict[str, float]) -> str:
    text = (
        f"Campaign {campaign_id} as of {day}, model version {version}: spent {numbers['spend']:g} "
        f"of a {numbers['budget']:g} budget"
    )
    inc = numbers.get("model_policy/incremental_conversions")
    low = numbers.get("model_policy/incremental_conversions_ci_low")
    high = numbers.get("model_policy/incremental_conversions_ci_high")
    if inc is not None:
        text += f"; the model's policy brought {inc:+g} incremental conversions vs control"
        if low is not None and high is not None:
            text += f" (95% CI {low:g} to {high:g})"
    return text + "."


#: Column heads of the fairness tables (CLI and HTML page).
FAIRNESS_GROUP_COLUMNS = ["attribute", "group", "customers", "treated", "coupon value", "incr. rate (95% CI)"]
FAIRNESS_DISPARITY_COLUMNS = ["attribute", "metric", "min / max (95% CI)", "lowest", "highest"]
_FAIRNESS_METRICS = {"share_treated": "share treated", "coupon_value": "coupon value",
                     "incremental_rate": "incr. rate"}  # fmt: skip


def _ratio_text(value, ci) -> str:  # noqa: ANN001
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "—"
    if ci and None not in ci and all(np.isfinite(c) for c in ci):
        return f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"
    return f"{value:.2f}"


def fairness_rows(fairness: dict, currency: str) -> tuple[list[list[str]], list[list[str]]]:
    """Return the rows of the by-group table and of the disparity table of a measured campaign.

    ``fairness`` is the campaign summary's ``fairness`` block (:func:`mlpkg.feedback.measure_fairness`).
    """
    def pct(x) -> str:  # noqa: ANN001
        return "—" if x is None else f"{x:.1%}"

    def pp(x, ci) -> str:  # noqa: ANN001
        if x is None:
            return "—"
        text = f"{100 * x:+.1f} pp"
        if ci and None not in ci:
            text += f" ({100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})"
        return text

    groups, disparity = [], []
    for block in fairness.get("by_attribute", []):
        attr = block["attribute"]
        for g in block["groups"]:
            value = g.get("coupon_value")
            groups.append([attr, g["group"], f"{g['customers']:,}", pct(g.get("share_treated")),
                           "—" if value is None else f"{value:.2f} {currency}",
                           pp(g.get("incremental_rate"), g.get("incremental_rate_ci"))])  # fmt: skip
        for key, label in _FAIRNESS_METRICS.items():
            d = block["disparity"].get(key, {})
            disparity.append([attr, label, _ratio_text(d.get("ratio"), d.get("ci")),
                              str(d.get("min_group") or "—"), str(d.get("max_group") or "—")])  # fmt: skip
    return groups, disparity


def fairness_mlflow_metrics(fairness: dict) -> dict[str, float]:
    """Flatten the fairness block into MLflow metrics ``fairness/<attribute>/...`` (finite values only)."""
    out: dict[str, float] = {}

    def put(name: str, value) -> None:  # noqa: ANN001
        if isinstance(value, int | float) and np.isfinite(value):
            out[name] = _sig(value)

    for block in fairness.get("by_attribute", []):
        attr = _metric_key(block["attribute"])
        for key, d in block["disparity"].items():
            put(f"fairness/{attr}/{key}_disparity", d.get("ratio"))
            ci = d.get("ci") or [None, None]
            put(f"fairness/{attr}/{key}_disparity_ci_low", ci[0])
            put(f"fairness/{attr}/{key}_disparity_ci_high", ci[1])
        for g in block["groups"]:
            group = _metric_key(g["group"])
            for key in ("share_treated", "coupon_value", "incremental_rate"):
                put(f"fairness/{attr}/{group}/{key}", g.get(key))
    return out


def _metric_key(text: str) -> str:
    """Return ``text`` with only the characters MLflow allows in a metric name."""
    return re.sub(r"[^A-Za-z0-9_.\- ]", "_", str(text))
