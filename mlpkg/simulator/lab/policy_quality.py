"""How close does a targeting policy come to the oracle? Scored against the simulator's truth.

Lab code, beside the simulator: it may read the simulated shop's hidden truth and imports the
product to do so (the product never imports it). Every
policy here is turned into an allocation by the same allocator the product uses
(:func:`mlpkg.allocation.campaign.option_economics` and
:func:`mlpkg.allocation.solver.solve_lagrangian`, under one budget, the coupons' inventory and
the channels' capacity), so only the per-arm scores differ between policies. Each allocation is
then valued exactly with :meth:`mlpkg.simulator.Shop.oracle_value`: expected incremental
conversions against sending nothing, with no sampling noise.

Policies compared by :func:`evaluate_policies`:

* ``network``: the multi-arm uplift network, trained by the product's own
  :func:`mlpkg.train.train_uplift_model` on the shop's past randomized campaign.
* ``tlearner``: the gradient-boosted T-learner baseline (:func:`mlpkg.models.baseline.fit_t_learner`)
  on the same training rows.
* ``response``: a response model: the network's P(conversion | arm) is used as the value of each
  option instead of the uplift, i.e. "target who is most likely to buy with a coupon".
* ``random``: a uniformly random deliverable arm for customers taken in random order until the
  budget (or a cap) is used up.
* ``noisy_oracle``: the oracle's scores with Gaussian noise added to every treatment arm's
  conversion probability, as large as the network's uplift RMSE against the truth (a reference: what
  the network's error level alone would cost).
* ``oracle``: the allocator run on the true conversion probabilities and basket values.

Share of oracle = the policy's true incremental conversions / the oracle's.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mlpkg.allocation.campaign import ArmCatalog, build_catalog, option_economics
from mlpkg.allocation.cost_calibration import UNCALIBRATED, CostCalibration
from mlpkg.allocation.solver import AllocationProblem, solve_lagrangian
from mlpkg.config import Settings
from mlpkg.evaluation.uplift_metrics import consent_eligibility, multi_arm_qini, qini_coefficient
from mlpkg.features import CATEGORICAL_FEATURES, NUMERIC_FEATURES, build_features
from mlpkg.models.baseline import fit_t_learner
from mlpkg.registry import score_with_model
from mlpkg.simulator import CONTROL, Shop
from mlpkg.train import train_uplift_model

#: Gross margin used when an objective or the oracle's profit needs one (the settings' default).
DEFAULT_MARGIN = 0.35
#: Default budget: enough to give a quarter of the population its truly best arm.
DEFAULT_TREAT_SHARE = 0.25
POLICIES = ("network", "tlearner", "response", "random", "noisy_oracle", "oracle")
#: Objectives of :func:`allocate_by_scores`: the product's three plus ``response`` (value = P(conv | arm)).
OBJECTIVES = ("conversions", "revenue", "profit", "response")


# --- data ------------------------------------------------------------------------------------------


def read_shop_history(shop: Shop, out_dir: Path | None = None) -> dict[str, pd.DataFrame]:
    """Export the shop's raw history once and read it back as the product would see it.

    The shop writes its ``initial`` batch (everything from its opening up to ``shop.now`` for a
    shop not exported before), so features built from these frames are exactly what the product
    would compute from the same files.

    Args:
        shop: The simulated shop.
        out_dir: Folder for the raw files; a temporary folder (removed afterwards) when ``None``.

    Returns:
        ``customers``, ``consent``, ``events`` (``customer_id``, ``ts``, ``event_type``) and
        ``orders`` frames.
    """
    if out_dir is None:
        with tempfile.TemporaryDirectory(prefix="shop-history-") as tmp:
            return read_shop_history(shop, Path(tmp))
    paths = shop.export_batch(Path(out_dir), batch="initial")
    return {
        "customers": pd.read_csv(paths["customers"], dtype={"customer_id": str}),
        "consent": pd.read_csv(paths["consent"], dtype={"customer_id": str}),
        # Only the columns the features read: 200k customers have millions of events.
        "events": pd.read_parquet(paths["events"], columns=["customer_id", "ts", "event_type"]),
        "orders": pd.read_csv(
            paths["orders"], dtype={"customer_id": str, "coupon_id": str}, keep_default_na=False
        ).astype({"revenue": float}),
    }


def _features(
    history: Mapping[str, pd.DataFrame], as_of: pd.Timestamp, customer_ids: Sequence[str] | None = None
) -> pd.DataFrame:
    tables = dict(history)
    if customer_ids is not None:
        # Building features for a sample is much cheaper once the big tables are cut down to it.
        wanted = pd.Index(np.asarray(customer_ids, dtype=object))
        tables = {k: v[v["customer_id"].isin(wanted)] for k, v in tables.items()}
        customers = tables["customers"].set_index("customer_id").loc[wanted].reset_index()
        tables["customers"] = customers
    return build_features(
        tables["customers"], tables["events"], tables["orders"], as_of, consent=tables["consent"]
    )


def training_frame_from_shop(shop: Shop, history: Mapping[str, pd.DataFrame] | None = None) -> pd.DataFrame:
    """Join the shop's past randomized campaign with point-in-time features at its send time.

    Args:
        shop: The simulated shop.
        history: Frames from :func:`read_shop_history` (exported on the fly when ``None``).

    Returns:
        The model input frame of the shared contracts: ``customer_id``, :data:`NUMERIC_FEATURES`,
        :data:`CATEGORICAL_FEATURES`, ``arm``, ``converted``, ``revenue`` and ``propensity``, one
        row per campaign customer in the log's order.
    """
    history = read_shop_history(shop) if history is None else history
    log = shop.past_campaign()
    feats = _features(history, shop.campaign_sent_at, log["customer_id"].tolist())
    labels = log[["customer_id", "arm", "converted", "revenue", "propensity"]]
    frame = feats.merge(labels, on="customer_id", how="inner", validate="one_to_one")
    return frame.astype({"converted": np.int64, "revenue": np.float64, "propensity": np.float64})


def eval_population(
    shop: Shop,
    n: int | None,
    seed: int,
    *,
    candidates: Sequence[str] | None = None,
    history: Mapping[str, pd.DataFrame] | None = None,
) -> pd.DataFrame:
    """Draw an evaluation population and build its features as of ``shop.now``.

    Which customers: a seeded sample of ``n`` from ``candidates`` when given (for instance the
    customers of a model's held-out test split, whom no model was trained on); otherwise from
    the customers who were not in the past campaign, or from every customer when the campaign
    reached them all. Their features are those the product would compute at ``shop.now``, when
    the next campaign is planned (so they include the past campaign's outcome orders, as in
    production).

    Args:
        shop: The simulated shop.
        n: Customers to draw; ``None`` (or more than there are) takes them all.
        seed: Seed of the sample.
        candidates: Customer ids to draw from.
        history: Frames from :func:`read_shop_history` (exported on the fly when ``None``).

    Returns:
        ``customer_id``, :data:`NUMERIC_FEATURES` and :data:`CATEGORICAL_FEATURES`, sorted by id.
    """
    if candidates is None:
        in_campaign = set(shop.past_campaign()["customer_id"])
        pool = [c for c in shop.customer_ids if c not in in_campaign] or shop.customer_ids
    else:
        pool = list(dict.fromkeys(str(c) for c in candidates))
    pool_arr = np.sort(np.asarray(pool, dtype=object))
    if n is not None and n < len(pool_arr):
        rng = np.random.default_rng([int(seed), 11])
        pool_arr = np.sort(rng.choice(pool_arr, size=int(n), replace=False))
    history = read_shop_history(shop) if history is None else history
    feats = _features(history, shop.now, pool_arr.tolist())
    return feats.sort_values("customer_id", kind="stable").reset_index(drop=True)


# --- allocation ------------------------------------------------------------------------------------


def shop_catalog(
    shop: Shop, model_arms: Sequence[str], n_customers: int, coupon_stock: Mapping[str, float] | None = None
) -> ArmCatalog:
    """Build the product's arm catalog from the shop's coupons and channels.

    Coupon inventory and channel capacity are the shop's shares applied to ``n_customers`` (the
    population being allocated), the way the shop's own export scales them to its customers.

    Args:
        shop: The simulated shop.
        model_arms: Arm names of the scores, ``control`` included.
        n_customers: Size of the population being allocated.
        coupon_stock: Coupons left per coupon id, when the allocation must face the stock a
            campaign of the product faced (coupons issued by earlier campaigns are gone).

    Returns:
        The catalog of the arms that exist in the shop.
    """
    cfg = shop.config
    as_of = shop.now
    coupons = pd.DataFrame(
        {
            "coupon_id": [c.coupon_id for c in cfg.coupons],
            "kind": [c.kind for c in cfg.coupons],
            "face_value": [float(c.face_value) for c in cfg.coupons],
            "min_basket": [float(c.min_basket) for c in cfg.coupons],
            "inventory": [
                coupon_stock.get(c.coupon_id, 0) if coupon_stock is not None
                else max(1, round(c.inventory_share * n_customers))
                for c in cfg.coupons
            ],
            "issued": 0,
            "valid_from": as_of - pd.Timedelta(days=1),
            "valid_to": as_of + pd.Timedelta(days=30),
        }
    )
    channels = pd.DataFrame(
        {
            "channel": [c.channel for c in cfg.channels],
            "send_cost": [float(c.send_cost) for c in cfg.channels],
            "daily_capacity": [max(1, round(c.capacity_share * n_customers)) for c in cfg.channels],
        }
    )
    return build_catalog(list(model_arms), coupons, channels, as_of.to_pydatetime())


def _eligibility(shop: Shop, customer_ids: Sequence[str], catalog: ArmCatalog) -> np.ndarray:
    deliverable = shop.deliverable(customer_ids)
    column = {name: j for j, name in enumerate(shop.arm_names[1:])}
    return np.ascontiguousarray(deliverable[:, [column[a] for a in catalog.arms]])


def _allocation_frame(customer_ids: Sequence[str], catalog: ArmCatalog, choice: np.ndarray) -> pd.DataFrame:
    names = np.asarray([*catalog.arms, CONTROL], dtype=object)
    # choice -1 (nothing) indexes the trailing "control".
    return pd.DataFrame({"customer_id": np.asarray(customer_ids, dtype=object), "arm": names[choice]})


def allocate_by_scores(
    customer_ids: Sequence[str],
    p_conv: np.ndarray,
    revenue: np.ndarray,
    arms: Sequence[str],
    shop: Shop,
    budget: float,
    objective: str = "conversions",
    *,
    margin: float = DEFAULT_MARGIN,
    p_redeem: np.ndarray | None = None,
    redeemed_basket: np.ndarray | None = None,
    coupon_stock: Mapping[str, float] | None = None,
    calibration: CostCalibration = UNCALIBRATED,
) -> pd.DataFrame:
    """Allocate arms from per-arm scores with the product's economics and solver.

    Value and cost come from :func:`~mlpkg.allocation.campaign.option_economics` (cost = coupon
    face cost times the predicted treated conversion, plus the send cost); a customer may get
    an arm only through a channel they consented to (``shop.deliverable``); coupon inventory and
    channel capacity come from :func:`shop_catalog`.

    Args:
        customer_ids: Customers, one per score row.
        p_conv: ``[n, A]`` P(conversion | arm), columns in ``arms`` order.
        revenue: ``[n, A]`` E[order value | converted, arm].
        arms: Arm names, ``control`` included.
        shop: The simulated shop (consent, coupons, channels).
        budget: Cap on the summed expected cost.
        objective: ``conversions``, ``revenue`` or ``profit`` (the product's), or ``response``:
            the option's value is its P(conversion | arm) rather than its uplift.
        margin: Gross margin for the ``profit`` objective.
        p_redeem: ``[n, A]`` P(coupon redeemed | arm), as a model with a redemption model
            scores it or as the truth gives it; None charges the coupon on every treated conversion.
        redeemed_basket: ``[n, A]`` order value a percentage coupon is redeemed on (None: ``revenue``).
        coupon_stock: Coupons left per coupon id (None: the shop's share of the customers).
        calibration: The product's calibration of expected coupon costs on realised ones.

    Returns:
        ``customer_id`` and ``arm`` (``control`` = nothing sent) for every customer.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    arms = [str(a) for a in arms]
    p_conv, revenue = np.asarray(p_conv), np.asarray(revenue)
    if p_conv.shape != (len(customer_ids), len(arms)) or revenue.shape != p_conv.shape:
        raise ValueError(
            f"p_conv and revenue must be [{len(customer_ids)}, {len(arms)}], "
            f"got {p_conv.shape} and {revenue.shape}"
        )
    catalog = shop_catalog(shop, arms, len(customer_ids), coupon_stock)
    product_objective = "conversions" if objective == "response" else objective
    value, cost, _, _ = option_economics(
        p_conv, revenue, arms, catalog, objective=product_objective, margin=margin,
        p_redeem=p_redeem, redeemed_basket=redeemed_basket, calibration=calibration,
    )
    if objective == "response":
        value = np.ascontiguousarray(p_conv[:, [arms.index(a) for a in catalog.arms]], dtype=np.float32)
    problem = AllocationProblem(
        value=value,
        cost=cost,
        eligible=_eligibility(shop, customer_ids, catalog),
        option_coupon=catalog.option_coupon,
        option_channel=catalog.option_channel,
        budget=float(budget),
        coupon_capacity=catalog.coupon_capacity.astype(float),
        channel_capacity=catalog.channel_capacity.astype(float),
    )
    return _allocation_frame(customer_ids, catalog, solve_lagrangian(problem).choice)


def true_scores(shop: Shop, customer_ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Return the true ``(p_conv, revenue, arms)`` of customers, shaped like a model's scores."""
    return shop.true_conversion(customer_ids), shop.true_revenue(customer_ids), list(shop.arm_names)


def allocate_randomly(
    customer_ids: Sequence[str], shop: Shop, budget: float, seed: int, *, margin: float = DEFAULT_MARGIN
) -> pd.DataFrame:
    """Give a random deliverable arm to customers taken in random order until the budget is spent.

    Each option costs what the product's economics would charge with the true conversion
    probabilities and baskets, so the random policy spends the same kind of budget as the
    others; customers whose draw no longer fits the budget, inventory or capacity get nothing.

    Args:
        customer_ids: The population.
        shop: The simulated shop.
        budget: Cap on the summed expected cost.
        seed: Seed of the order and of the arm draws.
        margin: Gross margin (only passed through to the economics).

    Returns:
        ``customer_id`` and ``arm`` for every customer.
    """
    p_conv, revenue, arms = true_scores(shop, customer_ids)
    catalog = shop_catalog(shop, arms, len(customer_ids))
    _, cost, _, _ = option_economics(p_conv, revenue, arms, catalog, objective="conversions", margin=margin)
    eligible = _eligibility(shop, customer_ids, catalog)
    rng = np.random.default_rng([int(seed), 23])
    coupon_left = catalog.coupon_capacity.astype(float).copy()
    channel_left = catalog.channel_capacity.astype(float).copy()
    choice = np.full(len(customer_ids), -1, dtype=np.int64)
    spent = 0.0
    for i in rng.permutation(len(customer_ids)):
        options = np.flatnonzero(eligible[i])
        if not len(options):
            continue
        j = int(rng.choice(options))
        c, h = catalog.option_coupon[j], catalog.option_channel[j]
        if spent + cost[i, j] > budget or coupon_left[c] < 1 or channel_left[h] < 1:
            continue
        spent += float(cost[i, j])
        coupon_left[c] -= 1
        channel_left[h] -= 1
        choice[i] = j
    return _allocation_frame(customer_ids, catalog, choice)


def treat_share_budget(
    shop: Shop, customer_ids: Sequence[str], treat_share: float, *, margin: float = DEFAULT_MARGIN
) -> float:
    """Return a budget that pays for ``treat_share`` of the customers at their best arm's cost.

    The cost of a customer is what the product's economics charge (with the true conversion
    probabilities and baskets) for the deliverable arm with the highest true uplift; the budget
    is ``treat_share x customers x`` the mean of that cost over customers with any deliverable
    arm. Expressed this way the budget means the same thing for any population size.

    Args:
        shop: The simulated shop.
        customer_ids: The population.
        treat_share: Share of the population the budget should roughly cover, in (0, 1].
        margin: Gross margin (only passed through to the economics).

    Returns:
        The budget, in the currency of the product's expected cost.
    """
    if not 0 < treat_share <= 1:
        raise ValueError(f"treat_share must lie in (0, 1], got {treat_share}")
    p_conv, revenue, arms = true_scores(shop, customer_ids)
    catalog = shop_catalog(shop, arms, len(customer_ids))
    _, cost, uplift, _ = option_economics(
        p_conv, revenue, arms, catalog, objective="conversions", margin=margin
    )
    eligible = _eligibility(shop, customer_ids, catalog)
    reach = eligible.any(axis=1)
    best = np.argmax(np.where(eligible, uplift, -np.inf), axis=1)
    unit = float(cost[np.arange(len(best)), best][reach].mean()) if reach.any() else 0.0
    return treat_share * len(customer_ids) * unit


def noisy_truth(shop: Shop, customer_ids: Sequence[str], noise_sd: float, seed: int) -> np.ndarray:
    """Return the true P(conversion | arm) with Gaussian noise of ``noise_sd`` added to every treatment arm.

    Allocating on these scores shows how much of the oracle a model whose uplift is off by
    ``noise_sd`` (its RMSE against the truth) could get if its errors were pure noise: the
    reference for "is the model as good as its error level allows?".
    """
    p_conv = shop.true_conversion(customer_ids)
    rng = np.random.default_rng([int(seed), 31])
    p_conv[:, 1:] += rng.normal(0.0, float(noise_sd), p_conv[:, 1:].shape)
    return np.clip(p_conv, 1e-6, 1.0)


def allocation_value(
    shop: Shop, allocation: pd.DataFrame, *, margin: float = DEFAULT_MARGIN
) -> dict[str, float]:
    """Return the exact expected value of an allocation (:meth:`Shop.oracle_value`) plus true spend."""
    value = shop.oracle_value(allocation, margin=margin)
    value["true_spend"] = value["expected_coupon_cost"] + value["send_cost"]
    return value


# --- ranking metrics -------------------------------------------------------------------------------


def qini_summary(
    p_conv: np.ndarray,
    frame: pd.DataFrame,
    arms: Sequence[str],
    outcome: np.ndarray | None = None,
    eligible: np.ndarray | None = None,
) -> dict[str, float]:
    """Compute Qini coefficients of per-arm scores on logged randomized rows.

    Args:
        p_conv: ``[n, A]`` predicted P(conversion | arm) of the rows, ``arms[0]`` = control.
        frame: Logged rows with ``arm``, ``converted`` and ``propensity``.
        arms: Arm names in column order.
        outcome: Outcome per row instead of ``converted``; evaluation code may pass the true
            conversion probability of the logged arm, which removes the coin flips of the
            outcomes (the noise that dominates a Qini on a few thousand conversions).
        eligible: ``bool [n, A - 1]``, which arms each row could have been logged in (see
            :func:`~mlpkg.evaluation.uplift_metrics.consent_eligibility`); adds the
            ``qini_eligible_*`` values.

    Returns:
        ``qini_mean_arm``: :func:`~mlpkg.evaluation.uplift_metrics.multi_arm_qini` averaged over
        treatment arms, each arm's rows against every control row; ``qini_best_arm``: Qini of the
        best arm's uplift, every treated row against control. With ``eligible``:
        ``qini_eligible_mean_arm``, the same per-arm mean with control rows limited to customers
        who could have received the arm (the product's ``test/qini``; without that, control
        customers who cannot be reached on the arm's channel enter the comparison and a ranking
        by the true uplift scores lower than a model's), and ``qini_eligible_best_arm``, the best
        arm taken over each row's eligible arms.
    """
    arms = list(arms)
    if arms[0] != CONTROL:
        raise ValueError(f"arms[0] must be {CONTROL!r}")
    p_conv = np.asarray(p_conv, dtype=np.float64)
    arm_idx = frame["arm"].astype(str).map({a: i for i, a in enumerate(arms)}).to_numpy(dtype=np.int64)
    y = frame["converted"].to_numpy(dtype=np.float64) if outcome is None else np.asarray(outcome, np.float64)
    prop = frame["propensity"].to_numpy(dtype=np.float64)
    per_arm = [v for v in multi_arm_qini(p_conv, arm_idx, y, prop, arms).values() if math.isfinite(v)]
    uplift = p_conv[:, 1:] - p_conv[:, :1]
    out = {
        "qini_mean_arm": float(np.mean(per_arm)) if per_arm else math.nan,
        "qini_best_arm": qini_coefficient(uplift.max(axis=1), arm_idx > 0, y, prop),
    }
    if eligible is None:
        return out
    eligible = np.asarray(eligible, dtype=bool)
    per_arm = multi_arm_qini(p_conv, arm_idx, y, prop, arms, eligible=eligible)
    values = [v for v in per_arm.values() if math.isfinite(v)]
    reach = eligible.any(axis=1)
    best = np.where(eligible, uplift, -np.inf).max(axis=1)[reach]
    out["qini_eligible_mean_arm"] = float(np.mean(values)) if values else math.nan
    out["qini_eligible_best_arm"] = qini_coefficient(best, arm_idx[reach] > 0, y[reach], prop[reach])
    return out


def uplift_error(
    pred_uplift: np.ndarray, true_uplift: np.ndarray, deliverable: np.ndarray
) -> dict[str, float]:
    """Compare predicted with true uplift over deliverable (customer, arm) pairs.

    Returns:
        ``uplift_rmse`` and ``uplift_corr`` (Pearson) over deliverable pairs, and
        ``best_arm_corr``: Spearman correlation of the best deliverable arm's predicted and true
        uplift across customers (how well the customers are ranked).
    """
    mask = np.asarray(deliverable, dtype=bool)
    pred, true = np.asarray(pred_uplift, dtype=np.float64), np.asarray(true_uplift, dtype=np.float64)
    out = {
        "uplift_rmse": float(np.sqrt(np.mean((pred[mask] - true[mask]) ** 2))),
        "uplift_corr": float(np.corrcoef(pred[mask], true[mask])[0, 1]),
    }
    reach = mask.any(axis=1)
    best_pred = np.where(mask, pred, -np.inf).max(axis=1)[reach]
    best_true = np.where(mask, true, -np.inf).max(axis=1)[reach]
    out["best_arm_corr"] = float(pd.Series(best_pred).corr(pd.Series(best_true), method="spearman"))
    return out


# --- the whole comparison --------------------------------------------------------------------------


def _arm_mean_revenue(frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
    """Mean order value of converted training rows per arm (overall mean for an arm without any)."""
    paid = frame[(frame["converted"] > 0) & (frame["revenue"] > 0)]
    overall = float(paid["revenue"].mean()) if len(paid) else 1.0
    by_arm = paid.groupby("arm")["revenue"].mean()
    return np.array([float(by_arm.get(a, overall)) for a in arms])


def evaluate_policies(
    shop: Shop,
    settings: Settings,
    work_dir: Path,
    *,
    treat_share: float = DEFAULT_TREAT_SHARE,
    eval_size: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
    tlearner_params: Mapping[str, Any] | None = None,
    margin: float = DEFAULT_MARGIN,
) -> dict[str, Any]:
    """Train the network and the T-learner on the shop's past campaign and value every policy.

    Steps: export the shop's history once; build the training frame; train the network with
    :func:`mlpkg.train.train_uplift_model` (MLflow store under ``work_dir``, nothing registered);
    fit the T-learner on the network's training and validation rows (never its test split);
    compute both models' Qini on the test split; draw the evaluation population from the test
    split's customers with features as of ``shop.now`` (customers no model was trained on); and
    allocate it with every policy under the budget of :func:`treat_share_budget`.

    Args:
        shop: A simulated shop (not exported before).
        settings: Settings whose ``trainer`` configures the network (and ``state_dir`` holds
            checkpoints).
        work_dir: Folder for the raw files and the MLflow store.
        treat_share: Share of the population the budget covers (see :func:`treat_share_budget`).
        eval_size: Customers in the evaluation population (default: the whole test split).
        seed: Seed of the T-learner, the population sample and the random policy.
        n_threads: OpenMP threads of the T-learner (``None`` = all cores).
        tlearner_params: Overrides of the T-learner's boosting parameters.
        margin: Gross margin for the economics and the oracle's profit.

    Returns:
        A flat summary: per policy ``{policy}_incremental_conversions``, ``{policy}_share``
        (of the oracle), ``{policy}_treated``, ``{policy}_true_spend``; Qini of both models
        (and of the true uplift) on the test split, on the logged outcomes and (``*_expected_*``)
        on the true conversion probability of the logged arm; uplift error against the truth on the
        evaluation population; timings and sizes.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    out: dict[str, Any] = {"seed": seed, "world_seed": shop.config.seed}
    started = time.perf_counter()
    history = read_shop_history(shop, work_dir / "raw")
    frame = training_frame_from_shop(shop, history)
    out["data_seconds"] = time.perf_counter() - started
    out["n_training_rows"] = len(frame)

    tracking_uri = f"sqlite:///{work_dir / 'mlflow.db'}"
    started = time.perf_counter()
    result = train_uplift_model(
        frame,
        NUMERIC_FEATURES,
        CATEGORICAL_FEATURES,
        list(shop.arm_names),
        settings=settings,
        tracking_uri=tracking_uri,
        experiment="policy-quality",
        run_name=f"world-{shop.config.seed}",
        registered_model_name=None,
    )
    out["network_train_seconds"] = time.perf_counter() - started
    out["network_val_loss"] = result.metrics.get("val/loss_best", math.nan)
    arms = list(result.arms)
    test = result.test_frame
    fit_rows = frame[~frame["customer_id"].isin(set(test["customer_id"]))]
    started = time.perf_counter()
    learner = fit_t_learner(
        fit_rows,
        NUMERIC_FEATURES,
        CATEGORICAL_FEATURES,
        arms,
        seed=seed,
        params=dict(tlearner_params or {}),
        n_threads=n_threads,
    )
    out["tlearner_train_seconds"] = time.perf_counter() - started

    net_test = score_with_model(result.model_uri, test, tracking_uri=tracking_uri)["p_conv"]
    true_test = shop.true_conversion(test["customer_id"].tolist())
    true_test = true_test[:, [shop.arm_names.index(a) for a in arms]]
    logged = test["arm"].map({a: i for i, a in enumerate(arms)}).to_numpy(dtype=np.int64)
    expected = true_test[np.arange(len(test)), logged]
    eligible = consent_eligibility(test, arms)
    for name, p in (
        ("network", net_test),
        ("tlearner", learner.predict_proba_arms(test)),
        ("truth", true_test),
    ):
        p = np.asarray(p, np.float64)
        out.update({f"{name}_{k}": v for k, v in qini_summary(p, test, arms, eligible=eligible).items()})
        expected_qini = qini_summary(p, test, arms, outcome=expected, eligible=eligible)
        out.update({f"{name}_expected_{k}": v for k, v in expected_qini.items()})

    population = eval_population(
        shop, eval_size, seed, candidates=test["customer_id"].tolist(), history=history
    )
    ids = population["customer_id"].tolist()
    budget = treat_share_budget(shop, ids, treat_share, margin=margin)
    out.update({"n_eval": len(ids), "budget": budget, "budget_per_customer": budget / len(ids)})
    net = score_with_model(result.model_uri, population, tracking_uri=tracking_uri)
    p_tl = learner.predict_proba_arms(population)
    rev_tl = np.broadcast_to(_arm_mean_revenue(fit_rows, arms), p_tl.shape)
    p_true, rev_true, true_arms = true_scores(shop, ids)

    true_uplift = shop.true_uplift(ids)[:, [shop.arm_names.index(a) - 1 for a in arms[1:]]]
    deliverable = shop.deliverable(ids)[:, [shop.arm_names.index(a) - 1 for a in arms[1:]]]
    for name, p in (("network", net["p_conv"]), ("tlearner", p_tl)):
        err = uplift_error(p[:, 1:] - p[:, :1], true_uplift, deliverable)
        out.update({f"{name}_{k}": v for k, v in err.items()})
    p_noisy = noisy_truth(shop, ids, out["network_uplift_rmse"], seed)
    out["noisy_oracle_sd"] = out["network_uplift_rmse"]

    started = time.perf_counter()
    allocations = {
        "network": allocate_by_scores(ids, net["p_conv"], net["revenue"], arms, shop, budget, margin=margin),
        "tlearner": allocate_by_scores(ids, p_tl, rev_tl, arms, shop, budget, margin=margin),
        "response": allocate_by_scores(
            ids, net["p_conv"], net["revenue"], arms, shop, budget, "response", margin=margin
        ),
        "random": allocate_randomly(ids, shop, budget, seed, margin=margin),
        "noisy_oracle": allocate_by_scores(ids, p_noisy, rev_true, true_arms, shop, budget, margin=margin),
        "oracle": allocate_by_scores(ids, p_true, rev_true, true_arms, shop, budget, margin=margin),
    }
    out["allocation_seconds"] = time.perf_counter() - started
    values = {name: allocation_value(shop, alloc, margin=margin) for name, alloc in allocations.items()}
    oracle = values["oracle"]["incremental_conversions"]
    for name in POLICIES:
        v = values[name]
        out[f"{name}_incremental_conversions"] = v["incremental_conversions"]
        out[f"{name}_share"] = v["incremental_conversions"] / oracle if oracle > 0 else math.nan
        out[f"{name}_treated"] = v["n_treated"]
        out[f"{name}_true_spend"] = v["true_spend"]
        out[f"{name}_incremental_profit"] = v["incremental_profit"]
    return out
