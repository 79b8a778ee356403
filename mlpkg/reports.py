"""What product owners and operators read: the loop summary and run history, as plain data."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from sqlalchemy import func, select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.feedback import campaign_metrics
from mlpkg.registry import CHALLENGER, CHAMPION, alias_version, make_client


def loop_summary(settings: Settings, campaign_id: str | None = None) -> dict:
    """Summarise the warehouse, registry and latest (or given) campaign in one dict."""
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
                    )
                    if k in row
                }
                for idx, row in overall.iterrows()
            }
    docs = settings.data_docs_dir / "index.html"
    out["data_docs"] = str(docs) if docs.exists() else None
    return out


def history(settings: Settings, limit: int = 30) -> dict[str, list[dict]]:
    """Return recent alias moves, campaigns and retraining decisions (newest first)."""
    engine = make_engine(settings.resolved_warehouse_url)
    with session_scope(engine) as session:
        promotions = [
            dict(
                when=str(p.created_at),
                model=p.model_name,
                alias=p.alias,
                version=p.version,
                previous=p.previous_version,
                actor=p.actor,
                reason=p.reason,
            )
            for p in q.promotion_history(session, limit=limit)
        ]
        campaigns = [
            dict(
                campaign=c.campaign_id,
                created=str(c.created_at),
                status=c.status,
                budget=c.budget,
                committed=round(c.committed, 2),
                model_version=c.model_version,
            )
            for c in q.campaigns(session, limit=limit)
        ]
        decisions = [
            dict(
                when=str(d.decided_at),
                run=d.run_key,
                retrain=d.retrain,
                triggers="; ".join(d.reasons.get("triggers", [])),
            )
            for d in session.execute(
                select(m.RetrainDecision).order_by(m.RetrainDecision.id.desc()).limit(limit)
            ).scalars()
        ]
    return {"promotions": promotions, "campaigns": campaigns, "retrain_decisions": decisions}


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
    html = [
        f"<html><head><meta charset='utf-8'><title>CouponOps campaign {campaign_id}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>",
        f"<h1>Campaign {campaign_id}</h1>",
        f"<p>Model version {summary.get('model_version')}, objective {summary.get('objective')}, "
        f"{summary.get('treated')} of {summary.get('population')} customers treated, "
        f"{summary.get('control_group')} in the random control group.</p>",
    ]
    for name, fig in figures:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        (out_dir / f"{name}.png").write_bytes(buf.getvalue())
        html.append(
            f"<h2>{name.replace('_', ' ')}</h2><img src='data:image/png;base64,"
            f"{base64.b64encode(buf.getvalue()).decode()}'/>"
        )
    shown = metrics.drop(columns=["campaign_id"]).round(4)
    html.append("<h2>All measurements</h2>" + shown.to_html(index=False))
    html.append("</body></html>")
    path = out_dir / "index.html"
    path.write_text("\n".join(html))
    if log_to_mlflow:
        _log_report(settings, campaign_id, out_dir, metrics)
    return path


def _log_report(settings: Settings, campaign_id: str, out_dir: Path, metrics: pd.DataFrame) -> None:
    """Log the report folder and headline numbers as an MLflow run of the campaigns experiment."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri=settings.resolved_tracking_uri)
    name = f"{settings.mlflow_experiment}-campaigns"
    exp = client.get_experiment_by_name(name)
    exp_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(name, artifact_location=f"{settings.resolved_artifact_root}/campaigns")
    )
    existing = client.search_runs(
        [exp_id], filter_string=f"tags.campaign_id = '{campaign_id}'", max_results=1
    )
    run_id = (
        existing[0].info.run_id
        if existing
        else client.create_run(
            exp_id, run_name=f"campaign-{campaign_id}", tags={"campaign_id": campaign_id}
        ).info.run_id
    )
    overall = metrics[metrics["breakdown"] == "overall"].set_index("breakdown_value")
    stamp = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
    batch = [
        Metric(f"{group}/{key}", float(overall.loc[group, key]), stamp, 0)
        for group in overall.index
        for key in ("incremental_conversions", "cvr", "control_cvr", "ctr", "roi")
        if key in overall.columns and pd.notna(overall.loc[group, key])
    ]
    client.log_batch(run_id, metrics=batch)
    client.log_artifacts(run_id, str(out_dir), artifact_path="report")
    client.set_terminated(run_id)
