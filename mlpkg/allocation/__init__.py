"""Budget- and capacity-constrained allocation of coupon/channel options to customers.

:func:`~mlpkg.allocation.solver.solve_lagrangian` is the production solver (pure numpy, chunked);
:mod:`mlpkg.allocation.reference` holds the exact HiGHS solvers it is measured against.
"""

from mlpkg.allocation.solver import (
    AllocationProblem,
    AllocationResult,
    check_feasible,
    solve_lagrangian,
)

__all__ = ["AllocationProblem", "AllocationResult", "check_feasible", "solve_lagrangian"]
