"""The shop's products and each customer's hidden taste for them.

Every product has a category (one of :data:`~mlpkg.simulator.population.CATEGORIES`), a price,
a stock flag, a popularity and a hidden factor vector; every customer a hidden taste vector. A
customer's preference for a product is ``popularity + TASTE_SCALE * taste . factors``: it decides
which product each catalogue event (page view, search, cart add) and each order is about, and,
in the ground truth, how relevant the products a message shows are to its reader
(:func:`relevance`). Within a category the taste dominates the popularity, so a recommender that
learns a customer's taste beats both "the most popular products" and "the most popular products
of the customer's favourite categories".

Everything here draws from its own random streams (see :class:`~mlpkg.simulator.world.Shop`),
so the customers, their activity, categories and campaign responses are the same as in a shop
without products: the catalogue only adds columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mlpkg.simulator.population import CATEGORIES

#: Products per category.
PRODUCTS_PER_CATEGORY = 30
#: Dimensions of the hidden taste and product factors.
TASTE_DIM = 6
#: Weight of the personal taste against the products' popularity.
TASTE_SCALE = 1.6
#: Share of products in stock.
IN_STOCK_SHARE = 0.9
#: A shown product is relevant to a customer when it is among their TOP_K preferred in-stock products.
RELEVANCE_TOP_K = 20
#: Relative lift of a message's click-through when every product it shows is relevant.
RELEVANCE_LIFT = 0.6
_CATEGORY_PRICE = np.array([180.0, 45.0, 60.0, 25.0, 55.0, 12.0, 30.0, 18.0])  # median price per category
_CHUNK = 100_000


@dataclass(frozen=True)
class Catalogue:
    """Column arrays of the products; row j is one product."""

    product_id: np.ndarray  # str, P0001...
    category: np.ndarray  # int index into CATEGORIES
    price: np.ndarray
    in_stock: np.ndarray  # bool
    popularity: np.ndarray
    factors: np.ndarray  # [n_products, TASTE_DIM]

    def __len__(self) -> int:
        """Return the number of products."""
        return len(self.product_id)

    def indices(self, product_ids: Sequence[str]) -> np.ndarray:
        """Return the row of each product id (-1 for ids not in the catalogue)."""
        lookup = {p: j for j, p in enumerate(self.product_id)}
        return np.array([lookup.get(str(p), -1) for p in product_ids], dtype=np.int64)


def draw_catalogue(rng: np.random.Generator) -> Catalogue:
    """Draw the catalogue: PRODUCTS_PER_CATEGORY products in each category."""
    n_cat = len(CATEGORIES)
    n = n_cat * PRODUCTS_PER_CATEGORY
    category = np.repeat(np.arange(n_cat), PRODUCTS_PER_CATEGORY)
    price = np.round(_CATEGORY_PRICE[category] * np.exp(0.5 * rng.standard_normal(n)), 2)
    return Catalogue(
        product_id=np.array([f"P{j + 1:04d}" for j in range(n)], dtype=object),
        category=category,
        price=np.maximum(price, 0.99),
        in_stock=rng.random(n) < IN_STOCK_SHARE,
        popularity=0.7 * rng.standard_normal(n),
        factors=rng.standard_normal((n, TASTE_DIM)) / np.sqrt(TASTE_DIM),
    )


def draw_tastes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the hidden taste vectors of ``n`` customers, ``[n, TASTE_DIM]``."""
    return rng.standard_normal((n, TASTE_DIM))


def preference(cat: Catalogue, tastes: np.ndarray, products: np.ndarray | None = None) -> np.ndarray:
    """Return the log-preference of each customer (row of ``tastes``) for products, ``[n, n_products]``."""
    rows = np.arange(len(cat)) if products is None else products
    return cat.popularity[rows] + TASTE_SCALE * tastes @ cat.factors[rows].T


def _gumbel_choice(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Draw one column per row with probability ``softmax(scores)`` (the Gumbel-max trick)."""
    return np.argmax(scores + rng.gumbel(size=scores.shape), axis=1)


def event_products(
    cat: Catalogue, tastes: np.ndarray, customer: np.ndarray, category: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw the product of each event: one of its category's, by the customer's preference.

    Args:
        cat: The catalogue.
        tastes: Taste vectors of the population the events' ``customer`` indices refer to.
        customer: Row of each event's customer.
        category: Category index of each event (-1: the event is about no product).
        rng: The products' random stream.

    Returns:
        The product row of each event, -1 where the event has no category.
    """
    out = np.full(len(customer), -1, dtype=np.int64)
    for c in range(len(CATEGORIES)):
        rows = np.flatnonzero(category == c)
        products = np.flatnonzero(cat.category == c)
        for start in range(0, len(rows), _CHUNK):
            part = rows[start : start + _CHUNK]
            scores = preference(cat, tastes[customer[part]], products)
            out[part] = products[_gumbel_choice(scores, rng)]
    return out


def order_products(
    cat: Catalogue, tastes: np.ndarray, customer: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Draw the main product of each order among the in-stock products, by preference."""
    stocked = np.flatnonzero(cat.in_stock)
    out = np.empty(len(customer), dtype=np.int64)
    for start in range(0, len(customer), _CHUNK):
        part = slice(start, start + _CHUNK)
        scores = preference(cat, tastes[customer[part]], stocked)
        out[part] = stocked[_gumbel_choice(scores, rng)]
    return out


def relevant_products(cat: Catalogue, tastes: np.ndarray, k: int = RELEVANCE_TOP_K) -> np.ndarray:
    """Return each customer's ``k`` most preferred in-stock products (rows), ``[n, k]``."""
    stocked = np.flatnonzero(cat.in_stock)
    scores = preference(cat, tastes, stocked)
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return stocked[top]


def relevance(cat: Catalogue, tastes: np.ndarray, shown: Sequence[Sequence[str]]) -> np.ndarray:
    """Return how relevant the products shown to each customer are to them, in ``[0, 1]``.

    The share of shown products that are among the customer's :data:`RELEVANCE_TOP_K` preferred
    in-stock products; a message showing nothing (or only unknown or out-of-stock products) has
    relevance 0, which leaves the response to its coupon as it was.

    Args:
        cat: The catalogue.
        tastes: Taste vectors of the customers, one row per entry of ``shown``.
        shown: The product ids each customer's message showed.
    """
    out = np.zeros(len(shown))
    has = [i for i, s in enumerate(shown) if len(s)]
    if not has:
        return out
    top = relevant_products(cat, tastes[has])
    for row, i in enumerate(has):
        rows = cat.indices(list(shown[i]))
        out[i] = float(np.isin(rows, top[row]).sum()) / len(rows)
    return out
