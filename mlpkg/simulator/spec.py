"""Configuration of the simulated shop: coupons, channels, arms and the world's knobs.

Everything here is plain data that round-trips through JSON, so a saved ``world.json`` is
enough to regenerate the same shop bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from mlpkg.config import Settings

CHANNELS: tuple[str, ...] = ("email", "sms", "push")
HIDDEN_TYPES: tuple[str, ...] = ("persuadable", "sure_thing", "lost_cause", "sleeping_dog")
CONTROL = "control"


@dataclass(frozen=True)
class CouponSpec:
    """A coupon the shop can hand out.

    Attributes:
        coupon_id: Identifier, also the first half of an arm name.
        kind: ``percent_off``, ``fixed_amount`` or ``free_shipping``.
        face_value: Percent for ``percent_off``, currency amount otherwise.
        min_basket: Smallest order value the coupon can be redeemed on.
        inventory_share: Inventory as a share of the initial number of customers.
        basket_lift: Multiplier on the basket of orders placed after clicking the offer.
    """

    coupon_id: str
    kind: str
    face_value: float
    min_basket: float = 0.0
    inventory_share: float = 0.15
    basket_lift: float = 1.0

    def __post_init__(self) -> None:
        """Reject coupons the simulator cannot price."""
        if self.kind not in ("percent_off", "fixed_amount", "free_shipping"):
            raise ValueError(f"unknown coupon kind {self.kind!r}")
        if self.face_value <= 0 or self.min_basket < 0 or self.basket_lift <= 0:
            raise ValueError(f"coupon {self.coupon_id}: face_value > 0, min_basket >= 0, basket_lift > 0")


@dataclass(frozen=True)
class ChannelSpec:
    """A marketing channel and how customers react to being contacted through it.

    Attributes:
        channel: ``email``, ``sms`` or ``push``.
        send_cost: Cost of one message.
        capacity_share: Daily capacity as a share of the initial number of customers.
        consent_rate: Share of customers opted in.
        sends_per_week: Frequency of the shop's regular (non-campaign) messages, which produce the
            observable ``email_open``/``sms_click``/``push_open`` events.
        annoyance: Relative drop of a sleeping dog's baseline conversion when contacted.
        nuisance: Relative drop of everybody else's baseline conversion when contacted.
    """

    channel: str
    send_cost: float
    capacity_share: float
    consent_rate: float
    sends_per_week: float
    annoyance: float
    nuisance: float = 0.0


DEFAULT_COUPONS: tuple[CouponSpec, ...] = (
    CouponSpec("PCT10", "percent_off", 10.0, 0.0, 0.15, 1.04),
    CouponSpec("PCT20", "percent_off", 20.0, 0.0, 0.15, 1.08),
    CouponSpec("USD5", "fixed_amount", 5.0, 25.0, 0.15, 1.03),
    CouponSpec("FREESHIP", "free_shipping", 4.99, 0.0, 0.15, 1.05),
)

DEFAULT_CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("email", 0.01, 0.60, 0.85, 2.0, 0.30, 0.0),
    ChannelSpec("sms", 0.05, 0.30, 0.50, 1.0, 0.65, 0.04),
    ChannelSpec("push", 0.002, 0.50, 0.60, 3.0, 0.45, 0.015),
)

DEFAULT_TYPE_SHARES: dict[str, float] = {
    "persuadable": 0.25,
    "sure_thing": 0.15,
    "lost_cause": 0.40,
    "sleeping_dog": 0.20,
}


def _utc(ts: Any) -> pd.Timestamp:
    """Return ``ts`` as a tz-aware UTC timestamp (naive values are taken as UTC)."""
    out = pd.Timestamp(ts)
    return out.tz_localize("UTC") if out.tzinfo is None else out.tz_convert("UTC")


@dataclass(frozen=True)
class ShopConfig:
    """Knobs of the simulated shop; the same config always yields the same shop.

    Attributes:
        seed: Seed of every random stream in the world.
        n_customers: Customers at the end of the initial history.
        opened_at: When the shop opened; all signups and history lie after it.
        history_days: Length of the initial history; ``Shop.now = opened_at + history_days``.
        campaign_share: Share of customers in the past randomized campaign.
        campaign_offset_days: The past campaign was sent this many days before ``now``.
        window_days: Days after a send in which an order counts as a conversion.
        type_shares: Shares of the hidden customer types.
        mean_basket: Rough mean order value.
        new_customers_per_day: New signups per day during ``Shop.advance``, as a share of
            ``n_customers``.
        coupons: Coupons on offer.
        channels: Channels messages can go through.
    """

    seed: int = 7
    n_customers: int = 4000
    opened_at: pd.Timestamp = field(default_factory=lambda: pd.Timestamp("2025-01-01", tz="UTC"))
    history_days: int = 180
    campaign_share: float = 0.5
    campaign_offset_days: int = 10
    window_days: int = 7
    type_shares: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_TYPE_SHARES))
    mean_basket: float = 60.0
    new_customers_per_day: float = 0.001
    coupons: tuple[CouponSpec, ...] = DEFAULT_COUPONS
    channels: tuple[ChannelSpec, ...] = DEFAULT_CHANNELS

    def __post_init__(self) -> None:
        """Normalise nested values (UTC time, specs from dicts) and reject inconsistent knobs."""
        object.__setattr__(self, "opened_at", _utc(self.opened_at))
        object.__setattr__(
            self, "coupons", tuple(c if isinstance(c, CouponSpec) else CouponSpec(**c) for c in self.coupons)
        )
        object.__setattr__(
            self,
            "channels",
            tuple(c if isinstance(c, ChannelSpec) else ChannelSpec(**c) for c in self.channels),
        )
        if self.n_customers < 10:
            raise ValueError("n_customers must be at least 10")
        if self.history_days < self.campaign_offset_days + self.window_days + 14:
            raise ValueError("history_days must leave room for signups and the past campaign")
        if not 0 < self.campaign_share <= 1:
            raise ValueError("campaign_share must lie in (0, 1]")
        if self.campaign_offset_days < self.window_days:
            raise ValueError("the past campaign's window must end before now")
        if set(self.type_shares) != set(HIDDEN_TYPES) or abs(sum(self.type_shares.values()) - 1) > 1e-6:
            raise ValueError(f"type_shares must give {HIDDEN_TYPES} shares summing to 1")
        names = [c.channel for c in self.channels]
        if not set(names) <= set(CHANNELS) or len(set(names)) != len(names):
            raise ValueError(f"channels must be distinct members of {CHANNELS}")
        ids = [c.coupon_id for c in self.coupons]
        if len(set(ids)) != len(ids) or any("@" in i or i == CONTROL for i in ids):
            raise ValueError("coupon ids must be distinct, not 'control' and contain no '@'")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: Any) -> ShopConfig:
        """Build a config from the simulator fields of the CouponOps settings."""
        kwargs: dict[str, Any] = {
            "seed": settings.simulator_seed,
            "n_customers": settings.simulator_customers,
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict (timestamps as ISO strings)."""
        out = dataclasses.asdict(self)
        out["opened_at"] = self.opened_at.isoformat()
        out["coupons"] = [dataclasses.asdict(c) for c in self.coupons]
        out["channels"] = [dataclasses.asdict(c) for c in self.channels]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShopConfig:
        """Rebuild a config written by :meth:`to_dict`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown ShopConfig fields: {sorted(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        """Return the config as a JSON string."""
        return json.dumps(self.to_dict(), sort_keys=True)


@dataclass(frozen=True)
class Arm:
    """A treatment: one coupon sent through one channel (``control`` is not an Arm).

    Attributes:
        name: ``"{coupon_id}@{channel}"``.
        coupon_id: The coupon sent.
        channel: The channel it goes through.
    """

    name: str
    coupon_id: str
    channel: str

    @classmethod
    def of(cls, coupon_id: str, channel: str) -> Arm:
        """Build the arm sending ``coupon_id`` through ``channel``."""
        return cls(f"{coupon_id}@{channel}", coupon_id, channel)
