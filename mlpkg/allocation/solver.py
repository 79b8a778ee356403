"""Lagrangian allocation of coupon/channel options under budget, inventory and capacity caps.

The problem: each customer ``i`` gets at most one eligible option ``j`` (a coupon sent through a
channel) or nothing; the expected spend is capped by a budget, each coupon by its remaining
inventory and each channel by its remaining capacity; maximise the summed value.

The coupling constraints are few (``1 + n_coupons + n_channels``) while customers are many, so
they are priced instead: given prices ``λ`` (budget), ``μ_c`` (coupon) and ``ν_h`` (channel) each
customer independently takes ``argmax_j value - λ·cost - μ_c(j) - ν_h(j)``, or nothing when that
is not positive. The dual function (the priced objective plus ``prices · caps``) bounds every
allocation from above. It is minimised over the prices with damped Newton steps on an entropy
smoothing of it (the Hessian is only ``d × d`` for ``d`` caps), first on a sample of customers,
then on the customers whose choice is still open, and polished on the exact choice. The choice
at the final prices is made feasible by a repair (drop the assignments with the worst reduced
profit from each violated cap) and completed by a greedy refill of whatever budget and capacity
is left. Every pass over the ``[n, m]`` matrices runs in chunks of customers, in float32, so
memory stays at about two float32 copies of the inputs.

Optional group constraints (:class:`GroupConstraint`: a customer group's share of the treated
customers or of the spend, at least or at most) are priced the same way, one more price each;
their price shifts each customer's reduced values by a per-customer amount (a penalty for the
group's members and a subsidy for the others, or the reverse), a repair drops the customers that
push a violated bound over, and the refill keeps every bound.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np

_EPS = 1e-12
# Unusable (customer, option) entries hold about -FLT_MAX; anything below _DEAD is unusable.
_BIG = np.float32(np.finfo(np.float32).max)
_DEAD = -1e38
# Temperature of the smoothed dual, relative to the median usable value.
_TAU = 0.1
# The smoothed phase stops once every binding cap is met to within this many slacks; the exact
# polish that follows does the rest.
_SOFT_SLACK = 10.0
# Customers in the largest sample that warm-starts big solves: k // divisor, within [min, max];
# smaller samples (a quarter each, down to the floor) warm-start that one.
_SAMPLE_MIN = 2_000
_SAMPLE_MAX = 200_000
_SAMPLE_DIVISOR = 8
_SAMPLE_FLOOR = 400
_DAMPING_START = 1.0
_POLISH_STEPS = 4
_POLISH_MAX_DAMPING = 4.0
_TRIM_STEPS = 4
# A customer whose best option beats the runner-up by this many typical values is set aside
# (its choice taken as fixed) once the sample has found prices near the optimum.
_MARGIN = 1.0
_REFILL_ROUNDS = 3
# Relative price cuts tried beside the final prices when group constraints are present.
_NEARBY = (0.005, 0.01, 0.02, 0.04, 0.08)
_REFILL_LIMIT = 65_536
# The residual LP: a customer whose runner-up (or nothing) trails its best option by at most
# _RESIDUAL_MARGIN typical values at the final prices keeps its choice open; at most
# _RESIDUAL_LIMIT such alternatives (the closest) are handed to HiGHS, everyone else's choice
# fixed. At the residual LP's own prices, customers within _TIE_MARGIN of a tie (and those it
# splits) are rounded by _DIVE_STEPS more LPs and, for the few still split, an exact integer
# choice: all combinations when there are at most _ENUMERATE, else a small MILP (at most
# _WHOLE_NODES nodes; _WHOLE_SECONDS only guards against a stall). An LP value within _WHOLE of
# 0 or 1 counts as whole. It runs only when the greedy recovery leaves more than _GOOD_GAP of
# the dual bound on the table.
_RESIDUAL_MARGIN = 0.25
_RESIDUAL_LIMIT = 20_000
_TIE_MARGIN = 0.05
_DIVE_STEPS = 2
_WHOLE = 1e-6
_ENUMERATE = 4096
_WHOLE_NODES = 1000
_WHOLE_SECONDS = 1.0
_GOOD_GAP = 5e-4
# Relative slack when comparing a float64 sum of float32 costs against the budget: the same
# spend summed in another order differs by far less than this.
_BUDGET_RTOL = 1e-9


@dataclass(frozen=True)
class GroupConstraint:
    """Bound one group's share of the treated customers or of the spend.

    ``bound="max"``: the group's treated count (or spend) is at most ``share`` times the whole
    allocation's; ``bound="min"``: at least. In linear form, with ``a_i = member_i - share`` (max)
    or ``share - member_i`` (min), ``sum_i a_i · t_i <= 0`` where ``t_i`` is 1 (``measure="treated"``)
    or the assignment's cost (``measure="spend"``) for each assigned customer. Treating nobody
    always meets it; see :func:`check_group_constraints` for constraints only that can meet.

    Attributes:
        member: ``bool [n]`` whether each customer belongs to the group.
        share: the bound, in ``[0, 1]``.
        bound: ``"min"`` or ``"max"``.
        measure: ``"treated"`` (count of customers given an option) or ``"spend"``.
        label: how messages name the constraint, e.g. ``region=north min_treated_share 0.2``.
    """

    member: np.ndarray
    share: float
    bound: str = "max"
    measure: str = "treated"
    label: str = "group constraint"

    def coefficients(self) -> np.ndarray:
        """Return ``a_i`` (float64 ``[n]``) of the linear form ``sum_i a_i · t_i <= 0``."""
        member = np.asarray(self.member, dtype=np.float64)
        return member - self.share if self.bound == "max" else self.share - member


@dataclass
class AllocationProblem:
    """Describe one allocation instance: per-customer option values and costs plus the caps.

    Attributes:
        value: ``float32 [n, m]`` objective of giving option ``j`` to customer ``i`` (may be < 0).
        cost: ``float32 [n, m]`` expected budget cost of that assignment (``>= 0``).
        eligible: ``bool [n, m]`` whether option ``j`` may be given to customer ``i``.
        option_coupon: ``int [m]`` coupon index used by each option (``-1``: no coupon).
        option_channel: ``int [m]`` channel index used by each option (``-1``: no channel).
        budget: cap on the summed expected cost (``np.inf`` for no cap).
        coupon_capacity: ``float [n_coupons]`` remaining inventory, in customers (``inf`` allowed).
        channel_capacity: ``float [n_channels]`` remaining capacity, in customers (``inf`` allowed).
        group_constraints: bounds on customer groups' shares of the treated or of the spend.
    """

    value: np.ndarray
    cost: np.ndarray
    eligible: np.ndarray
    option_coupon: np.ndarray
    option_channel: np.ndarray
    budget: float
    coupon_capacity: np.ndarray
    channel_capacity: np.ndarray
    group_constraints: tuple[GroupConstraint, ...] = ()

    @property
    def n_customers(self) -> int:
        """Return the number of customers (rows)."""
        return int(np.shape(self.value)[0])

    @property
    def n_options(self) -> int:
        """Return the number of options (columns)."""
        return int(np.shape(self.value)[1])

    def validate(self) -> None:
        """Check shapes, dtypes and value ranges.

        Raises:
            ValueError: naming the offending field and the rule it breaks.
        """
        value = self.value
        if not isinstance(value, np.ndarray) or value.ndim != 2:
            raise ValueError(f"value must be a 2-D numpy array [n, m], got {_describe(value)}")
        n, m = value.shape
        for name in ("value", "cost"):
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.shape != (n, m):
                raise ValueError(f"{name} must be a numpy array of shape {(n, m)}, got {_describe(arr)}")
            if not np.issubdtype(arr.dtype, np.floating):
                raise ValueError(f"{name} must have a floating dtype (float32), got {arr.dtype}")
        eligible = self.eligible
        if not isinstance(eligible, np.ndarray) or eligible.shape != (n, m):
            raise ValueError(f"eligible must be a bool array of shape {(n, m)}, got {_describe(eligible)}")
        if eligible.dtype != np.bool_:
            raise ValueError(f"eligible must have dtype bool, got {eligible.dtype}")
        _check_chunks(value, "value", nonnegative=False)
        _check_chunks(self.cost, "cost", nonnegative=True)

        budget = self.budget
        if isinstance(budget, bool) or not isinstance(budget, (int, float, np.integer, np.floating)):
            raise ValueError(f"budget must be a number (np.inf for no cap), got {budget!r}")
        if np.isnan(budget) or budget < 0:
            raise ValueError(f"budget must be >= 0 and not NaN (np.inf for no cap), got {budget!r}")

        n_coupons = _check_capacity(self.coupon_capacity, "coupon_capacity")
        n_channels = _check_capacity(self.channel_capacity, "channel_capacity")
        _check_index(self.option_coupon, "option_coupon", m, n_coupons, "coupon_capacity")
        _check_index(self.option_channel, "option_channel", m, n_channels, "channel_capacity")
        for g in self.group_constraints:
            if not isinstance(g, GroupConstraint):
                raise ValueError(f"group_constraints must hold GroupConstraint, got {type(g).__name__}")
            member = g.member
            if not isinstance(member, np.ndarray) or member.shape != (n,) or member.dtype != np.bool_:
                got = _describe(member)
                raise ValueError(f"{g.label}: member must be a bool array of shape ({n},), got {got}")
            if not 0.0 <= float(g.share) <= 1.0:
                raise ValueError(f"{g.label}: share must be in [0, 1], got {g.share!r}")
            if g.bound not in ("min", "max"):
                raise ValueError(f"{g.label}: bound must be 'min' or 'max', got {g.bound!r}")
            if g.measure not in ("treated", "spend"):
                raise ValueError(f"{g.label}: measure must be 'treated' or 'spend', got {g.measure!r}")

    def group_coefficients(self) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(a [K, n] float64, on_cost bool [K])`` of the group constraints' linear forms."""
        n = self.n_customers
        if not self.group_constraints:
            return np.zeros((0, n)), np.zeros(0, dtype=bool)
        coef = np.stack([g.coefficients() for g in self.group_constraints])
        return coef, np.array([g.measure == "spend" for g in self.group_constraints])


@dataclass
class AllocationResult:
    """Hold an allocation and how good it is.

    Attributes:
        choice: ``int32 [n]`` chosen option per customer, ``-1`` for nothing.
        objective: summed value of the choice.
        dual_bound: an upper bound on the best achievable objective.
        gap: ``(dual_bound - objective) / max(|dual_bound|, eps)``.
        multipliers: prices of the constraints: ``budget`` (float), ``coupon`` and ``channel``
            (arrays); zero for constraints that are slack or have no cap.
        iterations: dual iterations taken (each one pass over the data, or over a sample).
        seconds: wall time of the solve.
        spend: summed expected cost of the choice.
    """

    choice: np.ndarray
    objective: float
    dual_bound: float
    gap: float
    multipliers: dict[str, np.ndarray | float] = field(default_factory=dict)
    iterations: int = 0
    seconds: float = 0.0
    spend: float = 0.0


def relative_gap(dual_bound: float, objective: float) -> float:
    """Return ``(dual_bound - objective) / max(|dual_bound|, eps)``, zero when both are zero."""
    return float((dual_bound - objective) / max(abs(dual_bound), 1e-9))


def check_feasible(problem: AllocationProblem, choice: np.ndarray) -> list[str]:
    """List every constraint that ``choice`` breaks, in words.

    Args:
        problem: the instance.
        choice: ``int [n]`` option per customer, ``-1`` for nothing.

    Returns:
        Human-readable violations; empty when the choice is feasible.
    """
    n, m = problem.n_customers, problem.n_options
    choice = np.asarray(choice)
    if choice.shape != (n,):
        return [f"choice must have shape ({n},), got {choice.shape}"]
    problems: list[str] = []
    bad = (choice < -1) | (choice >= m)
    if bad.any():
        problems.append(f"{int(bad.sum())} choices are outside [-1, {m - 1}]")
        return problems
    rows = np.flatnonzero(choice >= 0)
    cols = choice[rows]
    not_eligible = ~problem.eligible[rows, cols]
    if not_eligible.any():
        problems.append(f"{int(not_eligible.sum())} customers got an option they are not eligible for")
    spend = float(np.sum(problem.cost[rows, cols], dtype=np.float64))
    if spend > problem.budget + _BUDGET_RTOL * max(1.0, abs(problem.budget)):
        problems.append(f"spend {spend:.6g} exceeds budget {problem.budget:.6g}")
    for label, index, capacity in (
        ("coupon", problem.option_coupon, problem.coupon_capacity),
        ("channel", problem.option_channel, problem.channel_capacity),
    ):
        used = np.asarray(index)[cols]
        counts = np.bincount(used[used >= 0], minlength=len(capacity))
        for k in np.flatnonzero(counts > np.asarray(capacity, dtype=np.float64)):
            problems.append(f"{label} {k} used {int(counts[k])} times, capacity {capacity[k]:.6g}")
    costs = problem.cost[rows, cols].astype(np.float64)
    for g in problem.group_constraints:
        member = np.asarray(g.member)[rows]
        if g.measure == "treated":
            part, whole = float(member.sum()), float(len(rows))
        else:
            part, whole = float(costs[member].sum()), float(costs.sum())
        # Compared as counts (or sums) so that a constraint met exactly passes exactly.
        slack = _BUDGET_RTOL * max(1.0, whole)
        if g.bound == "max" and part > g.share * whole + slack:
            problems.append(f"{g.label}: group has {part:.6g} of {whole:.6g} {g.measure}, over {g.share:g}")
        if g.bound == "min" and part < g.share * whole - slack:
            problems.append(f"{g.label}: group has {part:.6g} of {whole:.6g} {g.measure}, under {g.share:g}")
    return problems


def check_group_constraints(problem: AllocationProblem) -> None:
    """Refuse group constraints that only an empty allocation can meet.

    A minimum share for a group none of whose customers has a usable option (eligible, positive
    value) forces everyone else out too; so do minimum shares of one attribute's groups that
    add up to more than 1 (checked where groups are known, in the settings).

    Raises:
        ValueError: naming the constraint and why it cannot be met.
    """
    usable = (problem.eligible & (problem.value > 0)).any(axis=1)
    if not usable.any():
        return
    for g in problem.group_constraints:
        if g.bound == "min" and g.share > 0 and not usable[np.asarray(g.member)].any():
            raise ValueError(
                f"{g.label} cannot be met: no customer of the group has an eligible option worth "
                f"giving ({int(np.asarray(g.member).sum())} customers in the group), so only treating "
                "nobody would meet it; lower the share or drop the constraint"
            )


def solve_lagrangian(
    problem: AllocationProblem,
    *,
    tol: float = 1e-4,
    max_iter: int = 60,
    chunk_size: int = 262_144,
) -> AllocationResult:
    """Allocate options to customers by Lagrangian relaxation, then repair to feasibility.

    Args:
        problem: the instance; validated first.
        tol: relative accuracy of the price search: it stops once every binding cap is used to
            within ``max(10·tol·capacity, one customer)`` (for the budget, one typical cost).
        max_iter: cap on dual iterations; each is one pass over the data (or over a sample).
        chunk_size: customers per chunk in the passes over the ``[n, m]`` matrices.

    Returns:
        A feasible allocation with its objective, dual bound, gap and constraint prices.
    """
    start = time.perf_counter()
    problem.validate()
    check_group_constraints(problem)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    # Unusable entries hold -FLT_MAX; pricing them may overflow to -inf, which is harmless.
    with np.errstate(over="ignore"):
        dual = _Dual(problem, chunk_size)
        theta, bound, iterations, raw, lead = dual.minimise(tol=tol, max_iter=max_iter)
        local = dual.recover(theta, raw, lead)
        best = dual.score(local)[0]
        if dual.dim and relative_gap(bound, best) > _GOOD_GAP:
            exact = dual.residual(theta, raw, lead)
            value = -np.inf if exact is None else dual.score(exact)[0]
            if value > best:
                local, best = exact, value
        if dual.n_groups and relative_gap(bound, best) > _GOOD_GAP:
            # With group constraints the dual is flat over a wider range of prices whose exact
            # choices differ by many customers: recover a choice at a few nearby prices too and
            # keep the best (each is one pass over the data plus repair and refill).
            for trial in dual.nearby(theta):
                raw_t, _, lead_t = dual.choose(trial, lead=True)
                cand = dual.recover(trial, raw_t, lead_t)
                value = dual.score(cand)[0]
                if value > best:
                    local, best = cand, value
    choice = dual.expand(local)
    objective, spend = dual.score(local)
    bound = max(bound, objective)  # rounding in float32 passes must not report a negative gap
    return AllocationResult(
        choice=choice,
        objective=objective,
        dual_bound=bound,
        gap=relative_gap(bound, objective),
        multipliers=dual.multipliers(theta),
        iterations=iterations,
        seconds=time.perf_counter() - start,
        spend=spend,
    )


class _Dual:
    """Hold the presolved instance and evaluate its (smoothed) Lagrangian dual in chunks.

    The kept data is stored option-major (``[m, n]``, float32): every reduction over a
    customer's options is then an elementwise operation over contiguous rows, which numpy does
    several times faster than a reduction along a short last axis.
    """

    def __init__(self, problem: AllocationProblem, chunk_size: int) -> None:
        self.problem = problem
        self.chunk = int(chunk_size)
        n, m = problem.n_customers, problem.n_options
        self.budget = float(problem.budget)
        self.coupon_cap = _floor_caps(problem.coupon_capacity)
        self.channel_cap = _floor_caps(problem.channel_capacity)
        self.n_coupons, self.n_channels = len(self.coupon_cap), len(self.channel_cap)
        option_coupon = np.asarray(problem.option_coupon, dtype=np.int64)
        option_channel = np.asarray(problem.option_channel, dtype=np.int64)
        # An option whose coupon or channel has no capacity left can never be used; dropping it
        # here keeps the dual from chasing an infinite price.
        option_ok = (_lookup(self.coupon_cap, option_coupon) >= 1) & (
            _lookup(self.channel_cap, option_channel) >= 1
        )

        # Copy to option-major float32 with unusable entries (ineligible, value <= 0, dearer
        # than the whole budget, or on a coupon/channel with nothing left) set to -inf.
        value = np.empty((m, n), dtype=np.float32)
        cost = np.empty((m, n), dtype=np.float32)
        row_has = np.zeros(n, dtype=bool)
        for a, b in _chunks(n, self.chunk):
            v = problem.value[a:b].astype(np.float32)  # a fresh copy, masked in place
            # Arithmetic masking: several times faster than boolean assignment or np.where.
            v -= np.multiply(~self._usable(slice(a, b), option_ok), _BIG, dtype=np.float32)
            value[:, a:b] = v.T
            cost[:, a:b] = problem.cost[a:b].T
            row_has[a:b] = value[:, a:b].max(axis=0, initial=-np.inf) > _DEAD
        col_max = np.full(m, -np.inf, dtype=np.float32)
        for a, b in _chunks(n, self.chunk):
            col_max = np.maximum(col_max, value[:, a:b].max(axis=1, initial=-np.inf))
        # Keep customers with at least one usable option and options usable by someone; nobody
        # else can change the objective. Rows are only compacted when that saves real work.
        self.cols = np.flatnonzero(col_max > _DEAD)
        self.rows = np.flatnonzero(row_has)
        if len(self.rows) > 0.8 * n:
            self.rows = np.arange(n)
        else:
            value, cost = value[:, self.rows], cost[:, self.rows]
        if len(self.cols) < m:
            value, cost = value[self.cols], cost[self.cols]
        self.value, self.cost = value, cost
        col_max = col_max[self.cols]
        k, mc = len(self.rows), len(self.cols)
        self.option_coupon = option_coupon[self.cols]
        self.option_channel = option_channel[self.cols]
        coupon_members = [np.flatnonzero(self.option_coupon == c) for c in range(self.n_coupons)]
        channel_members = [np.flatnonzero(self.option_channel == h) for h in range(self.n_channels)]
        coupon_demand = np.zeros(self.n_coupons, dtype=np.int64)
        channel_demand = np.zeros(self.n_channels, dtype=np.int64)
        max_ratio = 0.0
        max_spend = 0.0
        for a, b in _chunks(k, self.chunk):
            usable = self.value[:, a:b] > _DEAD
            c = self.cost[:, a:b]
            for members, demand in ((coupon_members, coupon_demand), (channel_members, channel_demand)):
                for g, cols in enumerate(members):
                    if cols.size:
                        demand[g] += int(np.count_nonzero(usable[cols].any(axis=0)))
            # A zero-cost option gets a huge ratio, which only loosens the bound on the price.
            ratio = self.value[:, a:b] / np.maximum(c, np.float32(1e-30))
            max_ratio = max(max_ratio, float(ratio.max(initial=0.0)))
            max_spend += float((c * usable).max(axis=0, initial=0).sum(dtype=np.float64))
        # Typical usable value and cost, from about a thousand customers: they set the
        # smoothing temperature and how closely a cap must be met.
        step = max(1, k // 1024)
        sample = self.value[:, ::step]
        finite = sample > _DEAD
        self.typical_value = float(np.median(sample[finite])) if finite.any() else 1.0
        self.typical_cost = float(np.median(self.cost[:, ::step][finite])) if finite.any() else 1.0

        # Dual coordinates: only caps that can bind, i.e. below the number of customers who could
        # use them, and a budget below the dearest possible spend.
        self.active_coupons = np.flatnonzero(self.coupon_cap < coupon_demand)
        self.active_channels = np.flatnonzero(self.channel_cap < channel_demand)
        self.has_budget = bool(np.isfinite(self.budget) and self.budget < max_spend)
        groups = [coupon_members[c] for c in self.active_coupons]
        groups += [channel_members[h] for h in self.active_channels]
        self.n_counts = len(groups)
        self.groups = [_as_slice(cols) for cols in groups]
        self.indicator = np.zeros((self.n_counts, mc), dtype=np.float32)
        for q, cols in enumerate(groups):
            self.indicator[q, cols] = 1.0
        # Group constraints ``sum_i a_i t_i <= 0`` are priced like the caps, with a per-customer
        # coefficient: their price moves each customer's reduced value by ``-ρ a_i`` (treated) or
        # ``-ρ a_i cost`` (spend), so they are always dual coordinates, placed after the counts.
        coef, on_cost = problem.group_coefficients()
        self.group_coef = np.ascontiguousarray(coef[:, self.rows].astype(np.float32))
        self.group_on_cost = on_cost
        self.n_groups = len(on_cost)
        caps = [self.coupon_cap[self.active_coupons], self.channel_cap[self.active_channels]]
        caps.append(np.zeros(self.n_groups))
        self.capacity = np.concatenate([[self.budget] if self.has_budget else [], *caps]).astype(np.float64)
        self.dim = len(self.capacity)
        # Prices above these are never optimal: a coupon priced above every value it could earn,
        # or a budget price above every value per unit of cost, only switches options off. A
        # group price at which every member's (or non-member's) best option is priced out, with
        # room for the other prices' subsidies, is as far as a group price need go.
        uppers = [float(col_max[cols].max(initial=0.0)) for cols in groups]
        top_value = float(col_max.max(initial=0.0))
        for q in range(self.n_groups):
            a = np.abs(coef[q][coef[q] != 0])
            smallest = max(float(a.min(initial=1.0)), 1e-3)
            uppers.append(4.0 * (max_ratio if on_cost[q] else top_value) / smallest)
        self.upper = np.array(([max_ratio] if self.has_budget else []) + uppers, dtype=np.float64)
        self.upper = self.upper * (1 + 1e-6) + 1e-12
        self.null_directions = _null_directions(self.indicator)

    def _usable(self, rows: slice | np.ndarray, option_ok: np.ndarray) -> np.ndarray:
        p = self.problem
        usable = p.eligible[rows] & (p.value[rows] > 0) & option_ok[None, :]
        if np.isfinite(self.budget):
            usable &= p.cost[rows] <= self.budget
        return usable

    # ----------------------------------------------------------------------------------------------
    # prices
    def _split(self, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """Return ``(λ, per-option count price, per-customer price, per-customer cost price)``.

        The last two (``None`` without group constraints) are what the group prices add to each
        kept customer's reduced value: ``-alpha_i`` per assignment and ``-beta_i`` per unit of cost.
        """
        lam = float(theta[0]) if self.has_budget else 0.0
        first = 1 if self.has_budget else 0
        counts = theta[first : first + self.n_counts]
        offset = counts.astype(np.float64) @ self.indicator if self.n_counts else np.zeros(len(self.cols))
        if not self.n_groups:
            return lam, offset.astype(np.float32), None, None
        rho = np.asarray(theta[first + self.n_counts :], dtype=np.float32)
        alpha = np.where(~self.group_on_cost, rho, 0).astype(np.float32) @ self.group_coef
        beta = np.where(self.group_on_cost, rho, 0).astype(np.float32) @ self.group_coef
        return lam, offset.astype(np.float32), alpha, beta

    def multipliers(self, theta: np.ndarray) -> dict[str, np.ndarray | float]:
        """Map the dual vector back to named prices on the original constraints."""
        lam = float(theta[0]) if self.has_budget else 0.0
        first = 1 if self.has_budget else 0
        counts = theta[first : first + self.n_counts]
        coupon = np.zeros(self.n_coupons, dtype=np.float64)
        channel = np.zeros(self.n_channels, dtype=np.float64)
        nc = len(self.active_coupons)
        coupon[self.active_coupons] = counts[:nc]
        channel[self.active_channels] = counts[nc:]
        group = np.asarray(theta[first + self.n_counts :], dtype=np.float64).copy()
        return {"budget": lam, "coupon": coupon, "channel": channel, "group": group}

    def _reduced(self, a: int, b: int, prices: tuple) -> np.ndarray:
        """Return ``value - λ·cost - μ - ν`` (less group prices) for customers ``a:b``, ``[m, b - a]``."""
        lam, offset, alpha, beta = prices
        if beta is not None:
            r = self.cost[:, a:b] * (np.float32(-lam) - beta[a:b])
            r += self.value[:, a:b]
            r -= alpha[a:b]
        elif lam:
            r = self.cost[:, a:b] * np.float32(-lam)
            r += self.value[:, a:b]
        else:
            r = self.value[:, a:b].copy()
        if self.n_counts:
            r -= offset[:, None]
        return r

    # ----------------------------------------------------------------------------------------------
    # dual
    def evaluate(self, theta: np.ndarray, tau: float) -> tuple[float, float, np.ndarray, np.ndarray]:
        """Evaluate the entropy-smoothed dual at ``theta`` with temperature ``tau``.

        Returns:
            ``(smoothed value, exact dual value, gradient, Hessian)``; the exact (unsmoothed) dual
            value is a valid upper bound on the optimum, the rest refer to the smoothed dual.
        """
        prices = self._split(theta)
        mc = len(self.cols)
        top_sum = 0.0
        log_sum = 0.0
        col_p = np.zeros(mc)
        col_pc = np.zeros(mc)
        col_pcc = np.zeros(mc)
        wtw = np.zeros((self.dim, self.dim))
        groups = _GroupMoments(self.n_groups, self.n_counts)
        inv_tau = np.float32(1.0 / tau)
        for a, b in _chunks(len(self.rows), self.chunk):
            r = self._reduced(a, b, prices)
            top = r.max(axis=0)
            np.maximum(top, 0.0, out=top)  # the "nothing" option has reduced value 0
            top_sum += float(top.sum(dtype=np.float64))
            r -= top
            r *= inv_tau
            np.exp(r, out=r)
            z = r.sum(axis=0)
            z += np.exp(-top * inv_tau)
            log_sum += float(np.log(z).sum(dtype=np.float64))
            r /= z  # r now holds each customer's choice probabilities
            col_p += r.sum(axis=1)  # pairwise float32 sums along contiguous rows are accurate
            w = []
            if self.has_budget:
                pc = r * self.cost[:, a:b]
                col_pc += pc.sum(axis=1)
                w.append(pc.sum(axis=0)[None, :])
                pc *= self.cost[:, a:b]
                col_pcc += pc.sum(axis=1)
            w.extend(r[cols].sum(axis=0)[None, :] for cols in self.groups)
            if self.n_groups:
                coef = self.group_coef[:, a:b]
                w.append(groups.add(r, self.cost[:, a:b], coef, self.group_on_cost, self.groups))
            wtw += _gram(np.concatenate(w).astype(np.float64))
        usage, second = self._moments(col_p, col_pc, col_pcc)
        if self.n_groups:
            usage, second = groups.extend(usage, second, self.has_budget)
        linear = float(theta @ self.capacity)
        soft = top_sum + tau * log_sum + linear
        return soft, top_sum + linear, self.capacity - usage, (second - wtw) / tau

    def _moments(
        self, col_p: np.ndarray, col_pc: np.ndarray, col_pcc: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Aggregate per-option sums into the expected usage and its second moment ``E[u uᵀ]``."""
        ind = self.indicator.astype(np.float64)
        count_usage = ind @ col_p
        count_second = (ind * col_p) @ ind.T
        if not self.has_budget:
            return count_usage, count_second
        cross = ind @ col_pc
        usage = np.concatenate(([col_pc.sum()], count_usage))
        d0 = 1 + self.n_counts  # the group coordinates, if any, are appended by _GroupMoments
        second = np.zeros((d0, d0))
        second[0, 0] = col_pcc.sum()
        second[0, 1:] = cross
        second[1:, 0] = cross
        second[1:, 1:] = count_second
        return usage, second

    def hard_pass(self, theta: np.ndarray) -> tuple[float, np.ndarray]:
        """Take each customer's best option at prices ``theta``.

        Returns:
            ``(exact dual value, usage of each dual coordinate)``. A customer with two equally
            good options counts on both; ties are rare and this only steers the prices.
        """
        prices = self._split(theta)
        total = 0.0
        col_n = np.zeros(len(self.cols))
        col_c = np.zeros(len(self.cols))
        group_use = np.zeros(self.n_groups)
        for a, b in _chunks(len(self.rows), self.chunk):
            r = self._reduced(a, b, prices)
            best = r.max(axis=0)
            np.maximum(best, 0.0, out=best)
            total += float(best.sum(dtype=np.float64))
            taken = r == best
            taken &= best > 0  # "nothing" wins ties: a zero gain is no gain
            col_n += np.count_nonzero(taken, axis=1)
            if self.has_budget:
                col_c += (self.cost[:, a:b] * taken).sum(axis=1, dtype=np.float64)
            if self.n_groups:
                per = np.count_nonzero(taken, axis=0).astype(np.float64)
                per_cost = (self.cost[:, a:b] * taken).sum(axis=0, dtype=np.float64)
                coef = self.group_coef[:, a:b].astype(np.float64)
                group_use += np.where(self.group_on_cost, coef @ per_cost, coef @ per)
        usage = self.indicator.astype(np.float64) @ col_n
        if self.has_budget:
            usage = np.concatenate(([col_c.sum()], usage))
        usage = np.concatenate((usage, group_use))
        return total + float(theta @ self.capacity), usage

    def _subset(self, index: slice | np.ndarray, capacity: np.ndarray) -> _Dual:
        """Return the same dual restricted to some customers, with the caps they may use."""
        part = copy.copy(self)
        part.value = np.ascontiguousarray(self.value[:, index])
        part.cost = np.ascontiguousarray(self.cost[:, index])
        part.rows = self.rows[index]
        part.group_coef = np.ascontiguousarray(self.group_coef[:, index])
        part.capacity = np.asarray(capacity, dtype=np.float64)
        return part

    def _samples(self) -> list[_Dual]:
        """Return the same dual on evenly spaced samples of customers with scaled caps.

        The largest sample holds ``k // 8`` customers (within ``[2,000, 200,000]``, and only
        when that is at most a quarter of everyone); each next one a quarter of that, down to
        about 500. They come smallest first: each warm-starts the next.
        """
        k = len(self.rows)
        size = max(_SAMPLE_MIN, min(k // _SAMPLE_DIVISOR, _SAMPLE_MAX))
        samples = []
        while k >= 4 * size and size >= _SAMPLE_FLOOR:
            index = slice(None, None, k // size)
            samples.append(self._subset(index, self.capacity * (len(range(k)[index]) / k)))
            size //= 4
        return samples[::-1]

    def _working_set(self, theta: np.ndarray) -> tuple[_Dual, float, np.ndarray]:
        """Split off the customers whose choice is clear at prices near the optimum.

        A customer whose best option beats the runner-up (or nothing) by more than the typical
        value keeps that choice under any small change of the prices, so its usage is a
        constant: the remaining customers can be priced against what it leaves of each cap.

        Returns:
            ``(dual over the undecided customers, or self when that is not worth it, exact dual
            value at theta, what the decided customers use of each cap)``.
        """
        local, exact, lead = self.choose(theta, lead=True)
        decided = lead >= _MARGIN * self.typical_value
        if np.count_nonzero(decided) < 0.5 * len(decided):
            return self, exact, np.zeros(self.dim)
        rows = np.flatnonzero(decided & (local >= 0))
        usage = self._usage(rows, local[rows].astype(np.int64))
        left = self.capacity - usage
        # A group's sum may run negative here: the undecided customers can make up for it.
        if np.any(left[: self.dim - self.n_groups] < 0):
            return self, exact, np.zeros(self.dim)  # the prices are far off: set nobody aside
        return self._subset(np.flatnonzero(~decided), left), exact, usage

    def _usage(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Return what the assignments ``(rows, cols)`` use of each dual coordinate."""
        usage = self.indicator.astype(np.float64) @ np.bincount(cols, minlength=len(self.cols))
        costs = self.cost[cols, rows].astype(np.float64)
        if self.has_budget:
            usage = np.concatenate(([float(costs.sum())], usage))
        if self.n_groups:
            coef = self.group_coef[:, rows].astype(np.float64)
            usage = np.concatenate((usage, np.where(self.group_on_cost, coef @ costs, coef.sum(axis=1))))
        return usage

    def smoothed(
        self, theta: np.ndarray, tau: float, slack: np.ndarray, max_iter: int, bound: float
    ) -> tuple[np.ndarray, np.ndarray, float, int]:
        """Minimise the smoothed dual at temperature ``tau`` with damped projected Newton steps.

        Returns:
            ``(theta, Hessian there, best exact dual value seen, iterations)``.
        """
        soft, hard, grad, hess = self.evaluate(theta, tau)
        bound = min(bound, hard)
        damping = _DAMPING_START
        iterations = 0
        while iterations < max_iter and not _converged(theta, grad, _SOFT_SLACK * slack):
            step = _damped_newton_step(theta, grad, hess, damping, self.upper)
            trial = np.clip(theta + step, 0.0, self.upper)
            move = trial - theta
            predicted = -float(grad @ move + 0.5 * move @ hess @ move)
            if predicted <= 1e-12 * max(abs(soft), 1.0):
                if damping >= 1e8:
                    break
                damping = min(damping * 16, 1e8)
                continue
            t_soft, t_hard, t_grad, t_hess = self.evaluate(trial, tau)
            iterations += 1
            bound = min(bound, t_hard)
            ratio = (soft - t_soft) / predicted
            if ratio > 0.1:
                theta, soft, grad, hess = trial, t_soft, t_grad, t_hess
            if ratio > 0.75:
                damping = max(damping / 4, 1e-8)
            elif ratio < 0.25:
                damping = min(damping * 4, 1e8)
        return theta, hess, bound, iterations

    def minimise(self, *, tol: float, max_iter: int) -> tuple[np.ndarray, float, int, np.ndarray, np.ndarray]:
        """Minimise the dual: damped Newton on an entropy smoothing, then an exact polish.

        Phase one minimises the smoothed dual at a temperature of a tenth of the typical value:
        the smoothing still averages over many customers, so its Hessian is a good model of how
        usage responds to prices. On large instances it first runs on evenly spaced samples of
        customers with proportionally scaled caps, which land close to the optimal prices for a
        fraction of the work; customers whose choice is then clear are set aside and the rest
        priced against what they leave. Phase two works on the exact (unsmoothed) choice:
        Newton steps on that Hessian towards ``usage(θ) = capacity``, a search on the budget
        price alone, and a slide along price directions that change no choice. One exact pass
        over everyone then checks that the customers set aside did not change the usage by
        more than a slack (else phase two is redone over everyone), and a last one takes the
        choices, their leads and the exact dual bound. Only exact passes over everyone count
        towards the bound.

        Returns:
            ``(theta, best exact dual bound seen, iterations, choice over kept customers, lead
            of each customer's best option over its runner-up)``.
        """
        theta = np.zeros(self.dim)
        if self.dim == 0 or len(self.rows) == 0:
            local, bound, lead = self.choose(theta, lead=True)
            return theta, bound, 0, local, lead
        bound, usage = self.hard_pass(theta)
        if np.all(usage <= self.capacity):  # nothing binds: everyone takes their best option
            local, bound, lead = self.choose(theta, lead=True)
            return theta, bound, 0, local, lead
        slack = self._slack(tol)
        tau = self.typical_value * _TAU
        iterations = 0
        work = self
        # With group bounds the samples' prices led the full solve astray (a group's sum on a
        # sample is a poor proxy for the whole one's): every pass then covers everyone.
        samples = [] if self.n_groups else self._samples()
        for sample in samples:
            # Each sample is solved to the full problem's accuracy (its caps are a fraction of the
            # full ones, and its smoothed usage is not whole customers).
            share = sample.capacity / np.maximum(self.capacity, _EPS)
            share[self.dim - self.n_groups :] = len(sample.rows) / len(self.rows)  # groups' caps are 0
            theta, _, _, steps = sample.smoothed(theta, tau, slack * share, max_iter - iterations, np.inf)
            iterations += steps
        sampled, sampled_value = theta, np.inf
        if samples:
            work, sampled_value, fixed = self._working_set(theta)
            bound = min(bound, sampled_value)
        theta, hess, steps, usage = work.settle(theta, tau, slack, max_iter - iterations)
        iterations += steps
        if work is not self:
            # The set-aside customers were assumed to keep their choice: check on everyone, and
            # polish over everyone if their moves shifted the usage by more than a slack.
            seen, full_usage = self.hard_pass(theta)
            bound = min(bound, seen)
            if np.any(np.abs(full_usage - usage - fixed) > slack):
                if sampled_value < seen:
                    # The undecided few priced against a sliver of the caps can run far from the
                    # optimum (a budget price three times too high, seen); the samples' prices were
                    # better for everyone: polish from there, with everyone's curvature.
                    theta = sampled
                    hess = self.evaluate(theta, tau)[3]
                    iterations += 1
                theta, steps, seen, _ = self.finish(theta, hess, slack, max(max_iter - iterations, 1))
                bound, iterations = min(bound, seen), iterations + steps
        local, seen, lead = self.choose(theta, lead=True)
        return theta, float(min(bound, seen)), iterations, local, lead

    def settle(
        self, theta: np.ndarray, tau: float, slack: np.ndarray, max_iter: int
    ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray]:
        """Run the smoothed phase, then :meth:`finish`, from ``theta``.

        Returns:
            ``(theta, Hessian of the smoothed dual, iterations, usage at theta)``.
        """
        theta, hess, _, iterations = self.smoothed(theta, tau, slack, max_iter, np.inf)
        theta, steps, _, usage = self.finish(theta, hess, slack, max_iter - iterations)
        return theta, hess, iterations + steps, usage

    def finish(
        self, theta: np.ndarray, hess: np.ndarray, slack: np.ndarray, max_iter: int
    ) -> tuple[np.ndarray, int, float, np.ndarray]:
        """Polish on the exact choice, fit the budget, slide along choice-neutral directions.

        Returns:
            ``(theta, steps, best exact dual value seen, usage at theta)``.
        """
        theta, hard, usage, bound, steps = self._polish(theta, hess, slack, max_iter)
        if self.has_budget and steps < max_iter:
            theta, _, usage, seen, more = self._fit_budget(theta, hard, usage, hess, slack)
            bound, steps = min(bound, seen), steps + more
        return self._slide(theta), steps, bound, usage

    def _polish(
        self, theta: np.ndarray, hess: np.ndarray, slack: np.ndarray, max_iter: int
    ) -> tuple[np.ndarray, float, np.ndarray, float, int]:
        """Steer the exact choice's usage onto the caps with Newton steps on a fixed Hessian.

        Each binding cap is aimed half a slack below its capacity, so that the repair rarely
        has to drop anyone and the refill tops up what is left. A step is kept only when it
        lowers the exact dual of that shifted problem; the exact dual is flat to within a few
        customers near the optimum, so the polish stops once steps keep failing.

        Returns:
            ``(theta, exact dual value there, usage there, best exact dual value seen, steps)``.
        """
        target = self.capacity - 0.5 * slack
        hard, usage = self.hard_pass(theta)
        bound = hard
        shifted = hard - 0.5 * float(theta @ slack)
        damping = 0.0
        steps = 0
        while steps < min(_POLISH_STEPS, max_iter) and not _met(theta, self.capacity - usage, slack):
            step = _damped_newton_step(theta, target - usage, hess, damping, self.upper)
            trial = np.clip(theta + step, 0.0, self.upper)
            t_hard, t_usage = self.hard_pass(trial)
            steps += 1
            bound = min(bound, t_hard)
            t_shifted = t_hard - 0.5 * float(trial @ slack)
            if t_shifted <= shifted:
                theta, shifted, usage = trial, t_shifted, t_usage
                damping /= 4
            elif damping >= _POLISH_MAX_DAMPING:
                break
            else:
                damping = max(4 * damping, 0.25)
        return theta, shifted + 0.5 * float(theta @ slack), usage, bound, steps

    def _slide(self, theta: np.ndarray) -> np.ndarray:
        """Move the prices along directions that change no reduced value, as far as that helps.

        When every option uses one coupon and one channel, raising all coupon prices and
        lowering all channel prices by the same amount leaves every choice as it is; the dual
        is then linear along that direction and Newton steps, which see no curvature there,
        barely move. The exact minimum along it lies where a price reaches a bound.
        """
        first = 1 if self.has_budget else 0
        for direction in self.null_directions:
            full = np.zeros(self.dim)
            full[first : first + self.n_counts] = direction
            slope = float(full @ self.capacity)
            if slope > 0:
                full, slope = -full, -slope
            if slope == 0:
                continue
            with np.errstate(divide="ignore", invalid="ignore"):
                to_zero = np.where(full < 0, -theta / full, np.inf)
                to_top = np.where(full > 0, (self.upper - theta) / full, np.inf)
            t = float(min(to_zero.min(), to_top.min()))
            if np.isfinite(t) and t > 0:
                theta = np.clip(theta + t * full, 0.0, self.upper)
        return theta

    def _fit_budget(
        self,
        theta: np.ndarray,
        hard: float,
        usage: np.ndarray,
        hess: np.ndarray,
        slack: np.ndarray,
    ) -> tuple[np.ndarray, float, np.ndarray, float, int]:
        """Move the budget price alone until the exact choice spends just under the budget.

        Undoing an overspend means dropping whole customers, and an underspend is hard to
        refill once every coupon and channel is full (only swaps between customers could use
        it), so the budget is the one cap we aim at closely before the repair: spend in
        ``[budget - slack, budget]``. Spend falls monotonically as the budget price rises with
        the other prices fixed, so a bracketing secant search is safe.

        Returns:
            ``(theta, exact dual value there, usage there, best exact dual value seen, steps)``
            at the best price found that fits; the starting point (value ``inf`` if it
            overspends) when none does.
        """
        budget, target = self.capacity[0], self.capacity[0] - 0.5 * slack[0]
        spend = float(usage[0])
        bound = hard
        best = (theta, hard, usage) if spend <= budget else (theta, float(np.inf), usage)
        best_spend = spend if spend <= budget else -np.inf
        low = high = None  # prices known to overspend / to fit
        price = float(theta[0])
        steps = 0
        for _ in range(_TRIM_STEPS):
            if budget - slack[0] <= spend <= budget:
                break
            if spend > budget:
                low, spend_low = price, spend
            else:
                high, spend_high = price, spend
                if price <= 0:
                    break  # free budget and still under: nothing to gain
            if low is not None and high is not None:
                share = (spend_low - target) / max(spend_low - spend_high, _EPS)
                price = low + min(max(share, 0.1), 0.9) * (high - low)
            else:
                slope = max(float(hess[0, 0]), _EPS)  # spend lost per unit of price, smoothed
                price = min(max(price + (spend - target) / slope, 0.0), float(self.upper[0]))
            trial = theta.copy()
            trial[0] = price
            t_hard, t_usage = self.hard_pass(trial)
            steps += 1
            bound = min(bound, t_hard)
            spend = float(t_usage[0])
            if best_spend < spend <= budget:
                best, best_spend = (trial, t_hard, t_usage), spend
        return best[0], best[1], best[2], bound, steps

    def _slack(self, tol: float) -> np.ndarray:
        """Return how far each usage may miss its cap and still count as met."""
        unit = np.ones(self.dim)  # one customer for a count cap ...
        if self.has_budget:
            unit[0] = self.typical_cost  # ... and one typical customer's cost for the budget
        unit[self.dim - self.n_groups :] = np.where(self.group_on_cost, self.typical_cost, 1.0)
        return np.maximum(unit, 10.0 * tol * self.capacity)

    # ----------------------------------------------------------------------------------------------
    # primal
    def choose(self, theta: np.ndarray, *, lead: bool = False) -> tuple[np.ndarray, float, np.ndarray]:
        """Take each kept customer's best option at prices ``theta``.

        Returns:
            ``(choice (-1: nothing), exact dual value at theta, lead)``; ``lead`` is by how much
            each customer's best beats its runner-up (nothing counts as an option worth 0; ties
            give 0), computed only when asked for (else empty).
        """
        prices = self._split(theta)
        k = len(self.rows)
        local = np.full(k, -1, dtype=np.int32)
        margin = np.empty(k if lead else 0, dtype=np.float32)
        total = 0.0
        for a, b in _chunks(k, self.chunk):
            r = self._reduced(a, b, prices)
            best = np.zeros(b - a, dtype=np.float32)  # "nothing" wins ties: never pick a zero gain
            second = np.full(b - a, -np.inf, dtype=np.float32)
            pick = local[a:b]
            for j in range(r.shape[0]):
                if lead:
                    np.maximum(second, np.minimum(best, r[j]), out=second)
                pick[r[j] > best] = j
                np.maximum(best, r[j], out=best)
            total += float(best.sum(dtype=np.float64))
            if lead:
                margin[a:b] = best - second
        return local, total + float(theta @ self.capacity), margin

    def _assigned(self, local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = np.flatnonzero(local >= 0)
        return rows, local[rows].astype(np.int64)

    def _reduced_at(self, rows: np.ndarray, cols: np.ndarray, theta: np.ndarray) -> np.ndarray:
        lam, offset, alpha, beta = self._split(theta)
        cost = self.cost[cols, rows].astype(np.float64)
        reduced = self.value[cols, rows].astype(np.float64) - lam * cost - offset[cols].astype(np.float64)
        if alpha is not None:
            reduced -= alpha[rows].astype(np.float64) + beta[rows].astype(np.float64) * cost
        return reduced

    def repair(self, local: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Drop the assignments with the worst reduced profit until every cap holds."""
        local = local.copy()
        for index, caps in ((self.option_coupon, self.coupon_cap), (self.option_channel, self.channel_cap)):
            rows, cols = self._assigned(local)
            group = index[cols]
            counts = np.bincount(group[group >= 0], minlength=len(caps))
            for g in np.flatnonzero(counts > caps):
                members = rows[group == g]
                reduced = self._reduced_at(members, local[members].astype(np.int64), theta)
                excess = int(counts[g] - caps[g])
                local[members[np.argsort(reduced, kind="stable")[:excess]]] = -1
        if np.isfinite(self.budget):
            rows, cols = self._assigned(local)
            cost = self.cost[cols, rows].astype(np.float64)
            spend = float(cost.sum())
            if spend > self.budget:
                # Worst reduced profit per unit of budget freed goes first (the knapsack order);
                # zero-cost assignments free nothing and go last.
                ratio = self._reduced_at(rows, cols, theta) / np.maximum(cost, _EPS)
                order = np.argsort(ratio, kind="stable")
                freed = np.cumsum(cost[order])
                n_drop = int(np.searchsorted(freed, spend - self.budget, side="left")) + 1
                local[rows[order[:n_drop]]] = -1
                rest = order[n_drop:]
                # Summing in another order can leave the budget exceeded by a rounding error.
                while rest.size and float(cost[rest].sum()) > self.budget:
                    local[rows[rest[0]]] = -1
                    rest = rest[1:]
        return local

    def recover(self, theta: np.ndarray, raw: np.ndarray, lead: np.ndarray) -> np.ndarray:
        """Make the choice at prices ``theta`` feasible (repair) and spend what is left (refill)."""
        local = self.repair_groups(self.repair(raw, theta), theta)
        # Moves of customers far ahead of their runner-up rank below everyone else's; those
        # the repair dropped are looked at whatever their lead.
        consider = (lead < _MARGIN * self.typical_value) | (local != raw)
        # The refill keeps every group sum <= 0; the last pass only undoes rounding in float sums.
        return self.repair_groups(self.refill(local, theta, consider), theta)

    def residual(self, theta: np.ndarray, raw: np.ndarray, lead: np.ndarray) -> np.ndarray | None:
        """Settle the near-tie customers' choices with small LPs, everyone else fixed at ``raw``.

        At prices near the optimum a customer far ahead of its runner-up takes its best option
        in every optimal LP solution (complementary slackness), so only the customers whose
        runner-up (another option or nothing) trails by a small reduced gap decide how the caps
        are shared. Their closest alternatives and their best option are the variables of an LP
        over the caps that the fixed customers leave (HiGHS, through scipy; a thousand or so
        variables here, never the full problem). Its duals are the exact prices of that
        residual problem: the customers whose choice is clear at those prices are fixed too, and
        the few dozen left near a tie, or split by the LP, are rounded by diving (each LP forbids
        every split customer's least-used alternative) and then, for the handful still split,
        an exact integer choice (HiGHS branch and bound on a few dozen variables). The usual
        repair and refill finish.

        Returns:
            A feasible choice over the kept customers, or None when there is nothing to settle or
            the LP could not be solved (the fixed customers alone overrun a cap, say).
        """
        pairs = self._near_ties(theta, raw)
        if pairs is None:
            return None
        cust, col = pairs
        free = np.zeros(len(raw), dtype=bool)
        free[cust] = True
        head = np.flatnonzero(free & (raw >= 0))
        rows = np.concatenate((cust[col >= 0], head))
        cols = np.concatenate((col[col >= 0], raw[head].astype(np.int64)))
        local = np.where(free, -1, raw).astype(np.int32)
        lp = _ResidualLP(self, local, rows, cols)
        x = lp.solve()
        if x is None:
            return None
        # At the residual LP's prices, a customer it gives one option whole and whose runner-up
        # (nothing included) trails by more than _TIE_MARGIN keeps that option.
        reduced = lp.value - lp.usage.T @ lp.prices
        best = np.zeros(lp.n_members)
        np.maximum.at(best, lp.position, reduced)
        on, used = x > 1 - _WHOLE, x > _WHOLE
        runner_up = np.where(lp.per_member(on) > 0, best, np.inf)
        np.minimum.at(runner_up, lp.position[~used], (best[lp.position] - reduced)[~used])
        open_ = (lp.per_member(used & ~on) > 0) | (runner_up <= _TIE_MARGIN * self.typical_value)
        settled = on & ~open_[lp.position]
        local[rows[settled]] = cols[settled]
        keep = np.flatnonzero(open_[lp.position])
        rows, cols, x = rows[keep], cols[keep], x[keep]  # x stays optimal with the rest fixed
        dive = _ResidualLP(self, local, rows, cols)
        for _ in range(_DIVE_STEPS):
            frac = np.flatnonzero((x > _WHOLE) & (x < 1 - _WHOLE))
            if frac.size == 0:
                break
            order = frac[np.argsort(x[frac], kind="stable")]
            _, first = np.unique(dive.position[order], return_index=True)
            before = dive.upper.copy()
            dive.upper[order[first]] = 0.0
            trial = dive.solve()
            if trial is None:  # forbidding those left no feasible LP: round the last one
                dive.upper = before
                break
            x = trial
        on = x > 1 - _WHOLE
        split = dive.per_member((x > _WHOLE) & ~on) > 0
        whole = on & ~split[dive.position]
        local[rows[whole]] = cols[whole]
        last = np.flatnonzero(split[dive.position] & (dive.upper > 0))
        if last.size:
            pick = _ResidualLP(self, local, rows[last], cols[last]).solve_whole()
            if pick is not None:
                local[rows[last][pick]] = cols[last][pick]
        # The LPs hold float caps to a tolerance: the repair makes the choice feasible exactly.
        local = self.repair_groups(self.repair(local, theta), theta)
        consider = (lead < _MARGIN * self.typical_value) | free
        return self.repair_groups(self.refill(local, theta, consider), theta)

    def _near_ties(self, theta: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """Return ``(customer, option)`` of the alternatives that trail a customer's best a little.

        Option ``-1`` is nothing (for a customer whose best option is worth little at ``theta``);
        each customer's best option itself is not listed. At most ``_RESIDUAL_LIMIT``, the
        closest; None when there is none.
        """
        prices = self._split(theta)
        reach = np.float32(_RESIDUAL_MARGIN * self.typical_value)
        found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        for a, b in _chunks(len(self.rows), self.chunk):
            r = self._reduced(a, b, prices)
            pick = raw[a:b].astype(np.int64)
            idx = np.arange(b - a)
            best = np.where(pick >= 0, r[np.maximum(pick, 0), idx], 0).astype(np.float32)
            r -= best
            has = pick >= 0
            r[pick[has], idx[has]] = -np.inf  # a customer's best option is no alternative
            j, i = np.nonzero(r >= -reach)
            found.append((i + a, j, -r[j, i]))
            drop = np.flatnonzero(has & (best <= reach))
            found.append((drop + a, np.full(drop.size, -1), best[drop]))
        cust, col, gap = (np.concatenate(x) for x in zip(*found, strict=True))
        if cust.size == 0:
            return None
        if cust.size > _RESIDUAL_LIMIT:
            keep = np.argpartition(gap, _RESIDUAL_LIMIT)[:_RESIDUAL_LIMIT]
            cust, col = cust[keep], col[keep]
        return cust, col

    def _usage_rows(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """Return what each assignment ``(rows, cols)`` uses of each dual coordinate, ``[dim, len]``."""
        out = []
        costs = self.cost[cols, rows].astype(np.float64)
        if self.has_budget:
            out.append(costs[None, :])
        if self.n_counts:
            out.append(self.indicator[:, cols].astype(np.float64))
        if self.n_groups:
            coef = self.group_coef[:, rows].astype(np.float64)
            out.append(coef * np.where(self.group_on_cost[:, None], costs[None, :], 1.0))
        return np.concatenate(out) if out else np.zeros((0, len(rows)))

    def nearby(self, theta: np.ndarray) -> list[np.ndarray]:
        """Return prices near ``theta``: the budget price and each group price a little lower."""
        out = []
        for shrink in _NEARBY:
            trial = theta.copy()
            if self.has_budget:
                trial[0] *= 1 - shrink
            trial[self.dim - self.n_groups :] *= 1 - shrink
            out.append(trial)
        return out

    def _group_sums(self, local: np.ndarray) -> np.ndarray:
        """Return each group constraint's ``sum_i a_i t_i`` for a choice (``<= 0``: met)."""
        rows, cols = self._assigned(local)
        coef = self.group_coef[:, rows].astype(np.float64)
        costs = self.cost[cols, rows].astype(np.float64)
        return np.where(self.group_on_cost, coef @ costs, coef.sum(axis=1))

    def repair_groups(self, local: np.ndarray, theta: np.ndarray) -> np.ndarray:
        """Drop assignments until every group constraint holds.

        The most violated constraint sheds the customers that push it over (positive ``a_i t_i``)
        with the worst reduced profit per unit shed, just enough of them; dropping can only
        free budget and capacity, and dropping everyone meets every group constraint, so this
        ends (each round drops at least one customer).
        """
        if not self.n_groups:
            return local
        local = local.copy()
        for _ in range(len(local) + 1):
            rows, cols = self._assigned(local)
            coef = self.group_coef[:, rows].astype(np.float64)
            costs = self.cost[cols, rows].astype(np.float64)
            contrib = coef * np.where(self.group_on_cost[:, None], costs[None, :], 1.0)
            sums = contrib.sum(axis=1)
            if np.all(sums <= 0):
                break
            k = int(np.argmax(sums))
            cand = np.flatnonzero(contrib[k] > 0)
            ratio = self._reduced_at(rows[cand], cols[cand], theta) / contrib[k, cand]
            order = cand[np.argsort(ratio, kind="stable")]
            shed = np.cumsum(contrib[k, order])
            n_drop = min(int(np.searchsorted(shed, sums[k], side="left")) + 1, len(order))
            local[rows[order[:n_drop]]] = -1
        return local

    def refill(self, local: np.ndarray, theta: np.ndarray, consider: np.ndarray) -> np.ndarray:
        """Spend what the caps leave on the best moves, greedily by reduced gain.

        A move gives an unassigned customer an option, or switches an assigned one to an
        option worth more; moves that fit are taken best reduced gain first (at the final
        prices), one per customer. Switching matters when every coupon is used up but budget
        is left: only a dearer, better option for someone already served can use it. The pool
        of moves is built once; each round keeps those that still fit and that belong to
        customers who have not moved, since a moved customer's other moves are out of date.
        Only customers in ``consider`` are looked at: the others lead their runner-up by a wide
        margin at these prices, so any move of theirs would rank below all the rest.
        """
        local = local.copy()
        pool = self._moves(local, theta, consider)
        if pool is None:
            return local
        cust, col, dcost, new_coupon, old_coupon, new_channel, old_channel = pool
        rows, cols = self._assigned(local)
        left_budget = self.budget - float(self.cost[cols, rows].astype(np.float64).sum())
        left_coupon = _left(self.coupon_cap, self.option_coupon[cols])
        left_channel = _left(self.channel_cap, self.option_channel[cols])
        moved = np.zeros(len(local), dtype=bool)
        group_delta = left_group = None
        if self.n_groups:
            # A move's change of each group sum: a_i for a customer newly treated, a_i times the
            # change of cost for spend; what is left is minus the sum (>= 0 after the repair).
            coef = self.group_coef[:, cust].T.astype(np.float64)
            newly = (local[cust] < 0).astype(np.float64)
            group_delta = coef * np.where(self.group_on_cost[None, :], dcost[:, None], newly[:, None])
            left_group = -self._group_sums(local)
        for _ in range(_REFILL_ROUNDS):
            fits = ~moved[cust] & (dcost <= left_budget)
            fits &= (_lookup(left_coupon, new_coupon) >= 1) | (new_coupon == old_coupon)
            fits &= (_lookup(left_channel, new_channel) >= 1) | (new_channel == old_channel)
            if group_delta is not None:
                fits &= (group_delta <= left_group[None, :]).all(axis=1)
            idx = np.flatnonzero(fits)
            accepted = idx[
                _greedy_fill(
                    cust[idx],
                    dcost[idx],
                    (new_coupon[idx], new_channel[idx]),
                    (old_coupon[idx], old_channel[idx]),
                    left_budget,
                    left_coupon,
                    left_channel,
                    linear=None if group_delta is None else (group_delta[idx], left_group),
                )
            ]
            if accepted.size == 0:
                break
            local[cust[accepted]] = col[accepted]
            moved[cust[accepted]] = True
            left_budget -= float(dcost[accepted].sum())
            if group_delta is not None:
                left_group = -self._group_sums(local)
            for new, old, left in (
                (new_coupon, old_coupon, left_coupon),
                (new_channel, old_channel, left_channel),
            ):
                left -= np.bincount(new[accepted][new[accepted] >= 0], minlength=len(left))
                left += np.bincount(old[accepted][old[accepted] >= 0], minlength=len(left))
        return local

    def _moves(
        self, local: np.ndarray, theta: np.ndarray, consider: np.ndarray
    ) -> tuple[np.ndarray, ...] | None:
        """List the improving moves of the customers in ``consider`` with the best reduced gain.

        Returns:
            ``(customer, new option, cost change, new coupon, old coupon, new channel, old
            channel)`` arrays (coupon/channel ``-1``: none), or None when no move improves.
        """
        lam, offset, alpha, beta = self._split(theta)
        limit = int(min(max(len(self.rows) // 4, 2048), _REFILL_LIMIT))
        found: list[tuple[np.ndarray, ...]] = []
        customers = np.flatnonzero(consider)
        for a, b in _chunks(len(customers), self.chunk):
            who = customers[a:b]
            cur = local[who].astype(np.int64)
            has = cur >= 0
            idx = np.arange(b - a)
            pick = np.where(has, cur, 0)
            v = self.value[:, who]
            c = self.cost[:, who]
            if beta is not None:
                r = c * (np.float32(-lam) - beta[who])
                r += v
                r -= alpha[who]
            else:
                r = c * np.float32(-lam)
                r += v
            r -= offset[:, None]
            cur_v = np.where(has, v[pick, idx], 0.0).astype(np.float32)
            j, i = np.nonzero(v > cur_v)  # strictly better value; excludes unusable and current
            if j.size == 0:
                continue
            cur_r = np.where(has, r[pick, idx], 0.0).astype(np.float32)
            key = r[j, i] - cur_r[i]
            if key.size > limit:
                keep = np.argpartition(-key, limit)[:limit]
                j, i, key = j[keep], i[keep], key[keep]
            cur_c = np.where(has[i], c[pick[i], i], 0.0).astype(np.float64)
            found.append((who[i], j, key, c[j, i].astype(np.float64) - cur_c, cur[i]))
        if not found:
            return None
        cust, col, key, dcost, old = (np.concatenate(x) for x in zip(*found, strict=True))
        if key.size > limit:
            keep = np.argpartition(-key, limit)[:limit]
            cust, col, key, dcost, old = cust[keep], col[keep], key[keep], dcost[keep], old[keep]
        order = np.argsort(-key, kind="stable")
        cust, col, dcost, old = cust[order], col[order], dcost[order], old[order]
        old_coupon = np.where(old >= 0, self.option_coupon[np.maximum(old, 0)], -1)
        old_channel = np.where(old >= 0, self.option_channel[np.maximum(old, 0)], -1)
        return cust, col, dcost, self.option_coupon[col], old_coupon, self.option_channel[col], old_channel

    def expand(self, local: np.ndarray) -> np.ndarray:
        """Map a choice over kept rows and columns back to the original indices."""
        choice = np.full(self.problem.n_customers, -1, dtype=np.int32)
        chosen = local >= 0
        choice[self.rows[chosen]] = self.cols[local[chosen]]
        return choice

    def score(self, local: np.ndarray) -> tuple[float, float]:
        """Return ``(objective, spend)`` of a choice over kept rows and columns."""
        rows, cols = self._assigned(local)
        value = float(self.value[cols, rows].astype(np.float64).sum())
        return value, float(self.cost[cols, rows].astype(np.float64).sum())


class _ResidualLP:
    """The LP over some customers' listed alternatives, with the caps the other customers leave.

    ``max value·x`` subject to each dual coordinate's usage within what the choice ``local``
    (every other customer) leaves of its cap, at most one alternative per customer and ``0 <= x
    <= upper``; solved with HiGHS (scipy's ``linprog``). After a solve ``prices`` holds the
    duals of the cap rows (``>= 0``).
    """

    def __init__(self, dual: _Dual, local: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> None:
        from scipy.sparse import csr_matrix, vstack

        rest = np.flatnonzero(local >= 0)
        left = dual.capacity - dual._usage(rest, local[rest].astype(np.int64))
        self.n_caps = len(left)
        self.value = dual.value[cols, rows].astype(np.float64)
        members, self.position = np.unique(rows, return_inverse=True)
        self.n_members = len(members)
        self.usage = dual._usage_rows(rows, cols)
        k = len(rows)
        one = csr_matrix((np.ones(k), (self.position, np.arange(k))), shape=(self.n_members, k))
        self.a_ub = vstack((csr_matrix(self.usage), one), format="csr")
        self.b_ub = np.concatenate((left, np.ones(self.n_members)))
        self.upper = np.ones(k)
        self.prices = np.zeros(self.n_caps)

    def per_member(self, flags: np.ndarray) -> np.ndarray:
        """Return how many of each customer's variables are flagged."""
        return np.bincount(self.position, weights=flags, minlength=self.n_members)

    def solve(self) -> np.ndarray | None:
        """Return the LP solution, or None when HiGHS reports anything but an optimum."""
        from scipy.optimize import linprog

        if len(self.value) == 0:
            return np.zeros(0) if np.all(self.b_ub >= 0) else None
        bounds = np.column_stack((np.zeros(len(self.upper)), self.upper))
        res = linprog(-self.value, A_ub=self.a_ub, b_ub=self.b_ub, bounds=bounds, method="highs")
        if res.status != 0:
            return None
        self.prices = -np.asarray(res.ineqlin.marginals[: self.n_caps])
        return res.x

    def solve_whole(self) -> np.ndarray | None:
        """Return which variables an integer optimum sets, or None when none was found.

        Only for a few dozen variables: up to ``_ENUMERATE`` combinations of the customers'
        choices are simply all tried; beyond that HiGHS's branch and bound solves it (at the
        root node in every case seen), with a node limit so that the answer does not depend on
        the machine's speed, and a time limit only as a guard.
        """
        from scipy.optimize import Bounds, LinearConstraint, milp

        allowed = self.upper > 0
        sizes = self.per_member(allowed) + 1
        if float(np.prod(sizes)) <= _ENUMERATE:
            # Combination c gives member t its (c // stride_t) % size_t-th allowed variable (0: none).
            stride = np.cumprod(np.concatenate(([1.0], sizes[:-1]))).astype(np.int64)
            combos = np.arange(int(np.prod(sizes)), dtype=np.int64)
            var = np.flatnonzero(allowed)
            rank = np.zeros(len(self.value), dtype=np.int64)
            for t in range(self.n_members):
                mine = var[self.position[var] == t]
                rank[mine] = np.arange(1, len(mine) + 1)
            owner = self.position[var]
            pick = (combos[:, None] // stride[owner][None, :]) % sizes[owner][None, :]
            x = (pick == rank[var][None, :]).astype(np.float64)  # [combos, allowed vars]
            left = self.b_ub[: self.n_caps]
            fits = np.all(x @ self.usage[:, var].T <= left + 1e-9 * np.maximum(np.abs(left), 1.0), axis=1)
            if not fits.any():
                return None
            total = np.where(fits, x @ self.value[var], -np.inf)
            out = np.zeros(len(self.value), dtype=bool)
            out[var] = x[int(np.argmax(total))] > 0
            return out
        res = milp(
            -self.value,
            integrality=np.ones(len(self.value)),
            bounds=Bounds(0.0, self.upper),
            constraints=LinearConstraint(self.a_ub, -np.inf, self.b_ub),
            options={"node_limit": _WHOLE_NODES, "time_limit": _WHOLE_SECONDS},
        )
        return None if res.x is None else res.x > 0.5


class _GroupMoments:
    """Accumulate, chunk by chunk, the group coordinates' part of the smoothed dual's moments.

    A group coordinate's usage by customer ``i`` taking option ``j`` is ``a_i`` (treated) or
    ``a_i · cost_ij`` (spend), so its moments with every other coordinate are per-customer sums
    of the choice probabilities (times cost, or cost squared) weighted by the coefficients.
    """

    def __init__(self, n_groups: int, n_counts: int) -> None:
        self.use = np.zeros(n_groups)
        self.gg = np.zeros((n_groups, n_groups))
        self.gb = np.zeros(n_groups)
        self.gc = np.zeros((n_groups, n_counts))

    def add(
        self, p: np.ndarray, cost: np.ndarray, coef: np.ndarray, on_cost: np.ndarray, count_groups: list
    ) -> np.ndarray:
        """Add one chunk (``p``: choice probabilities ``[m, b]``); return its usage per customer."""
        a = coef.astype(np.float64)
        pc = p * cost
        p1 = p.sum(axis=0, dtype=np.float64)
        p_c = pc.sum(axis=0, dtype=np.float64)
        p_cc = (pc * cost).sum(axis=0, dtype=np.float64)
        spend = on_cost[:, None]
        w = a * np.where(spend, p_c[None, :], p1[None, :])
        self.use += w.sum(axis=1)
        both_count = ~spend & ~spend.T
        both_spend = spend & spend.T
        mixed = np.where(both_spend, (a * p_cc) @ a.T, (a * p_c) @ a.T)
        self.gg += np.where(both_count, (a * p1) @ a.T, mixed)
        self.gb += (a * np.where(spend, p_cc[None, :], p_c[None, :])).sum(axis=1)
        if count_groups:
            per = np.stack([p[cols].sum(axis=0) for cols in count_groups]).astype(np.float64)
            cross = a @ per.T
            if on_cost.any():
                per_cost = np.stack([pc[cols].sum(axis=0) for cols in count_groups]).astype(np.float64)
                cross = np.where(spend, a @ per_cost.T, cross)
            self.gc += cross
        return w

    def extend(
        self, usage: np.ndarray, second: np.ndarray, has_budget: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """Append the group coordinates to the other coordinates' usage and second moment."""
        d0, k = len(usage), len(self.use)
        out = np.zeros((d0 + k, d0 + k))
        out[:d0, :d0] = second
        g = slice(d0, d0 + k)
        out[g, g] = self.gg
        first = 1 if has_budget else 0
        if has_budget:
            out[0, g] = out[g, 0] = self.gb
        out[first:d0, g] = self.gc.T
        out[g, first:d0] = self.gc
        return np.concatenate((usage, self.use)), out


def _greedy_fill(
    cust: np.ndarray,
    dcost: np.ndarray,
    new_groups: tuple[np.ndarray, np.ndarray],
    old_groups: tuple[np.ndarray, np.ndarray],
    left_budget: float,
    left_coupon: np.ndarray,
    left_channel: np.ndarray,
    max_rounds: int = 200,
    linear: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Accept moves in order while they fit, exactly as a sequential greedy scan would.

    Moves are sorted best first and a customer makes at most one. A move adds ``dcost`` to the
    spend and takes a slot of its new coupon and channel while freeing its old ones (``-1``:
    none). Each round accepts the longest run of each customer's first remaining move that fits
    every cap, then drops the move that did not fit and every move that no longer fits on its
    own; so the scan is vectorised yet identical to the one-by-one greedy. ``linear`` adds
    constraints ``sum of delta <= left`` with a real-valued change per move (``delta [moves, K]``,
    ``left [K]``), which may be negative: the group constraints.

    Returns:
        Positions (into the move arrays) of the accepted moves.
    """
    lefts = [left_coupon.copy(), left_channel.copy()]
    lin_delta = left_linear = None
    if linear is not None:
        lin_delta, left_linear = linear[0], linear[1].astype(np.float64).copy()
    alive = np.ones(len(cust), dtype=bool)
    done = np.zeros(int(cust.max()) + 1 if len(cust) else 0, dtype=bool)
    accepted: list[np.ndarray] = []
    for _ in range(max_rounds):
        idx = np.flatnonzero(alive)
        if idx.size == 0:
            break
        _, first = np.unique(cust[idx], return_index=True)
        cand = idx[np.sort(first)]
        over = np.cumsum(dcost[cand]) > left_budget
        stop = int(np.argmax(over)) if over.any() else len(cand)
        for new, old, left in zip(new_groups, old_groups, lefts, strict=True):
            n_new, n_old = new[cand[:stop]], old[cand[:stop]]
            for k in np.unique(n_new[(n_new >= 0) & (n_new != n_old)]):
                if not np.isfinite(left[k]):
                    continue
                delta = (n_new == k).astype(np.int64) - (n_old == k)
                bad = np.cumsum(delta) > left[k]
                if bad.any():
                    stop = min(stop, int(np.argmax(bad)))
        if lin_delta is not None and stop:
            bad = (np.cumsum(lin_delta[cand[:stop]], axis=0) > left_linear[None, :]).any(axis=1)
            if bad.any():
                stop = min(stop, int(np.argmax(bad)))
        take = cand[:stop]
        accepted.append(take)
        left_budget -= float(dcost[take].sum())
        for new, old, left in zip(new_groups, old_groups, lefts, strict=True):
            left -= np.bincount(new[take][new[take] >= 0], minlength=len(left))
            left += np.bincount(old[take][old[take] >= 0], minlength=len(left))
        if lin_delta is not None:
            left_linear -= lin_delta[take].sum(axis=0)
        done[cust[take]] = True
        if stop == len(cand):
            break
        alive[cand[stop]] = False
        alive &= ~done[cust]
        alive &= dcost <= left_budget
        for new, old, left in zip(new_groups, old_groups, lefts, strict=True):
            alive &= (_lookup(left, new) >= 1) | (new == old)
        if lin_delta is not None:
            alive &= (lin_delta <= left_linear[None, :]).all(axis=1)
    return np.concatenate(accepted) if accepted else np.zeros(0, dtype=np.int64)


def _met(theta: np.ndarray, left: np.ndarray, slack: np.ndarray) -> bool:
    """Return whether no cap is exceeded and each priced cap is used to within ``slack``."""
    priced = theta > 0
    return bool(np.all(left >= 0) and np.all(left[priced] <= slack[priced]))


def _converged(theta: np.ndarray, grad: np.ndarray, slack: np.ndarray) -> bool:
    """Return whether every cap is met: binding ones to within ``slack``, free ones not exceeded."""
    priced = theta > 0
    return bool(np.all(np.abs(grad[priced]) <= slack[priced]) and np.all(grad[~priced] >= -slack[~priced]))


def _damped_newton_step(
    theta: np.ndarray, grad: np.ndarray, hess: np.ndarray, damping: float, upper: np.ndarray
) -> np.ndarray:
    """Return a Levenberg-Marquardt step for ``min g(θ)`` over the box ``0 <= θ <= upper``.

    Coordinates at a bound with the gradient pushing outward stay put; the rest take a Newton
    step on ``H + damping·diag(H)``. A coordinate the step would carry across a bound is moved to
    the bound and fixed there, and the others are solved again given that move. This matters:
    when every option uses one coupon and one channel, raising all coupon prices and lowering all
    channel prices by the same amount changes no choice, so the dual is linear along that
    direction and only the bounds stop an unconstrained Newton step.
    """
    d = len(theta)
    fixed = ((theta <= 0) & (grad > 0)) | ((theta >= upper) & (grad < 0))
    step = np.zeros(d)
    diag = np.diag(hess)
    floor = 1e-6 * max(float(diag.max(initial=0.0)), _EPS)
    h = hess + np.diag(damping * np.maximum(diag, floor) + floor)
    for _ in range(d + 1):
        free = ~fixed
        if not free.any():
            break
        rhs = -grad[free] - h[np.ix_(free, fixed)] @ step[fixed]
        try:
            step[free] = np.linalg.solve(h[np.ix_(free, free)], rhs)
        except np.linalg.LinAlgError:
            step[free] = rhs / np.diag(h)[free]
        new = theta + step
        low = free & (new < 0)
        high = free & (new > upper)
        if not (low.any() or high.any()):
            break
        step[low] = -theta[low]
        step[high] = (upper - theta)[high]
        fixed |= low | high
    return step


def _null_directions(indicator: np.ndarray) -> list[np.ndarray]:
    """Return a basis of count-price changes that leave every option's total price unchanged."""
    if indicator.shape[0] == 0 or indicator.shape[1] == 0:
        return []
    _, singular, vt = np.linalg.svd(indicator.T.astype(np.float64))
    rank = int(np.sum(singular > 1e-9 * max(float(singular.max(initial=0.0)), 1.0)))
    return [row for row in vt[rank:]]


def _as_slice(index: np.ndarray) -> slice | np.ndarray:
    """Return ``index`` as a slice when it is evenly spaced, so that indexing makes a view."""
    if len(index) == 0:
        return index
    step = int(index[1] - index[0]) if len(index) > 1 else 1
    if step > 0 and np.array_equal(index, np.arange(index[0], index[-1] + 1, step)):
        return slice(int(index[0]), int(index[-1]) + 1, step)
    return index


def _gram(w: np.ndarray, block: int = 1024) -> np.ndarray:
    """Return ``w @ w.T`` for a short, wide ``w``, in column blocks.

    One BLAS call on the whole width would start BLAS threads, which on a shared machine spin
    and cost more than the product; blocks this small stay on one thread.
    """
    out = np.zeros((w.shape[0], w.shape[0]))
    for a in range(0, w.shape[1], block):
        x = w[:, a : a + block]
        out += x @ x.T
    return out


def _floor_caps(caps: np.ndarray) -> np.ndarray:
    """Return capacities as whole customers (a cap of 2.7 admits 2), ``inf`` kept."""
    return np.floor(np.asarray(caps, dtype=np.float64) + 1e-9)


def _left(caps: np.ndarray, used: np.ndarray) -> np.ndarray:
    """Return the capacity left per group once ``used`` (group per assignment, -1: none) is taken."""
    return caps - np.bincount(used[used >= 0], minlength=len(caps))


def _lookup(caps: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Return ``caps[index]`` with ``inf`` where ``index == -1`` (the option uses no such cap)."""
    return np.append(np.asarray(caps, dtype=np.float64), np.inf)[index]


def _chunks(n: int, size: int):
    for a in range(0, n, size):
        yield a, min(a + size, n)


def _describe(x: object) -> str:
    if isinstance(x, np.ndarray):
        return f"array of shape {x.shape} and dtype {x.dtype}"
    return type(x).__name__


def _check_chunks(arr: np.ndarray, name: str, *, nonnegative: bool, rows: int = 262_144) -> None:
    for a in range(0, arr.shape[0], rows):
        block = arr[a : a + rows]
        finite = np.isfinite(block)
        if not finite.all():
            i, j = np.argwhere(~finite)[0]
            raise ValueError(f"{name} must be finite (no NaN/inf), found {block[i, j]} at [{a + i}, {j}]")
        if nonnegative and (block < 0).any():
            i, j = np.argwhere(block < 0)[0]
            raise ValueError(f"{name} must be >= 0, found {block[i, j]} at [{a + i}, {j}]")


def _check_capacity(cap: np.ndarray, name: str) -> int:
    if not isinstance(cap, np.ndarray) or cap.ndim != 1:
        raise ValueError(f"{name} must be a 1-D numpy array, got {_describe(cap)}")
    if not (np.issubdtype(cap.dtype, np.floating) or np.issubdtype(cap.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {cap.dtype}")
    cap = cap.astype(np.float64)
    if np.isnan(cap).any():
        raise ValueError(f"{name} must not contain NaN (use np.inf for no cap)")
    if (cap < 0).any():
        raise ValueError(f"{name} must be >= 0, found {cap[cap < 0][0]}")
    return len(cap)


def _check_index(index: np.ndarray, name: str, m: int, size: int, cap_name: str) -> None:
    if not isinstance(index, np.ndarray) or index.shape != (m,):
        raise ValueError(f"{name} must be an int array of shape ({m},), got {_describe(index)}")
    if not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {index.dtype}")
    bad = (index < -1) | (index >= size)
    if bad.any():
        raise ValueError(
            f"{name} must hold -1 or an index into {cap_name} (length {size}), found {index[bad][0]}"
        )
