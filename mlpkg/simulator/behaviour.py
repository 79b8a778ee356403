"""Random draws of what customers do: everyday activity and responses to a campaign.

Everyday activity is drawn as Poisson counts per customer and event type, exploded into rows
with uniform timestamps in the customer's active span (vectorised, no Python loop over rows).
Campaign responses are Bernoulli draws from the same parameters :mod:`mlpkg.simulator.truth`
computes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mlpkg.simulator.population import CATEGORIES, DAY, Population
from mlpkg.simulator.spec import CHANNELS, HIDDEN_TYPES, ShopConfig
from mlpkg.simulator.truth import ORDER_SIGMA, ArmTable, pair_truth

EVENT_TYPES: tuple[str, ...] = (
    "page_view",
    "search",
    "add_to_cart",
    "coupon_page_view",
    "email_open",
    "sms_click",
    "push_open",
)
_CATALOG_EVENTS = ("page_view", "search", "add_to_cart")
_FAV_CATEGORY_SHARE = 0.6
# Per hidden type (persuadable, sure_thing, lost_cause, sleeping_dog).
_COUPON_PAGE = np.array([1.0, 0.25, 0.2, 0.2])
_CART_ABANDON = np.array([2.0, 0.6, 1.0, 0.7])
_PROMO_ORDERS = np.array([0.004, 0.002, 0.0003, 0.0005])  # past-promotion orders per day (x price sens.)
_SMS_CLICK_GIVEN_READ = 0.5


@dataclass
class Activity:
    """Rows of events and orders as column arrays (times in int64 seconds)."""

    ev_customer: np.ndarray
    ev_ts: np.ndarray
    ev_type: np.ndarray  # index into EVENT_TYPES
    ev_category: np.ndarray  # index into CATEGORIES, -1 for none
    or_customer: np.ndarray
    or_ts: np.ndarray
    or_revenue: np.ndarray
    or_items: np.ndarray
    or_coupon: np.ndarray  # index into cfg.coupons, -1 for none

    @classmethod
    def concat(cls, parts: list[Activity]) -> Activity:
        """Stack activities."""
        names = cls.__dataclass_fields__
        return cls(**{k: np.concatenate([getattr(p, k) for p in parts]) for k in names})

    def keep_orders(self, mask: np.ndarray) -> Activity:
        """Return a copy holding only the orders where ``mask`` is true."""
        return Activity(
            self.ev_customer,
            self.ev_ts,
            self.ev_type,
            self.ev_category,
            self.or_customer[mask],
            self.or_ts[mask],
            self.or_revenue[mask],
            self.or_items[mask],
            self.or_coupon[mask],
        )


def _explode(
    rate_days: np.ndarray, start: np.ndarray, span: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw Poisson counts of ``rate_days`` and uniform times in ``[start, start + span)``."""
    counts = rng.poisson(np.maximum(rate_days, 0.0))
    who = np.repeat(np.arange(len(counts)), counts)
    ts = start[who] + (rng.random(len(who)) * span[who]).astype(np.int64)
    return who, ts


def _items(revenue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1 + rng.poisson(revenue / 40.0)


def draw_order_values(basket: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw order values lognormal around ``basket`` (which is their mean)."""
    return basket * np.exp(ORDER_SIGMA * rng.standard_normal(len(basket)) - ORDER_SIGMA**2 / 2)


def simulate_activity(
    pop: Population, cfg: ShopConfig, start: int, end: int, rng: np.random.Generator
) -> Activity:
    """Draw everyday events and orders of every customer in ``[start, end)``.

    Args:
        pop: The customers; each is active from ``max(signup, start)``.
        cfg: The shop config (channels, coupons, conversion window).
        start: Start of the period (seconds).
        end: End of the period (seconds, exclusive).
        rng: Random stream.

    Returns:
        The period's activity, including one ``add_to_cart`` just before each order.
    """
    t = pop.hidden_type
    active_from = np.maximum(pop.signup, start)
    span = np.maximum(end - active_from, 0).astype(np.int64)
    days = span / DAY
    eng = pop.engagement
    s = pop.price_sensitivity

    # Background orders at a rate whose window probability of >= 1 order is the base conversion.
    order_rate = -np.log1p(-pop.base_conversion) / cfg.window_days
    who_o, ts_o = _explode(order_rate * days, active_from, span, rng)
    who_p, ts_p = _explode(_PROMO_ORDERS[t] * s * days, active_from, span, rng)
    or_customer = np.concatenate([who_o, who_p])
    or_ts = np.concatenate([ts_o, ts_p])
    revenue = draw_order_values(pop.basket[or_customer], rng)
    n_coupons = len(cfg.coupons)
    promo_coupon = rng.integers(0, n_coupons, len(who_p))
    min_basket = np.array([c.min_basket for c in cfg.coupons])
    # A promotion coupon the basket cannot reach is swapped for one without a minimum.
    no_min = int(np.argmin(min_basket))
    promo_coupon = np.where(revenue[len(who_o) :] >= min_basket[promo_coupon], promo_coupon, no_min)
    or_coupon = np.concatenate([np.full(len(who_o), -1), promo_coupon])

    rates = {
        "page_view": 0.08 * eng,
        "search": 0.03 * eng,
        "add_to_cart": 0.02 * eng * (0.3 + s) * _CART_ABANDON[t],
        "coupon_page_view": 0.06 * s**2 * _COUPON_PAGE[t] * np.sqrt(eng),
    }
    for spec in cfg.channels:
        j = CHANNELS.index(spec.channel)
        read = spec.sends_per_week / 7.0 * pop.responsiveness[:, j] * pop.consent[:, j]
        if spec.channel == "email":
            rates["email_open"] = read
        elif spec.channel == "sms":
            rates["sms_click"] = read * _SMS_CLICK_GIVEN_READ
        else:
            rates["push_open"] = read
    who_parts, ts_parts, type_parts = [], [], []
    for name, rate in rates.items():
        who, ts = _explode(rate * days, active_from, span, rng)
        who_parts.append(who)
        ts_parts.append(ts)
        type_parts.append(np.full(len(who), EVENT_TYPES.index(name), dtype=np.int8))
    # Each order is preceded by its cart add (so abandoned carts = cart adds without an order).
    who_parts.append(or_customer)
    ts_parts.append(np.maximum(or_ts - rng.integers(60, 3600, len(or_ts)), active_from[or_customer]))
    type_parts.append(np.full(len(or_customer), EVENT_TYPES.index("add_to_cart"), dtype=np.int8))

    ev_customer = np.concatenate(who_parts)
    ev_type = np.concatenate(type_parts)
    ev_category = _categories(pop, ev_customer, ev_type, rng)
    return Activity(
        ev_customer=ev_customer,
        ev_ts=np.concatenate(ts_parts),
        ev_type=ev_type,
        ev_category=ev_category,
        or_customer=or_customer,
        or_ts=or_ts,
        or_revenue=revenue,
        or_items=_items(revenue, rng),
        or_coupon=or_coupon,
    )


def _categories(
    pop: Population, customer: np.ndarray, ev_type: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    catalog = np.isin(ev_type, [EVENT_TYPES.index(e) for e in _CATALOG_EVENTS])
    fav = rng.random(len(customer)) < _FAV_CATEGORY_SHARE
    cat = np.where(fav, pop.fav_category[customer], rng.integers(0, len(CATEGORIES), len(customer)))
    return np.where(catalog, cat, -1).astype(np.int8)


@dataclass
class Response:
    """Per-customer outcome of one campaign send (times in int64 seconds)."""

    idx: np.ndarray
    arm: np.ndarray
    delivered: np.ndarray
    opened: np.ndarray
    clicked: np.ndarray
    converted: np.ndarray
    redeemed: np.ndarray
    revenue: np.ndarray
    n_items: np.ndarray
    coupon_cost: np.ndarray
    ts_delivered: np.ndarray
    ts_open: np.ndarray
    ts_click: np.ndarray
    ts_order: np.ndarray


def draw_response(
    pop: Population,
    idx: np.ndarray,
    arm: np.ndarray,
    table: ArmTable,
    sent_at: int,
    window_days: int,
    rng: np.random.Generator,
    relevance: np.ndarray | None = None,
) -> Response:
    """Draw each customer's reaction to ``arm`` sent at ``sent_at`` (Bernoulli, never expectations).

    Args:
        pop: The customers.
        idx: Row indices into ``pop``.
        arm: Arm index per customer (0 = control: no message, baseline behaviour).
        table: The arm table.
        sent_at: Send time (seconds).
        window_days: Conversion window length.
        rng: Random stream.
        relevance: Relevance of the products each message shows (``None``: no products).

    Returns:
        The outcomes; at most one order per customer in the window.
    """
    n = len(idx)
    truth = pair_truth(pop, idx, arm, table, relevance)
    u = rng.random((5, n))
    delivered = truth["delivered"]
    opened = delivered & (u[0] < truth["open"])
    clicked = opened & (u[1] < truth["click_through"])
    converted = (u[2] < truth["base"]) | (clicked & (u[3] < truth["q"]))
    value = draw_order_values(pop.basket[idx] * np.where(clicked, truth["lift"], 1.0), rng)
    min_basket = table.min_basket[arm]
    redeemed = converted & clicked & (value >= min_basket)
    kind, face = table.kind[arm], table.face[arm]
    cost = np.where(redeemed, np.where(kind == 0, face / 100.0 * value, face), 0.0)

    window = window_days * DAY
    end = sent_at + window - 1
    ts_delivered = sent_at + rng.integers(0, 600, n)
    ts_open = np.minimum(ts_delivered + rng.exponential(6 * 3600, n).astype(np.int64), end - 2)
    ts_click = np.minimum(ts_open + rng.exponential(900, n).astype(np.int64) + 1, end - 1)
    ts_after_click = np.minimum(ts_click + rng.exponential(DAY, n).astype(np.int64) + 60, end)
    ts_any = sent_at + (u[4] * window).astype(np.int64)
    ts_order = np.where(clicked, ts_after_click, np.minimum(ts_any, end))
    return Response(
        idx=idx,
        arm=arm,
        delivered=delivered,
        opened=opened,
        clicked=clicked,
        converted=converted,
        redeemed=redeemed,
        revenue=np.where(converted, value, 0.0),
        n_items=_items(value, rng),
        coupon_cost=cost,
        ts_delivered=ts_delivered,
        ts_open=ts_open,
        ts_click=ts_click,
        ts_order=ts_order,
    )


def response_activity(
    resp: Response, pop: Population, table: ArmTable, coupon_index: dict[str, int], rng: np.random.Generator
) -> Activity:
    """Turn campaign responses into the history rows a shop would have recorded.

    Opens and clicks show up as ``email_open``/``push_open``/``sms_click`` events, a click lands
    on the coupon page, and each conversion is an order (with its cart add) that carries the
    coupon when redeemed.
    """
    ch = np.where(resp.arm > 0, table.channel[resp.arm], -1)
    parts = []
    for name, mask, ts in (
        ("email_open", resp.opened & (ch == CHANNELS.index("email")), resp.ts_open),
        ("push_open", resp.opened & (ch == CHANNELS.index("push")), resp.ts_open),
        ("sms_click", resp.clicked & (ch == CHANNELS.index("sms")), resp.ts_click),
        ("coupon_page_view", resp.clicked, resp.ts_click + 5),
        ("add_to_cart", resp.converted, resp.ts_order - rng.integers(60, 3600, len(resp.idx))),
    ):
        parts.append(
            (resp.idx[mask], ts[mask], np.full(int(mask.sum()), EVENT_TYPES.index(name), dtype=np.int8))
        )
    ev_customer = np.concatenate([p[0] for p in parts])
    ev_type = np.concatenate([p[2] for p in parts])
    conv = resp.converted
    coupon_of_arm = np.array([-1] + [coupon_index[a.coupon_id] for a in table.arms])
    return Activity(
        ev_customer=ev_customer,
        ev_ts=np.concatenate([p[1] for p in parts]),
        ev_type=ev_type,
        ev_category=_categories(pop, ev_customer, ev_type, rng),
        or_customer=resp.idx[conv],
        or_ts=resp.ts_order[conv],
        or_revenue=resp.revenue[conv],
        or_items=resp.n_items[conv],
        or_coupon=np.where(resp.redeemed, coupon_of_arm[resp.arm], -1)[conv],
    )


def campaign_assignment(
    pop: Population, idx: np.ndarray, table: ArmTable, sent_at: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Randomize customers uniformly over control and the arms on channels they consented to.

    Returns:
        The arm index per customer and its propensity ``1 / (#eligible arms + 1)``.
    """
    ch = table.channel[1:]
    consented = pop.consent[idx] & (pop.consent_updated[idx] < sent_at)
    eligible = consented[:, ch]  # [n, n_arms]
    k = eligible.sum(axis=1)
    pick = np.floor(rng.random(len(idx)) * (k + 1)).astype(np.int64)  # 0 = control
    rank = np.cumsum(eligible, axis=1)
    hit = eligible & (rank == pick[:, None])
    arm = np.where(pick > 0, np.argmax(hit, axis=1) + 1, 0)
    return arm, 1.0 / (k + 1.0)


def hidden_type_names(pop: Population, idx: np.ndarray) -> np.ndarray:
    """Return the hidden type names of customers ``idx``."""
    return np.asarray(HIDDEN_TYPES, dtype=object)[pop.hidden_type[idx]]
