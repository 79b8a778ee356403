"""Uplift ranking metrics, calibration checks and their plots.

All curves rank customers by a predicted uplift score (highest first) and read the observed
outcome of treated and control customers in the top fraction ``f`` of that ranking. Ties in the
score are kept together: the curves are only evaluated at distinct score values, so tied customers
are never split in an arbitrary order.

When ``propensity`` is given (probability of the arm each customer was actually logged in), every
count is inverse-propensity weighted, so a campaign with unequal arm shares or targeted logging
still gives unbiased curves.

Definitions used here (``T``/``C`` = treated/control, ``Y`` = conversions, ``N`` = customers, ``(f)``
= within the top fraction ``f``, no ``(f)`` = whole sample):

* Qini curve ``q(f) = Y_T(f) / N_T - Y_C(f) / N_C``. This is Radcliffe's Qini ``Y_T(f) - Y_C(f)
  N_T(f) / N_C(f)`` divided by ``N_T``, with the treated:control ratio taken over the whole sample
  instead of the top-``f`` prefix (the two agree in expectation under randomisation; the global
  ratio avoids dividing by near-empty control counts at the top of the ranking and makes the curve
  exactly antisymmetric). ``q(f)`` reads as *incremental conversions per customer of the
  population* gained by treating the top ``f``; ``q(1)`` is the observed average treatment effect.
* Qini coefficient: area between ``q`` and the random-targeting line ``f * q(1)``, integrated over
  ``f`` in [0, 1]. Because ``q`` is already per customer, the coefficient does not grow with the
  sample size and can be compared across test sets; 0 means no better than random, negative means
  worse than random.
* Uplift curve ``u(f) = f * (Y_T(f) / N_T(f) - Y_C(f) / N_C(f))`` (Rzepakowski & Jaroszewicz) and
  AUUC = area under ``u`` on [0, 1] (random targeting gives about ``ATE / 2``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlpkg.evaluation.ope import ips as ips_estimate
from mlpkg.evaluation.ope import snips as snips_estimate


def _prepare(
    uplift_scores: Any, treated: Any, y: Any, propensity: Any | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    s = np.asarray(uplift_scores, dtype=np.float64)
    t = np.asarray(treated).astype(bool)
    yy = np.asarray(y, dtype=np.float64)
    if s.ndim != 1:
        raise ValueError(f"uplift_scores must be one-dimensional, got shape {s.shape}")
    if not (len(s) == len(t) == len(yy)):
        raise ValueError(f"uplift_scores, treated and y differ in length: {len(s)}, {len(t)}, {len(yy)}")
    if not np.all(np.isfinite(s)):
        raise ValueError("uplift_scores contains NaN or infinite values")
    if propensity is None:
        w = np.ones_like(s)
    else:
        p = np.asarray(propensity, dtype=np.float64)
        if p.shape != s.shape:
            raise ValueError("propensity must have the same length as uplift_scores")
        if np.any(~np.isfinite(p)) or np.any(p <= 0) or np.any(p > 1):
            raise ValueError("propensity must lie in (0, 1]")
        w = 1.0 / p
    return s, t, yy, w


def _cumulative_by_threshold(
    s: np.ndarray, t: np.ndarray, y: np.ndarray, w: np.ndarray
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Cumulate treated/control weights and outcomes at each distinct score, highest first."""
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    # Last index of each run of equal scores: the curve is only defined between tie groups.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    wt = (w * t)[order]
    wc = (w * ~t)[order]
    sums = {
        "n_t": np.cumsum(wt)[ends],
        "n_c": np.cumsum(wc)[ends],
        "y_t": np.cumsum(wt * y[order])[ends],
        "y_c": np.cumsum(wc * y[order])[ends],
    }
    fraction = (ends + 1) / len(s)
    zero = np.zeros(1)
    return np.r_[zero, fraction], {k: np.r_[zero, v] for k, v in sums.items()}


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0))


def qini_curve(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the (per-customer) Qini curve of an uplift ranking.

    See the module docstring for the exact definition.

    Args:
        uplift_scores: Predicted uplift per customer; higher means target first.
        treated: Boolean, True for customers who received the treatment.
        y: Observed outcome (0/1 conversion, or any reward).
        propensity: Probability of the logged arm per customer; enables IPW weighting.

    Returns:
        ``(fraction, qini)``: population fraction targeted (starting at 0, ending at 1) and the
        incremental outcome per customer of the population at that fraction.
    """
    s, t, yy, w = _prepare(uplift_scores, treated, y, propensity)
    if not t.any() or t.all():
        raise ValueError("qini_curve needs both treated and control customers")
    fraction, c = _cumulative_by_threshold(s, t, yy, w)
    qini = c["y_t"] / c["n_t"][-1] - c["y_c"] / c["n_c"][-1]
    return fraction, qini


def qini_coefficient(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray | None = None,
) -> float:
    """Compute the area between the Qini curve and the random-targeting line.

    The curve is per customer (divided by the treated and control totals), so the coefficient is
    in units of "incremental outcome per customer x population fraction" and does not depend on
    the sample size. 0 = random ranking, > 0 better than random, < 0 worse.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        propensity: Probability of the logged arm per customer; enables IPW weighting.

    Returns:
        The Qini coefficient.
    """
    fraction, qini = qini_curve(uplift_scores, treated, y, propensity)
    random_line = fraction * qini[-1]
    return _trapezoid(qini - random_line, fraction)


def uplift_curve(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute the uplift curve ``f * (treated rate - control rate)`` within the top fraction ``f``.

    Points where the top fraction has no treated or no control customer are 0.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        propensity: Probability of the logged arm per customer; enables IPW weighting.

    Returns:
        ``(fraction, uplift)``.
    """
    s, t, yy, w = _prepare(uplift_scores, treated, y, propensity)
    fraction, c = _cumulative_by_threshold(s, t, yy, w)
    both = (c["n_t"] > 0) & (c["n_c"] > 0)
    rate_t = np.divide(c["y_t"], c["n_t"], out=np.zeros_like(c["y_t"]), where=both)
    rate_c = np.divide(c["y_c"], c["n_c"], out=np.zeros_like(c["y_c"]), where=both)
    return fraction, fraction * (rate_t - rate_c)


def auuc(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray | None = None,
) -> float:
    """Compute the area under the uplift curve (see :func:`uplift_curve`) over ``f`` in [0, 1].

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        propensity: Probability of the logged arm per customer; enables IPW weighting.

    Returns:
        AUUC; random targeting scores about half the observed average treatment effect.
    """
    fraction, curve = uplift_curve(uplift_scores, treated, y, propensity)
    return _trapezoid(curve, fraction)


def uplift_at_k(uplift_scores: np.ndarray, treated: np.ndarray, y: np.ndarray, k: float) -> float:
    """Compute the observed treated minus control rate within the top ``k`` fraction of the ranking.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        k: Fraction of the population to keep, in (0, 1].

    Returns:
        ``mean(y | treated, top k) - mean(y | control, top k)``; NaN when the top ``k`` holds no
        treated or no control customer.
    """
    if not 0 < k <= 1:
        raise ValueError(f"k must lie in (0, 1], got {k}")
    s, t, yy, _ = _prepare(uplift_scores, treated, y, None)
    top = np.argsort(-s, kind="stable")[: max(1, math.ceil(k * len(s)))]
    t_top, y_top = t[top], yy[top]
    if not t_top.any() or t_top.all():
        return math.nan
    return float(y_top[t_top].mean() - y_top[~t_top].mean())


def calibration_table(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> pd.DataFrame:
    """Bin predicted probabilities into equal-width bins and compare them with observed rates.

    Args:
        p: Predicted probabilities in [0, 1].
        y: Observed 0/1 outcomes.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        One row per non-empty bin: ``bin, p_low, p_high, n, mean_predicted, observed_rate, abs_gap``.
    """
    pp = np.asarray(p, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    if pp.shape != yy.shape or pp.ndim != 1:
        raise ValueError("p and y must be one-dimensional arrays of the same length")
    if np.any(~np.isfinite(pp)) or np.any(pp < 0) or np.any(pp > 1):
        raise ValueError("p must be probabilities in [0, 1]")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # p == 1.0 belongs to the last bin, not to an extra one.
    bins = np.minimum(np.floor(pp * n_bins).astype(np.int64), n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins)
    sum_p = np.bincount(bins, weights=pp, minlength=n_bins)
    sum_y = np.bincount(bins, weights=yy, minlength=n_bins)
    keep = counts > 0
    mean_p = sum_p[keep] / counts[keep]
    rate = sum_y[keep] / counts[keep]
    return pd.DataFrame(
        {
            "bin": np.arange(n_bins)[keep],
            "p_low": edges[:-1][keep],
            "p_high": edges[1:][keep],
            "n": counts[keep],
            "mean_predicted": mean_p,
            "observed_rate": rate,
            "abs_gap": np.abs(mean_p - rate),
        }
    )


def expected_calibration_error(p: np.ndarray, y: np.ndarray, n_bins: int = 10) -> float:
    """Compute the expected calibration error: bin-size-weighted mean ``|mean p - observed rate|``.

    Args:
        p: Predicted probabilities in [0, 1].
        y: Observed 0/1 outcomes.
        n_bins: Number of equal-width bins on [0, 1].

    Returns:
        ECE in probability units (0 = perfectly calibrated).
    """
    table = calibration_table(p, y, n_bins)
    if table.empty:
        return math.nan
    return float(np.sum(table["n"] * table["abs_gap"]) / table["n"].sum())


def uplift_by_decile(
    uplift_scores: np.ndarray, treated: np.ndarray, y: np.ndarray, n_bins: int = 10
) -> pd.DataFrame:
    """Compare predicted and observed uplift in equal-size groups of the ranking.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        n_bins: Number of groups (10 = deciles); group 1 holds the highest scores.

    Returns:
        One row per group: ``decile, n, n_treated, n_control, predicted_uplift, treated_rate,
        control_rate, observed_uplift`` (rates NaN where a group lacks treated or control rows).
    """
    s, t, yy, _ = _prepare(uplift_scores, treated, y, None)
    order = np.argsort(-s, kind="stable")
    group = np.empty(len(s), dtype=np.int64)
    group[order] = np.arange(len(s)) * n_bins // max(len(s), 1) + 1
    frame = pd.DataFrame({"decile": group, "score": s, "treated": t, "y": yy})
    rows = []
    for decile, g in frame.groupby("decile", sort=True):
        yt, yc = g.loc[g["treated"], "y"], g.loc[~g["treated"], "y"]
        rate_t = float(yt.mean()) if len(yt) else math.nan
        rate_c = float(yc.mean()) if len(yc) else math.nan
        rows.append(
            {
                "decile": int(decile),
                "n": len(g),
                "n_treated": len(yt),
                "n_control": len(yc),
                "predicted_uplift": float(g["score"].mean()),
                "treated_rate": rate_t,
                "control_rate": rate_c,
                "observed_uplift": rate_t - rate_c,
            }
        )
    return pd.DataFrame(rows)


def _same_arm(chosen_arm: Any, logged_arm: Any) -> np.ndarray:
    chosen = np.asarray(chosen_arm)
    logged = np.asarray(logged_arm)
    if chosen.shape != logged.shape:
        raise ValueError(f"chosen_arm and logged_arm differ in shape: {chosen.shape} vs {logged.shape}")
    if chosen.dtype.kind in "iub" and logged.dtype.kind in "iub":
        return chosen == logged
    # Mixed or string labels: compare as text so "3" and 3 or object/str dtypes still match.
    return chosen.astype(str) == logged.astype(str)


def ipw_policy_value(
    chosen_arm: np.ndarray,
    logged_arm: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    snips: bool = True,
) -> float:
    """Estimate the value per customer of a deterministic policy from a randomised log.

    Args:
        chosen_arm: Arm the evaluated policy picks for each customer (names or indices).
        logged_arm: Arm the customer was actually logged in.
        y: Observed reward per customer.
        propensity: Probability of the logged arm, in (0, 1].
        snips: Self-normalise the weights (lower variance); False gives plain IPS.

    Returns:
        Estimated reward per customer under the policy (NaN for SNIPS if the policy never agrees
        with the log).
    """
    match = _same_arm(chosen_arm, logged_arm).astype(np.float64)
    estimate = snips_estimate if snips else ips_estimate
    return estimate(match, propensity, y).value


def consent_eligibility(frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
    """Return which treatment arms each logged row could have received, from its consent features.

    A randomized campaign draws each customer's arm among control and the arms on channels they
    consented to, which the ``consent_{channel}`` features (as of the send) record. An arm
    ``"{coupon}@{channel}"`` is open to rows whose ``consent_{channel}`` is positive; an arm
    without a channel in its name, or whose channel has no consent column in ``frame``, is open
    to every row (nothing says otherwise).

    Args:
        frame: Logged rows, with ``consent_{channel}`` columns where known.
        arms: Arm names, ``arms[0]`` = control.

    Returns:
        ``bool [n, len(arms) - 1]``.
    """
    columns = []
    for arm in list(arms)[1:]:
        _, sep, channel = str(arm).partition("@")
        column = f"consent_{channel}"
        if sep and column in frame.columns:
            columns.append(frame[column].to_numpy(dtype=np.float64) > 0)
        else:
            columns.append(np.ones(len(frame), dtype=bool))
    return np.column_stack(columns) if columns else np.ones((len(frame), 0), dtype=bool)


def _per_arm_metric(
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], float],
    p_conv: np.ndarray,
    logged_arm_idx: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    arms: Sequence[str] | None,
    eligible: np.ndarray | None,
) -> dict[str, float]:
    probs = np.asarray(p_conv, dtype=np.float64)
    idx = np.asarray(logged_arm_idx, dtype=np.int64)
    yy = np.asarray(y, dtype=np.float64)
    prop = np.asarray(propensity, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[0] != idx.shape[0]:
        raise ValueError("p_conv must be an [n, A] matrix with one row per logged customer")
    n_arms = probs.shape[1]
    if arms is not None and len(arms) != n_arms:
        raise ValueError(f"arms names {len(arms)} arms but p_conv has {n_arms} columns")
    if eligible is not None:
        eligible = np.asarray(eligible, dtype=bool)
        if eligible.shape != (probs.shape[0], n_arms - 1):
            raise ValueError(f"eligible must be [{probs.shape[0]}, {n_arms - 1}], got {eligible.shape}")
    names = list(arms) if arms is not None else [str(j) for j in range(n_arms)]
    result: dict[str, float] = {}
    in_control = idx == 0
    for j in range(1, n_arms):
        rows = in_control | (idx == j)
        if eligible is not None:
            rows &= eligible[:, j - 1]
        treated = idx[rows] == j
        if not treated.any() or treated.all():
            result[names[j]] = math.nan
            continue
        score = probs[rows, j] - probs[rows, 0]
        result[names[j]] = metric(score, treated, yy[rows], prop[rows])
    return result


def multi_arm_qini(
    p_conv: np.ndarray,
    logged_arm_idx: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    arms: Sequence[str] | None = None,
    eligible: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute a Qini coefficient per treatment arm of a multi-arm model.

    For arm ``j`` the score is ``p_conv[:, j] - p_conv[:, 0]`` and only customers logged in
    control (column 0) or in arm ``j`` are used, IPW-weighted by ``propensity``. With
    ``eligible``, only the customers who could have been logged in arm ``j`` count (control
    customers the arm cannot reach, for instance without consent to its channel, would otherwise
    enter the comparison: their outcome cannot respond to the arm, so a ranking by the true
    uplift scores lower than one that merely separates reachable from unreachable customers).

    Args:
        p_conv: ``[n, A]`` predicted conversion probability per arm; column 0 is control.
        logged_arm_idx: Index of the logged arm per customer.
        y: Observed outcome.
        propensity: Probability of the logged arm, in (0, 1].
        arms: Optional arm names (``arms[0]`` = control) used as keys.
        eligible: Optional ``bool [n, A - 1]``: which treatment arms each customer could have
            been logged in (see :func:`consent_eligibility`).

    Returns:
        ``{arm name (or str(index)): qini coefficient}`` for arms 1..A-1; NaN where the arm or
        control has no (eligible) logged customers.
    """
    return _per_arm_metric(qini_coefficient, p_conv, logged_arm_idx, y, propensity, arms, eligible)


def multi_arm_auuc(
    p_conv: np.ndarray,
    logged_arm_idx: np.ndarray,
    y: np.ndarray,
    propensity: np.ndarray,
    arms: Sequence[str] | None = None,
    eligible: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute the AUUC (see :func:`auuc`) per treatment arm, on the rows :func:`multi_arm_qini` uses.

    Args:
        p_conv: ``[n, A]`` predicted conversion probability per arm; column 0 is control.
        logged_arm_idx: Index of the logged arm per customer.
        y: Observed outcome.
        propensity: Probability of the logged arm, in (0, 1].
        arms: Optional arm names (``arms[0]`` = control) used as keys.
        eligible: Optional ``bool [n, A - 1]`` of the arms each customer could have been logged in.

    Returns:
        ``{arm name (or str(index)): AUUC}`` for arms 1..A-1; NaN where the arm or control has no
        (eligible) logged customers.
    """
    return _per_arm_metric(auuc, p_conv, logged_arm_idx, y, propensity, arms, eligible)


def _new_figure(figsize: tuple[float, float] = (6.0, 4.0)) -> Any:
    # Agg canvas on a bare Figure: no display needed and no change to pyplot's global backend.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="tight")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=110)
    return out


def plot_qini(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    path: str | Path,
    propensity: np.ndarray | None = None,
    *,
    label: str = "model",
    title: str = "Qini curve",
) -> Path:
    """Plot the Qini curve against random targeting and save it as a PNG.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        path: Where to write the PNG (parent folders are created).
        propensity: Probability of the logged arm; enables IPW weighting.
        label: Legend label of the model curve.
        title: Figure title.

    Returns:
        The path written.
    """
    fraction, qini = qini_curve(uplift_scores, treated, y, propensity)
    coef = qini_coefficient(uplift_scores, treated, y, propensity)
    fig = _new_figure()
    ax = fig.add_subplot()
    ax.plot(fraction, qini, label=f"{label} (Qini coef {coef:.4f})")
    ax.plot([0, 1], [0, qini[-1]], linestyle="--", color="grey", label="random")
    ax.set_xlabel("fraction of customers targeted")
    ax.set_ylabel("incremental outcome per customer")
    ax.set_title(title)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_calibration(
    p: np.ndarray, y: np.ndarray, path: str | Path, n_bins: int = 10, *, title: str = "Calibration"
) -> Path:
    """Plot a reliability diagram (mean predicted vs observed rate per bin) and save it as a PNG.

    Args:
        p: Predicted probabilities.
        y: Observed 0/1 outcomes.
        path: Where to write the PNG (parent folders are created).
        n_bins: Number of equal-width bins.
        title: Figure title.

    Returns:
        The path written.
    """
    table = calibration_table(p, y, n_bins)
    ece = expected_calibration_error(p, y, n_bins)
    fig = _new_figure((5.0, 5.0))
    ax = fig.add_subplot()
    top = float(max(table["mean_predicted"].max(), table["observed_rate"].max(), 0.05)) if len(table) else 1.0
    ax.plot([0, top], [0, top], linestyle="--", color="grey", label="perfect")
    ax.plot(table["mean_predicted"], table["observed_rate"], marker="o", label=f"model (ECE {ece:.4f})")
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed rate")
    ax.set_title(title)
    ax.legend(loc="best")
    return _save(fig, path)


def plot_uplift_by_decile(
    uplift_scores: np.ndarray,
    treated: np.ndarray,
    y: np.ndarray,
    path: str | Path,
    *,
    title: str = "Uplift by decile",
) -> Path:
    """Plot predicted vs observed uplift per decile of the ranking and save it as a PNG.

    Args:
        uplift_scores: Predicted uplift per customer.
        treated: Boolean treatment indicator.
        y: Observed outcome.
        path: Where to write the PNG (parent folders are created).
        title: Figure title.

    Returns:
        The path written.
    """
    table = uplift_by_decile(uplift_scores, treated, y)
    fig = _new_figure()
    ax = fig.add_subplot()
    x = table["decile"].to_numpy()
    ax.bar(x - 0.2, table["predicted_uplift"], width=0.4, label="predicted")
    ax.bar(x + 0.2, table["observed_uplift"].fillna(0.0), width=0.4, label="observed")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(x)
    ax.set_xlabel("decile of predicted uplift (1 = highest)")
    ax.set_ylabel("uplift")
    ax.set_title(title)
    ax.legend(loc="best")
    return _save(fig, path)
