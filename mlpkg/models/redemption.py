"""What a contact costs in coupons: P(coupon redeemed | customer, arm).

A coupon costs the shop only when it is redeemed, and not every conversion of a contacted
customer redeems it: a loyal customer who orders anyway often never opens the message. Charging
the coupon on every treated conversion overstates the cost of exactly the customers a campaign
should not pay for, and leaves a good part of the budget unspent in fact. This model learns the
redemption probability of a contact from the logs' outcomes (the shop's own campaign logs record
``redeemed`` per customer), so the allocator's expected cost is
``P(redeemed | arm) x coupon value + send cost``.

It is a regularised logistic regression over the customer features plus the arm's coupon and
channel (one model for all arms, since redemptions are rare), with its strength chosen by
cross-validated log loss, fitted on every treated row whose redemption outcome is known. Logs
without redemption outcomes, or with too few redemptions, give no model, and the allocator keeps
charging the coupon on every treated conversion.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from mlpkg.models.baseline import LOGISTIC_CS, category_levels, logistic_pipeline

CONTROL_ARM = "control"
#: The fewest treated rows with a known redemption outcome a model is fitted on.
MIN_ROWS = 200
#: The fewest redemptions (and non-redemptions) among them.
MIN_CLASS_ROWS = 10
#: Predictions are kept in ``[FLOOR, 1]``: a cost model that calls a coupon free would let the
#: allocator buy it without limit.
FLOOR = 1e-3
_ARM_PARTS = ("coupon", "channel")


def _arm_parts(arms: list[str]) -> pd.DataFrame:
    """Split ``coupon@channel`` arm names into their coupon and channel (an arm without ``@``: no channel)."""
    parts = pd.Series(arms, dtype="string").str.partition("@")
    return pd.DataFrame({"coupon": parts[0].to_numpy(), "channel": parts[2].to_numpy()})


@dataclass
class RedemptionModel:
    """A fitted redemption model (see the module docstring).

    Attributes:
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        categories: Known categories per categorical column and for ``coupon`` and ``channel``.
        model: The fitted pipeline over the encoded matrix.
        rows: Treated rows it was fitted on.
        redeemed_share: The redeemed share among them.
    """

    numeric: list[str]
    categorical: list[str]
    categories: dict[str, list[str]]
    model: Pipeline
    rows: int
    redeemed_share: float

    def _encode(self, df: pd.DataFrame, parts: pd.DataFrame) -> np.ndarray:
        columns = [df[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in self.numeric]
        for name, values in [*((c, df[c]) for c in self.categorical), *((p, parts[p]) for p in _ARM_PARTS)]:
            lookup = {cat: float(code) for code, cat in enumerate(self.categories[name])}
            codes = pd.Series(values.to_numpy(), dtype="string").map(lookup)
            columns.append(codes.to_numpy(dtype=np.float64, na_value=np.nan))
        return np.column_stack(columns)

    def predict(self, df: pd.DataFrame, arms: list[str]) -> np.ndarray:
        """Return P(redeemed | arm) ``[len(df), len(arms)]`` (float32; 0 for control)."""
        out = np.zeros((len(df), len(arms)), dtype=np.float32)
        if not len(df):
            return out
        positive = list(self.model.classes_).index(1)
        for j, arm in enumerate(arms):
            if arm == CONTROL_ARM:
                continue
            p = self.model.predict_proba(self._encode(df, _arm_parts([arm] * len(df))))[:, positive]
            out[:, j] = np.clip(p, FLOOR, 1.0)
        return out


def fit_redemption(
    frame: pd.DataFrame, numeric: list[str], categorical: list[str], *, seed: int = 7
) -> RedemptionModel | None:
    """Fit the redemption model on a training frame's treated rows, or return None.

    Args:
        frame: Training rows with the feature columns, ``arm`` and ``redeemed`` (0/1, NaN where
            the log does not record it).
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        seed: Seed of the cross-validation.

    Returns:
        The fitted model; None when the rows do not record redemptions, or hold fewer than
        :data:`MIN_ROWS` treated rows or :data:`MIN_CLASS_ROWS` of either outcome.
    """
    if "redeemed" not in frame.columns:
        return None
    rows = frame[(frame["arm"].astype(str) != CONTROL_ARM) & frame["redeemed"].notna()].reset_index(drop=True)
    y = (rows["redeemed"].to_numpy(np.float64) > 0).astype(int)
    if len(rows) < MIN_ROWS or min(int(y.sum()), int(len(y) - y.sum())) < MIN_CLASS_ROWS:
        return None
    parts = _arm_parts(rows["arm"].astype(str).tolist())
    categories = {c: category_levels(rows[c]) for c in categorical}
    categories.update({p: category_levels(parts[p]) for p in _ARM_PARTS})
    pipeline = logistic_pipeline(len(numeric), len(categorical) + len(_ARM_PARTS), LOGISTIC_CS, seed)
    model = RedemptionModel(
        list(numeric), list(categorical), categories, pipeline, rows=len(rows), redeemed_share=float(y.mean())
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence notes of the weakest regularisation strengths
        pipeline.fit(model._encode(rows, parts), y)
    return model
