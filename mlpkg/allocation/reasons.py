"""Why every ledger row got its arm or none: the deciding constraint, the runner-up and the features.

Each reason is read off the allocation's own state, never guessed after the fact:

* the **filters before solving**: a customer on cooldown, without consent on any channel on
  offer, or otherwise with no eligible option (no contact on a consented channel, an expected
  basket under every coupon's minimum) is ``cooldown``, ``consent`` or ``not_eligible``;
* the **random draws**: ``control_group`` (the hashed draw under the control share) and
  ``exploration_draw`` (a uniformly random eligible arm); an exploration draw that found its
  coupon sold out, its channel full or the budget spent says ``inventory``, ``capacity`` or
  ``budget``;
* the **solver's prices** for the model group: each option's priced objective is
  ``value - λ·cost - μ_coupon - ν_channel`` (minus the fairness groups' prices); a customer left
  out whose best option was worth giving before pricing names the price that took it below zero
  (``budget`` for ``λ``, ``inventory`` for ``μ``, ``capacity`` for ``ν``, ``fairness``), or, when
  the repair dropped a positive choice, the cap that was full; a customer no option is worth
  anything to is ``no_gain``; a treated customer is ``model_choice`` and lists any price that
  steered them from the unpriced best arm to a cheaper one.

The runner-up is the best alternative to the row's arm at those prices (``control`` = no coupon)
and the margin the row's priced objective minus the runner-up's. The feature attributions (see
:mod:`mlpkg.models.attribution`) explain the uplift of the row's arm, or for a customer given
none, of the arm the model ranks best: the one they would have got.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from mlpkg.allocation.fairness import group_prices

CONTROL = "control"
#: Signed feature contributions kept per row, largest magnitude first.
TOP_FEATURES = 5


@dataclass(frozen=True)
class Eligibility:
    """Per customer, why no option is eligible (``""`` where one is) and the details to say so."""

    cause: np.ndarray
    detail: np.ndarray


def eligibility_causes(
    ids: np.ndarray,
    channels: list[str],
    eligible: np.ndarray,
    *,
    consented: dict[str, set[str]],
    reachable: dict[str, set[str]],
    cooldown: set[str],
    cooldown_days: int,
    has_options: bool,
) -> Eligibility:
    """Name the filter that left each customer without an eligible option (cooldown > consent > the rest)."""
    n = len(ids)
    none = ~eligible.any(axis=1) if eligible.shape[1] else np.ones(n, dtype=bool)
    # Hashed membership (pandas), not np.isin: on string ids that sorts both sides every call.
    customers = pd.Index(ids)
    on_cooldown = customers.isin(cooldown) if cooldown else np.zeros(n, dtype=bool)
    any_consent = np.zeros(n, dtype=bool)
    any_reach = np.zeros(n, dtype=bool)
    for h in channels:
        ok = consented.get(h, set())
        any_consent |= customers.isin(ok)
        any_reach |= customers.isin(ok & reachable.get(h, set()))
    offered = ", ".join(channels) or "none"
    cause = np.full(n, "", dtype=object)
    detail = np.full(n, "", dtype=object)
    rules = (
        (none & on_cooldown, "cooldown",
         f"had a coupon within the {cooldown_days}-day cooldown before the campaign"),
        (none & ~on_cooldown & ~any_consent, "consent", f"no consent on any channel on offer ({offered})"),
        (none & ~on_cooldown & any_consent & ~any_reach, "not_eligible",
         "no contact on a consented channel"),
        (none & ~on_cooldown & any_reach, "not_eligible",
         "expected basket under every offered coupon's minimum" if has_options else "no coupon on offer"),
    )  # fmt: skip
    for mask, code, text in rules:
        todo = mask & (cause == "")
        cause[todo], detail[todo] = code, text
    return Eligibility(cause, detail)


@dataclass(frozen=True)
class PlanState:
    """What the allocation decided and the state it decided it with (see :func:`explain_rows`)."""

    ids: np.ndarray
    arms: list[str]
    option_coupon: np.ndarray
    option_channel: np.ndarray
    coupon_ids: list[str]
    channels: list[str]
    value: np.ndarray
    cost: np.ndarray
    eligible: np.ndarray
    group: np.ndarray
    final: np.ndarray
    #: The solver's prices (``None`` for a cold start: nothing is priced).
    multipliers: dict | None
    group_constraints: tuple
    control_share: float
    explore_share: float
    #: Per explored customer who got nothing: ``inventory``, ``capacity`` or ``budget`` (else ``""``).
    explore_block: np.ndarray
    #: What the model group had left once allocated: budget, per coupon, per channel.
    budget_left: float
    coupon_left: np.ndarray
    channel_left: np.ndarray
    objective: str


def _reduced(state: PlanState) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Return each option's priced objective ``[n, m]`` and the price terms subtracted from its value."""
    mult = state.multipliers or {}
    lam = float(mult.get("budget", 0.0))
    mu = np.asarray(mult.get("coupon", np.zeros(len(state.coupon_ids))), dtype=np.float64)
    nu = np.asarray(mult.get("channel", np.zeros(len(state.channels))), dtype=np.float64)
    terms = {
        "budget": lam * state.cost.astype(np.float64),
        "inventory": np.broadcast_to(mu[state.option_coupon][None, :], state.value.shape),
        "capacity": np.broadcast_to(nu[state.option_channel][None, :], state.value.shape),
    }
    if state.group_constraints:
        prices = mult.get("group", np.zeros(len(state.group_constraints)))
        alpha, beta = group_prices(state.group_constraints, prices)
        terms["fairness"] = alpha[:, None] + beta[:, None] * state.cost.astype(np.float64)
    reduced = state.value.astype(np.float64) - sum(terms.values())
    return reduced, terms


def explain_rows(state: PlanState, eligibility: Eligibility) -> list[dict]:
    """Return one reason (without attributions) per customer, in ``state.ids`` order.

    Each reason holds ``binding`` (the deciding code), ``constraints`` (every fact that shaped the
    decision, deciding one first), ``explained`` (option index whose uplift to attribute, -1 none),
    ``runner_up`` (arm name), ``margin`` (priced objective of the row's arm minus the runner-up's).
    """
    n, m = state.value.shape
    priced = state.multipliers is not None
    reduced, terms = _reduced(state) if m else (np.zeros((n, 0)), {})
    usable = np.where(state.eligible, reduced, -np.inf)
    value_el = np.where(state.eligible, state.value, -np.inf)
    lam = float((state.multipliers or {}).get("budget", 0.0))
    out = []
    for i in range(n):
        j = int(state.final[i])
        facts: list[dict] = []
        runner, margin, explained = None, None, -1
        if priced and m:
            row = usable[i] if state.eligible[i].any() else reduced[i]
            if j >= 0:
                others = row.copy()
                others[j] = -np.inf
                k = int(np.argmax(others))
                alt = max(float(others[k]), 0.0) if np.isfinite(others[k]) else 0.0
                runner = state.arms[k] if np.isfinite(others[k]) and others[k] > 0 else CONTROL
                margin, explained = float(reduced[i, j]) - alt, j
            else:
                k = int(np.argmax(row))
                runner, explained = state.arms[k], k
                margin = -float(reduced[i, k]) if state.eligible[i].any() else None
        elif j >= 0:
            explained = j
        cause = eligibility.cause[i]
        group = state.group[i]
        if cause:
            facts.append({"constraint": cause, "detail": eligibility.detail[i]})
            if group == "control":
                facts.append(_control_fact(state))
        elif group == "control":
            facts.append(_control_fact(state))
        elif group == "explore":
            if j >= 0:
                facts.append({"constraint": "exploration_draw",
                              "detail": f"random arm among {int(state.eligible[i].sum())} eligible "
                                        f"(exploration share {state.explore_share:.2%})"})  # fmt: skip
            else:
                facts.append(_explore_block_fact(state.explore_block[i]))
        elif not priced:
            text = "no champion model yet: only the exploration draw allocates"
            facts.append({"constraint": "cold_start", "detail": text})
        elif j >= 0:
            facts.append({"constraint": "model_choice",
                          "detail": f"best priced {state.objective} among the eligible arms"})  # fmt: skip
            facts.extend(_steering_facts(state, terms, value_el[i], i, j, lam))
            if margin is not None and margin < 0:
                text = (f"{runner} was worth {-margin:.4g} more at the prices; the solver's repair and "
                        f"refill of what the caps left gave {state.arms[j]}")  # fmt: skip
                facts.append({"constraint": "repair", "detail": text})
        else:
            facts.extend(_left_out_facts(state, terms, value_el[i], usable[i], i))
        out.append({
            "binding": facts[0]["constraint"], "constraints": facts, "explained": explained,
            "runner_up": runner, "margin": None if margin is None else round(margin, 6),
        })  # fmt: skip
    return out


def _control_fact(state: PlanState) -> dict:
    return {"constraint": "control_group",
            "detail": f"random control draw (control share {state.control_share:.2%}): nothing is sent, "
                      "so the campaign's increment can be measured"}  # fmt: skip


def _explore_block_fact(block: str) -> dict:
    text = {
        "inventory": "the exploration draw's coupon had no inventory left",
        "capacity": "the exploration draw's channel had no capacity left",
        "budget": "the exploration draws were trimmed to fit the budget",
    }.get(block, "the exploration draw found no eligible arm")
    return {"constraint": block or "not_eligible", "detail": text}


def _steering_facts(state, terms, values, i, j, lam) -> list[dict]:  # noqa: ANN001
    """Name the prices that moved a treated customer away from their unpriced best arm."""
    best = int(np.argmax(values))
    if best == j or not np.isfinite(values[best]):
        return []
    facts = []
    for name, term in terms.items():
        push = float(term[i, best] - term[i, j])
        if push > 1e-12:
            facts.append({"constraint": name, "price_effect": round(push, 6),
                          "detail": f"{_price_name(name, state, best, lam)} made {state.arms[best]} "
                                    f"(worth {values[best]:.4g} unpriced) lose to {state.arms[j]}"})
    return sorted(facts, key=lambda f: -f["price_effect"])


def _left_out_facts(state, terms, values, usable, i) -> list[dict]:  # noqa: ANN001
    """Name what left an eligible model-group customer without a coupon."""
    best = int(np.argmax(values))
    if not np.isfinite(values[best]) or values[best] <= 0:
        arm = state.arms[best] if np.isfinite(values[best]) else "none"
        return [{"constraint": "no_gain",
                 "detail": f"no eligible arm has a positive expected {state.objective} (best {arm}: "
                           f"{values[best]:.4g})"}]  # fmt: skip
    k = int(np.argmax(usable))
    lam = float((state.multipliers or {}).get("budget", 0.0))
    facts = []
    if usable[k] <= 0:
        after = float(values[best]) - sum(float(t[i, best]) for t in terms.values())
        for name, term in terms.items():
            effect = float(term[i, best])
            if effect > 1e-12:
                facts.append({"constraint": name, "price_effect": round(effect, 6),
                              "detail": f"{_price_name(name, state, best, lam)} took {state.arms[best]} from "
                                        f"{values[best]:.4g} to {after:.4g}"})  # fmt: skip
        facts.sort(key=lambda f: -f["price_effect"])
    if not facts:
        # A positive priced choice the repair dropped: the cap that is full now decided it.
        c, h = state.option_coupon[k], state.option_channel[k]
        if state.budget_left < float(state.cost[i, k]):
            facts.append({"constraint": "budget", "detail": f"the budget was spent ({state.budget_left:.4g} "
                          f"left, {state.arms[k]} costs {float(state.cost[i, k]):.4g})"})  # fmt: skip
        if c >= 0 and state.coupon_left[c] < 1:
            facts.append({"constraint": "inventory", "detail": f"coupon {state.coupon_ids[c]} ran out"})
        if h >= 0 and state.channel_left[h] < 1:
            facts.append({"constraint": "capacity", "detail": f"channel {state.channels[h]} is full"})
    if not facts:
        facts.append({"constraint": "repair",
                      "detail": f"{state.arms[k]} was worth {usable[k]:.4g} at the prices, dropped by the "
                                "solver's rounding to whole customers"})  # fmt: skip
    return facts


def _price_name(name: str, state: PlanState, j: int, lam: float) -> str:
    mult = state.multipliers or {}
    if name == "budget":
        return f"the budget's price (λ={lam:.4g} per unit of spend)"
    if name == "inventory":
        c = state.option_coupon[j]
        return f"coupon {state.coupon_ids[c]}'s inventory price ({float(mult['coupon'][c]):.4g})"
    if name == "capacity":
        h = state.option_channel[j]
        return f"channel {state.channels[h]}'s capacity price ({float(mult['channel'][h]):.4g})"
    return "the fairness constraints' prices"


def decisive_rows(reasons: list[dict], state: PlanState) -> np.ndarray:
    """Return ``bool [n]``: treated rows and untreated ones within the treated rows' median margin.

    The median margin of the treated model-group rows is how far apart a typical choice and its
    alternative are; an untreated customer whose best arm falls short by less was a near miss.
    """
    treated = state.final >= 0
    margins = np.array([np.nan if r["margin"] is None else r["margin"] for r in reasons], dtype=np.float64)
    chosen = treated & (state.group == "model") & np.isfinite(margins)
    band = float(np.median(np.abs(margins[chosen]))) if chosen.any() else 0.0
    near = ~treated & np.isfinite(margins) & (np.abs(margins) <= band)
    return treated | near


def attach_attributions(
    reasons: list[dict],
    state: PlanState,
    scorer: object,
    features: pd.DataFrame | None,
    *,
    only: np.ndarray | None = None,
) -> dict:
    """Add each reason's top feature contributions to the uplift of its explained arm, in place.

    ``scorer`` must offer ``attribute_uplift`` (the logged uplift model does; a cold-start prior
    does not, and its reasons then carry no attributions). ``features`` holds every customer's
    model inputs in ``state.ids`` order; it is also the reference population. ``only`` (``bool
    [n]``) limits the rows attributed (see :func:`decisive_rows`); the others keep the
    attributions an earlier call gave them (none if there was none), so a plan two versions
    scored is attributed by calling this once per version.

    Returns:
        ``{"method", "rows", "seconds"}`` of the attribution pass.
    """
    started = time.perf_counter()
    for r in reasons:
        # Rows left out keep what an earlier pass (another version's scorer) attached.
        r.setdefault("attributions", [])
        r.setdefault("method", None)
        r.setdefault("uplift", None)
    if features is None or not hasattr(scorer, "attribute_uplift"):
        return {"method": None, "rows": 0, "seconds": 0.0}
    model_arms = list(scorer.arms)
    explained = np.array([r["explained"] for r in reasons], dtype=np.int64)
    rows = np.flatnonzero((explained >= 0) & (True if only is None else only))
    if not len(rows):
        return {"method": None, "rows": 0, "seconds": round(time.perf_counter() - started, 3)}
    arm_index = np.array([model_arms.index(state.arms[j]) for j in explained[rows]], dtype=np.int64)
    att = scorer.attribute_uplift(features.iloc[rows], arm_index, reference=features)
    raw = {f: features[f].to_numpy() for f in att.features}
    for pos, i in enumerate(rows):
        top = att.top(pos, TOP_FEATURES)
        for t in top:
            t["value"] = _plain(raw[t["feature"]][i])
        reasons[i].update(attributions=top, method=att.method, uplift=round(float(att.uplift[pos]), 6))
    return {"method": att.method, "rows": int(len(rows)), "seconds": round(time.perf_counter() - started, 3)}


def _plain(value: object) -> object:
    """Return a feature value as JSON (a rounded float, text, or None for missing)."""
    if value is None or (isinstance(value, float) and not np.isfinite(value)) or value is pd.NA:
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return round(float(value), 4)
    return str(value)


def reason_records(
    reasons: list[dict], state: PlanState, *, campaign_id: str, now: datetime
) -> list[dict]:
    """Return the ``allocation_reasons`` rows of the reasons."""
    return [
        dict(
            campaign_id=campaign_id,
            customer_id=str(cid),
            binding=r["binding"],
            explained_arm=state.arms[r["explained"]] if r["explained"] >= 0 else None,
            runner_up=r["runner_up"],
            margin=r["margin"],
            uplift=r["uplift"],
            method=r["method"],
            constraints=r["constraints"],
            attributions=r["attributions"],
            created_at=now,
        )
        for cid, r in zip(state.ids, reasons, strict=True)
    ]
