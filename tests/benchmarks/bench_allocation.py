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
from tests.benchmarks.run import write_result

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
    inventory_share: float = 0.2,
    channel_share: float | None = 0.2,
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
        channel_share: each channel's capacity as a share of its unconstrained count (None: no cap).
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
        v = np.where(eligible[a : a + chunk], value[a : a + chunk], -np.inf)
        best = v.argmax(axis=1)
        took = np.take_along_axis(v, best[:, None], axis=1)[:, 0] > 0
        spend += float(np.take_along_axis(cost[a : a + chunk], best[:, None], axis=1)[took, 0].sum())
        coupon_count += np.bincount(option_coupon[best[took]], minlength=n_coupons)
        channel_count += np.bincount(option_channel[best[took]], minlength=n_channels)
    coupon_capacity = np.floor(inventory_share * coupon_count)
    if channel_share is None:
        channel_capacity = np.full(n_channels, np.inf)
    else:
        # Every option uses one coupon and one channel, so coupon and channel caps can only all
        # bind when their totals agree: scale the channel caps to the coupons' total.
        channel_capacity = np.floor(channel_share * channel_count)
        channel_capacity = np.floor(channel_capacity * coupon_capacity.sum() / channel_capacity.sum())
        channel_capacity[: int(coupon_capacity.sum() - channel_capacity.sum())] += 1
    return AllocationProblem(
        value=value,
        cost=cost,
        eligible=eligible,
        option_coupon=option_coupon,
        option_channel=option_channel,
        budget=float(budget_share * spend),
        coupon_capacity=coupon_capacity,
        channel_capacity=channel_capacity,
    )


def _binding(problem: AllocationProblem, x: np.ndarray, rtol: float = 1e-6) -> tuple[int, int]:
    """Count the capped constraints that a fractional solution ``x`` uses to the full."""
    used_coupon = np.bincount(
        problem.option_coupon, weights=x.sum(axis=0), minlength=len(problem.coupon_capacity)
    )
    used_channel = np.bincount(
        problem.option_channel, weights=x.sum(axis=0), minlength=len(problem.channel_capacity)
    )
    spend = float((x * problem.cost).sum())
    pairs = [(spend, problem.budget)]
    pairs += list(zip(used_coupon, problem.coupon_capacity, strict=True))
    pairs += list(zip(used_channel, problem.channel_capacity, strict=True))
    capped = [(u, c) for u, c in pairs if np.isfinite(c)]
    return int(sum(u >= c * (1 - rtol) - 1e-6 for u, c in capped)), len(capped)


def bench_vs_highs(
    n_customers: int = 10_000, *, seed: int = 0, repeats: int = 7, highs_repeats: int = 2
) -> list[dict]:
    """Compare objective and wall time with HiGHS's LP optimum on a fully binding instance.

    Both solvers run several times in this process, alternating, and the best wall time of
    each is compared (as ``timeit`` advises: slower runs measure other processes on a shared
    machine, not the code); medians are reported alongside.

    Args:
        n_customers: rows of the instance (10 coupons × 3 channels).
        seed: instance seed.
        repeats: runs of our solver.
        highs_repeats: runs of HiGHS.

    Returns:
        Two results: ``allocation_objective_ratio`` and ``allocation_speedup``.
    """
    problem = make_instance(n_customers, seed=seed)
    solve_lagrangian(problem)  # warm-up: first-call costs (imports, page faults) are not the solver's
    runs, lp_runs = [], []
    for i in range(max(repeats, highs_repeats)):
        if i < highs_repeats:
            lp_bound, x, lp_run = solve_highs_lp(problem)
            lp_runs.append(lp_run)
        if i < repeats:
            start = time.perf_counter()
            result = solve_lagrangian(problem)
            runs.append(time.perf_counter() - start)
    binding, capped = _binding(problem, x)
    violations = check_feasible(problem, result.choice)
    seconds, lp_seconds = min(runs), min(lp_runs)
    shape = f"{n_customers:,} customers × {problem.n_options} options"
    ratio = result.objective / lp_bound
    speedup = lp_seconds / seconds
    common = {
        "n_customers": n_customers,
        "n_options": problem.n_options,
        "binding_constraints_lp": binding,
        "capped_constraints": capped,
        "feasible": not violations,
        "seed": seed,
    }
    return [
        {
            "name": "allocation_objective_ratio",
            "value": result.objective,
            "unit": "objective",
            "reference": "HiGHS LP optimum (upper bound on any allocation)",
            "reference_value": lp_bound,
            "ratio": ratio,
            "target": ">= 0.999",
            "passed": bool(ratio >= 0.999 and not violations),
            "dual_bound": result.dual_bound,
            "gap": result.gap,
            "iterations": result.iterations,
            "detail": f"{shape}, {binding}/{capped} caps binding, gap to own bound {result.gap:.1e}",
            **common,
        },
        {
            "name": "allocation_speedup",
            "value": seconds,
            "unit": "s",
            "reference": "HiGHS LP wall time (scipy linprog, build + solve)",
            "reference_value": lp_seconds,
            "ratio": speedup,
            "target": ">= 100x",
            "passed": bool(speedup >= 100),
            "runs_s": [float(t) for t in runs],
            "highs_runs_s": [float(t) for t in lp_runs],
            "median_s": float(np.median(runs)),
            "highs_median_s": float(np.median(lp_runs)),
            "detail": f"{shape}: ours {seconds * 1e3:.1f} ms (best of {repeats}, median "
            f"{np.median(runs) * 1e3:.1f}), HiGHS {lp_seconds:.2f} s (best of {highs_repeats})",
            **common,
        },
    ]


def _scale_worker(n_customers: int, seed: int, out: Path) -> None:
    """Generate and solve one large instance; write timings and peak RSS to ``out`` (JSON)."""
    start = time.perf_counter()
    problem = make_instance(n_customers, n_coupons=10, n_channels=1, seed=seed, channel_share=None)
    generated = time.perf_counter() - start
    input_bytes = problem.value.nbytes + problem.cost.nbytes + problem.eligible.nbytes
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = solve_lagrangian(problem)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    violations = check_feasible(problem, result.choice)
    out.write_text(
        json.dumps(
            {
                "n_customers": n_customers,
                "n_options": problem.n_options,
                "generate_s": generated,
                "solve_s": result.seconds,
                "iterations": result.iterations,
                "objective": result.objective,
                "dual_bound": result.dual_bound,
                "gap": result.gap,
                "input_bytes": input_bytes,
                "peak_rss_before_solve_bytes": rss_before,
                "peak_rss_bytes": peak,
                "feasible": not violations,
            }
        )
    )


def bench_scale(n_customers: int, *, seed: int = 1) -> list[dict]:
    """Solve a large budget + inventory instance in a subprocess; report time and peak RSS.

    Args:
        n_customers: rows (10 coupons, 1 channel).
        seed: instance seed.

    Returns:
        ``allocation_scale_seconds`` and ``allocation_scale_peak_rss``.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "scale.json"
        cmd = [sys.executable, "-m", "tests.benchmarks.bench_allocation", "--scale-worker", str(n_customers)]
        cmd += ["--seed", str(seed), "--worker-out", str(out)]
        subprocess.run(cmd, cwd=REPO_ROOT, check=True)
        stats = json.loads(out.read_text())
    gib = 2.0**30
    shape = f"{n_customers:,} customers × {stats['n_options']} options"
    common = {k: stats[k] for k in ("n_customers", "n_options", "gap", "iterations", "feasible", "objective")}
    peak = stats["peak_rss_bytes"] / gib
    return [
        {
            "name": "allocation_scale_seconds",
            "value": stats["solve_s"],
            "unit": "s",
            "reference": "instance generation time (same process)",
            "reference_value": stats["generate_s"],
            "ratio": stats["solve_s"] / stats["generate_s"],
            "target": "reported",
            "passed": bool(stats["feasible"]),
            "detail": f"{shape}, {stats['iterations']} dual iterations, gap {stats['gap']:.1e}",
            **common,
        },
        {
            "name": "allocation_scale_peak_rss",
            "value": peak,
            "unit": "GiB",
            "reference": "memory limit",
            "reference_value": 8.0,
            "ratio": peak / 8.0,
            "target": "< 8 GiB",
            "passed": bool(peak < 8.0),
            "input_gib": stats["input_bytes"] / gib,
            "peak_rss_before_solve_gib": stats["peak_rss_before_solve_bytes"] / gib,
            "detail": f"{shape}: inputs {stats['input_bytes'] / gib:.2f} GiB, "
            f"peak before solve {stats['peak_rss_before_solve_bytes'] / gib:.2f} GiB",
            **common,
        },
    ]


def _print_table(results: list[dict]) -> None:
    header = f"{'name':<28} {'value':>12} {'unit':<9} {'reference_value':>15} {'ratio':>9} {'pass':<5} detail"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['name']:<28} {r['value']:>12.5g} {r['unit']:<9} {r['reference_value']:>15.5g} "
            f"{r['ratio']:>9.4g} {'yes' if r['passed'] else 'NO':<5} {r['detail']}"
        )


def run(out_dir: Path, quick: bool | None = None) -> list[dict]:
    """Run every allocation benchmark, print a table and write ``<out_dir>/<name>.json``.

    Args:
        out_dir: folder for the JSON results (created if missing).
        quick: shrink the scale run to 1,000,000 customers; defaults to ``COUPONOPS_BENCH_QUICK=1``.

    Returns:
        The results, one dict per benchmark.
    """
    if quick is None:
        quick = os.environ.get("COUPONOPS_BENCH_QUICK", "0") == "1"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results = bench_vs_highs()
    results += bench_scale(1_000_000 if quick else 10_000_000)
    _print_table(results)
    return results


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the benchmarks (or, internally, the scale worker)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scale run with 1,000,000 customers")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench-results")
    parser.add_argument("--scale-worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.scale_worker:
        _scale_worker(args.scale_worker, args.seed, args.worker_out)
        return 0
    results = run(args.out_dir, quick=True if args.quick else None)
    for r in results:
        write_result(args.out_dir, r)
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
