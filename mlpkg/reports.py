"""What product owners and operators read: the loop summary and run history, as plain data."""

from __future__ import annotations

import pandas as pd
from sqlalchemy import func, select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope


def loop_summary(settings: Settings, campaign_id: str | None = None) -> dict:
    """Summarise the warehouse, registry and latest (or given) campaign in one dict."""
    from mlpkg.feedback import campaign_metrics
    from mlpkg.registry import CHALLENGER, CHAMPION, alias_version, make_client

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
