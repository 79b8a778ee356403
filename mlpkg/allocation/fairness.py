"""Turn the shop's group bounds (``FAIRNESS__CONSTRAINTS``) into the solver's group constraints."""

from __future__ import annotations

import numpy as np
import pandas as pd

from mlpkg.allocation.solver import GroupConstraint
from mlpkg.config import FairnessSettings


def constraint_label(attribute: str, group: str, bound: str, measure: str, share: float) -> str:
    """Name one bound as the settings spell it, e.g. ``region=north min_treated_share 0.2``."""
    what = "treated" if measure == "treated" else "budget"
    return f"{attribute}={group} {bound}_{what}_share {share:g}"


def group_constraints(
    cfg: FairnessSettings, ids: np.ndarray, attributes: pd.DataFrame
) -> tuple[GroupConstraint, ...]:
    """Build one :class:`GroupConstraint` per bound in the settings, over the customers ``ids``.

    Args:
        cfg: the fairness settings (validated: attributes are declared, bounds consistent).
        ids: customer ids, in the problem's row order.
        attributes: ``customer_id`` and the attribute columns (:func:`mlpkg.db.queries.customer_attributes`).

    Raises:
        ValueError: a constraint names a group no customer of the shop belongs to (naming the
            attribute, the group and the groups there are), or a customer has no attributes.
    """
    if not cfg.constraints:
        return ()
    table = attributes.set_index("customer_id")
    missing = pd.Index(ids.astype(str)).difference(table.index)
    if len(missing):
        raise ValueError(f"fairness constraints: customer {missing[0]!r} has no row in customers")
    out = []
    for c in cfg.constraints:
        known = sorted(table[c.attribute].unique())
        if c.group not in known:
            raise ValueError(
                f"fairness constraint {c.attribute}={c.group}: unknown group {c.group!r}; "
                f"customers' {c.attribute} values are {known}"
            )
        member = (table.loc[ids.astype(str), c.attribute] == c.group).to_numpy()
        for bound, measure, share in c.bounds():
            label = constraint_label(c.attribute, c.group, bound, measure, share)
            out.append(GroupConstraint(member=member, share=share, bound=bound, measure=measure, label=label))
    return tuple(out)


def subset(constraints: tuple[GroupConstraint, ...], rows: np.ndarray) -> tuple[GroupConstraint, ...]:
    """Restrict the constraints to some customers (rows of the population)."""
    return tuple(
        GroupConstraint(member=g.member[rows], share=g.share, bound=g.bound, measure=g.measure, label=g.label)
        for g in constraints
    )


def group_prices(
    constraints: tuple[GroupConstraint, ...], prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Return what the group prices add per customer: ``(per assignment, per unit of cost)``."""
    n = len(constraints[0].member) if constraints else 0
    alpha, beta = np.zeros(n), np.zeros(n)
    for g, rho in zip(constraints, np.asarray(prices, dtype=np.float64), strict=True):
        if g.measure == "spend":
            beta += rho * g.coefficients()
        else:
            alpha += rho * g.coefficients()
    return alpha, beta
