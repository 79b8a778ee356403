"""Expectation suites as code (Great Expectations 1.x) for raw tables and the loop's products.

One function, :func:`build_suite`, returns the suite of a table. Bounds that depend on the run
(``now``, the shop's opening date, the revenue cap, the channels) come from the
:class:`~mlpkg.validation.contract.ValidationContext`, so the same suite runs in the DAG, the CLI
and the tests. Each expectation carries a ``description`` that the gate uses as the rule text
and Data Docs shows. Rules that need more than one frame (referential integrity, volume, drift,
campaign-log spec) live in :mod:`mlpkg.validation.checks`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import great_expectations as gx
import great_expectations.expectations as gxe
import pandas as pd
from great_expectations.expectations.row_conditions import Column

from mlpkg.validation.contract import EMAIL_PATTERN, PHONE_PATTERN, PUSH_TOKEN_PATTERN, ValidationContext
from mlpkg.validation.readers import RAW_SCHEMAS

#: Tables the product writes (checked before they leave a stage).
PRODUCT_TABLES: tuple[str, ...] = ("feature_snapshot", "model_scores", "allocations", "deliveries")
#: Every table that has a suite.
SUITE_TABLES: tuple[str, ...] = (*RAW_SCHEMAS, *PRODUCT_TABLES)

DEVICES = ("ios", "android", "desktop")
SEGMENTS = ("new", "regular", "vip", "lapsed")
COUPON_KINDS = ("percent_off", "fixed_amount", "free_shipping")
EVENT_TYPES = (
    "page_view", "search", "add_to_cart", "coupon_page_view", "email_open", "sms_click", "push_open",
)
FEEDBACK_EVENT_TYPES = ("delivered", "open", "click", "redeem", "order")
CAMPAIGN_LOG_POLICIES = ("random",)
ALLOCATION_POLICIES = ("model", "explore", "control")
CONTROL_ARM = "control"

#: Required columns of the product tables (raw tables: see ``RAW_SCHEMAS``).
PRODUCT_REQUIRED: dict[str, tuple[str, ...]] = {
    "feature_snapshot": ("customer_id",),
    "model_scores": ("customer_id", f"p_conv__{CONTROL_ARM}"),
    "allocations": ("campaign_id", "customer_id", "arm", "policy", "propensity"),
    "deliveries": ("campaign_id", "customer_id", "channel"),
}
PRODUCT_KEYS: dict[str, tuple[str, ...]] = {
    "feature_snapshot": ("customer_id",),
    "model_scores": ("customer_id",),
    "allocations": ("campaign_id", "customer_id"),
    "deliveries": ("campaign_id", "customer_id"),
}
#: Columns whose timestamps must lie between the shop's opening and ``now``. Coupon validity
#: dates are absent on purpose: a coupon may be valid until next month.
TIMESTAMP_SANITY: dict[str, tuple[str, ...]] = {
    "customers": ("signup_date",),
    "contacts": ("updated_at",),
    "consent": ("updated_at",),
    "events": ("ts",),
    "orders": ("ts",),
    "campaign_log": ("sent_at",),
    "feedback": ("ts",),
    "deliveries": ("sent_at",),
}


def required_columns(table: str) -> list[str]:
    """Return the columns ``table`` must have."""
    if table in RAW_SCHEMAS:
        return RAW_SCHEMAS[table].required_names
    if table in PRODUCT_REQUIRED:
        return list(PRODUCT_REQUIRED[table])
    raise ValueError(f"no suite for table {table!r}; known: {SUITE_TABLES}")


def natural_key(table: str) -> tuple[str, ...]:
    """Return the columns that identify a row of ``table``."""
    if table in RAW_SCHEMAS:
        return RAW_SCHEMAS[table].key
    return PRODUCT_KEYS[table]


def arm_pattern(channels: Iterable[str]) -> str:
    """Return the regex an arm name matches: ``control`` or ``{coupon_id}@{channel}``."""
    alternatives = "|".join(re.escape(c) for c in sorted(channels))
    return rf"^(?:{CONTROL_ARM}|[^@\s]+@(?:{alternatives}))$"


def _fmt(value: object) -> str:
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    if isinstance(value, float) and value.is_integer():
        return f"{value:,.0f}"
    return str(value)


def _not_null(col: str) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToNotBeNull(column=col, description=f"{col} must not be null or empty")


def _unique(cols: Sequence[str]) -> gxe.Expectation:
    if len(cols) == 1:
        return gxe.ExpectColumnValuesToBeUnique(column=cols[0], description=f"{cols[0]} must be unique")
    return gxe.ExpectCompoundColumnsToBeUnique(
        column_list=list(cols), description=f"({', '.join(cols)}) must be unique together"
    )


def _in_set(col: str, values: Iterable, *, allow_empty: bool = False) -> gxe.Expectation:
    allowed = sorted(set(values))
    shown = allowed + ([""] if allow_empty else [])
    return gxe.ExpectColumnValuesToBeInSet(
        column=col, value_set=shown, description=f"{col} must be one of {shown}"
    )


def _between(
    col: str,
    lo: object = None,
    hi: object = None,
    *,
    strict_lo: bool = False,
    row_condition: object = None,
    when: str = "",
) -> gxe.Expectation:
    if lo is not None and hi is not None:
        text = f"{col} must be in {'(' if strict_lo else '['}{_fmt(lo)}, {_fmt(hi)}]"
    elif lo is not None:
        text = f"{col} must be {'>' if strict_lo else '>='} {_fmt(lo)}"
    else:
        text = f"{col} must be <= {_fmt(hi)}"
    kwargs: dict = {"column": col, "min_value": lo, "max_value": hi, "strict_min": strict_lo,
                    "description": text + (f" when {when}" if when else "")}
    if row_condition is not None:
        kwargs["row_condition"] = row_condition
    return gxe.ExpectColumnValuesToBeBetween(**kwargs)


def _matches_or_empty(col: str, pattern: str, what: str) -> gxe.Expectation:
    return gxe.ExpectColumnValuesToMatchRegex(
        column=col, regex=f"^$|{pattern}", description=f"{col} must be {what} or empty"
    )


def _ts_sane(col: str, ctx: ValidationContext) -> gxe.Expectation:
    lo, hi = pd.Timestamp(ctx.shop_opened), pd.Timestamp(ctx.now)
    return gxe.ExpectColumnValuesToBeBetween(
        column=col, min_value=lo, max_value=hi,
        description=f"{col} must lie between the shop opening ({lo.isoformat()}) and now ({hi.isoformat()})",
    )


def _raw_extras(table: str, ctx: ValidationContext) -> list[gxe.Expectation]:
    """Return the table-specific value rules of a raw table."""
    cap = ctx.revenue_cap
    if table == "customers":
        return [_in_set("device", DEVICES), _in_set("segment", SEGMENTS)]
    if table == "contacts":
        return [
            _matches_or_empty("email", EMAIL_PATTERN, "an address like name@example.com (no spaces)"),
            _matches_or_empty("phone", PHONE_PATTERN, "an E.164 number like +15551234567"),
            _matches_or_empty("push_token", PUSH_TOKEN_PATTERN, "8 to 512 visible characters"),
        ]
    if table == "consent":
        return [_in_set("channel", ctx.channels), _in_set("opted_in", (0, 1))]
    if table == "channels":
        return [_in_set("channel", ctx.channels), _between("send_cost", 0.0),
                _between("daily_capacity", 1)]
    if table == "coupons":
        return [
            _in_set("kind", COUPON_KINDS),
            _between("face_value", 0.0, strict_lo=True),
            _between("face_value", 0.0, 100.0, strict_lo=True,
                     row_condition=Column("kind") == "percent_off", when="kind is percent_off"),
            _between("min_basket", 0.0),
            _between("inventory", 0),
            gxe.ExpectColumnPairValuesAToBeGreaterThanB(
                column_A="valid_to", column_B="valid_from", or_equal=True,
                description="valid_to must not be before valid_from",
            ),
        ]
    if table == "products":
        return [_between("price", 0.0, cap), _in_set("in_stock", (0, 1))]
    if table == "events":
        return [_in_set("event_type", EVENT_TYPES)]
    if table == "orders":
        return [_between("revenue", 0.0, cap), _between("n_items", 1)]
    if table == "campaign_log":
        return [
            gxe.ExpectColumnValuesToMatchRegex(
                column="arm", regex=arm_pattern(ctx.channels),
                description=f"arm must be '{CONTROL_ARM}' or '<coupon_id>@<channel>' with channel in "
                            f"{sorted(ctx.channels)}",
            ),
            _in_set("channel", ctx.channels, allow_empty=True),
            _in_set("policy", CAMPAIGN_LOG_POLICIES),
            _between("propensity", 0.0, 1.0, strict_lo=True),
            *[_in_set(c, (0, 1)) for c in ("opened", "clicked", "converted", "redeemed")],
            _between("revenue", 0.0, cap),
            _between("revenue", 0.0, 0.0, row_condition=Column("converted") == 0,
                     when="converted is 0"),
            _between("coupon_cost", 0.0),
        ]
    if table == "feedback":
        return [
            _in_set("event_type", FEEDBACK_EVENT_TYPES),
            _in_set("channel", ctx.channels, allow_empty=True),
            _between("revenue", 0.0, cap),
            _between("revenue", 0.0, 0.0, row_condition=Column("event_type") != "order",
                     when="event_type is not order"),
        ]
    return []


def _product_extras(table: str, ctx: ValidationContext, frame_columns: Sequence[str],
                    numeric: set[str]) -> list[gxe.Expectation]:
    """Return the value rules of a product table, some driven by the columns present."""
    cap = ctx.revenue_cap
    out: list[gxe.Expectation] = []
    if table == "feature_snapshot":
        # Features feed the model directly: any null is a bug upstream, never "missing data".
        out += [_not_null(c) for c in frame_columns if c != "customer_id"]
    elif table == "model_scores":
        for c in frame_columns:
            if c.startswith("p_conv__"):
                out.append(_between(c, 0.0, 1.0))
            elif c.startswith("uplift__"):
                out.append(_between(c, -1.0, 1.0))
            elif c.startswith("revenue__"):
                out.append(_between(c, 0.0, cap))
            if c in numeric:
                out.append(_not_null(c))
    elif table == "allocations":
        out += [
            _in_set("policy", ALLOCATION_POLICIES),
            _between("propensity", 0.0, 1.0, strict_lo=True),
            gxe.ExpectColumnValuesToMatchRegex(
                column="arm", regex=arm_pattern(ctx.channels),
                description="arm must be 'control' or '<coupon_id>@<channel>'",
            ),
        ]
        if "channel" in frame_columns:
            out.append(_in_set("channel", ctx.channels, allow_empty=True))
        out += [_between(c, 0.0) for c in ("expected_cost", "cost") if c in frame_columns]
    elif table == "deliveries":
        out.append(_in_set("channel", ctx.channels))
        if "attempts" in frame_columns:
            out.append(_between("attempts", 0))
        if "status" in frame_columns:
            out.append(_not_null("status"))
    return out


def build_suite(
    table: str,
    *,
    context: ValidationContext,
    columns: Sequence[str] | None = None,
    numeric_columns: Iterable[str] = (),
    name: str | None = None,
) -> gx.ExpectationSuite:
    """Build the expectation suite of ``table``.

    Args:
        table: One of :data:`SUITE_TABLES`.
        context: Run parameters (``now``, ``shop_opened``, ``revenue_cap``, ``channels``).
        columns: Columns of the frame to validate. Column rules are added only for columns that
            are present (a missing required column is reported once, by the schema expectation,
            instead of once per rule); product tables with open-ended columns (scores per arm,
            features) derive their rules from this list. ``None`` means the required columns.
        numeric_columns: Which of ``columns`` are numeric (model_scores: those must not be null).
        name: Suite name; defaults to ``couponops.<table>``.

    Returns:
        A ``gx.ExpectationSuite`` (not yet added to any context).
    """
    required = required_columns(table)
    present = list(columns) if columns is not None else list(required)
    has = set(present)
    exps: list[gxe.Expectation] = [
        gxe.ExpectTableColumnsToMatchSet(
            column_set=required, exact_match=False,
            description=f"{table} must have the columns {required}",
        ),
        gxe.ExpectTableRowCountToBeBetween(min_value=1, description=f"{table} must have at least one row"),
    ]
    if table in RAW_SCHEMAS:
        schema = RAW_SCHEMAS[table]
        exps += [_not_null(c.name) for c in schema.columns
                 if not c.empty_ok and not c.nullable and c.name in has]
        rules = _raw_extras(table, context)
    else:
        exps += [_not_null(c) for c in required if c in has and not c.startswith("p_conv__")]
        rules = _product_extras(table, context, present, set(numeric_columns))
    key = natural_key(table)
    if set(key) <= has:
        exps.append(_unique(key))
    exps += [_ts_sane(c, context) for c in TIMESTAMP_SANITY.get(table, ()) if c in has]
    for rule in rules:
        cols = [getattr(rule, a, None) for a in ("column", "column_A", "column_B")]
        condition = getattr(rule, "row_condition", None)
        cols.append(getattr(getattr(condition, "column", None), "name", None))
        if all(c is None or c in has for c in cols):
            exps.append(rule)
    suite = gx.ExpectationSuite(name=name or f"couponops.{table}")
    for e in exps:
        suite.add_expectation(e)
    return suite
