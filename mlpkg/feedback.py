"""Feedback: attribute customer responses to a campaign, measure incrementality, decide retraining.

Attribution rule (documented for product owners):

* A campaign's population is every customer in its ledger, including the random control group.
* Responses count when they happen in ``[sent_at, sent_at + attribution_window_days)``.
* A customer converts when they place any order in the window; revenue is the sum of those
  orders. Control customers' orders are counted the same way: they are the baseline.
* A redemption always credits the coupon it redeems (one coupon per customer per campaign, so
  the last delivered touch and the redeemed coupon coincide).
* Attribution is recomputed from all stored events each time, so late and out-of-order events
  only ever refine the numbers, and replaying a feedback file (same event ids) changes nothing.

Incrementality compares randomized groups only: the model-policy group (everyone the optimiser
was free to target, treated or not) against the control group; the customers the model targeted
against the control customers it *would* have targeted (``model_arm``, breakdown
``model_targeted``); and per arm the customers the model gave that arm against control customers
the model would have given it.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd
from sqlalchemy import Engine, func, select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.evaluation.fairness import group_fairness
from mlpkg.evaluation.incrementality import incremental_lift, incremental_mean, psi

CONTROL = "control"


def campaign_time(
    campaign: m.Campaign, wall: datetime, first_send: datetime, *, data_clock: bool = False
) -> pd.Timestamp:
    """Map the wall-clock time of one of a campaign's sends onto the campaign's own clock.

    The campaign's first send happens at ``as_of`` (the time its data describes) and every later
    send as much later as it was on the wall clock (retries, rate limits): a message re-sent two
    days late opens its customer's window two days late. Both ends of that difference come from
    the same clock, so it holds whatever clock the caller's ``now`` values were on. With the data
    clock (a simulated shop whose days pass in seconds) the product knows no time finer than its
    data's, so every send of the campaign happens at ``as_of``.
    """
    as_of = q.as_utc(campaign.as_of)
    if data_clock:
        return as_of
    return as_of + max(q.as_utc(wall) - q.as_utc(first_send), pd.Timedelta(0))


def window_starts(
    campaign: m.Campaign, customers: pd.Series, sends: pd.DataFrame, *, data_clock: bool = False
) -> pd.Series:
    """Return each customer's attribution-window start: their send time, in campaign time.

    Customers who were not sent anything (the random control group, untargeted customers, failed
    sends) start at the campaign's first send, so treated and control windows cover the same days.
    """
    ids = pd.Index(customers.unique(), name="customer_id")
    out = pd.Series(q.as_utc(campaign.as_of), index=ids, dtype=object)
    if len(sends):
        first_send = pd.to_datetime(sends["sent_at"], utc=True).min()
        sent = (
            sends.groupby("customer_id")["sent_at"]
            .min()
            .map(lambda ts: campaign_time(campaign, ts, first_send, data_clock=data_clock))
        )
        common = sent.index.intersection(ids)
        out.loc[common] = sent.loc[common]
    return pd.to_datetime(out, utc=True)


def attribute_campaign(
    engine: Engine, campaign_id: str, window_days: int, *, data_clock: bool = False
) -> pd.DataFrame:
    """Return one attributed row per customer of the campaign's population.

    Each customer's window starts at their own send (see :func:`window_starts`).
    """
    with engine.connect() as conn:
        campaign = conn.execute(select(m.Campaign).where(m.Campaign.campaign_id == campaign_id)).first()
        if campaign is None:
            raise LookupError(f"campaign {campaign_id!r} is not in the warehouse table campaigns")
        ledger = pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == campaign_id), conn)
        events = pd.read_sql(select(m.FeedbackEvent).where(m.FeedbackEvent.campaign_id == campaign_id), conn)
        sends = pd.read_sql(
            select(m.Delivery.customer_id, m.Delivery.sent_at).where(
                m.Delivery.campaign_id == campaign_id, m.Delivery.status == "sent"
            ),
            conn,
        )
        segments = pd.read_sql(select(m.Customer.customer_id, m.Customer.segment), conn)
        coupons = pd.read_sql(select(m.Coupon.coupon_id, m.Coupon.kind, m.Coupon.face_value), conn)
        channels = pd.read_sql(select(m.Channel.channel, m.Channel.send_cost), conn)
    events["ts"] = pd.to_datetime(events["ts"], utc=True)
    # Only this campaign's events count: orders another campaign's feedback reports are its own.
    orders = events[events["event_type"] == "order"]
    start = window_starts(campaign, ledger["customer_id"], sends, data_clock=data_clock)
    window = pd.Timedelta(days=window_days)

    def _in_window(frame: pd.DataFrame) -> pd.DataFrame:
        begins = frame["customer_id"].map(start)
        return frame[(frame["ts"] >= begins) & (frame["ts"] < begins + window)]

    in_window = _in_window(orders).drop_duplicates("order_id")
    conv = in_window.groupby("customer_id").agg(converted=("order_id", "size"), revenue=("revenue", "sum"))
    ev = _in_window(events)
    flags = (
        ev.assign(one=1).pivot_table(index="customer_id", columns="event_type", values="one", aggfunc="max")
        if len(ev)
        else pd.DataFrame()
    )
    out = ledger.merge(segments, on="customer_id", how="left")
    out = out.merge(conv, left_on="customer_id", right_index=True, how="left")
    for col in ("delivered", "open", "click", "redeem"):
        src = flags[col] if col in getattr(flags, "columns", []) else pd.Series(dtype=float)
        out[col] = out["customer_id"].map(src).fillna(0).astype(int)
    out["converted"] = (out["converted"].fillna(0) > 0).astype(int)
    out["revenue"] = out["revenue"].fillna(0.0).astype(float)
    # Redemptions credit their coupon; the coupon cost depends on the redeemed order's value.
    redeems = ev[ev["event_type"] == "redeem"][["customer_id", "order_id", "coupon_id"]]
    redeems = redeems.merge(in_window[["order_id", "revenue"]], on="order_id", how="left").merge(
        coupons, on="coupon_id", how="left"
    )
    redeems["coupon_cost"] = np.where(
        redeems["kind"] == "percent_off",
        redeems["face_value"] / 100.0 * redeems["revenue"].fillna(0),
        redeems["face_value"],
    )
    out["coupon_cost"] = (
        out["customer_id"].map(redeems.groupby("customer_id")["coupon_cost"].sum()).fillna(0.0)
    )
    # Every message sent costs its channel's send cost, whatever the customer did with it; a message
    # never sent (no contact, bounced) costs nothing.
    was_sent = out["customer_id"].isin(set(sends["customer_id"]))
    channel_send = out["channel"].map(channels.set_index("channel")["send_cost"]).fillna(0.0)
    out["send_cost"] = channel_send.where(was_sent, 0.0)
    # What the allocation expected the coupon to cost (its expected spend less the send cost).
    out["expected_coupon_cost"] = (out["expected_cost"].astype(float) - channel_send).clip(lower=0.0)
    return out


def coupon_cost_outcomes(treated: pd.DataFrame) -> dict[str, dict]:
    """Per coupon: the treated rows, their redemptions, the realised and the expected coupon cost.

    The allocation's cost calibration (:mod:`mlpkg.allocation.cost_calibration`) compares the
    two over recent campaigns.
    """
    rows = treated[treated["coupon_id"].notna()]
    out = {}
    for coupon, part in rows.groupby("coupon_id"):
        out[str(coupon)] = {
            "rows": int(len(part)),
            "redemptions": int(part["redeem"].sum()),
            "realised": round(float(part["coupon_cost"].sum()), 4),
            "expected": round(float(part["expected_coupon_cost"].sum()), 4),
        }
    return out


def _group_metrics(treated: pd.DataFrame, control: pd.DataFrame, margin: float) -> dict:
    delivered = int(treated["delivered"].sum())
    cost = float(treated["coupon_cost"].sum() + treated["send_cost"].sum())
    lift = incremental_lift(
        int(treated["converted"].sum()), len(treated), int(control["converted"].sum()), len(control)
    )
    rev = incremental_mean(treated["revenue"].to_numpy(float), control["revenue"].to_numpy(float))
    inc_rev = rev["incremental_total"] if len(treated) and len(control) else float("nan")
    return {
        "customers": int(len(treated)),
        "control_customers": int(len(control)),
        "delivered": delivered,
        "ctr": float(treated["click"].sum() / delivered) if delivered else 0.0,
        "redemption_rate": float(treated["redeem"].sum() / delivered) if delivered else 0.0,
        "cvr": float(treated["converted"].mean()) if len(treated) else 0.0,
        "control_cvr": float(control["converted"].mean()) if len(control) else float("nan"),
        "revenue": float(treated["revenue"].sum()),
        "coupon_cost": float(treated["coupon_cost"].sum()),
        "send_cost": float(treated["send_cost"].sum()),
        "roi": float((margin * inc_rev - cost) / cost) if cost > 0 and np.isfinite(inc_rev) else float("nan"),
        "incremental_conversions": float(lift["incremental_conversions"]),
        "incremental_conversions_ci": [float(lift["incremental_ci_low"]), float(lift["incremental_ci_high"])],
        "incremental_revenue": float(inc_rev),
        "incremental_revenue_ci": [
            float(rev["incremental_total_ci_low"]),
            float(rev["incremental_total_ci_high"]),
        ],
        "expected_incremental_conversions": float(treated["expected_uplift"].sum()),
    }


def measure_campaign(
    engine: Engine, settings: Settings, campaign_id: str, *, now: datetime, final: bool = True
) -> dict:
    """Attribute and measure a campaign, store the metrics, and (when final) turn it into a training log.

    Args:
        engine: The warehouse.
        settings: CouponOps settings (attribution window, margin).
        campaign_id: The campaign to measure.
        now: When the measurement is made (stored with the metrics).
        final: False while the attribution window is still open: the metrics are stored marked
            ``provisional`` and neither the campaign's status nor its training log is written.

    Returns:
        The overall metrics (model-policy group vs control).
    """
    cfg = settings.campaign
    df = attribute_campaign(
        engine, campaign_id, cfg.attribution_window_days, data_clock=settings.clock == "data"
    )
    control = df[df["policy"] == "control"]
    results: list[tuple[str, str, dict]] = []
    model_group = df[df["policy"] == "model"]
    results.append(("overall", "model_policy", _group_metrics(model_group, control, cfg.margin)))
    treated_any = df[df["arm"] != CONTROL]
    results.append(("overall", "treated", _group_metrics(treated_any, control, cfg.margin)))
    # The customers the model targeted against the control customers it would have targeted: the
    # same policy on both sides of the randomisation, and a far narrower interval than the whole
    # model group's (most of which was not treated); the control group is sized for this one.
    targeted = model_group[model_group["arm"] != CONTROL]
    would_be = control[control["model_arm"] != CONTROL]
    results.append(("overall", "model_targeted", _group_metrics(targeted, would_be, cfg.margin)))
    for arm, part in model_group[model_group["arm"] != CONTROL].groupby("arm"):
        results.append(("arm", arm, _group_metrics(part, control[control["model_arm"] == arm], cfg.margin)))
    for key in ("coupon_id", "channel"):
        for value, part in model_group[model_group["arm"] != CONTROL].groupby(key):
            arms = set(part["arm"])
            results.append(
                (
                    key.replace("_id", ""),
                    str(value),
                    _group_metrics(part, control[control["model_arm"].isin(arms)], cfg.margin),
                )
            )
    for seg, part in model_group.groupby("segment"):
        results.append(
            ("segment", str(seg), _group_metrics(part, control[control["segment"] == seg], cfg.margin))
        )
    for pol, part in df[df["policy"] != "control"].groupby("policy"):
        results.append(("policy", str(pol), _group_metrics(part, control, cfg.margin)))
    fairness = measure_fairness(engine, settings, df)
    rows = [
        dict(
            campaign_id=campaign_id,
            breakdown=b,
            breakdown_value=v,
            metrics={**_jsonable(mt), "provisional": not final},
            computed_at=now,
        )
        for b, v, mt in results
    ]
    log_name = f"{m.CAMPAIGN_LOG_PREFIX}{campaign_id}"
    with session_scope(engine) as session:
        q.delete_rows(session, m.CampaignMetric, campaign_id=campaign_id)
        q.upsert_rows(session, m.CampaignMetric, rows)
        campaign = q.get_campaign(session, campaign_id)
        campaign.summary = {
            **(campaign.summary or {}),
            "fairness": {**fairness, "constraints": (campaign.summary or {}).get("fairness_constraints", [])},
            "measurement": {
                "final": final,
                "feedback_events": q.feedback_event_count(session, campaign_id),
                "measured_at": now.isoformat(),
                # The model-policy rows' coupon costs, realised against expected.
                "coupon_costs": coupon_cost_outcomes(targeted),
            },
        }
        if not final:
            overall = dict(results[0][2])
            overall.update(campaign_id=campaign_id, provisional=True)
            return overall
        q.upsert_rows(
            session,
            m.CampaignLog,
            [
                dict(
                    name=log_name,
                    source=f"campaign {campaign_id}",
                    control_label=CONTROL,
                    arm_costs={},
                    spec={"format": "couponops-campaign"},
                    assumed_randomized=False,
                    n_rows=len(df),
                    sent_at=campaign.as_of,
                    imported_at=now,
                )
            ],
        )
        q.upsert_rows(
            session,
            m.CampaignLogRow,
            [
                dict(
                    log_name=log_name,
                    customer_id=r.customer_id,
                    arm=r.arm,
                    propensity=float(r.propensity),
                    converted=int(r.converted),
                    revenue=float(r.revenue),
                    outcomes={
                        "opened": int(r.open),
                        "clicked": int(r.click),
                        "redeemed": int(r.redeem),
                        "coupon_cost": float(r.coupon_cost),
                        "policy": r.policy,
                    },
                    features=None,
                )
                for r in df.itertuples()
            ],
        )
        campaign.status = "measured"
    overall = dict(results[0][2])
    overall.update(campaign_id=campaign_id, provisional=False)
    return overall


def window_end(
    campaign: m.Campaign,
    first_send: datetime | None,
    last_send: datetime | None,
    window_days: int,
    *,
    data_clock: bool = False,
) -> pd.Timestamp:
    """Return when a campaign's attribution window closes: its last send (campaign time) plus the window."""
    start = (
        campaign_time(campaign, last_send, first_send, data_clock=data_clock)
        if last_send is not None
        else q.as_utc(campaign.as_of)
    )
    return start + pd.Timedelta(days=window_days)


def measure_due(engine: Engine, settings: Settings, *, clock: datetime, now: datetime) -> dict:
    """Measure every campaign whose attribution window has closed and that is not yet measured.

    A campaign already measured is measured again when feedback events arrived after its last
    measurement (late events). Campaigns still inside their window get provisional numbers when
    new events arrived for them.

    Args:
        engine: The warehouse.
        settings: CouponOps settings.
        clock: The product's "now" in campaign time (the wall clock, or the data clock). On the
            data clock a window also waits for a feedback export, loaded after the campaign's last
            send, that was cut past the window's end.
        now: The wall-clock time stamped on the stored metrics.

    Returns:
        ``measured`` (final, with the overall numbers), ``provisional`` and ``waiting`` campaign
        ids with when their windows close.
    """
    window_days = settings.campaign.attribution_window_days
    clock_ts = q.as_utc(clock)
    with session_scope(engine) as session:
        candidates = [
            (
                c.campaign_id,
                c.status,
                dict((c.summary or {}).get("measurement") or {}),
                q.feedback_event_count(session, c.campaign_id),
            )
            for c in q.campaigns(session, limit=10_000)
            if c.status in ("allocated", "delivered", "measured")
        ]
    data = settings.clock == "data"
    measured, provisional, waiting = [], [], []
    for campaign_id, status, last, events in sorted(candidates):
        with session_scope(engine) as session:
            first_send, last_send = q.send_span(session, campaign_id)
            closes = window_end(
                q.get_campaign(session, campaign_id), first_send, last_send, window_days, data_clock=data
            )
            # A fast simulated clock runs ahead of the sends: the window counts as closed only once
            # the channels reported past its end in an export loaded after the campaign's last send.
            reported = q.newest_export(session, kind="feedback", handled_after=last_send) if data else None
        if clock_ts >= closes and data:
            closed = reported is not None and q.as_utc(reported) >= closes
        else:
            closed = clock_ts >= closes
        if closed:
            if status == "measured" and last.get("final") and events == last.get("feedback_events"):
                continue
            overall = measure_campaign(engine, settings, campaign_id, now=now, final=True)
            measured.append(
                {
                    "campaign_id": campaign_id,
                    "late_events": status == "measured",
                    "incremental_conversions": overall["incremental_conversions"],
                    "incremental_conversions_ci": overall["incremental_conversions_ci"],
                }
            )
        else:
            waiting.append({"campaign_id": campaign_id, "window_closes": closes.isoformat()})
            if events and events != last.get("feedback_events"):
                measure_campaign(engine, settings, campaign_id, now=now, final=False)
                provisional.append(campaign_id)
    return {
        "measured": measured,
        "provisional": provisional,
        "waiting": waiting,
        "clock": clock_ts.isoformat(),
    }


def measure_fairness(engine: Engine, settings: Settings, df: pd.DataFrame) -> dict:
    """Measure exposure and effect by each declared sensitive attribute (``FAIRNESS__ATTRIBUTES``).

    Args:
        engine: the warehouse (for the customers' attributes).
        settings: the settings (attributes).
        df: the attributed campaign (:func:`attribute_campaign`).

    Returns:
        ``{"attributes": [...], "by_attribute": [group_fairness result per attribute]}``, JSON-ready.
    """
    attributes = list(settings.fairness.attributes)
    if not attributes or df.empty:
        return {"attributes": attributes, "by_attribute": []}
    with session_scope(engine) as session:
        attrs = q.customer_attributes(session, attributes)
    frame = df[["customer_id", "policy", "arm", "model_arm", "converted", "coupon_cost"]].merge(
        attrs, on="customer_id", how="left"
    )
    frame = frame.assign(
        treated=frame["arm"] != CONTROL,
        targeted=frame["model_arm"] != CONTROL,
        coupon_value=frame["coupon_cost"].astype(float),
    )
    out = []
    for attribute in attributes:
        result = group_fairness(frame.assign(**{attribute: frame[attribute].fillna("unknown")}), attribute)
        result["groups"] = [_jsonable(g) for g in result["groups"]]
        result["disparity"] = {k: _jsonable(v) for k, v in result["disparity"].items()}
        out.append(result)
    return {"attributes": attributes, "by_attribute": out}


def _jsonable(d: dict) -> dict:
    def fix(v):  # noqa: ANN001, ANN202
        if isinstance(v, list):
            return [fix(x) for x in v]
        if isinstance(v, float) and not np.isfinite(v):
            return None
        return v

    return {k: fix(v) for k, v in d.items()}


def campaign_metrics(engine: Engine, campaign_id: str) -> pd.DataFrame:
    """Return the stored metrics of a campaign as a flat table."""
    with engine.connect() as conn:
        rows = pd.read_sql(select(m.CampaignMetric).where(m.CampaignMetric.campaign_id == campaign_id), conn)
    if rows.empty:
        return rows
    flat = pd.json_normalize(rows["metrics"].tolist())
    return pd.concat([rows[["campaign_id", "breakdown", "breakdown_value"]], flat], axis=1)


def labelled_rows_since_last_training(engine: Engine, model_name: str) -> tuple[int, datetime | None]:
    """Count campaign-log rows imported since the last training run (the product's own counter)."""
    with session_scope(engine) as session:
        last = session.execute(
            select(func.max(m.TrainingRun.trained_at)).where(m.TrainingRun.model_name == model_name)
        ).scalar_one_or_none()
        stmt = select(func.coalesce(func.sum(m.CampaignLog.n_rows), 0))
        if last is not None:
            stmt = stmt.where(m.CampaignLog.imported_at > last)
        return int(session.execute(stmt).scalar_one()), last


def decide_retrain(
    engine: Engine, settings: Settings, *, run_key: str, now: datetime, campaign_id: str | None = None
) -> dict:
    """Decide whether to retrain and record the decision and its reasons in the warehouse.

    Retrain when any holds: enough new labelled rows since the last training; feature drift
    (PSI of key features between the last training time and now) over the threshold; or the
    measured incremental conversions of the last campaign fall short of the model's prediction.
    """
    from mlpkg.data import customer_features

    cfg = settings.retrain
    with session_scope(engine) as session:
        labelled = int(session.execute(select(func.count()).select_from(m.CampaignLogRow)).scalar_one())
    if labelled == 0:
        # Nothing to learn from and nothing to decide: record nothing, say why.
        return {
            "retrain": False,
            "reasons": {"triggers": [], "why_not": "no labelled rows in the warehouse yet"},
            "run_key": run_key,
        }
    new_rows, last_trained = labelled_rows_since_last_training(engine, settings.registered_model_name)
    reasons: dict = {"new_labelled_rows": new_rows, "min_new_labelled_rows": cfg.min_new_labelled_rows}
    triggers = []
    if last_trained is None:
        triggers.append("no model has been trained yet")
    if new_rows >= cfg.min_new_labelled_rows:
        triggers.append(f"{new_rows} new labelled rows >= {cfg.min_new_labelled_rows}")
    with session_scope(engine) as session:
        recent = [c.as_of for c in q.campaigns(session, limit=2)]
    if len(recent) == 2:
        # Drift of the targeted population between the last two campaigns (point-in-time features).
        before = customer_features(engine, recent[1])
        after = customer_features(engine, recent[0])
        drift = {}
        for col in ("recency_days", "frequency_90d", "monetary_90d", "coupon_page_views_30d"):
            if col in before.columns and col in after.columns:
                drift[col] = round(float(psi(before[col].to_numpy(float), after[col].to_numpy(float))), 4)
        reasons["psi"] = drift
        worst = max((v for v in drift.values() if np.isfinite(v)), default=0.0)
        if worst > cfg.psi_threshold:
            triggers.append(f"feature drift PSI {worst:.3f} > {cfg.psi_threshold}")
    if campaign_id:
        metrics = campaign_metrics(engine, campaign_id)
        row = metrics[(metrics["breakdown"] == "overall") & (metrics["breakdown_value"] == "model_policy")]
        if len(row):
            measured = float(row["incremental_conversions"].iloc[0])
            expected = float(row["expected_incremental_conversions"].iloc[0])
            reasons["measured_incremental_conversions"] = measured
            reasons["expected_incremental_conversions"] = expected
            if expected > 0 and measured < expected * (1 - cfg.cvr_shortfall):
                triggers.append(
                    f"measured incremental conversions {measured:.1f} fall short of predicted {expected:.1f} "
                    f"by more than {cfg.cvr_shortfall:.0%}"
                )
    reasons["triggers"] = triggers
    decision = {"retrain": bool(triggers), "reasons": reasons, "run_key": run_key}
    with session_scope(engine) as session:
        session.add(
            m.RetrainDecision(decided_at=now, run_key=run_key, retrain=bool(triggers), reasons=reasons)
        )
    return decision
