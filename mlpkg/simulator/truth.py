"""The ground truth: how a contact changes a customer's conversion, basket and coupon use.

One generative story serves both the exact expectations (this module) and the random draws
(:mod:`mlpkg.simulator.behaviour`), so an average of draws converges to the expectation:

* a contacted customer's *baseline* order probability drops by their annoyance with the channel
  (large for sleeping dogs, a small nuisance for others on sms/push);
* they open the message with their channel responsiveness and click with their click-through;
* a click adds an extra order with probability ``q`` that grows with the coupon's generosity
  relative to their basket and with their price sensitivity (large only for persuadables);
* orders placed after a click are slightly larger (``basket_lift``) and redeem the coupon when
  the basket reaches ``min_basket``;
* a message that shows products the customer likes (``relevance`` in ``[0, 1]``, see
  :func:`mlpkg.simulator.catalogue.relevance`) is clicked more often: the click-through is
  multiplied by ``1 + RELEVANCE_LIFT * relevance``. A message without products (relevance 0)
  gets the click-through it always had.

Messages through a channel the customer has not opted in to are not delivered, so for those
arms the truth equals control (and nothing is spent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mlpkg.simulator.catalogue import RELEVANCE_LIFT
from mlpkg.simulator.population import Population
from mlpkg.simulator.spec import CHANNELS, Arm, ShopConfig

ORDER_SIGMA = 0.45  # log-sd of one order's value around the customer's basket
GENEROSITY_SCALE = 12.0  # how fast persuasion saturates with coupon value / basket * price sensitivity
_KINDS = ("percent_off", "fixed_amount", "free_shipping")
_erf = np.frompyfunc(math.erf, 1, 1)


def norm_cdf(x: np.ndarray) -> np.ndarray:
    """Return the standard normal CDF of ``x`` (elementwise)."""
    x = np.asarray(x, dtype=float)
    return 0.5 * (1.0 + _erf(x / math.sqrt(2.0)).astype(float))


@dataclass(frozen=True)
class ArmTable:
    """Per-arm lookup arrays; index 0 is control, index ``k`` is ``arms[k - 1]``."""

    arms: tuple[Arm, ...]
    channel: np.ndarray  # index into CHANNELS, -1 for control
    kind: np.ndarray  # index into _KINDS, -1 for control
    face: np.ndarray
    min_basket: np.ndarray
    lift: np.ndarray
    send_cost: np.ndarray

    @classmethod
    def from_config(cls, cfg: ShopConfig) -> ArmTable:
        """Build the table of every coupon x channel arm of ``cfg``."""
        arms = tuple(Arm.of(c.coupon_id, ch.channel) for c in cfg.coupons for ch in cfg.channels)
        coupons = {c.coupon_id: c for c in cfg.coupons}
        costs = {ch.channel: ch.send_cost for ch in cfg.channels}
        return cls(
            arms=arms,
            channel=np.array([-1] + [CHANNELS.index(a.channel) for a in arms]),
            kind=np.array([-1] + [_KINDS.index(coupons[a.coupon_id].kind) for a in arms]),
            face=np.array([0.0] + [coupons[a.coupon_id].face_value for a in arms]),
            min_basket=np.array([0.0] + [coupons[a.coupon_id].min_basket for a in arms]),
            lift=np.array([1.0] + [coupons[a.coupon_id].basket_lift for a in arms]),
            send_cost=np.array([0.0] + [costs[a.channel] for a in arms]),
        )

    @property
    def names(self) -> list[str]:
        """Arm names with ``control`` first."""
        return ["control", *(a.name for a in self.arms)]


def _lognormal_tail(mean: np.ndarray, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return P(X >= m) and E[X | X >= m] for X lognormal with the given mean and ORDER_SIGMA."""
    s = ORDER_SIGMA
    safe_m = np.where(threshold > 0, threshold, 1.0)
    mu = np.log(mean) - s**2 / 2
    p = np.where(threshold > 0, norm_cdf((mu - np.log(safe_m)) / s), 1.0)
    partial = np.where(threshold > 0, mean * norm_cdf((mu + s**2 - np.log(safe_m)) / s), mean)
    cond = np.where(p > 1e-12, partial / np.maximum(p, 1e-12), np.maximum(mean, threshold))
    return p, cond


def pair_truth(
    pop: Population, idx: np.ndarray, arm: np.ndarray, table: ArmTable, relevance: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Return the exact response parameters of customers ``idx`` under arms ``arm`` (pairwise).

    Args:
        pop: The customers.
        idx: Row indices into ``pop``.
        arm: Arm indices (0 = control), same length as ``idx``.
        table: The arm table.
        relevance: Relevance of the products each message shows (``None``: no products).

    Returns:
        Arrays keyed ``delivered``, ``base``, ``open``, ``click_through``, ``q``, ``lift``,
        ``p_min``, ``conversion``, ``revenue`` (given conversion), ``redeem`` (P(redeem | conversion)),
        ``coupon_cost`` (given redemption), ``redeemed_basket`` (the order value of a redemption)
        and ``send_cost``.
    """
    idx = np.asarray(idx, dtype=np.int64)
    arm = np.asarray(arm, dtype=np.int64)
    treated = arm > 0
    ch = np.where(treated, table.channel[arm], 0)
    delivered = treated & pop.consent[idx, ch]
    p0 = pop.base_conversion[idx]
    base = np.where(delivered, p0 * (1.0 - pop.annoyance[idx, ch]), p0)
    open_p = np.where(delivered, pop.responsiveness[idx, ch], 0.0)
    ctr = pop.click_through[idx]
    if relevance is not None:
        ctr = np.minimum(ctr * (1.0 + RELEVANCE_LIFT * np.clip(relevance, 0.0, 1.0)), 0.95)
    click = open_p * ctr
    basket = pop.basket[idx]
    lift = np.where(delivered, table.lift[arm], 1.0)
    kind = table.kind[arm]
    face = table.face[arm]
    generosity = np.where(kind == 0, face / 100.0, face / basket)
    p_min, clicked_cond_mean = _lognormal_tail(basket * lift, np.where(delivered, table.min_basket[arm], 0.0))
    q = np.where(
        delivered,
        pop.persuasion[idx]
        * (1.0 - np.exp(-GENEROSITY_SCALE * generosity * pop.price_sensitivity[idx]))
        * p_min,
        0.0,
    )
    conversion = base + (1.0 - base) * click * q
    p_click_given_conv = np.where(delivered, click * (base + (1.0 - base) * q) / conversion, 0.0)
    revenue = basket * (1.0 + (lift - 1.0) * p_click_given_conv)
    coupon_cost = np.select(
        [~delivered, kind == 0],
        [0.0, face / 100.0 * clicked_cond_mean],
        default=face,
    )
    return {
        "delivered": delivered,
        "base": base,
        "open": open_p,
        "click_through": np.where(delivered, ctr, 0.0),
        "q": q,
        "lift": lift,
        "p_min": np.where(delivered, p_min, 0.0),
        "conversion": conversion,
        "revenue": revenue,
        "redeem": p_click_given_conv * np.where(delivered, p_min, 0.0),
        "coupon_cost": coupon_cost,
        "redeemed_basket": np.where(delivered, clicked_cond_mean, basket),
        "send_cost": np.where(delivered, table.send_cost[arm], 0.0),
    }


def matrix_truth(pop: Population, idx: np.ndarray, table: ArmTable, key: str) -> np.ndarray:
    """Return ``pair_truth(...)[key]`` for every customer in ``idx`` and every arm: ``[n, n_arms + 1]``."""
    idx = np.asarray(idx, dtype=np.int64)
    n_arms = len(table.arms) + 1
    out = np.empty((len(idx), n_arms))
    # Arm by arm keeps peak memory at a few [n] arrays even for 200k customers x 13 arms.
    for a in range(n_arms):
        out[:, a] = pair_truth(pop, idx, np.full(len(idx), a), table)[key]
    return out
