"""The promotion gate: a challenger against the champion on the frozen, customer-disjoint holdout.

**Holdout.** A customer belongs to the evaluation holdout when a keyed hash of their id falls
below ``gate.holdout_share`` (:func:`holdout_mask`). The rule depends on nothing but the id, so it
is the same for every snapshot: no version is ever trained on a holdout customer's rows, the
champion (trained on an older snapshot) has never seen the newest snapshot's holdout either, and
the same customer is never on both sides. Every version records the rule and its holdout's size.

**Policy.** Each version is judged by what the product would do with it: every held-out row gets
the arm with the best predicted uplift within consent (``consent_{channel}`` features), the
coupon's minimum basket and the budget, solved by the product's Lagrangian allocator. Costs come
from the shop's catalogue (coupon cost paid on conversion, send cost always) or an imported log's
per-arm costs, at the version's own predicted conversion, as the product would allocate with it
(the spend each version's allocation would really cost is recorded beside its value).

**Estimate.** Doubly robust (reward model: the versions' mean prediction, fitted on other rows),
SNIPS beside it, as a *paired* difference challenger − champion on the same rows with its
standard error (:func:`mlpkg.evaluation.ope.paired_difference`). The challenger is promoted when
the one-sided lower bound of the gain at ``gate.confidence`` clears ``gate.margin``; a tie is kept.

**Guards scale with the evidence.** The calibration error may exceed ``gate.max_calibration_error``
by what sampling noise explains at this many rows (the ``confidence`` quantile of the error of a
perfectly calibrated model with the same predictions); fewer than ``gate.min_test_rows`` held-out
rows cannot give a standard error. A first version, with no champion to beat, is promoted when it
passes the guards; its gain over random targeting at the same budget is recorded beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from scipy import stats
from sqlalchemy import Engine, select

from mlpkg import registry
from mlpkg.allocation.campaign import read_offer
from mlpkg.allocation.cost_calibration import coupon_cost_calibration
from mlpkg.allocation.solver import AllocationProblem, solve_lagrangian
from mlpkg.config import GateSettings, Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.evaluation.ope import paired_difference
from mlpkg.evaluation.uplift_metrics import consent_eligibility, expected_calibration_error

CONTROL = "control"
#: Key of the holdout hash; changing it would move customers between training and evaluation.
HOLDOUT_SALT = "couponops-gate-holdout-v1"
#: Outcome the gate compares policies on (conversions per customer).
OUTCOME = "converted"
#: Simulated outcome draws behind the calibration guard's noise allowance.
_CALIBRATION_DRAWS = 200
_SHOP_LOG_FORMATS = {"couponops-campaign"}


def holdout_mask(customer_ids: Any, share: float, salt: str = HOLDOUT_SALT) -> np.ndarray:
    """Return which rows belong to the evaluation holdout: ``hash(salt, customer_id) < share``.

    Args:
        customer_ids: One id per row (repeats allowed: all rows of a customer fall together).
        share: Share of customers held out, in [0, 1).
        salt: Key of the hash.

    Returns:
        ``bool [n]``.
    """
    codes, uniques = pd.factorize(pd.Series(customer_ids).astype(str))
    draws = np.empty(len(uniques), dtype=np.float64)
    for i, cid in enumerate(uniques):
        digest = hashlib.blake2b(f"{salt}|{cid}".encode(), digest_size=8).digest()
        draws[i] = int.from_bytes(digest, "big") / 2**64
    return draws[codes] < share if len(codes) else np.zeros(0, dtype=bool)


def holdout_rule(share: float) -> str:
    """Describe the holdout rule in words (a version tag)."""
    return f"customers with blake2b('{HOLDOUT_SALT}|id') < {share:g} (never trained on)"


@dataclass
class GateEconomics:
    """What the gate's allocation needs about the treated arms of the held-out rows.

    Attributes:
        arms: Treated arm names, the columns of the matrices.
        send_cost: ``[K]`` cost of sending each arm (paid whether or not the customer converts).
        coupon_cost: ``[n, K]`` coupon cost paid when the customer converts.
        eligible: ``[n, K]`` consent, minimum basket and a known cost.
        budget: Spend cap over the held-out rows.
        basis: How costs and budget were set, in words.
    """

    arms: list[str]
    send_cost: np.ndarray
    coupon_cost: np.ndarray
    eligible: np.ndarray
    budget: float
    basis: str
    #: Price coupons at each version's P(redeemed) (``campaign.coupon_pricing = redemption``).
    price_redemptions: bool = False

    def cost(self, p_treated: np.ndarray) -> np.ndarray:
        """Return the expected cost ``[n, K]`` at conversion probabilities ``p_treated``."""
        return (self.send_cost[None, :] + p_treated * self.coupon_cost).astype(np.float32)


def gate_economics(engine: Engine, settings: Settings, frame: pd.DataFrame, arms: list[str]) -> GateEconomics:
    """Derive costs, eligibility and the budget of the gate's allocation for ``frame``'s rows.

    Shop arms (``coupon@channel`` in the catalogue) cost their send cost plus the coupon's value
    on conversion (percent coupons at the customer's average basket), are open to customers who
    consented to the channel and reach the coupon's minimum basket (coupon costs calibrated as
    the next campaign's, see :mod:`mlpkg.allocation.cost_calibration`). The budget is each row's
    share of its log's campaign: the budget CouponOps ran it with (``campaign.budget`` for a shop's
    past campaign) over the customers of that campaign's population. Arms of imported logs cost
    what the log declares, and the budget lets ``gate.treat_fraction`` of the rows be treated.
    """
    treated = [a for a in arms if a != CONTROL]
    n, k = len(frame), len(treated)
    coupons, channels = read_offer(engine)
    coupon_rows = coupons.set_index("coupon_id") if len(coupons) else None
    channel_rows = channels.set_index("channel") if len(channels) else None
    log_names = sorted(frame["log_name"].unique()) if "log_name" in frame.columns else []
    with session_scope(engine) as session:
        logs = session.execute(select(m.CampaignLog).where(m.CampaignLog.name.in_(log_names))).scalars().all()
        declared = {str(a): float(c) for log in logs for a, c in (log.arm_costs or {}).items()}
        shop_only = bool(logs) and all(
            (log.spec or {}).get("format") in _SHOP_LOG_FORMATS or not (log.spec or {}).get("features")
            for log in logs
        )
        # Coupons priced as the next campaign will price them: calibrated on what recent ones paid.
        calibration = coupon_cost_calibration(session, settings.campaign)
        # Each log's budget per customer of its population: a campaign CouponOps ran had its own
        # budget; a shop's past campaign log gets the configured one.
        per_customer = {}
        for log in logs:
            ran = (
                q.get_campaign(session, log.name.removeprefix(m.CAMPAIGN_LOG_PREFIX))
                if log.name.startswith(m.CAMPAIGN_LOG_PREFIX)
                else None
            )
            log_budget = float(ran.budget) if ran is not None else settings.campaign.budget
            per_customer[log.name] = log_budget / max(int(log.n_rows or 0), 1)
    send = np.zeros(k)
    coupon = np.zeros((n, k))
    known = np.zeros(k, dtype=bool)
    min_basket = np.zeros(k)
    basket = frame["avg_basket"].to_numpy(np.float64) if "avg_basket" in frame.columns else np.full(n, np.nan)
    basket = np.where(np.isfinite(basket) & (basket > 0), basket, 0.0)
    for j, arm in enumerate(treated):
        code, _, channel = arm.partition("@")
        if (
            coupon_rows is not None
            and channel_rows is not None
            and code in coupon_rows.index
            and (channel in channel_rows.index)
        ):
            row = coupon_rows.loc[code]
            kind = str(row["kind"])
            value = float(row["face_value"])
            price = basket * value / 100.0 if kind == "percent_off" else value
            coupon[:, j] = price * calibration.factor(code)
            send[j] = float(channel_rows.loc[channel, "send_cost"])
            min_basket[j] = float(row["min_basket"] or 0.0)
            known[j] = True
        elif arm in declared:
            send[j] = declared[arm]
            known[j] = True
    eligible = consent_eligibility(frame, ["control", *treated]) & known[None, :]
    eligible &= basket[:, None] >= min_basket[None, :]
    if shop_only and known.all() and log_names:
        budget = float(frame["log_name"].map(per_customer).fillna(0.0).sum())
        basis = (
            "shop catalogue costs; each campaign's budget per customer of its population "
            f"(configured: {settings.campaign.budget:g} per campaign), over the held-out rows"
        )
        if calibration.campaigns:
            basis += (
                f"; coupon costs calibrated on {len(calibration.campaigns)} measured campaigns "
                f"({calibration.redemptions} redemptions, pooled factor {calibration.pooled:g})"
            )
    else:
        if not (send > 0).any():
            send = np.where(known, 1.0, 0.0)  # the log declares no costs: every arm costs one unit
        unit = float(send[known].mean()) if known.any() else 1.0
        budget = settings.gate.treat_fraction * n * unit
        basis = (
            f"the log's per-arm costs; budget lets {settings.gate.treat_fraction:.0%} of the rows be treated"
        )
    return GateEconomics(
        arms=treated, send_cost=send, coupon_cost=coupon, eligible=eligible, budget=float(budget),
        basis=basis, price_redemptions=settings.campaign.coupon_pricing == "redemption",
    )


@dataclass
class Scores:
    """One version's predictions over the gate's arm columns (control first)."""

    version: str
    p: np.ndarray  # [n, A]
    has_arm: np.ndarray  # [A]
    pay: np.ndarray  # [n, A] the probability the version prices coupons at (its p, or its P(redeemed))


def _score(model: Any, frame: pd.DataFrame, columns: list[str], version: str, econ: GateEconomics) -> Scores:
    """Score ``frame`` with a loaded version over the gate's columns (its missing arms: control's)."""
    scores = model.score_arrays(frame)
    redeem = scores.get("p_redeem") if econ.price_redemptions else None
    own = list(model.arms)
    p = np.repeat(scores["p_conv"][:, [own.index(CONTROL)]].astype(np.float64), len(columns), axis=1)
    pay = p.copy()
    has = np.zeros(len(columns), dtype=bool)
    for j, arm in enumerate(columns):
        if arm in own:
            p[:, j] = scores["p_conv"][:, own.index(arm)]
            pay[:, j] = p[:, j] if redeem is None or arm == CONTROL else redeem[:, own.index(arm)]
            has[j] = True
    if redeem is not None:
        # As the allocator prices it: a conversion the coupon caused redeems it (see option_economics).
        pay[:, 1:] = np.maximum(pay[:, 1:], p[:, 1:] - p[:, :1])
    return Scores(version=version, p=p, has_arm=has, pay=pay)


def policy_matrix(scores: Scores, econ: GateEconomics, p_cost: np.ndarray) -> np.ndarray:
    """Return the version's allocation of the held-out rows as a one-hot ``[n, A]`` matrix.

    The product's rule: maximise predicted incremental conversions within eligibility and the
    budget, with expected costs at conversion probabilities ``p_cost`` (the version's own, as the
    product allocates; or common ones, for random targeting).
    """
    n, a = scores.p.shape
    uplift = (scores.p[:, 1:] - scores.p[:, :1]).astype(np.float32)
    problem = AllocationProblem(
        value=uplift,
        cost=econ.cost(p_cost[:, 1:]),
        eligible=econ.eligible & scores.has_arm[None, 1:],
        option_coupon=np.full(a - 1, -1),
        option_channel=np.full(a - 1, -1),
        budget=econ.budget,
        coupon_capacity=np.zeros(0),
        channel_capacity=np.zeros(0),
    )
    choice = solve_lagrangian(problem).choice
    target = np.zeros((n, a))
    target[np.arange(n), np.where(choice >= 0, choice + 1, 0)] = 1.0
    return target


def random_targeting(econ: GateEconomics, p_common: np.ndarray) -> np.ndarray:
    """Return random targeting at the same budget: a uniform eligible arm with one shared probability."""
    n = econ.eligible.shape[0]
    n_elig = econ.eligible.sum(axis=1)
    cost = econ.cost(p_common[:, 1:]).astype(np.float64)
    mean_cost = np.where(n_elig > 0, (cost * econ.eligible).sum(axis=1) / np.maximum(n_elig, 1), 0.0)
    total = float(mean_cost.sum())
    rho = min(1.0, econ.budget / total) if total > 0 else 1.0
    target = np.zeros((n, econ.eligible.shape[1] + 1))
    target[:, 1:] = np.where(econ.eligible, rho / np.maximum(n_elig, 1)[:, None], 0.0)
    target[:, 0] = 1.0 - target[:, 1:].sum(axis=1)
    return target


def calibration_allowance(p: np.ndarray, limit: float, confidence: float, seed: int = 0) -> float:
    """Return the calibration error the guard allows: ``limit`` plus what noise explains at ``len(p)``.

    The noise part is the ``confidence`` quantile of the calibration error of a perfectly
    calibrated model with these predictions (outcomes drawn from them), so a small holdout is
    not refused for noise and a large one is held to ``limit``.
    """
    if len(p) == 0:
        return limit
    rng = np.random.default_rng(seed)
    noise = [
        expected_calibration_error(p, (rng.random(len(p)) < p).astype(np.float64))
        for _ in range(_CALIBRATION_DRAWS)
    ]
    return float(limit + np.quantile(noise, confidence))


@dataclass
class GateDecision:
    """Outcome of comparing a challenger with the champion on the same held-out rows.

    ``challenger_value`` and ``champion_value`` are DR estimates of conversions per customer under
    each version's budget-constrained allocation; ``gain`` is their paired difference and
    ``gain_lcb`` its one-sided lower bound at ``confidence``. For a first version,
    ``baseline_value`` is random targeting at the same budget.
    """

    promoted: bool
    reason: str
    challenger_version: str
    champion_version: str | None
    challenger_value: float | None
    champion_value: float | None
    challenger_calibration_error: float | None
    test_rows: int
    challenger_stderr: float | None = None
    champion_stderr: float | None = None
    outcome: str = ""
    gain: float | None = None
    gain_stderr: float | None = None
    gain_lcb: float | None = None
    margin: float = 0.0
    confidence: float = 0.9
    estimator: str = "dr"
    snips_gain: float | None = None
    baseline_value: float | None = None
    calibration_limit: float | None = None
    test_customers: int = 0
    holdout: str = ""
    economics: str = ""
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """Return a JSON-friendly dict."""
        return asdict(self)

    def sentence(self) -> str:
        """Say the decision in one sentence with its numbers (the version's MLflow description)."""
        version = f"v{self.challenger_version}"
        mine = _with_stderr(self.challenger_value, self.challenger_stderr)
        rows = f"on {self.test_rows:,} held-out rows ({self.test_customers:,} customers)"
        if self.outcome == "refused":
            guards = self.reason.removeprefix("guard failed: ")
            versus = (
                f" vs champion v{self.champion_version} {_fmt(self.champion_value)}"
                if self.champion_version
                else f" vs random targeting {_fmt(self.baseline_value)}"
            )
            return f"{version} refused by the gate ({guards}): policy value {mine}{versus} {rows}."
        if self.champion_version is None:
            calib = _fmt(self.challenger_calibration_error)
            return (
                f"{version} promoted as the first champion: policy value {mine} vs random targeting "
                f"{_fmt(self.baseline_value)} at the same budget, calibration error {calib} "
                f"(allowed {_fmt(self.calibration_limit)}), {rows}."
            )
        head = (
            f"{version} promoted over v{self.champion_version}"
            if self.promoted
            else (f"{version} kept, champion v{self.champion_version} stays")
        )
        bound = f"{self.confidence:.0%} lower bound {_fmt(self.gain_lcb, signed=True)}"
        verdict = ">" if self.promoted else "≤"
        return (
            f"{head}: policy value {mine} vs {_fmt(self.champion_value)}, paired gain "
            f"{_with_stderr(self.gain, self.gain_stderr, signed=True)}, {bound} {verdict} margin "
            f"{self.margin:g}, {rows}."
        )


def _fmt(value: float | None, *, signed: bool = False) -> str:
    # Four significant digits: enough to compare two policy values, short enough to read.
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _with_stderr(value: float | None, stderr: float | None, *, signed: bool = False) -> str:
    if stderr is None or value is None or not math.isfinite(stderr):
        return _fmt(value, signed=signed)
    return f"{_fmt(value, signed=signed)} ± {stderr:.2g}"


def model_description(gate: GateSettings) -> str:
    """Return the registered model's description: what the model is and how its champion is chosen."""
    return (
        "CouponOps multi-arm uplift model: for every customer it predicts the probability of "
        "conversion and the revenue under control and under each coupon-and-channel arm; campaigns "
        "give each customer the arm with the best predicted uplift within consent and the budget, "
        f"using the version the '{registry.CHAMPION}' alias points at. Every newly trained version "
        f"becomes '{registry.CHALLENGER}' and is compared with the champion on the same frozen "
        f"holdout ({gate.holdout_share:.0%} of customers, never trained on): the doubly robust "
        "value of each version's budget-constrained allocation, as a paired difference; the "
        f"challenger is promoted when the {gate.confidence:.0%} lower bound of the gain exceeds "
        f"{gate.margin:g}, or the champion stays. The calibration error may exceed "
        f"{gate.max_calibration_error:g} only by what sampling noise explains. Each version's "
        "description states the gate's decision and its numbers; a person may also promote a "
        "version by hand (couponops promote), which is recorded with who and why."
    )


def evaluate(
    frame: pd.DataFrame,
    econ: GateEconomics,
    challenger: Scores,
    champion: Scores | None,
    gate: GateSettings,
) -> dict[str, Any]:
    """Estimate both versions' policy values and their paired difference on ``frame``'s rows."""
    columns = [CONTROL, *econ.arms]
    logged = frame["arm"].astype(str).map({a: i for i, a in enumerate(columns)})
    if logged.isna().any():
        unknown = sorted(set(frame["arm"].astype(str)[logged.isna()]))
        raise ValueError(f"held-out rows hold arms {unknown} outside the gate's arms {columns}")
    idx = logged.to_numpy(np.int64)
    prop = frame["propensity"].to_numpy(np.float64)
    y = frame[OUTCOME].to_numpy(np.float64)
    versions = [challenger] + ([champion] if champion is not None else [])
    p_common = np.mean([v.p for v in versions], axis=0)
    # Each version allocates with its own predicted costs, as the product deploys it.
    mine = policy_matrix(challenger, econ, challenger.pay)
    if champion is not None:
        theirs = policy_matrix(champion, econ, champion.pay)
    else:
        theirs = random_targeting(econ, p_common)
    control = np.zeros_like(mine)
    control[:, 0] = 1.0
    alpha = 2 * (1 - gate.confidence)
    diff = paired_difference(mine, theirs, idx, prop, y, p_common, alpha=alpha)
    vs_control_mine = paired_difference(mine, control, idx, prop, y, p_common, alpha=alpha)
    vs_control_theirs = paired_difference(theirs, control, idx, prop, y, p_common, alpha=alpha)
    value_mine, se_mine = dr_value(mine, idx, prop, y, p_common)
    value_theirs, se_theirs = dr_value(theirs, idx, prop, y, p_common)
    z = float(stats.norm.ppf(gate.confidence))
    gain = diff["dr"]
    own = challenger.p[np.arange(len(frame)), idx]
    cost_mine = float((mine[:, 1:] * econ.cost(p_common[:, 1:])).sum())
    cost_theirs = float((theirs[:, 1:] * econ.cost(p_common[:, 1:])).sum())
    return {
        "challenger_value": value_mine,
        "challenger_stderr": se_mine,
        "other_value": value_theirs,
        "other_stderr": se_theirs,
        "gain": gain.value,
        "gain_stderr": gain.stderr,
        "gain_lcb": gain.value - z * gain.stderr,
        "gain_ucb": gain.value + z * gain.stderr,
        "snips_gain": diff["snips"].value,
        "challenger_vs_control": vs_control_mine["dr"].value,
        "other_vs_control": vs_control_theirs["dr"].value,
        "calibration_error": expected_calibration_error(np.clip(own, 0, 1), y),
        "calibration_limit": calibration_allowance(
            np.clip(own, 0, 1), gate.max_calibration_error, gate.confidence
        ),
        "test_rows": len(frame),
        "test_customers": int(frame["customer_id"].nunique())
        if "customer_id" in frame.columns
        else len(frame),
        "challenger_treated": int(mine[:, 1:].sum()),
        "other_treated": float(theirs[:, 1:].sum()),
        "challenger_spend": cost_mine,
        "other_spend": cost_theirs,
        "budget": econ.budget,
    }


def dr_value(
    target: np.ndarray, idx: np.ndarray, prop: np.ndarray, y: np.ndarray, q: np.ndarray
) -> tuple[float, float]:
    """Return the doubly robust value of policy ``target`` ``[n, A]`` and its standard error."""
    rows = np.arange(len(idx))
    terms = np.sum(target * q, axis=1) + target[rows, idx] / prop * (y - q[rows, idx])
    stderr = float(np.std(terms, ddof=1) / math.sqrt(len(terms))) if len(terms) > 1 else math.nan
    return float(np.mean(terms)), stderr


def decide(
    numbers: dict[str, Any] | None,
    *,
    challenger_version: str,
    champion_version: str | None,
    gate: GateSettings,
    holdout: str,
    economics: str,
) -> GateDecision:
    """Apply the gate's rule to the numbers of :func:`evaluate` (``None``: too few rows to evaluate)."""
    common = dict(
        challenger_version=str(challenger_version),
        champion_version=champion_version,
        margin=gate.margin,
        confidence=gate.confidence,
        holdout=holdout,
        economics=economics,
    )
    if numbers is None or numbers["test_rows"] < gate.min_test_rows:
        rows = 0 if numbers is None else numbers["test_rows"]
        return GateDecision(
            promoted=False,
            reason=f"guard failed: {rows} held-out rows < min_test_rows={gate.min_test_rows}, too few "
            "to estimate a policy value with its standard error",
            challenger_value=None,
            champion_value=None,
            challenger_calibration_error=None,
            test_rows=rows,
            outcome="refused",
            **common,
        )
    guards = []
    if numbers["calibration_error"] > numbers["calibration_limit"]:
        guards.append(
            f"calibration error {numbers['calibration_error']:.4f} > {numbers['calibration_limit']:.4f} "
            f"allowed at {numbers['test_rows']:,} rows (limit {gate.max_calibration_error:g} plus noise)"
        )
    if guards:
        promoted, outcome, reason = False, "refused", "guard failed: " + "; ".join(guards)
    elif champion_version is None:
        # With nothing to keep, the first version that passes the guards serves; its comparison
        # with random targeting at the same budget is recorded for people to judge.
        promoted, outcome = True, "promoted"
        reason = (
            "no champion yet: first version that passes the guards (vs random targeting at the same "
            f"budget: gain {numbers['gain']:+.5f} ± {numbers['gain_stderr']:.5f})"
        )
    else:
        promoted = numbers["gain_lcb"] > gate.margin
        outcome = "promoted" if promoted else "kept"
        reason = (
            f"paired gain {numbers['gain']:+.5f} ± {numbers['gain_stderr']:.5f}: {gate.confidence:.0%} "
            f"lower bound {numbers['gain_lcb']:+.5f} {'>' if promoted else '≤'} margin {gate.margin:g}"
        )
    first = champion_version is None
    return GateDecision(
        promoted=promoted,
        reason=reason,
        challenger_value=numbers["challenger_value"],
        champion_value=None if first else numbers["other_value"],
        challenger_calibration_error=numbers["calibration_error"],
        test_rows=numbers["test_rows"],
        challenger_stderr=numbers["challenger_stderr"],
        champion_stderr=None if first else numbers["other_stderr"],
        outcome=outcome,
        gain=numbers["gain"],
        gain_stderr=numbers["gain_stderr"],
        gain_lcb=numbers["gain_lcb"],
        snips_gain=numbers["snips_gain"],
        baseline_value=numbers["other_value"] if first else None,
        calibration_limit=numbers["calibration_limit"],
        test_customers=numbers["test_customers"],
        details={
            k: numbers[k]
            for k in (
                "budget",
                "challenger_spend",
                "other_spend",
                "challenger_treated",
                "other_treated",
                "challenger_vs_control",
                "other_vs_control",
            )
        },
        **common,
    )


def gate_challenger(
    client: MlflowClient,
    engine: Engine,
    *,
    name: str,
    tracking_uri: str,
    challenger_version: str,
    test_frame: pd.DataFrame,
    economics_for: Callable[[pd.DataFrame, list[str]], GateEconomics],
    gate: GateSettings,
    now: datetime,
    run_id: str | None = None,
) -> GateDecision:
    """Set ``challenger``, compare it with the champion on the holdout, promote only on evidence.

    ``economics_for(rows, arms)`` gives the allocation's costs, eligibility and budget for the
    held-out rows over the challenger's arms (and any other logged arm), e.g. :func:`gate_economics`.

    The decision is written as version tags and description on the challenger, as the run's
    description and ``gate/`` artifacts (decision JSON, comparison CSV), and in the warehouse's
    promotion history when the champion moves.
    """
    registry.move_alias(
        client,
        engine,
        name=name,
        alias=registry.CHALLENGER,
        version=challenger_version,
        actor="gate",
        reason="newly trained version",
        now=now,
    )
    champion = registry.alias_version(client, name, registry.CHAMPION)
    if champion == str(challenger_version):
        champion = None
    model = registry.load_uplift_model(f"models:/{name}/{challenger_version}", tracking_uri=tracking_uri)
    logged = sorted(set(test_frame["arm"].astype(str)) - set(model.arms)) if len(test_frame) else []
    economics = economics_for(test_frame, [*model.arms, *logged])
    columns = [CONTROL, *economics.arms]
    numbers = None
    if len(test_frame) >= max(gate.min_test_rows, 2):
        mine = _score(model, test_frame, columns, str(challenger_version), economics)
        theirs = None
        if champion:
            loaded = registry.load_uplift_model(f"models:/{name}/{champion}", tracking_uri=tracking_uri)
            theirs = _score(loaded, test_frame, columns, champion, economics)
        numbers = evaluate(test_frame, economics, mine, theirs, gate)
    decision = decide(
        numbers,
        challenger_version=str(challenger_version),
        champion_version=champion,
        gate=gate,
        holdout=holdout_rule(gate.holdout_share),
        economics=economics.basis,
    )
    record_decision(
        client, engine, name=name, decision=decision, numbers=numbers, gate=gate, now=now, run_id=run_id
    )
    return decision


def record_decision(
    client: MlflowClient,
    engine: Engine,
    *,
    name: str,
    decision: GateDecision,
    numbers: dict[str, Any] | None,
    gate: GateSettings,
    now: datetime,
    run_id: str | None = None,
) -> None:
    """Write a decision where users look, and move the champion when it says so.

    Version tags (``gate.*``) and description, the registered model's description, the run's
    description, ``gate.outcome`` tag and ``gate/`` artifacts; a promotion moves ``champion``
    through :func:`mlpkg.registry.move_alias`, which records it in the warehouse's history.
    """
    _describe(client, name, decision, numbers, gate, run_id)
    if decision.promoted:
        registry.move_alias(
            client,
            engine,
            name=name,
            alias=registry.CHAMPION,
            version=decision.challenger_version,
            actor="gate",
            reason=decision.reason,
            now=now,
            details=decision.as_dict(),
        )


def _describe(
    client: MlflowClient,
    name: str,
    decision: GateDecision,
    numbers: dict[str, Any] | None,
    gate: GateSettings,
    run_id: str | None,
) -> None:
    version = decision.challenger_version
    for key, value in decision.as_dict().items():
        if key != "details":
            client.set_model_version_tag(name, version, f"gate.{key}", str(value))
    summary = decision.sentence()
    client.update_model_version(name, version, description=summary)
    client.update_registered_model(name, description=model_description(gate))
    if not run_id:
        return
    client.set_tag(run_id, "gate.outcome", decision.outcome)
    client.set_tag(run_id, registry.NOTE_TAG, summary)
    with tempfile.TemporaryDirectory() as tmp:
        if numbers is not None:
            other = (
                f"champion v{decision.champion_version}" if decision.champion_version else "random targeting"
            )
            table = pd.DataFrame(
                [
                    dict(
                        policy=f"challenger v{version}",
                        value=numbers["challenger_value"],
                        stderr=numbers["challenger_stderr"],
                        treated=numbers["challenger_treated"],
                        spend=numbers["challenger_spend"],
                        vs_control=numbers["challenger_vs_control"],
                    ),
                    dict(
                        policy=other,
                        value=numbers["other_value"],
                        stderr=numbers["other_stderr"],
                        treated=numbers["other_treated"],
                        spend=numbers["other_spend"],
                        vs_control=numbers["other_vs_control"],
                    ),
                ]
            )
            table.to_csv(Path(tmp) / "gate_comparison.csv", index=False)
        (Path(tmp) / "gate_decision.json").write_text(
            json.dumps({**decision.as_dict(), "summary": summary}, indent=2, default=str)
        )
        client.log_artifacts(run_id, tmp, artifact_path="gate")
