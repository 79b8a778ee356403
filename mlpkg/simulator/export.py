"""Turn simulator arrays into the raw files of a shop export (schemas of the shared contract)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mlpkg.simulator.behaviour import EVENT_TYPES, Activity
from mlpkg.simulator.catalogue import Catalogue
from mlpkg.simulator.population import CATEGORIES, Population
from mlpkg.simulator.spec import CHANNELS, ShopConfig

# Ids of rows drawn in period k start at k * ID_STRIDE, so they stay unique across batches.
ID_STRIDE = 10**10

FEEDBACK_COLUMNS = [
    "event_id",
    "campaign_id",
    "customer_id",
    "event_type",
    "ts",
    "coupon_id",
    "channel",
    "order_id",
    "revenue",
]
CAMPAIGN_LOG_COLUMNS = [
    "campaign_id",
    "customer_id",
    "arm",
    "coupon_id",
    "channel",
    "propensity",
    "policy",
    "sent_at",
    "opened",
    "clicked",
    "converted",
    "redeemed",
    "revenue",
    "coupon_cost",
]


def iso(seconds: np.ndarray | int) -> np.ndarray:
    """Format epoch seconds as ISO-8601 UTC strings (``2026-03-01T12:00:00Z``)."""
    secs = np.atleast_1d(np.asarray(seconds, dtype=np.int64)).astype("datetime64[s]")
    return np.datetime_as_string(secs, unit="s").astype(object) + "Z"


def to_timestamp(seconds: int) -> pd.Timestamp:
    """Return epoch seconds as a UTC timestamp."""
    return pd.Timestamp(int(seconds), unit="s", tz="UTC")


def to_seconds(ts: pd.Timestamp | str) -> int:
    """Return a timestamp (naive = UTC) as epoch seconds."""
    t = pd.Timestamp(ts)
    t = t.tz_localize("UTC") if t.tzinfo is None else t.tz_convert("UTC")
    return int(t.value // 10**9)


def customers_frame(pop: Population, rows: np.ndarray) -> pd.DataFrame:
    """Return ``customers.csv`` rows for customers ``rows``."""
    return pd.DataFrame(
        {
            "customer_id": pop.customer_id[rows],
            "signup_date": np.array([s[:10] for s in iso(pop.signup[rows])], dtype=object),
            "region": pop.region[rows],
            "device": pop.device[rows],
            "segment": pop.segment[rows],
        }
    )


def consent_frame(pop: Population, rows: np.ndarray, cfg: ShopConfig) -> pd.DataFrame:
    """Return ``consent.csv`` rows (one per customer and configured channel)."""
    frames = []
    for spec in cfg.channels:
        j = CHANNELS.index(spec.channel)
        frames.append(
            pd.DataFrame(
                {
                    "customer_id": pop.customer_id[rows],
                    "channel": spec.channel,
                    "opted_in": pop.consent[rows, j].astype(np.int64),
                    "updated_at": iso(pop.consent_updated[rows, j]),
                }
            )
        )
    out = pd.concat(frames, ignore_index=True)
    return out.sort_values(["customer_id", "channel"], kind="stable", ignore_index=True)


FIRST_NAMES = np.array(
    "ava ben chloe daniel emma felix grace hugo isla jack kira liam maya noah olivia paul quinn rosa sam "
    "tara umar vera will yara".split(),
    dtype=object,
)
LAST_NAMES = np.array(
    "adams brown clark davis evans fischer garcia hill ito jones khan lopez miller nowak okafor patel "
    "rossi smith tanaka walker young zhang".split(),
    dtype=object,
)
# Besides everyone who consented to a channel (the shop needs the address to honour the consent),
# some customers left an address without consenting: most give an email at checkout, fewer a
# phone number, and only app users (mostly mobile) have a push token.
_EXTRA_EMAIL_RATE = 0.6
_EXTRA_PHONE_RATE = 0.1
_EXTRA_PUSH_RATE = {"mobile": 0.1, "desktop": 0.02}


@dataclass
class ContactBook:
    """Contact details of customers, row i = customer i; ``""`` means no contact on that channel."""

    email: np.ndarray
    phone: np.ndarray
    push_token: np.ndarray

    @classmethod
    def concat(cls, parts: list[ContactBook]) -> ContactBook:
        """Stack contact books (e.g. of the initial customers and later signups)."""
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(cls)})


def draw_contacts(pop: Population, rng: np.random.Generator) -> ContactBook:
    """Draw the contact details of customers ``pop`` from their own random stream.

    A customer who consented to a channel always has a contact on it; others have an email
    address often, a phone number rarely and a push token rarely (mostly on mobile devices).

    Args:
        pop: The customers (their consent and device decide who has which contact).
        rng: The contacts' random stream: the world's other draws never see it.

    Returns:
        Addresses ``<first>.<last>.<n>@example.com`` (n = the customer's number, so unique),
        numbers in the fictional +1-555 range, and 32-hex-digit push tokens.
    """
    n = len(pop)
    ch = {c: i for i, c in enumerate(CHANNELS)}
    first = FIRST_NAMES[rng.integers(0, len(FIRST_NAMES), n)]
    last = LAST_NAMES[rng.integers(0, len(LAST_NAMES), n)]
    u = rng.random((n, len(CHANNELS)))
    digits = rng.integers(0, 10**7, n)
    token_bytes = rng.bytes(16 * n)
    mobile = pop.device != "desktop"
    push_rate = np.where(mobile, _EXTRA_PUSH_RATE["mobile"], _EXTRA_PUSH_RATE["desktop"])
    has_email = pop.consent[:, ch["email"]] | (u[:, ch["email"]] < _EXTRA_EMAIL_RATE)
    has_phone = pop.consent[:, ch["sms"]] | (u[:, ch["sms"]] < _EXTRA_PHONE_RATE)
    has_push = pop.consent[:, ch["push"]] | (u[:, ch["push"]] < push_rate)
    number = [int(cid[1:]) for cid in pop.customer_id]
    email = np.array(
        [f"{f}.{a}.{k}@example.com" for f, a, k in zip(first, last, number, strict=True)], dtype=object
    )
    phone = np.array([f"+1555{d:07d}" for d in digits], dtype=object)
    token = np.array([token_bytes[16 * i : 16 * (i + 1)].hex() for i in range(n)], dtype=object)
    return ContactBook(
        email=np.where(has_email, email, "").astype(object),
        phone=np.where(has_phone, phone, "").astype(object),
        push_token=np.where(has_push, token, "").astype(object),
    )


def contacts_frame(pop: Population, book: ContactBook, rows: np.ndarray) -> pd.DataFrame:
    """Return ``contacts.csv`` rows for customers ``rows`` (one per customer, given at signup)."""
    return pd.DataFrame(
        {
            "customer_id": pop.customer_id[rows],
            "email": book.email[rows],
            "phone": book.phone[rows],
            "push_token": book.push_token[rows],
            "updated_at": iso(pop.signup[rows]) if len(rows) else np.array([], dtype=object),
        }
    )


def channels_frame(cfg: ShopConfig) -> pd.DataFrame:
    """Return ``channels.csv``."""
    return pd.DataFrame(
        {
            "channel": [c.channel for c in cfg.channels],
            "send_cost": [float(c.send_cost) for c in cfg.channels],
            "daily_capacity": [max(1, round(c.capacity_share * cfg.n_customers)) for c in cfg.channels],
        }
    )


def coupons_frame(cfg: ShopConfig, valid_from: int, valid_to: int, restocks: int = 0) -> pd.DataFrame:
    """Return ``coupons.csv`` with every coupon valid in ``[valid_from, valid_to]``.

    The shop restocks each coupon with its initial inventory every time the world advances
    (``restocks``), so the inventory is cumulative, as a coupon catalogue's total issuable count.
    """
    n = len(cfg.coupons)
    return pd.DataFrame(
        {
            "coupon_id": [c.coupon_id for c in cfg.coupons],
            "kind": [c.kind for c in cfg.coupons],
            "face_value": [float(c.face_value) for c in cfg.coupons],
            "min_basket": [float(c.min_basket) for c in cfg.coupons],
            "inventory": [round(c.inventory_share * cfg.n_customers) * (1 + restocks) for c in cfg.coupons],
            "valid_from": np.repeat(iso(valid_from), n),
            "valid_to": np.repeat(iso(valid_to), n),
        }
    )


def products_frame(cat: Catalogue) -> pd.DataFrame:
    """Return ``products.csv``: the catalogue with its prices and stock."""
    return pd.DataFrame(
        {
            "product_id": cat.product_id,
            "category": CATEGORIES[cat.category].astype(object),
            "price": cat.price,
            "in_stock": cat.in_stock.astype(np.int64),
        }
    )


def _product_ids(cat: Catalogue | None, rows: np.ndarray) -> np.ndarray:
    """Return the product id of each catalogue row (``""`` for -1: no product)."""
    if cat is None:
        return np.full(len(rows), "", dtype=object)
    ids = np.append(cat.product_id, "").astype(object)
    return ids[np.where(rows < 0, len(cat), rows)]


def events_table(
    pop: Population, act: Activity, period: int, products: tuple[Catalogue, np.ndarray] | None = None
) -> pa.Table:
    """Return the period's events, sorted by time, as an Arrow table (``events.parquet``).

    ``products`` is the catalogue and the product row of each event in ``act``'s order (-1: none);
    with it the table carries ``product_id``.
    """
    order = np.lexsort((act.ev_type, act.ev_customer, act.ev_ts))
    ids = pa.array(period * ID_STRIDE + np.arange(len(order), dtype=np.int64)).cast(pa.string())
    categories = pa.array([*CATEGORIES.tolist(), ""])
    cat = np.where(act.ev_category[order] < 0, len(CATEGORIES), act.ev_category[order])
    columns = {
            "event_id": pc.binary_join_element_wise("E", ids, ""),
            "customer_id": pa.array(pop.customer_id.tolist(), pa.string()).take(
                pa.array(act.ev_customer[order])
            ),
            "ts": pa.array(act.ev_ts[order] * 1_000_000, pa.timestamp("us", "UTC")),
            "event_type": pa.array(list(EVENT_TYPES), pa.string()).take(
                pa.array(act.ev_type[order].astype(np.int64))
            ),
            "category": categories.take(pa.array(cat.astype(np.int64))),
    }
    if products is not None:
        columns["product_id"] = pa.array(_product_ids(products[0], products[1][order]).tolist(), pa.string())
    return pa.table(columns)


def orders_frame(
    pop: Population,
    act: Activity,
    cfg: ShopConfig,
    period: int,
    products: tuple[Catalogue, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Return the period's orders sorted by time (``orders.csv``), with ``product_id`` given ``products``."""
    order = np.lexsort((act.or_customer, act.or_ts))
    coupon_ids = np.array([c.coupon_id for c in cfg.coupons] + [""], dtype=object)
    coupon = act.or_coupon[order]
    frame = pd.DataFrame(
        {
            "order_id": np.array([f"O{period * ID_STRIDE + i}" for i in range(len(order))], dtype=object),
            "customer_id": pop.customer_id[act.or_customer[order]],
            "ts": iso(act.or_ts[order]) if len(order) else np.array([], dtype=object),
            "revenue": np.round(act.or_revenue[order], 2),
            "n_items": act.or_items[order].astype(np.int64),
            "coupon_id": coupon_ids[np.where(coupon < 0, len(cfg.coupons), coupon)],
        }
    )
    if products is not None:
        frame["product_id"] = _product_ids(products[0], products[1][order])
    return frame


def write_events(tables: list[pa.Table], path: Path) -> Path:
    """Write events tables into one parquet file (an empty one with the schema if none)."""
    schema = pa.schema(
        [
            ("event_id", pa.string()),
            ("customer_id", pa.string()),
            ("ts", pa.timestamp("us", "UTC")),
            ("event_type", pa.string()),
            ("category", pa.string()),
            ("product_id", pa.string()),
        ]
    )
    table = pa.concat_tables(tables) if tables else schema.empty_table()
    pq.write_table(table, path)
    return path


def write_csv(df: pd.DataFrame, path: Path) -> Path:
    """Write a raw CSV file (no index, empty strings for missing text)."""
    df.to_csv(path, index=False)
    return path
