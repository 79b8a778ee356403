"""The recommender as an MLflow pyfunc model: factors and popularity as one ``.npz`` artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from mlpkg.recommend.models import FactorRecommender

ARTIFACT = "factors"


def save_factors(model: FactorRecommender, path: Path) -> Path:
    """Write a fitted recommender's arrays to ``path`` (``.npz``; ids as text, no pickles)."""
    np.savez_compressed(
        path,
        customers=model.customers.astype(str),
        products=model.products.astype(str),
        user_factors=model.user_factors,
        item_factors=model.item_factors,
        popularity=model.popularity,
    )
    return Path(path)


def load_factors(path: str | Path) -> FactorRecommender:
    """Read a recommender written by :func:`save_factors`."""
    with np.load(path, allow_pickle=False) as z:
        return FactorRecommender(z["customers"].astype(object), z["products"].astype(object),
                                 z["user_factors"], z["item_factors"], z["popularity"])


class RecommenderPyfunc(mlflow.pyfunc.PythonModel):
    """Serve ranked products: ``predict`` takes ``customer_id`` rows and returns their top ``n``."""

    def __init__(self, n: int = 10) -> None:
        """Set the default list length."""
        self.n = n
        self.model: FactorRecommender | None = None

    def load_context(self, context: Any) -> None:
        """Load the factors artifact."""
        self.model = load_factors(context.artifacts[ARTIFACT])

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Return ``customer_id, rank, product_id, score`` for each input customer (rank 1 = best)."""
        n = int((params or {}).get("n", self.n))
        ranked = self.model.rank(model_input["customer_id"].astype(str).tolist(), n)
        rows = [(c, r + 1, p, s) for c, items in ranked.items() for r, (p, s) in enumerate(items)]
        return pd.DataFrame(rows, columns=["customer_id", "rank", "product_id", "score"])
