"""Top-N ranking metrics: recall@k and NDCG@k with binary relevance (pure maths)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def recall_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Return the share of ``relevant`` items found in the first ``k`` of ``ranked``.

    The denominator is ``min(k, len(relevant))``, so a perfect list scores 1 even when a customer
    has more relevant items than slots.
    """
    if not relevant:
        raise ValueError("recall needs at least one relevant item")
    hits = sum(1 for item in list(ranked)[:k] if item in relevant)
    return hits / min(k, len(relevant))


def ndcg_at_k(ranked: Sequence[str], relevant: set[str], k: int) -> float:
    """Return the normalised discounted cumulative gain of the first ``k`` of ``ranked`` (binary gains)."""
    if not relevant:
        raise ValueError("NDCG needs at least one relevant item")
    gains = [1.0 / np.log2(i + 2) for i, item in enumerate(list(ranked)[:k]) if item in relevant]
    ideal = sum(1.0 / np.log2(i + 2) for i in range(min(k, len(relevant))))
    return float(sum(gains) / ideal)


def ranking_metrics(
    ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, set[str]], k: int
) -> dict[str, float]:
    """Return mean ``recall@k`` and ``ndcg@k`` over the users with relevant items, and their count.

    A user with relevant items but no ranked list scores 0 (a recommender may not skip anyone).
    """
    users = [u for u, items in relevant.items() if items]
    if not users:
        raise ValueError("no user has a relevant item in the test window")
    recall = [recall_at_k(ranked.get(u, ()), relevant[u], k) for u in users]
    ndcg = [ndcg_at_k(ranked.get(u, ()), relevant[u], k) for u in users]
    return {
        f"recall@{k}": float(np.mean(recall)),
        f"ndcg@{k}": float(np.mean(ndcg)),
        "users": float(len(users)),
    }
