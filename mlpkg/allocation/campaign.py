"""Allocate a campaign: score customers with the champion, solve, and write the coupon ledger.

Assignment mechanism (logged with every ledger row so feedback supports unbiased evaluation):
each customer is hashed with the campaign id into a uniform number ``u``; ``u < control_share``
puts them in the random control group (nothing sent), the next ``exploration_share`` gets a
uniformly random eligible arm, and everyone else gets what the optimiser chose. The logged
propensity is the marginal probability of the arm the customer received under this mixture,
where the model's choice for every customer comes from the same Lagrangian prices the solver
found, so control and exploration customers also carry the model's counterfactual arm.

A live comparison: when the gate kept the champion over a newer version for want of evidence
(:func:`mlpkg.registry.live_challenger`), a second hash of the customer and the campaign puts
``challenger_share`` of the customers in the challenger's slot. The model policy scores each
customer with their slot's version and one solve allocates the whole model group at one set of
prices, so the two versions share the budget, inventory and capacity on equal terms; the logged
propensity of the model branch is ``(1 - share) * [champion's choice] + share * [challenger's]``.
Where the versions disagree, their arms are logged with propensities near one half: evidence
the next gate can weigh with weights near 2, where exploration alone gives weights in the hundreds.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError

from mlpkg import registry
from mlpkg.allocation.cost_calibration import UNCALIBRATED, CostCalibration, coupon_cost_calibration
from mlpkg.allocation.fairness import group_constraints, group_prices, subset
from mlpkg.allocation.reasons import (
    PlanState,
    attach_attributions,
    decisive_rows,
    eligibility_causes,
    explain_rows,
    reason_records,
)
from mlpkg.allocation.solver import AllocationProblem, check_feasible, solve_lagrangian
from mlpkg.config import CampaignSettings, Settings
from mlpkg.data import customer_features
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.validation import DataContractError, ValidationContext, validate_table

CONTROL = "control"
log = logging.getLogger(__name__)


class PriorScorer:
    """Scores for a cold start: a flat conversion prior and each customer's average basket."""

    PRIOR_CONVERSION = 0.03

    def __init__(self, coupons: pd.DataFrame, channels: pd.DataFrame):
        self.arms = [CONTROL] + [
            f"{c}@{h}" for c in sorted(coupons["coupon_id"]) for h in sorted(channels["channel"])
        ]

    def score_arrays(self, df: pd.DataFrame, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        """Return the prior for every customer and arm."""
        basket = (
            df["avg_basket"].to_numpy(np.float32) if "avg_basket" in df.columns else np.full(len(df), 60.0)
        )
        basket = np.where(
            np.isfinite(basket) & (basket > 0),
            basket,
            np.nanmedian(basket[basket > 0]) if (basket > 0).any() else 60.0,
        ).astype(np.float32)
        n, a = len(df), len(self.arms)
        return {
            "p_conv": np.full((n, a), self.PRIOR_CONVERSION, dtype=np.float32),
            "revenue": np.repeat(basket[:, None], a, axis=1),
        }


class LedgerLimitError(RuntimeError):
    """The database refused a ledger write that would overspend a budget or over-issue a coupon."""


@dataclass(frozen=True)
class ArmCatalog:
    """Treatment arms on offer and what each consumes."""

    arms: list[str]
    coupon_ids: list[str]
    channels: list[str]
    option_coupon: np.ndarray
    option_channel: np.ndarray
    coupon_kind: np.ndarray
    face_value: np.ndarray
    min_basket: np.ndarray
    send_cost: np.ndarray
    coupon_capacity: np.ndarray
    channel_capacity: np.ndarray


def uniform_draws(campaign_id: str, customer_ids: np.ndarray, salt: str) -> np.ndarray:
    """Return a reproducible uniform number in [0, 1) per customer (same run, same draws)."""
    out = np.empty(len(customer_ids), dtype=np.float64)
    for i, cid in enumerate(customer_ids):
        h = hashlib.blake2b(f"{campaign_id}|{salt}|{cid}".encode(), digest_size=8).digest()
        out[i] = int.from_bytes(h, "big") / 2**64
    return out


def build_catalog(
    model_arms: list[str], coupons: pd.DataFrame, channels: pd.DataFrame, as_of: datetime
) -> ArmCatalog:
    """Keep the model's arms whose coupon is valid and in stock and whose channel exists."""
    as_of_ts = pd.Timestamp(as_of)
    coupons = coupons.assign(
        valid_from=pd.to_datetime(coupons["valid_from"], utc=True),
        valid_to=pd.to_datetime(coupons["valid_to"], utc=True),
    )
    live = coupons[
        (coupons["valid_from"] <= as_of_ts)
        & (coupons["valid_to"] >= as_of_ts)
        & (coupons["inventory"] > coupons["issued"])
    ]
    coupon_ids = sorted(live["coupon_id"])
    channel_ids = sorted(channels["channel"])
    arms = []
    for arm in model_arms:
        if arm == CONTROL or "@" not in arm:
            continue
        coupon, channel = arm.split("@", 1)
        if coupon in coupon_ids and channel in channel_ids:
            arms.append(arm)
    cp = live.set_index("coupon_id").loc[coupon_ids]
    ch = channels.set_index("channel").loc[channel_ids]
    opt_coupon = np.array([coupon_ids.index(a.split("@")[0]) for a in arms], dtype=np.int64)
    opt_channel = np.array([channel_ids.index(a.split("@")[1]) for a in arms], dtype=np.int64)
    return ArmCatalog(
        arms=arms,
        coupon_ids=coupon_ids,
        channels=channel_ids,
        option_coupon=opt_coupon,
        option_channel=opt_channel,
        coupon_kind=cp["kind"].to_numpy()[opt_coupon] if arms else np.array([]),
        face_value=cp["face_value"].to_numpy(float)[opt_coupon] if arms else np.array([]),
        min_basket=cp["min_basket"].to_numpy(float)[opt_coupon] if arms else np.array([]),
        send_cost=ch["send_cost"].to_numpy(float)[opt_channel] if arms else np.array([]),
        coupon_capacity=(cp["inventory"] - cp["issued"]).to_numpy(float),
        channel_capacity=ch["daily_capacity"].to_numpy(float),
    )


def coupon_cost_given_conversion(catalog: ArmCatalog, basket: np.ndarray) -> np.ndarray:
    """Expected coupon cost if the customer converts and redeems, per option ([n, m])."""
    pct = np.where(catalog.coupon_kind == "percent_off", catalog.face_value / 100.0, 0.0)
    fixed = np.where(catalog.coupon_kind != "percent_off", catalog.face_value, 0.0)
    return (basket * pct[None, :] + fixed[None, :]).astype(np.float32)


def priced_redemptions(scores: dict[str, np.ndarray], cfg: CampaignSettings) -> np.ndarray | None:
    """Return the P(redeemed) an allocation prices coupons at: the version's, with redemption pricing."""
    return scores.get("p_redeem") if cfg.coupon_pricing == "redemption" else None


def option_economics(
    p_conv: np.ndarray,
    revenue: np.ndarray,
    model_arms: list[str],
    catalog: ArmCatalog,
    *,
    objective: str,
    margin: float,
    p_redeem: np.ndarray | None = None,
    redeemed_basket: np.ndarray | None = None,
    calibration: CostCalibration = UNCALIBRATED,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Turn per-arm predictions into (value, cost, uplift, basket) matrices over the catalog's options.

    ``value`` is the campaign objective's expected increment; ``cost`` is expected spend: the
    coupon's value paid on redemption plus the send cost. The coupon is redeemed with
    probability ``p_redeem`` (``[n, A]`` in ``model_arms`` order, the model's P(redeemed | arm));
    without it, every treated conversion is charged the coupon. A percentage coupon is priced on
    ``redeemed_basket`` (``[n, A]``, the order value of a redemption, as the simulator's oracle
    knows it) when given, else on the revenue given conversion. ``calibration`` scales each
    coupon's expected cost by what recent campaigns really paid against what they expected
    (:mod:`mlpkg.allocation.cost_calibration`).
    """
    idx = [model_arms.index(a) for a in catalog.arms]
    c0 = model_arms.index(CONTROL)
    p_t = p_conv[:, idx].astype(np.float32)
    r_t = revenue[:, idx].astype(np.float32)
    p_c = p_conv[:, [c0]].astype(np.float32)
    r_c = revenue[:, [c0]].astype(np.float32)
    uplift = p_t - p_c
    # A conversion the coupon caused uses the coupon: P(redeemed) is at least the uplift. Without
    # the bound the solver buys, at a redemption model's low price, exactly the contacts whose
    # uplift the conversion model overstates (predicted increments above predicted redemptions).
    p_pay = p_t if p_redeem is None else np.maximum(np.asarray(p_redeem)[:, idx].astype(np.float32), uplift)
    basket = r_t if redeemed_basket is None else np.asarray(redeemed_basket)[:, idx].astype(np.float32)
    factor = np.array([calibration.factor(catalog.coupon_ids[c]) for c in catalog.option_coupon], np.float32)
    coupon_cost = p_pay * coupon_cost_given_conversion(catalog, basket) * factor[None, :]
    cost = coupon_cost + catalog.send_cost[None, :].astype(np.float32)
    inc_revenue = p_t * r_t - p_c * r_c
    if objective == "conversions":
        value = uplift
    elif objective == "revenue":
        value = inc_revenue
    elif objective == "profit":
        value = margin * inc_revenue - cost
    else:
        raise ValueError(f"objective must be conversions, revenue or profit, got {objective!r}")
    return value.astype(np.float32), cost.astype(np.float32), uplift, r_t


def _model_choice_for_all(  # noqa: ANN001
    value, cost, eligible, catalog: ArmCatalog, multipliers: dict, groups=()
) -> np.ndarray:
    """Apply the solver's Lagrangian prices to every customer: the model policy's choice."""
    lam = float(multipliers.get("budget", 0.0))
    mu = np.asarray(multipliers.get("coupon", np.zeros(len(catalog.coupon_ids))), dtype=np.float64)
    nu = np.asarray(multipliers.get("channel", np.zeros(len(catalog.channels))), dtype=np.float64)
    reduced = value - lam * cost - mu[catalog.option_coupon][None, :] - nu[catalog.option_channel][None, :]
    if groups:
        alpha, beta = group_prices(groups, multipliers.get("group", np.zeros(len(groups))))
        reduced = reduced - alpha[:, None] - beta[:, None] * cost
    reduced = np.where(eligible, reduced, -np.inf)
    best = np.argmax(reduced, axis=1) if reduced.shape[1] else np.zeros(len(value), dtype=int)
    best_val = reduced[np.arange(len(value)), best] if reduced.shape[1] else np.full(len(value), -np.inf)
    return np.where(best_val > 0, best, -1)


def allocate_campaign(
    engine: Engine,
    settings: Settings,
    *,
    campaign_id: str,
    as_of: datetime,
    run_key: str,
    model_uri: str | None,
    model_version: str | None,
    now: datetime,
    budget: float | None = None,
    objective: str | None = None,
    scored: Callable[[], ScoredPopulation] | None = None,
    challenger_uri: str | None = None,
    challenger_version: str | None = None,
) -> dict:
    """Allocate one campaign and write its ledger (idempotent per ``run_key``).

    ``scored`` returns the campaign's customers already scored (merged from scoring shards, see
    :func:`mlpkg.allocation.shards.merge_shards`); it is called only once the run holds the
    campaign, so a re-run of a finished run needs no scores. Without it every customer is scored
    here, by the champion and, when ``challenger_uri`` names a live challenger, by it too: the
    challenger then allocates ``campaign.challenger_share`` of the model group (:func:`live_split`).

    Returns:
        A summary dict: counts per arm and policy, budget used, expected increments, solver gap.

    Raises:
        mlpkg.db.queries.CampaignBusyError: another run holds or already allocated the campaign.
    """
    cfg = settings.campaign
    budget = float(cfg.budget if budget is None else budget)
    objective = objective or cfg.objective
    owner = f"{run_key}"
    with session_scope(engine) as session:
        state = q.claim_campaign(
            session,
            campaign_id=campaign_id,
            run_key=run_key,
            owner=owner,
            as_of=as_of,
            budget=budget,
            objective=objective,
            now=now,
        )
        if state == "done":
            return dict(q.get_campaign(session, campaign_id).summary, idempotent_rerun=True)
    try:
        summary, rows, reasons, spend, issued = _plan(
            engine,
            settings,
            campaign_id=campaign_id,
            as_of=as_of,
            model_uri=model_uri,
            budget=budget,
            objective=objective,
            now=now,
            population=scored() if scored is not None else None,
            challenger=(challenger_uri, challenger_version),
        )
        summary["model_version"] = model_version
        if "live_comparison" in summary:
            summary["live_comparison"]["champion_version"] = model_version
        _validate_ledger(rows, campaign_id, budget, now)
        with session_scope(engine) as session:
            q.upsert_rows(session, m.Allocation, rows)
            q.upsert_rows(session, m.AllocationReason, reasons)
            try:
                q.commit_spend(session, campaign_id, spend)
                q.issue_coupons(session, issued)
                session.flush()
            except IntegrityError as exc:
                raise LedgerLimitError(
                    f"campaign {campaign_id!r}: writing the ledger would exceed the campaign budget "
                    f"({budget}) or a coupon's inventory (issued {issued}); the database refused it "
                    "(table campaigns.committed / coupons.issued CHECK). Usually a concurrent campaign "
                    "took the remaining inventory: re-run to allocate against what is left."
                ) from exc
            campaign = q.get_campaign(session, campaign_id)
            campaign.status = "allocated"
            campaign.model_version = model_version
            campaign.lock_owner = None
            campaign.summary = summary
    except BaseException:
        # Release the lock so a retry of the same run can allocate; the ledger write was atomic.
        with session_scope(engine) as session:
            campaign = q.get_campaign(session, campaign_id)
            if campaign is not None and campaign.status == "allocating":
                session.delete(campaign)
        raise
    return summary


def _validate_ledger(rows: list[dict], campaign_id: str, budget: float, now: datetime) -> None:
    """Run the allocations suite on the ledger before it is written (the stage-output gate).

    Raises:
        mlpkg.validation.DataContractError: the ledger breaks its contract; nothing is written.
    """
    frame = pd.DataFrame(rows)
    spend = float(frame["expected_cost"].sum()) if len(frame) else 0.0
    over = (
        [f"allocations of campaign {campaign_id}: expected spend {spend:.4f} exceeds budget {budget}"]
        if spend > budget + 1e-6
        else []
    )
    _gate_output(frame, "allocations", f"allocations of campaign {campaign_id}", now, over)


def _validate_scores(
    ids: np.ndarray, scores: dict[str, np.ndarray], arms: list[str], source: str, now: datetime
) -> None:
    """Run the model_scores suite on a scorer's output before anything is allocated from it.

    A model that emits NaN or out-of-range probabilities or revenues stops the run here, with the
    arm's column named, instead of steering the solver.

    Raises:
        mlpkg.validation.DataContractError: the scores break their contract.
    """
    frame = pd.DataFrame({"customer_id": np.asarray(ids, dtype=str)})
    columns = {f"p_conv__{a}": scores["p_conv"][:, j] for j, a in enumerate(arms)}
    columns |= {f"revenue__{a}": scores["revenue"][:, j] for j, a in enumerate(arms)}
    _gate_output(pd.concat([frame, pd.DataFrame(columns)], axis=1), "model_scores", source, now)


def _gate_output(
    frame: pd.DataFrame, table: str, source: str, now: datetime, problems: Sequence[str] = ()
) -> None:
    """Validate a stage's output frame against ``table``'s suite; raise with every problem found."""
    report = validate_table(frame, table, context=ValidationContext(now=now), source=source)
    problems = ([] if report.success else [report.message()]) + list(problems)
    if problems:
        raise DataContractError("\n".join(problems), failures=list(report.failures), reports=[report])


def read_offer(engine: Engine) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read the coupon catalogue (with what is already issued) and the channels."""
    with engine.connect() as conn:
        return pd.read_sql(select(m.Coupon), conn), pd.read_sql(select(m.Channel), conn)


@dataclass
class ScoredPopulation:
    """Every customer's options for one campaign: economics per option and eligibility."""

    ids: np.ndarray
    catalog: ArmCatalog
    value: np.ndarray
    cost: np.ndarray
    uplift: np.ndarray
    eligible: np.ndarray
    #: Each customer's predicted conversion probability without a coupon (the control arm).
    base_rate: np.ndarray
    #: The model inputs in ``ids`` order and the scorer, kept when scored in-process so the
    #: reasons' attributions need not rebuild them (merged shards carry neither).
    features: pd.DataFrame | None = None
    scorer: object | None = None
    #: The calibration of the expected coupon costs (what recent campaigns really paid).
    calibration: CostCalibration = UNCALIBRATED
    #: The live challenger's scores of the same customers and options (see :func:`live_split`).
    challenger: ChallengerScores | None = None


@dataclass
class ChallengerScores:
    """A live challenger's economics of every customer and option, in its population's order.

    A version the gate kept out on too little evidence allocates a random share of the model
    group beside the champion (:func:`live_split`): its choices then carry logged propensities
    near one half, so the next gate compares versions on rows where they disagree with small
    weights instead of on a few exploration rows with weights in the hundreds.
    """

    version: str
    model_uri: str
    value: np.ndarray
    cost: np.ndarray
    uplift: np.ndarray
    base_rate: np.ndarray
    scorer: object | None = None


def live_split(campaign_id: str, ids: np.ndarray, share: float) -> np.ndarray:
    """Return ``bool [n]``: the customers the live challenger would allocate (hash of id and campaign).

    The draw is independent of the control/exploration draw, so each group holds the same share
    of challenger customers and every customer's model arm (and propensity) is that of a known
    mixture of the two versions.
    """
    if share <= 0:
        return np.zeros(len(ids), dtype=bool)
    return uniform_draws(campaign_id, ids, "challenger") < share


def blend(pop: ScoredPopulation, slot: np.ndarray) -> ScoredPopulation:
    """Return the population as the model policy sees it: each customer scored by their slot's version."""
    ch = pop.challenger
    if ch is None or not slot.any():
        return pop
    pick = slot[:, None]
    return replace(
        pop,
        value=np.where(pick, ch.value, pop.value),
        cost=np.where(pick, ch.cost, pop.cost),
        uplift=np.where(pick, ch.uplift, pop.uplift),
        base_rate=np.where(slot, ch.base_rate, pop.base_rate),
    )


def score_population(
    engine: Engine,
    settings: Settings,
    *,
    as_of: datetime,
    model_uri: str | None,
    objective: str,
    customer_ids: list[str] | None = None,
    challenger_uri: str | None = None,
    challenger_version: str | None = None,
) -> ScoredPopulation:
    """Score customers' options as of ``as_of`` and apply consent, reachability, min-basket and cooldown.

    With ``model_uri=None`` (cold start) a flat prior stands in for the model. ``customer_ids``
    limits scoring to those customers (one shard, see :mod:`mlpkg.allocation.shards`).
    ``challenger_uri`` also scores them with a live challenger (:class:`ChallengerScores`).
    """
    cfg = settings.campaign
    feats = customer_features(engine, as_of, customer_ids).sort_values("customer_id").reset_index(drop=True)
    coupons, channels = read_offer(engine)
    with session_scope(engine) as session:
        # Consent as of the campaign's time: an opt-out dated before it excludes the customer even
        # when an older opt-in arrived later, and an opt-in dated after it does not count yet.
        consented = q.consent_as_of(session, as_of)
        cooldown = q.customers_on_cooldown(session, as_of - timedelta(days=cfg.cooldown_days), until=as_of)
        reachable = q.reachable_customers(session)
        calibration = coupon_cost_calibration(session, cfg, before=as_of)
    if model_uri is None:
        # Cold start: every live coupon x channel is an arm, scored with a flat prior (only used
        # for expected costs); the exploration share grows to use the budget.
        scorer = PriorScorer(coupons, channels)
    else:
        scorer = registry.load_uplift_model(model_uri, tracking_uri=settings.resolved_tracking_uri)
    scores = scorer.score_arrays(feats, chunk_size=cfg.score_chunk_size)
    model_arms = list(scorer.arms)
    ids = feats["customer_id"].to_numpy()
    _validate_scores(ids, scores, model_arms, f"model scores of {model_uri or 'the cold-start prior'}", as_of)
    catalog = build_catalog(model_arms, coupons, channels, as_of)
    value, cost, uplift, basket, base_rate = _priced(scores, model_arms, catalog, cfg, objective, calibration)
    n, k = value.shape
    eligible = np.zeros((n, k), dtype=bool)
    # Hashed membership (pandas), not np.isin: on string ids that sorts both sides every call.
    customers = pd.Index(ids)
    # Consent to the channel and a contact on it: budget is never spent on a message that cannot go out.
    open_on = {
        h: customers.isin(consented.get(h, set()) & reachable.get(h, set())) for h in catalog.channels
    }
    for j, arm in enumerate(catalog.arms):
        eligible[:, j] = open_on[arm.split("@")[1]]
    eligible &= basket >= catalog.min_basket[None, :]
    if cooldown:
        eligible &= ~customers.isin(cooldown)[:, None]
    challenger = None
    if model_uri is not None and challenger_uri is not None and cfg.challenger_share > 0:
        challenger = _score_challenger(
            feats, catalog, settings, uri=challenger_uri, version=challenger_version or challenger_uri,
            objective=objective, calibration=calibration, as_of=as_of,
        )  # fmt: skip
    return ScoredPopulation(
        ids=ids, catalog=catalog, value=value, cost=cost, uplift=uplift, eligible=eligible,
        base_rate=base_rate, features=feats, scorer=scorer if model_uri is not None else None,
        calibration=calibration, challenger=challenger,
    )  # fmt: skip


def _priced(  # noqa: ANN202
    scores: dict[str, np.ndarray], arms: list[str], catalog: ArmCatalog, cfg: CampaignSettings,
    objective: str, calibration: CostCalibration,
):  # fmt: skip
    """A version's scores as option economics (:func:`option_economics`) plus its control conversion."""
    value, cost, uplift, basket = option_economics(
        scores["p_conv"], scores["revenue"], arms, catalog, objective=objective, margin=cfg.margin,
        p_redeem=priced_redemptions(scores, cfg), calibration=calibration,
    )  # fmt: skip
    return value, cost, uplift, basket, scores["p_conv"][:, arms.index(CONTROL)].astype(np.float32)


def _score_challenger(  # noqa: ANN001
    feats: pd.DataFrame,
    catalog: ArmCatalog,
    settings: Settings,
    *,
    uri: str,
    version: str,
    objective: str,
    calibration: CostCalibration,
    as_of: datetime,
) -> ChallengerScores | None:
    """Score the live challenger on the champion's options (same customers, same catalog).

    Returns None (no live split) when the challenger does not score every option on offer.
    """
    cfg = settings.campaign
    scorer = registry.load_uplift_model(uri, tracking_uri=settings.resolved_tracking_uri)
    arms = list(scorer.arms)
    missing = sorted(set(catalog.arms) - set(arms))
    if missing or CONTROL not in arms:
        # A version of another log or offer cannot stand in for the champion on these options.
        log.warning("live challenger %s does not score the options %s on offer: no live split", uri,
                    missing or [CONTROL])  # fmt: skip
        return None
    scores = scorer.score_arrays(feats, chunk_size=cfg.score_chunk_size)
    ids = feats["customer_id"].to_numpy()
    _validate_scores(ids, scores, arms, f"model scores of live challenger {uri}", as_of)
    value, cost, uplift, _, base_rate = _priced(scores, arms, catalog, cfg, objective, calibration)
    return ChallengerScores(str(version), uri, value, cost, uplift, base_rate, scorer=scorer)


@dataclass(frozen=True)
class GroupShares:
    """The campaign's random control and exploration shares and how they were sized."""

    control: float
    exploration: float
    sizing: dict


#: Two-sided 95% normal quantile of the measured increment's interval.
Z_95 = 1.959964


def size_groups(
    pop: ScoredPopulation, cfg: CampaignSettings, *, budget: float, has_model: bool
) -> GroupShares:
    """Size the control group and the exploration share by what measurement needs.

    * **Exploration** (with a model): ``exploration_rows_per_arm`` random rows for every option on
      offer, as a share of the reachable customers, at most ``exploration_share``. With a cold
      start there is no model to explore around: exploration spends the whole budget (see
      :func:`_plan`).
    * **Control**: the smallest share, within ``[min_control_share, control_share]``, at which
      the campaign's measured increment on the customers the model targets (treated model-group
      customers against control customers the model would have treated) has a 95% interval no
      wider than ``control_ci_target`` times the increment the model expects. The model's own
      predictions for its choices give the expected increment and the outcome variances:
      ``half = z * sqrt(n_t * var_t + n_t**2 * var_c / (c * N))`` with ``N`` targeted
      customers, ``n_t = (1 - c - e) N`` of them treated. When the target cannot be met (the
      expected effect is too small for this population) the share is ``control_share``.

    ``control_ci_target=None`` or ``exploration_rows_per_arm=None`` keep the fixed shares.
    The shares are fixed before anyone is drawn, so every logged propensity stays exact.
    """
    c_max, e_max = cfg.control_share, cfg.exploration_share
    sizing: dict = {"control_rule": "fixed", "exploration_rule": "fixed"}
    if not has_model:
        return GroupShares(c_max, e_max, sizing)
    reachable = pop.eligible.any(axis=1)
    explore = e_max
    if cfg.exploration_rows_per_arm is not None and reachable.any():
        offered = int(pop.eligible.any(axis=0).sum())
        explore = min(e_max, cfg.exploration_rows_per_arm * offered / int(reachable.sum()))
        sizing.update(exploration_rule="rows per arm", exploration_rows_per_arm=cfg.exploration_rows_per_arm,
                      options_offered=offered)  # fmt: skip
    control = c_max
    if cfg.control_ci_target is not None:
        catalog = pop.catalog
        problem = AllocationProblem(
            value=pop.value, cost=pop.cost, eligible=pop.eligible,
            option_coupon=catalog.option_coupon, option_channel=catalog.option_channel,
            budget=float(budget), coupon_capacity=catalog.coupon_capacity.astype(float),
            channel_capacity=catalog.channel_capacity.astype(float),
        )  # fmt: skip
        choice = solve_lagrangian(problem).choice
        rows = np.flatnonzero(choice >= 0)
        sizing["control_rule"] = "ci target"
        sizing["control_ci_target"] = cfg.control_ci_target
        if len(rows):
            p0 = np.clip(pop.base_rate[rows].astype(float), 0.0, 1.0)
            p1 = np.clip(p0 + pop.uplift[rows, choice[rows]].astype(float), 0.0, 1.0)
            n_target, effect = len(rows), float(np.mean(p1 - p0))
            var_t, var_c = float(np.mean(p1 * (1 - p1))), float(np.mean(p0 * (1 - p0)))
            treated = (1 - c_max - explore) * n_target
            room = (cfg.control_ci_target * effect / Z_95) ** 2 - var_t / max(treated, 1.0)
            needed = var_c / (n_target * room) if effect > 0 and room > 0 else c_max
            control = float(np.clip(needed, cfg.min_control_share, c_max))
            sizing.update(
                targeted=n_target, expected_effect=round(effect, 6),
                needed_control_share=round(float(needed), 6) if np.isfinite(needed) else None,
            )  # fmt: skip
    return GroupShares(round(control, 6), round(float(explore), 6), sizing)


def _plan(engine, settings, *, campaign_id, as_of, model_uri, budget, objective, now, population,  # noqa: ANN001, ANN202
          challenger=(None, None)):  # fmt: skip
    cfg = settings.campaign
    started = time.perf_counter()
    if population is None:
        population = score_population(
            engine, settings, as_of=as_of, model_uri=model_uri, objective=objective,
            challenger_uri=challenger[0], challenger_version=challenger[1],
        )  # fmt: skip
    live = population.challenger if model_uri is not None else None
    share = float(cfg.challenger_share) if live is not None else 0.0
    # Each customer's slot: which version's scores the model policy uses for them.
    slot = live_split(campaign_id, population.ids, share)
    pop = blend(population, slot)
    ids, catalog, value, cost, uplift, eligible = (
        pop.ids,
        pop.catalog,
        pop.value,
        pop.cost,
        pop.uplift,
        pop.eligible,
    )
    n = len(ids)
    n_elig = eligible.sum(axis=1)
    shares = size_groups(pop, cfg, budget=budget, has_model=model_uri is not None)
    control_share, explore_share = shares.control, shares.exploration
    if model_uri is None:
        mean_cost = (
            float(np.mean(np.where(eligible, cost, 0).sum(axis=1)[n_elig > 0] / n_elig[n_elig > 0]))
            if (n_elig > 0).any()
            else 0.0
        )
        reach = max(int((n_elig > 0).sum()), 1)
        explore_share = (
            min(1.0 - control_share, budget / (mean_cost * reach)) if mean_cost > 0 else 1 - control_share
        )
    u = uniform_draws(campaign_id, ids, "group")
    group = np.where(
        u < control_share, "control", np.where(u < control_share + explore_share, "explore", "model")
    )

    # Exploration draws first: its spend and capacity come off what the optimiser may use.
    pick = np.floor(uniform_draws(campaign_id, ids, "explore") * np.maximum(n_elig, 1)).astype(int)
    explore_choice = np.full(n, -1)
    explore_block = np.full(n, "", dtype=object)
    coupon_left = catalog.coupon_capacity.astype(float).copy()
    channel_left = catalog.channel_capacity.astype(float).copy()
    for i in np.flatnonzero((group == "explore") & (n_elig > 0)):
        j = np.flatnonzero(eligible[i])[pick[i]]
        c_idx, h_idx = catalog.option_coupon[j], catalog.option_channel[j]
        # Inventory and channel capacity bind exploration too; a customer drawn for a sold-out
        # coupon gets nothing (rare; their logged propensity is then slightly overstated).
        if coupon_left[c_idx] >= 1 and channel_left[h_idx] >= 1:
            explore_choice[i] = j
            coupon_left[c_idx] -= 1
            channel_left[h_idx] -= 1
        else:
            explore_block[i] = "inventory" if coupon_left[c_idx] < 1 else "capacity"
    exp_rows = np.flatnonzero(explore_choice >= 0)
    exp_opts = explore_choice[exp_rows]
    exp_spend = float(cost[exp_rows, exp_opts].sum())
    if exp_spend > budget:
        # Exploration never overspends: drop the costliest explorations until it fits.
        order = np.argsort(-cost[exp_rows, exp_opts])
        keep = np.ones(len(exp_rows), dtype=bool)
        running = exp_spend
        for o in order:
            if running <= budget:
                break
            keep[o] = False
            running -= cost[exp_rows[o], exp_opts[o]]
        explore_choice[exp_rows[~keep]] = -1
        explore_block[exp_rows[~keep]] = "budget"
        exp_rows, exp_opts = exp_rows[keep], exp_opts[keep]
        exp_spend = float(cost[exp_rows, exp_opts].sum())
    coupon_cap = catalog.coupon_capacity - np.bincount(
        catalog.option_coupon[exp_opts], minlength=len(catalog.coupon_ids)
    )
    channel_cap = catalog.channel_capacity - np.bincount(
        catalog.option_channel[exp_opts], minlength=len(catalog.channels)
    )
    coupon_cap = np.maximum(coupon_cap, 0)
    channel_cap = np.maximum(channel_cap, 0)

    model_rows = np.flatnonzero(group == "model")
    fair = settings.fairness
    constraints: tuple = ()
    if fair.constraints and model_uri is not None:
        with session_scope(engine) as session:
            attributes = q.customer_attributes(session, fair.attributes)
        constraints = group_constraints(fair, ids, attributes)
    problem = AllocationProblem(
        value=value[model_rows],
        cost=cost[model_rows],
        eligible=eligible[model_rows] & (model_uri is not None),
        option_coupon=catalog.option_coupon,
        option_channel=catalog.option_channel,
        budget=max(budget - exp_spend, 0.0),
        coupon_capacity=coupon_cap.astype(float),
        channel_capacity=channel_cap.astype(float),
        group_constraints=subset(constraints, model_rows),
    )
    result = solve_lagrangian(problem)
    broken = check_feasible(problem, result.choice)
    if broken:
        # A solver bug, not bad input: refuse to write such a ledger.
        raise RuntimeError(f"campaign {campaign_id!r}: the allocation breaks {broken}")
    fairness_bounds = _bound_report(problem, result)
    final = np.full(n, -1)
    final[model_rows] = result.choice
    final[exp_rows] = exp_opts
    champ_choice = chal_choice = model_choice = np.full(n, -1)
    if model_uri is not None:
        # Each version's choice for every customer at the solver's prices; the model group's
        # rows keep what the solver chose for them (by their slot's version).
        prices = result.multipliers
        champ_choice = _model_choice_for_all(
            population.value, population.cost, eligible, catalog, prices, constraints
        )
        chal_choice = (
            _model_choice_for_all(live.value, live.cost, eligible, catalog, prices, constraints)
            if share > 0
            else champ_choice
        )
        model_choice = np.where(slot, chal_choice, champ_choice)
        model_choice[model_rows] = result.choice
        champ_choice = np.where(slot, champ_choice, model_choice)
        chal_choice = np.where(slot, model_choice, chal_choice)

    c, e = control_share, explore_share
    rows = []
    arms_out = []
    for i, cid in enumerate(ids):
        j = final[i]
        arm = catalog.arms[j] if j >= 0 else CONTROL
        # Marginal probability of the received arm under the control/explore/model mixture.
        p_explore = (1.0 / n_elig[i] if j >= 0 else 0.0) if n_elig[i] > 0 else (1.0 if j < 0 else 0.0)
        # The model policy is the champion, or the mixture with the live challenger's share.
        p_model = (1.0 - share) * (champ_choice[i] == j) + share * (chal_choice[i] == j)
        p_control = 1.0 if j < 0 else 0.0
        prop = c * p_control + e * p_explore + (1 - c - e) * p_model
        policy = group[i]
        arms_out.append(arm)
        rows.append(
            dict(
                campaign_id=campaign_id,
                customer_id=str(cid),
                arm=arm,
                coupon_id=catalog.arms[j].split("@")[0] if j >= 0 else None,
                channel=catalog.arms[j].split("@")[1] if j >= 0 else None,
                policy=policy,
                propensity=float(max(prop, 1e-6)),
                model_arm=catalog.arms[model_choice[i]] if model_choice[i] >= 0 else CONTROL,
                expected_cost=float(cost[i, j]) if j >= 0 else 0.0,
                expected_value=float(value[i, j]) if j >= 0 else 0.0,
                expected_uplift=float(uplift[i, j]) if j >= 0 else 0.0,
                created_at=now,
            )
        )
    reasons, reason_stats = _reasons(
        engine, settings, pop, as_of=as_of, campaign_id=campaign_id, now=now, objective=objective,
        model_uri=model_uri, group=group, final=final, result=result, constraints=constraints, shares=(c, e),
        explore_block=explore_block, model_budget=problem.budget, coupon_cap=coupon_cap,
        channel_cap=channel_cap, slot=slot,
    )  # fmt: skip
    treated = final >= 0
    spend = float(sum(r["expected_cost"] for r in rows))
    issued = pd.Series([r["coupon_id"] for r in rows if r["coupon_id"]]).value_counts().to_dict()
    per_arm = pd.DataFrame({"arm": arms_out, "policy": group}).groupby(["arm", "policy"]).size()
    summary = {
        "campaign_id": campaign_id,
        "as_of": pd.Timestamp(as_of).isoformat(),
        "population": int(n),
        "treated": int(treated.sum()),
        "control_group": int((group == "control").sum()),
        "explored": int(len(exp_rows)),
        "control_share": control_share,
        "exploration_share": round(float(explore_share), 6),
        "group_sizing": shares.sizing,
        "budget": budget,
        "cost_calibration": pop.calibration.as_dict(),
        "spend": round(spend, 4),
        "objective": objective,
        "expected_objective": round(float(sum(r["expected_value"] for r in rows)), 4),
        "expected_incremental_conversions": round(float(sum(r["expected_uplift"] for r in rows)), 4),
        "allocated": {f"{a}|{p}": int(v) for (a, p), v in per_arm.items() if a != CONTROL},
        "solver_gap": float(result.gap),
        "fairness_constraints": fairness_bounds,
        "solver_seconds": float(result.seconds),
        "reasons": reason_stats,
        "seconds": round(time.perf_counter() - started, 3),
    }
    if share > 0:
        summary["live_comparison"] = _live_summary(
            live, share, slot, model_rows, final, champ_choice, chal_choice
        )
    return summary, rows, reasons, spend, issued


def _live_summary(  # noqa: ANN001
    live: ChallengerScores, share, slot, model_rows, final, champ_choice, chal_choice
) -> dict:
    """What the live comparison of a campaign holds: its share, rows and disagreements per version."""
    mine = slot[model_rows]
    treated = final[model_rows] >= 0
    return {
        "challenger_version": live.version,
        "challenger_share": share,
        "model_rows": {"champion": int((~mine).sum()), "challenger": int(mine.sum())},
        "treated": {"champion": int((treated & ~mine).sum()), "challenger": int((treated & mine).sum())},
        # Model-group customers for whom the two versions choose different arms: the rows that
        # tell them apart, each logged with a propensity near the share of the version it got.
        "disagreements": int((champ_choice[model_rows] != chal_choice[model_rows]).sum()),
    }


def _reasons(  # noqa: ANN202
    engine, settings, pop, *, as_of, campaign_id, now, objective, model_uri, group, final, result,  # noqa: ANN001
    constraints, shares, explore_block, model_budget, coupon_cap, channel_cap, slot,  # noqa: ANN001
):  # fmt: skip
    """Explain every row of the plan (see :mod:`mlpkg.allocation.reasons`); return rows and timings.

    ``pop`` is the blended population (:func:`blend`): each row is explained, and its uplift
    attributed, by the version that scored it.
    """
    started = time.perf_counter()
    cfg = settings.campaign
    catalog = pop.catalog
    chosen = np.flatnonzero(result.choice >= 0)
    opts = result.choice[chosen]
    state = PlanState(
        ids=pop.ids, arms=catalog.arms, option_coupon=catalog.option_coupon,
        option_channel=catalog.option_channel, coupon_ids=catalog.coupon_ids, channels=catalog.channels,
        value=pop.value, cost=pop.cost, eligible=pop.eligible, group=group, final=final,
        multipliers=result.multipliers if model_uri is not None else None, group_constraints=constraints,
        control_share=shares[0], explore_share=shares[1], explore_block=explore_block,
        budget_left=float(model_budget - result.spend),
        coupon_left=coupon_cap - np.bincount(catalog.option_coupon[opts], minlength=len(catalog.coupon_ids)),
        channel_left=channel_cap - np.bincount(catalog.option_channel[opts], minlength=len(catalog.channels)),
        objective=objective,
    )  # fmt: skip
    with session_scope(engine) as session:
        consented = q.consent_as_of(session, as_of)
        cooldown = q.customers_on_cooldown(session, as_of - timedelta(days=cfg.cooldown_days), until=as_of)
        reachable = q.reachable_customers(session)
    eligibility = eligibility_causes(
        pop.ids, catalog.channels, pop.eligible, consented=consented, reachable=reachable, cooldown=cooldown,
        cooldown_days=cfg.cooldown_days, has_options=bool(catalog.arms),
    )  # fmt: skip
    reasons = explain_rows(state, eligibility)
    if pop.challenger is not None and slot.any():
        share, version = cfg.challenger_share, pop.challenger.version
        mine = {"constraint": "live_comparison", "detail": f"scored by live challenger v{version}, which "
                f"scores {share:.0%} of the customers (a hash of customer and campaign draws them)"}
        theirs = {"constraint": "live_comparison", "detail": f"scored by the champion; live challenger "
                  f"v{version} scores {share:.0%} of the customers"}  # fmt: skip
        for r, drawn in zip(reasons, slot, strict=True):
            r["constraints"].append(dict(mine if drawn else theirs))
    decided = time.perf_counter()
    scorer, features = pop.scorer, pop.features
    if model_uri is not None and scorer is None:
        # Merged scoring shards carry scores only: load the model and the inputs again.
        scorer = registry.load_uplift_model(model_uri, tracking_uri=settings.resolved_tracking_uri)
    if model_uri is not None and features is None and hasattr(scorer, "attribute_uplift"):
        feats = customer_features(engine, as_of, list(map(str, pop.ids)))
        features = feats.set_index("customer_id").reindex(pd.Index(pop.ids, dtype=object).astype(str))
        features = features.reset_index()
    only = (
        decisive_rows(reasons, state) if cfg.attribution_rows == "decisive" else np.ones(len(pop.ids), bool)
    )
    features = features if model_uri is not None else None
    stats = attach_attributions(reasons, state, scorer, features, only=only & ~slot)
    live = pop.challenger
    if features is not None and live is not None and slot.any():
        live_scorer = live.scorer or registry.load_uplift_model(
            live.model_uri, tracking_uri=settings.resolved_tracking_uri
        )
        more = attach_attributions(reasons, state, live_scorer, features, only=only & slot)
        stats = {
            "method": stats["method"] or more["method"],
            "rows": stats["rows"] + more["rows"],
            "seconds": round(stats["seconds"] + more["seconds"], 3),
        }
    records = reason_records(reasons, state, campaign_id=campaign_id, now=now)
    counts = pd.Series([r["binding"] for r in records], dtype=object).value_counts().to_dict()
    return records, {
        "attribution_method": stats["method"], "attributed_rows": stats["rows"],
        "attribution_seconds": stats["seconds"], "decision_seconds": round(decided - started, 3),
        "seconds": round(time.perf_counter() - started, 3),
        "by_binding": {k: int(v) for k, v in counts.items()},
    }  # fmt: skip


def _bound_report(problem: AllocationProblem, result) -> list[dict]:  # noqa: ANN001 - AllocationResult
    """Describe each group bound of the model policy's allocation: the share reached and its price."""
    rows = np.flatnonzero(result.choice >= 0)
    costs = problem.cost[rows, result.choice[rows]].astype(np.float64)
    prices = np.asarray(result.multipliers.get("group", np.zeros(len(problem.group_constraints))))
    out = []
    for g, price in zip(problem.group_constraints, prices, strict=True):
        member = g.member[rows]
        if g.measure == "treated":
            part, whole = member.sum(), len(rows)
        else:
            part, whole = costs[member].sum(), costs.sum()
        out.append({
            "constraint": g.label, "bound": g.bound, "measure": g.measure, "share": g.share,
            "achieved": round(float(part / whole), 6) if whole else None, "price": round(float(price), 6),
        })  # fmt: skip
    return out
