"""Test helpers shared by several test modules (seeded simulator worlds and an oracle scorer)."""

from __future__ import annotations

import numpy as np
import pandas as pd


class OracleScorer:
    """Scores customers with the simulator's ground truth (a perfect model, for allocation tests)."""

    def __init__(self, shop):
        self.shop = shop
        self.arms = list(shop.arm_names)

    def score_arrays(self, df: pd.DataFrame, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        ids = df["customer_id"].astype(str).tolist()
        return {
            "p_conv": self.shop.true_conversion(ids).astype(np.float32),
            "revenue": self.shop.true_revenue(ids).astype(np.float32),
        }


def use_oracle(monkeypatch, shop) -> None:
    """Make allocation load the oracle scorer instead of an MLflow model."""
    import mlpkg.train

    monkeypatch.setattr(mlpkg.train, "load_uplift_model", lambda uri, tracking_uri=None: OracleScorer(shop))
