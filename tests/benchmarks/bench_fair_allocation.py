"""Benchmark the Lagrangian allocator with group constraints against HiGHS's LP optimum.

The instance of ``bench_allocation`` (10,000 customers × 10 coupons × 3 channels, budget, every
coupon's inventory and every channel's capacity binding) gets customer groups (a three-valued
"region" and a two-valued "device", drawn at random) and group constraints that bind:

* ``one``: the first region's share of treated customers at least 15 points above what the
  unconstrained allocation gives it;
* ``three``: that region at least 50% of the treated, the second at most 20%, and the second
  device at most 30% of the spend.

For each configuration and seed, the objective of our (hard-feasible) allocation is compared with
the LP optimum of the *constrained* problem (an upper bound on any allocation that meets the
constraints), and the wall times likewise (best of a few runs). Reported: the smallest ratio over
the seeds (target >= 0.999) and the median speed-up.

Run ``python -m tests.benchmarks.run --only fair_allocation --out DIR``.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from mlpkg.allocation.reference import solve_highs_lp
from mlpkg.allocation.solver import GroupConstraint, check_feasible, solve_lagrangian
from tests.benchmarks.bench_allocation import make_instance

SEEDS = (0, 1, 2, 3)


def constrained(n_customers: int, seed: int, config: str):  # noqa: ANN201 - AllocationProblem
    """Return the bench instance with its groups and the constraints of ``config``."""
    problem = make_instance(n_customers, seed=seed)
    rng = np.random.default_rng(1000 + seed)
    region = rng.integers(0, 3, n_customers)
    device = rng.integers(0, 2, n_customers)
    if config == "one":
        treated = solve_lagrangian(problem).choice >= 0
        share = float(np.mean(region[treated] == 0)) + 0.15
        label = "region=0 min_treated_share"
        groups = (GroupConstraint(region == 0, round(share, 3), "min", "treated", label),)
    else:
        groups = (
            GroupConstraint(region == 0, 0.5, "min", "treated", "region=0 min_treated_share 0.5"),
            GroupConstraint(region == 1, 0.2, "max", "treated", "region=1 max_treated_share 0.2"),
            GroupConstraint(device == 1, 0.3, "max", "spend", "device=1 max_budget_share 0.3"),
        )
    return dataclasses.replace(problem, group_constraints=groups)


def bench_groups(n_customers: int = 10_000, *, repeats: int = 3) -> list[dict]:
    """Compare with HiGHS on every configuration and seed; two results per configuration."""
    results = []
    for config in ("one", "three"):
        ratios, speedups, feasible, rows = [], [], True, []
        for seed in SEEDS:
            problem = constrained(n_customers, seed, config)
            lp_bound, _, lp_seconds = solve_highs_lp(problem)
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                result = solve_lagrangian(problem)
                runs.append(time.perf_counter() - start)
            ok = not check_feasible(problem, result.choice)
            feasible &= ok
            ratios.append(result.objective / lp_bound)
            speedups.append(lp_seconds / min(runs))
            rows.append({"seed": seed, "ratio": ratios[-1], "seconds": min(runs), "highs_seconds": lp_seconds,
                         "feasible": ok, "gap": result.gap})  # fmt: skip
        shape = f"{n_customers:,} customers × 30 options, {config} group constraint(s), seeds {list(SEEDS)}"
        worst = float(min(ratios))
        results += [
            {
                "name": f"allocation_group_{config}_objective_ratio",
                "value": worst,
                "unit": "ratio",
                "reference": "HiGHS LP optimum of the constrained problem",
                "reference_value": 1.0,
                "ratio": worst,
                "target": ">= 0.999 (worst seed)",
                "passed": bool(worst >= 0.999 and feasible),
                "per_seed": rows,
                "detail": f"{shape}: ratios {', '.join(f'{r:.5f}' for r in ratios)}; feasible: {feasible}",
            },
            {
                "name": f"allocation_group_{config}_speedup",
                "value": float(np.median([r["seconds"] for r in rows])),
                "unit": "s",
                "reference": "HiGHS LP wall time (build + solve)",
                "reference_value": float(np.median([r["highs_seconds"] for r in rows])),
                "ratio": float(np.median(speedups)),
                "target": "reported",
                "passed": True,
                "detail": f"{shape}: median speed-up {np.median(speedups):.0f}x (min {min(speedups):.0f}x)",
            },
        ]
    return results


def run(out_dir: Path) -> list[dict]:
    """Run the group-constrained benchmark (the caller writes the results)."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    return bench_groups()
