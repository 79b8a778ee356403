"""Exact reference solvers (HiGHS through scipy) to measure the Lagrangian allocator against.

Both build one variable per eligible, positive-value (customer, option) pair: an option with
value <= 0 only consumes budget and capacity, so leaving it out changes neither optimum (with a
minimum group share it could buy share; the allocator never gives an option worth <= 0, so the
reference leaves them out too and both solve the same problem). They are
slow (an LP with 10,000 customers × 30 options takes seconds, a MILP much longer) and meant for
tests and benchmarks on small instances.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, linprog, milp

from mlpkg.allocation.solver import AllocationProblem, AllocationResult, relative_gap


def _build(
    problem: AllocationProblem,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix, np.ndarray]:
    """Return ``(rows, cols, values, A, b)`` of the LP ``max values·x  s.t. A x <= b, 0 <= x <= 1``."""
    n, _ = problem.n_customers, problem.n_options
    rows, cols = np.nonzero(problem.eligible & (problem.value > 0))
    k = len(rows)
    values = problem.value[rows, cols].astype(np.float64)
    costs = problem.cost[rows, cols].astype(np.float64)
    var = np.arange(k)
    blocks = [sp.csr_matrix((np.ones(k), (rows, var)), shape=(n, k))]
    rhs = [np.ones(n)]
    if np.isfinite(problem.budget):
        blocks.append(sp.csr_matrix((costs, (np.zeros(k, dtype=np.int64), var)), shape=(1, k)))
        rhs.append(np.array([float(problem.budget)]))
    for index, capacity in (
        (problem.option_coupon, problem.coupon_capacity),
        (problem.option_channel, problem.channel_capacity),
    ):
        capacity = np.asarray(capacity, dtype=np.float64)
        group = np.asarray(index)[cols]
        finite = np.flatnonzero(np.isfinite(capacity))
        if finite.size == 0:
            continue
        # Map each capped group to its own constraint row; uncapped groups get no row.
        row_of = np.full(len(capacity) + 1, -1)
        row_of[finite] = np.arange(finite.size)
        r = row_of[group]
        sel = r >= 0
        blocks.append(sp.csr_matrix((np.ones(int(sel.sum())), (r[sel], var[sel])), shape=(finite.size, k)))
        rhs.append(capacity[finite])
    # Group constraints: sum over assignments of a_i (treated) or a_i * cost (spend) <= 0.
    coef, on_cost = problem.group_coefficients()
    if len(on_cost):
        dense = coef[:, rows] * np.where(on_cost[:, None], costs[None, :], 1.0)
        blocks.append(sp.csr_matrix(dense))
        rhs.append(np.zeros(len(on_cost)))
    return rows, cols, values, sp.vstack(blocks, format="csr"), np.concatenate(rhs)


def solve_highs_lp(problem: AllocationProblem) -> tuple[float, np.ndarray, float]:
    """Solve the LP relaxation with HiGHS; its optimum bounds every integer allocation.

    Args:
        problem: the instance; validated first.

    Returns:
        ``(objective upper bound, fractional x [n, m], seconds)``; seconds include building the
        sparse constraint matrix.

    Raises:
        RuntimeError: when HiGHS does not report an optimal solution.
    """
    start = time.perf_counter()
    problem.validate()
    rows, cols, values, a, b = _build(problem)
    x = np.zeros((problem.n_customers, problem.n_options), dtype=np.float64)
    if len(values) == 0:
        return 0.0, x, time.perf_counter() - start
    res = linprog(-values, A_ub=a, b_ub=b, bounds=(0.0, 1.0), method="highs")
    if res.status != 0:
        raise RuntimeError(f"HiGHS LP did not solve the allocation: {res.message}")
    x[rows, cols] = res.x
    return float(-res.fun), x, time.perf_counter() - start


def solve_highs_milp(problem: AllocationProblem, *, time_limit: float = 60.0) -> AllocationResult:
    """Solve the integer allocation exactly with HiGHS branch and bound (small instances only).

    Args:
        problem: the instance; validated first.
        time_limit: seconds HiGHS may spend before returning its best solution.

    Returns:
        The optimal (or best found within the limit) allocation; ``dual_bound`` is HiGHS's bound.

    Raises:
        RuntimeError: when HiGHS finds no feasible solution.
    """
    start = time.perf_counter()
    problem.validate()
    rows, cols, values, a, b = _build(problem)
    choice = np.full(problem.n_customers, -1, dtype=np.int32)
    if len(values) == 0:
        return AllocationResult(choice, 0.0, 0.0, 0.0, {}, 0, time.perf_counter() - start, 0.0)
    res = milp(
        -values,
        integrality=np.ones(len(values)),
        bounds=Bounds(0.0, 1.0),
        constraints=LinearConstraint(a, -np.inf, b),
        options={"time_limit": time_limit},
    )
    if res.x is None:
        raise RuntimeError(f"HiGHS MILP found no allocation: {res.message}")
    picked = np.flatnonzero(res.x > 0.5)
    choice[rows[picked]] = cols[picked]
    objective = float(values[picked].sum())
    bound = float(-res.mip_dual_bound) if getattr(res, "mip_dual_bound", None) is not None else objective
    bound = max(bound, objective)
    spend = float(problem.cost[rows[picked], cols[picked]].astype(np.float64).sum())
    return AllocationResult(
        choice=choice,
        objective=objective,
        dual_bound=bound,
        gap=relative_gap(bound, objective),
        multipliers={},
        iterations=int(getattr(res, "mip_node_count", 0) or 0),
        seconds=time.perf_counter() - start,
        spend=spend,
    )
