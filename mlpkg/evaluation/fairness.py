"""Exposure and measured effect of a campaign by sensitive group, with disparity ratios.

For one attribute (region, device, ...) and each of its groups:

* **exposure**: ``share_treated`` (customers given a coupon among the campaign's customers outside
  the random control group) and ``coupon_value`` (redeemed coupon value per such customer), as
  Fairlearn ``MetricFrame`` metrics (``selection_rate`` and a weighted mean);
* **effect**: the incremental conversion rate of the model policy's treated customers against the
  control customers the model would have treated, in the same group (Newcombe 95% interval, as the
  campaign's headline), and the incremental conversions it implies.

A **disparity ratio** is the smallest group's value over the largest group's (1 = parity;
Fairlearn's ``ratio(method="between_groups")`` for exposure). Its 95% interval is a percentile
bootstrap over customers, resampled within each group's model, exploration and control rows so
that every replicate keeps the campaign's design. An effect ratio is reported only when
every group's increment is positive (a ratio of a negative to a positive effect means nothing).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame, selection_rate

from mlpkg.evaluation.incrementality import incremental_lift

#: Bootstrap replicates of each disparity ratio's interval.
N_BOOT = 400


def _mean_of(y_true, y_pred, *, values) -> float:  # noqa: ANN001 - Fairlearn passes arrays
    """Return the mean of ``values`` (a sample parameter): coupon value per customer."""
    return float(np.mean(values)) if len(values) else math.nan


def _ratio(values: np.ndarray) -> float:
    """Return ``min / max`` of per-group values, NaN when any is non-positive or missing."""
    if len(values) < 2 or not np.all(np.isfinite(values)) or np.min(values) <= 0:
        return math.nan
    return float(np.min(values) / np.max(values))


def _columns(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    policy = frame["policy"].to_numpy()
    return {
        "exposed": policy != "control", "model": policy == "model", "control": policy == "control",
        "treated": frame["treated"].to_numpy(bool), "targeted": frame["targeted"].to_numpy(bool),
        "converted": frame["converted"].to_numpy(float),
        "coupon_value": frame["coupon_value"].to_numpy(float),
    }  # fmt: skip


def _group_stats(cols: dict[str, np.ndarray], code: np.ndarray, k: int, idx=None) -> dict[str, np.ndarray]:  # noqa: ANN001
    """Return per-group exposure and effect numbers (arrays over the ``k`` group codes)."""
    if idx is not None:
        cols = {name: v[idx] for name, v in cols.items()}
        code = code[idx]
    exposed, treated, target = cols["exposed"], cols["treated"], cols["targeted"]
    conv, value = cols["converted"], cols["coupon_value"]
    n_exp = np.bincount(code[exposed], minlength=k).astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.bincount(code[exposed], weights=treated[exposed], minlength=k) / n_exp
        coupon = np.bincount(code[exposed], weights=value[exposed], minlength=k) / n_exp
        t_mask = cols["model"] & treated
        c_mask = cols["control"] & target
        n_t = np.bincount(code[t_mask], minlength=k).astype(float)
        n_c = np.bincount(code[c_mask], minlength=k).astype(float)
        lift = np.bincount(code[t_mask], weights=conv[t_mask], minlength=k) / n_t - np.bincount(
            code[c_mask], weights=conv[c_mask], minlength=k
        ) / n_c
    return {"share_treated": share, "coupon_value": coupon, "incremental_rate": lift}


def group_fairness(frame: pd.DataFrame, attribute: str, *, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Measure exposure and effect by the groups of one attribute, with disparity ratios.

    Args:
        frame: one row per customer of the campaign with columns ``attribute``, ``policy``
            (``model``, ``explore`` or ``control``: the random control group), ``treated`` (bool:
            given a coupon),
            ``targeted`` (bool: the model chose a coupon for them, whichever group they were
            drawn into), ``converted`` (0/1) and ``coupon_value`` (redeemed coupon value).
        attribute: the column holding each customer's group.
        n_boot: bootstrap replicates for the ratios' intervals.
        seed: the bootstrap's random seed.

    Returns:
        ``{"attribute", "groups": [per-group dict], "disparity": {metric: {"ratio", "ci",
        "min_group", "max_group"}}}``.
    """
    required = {attribute, "policy", "treated", "targeted", "converted", "coupon_value"}
    missing = required - set(frame.columns)
    if missing:
        raise ValueError(f"group_fairness: frame lacks columns {sorted(missing)}")
    frame = frame.reset_index(drop=True)
    group = frame[attribute].astype(str).to_numpy()
    names = sorted(set(group))
    exposed = frame[frame["policy"] != "control"]
    mf = MetricFrame(
        metrics={"share_treated": selection_rate, "coupon_value": _mean_of},
        y_true=np.zeros(len(exposed)),
        y_pred=exposed["treated"].astype(int).to_numpy(),
        sensitive_features=exposed[attribute].astype(str).to_numpy(),
        sample_params={"coupon_value": {"values": exposed["coupon_value"].to_numpy(float)}},
    )
    by_group = mf.by_group.reindex(names)
    exposure_ratio = mf.ratio(method="between_groups")
    code = np.searchsorted(np.asarray(names), group)
    cols = _columns(frame)
    point = _group_stats(cols, code, len(names))
    groups = []
    for i, g in enumerate(names):
        part = frame[group == g]
        t = part[(part["policy"] == "model") & part["treated"]]
        c = part[(part["policy"] == "control") & part["targeted"]]
        lift = incremental_lift(int(t["converted"].sum()), len(t), int(c["converted"].sum()), len(c))
        groups.append({
            "group": g,
            "customers": int(len(part)),
            "share_treated": float(by_group.loc[g, "share_treated"]),
            "coupon_value": float(by_group.loc[g, "coupon_value"]),
            "treated_targeted": int(len(t)), "control_targeted": int(len(c)),
            "incremental_rate": float(point["incremental_rate"][i]),
            "incremental_rate_ci": [float(lift["ci_low"]), float(lift["ci_high"])],
            "incremental_conversions": float(lift["incremental_conversions"]),
            "incremental_conversions_ci": [float(lift["incremental_ci_low"]),
                                           float(lift["incremental_ci_high"])],
        })  # fmt: skip
    # Bootstrap within strata (group x policy), so the design's group sizes stay fixed while
    # who is treated, converts and redeems varies.
    rng = np.random.default_rng(seed)
    stratum = pd.Series(group).str.cat(frame["policy"].astype(str).to_numpy(), sep="|")
    strata = [np.flatnonzero(stratum.to_numpy() == s) for s in sorted(set(stratum))]
    reps: dict[str, list[float]] = {k: [] for k in point}
    for _ in range(n_boot):
        idx = np.concatenate([rng.choice(s, size=len(s), replace=True) for s in strata])
        stats = _group_stats(cols, code, len(names), idx)
        for k, v in stats.items():
            reps[k].append(_ratio(v))
    disparity: dict[str, Any] = {}
    for k, v in point.items():
        ratio = float(exposure_ratio[k]) if k in exposure_ratio.index else _ratio(v)
        if k == "incremental_rate":
            ratio = _ratio(v)
        finite = np.asarray([r for r in reps[k] if np.isfinite(r)])
        # An interval only when (almost) every replicate has a ratio: else it would be conditional.
        ok = np.isfinite(ratio) and len(finite) >= 0.95 * n_boot
        ci = [float(np.quantile(finite, 0.025)), float(np.quantile(finite, 0.975))] if ok else [math.nan] * 2
        order = np.argsort(np.where(np.isfinite(v), v, np.inf))
        disparity[k] = {
            "ratio": ratio if np.isfinite(ratio) else math.nan,
            "ci": ci,
            "min_group": names[int(order[0])] if len(names) else None,
            "max_group": names[int(np.argmax(np.where(np.isfinite(v), v, -np.inf)))] if len(names) else None,
        }
    return {"attribute": attribute, "groups": groups, "disparity": disparity}
