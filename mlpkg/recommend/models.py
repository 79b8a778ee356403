"""Recommenders over customer x product interactions: the factor model and two baselines.

Every recommender answers :meth:`rank` the same way: for each customer a list of product ids,
best first, drawn from the candidates (e.g. the in-stock products). Customers the training data
never saw get the popularity ranking, so nobody is skipped.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from scipy import sparse

#: Weight of one interaction of each kind (an order says more than a page view).
EVENT_WEIGHTS: dict[str, float] = {"page_view": 1.0, "search": 1.0, "add_to_cart": 3.0, "order": 5.0}


@dataclass
class Interactions:
    """A weighted customer x product matrix.

    Attributes:
        customers: Customer id of each row (the warehouse's pseudonyms).
        products: Product id of each column (the whole catalogue, in its order).
        matrix: ``[customers, products]`` CSR matrix of summed interaction weights.
    """

    customers: np.ndarray
    products: np.ndarray
    matrix: sparse.csr_matrix

    def items_of(self) -> dict[str, set[str]]:
        """Return the products each customer interacted with."""
        out: dict[str, set[str]] = {}
        for row, customer in enumerate(self.customers):
            cols = self.matrix.indices[self.matrix.indptr[row] : self.matrix.indptr[row + 1]]
            if len(cols):
                out[str(customer)] = {str(self.products[c]) for c in cols}
        return out


def build_interactions(
    rows: Iterable[tuple[str, str, str, datetime]], products: Sequence[str]
) -> Interactions:
    """Sum ``(customer_id, product_id, kind, ts)`` rows into a weighted matrix over ``products``.

    Rows about a product outside ``products`` or of a kind without a weight are left out.
    """
    column = {str(p): j for j, p in enumerate(products)}
    customers: dict[str, int] = {}
    r, c, w = [], [], []
    for customer, product, kind, _ts in rows:
        j = column.get(str(product))
        weight = EVENT_WEIGHTS.get(str(kind))
        if j is None or weight is None:
            continue
        r.append(customers.setdefault(str(customer), len(customers)))
        c.append(j)
        w.append(weight)
    matrix = sparse.csr_matrix(
        (np.asarray(w, dtype=np.float32), (np.asarray(r, dtype=np.int64), np.asarray(c, dtype=np.int64))),
        shape=(len(customers), len(products)),
    )
    matrix.sum_duplicates()
    return Interactions(np.asarray(list(customers), dtype=object), np.asarray(products, dtype=object), matrix)


def _top(scores: np.ndarray, n: int) -> np.ndarray:
    """Return the column indices of the ``n`` largest scores of each row, best first (ties by column)."""
    n = min(n, scores.shape[1])
    part = np.argpartition(-scores, n - 1, axis=1)[:, :n]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


class _Ranker(ABC):
    """Shared ranking over a score matrix per customer, restricted to candidate products."""

    products: np.ndarray
    popularity: np.ndarray

    @abstractmethod
    def scores(self, customers: Sequence[str]) -> np.ndarray:
        """Return ``[len(customers), len(products)]`` scores."""

    def rank(
        self, customers: Sequence[str], n: int, candidates: Iterable[str] | None = None
    ) -> dict[str, list[tuple[str, float]]]:
        """Return each customer's ``n`` best ``(product_id, score)`` among ``candidates`` (default: all)."""
        keep = np.ones(len(self.products), dtype=bool)
        if candidates is not None:
            keep = np.isin(self.products.astype(str), np.asarray(list(candidates), dtype=str))
        columns = np.flatnonzero(keep)
        out: dict[str, list[tuple[str, float]]] = {}
        if not len(columns) or not len(customers):
            return {str(c): [] for c in customers}
        for start in range(0, len(customers), 4096):
            part = [str(c) for c in customers[start : start + 4096]]
            scores = self.scores(part)[:, columns]
            top = _top(scores, n)
            for i, customer in enumerate(part):
                out[customer] = [(str(self.products[columns[j]]), float(scores[i, j])) for j in top[i]]
        return out


def popularity_of(inter: Interactions) -> np.ndarray:
    """Return each product's share of interacting customers (a tiny id-order tie-break keeps it total)."""
    buyers = np.asarray((inter.matrix > 0).sum(axis=0)).ravel().astype(float)
    total = max(len(inter.customers), 1)
    return buyers / total - 1e-9 * np.arange(len(inter.products))


class PopularityRecommender(_Ranker):
    """The same list for everyone: the products most customers interacted with."""

    def __init__(self, inter: Interactions) -> None:
        """Count the products' interacting customers."""
        self.products = inter.products
        self.popularity = popularity_of(inter)

    def scores(self, customers: Sequence[str]) -> np.ndarray:
        """Return the popularity for every customer."""
        return np.broadcast_to(self.popularity, (len(customers), len(self.products)))


class CategoryAffinityRecommender(_Ranker):
    """The popular products of each customer's favourite categories first.

    A product's score is the customer's share of interactions in its category plus a small
    popularity term that orders products within a category (and ranks new customers).
    """

    def __init__(self, inter: Interactions, category_of: Mapping[str, str]) -> None:
        """Learn each customer's category shares."""
        self.products = inter.products
        self.popularity = popularity_of(inter)
        cats = sorted({str(category_of.get(str(p), "")) for p in inter.products})
        self._cat_index = np.array([cats.index(str(category_of.get(str(p), ""))) for p in inter.products])
        one_hot = sparse.csr_matrix(
            (np.ones(len(self.products)), (np.arange(len(self.products)), self._cat_index)),
            shape=(len(self.products), len(cats)),
        )
        per_cat = np.asarray((inter.matrix @ one_hot).todense())
        self._shares = per_cat / np.maximum(per_cat.sum(axis=1, keepdims=True), 1e-12)
        self._row = {str(c): i for i, c in enumerate(inter.customers)}

    def scores(self, customers: Sequence[str]) -> np.ndarray:
        """Return category share + 0.01 x popularity (popularity alone for unseen customers)."""
        rows = np.array([self._row.get(str(c), -1) for c in customers])
        shares = np.zeros((len(customers), self._shares.shape[1]))
        shares[rows >= 0] = self._shares[rows[rows >= 0]]
        return shares[:, self._cat_index] + 0.01 * self.popularity / max(self.popularity.max(), 1e-12)


class FactorRecommender(_Ranker):
    """Matrix-factorisation scores ``user . item`` from learned factors; popularity for unseen customers.

    Holds only numpy arrays once fitted (``implicit`` is needed to fit, not to rank), so the
    MLflow model serves it without the training library.
    """

    def __init__(self, customers: np.ndarray, products: np.ndarray, user_factors: np.ndarray,
                 item_factors: np.ndarray, popularity: np.ndarray) -> None:
        """Keep the factors and the fallback ranking."""
        self.customers = np.asarray(customers, dtype=object)
        self.products = np.asarray(products, dtype=object)
        self.user_factors = np.asarray(user_factors, dtype=np.float32)
        self.item_factors = np.asarray(item_factors, dtype=np.float32)
        self.popularity = np.asarray(popularity, dtype=np.float64)
        self._row = {str(c): i for i, c in enumerate(self.customers)}

    @classmethod
    def fit(cls, inter: Interactions, *, algorithm: str = "als", factors: int = 32, iterations: int = 20,
            regularization: float = 0.05, alpha: float = 2.0, learning_rate: float = 0.05,
            seed: int = 0) -> FactorRecommender:
        """Fit implicit's ALS (confidence ``1 + alpha * weight``) or BPR on the interactions."""
        import implicit
        from threadpoolctl import threadpool_limits

        if inter.matrix.nnz == 0:
            raise ValueError("no customer interacted with a product before the as-of time: nothing to learn")
        data = inter.matrix.astype(np.float32).tocsr()
        with threadpool_limits(1, "blas"):
            if algorithm == "als":
                model = implicit.cpu.als.AlternatingLeastSquares(
                    factors=factors, regularization=regularization, alpha=alpha, iterations=iterations,
                    random_state=seed, num_threads=1,
                )
            elif algorithm == "bpr":
                model = implicit.cpu.bpr.BayesianPersonalizedRanking(
                    factors=factors, learning_rate=learning_rate, regularization=regularization,
                    iterations=iterations, random_state=seed, num_threads=1,
                )
            else:
                raise ValueError(f"unknown algorithm {algorithm!r}; expected als or bpr")
            model.fit(data, show_progress=False)
        return cls(inter.customers, inter.products, model.user_factors, model.item_factors,
                   popularity_of(inter))

    def scores(self, customers: Sequence[str]) -> np.ndarray:
        """Return factor scores (popularity, scaled below every factor score, for unseen customers)."""
        rows = np.array([self._row.get(str(c), -1) for c in customers])
        out = np.empty((len(customers), len(self.products)))
        seen = rows >= 0
        if seen.any():
            out[seen] = self.user_factors[rows[seen]] @ self.item_factors.T
        out[~seen] = self.popularity
        return out
