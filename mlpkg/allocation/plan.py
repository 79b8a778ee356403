"""Budget planning: expected incremental value versus budget, from the same scores as allocation."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine

from mlpkg.allocation.campaign import score_population
from mlpkg.allocation.solver import AllocationProblem, relative_gap, solve_lagrangian
from mlpkg.config import Settings


def budget_curve(
    engine: Engine,
    settings: Settings,
    *,
    as_of: datetime,
    model_uri: str,
    objective: str,
    budgets: list[float] | None = None,
) -> pd.DataFrame:
    """Solve the campaign at several budgets and tabulate spend, objective and incremental conversions.

    The customers are scored once; each budget is one solve with inventory, channel capacity,
    consent, min-basket and cooldown as in a real allocation (before control and exploration).
    """
    pop = score_population(engine, settings, as_of=as_of, model_uri=model_uri, objective=objective)
    positive = np.where(pop.eligible & (pop.value > 0), pop.cost, np.inf).min(axis=1)
    reachable = float(np.where(np.isfinite(positive), positive, 0).sum())
    if budgets is None:
        top = max(settings.campaign.budget * 2, reachable * 1.2, 1.0)
        budgets = list(np.round(np.linspace(0, top, 13)[1:], 2))
    rows = []
    best: tuple[float, np.ndarray] | None = None  # (objective, choice) of a smaller budget
    for budget in sorted(budgets):
        problem = AllocationProblem(
            value=pop.value,
            cost=pop.cost,
            eligible=pop.eligible,
            option_coupon=pop.catalog.option_coupon,
            option_channel=pop.catalog.option_channel,
            budget=float(budget),
            coupon_capacity=pop.catalog.coupon_capacity.astype(float),
            channel_capacity=pop.catalog.channel_capacity.astype(float),
        )
        result = solve_lagrangian(problem)
        choice = result.choice
        # An allocation of a smaller budget fits a larger one: the curve never falls (the solver
        # is a heuristic, and on a handful of customers rounding can lose a few hundredths).
        if best is not None and best[0] > result.objective:
            choice = best[1]
        else:
            best = (result.objective, choice)
        chosen = choice >= 0
        idx = np.flatnonzero(chosen)
        opts = choice[idx]
        objective = float(pop.value[idx, opts].sum())
        rows.append(
            {
                "budget": float(budget),
                "spend": float(pop.cost[idx, opts].sum()),
                "treated": int(chosen.sum()),
                "expected_objective": objective,
                "expected_incremental_conversions": float(pop.uplift[idx, opts].sum()),
                "solver_gap": float(relative_gap(result.dual_bound, objective)),
            }
        )
    table = pd.DataFrame(rows)
    table["marginal_objective_per_unit"] = table["expected_objective"].diff() / table["budget"].diff()
    return table


def plot_budget_curve(table: pd.DataFrame, path: Path, *, objective: str, current_budget: float) -> Path:
    """Plot the what-if curve (objective and incremental conversions vs budget) to a PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.5))
    ax = fig.subplots()
    ax.plot(table["budget"], table["expected_objective"], marker="o", label=f"expected {objective}")
    ax2 = ax.twinx()
    ax2.plot(
        table["budget"],
        table["expected_incremental_conversions"],
        marker="s",
        color="#C44E52",
        label="expected incremental conversions",
    )
    ax.axvline(current_budget, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("budget (expected spend)")
    ax.set_ylabel(f"expected {objective}")
    ax2.set_ylabel("incremental conversions")
    ax.set_title("What-if: value vs budget (dashed: configured budget)")
    fig.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return path
