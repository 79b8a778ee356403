"""Calibrate expected coupon costs on what recent campaigns really paid.

A campaign's budget caps its *expected* spend, and the expected coupon cost is only as good as
the model's P(redeemed) and its order value: charging the coupon on every treated conversion
leaves part of the budget unspent (many converters never redeem), a redemption model that
under-predicts overspends it. Each measured campaign records, per coupon, what its model-policy
rows were expected to cost and what their redemptions really cost
(``summary.measurement.coupon_costs``). The next allocation multiplies each coupon's expected
cost by the ratio realised / expected over the last ``campaign.cost_calibration_campaigns``
measured campaigns, so that the budget holds in what is really paid.

The ratio is a credibility-weighted estimate (Bühlmann): all coupons' pooled ratio, pulled
towards 1 while few redemptions back it, and each coupon's own ratio weighted by its
redemptions ``k`` as ``k / (k + credibility)`` against the pooled one. A campaign's expected
costs were themselves calibrated; its ratio is taken against the uncalibrated cost (the
expected cost divided by the factor the campaign used), so factors do not compound.

It is off by default (``cost_calibration_campaigns = 0``). In the 20,000-customer closed loop it
did not hold the budget in truth, because the ratio depends on which customers a round targets.
With a cooldown, alternate rounds reach a second tier that redeems about half as often at the
same predicted probability. A round calibrated on the previous one then spent 45-65% or
120-145% of its budget.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import datetime

from sqlalchemy.orm import Session

from mlpkg.config import CampaignSettings
from mlpkg.db import queries as q

#: The factor stays within these bounds, however few or extreme the redemptions behind it.
FACTOR_BOUNDS = (0.1, 10.0)


@dataclass(frozen=True)
class CostCalibration:
    """Per-coupon multipliers of the expected coupon cost and the evidence behind them.

    Attributes:
        factors: Coupon id -> multiplier of its expected coupon cost.
        pooled: Multiplier of a coupon without its own (every coupon's ratio, shrunk towards 1).
        redemptions: Redemptions behind the calibration.
        campaigns: Campaigns whose costs were compared.
    """

    factors: dict[str, float] = field(default_factory=dict)
    pooled: float = 1.0
    redemptions: int = 0
    campaigns: list[str] = field(default_factory=list)

    def factor(self, coupon_id: str) -> float:
        """Return the multiplier of ``coupon_id``'s expected cost."""
        return float(self.factors.get(str(coupon_id), self.pooled))

    def as_dict(self) -> dict:
        """Return the calibration as JSON-ready data (kept in the campaign's summary)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> CostCalibration:
        """Rebuild a calibration from :meth:`as_dict` data (None or empty: no calibration)."""
        data = data or {}
        return cls(
            factors={str(k): float(v) for k, v in (data.get("factors") or {}).items()},
            pooled=float(data.get("pooled", 1.0)),
            redemptions=int(data.get("redemptions", 0)),
            campaigns=[str(c) for c in data.get("campaigns") or []],
        )


#: No calibration: every expected cost as the model prices it.
UNCALIBRATED = CostCalibration()


def _clip(x: float) -> float:
    return float(min(max(x, FACTOR_BOUNDS[0]), FACTOR_BOUNDS[1]))


def calibrate(summaries: list[tuple[str, dict]], credibility: float) -> CostCalibration:
    """Derive the calibration from measured campaigns' ``(campaign_id, summary)``.

    Args:
        summaries: Measured campaigns, each summary with ``measurement.coupon_costs``
            (``{coupon: {redemptions, realised, expected}}``) and the ``cost_calibration`` it used.
        credibility: Redemptions at which a ratio gets half its weight against its prior.

    Returns:
        The calibration; :data:`UNCALIBRATED` when no campaign has expected coupon costs.
    """
    realised: dict[str, float] = {}
    expected: dict[str, float] = {}
    redeemed: dict[str, int] = {}
    used = []
    for campaign_id, summary in summaries:
        costs = (summary.get("measurement") or {}).get("coupon_costs") or {}
        if not costs:
            continue
        applied = CostCalibration.from_dict(summary.get("cost_calibration"))
        used.append(campaign_id)
        for coupon, c in costs.items():
            raw = float(c.get("expected", 0.0)) / applied.factor(coupon)
            if raw <= 0:
                continue
            realised[coupon] = realised.get(coupon, 0.0) + float(c.get("realised", 0.0))
            expected[coupon] = expected.get(coupon, 0.0) + raw
            redeemed[coupon] = redeemed.get(coupon, 0) + int(c.get("redemptions", 0))
    total_expected = sum(expected.values())
    if total_expected <= 0:
        return UNCALIBRATED
    total = sum(redeemed.values())
    ratio = sum(realised.values()) / total_expected
    pooled = _clip(1.0 + total / (total + credibility) * (ratio - 1.0))
    factors = {}
    for coupon, raw in expected.items():
        weight = redeemed[coupon] / (redeemed[coupon] + credibility)
        factors[coupon] = round(_clip(pooled + weight * (realised[coupon] / raw - pooled)), 4)
    return CostCalibration(factors=factors, pooled=round(pooled, 4), redemptions=total, campaigns=used)


def coupon_cost_calibration(
    session: Session, cfg: CampaignSettings, *, before: datetime | None = None
) -> CostCalibration:
    """Return the calibration from the measured campaigns sent before ``before`` (None: all)."""
    if cfg.cost_calibration_campaigns == 0:
        return UNCALIBRATED
    summaries = q.measured_campaign_summaries(session, before=before, limit=cfg.cost_calibration_campaigns)
    return calibrate(summaries, cfg.cost_calibration_credibility)
