"""The campaign report a product owner reads in a minute: one self-contained HTML page (Jinja2).

Everything is in the page (plots inline as PNG, styles inline, no CDN), so it opens offline,
from an e-mail or from MLflow's artifact view. The fair comparison — customers the model chose
against the randomised control group — leads; the comparison of every treated customer with the
control group is biased by that selection and is shown only labelled as such.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

#: Symbols for the usual currencies; any other ISO code is written before the amount.
_SYMBOLS = {"EUR": "€", "USD": "$", "GBP": "£", "JPY": "¥", "CHF": "CHF ", "SEK": "SEK "}

GLOSSARY: tuple[tuple[str, str], ...] = (
    ("Model policy", "customers the champion model chose for a coupon (the campaign's main group)."),
    ("Random control", "customers drawn at random before allocation and sent nothing: what would have "
                       "happened without a coupon."),
    ("Exploration", "customers given a random coupon so the next model learns about every arm."),
    ("Incremental conversions", "conversions the coupons caused: the group's conversions minus what "
                                "its customers would have done at the control group's rate."),
    ("Incremental revenue", "revenue the coupons caused, measured the same way."),
    ("Profit", "margin × incremental revenue − what the coupons and messages cost."),
    ("ROI", "profit ÷ cost."),
    ("95% interval", "the range that holds the true value in 95 of 100 such campaigns."),
)

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>CouponOps · campaign {{ c.campaign_id }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:960px;color:#222;
     padding:0 1rem;line-height:1.4}
h1{margin-bottom:.2rem} .sub{color:#666;margin-top:0}
.headline{display:grid;grid-template-columns:repeat(auto-fit,minmax(200px,1fr));gap:.8rem;margin:1.2rem 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.7rem .9rem;background:#fafafa}
.card .k{font-size:.8rem;color:#666;text-transform:uppercase;letter-spacing:.03em}
.card .v{font-size:1.5rem;font-weight:600} .card .ci{font-size:.85rem;color:#555}
table{border-collapse:collapse;font-size:.9rem;margin:.5rem 0 1rem}
td,th{border-bottom:1px solid #e3e3e3;padding:.3rem .6rem;text-align:right} th{background:#f3f3f3}
td:first-child,th:first-child{text-align:left}
.note{color:#555;font-size:.9rem} details{margin:1rem 0} img{max-width:100%}
dl.glossary dt{font-weight:600} dl.glossary dd{margin:0 0 .4rem 0;color:#444}
</style></head><body>
<h1>Campaign {{ c.campaign_id }}</h1>
<p class="sub">Sent {{ c.sent_on }} · measured {{ c.measured_on }} ({{ c.window_days }}-day attribution
window) · objective: {{ c.objective }} · model
{% if c.model_url %}<a href="{{ c.model_url }}">{{ c.model }}</a>{% else %}{{ c.model }}{% endif %}</p>

<section class="headline" aria-label="headline">
  <div class="card"><div class="k">Incremental conversions</div><div class="v">{{ h.incremental }}</div>
    <div class="ci">95% interval {{ h.incremental_ci }}</div></div>
  <div class="card"><div class="k">Incremental revenue</div><div class="v">{{ h.revenue }}</div>
    <div class="ci">95% interval {{ h.revenue_ci }}</div></div>
  <div class="card"><div class="k">Profit</div><div class="v">{{ h.profit }}</div>
    <div class="ci">95% interval {{ h.profit_ci }}</div></div>
  <div class="card"><div class="k">Spend vs budget</div><div class="v">{{ h.spend }}</div>
    <div class="ci">of {{ h.budget }} budget ({{ h.burn }}); planned {{ h.committed }}</div></div>
  <div class="card"><div class="k">Messages sent</div><div class="v">{{ h.sent }}</div>
    <div class="ci">{{ h.population }} customers; {{ h.control }} in the random control group</div></div>
  <div class="card"><div class="k">ROI</div><div class="v">{{ h.roi }}</div>
    <div class="ci">95% interval {{ h.roi_ci }}</div></div>
</section>
<p class="note">The numbers above compare the customers the model chose with the random control group,
so they measure what the coupons caused (margin {{ c.margin }}, money in {{ c.currency }}).</p>

<h2>Did the model's targeting work?</h2>
<table><thead><tr>{% for col in fair.columns %}<th>{{ col }}</th>{% endfor %}</tr></thead><tbody>
{% for row in fair.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>

<h2>What was sent</h2>
<table><thead><tr><th>Coupon</th><th>Channel</th><th>Policy</th><th>Customers</th><th>Messages sent</th></tr>
</thead><tbody>
{% for r in sent %}<tr><td>{{ r.coupon }}</td><td>{{ r.channel }}</td><td>{{ r.policy }}</td>
<td>{{ r.customers }}</td><td>{{ r.sent }}</td></tr>{% endfor %}
</tbody></table>

{% if drivers %}<h2>What drives the uplift</h2>
<p class="note">How much each customer feature moves the model's predicted uplift (the conversion
probability with a coupon minus without), on average over the coupons and over
{{ drivers.explained }} held-out customers, measured when {{ c.model }} was trained
({{ drivers.method }}; the training run's <code>attributions/</code> artifacts hold every coupon and
feature).</p>
<table><thead><tr>{% for col in drivers.columns %}<th>{{ col }}</th>{% endfor %}</tr></thead><tbody>
{% for row in drivers.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>{% endif %}

{% for section in breakdowns %}
<h2>{{ section.title }}</h2>
<table><thead><tr>{% for col in section.columns %}<th>{{ col }}</th>{% endfor %}</tr></thead><tbody>
{% for row in section.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table>
{% endfor %}

{% for fig in figures %}<h2>{{ fig.title }}</h2>
<img alt="{{ fig.title }}" src="data:image/png;base64,{{ fig.png }}">
{% endfor %}

{% if biased %}<details><summary>All treated customers vs the random control group
(biased: for reference only)</summary>
<p class="note">Treated customers were chosen by the model or by exploration, so they would
convert at another rate than the random control group even without a coupon. This comparison
mixes the coupons' effect with that selection; use the model-policy rows above.</p>
<table><thead><tr>{% for col in biased.columns %}<th>{{ col }}</th>{% endfor %}</tr></thead><tbody>
{% for row in biased.rows %}<tr>{% for v in row %}<td>{{ v }}</td>{% endfor %}</tr>{% endfor %}
</tbody></table></details>{% endif %}

<h2>Glossary</h2><dl class="glossary">
{% for term, text in glossary %}<dt>{{ term }}</dt><dd>{{ text }}</dd>{% endfor %}</dl>
</body></html>
"""


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(float(x))


def money(x: Any, currency: str, *, decimals: int = 0) -> str:
    """Return an amount in the shop's currency (``€1,234``); ``–`` when unknown."""
    if not _finite(x):
        return "–"
    symbol = _SYMBOLS.get(currency.upper(), f"{currency.upper()} ")
    sign = "−" if x < 0 else ""
    return f"{sign}{symbol}{abs(float(x)):,.{decimals}f}"


def count(x: Any, decimals: int = 0) -> str:
    """Return a count with thousands separators (signed when ``decimals`` > 0); ``–`` when unknown."""
    if not _finite(x):
        return "–"
    return f"{float(x):+,.{decimals}f}".replace("-", "−") if decimals else f"{float(x):,.0f}"


def pct(x: Any, decimals: int = 1) -> str:
    """Return a rate as a percentage (``14.5%``); ``–`` when unknown."""
    return f"{100 * float(x):.{decimals}f}%".replace("-", "−") if _finite(x) else "–"


def points(x: Any) -> str:
    """Return a probability difference in percentage points (``4.12 pts``, ``0.021 pts``)."""
    if not _finite(x):
        return "–"
    value = 100 * float(x)
    return f"{value:.{2 if abs(value) >= 0.1 else 3}f} pts".replace("-", "−")


def interval(lo: Any, hi: Any, fmt) -> str:  # noqa: ANN001 - a formatter of one value
    """Return ``[lo, hi]`` formatted by ``fmt``; ``–`` when either bound is unknown."""
    return f"[{fmt(lo)}, {fmt(hi)}]" if _finite(lo) and _finite(hi) else "–"


def _num(x: Any, default: float = math.nan) -> float:
    """Return ``x`` as a float; ``default`` for None, NaN or anything that is not a number."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return default
    return value if math.isfinite(value) else default


def interval_bounds(group: Mapping[str, Any], key: str) -> tuple[float, float]:
    """Return the 95% bounds ``<key>_ci`` of a measured group (NaN where unknown)."""
    bounds = group.get(f"{key}_ci")
    if not isinstance(bounds, list | tuple) or len(bounds) != 2:
        return math.nan, math.nan
    return _num(bounds[0]), _num(bounds[1])


def group_numbers(group: Mapping[str, Any], margin: float) -> dict[str, Any]:
    """Return a measured group's profit and ROI with their intervals (cost is known exactly)."""
    cost = _num(group.get("coupon_cost"), 0.0) + _num(group.get("send_cost"), 0.0)
    rev = _num(group.get("incremental_revenue"))
    lo, hi = interval_bounds(group, "incremental_revenue")
    profit = margin * rev - cost
    out = {"cost": cost, "profit": profit, "profit_ci": (margin * lo - cost, margin * hi - cost)}
    out["roi"] = profit / cost if cost > 0 else math.nan
    out["roi_ci"] = tuple(p / cost if cost > 0 else math.nan for p in out["profit_ci"])
    return out


def comparison_table(groups: Sequence[tuple[str, Mapping[str, Any]]], margin: float, currency: str) -> dict:
    """Return readable columns and rows comparing groups with the random control group."""
    columns = ["Group", "Customers", "Sent", "Conversion rate", "Control rate", "Incremental conversions",
               "95% interval", "Incremental revenue", "Profit (95% interval)", "ROI (95% interval)"]
    rows = []
    for name, g in groups:
        extra = group_numbers(g, margin)
        lo, hi = interval_bounds(g, "incremental_conversions")
        rows.append([
            name,
            count(g.get("customers")),
            count(g.get("delivered")),
            pct(g.get("cvr")),
            pct(g.get("control_cvr")),
            count(g.get("incremental_conversions"), 1),
            interval(lo, hi, lambda v: count(v, 1)),
            money(g.get("incremental_revenue"), currency),
            f"{money(extra['profit'], currency)} "
            f"{interval(*extra['profit_ci'], lambda v: money(v, currency))}",
            f"{pct(extra['roi'], 0)} {interval(*extra['roi_ci'], lambda v: pct(v, 0))}",
        ])
    return {"columns": columns, "rows": rows}


#: Readable names of the attribution methods.
_METHODS = {
    "integrated_gradients": "integrated gradients",
    "tree_shap": "tree SHAP",
    "linear": "exact linear terms",
}


def driver_table(drivers: Mapping[str, Any] | None) -> dict | None:
    """Return the "What drives the uplift" table of a model's logged global attributions (or None)."""
    if not drivers or not drivers.get("features"):
        return None
    rows = [[f["feature"], points(f["mean_abs"]), f.get("direction") or "–"]
            for f in drivers["features"]]  # fmt: skip
    return {
        "columns": ["Feature", "Mean size of its contribution", "Direction"],
        "rows": rows,
        "explained": count(drivers.get("rows")),
        "method": _METHODS.get(drivers.get("method"), str(drivers.get("method"))),
    }


def render(context: Mapping[str, Any]) -> str:
    """Render the page (autoescaped) from the values :func:`mlpkg.reports.campaign_report` gathers."""
    import jinja2

    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return env.from_string(TEMPLATE).render(glossary=GLOSSARY, **context)
