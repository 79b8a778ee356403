"""Incrementality of a campaign measured against its randomised holdout, and drift checks.

A campaign keeps a random control (holdout) group. What the campaign *caused* is the difference
between the treated and control groups, scaled to the treated population:

* conversions — :func:`incremental_lift` (difference of proportions, Newcombe interval);
* revenue or profit per customer — :func:`incremental_mean` (difference of means, Welch interval).

:func:`psi` measures how far a feature's distribution moved between two populations (e.g. the
training data and the customers just scored), used to trigger retraining.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

PSI_EPSILON = 1e-4


def _wilson(successes: int, n: int, z: float) -> tuple[float, float]:
    """Return the Wilson score interval of a proportion."""
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def incremental_lift(
    treated_conversions: int,
    treated_n: int,
    control_conversions: int,
    control_n: int,
    alpha: float = 0.05,
    *,
    method: str = "newcombe",
) -> dict[str, Any]:
    """Measure the conversions a campaign caused, from treated and holdout counts.

    The interval on the rate difference is Newcombe's hybrid score interval (method 10 of
    Newcombe 1998, built from two Wilson intervals), which keeps close to nominal coverage for
    small rates; ``method="wald"`` gives the textbook normal interval. The p-value is the pooled
    two-proportion z-test.

    Args:
        treated_conversions: Converted customers in the treated group.
        treated_n: Customers in the treated group.
        control_conversions: Converted customers in the control group.
        control_n: Customers in the control group.
        alpha: One minus the confidence level.
        method: ``"newcombe"`` (default) or ``"wald"``.

    Returns:
        Dict with ``rate_treated, rate_control, absolute_lift`` (rate difference),
        ``absolute_lift_pp`` (percentage points), ``relative_lift`` (NaN when the control rate is
        0), ``ci_low, ci_high`` (on the rate difference), ``ci_low_pp, ci_high_pp``,
        ``incremental_conversions`` (``treated_n * difference``) with
        ``incremental_conversions_ci_low/high`` (aliased ``incremental_ci_low/high``), ``p_value``,
        ``alpha``, ``method``, ``treated_n``, ``control_n``. Every number is NaN when either group
        is empty.
    """
    for name, count, n in (
        ("treated", treated_conversions, treated_n),
        ("control", control_conversions, control_n),
    ):
        if n < 0 or not 0 <= count <= max(n, 0):
            raise ValueError(f"{name}_conversions must lie in [0, {name}_n], got {count} of {n}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if method not in ("newcombe", "wald"):
        raise ValueError(f"method must be 'newcombe' or 'wald', got {method!r}")
    if treated_n == 0 or control_n == 0:
        # A group with no customers (e.g. an arm nobody got) has no measurable lift; report NaN
        # instead of failing the whole campaign report.
        return _lift_result(
            math.nan, math.nan, math.nan, math.nan, math.nan, treated_n, control_n, alpha, method
        )
    z = float(stats.norm.ppf(1 - alpha / 2))
    p_t = treated_conversions / treated_n
    p_c = control_conversions / control_n
    diff = p_t - p_c
    if method == "newcombe":
        l_t, u_t = _wilson(treated_conversions, treated_n, z)
        l_c, u_c = _wilson(control_conversions, control_n, z)
        ci_low = diff - math.sqrt((p_t - l_t) ** 2 + (u_c - p_c) ** 2)
        ci_high = diff + math.sqrt((u_t - p_t) ** 2 + (p_c - l_c) ** 2)
    else:
        se = math.sqrt(p_t * (1 - p_t) / treated_n + p_c * (1 - p_c) / control_n)
        ci_low, ci_high = diff - z * se, diff + z * se
    pooled = (treated_conversions + control_conversions) / (treated_n + control_n)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / treated_n + 1 / control_n))
    p_value = float(2 * stats.norm.sf(abs(diff) / se_pooled)) if se_pooled > 0 else 1.0
    return _lift_result(p_t, p_c, ci_low, ci_high, p_value, treated_n, control_n, alpha, method)


def _lift_result(
    p_t: float,
    p_c: float,
    ci_low: float,
    ci_high: float,
    p_value: float,
    treated_n: int,
    control_n: int,
    alpha: float,
    method: str,
) -> dict[str, Any]:
    diff = p_t - p_c
    inc_low, inc_high = treated_n * ci_low, treated_n * ci_high
    return {
        "rate_treated": p_t,
        "rate_control": p_c,
        "absolute_lift": diff,
        "absolute_lift_pp": 100 * diff,
        "relative_lift": diff / p_c if p_c > 0 else math.nan,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "ci_low_pp": 100 * ci_low,
        "ci_high_pp": 100 * ci_high,
        "incremental_conversions": treated_n * diff,
        "incremental_conversions_ci_low": inc_low,
        "incremental_conversions_ci_high": inc_high,
        # Short aliases of the two keys above (mlpkg.feedback reads these).
        "incremental_ci_low": inc_low,
        "incremental_ci_high": inc_high,
        "p_value": p_value,
        "alpha": alpha,
        "method": method,
        "treated_n": int(treated_n),
        "control_n": int(control_n),
    }


def incremental_mean(
    treated_values: np.ndarray,
    control_values: np.ndarray,
    alpha: float = 0.05,
    *,
    treated_population: int | None = None,
) -> dict[str, Any]:
    """Measure the incremental revenue (or any per-customer amount) a campaign caused.

    Uses the difference of means with a Welch (unequal variances) t interval, then scales it to
    the treated population.

    Args:
        treated_values: Per-customer amount in the treated group (0 for non-buyers).
        control_values: Per-customer amount in the control group.
        alpha: One minus the confidence level.
        treated_population: Customers to scale to; defaults to ``len(treated_values)``.

    Returns:
        Dict with ``mean_treated, mean_control, difference, stderr, df, ci_low, ci_high`` (per
        customer), ``incremental_total, incremental_total_ci_low, incremental_total_ci_high``
        (scaled to the treated population), ``p_value``, ``alpha``, ``treated_n``, ``control_n``.
        Means are NaN for an empty group; interval and p-value are NaN with fewer than two values
        in a group.
    """
    xt = np.asarray(treated_values, dtype=np.float64)
    xc = np.asarray(control_values, dtype=np.float64)
    if not (np.all(np.isfinite(xt)) and np.all(np.isfinite(xc))):
        raise ValueError("values must be finite")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    n_t, n_c = len(xt), len(xc)
    mean_t = float(xt.mean()) if n_t else math.nan
    mean_c = float(xc.mean()) if n_c else math.nan
    diff = mean_t - mean_c
    # A variance needs two values per group; with fewer the interval is unknown (NaN), not zero.
    var_t = float(np.var(xt, ddof=1)) / n_t if n_t >= 2 else math.nan
    var_c = float(np.var(xc, ddof=1)) / n_c if n_c >= 2 else math.nan
    se = math.sqrt(var_t + var_c)
    if math.isnan(se):
        df, q, p_value = math.nan, math.nan, math.nan
    elif se > 0:
        # Welch–Satterthwaite degrees of freedom.
        df = (var_t + var_c) ** 2 / (var_t**2 / (n_t - 1) + var_c**2 / (n_c - 1))
        q = float(stats.t.ppf(1 - alpha / 2, df))
        p_value = float(2 * stats.t.sf(abs(diff) / se, df))
    else:
        df, q, p_value = float(n_t + n_c - 2), 0.0, (1.0 if diff == 0 else 0.0)
    scale = n_t if treated_population is None else int(treated_population)
    ci_low, ci_high = diff - q * se, diff + q * se
    return {
        "mean_treated": mean_t,
        "mean_control": mean_c,
        "difference": diff,
        "stderr": se,
        "df": float(df),
        "ci_low": ci_low,
        "ci_high": ci_high,
        "incremental_total": scale * diff,
        "incremental_total_ci_low": scale * ci_low,
        "incremental_total_ci_high": scale * ci_high,
        "p_value": p_value,
        "alpha": alpha,
        "treated_n": n_t,
        "control_n": n_c,
    }


def _psi_from_shares(expected_share: np.ndarray, actual_share: np.ndarray) -> float:
    e = np.clip(expected_share, PSI_EPSILON, None)
    a = np.clip(actual_share, PSI_EPSILON, None)
    return float(np.sum((a - e) * np.log(a / e)))


def psi(expected: np.ndarray, actual: np.ndarray, bins: int = 10) -> float:
    """Compute the population stability index of a numeric variable.

    Bin edges are the quantiles of ``expected`` (duplicates merged, outer edges open), so each bin
    holds about the same share of the reference population; empty bins get a share of
    ``PSI_EPSILON`` so the log stays finite. NaNs are dropped. Rule of thumb: < 0.1 stable,
    0.1-0.2 moderate shift, > 0.2 significant shift.

    Args:
        expected: Reference sample (e.g. training data).
        actual: New sample (e.g. the customers scored today).
        bins: Number of quantile bins.

    Returns:
        PSI ``sum((a - e) * ln(a / e))`` over bins; NaN when either sample has no non-NaN value.
    """
    e = np.asarray(expected, dtype=np.float64)
    a = np.asarray(actual, dtype=np.float64)
    e, a = e[~np.isnan(e)], a[~np.isnan(a)]
    if bins < 1:
        raise ValueError("bins must be >= 1")
    if e.size == 0 or a.size == 0:
        # Nothing to compare (e.g. a feature missing in one period): unknown drift, not a crash.
        return math.nan
    inner = np.unique(np.quantile(e, np.linspace(0, 1, bins + 1)[1:-1]))
    e_idx = np.searchsorted(inner, e, side="right")
    a_idx = np.searchsorted(inner, a, side="right")
    n_bins = len(inner) + 1
    e_share = np.bincount(e_idx, minlength=n_bins) / e.size
    a_share = np.bincount(a_idx, minlength=n_bins) / a.size
    return _psi_from_shares(e_share, a_share)


def psi_by_column(
    expected: pd.DataFrame, actual: pd.DataFrame, columns: list[str] | None = None, bins: int = 10
) -> pd.Series:
    """Compute the PSI of every shared column of two frames.

    Numeric columns use :func:`psi`; other columns compare category shares (missing values count
    as their own category).

    Args:
        expected: Reference frame.
        actual: New frame.
        columns: Columns to compare; defaults to the columns both frames share.
        bins: Quantile bins for numeric columns.

    Returns:
        PSI per column, sorted from most to least shifted.
    """
    cols = columns if columns is not None else [c for c in expected.columns if c in actual.columns]
    values = {}
    for col in cols:
        if pd.api.types.is_numeric_dtype(expected[col]) and pd.api.types.is_numeric_dtype(actual[col]):
            e = expected[col].to_numpy(dtype=np.float64, na_value=np.nan)
            a = actual[col].to_numpy(dtype=np.float64, na_value=np.nan)
            values[col] = psi(e, a, bins)
        else:
            e_share = expected[col].astype("string").fillna("<NA>").value_counts(normalize=True)
            a_share = actual[col].astype("string").fillna("<NA>").value_counts(normalize=True)
            cats = e_share.index.union(a_share.index)
            values[col] = _psi_from_shares(
                e_share.reindex(cats, fill_value=0.0).to_numpy(dtype=np.float64),
                a_share.reindex(cats, fill_value=0.0).to_numpy(dtype=np.float64),
            )
    return pd.Series(values, dtype=np.float64, name="psi").sort_values(ascending=False)
