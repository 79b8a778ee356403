"""Choose each training's model family on the log's own validation part, by policy value at the budget.

Every configured family (``trainer.families``: the network, a gradient-boosting T-learner, a
regularised logistic T-learner) is fitted on the training part of the non-holdout rows and
judged on a customer-disjoint validation part by what matters: the doubly robust value of the
allocation the product would make with it (the gate's consent- and budget-constrained policy,
:mod:`mlpkg.gate`), with the Qini coefficient beside it. The first configured family (the network
by default) is kept unless another beats it by the one-sided ``gate.confidence`` lower bound of
the paired gain: on a log too small or too noisy to tell them apart, the choice does not follow
noise. The chosen family is then trained for real and registered; the comparison is recorded
with the version, so the registry says which family won and why. The gate's holdout is never
touched here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from mlpkg import gate
from mlpkg.config import Settings
from mlpkg.evaluation.ope import paired_difference
from mlpkg.evaluation.uplift_metrics import consent_eligibility, multi_arm_qini
from mlpkg.models.lightning import ordered_arms
from mlpkg.train import fit_family

#: Key of the validation hash (independent of the gate's holdout hash).
SELECTION_SALT = "couponops-family-selection-v1"
#: Share of the non-holdout customers that validate the families.
SELECTION_SHARE = 0.2


@dataclass
class FamilyChoice:
    """Which family won a training's comparison, with every family's numbers."""

    family: str
    reason: str
    table: pd.DataFrame

    def tags(self) -> dict[str, str]:
        """Return the version/run tags that record the choice."""
        tags = {"selection.family": self.family, "selection.reason": self.reason}
        for row in self.table.itertuples():
            tags[f"selection.{row.family}.policy_value"] = f"{row.policy_value:.6g}"
        return tags


def choose_family(
    frame: pd.DataFrame,
    holdout: np.ndarray,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    *,
    settings: Settings,
    economics_for: Callable[[pd.DataFrame, list[str]], gate.GateEconomics],
) -> FamilyChoice:
    """Fit every configured family on part of the non-holdout rows and pick the best on the rest.

    Args:
        frame: The training snapshot (with ``customer_id``).
        holdout: ``bool [len(frame)]``: the gate's rows, left out here too.
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        arms: Arm names including control.
        settings: CouponOps settings (``trainer.families``, ``gate``).
        economics_for: ``f(rows, arms)``: the gate's costs, eligibility and budget for ``rows``.

    Returns:
        The winning family, why, and the table of every family's numbers.
    """
    families = list(dict.fromkeys(settings.trainer.families))
    if len(families) == 1:
        return FamilyChoice(
            families[0], "the only configured family", pd.DataFrame(columns=["family", "policy_value"])
        )
    rest = ~np.asarray(holdout, dtype=bool)
    val = rest & gate.holdout_mask(frame["customer_id"], SELECTION_SHARE, SELECTION_SALT)
    fit = rest & ~val
    fallback = families[0]
    if val.sum() < settings.gate.min_test_rows or fit.sum() < 2 * settings.gate.min_test_rows:
        return FamilyChoice(
            fallback,
            f"{int(val.sum())} validation rows are too few to compare families; {fallback}, the first",
            pd.DataFrame(columns=["family", "policy_value"]),
        )
    fit_rows, val_rows = frame[fit].reset_index(drop=True), frame[val].reset_index(drop=True)
    columns = ordered_arms(arms)
    econ = economics_for(val_rows, columns)
    predictions, seconds = {}, {}
    for family in families:
        started = time.perf_counter()
        scorer = fit_family(family, fit_rows, numeric, categorical, columns, settings=settings)
        p = scorer.score_arrays(val_rows)["p_conv"].astype(np.float64)
        own = list(scorer.arms)
        predictions[family] = p[:, [own.index(a) for a in columns]]
        seconds[family] = time.perf_counter() - started
    p_common = np.mean(list(predictions.values()), axis=0)
    logged = val_rows["arm"].astype(str).map({a: i for i, a in enumerate(columns)}).to_numpy(np.int64)
    prop = val_rows["propensity"].to_numpy(np.float64)
    y = val_rows[gate.OUTCOME].to_numpy(np.float64)
    eligible = consent_eligibility(val_rows, columns)
    rows, targets = [], {}
    for family, p in predictions.items():
        scores = gate.Scores(version=family, p=p, has_arm=np.ones(len(columns), dtype=bool), pay=p)
        # Each family allocates with its own predicted costs, as the product would deploy it.
        target = targets[family] = gate.policy_matrix(scores, econ, p)
        value, stderr = gate.dr_value(target, logged, prop, y, p_common)
        qini = multi_arm_qini(p, logged, y, prop, columns, eligible=eligible)
        finite = [v for v in qini.values() if math.isfinite(v)]
        rows.append(
            {
                "family": family,
                "policy_value": value,
                "stderr": stderr,
                "qini": float(np.mean(finite)) if finite else math.nan,
                "fit_seconds": round(seconds[family], 2),
                "fit_rows": len(fit_rows),
                "validation_rows": len(val_rows),
            }
        )
    # Paired gains over the default (first) family: the same rows and reward model, so the
    # difference of two DR values has a much smaller standard error than either value.
    base = families[0]
    z = float(stats.norm.ppf(settings.gate.confidence))
    for row in rows:
        diff = paired_difference(targets[row["family"]], targets[base], logged, prop, y, p_common)["dr"]
        row["gain_vs_default"], row["gain_stderr"] = diff.value, diff.stderr
        row["gain_lcb"] = diff.value - z * diff.stderr if row["family"] != base else 0.0
    table = pd.DataFrame(rows).sort_values("policy_value", ascending=False, kind="stable")
    table = table.reset_index(drop=True)
    # Leave the default only on evidence: a family whose gain's lower bound clears zero.
    better = table[(table["family"] != base) & (table["gain_lcb"] > 0)]
    confidence = f"{settings.gate.confidence:.0%}"
    if better.empty:
        top = table[table["family"] != base].iloc[0]
        reason = (
            f"{base} (the default): no family beats it on {len(val_rows):,} validation rows by the "
            f"{confidence} lower bound of its paired gain at the budget (next best: {top.family}, "
            f"{top.gain_vs_default:+.4g} ± {top.gain_stderr:.2g})"
        )
        return FamilyChoice(base, reason, table)
    best = better.iloc[0]
    reason = (
        f"{best.family} beats {base} on {len(val_rows):,} validation rows at the budget: paired gain "
        f"{best.gain_vs_default:+.4g} ± {best.gain_stderr:.2g}, {confidence} lower bound "
        f"{best.gain_lcb:+.4g} > 0 (policy value {best.policy_value:.4g}, Qini {best.qini:.3g})"
    )
    return FamilyChoice(str(best.family), reason, table)
