"""Benchmark the Lagrangian allocator against HiGHS and at scale.

Two measurements:

* ``allocation_objective_ratio`` / ``allocation_speedup``: 10,000 customers × 10 coupons × 3
  channels (30 options) with the budget, every coupon's inventory and every channel's capacity
  binding; HiGHS's LP optimum (an upper bound on any integer allocation) and its wall time against
  ours, in the same process. Targets: ratio >= 0.999, speed-up >= 100×.
* ``allocation_scale_seconds`` / ``allocation_scale_peak_rss``: 10,000,000 customers × 10 coupons
  × 1 channel with budget and inventory caps, solved in a subprocess so that its peak RSS is its
  own. Target: peak RSS < 8 GiB. ``--quick`` or ``COUPONOPS_BENCH_QUICK=1`` shrinks it to 1,000,000.

Run ``python -m tests.benchmarks.bench_allocation [--quick] [--out-dir DIR]`` or call
:func:`run`; each result is printed as a table row and written to ``<out_dir>/<name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mlpkg.allocation.reference import solve_highs_lp
from mlpkg.allocation.solver import AllocationProblem, check_feasible, solve_lagrangian

REPO_ROOT = Path(__file__).resolve().parents[2]

# Coupons: (kind, face). Percent coupons are worth pct × basket; the rest a fixed amount.
COUPONS = [
    ("percent_off", 10.0),
    ("percent_off", 15.0),
    ("percent_off", 20.0),
    ("percent_off", 25.0),
    ("fixed_amount", 5.0),
    ("fixed_amount", 10.0),
    ("fixed_amount", 15.0),
    ("free_shipping", 4.99),
    ("fixed_amount", 20.0),
    ("percent_off", 30.0),
]
# Channels: (name, reach = P(message seen), send cost).
CHANNELS = [("email", 0.22, 0.002), ("sms", 0.45, 0.04), ("push", 0.12, 0.0005)]
MARGIN = 0.35


def make_instance(
    n_customers: int,
    n_coupons: int = 10,
    n_channels: int = 3,
    *,
    seed: int = 0,
    budget_share: float = 0.3,
    inventory_share: float = 0.35,
    channel_share: float = 0.3,
    chunk: int = 1_000_000,
) -> AllocationProblem:
    """Generate an uplift-shaped allocation instance, in chunks so that it fits in memory at 10M.

    Each customer has a basket size, a baseline conversion rate and a coupon responsiveness
    (negative for some: "sleeping dogs" who buy less when nudged). The uplift of coupon ``c``
    through channel ``h`` is reach(h) × affinity(i, h) × responsiveness(i) × strength(c) plus
    noise. Value is incremental margin minus the expected discount (so coupons sent to customers
    who would buy anyway lose money); cost is the expected discount plus the send cost. Caps are
    shares of what the unconstrained best choice would use, which makes all of them bind.

    Args:
        n_customers: rows.
        n_coupons: coupons (at most 10).
        n_channels: channels (at most 3).
        seed: random seed.
        budget_share: budget as a share of the unconstrained spend.
        inventory_share: each coupon's inventory as a share of its unconstrained count.
        channel_share: each channel's capacity as a share of its unconstrained count.
        chunk: customers generated at a time.

    Returns:
        The instance.
    """
    coupons = COUPONS[:n_coupons]
    channels = CHANNELS[:n_channels]
    m = n_coupons * n_channels
    option_coupon = np.repeat(np.arange(n_coupons), n_channels)
    option_channel = np.tile(np.arange(n_channels), n_coupons)
    is_percent = np.array([kind == "percent_off" for kind, _ in coupons])[option_coupon]
    face = np.array([face for _, face in coupons])[option_coupon]
    reach = np.array([r for _, r, _ in channels])[option_channel]
    send = np.array([s for _, _, s in channels])[option_channel]

    value = np.empty((n_customers, m), dtype=np.float32)
    cost = np.empty((n_customers, m), dtype=np.float32)
    eligible = np.empty((n_customers, m), dtype=bool)
    rng = np.random.default_rng(seed)
    coupon_appeal = rng.lognormal(0.0, 0.25, n_coupons)[option_coupon]
    for a in range(0, n_customers, chunk):
        b = min(a + chunk, n_customers)
        k = b - a
        basket = rng.lognormal(np.log(55.0), 0.5, k)
        base = rng.beta(2.0, 18.0, k)
        respond = rng.normal(0.6, 0.8, k)
        affinity = rng.lognormal(0.0, 0.5, (k, n_channels))[:, option_channel]
        discount = np.where(is_percent[None, :], face[None, :] / 100.0 * basket[:, None], face[None, :])
        strength = coupon_appeal[None, :] * np.sqrt(discount / 10.0)
        uplift = reach[None, :] * affinity * (0.04 * respond[:, None] * strength)
        uplift += rng.normal(0.0, 0.004, (k, m))
        p_buy = np.clip(base[:, None] + uplift, 0.0, 1.0)
        p_redeem = reach[None, :] * affinity.clip(0, 2) / 2 * p_buy
        expected_discount = p_redeem * discount
        value[a:b] = uplift * basket[:, None] * MARGIN - expected_discount
        cost[a:b] = expected_discount + send[None, :]
        consent = rng.random((k, n_channels)) < np.array([0.85, 0.45, 0.6][:n_channels])
        eligible[a:b] = consent[:, option_channel] & (rng.random((k, m)) < 0.92)

    # Caps from the unconstrained choice: everybody takes their best positive option.
    spend = 0.0
    coupon_count = np.zeros(n_coupons)
    channel_count = np.zeros(n_channels)
    for a in range(0, n_customers, chunk):
        v = np.where(eligible[a:a + chunk], value[a:a + chunk], -np.inf)
        best = v.argmax(axis=1)
        took = np.take_along_axis(v, best[:, None], axis=1)[:, 0] > 0
        spend += float(np.take_along_axis(cost[a:a + chunk], best[:, None], axis=1)[took, 0].sum())
        coupon_count += np.bincount(option_coupon[best[took]], minlength=n_coupons)
        channel_count += np.bincount(option_channel[best[took]], minlength=n_channels)
    return AllocationProblem(
        value=value,
        cost=cost,
        eligible=eligible,
        option_coupon=option_coupon,
        option_channel=option_channel,
        budget=float(budget_share * spend),
        coupon_capacity=np.floor(inventory_share * coupon_count),
        channel_capacity=np.floor(channel_share * channel_count),
    )
