"""Off-policy evaluation: estimate what a new allocation policy would earn from logged campaigns.

A logged campaign row is ``(x_i, a_i, mu_i, r_i)``: the arm ``a_i`` the logging policy chose, the
probability ``mu_i`` with which it chose it (the ``propensity`` column) and the reward ``r_i``. A
target policy is given as ``target_probs[i, a] = pi(a | x_i)``; a deterministic policy is a one-hot
matrix (see :func:`one_hot_policy`). Importance weights are ``w_i = pi(a_i | x_i) / mu_i``.

Estimators (all return the value *per customer*):

* IPS: ``mean(w_i r_i)`` — unbiased, high variance.
* SNIPS: ``sum(w_i r_i) / sum(w_i)`` — self-normalised, slightly biased, much lower variance.
* DR: ``mean(sum_a pi(a|x_i) q(x_i, a) + w_i (r_i - q(x_i, a_i)))`` — unbiased when either the
  propensities or the reward model ``q`` are right, low variance when ``q`` is good.

Confidence intervals are normal-approximation intervals. When the weights are extreme (effective
sample size below 5 % of ``n`` or a weight above 100) the intervals are not trustworthy: the result
carries a ``warning`` text and an :class:`OPEWeightWarning` is emitted.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

MIN_ESS_FRACTION = 0.05
MAX_WEIGHT = 100.0


class OPEWeightWarning(UserWarning):
    """Importance weights are too extreme for the estimate's interval to be trusted."""


@dataclass(frozen=True)
class OPEResult:
    """One off-policy estimate of a policy's value per customer.

    Attributes:
        estimator: ``"ips"``, ``"snips"`` or ``"dr"``.
        value: Estimated expected reward per customer under the target policy.
        stderr: Standard error of ``value`` (delta method for SNIPS).
        ci_low: Lower bound of the normal-approximation confidence interval.
        ci_high: Upper bound of the normal-approximation confidence interval.
        n: Number of logged rows used.
        effective_sample_size: Kish ESS of the importance weights, ``(sum w)^2 / sum w^2``.
        max_weight: Largest importance weight.
        warning: Why the estimate should not be trusted, or ``None``.
    """

    estimator: str
    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int
    effective_sample_size: float
    max_weight: float
    warning: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return the result as a plain dict (for MLflow params/metrics or JSON)."""
        return asdict(self)


def one_hot_policy(chosen_arm_idx: np.ndarray, n_arms: int) -> np.ndarray:
    """Turn a deterministic policy's chosen arm indices into a one-hot ``[n, n_arms]`` matrix.

    Args:
        chosen_arm_idx: Integer arm index per row, in ``[0, n_arms)``.
        n_arms: Number of arms.

    Returns:
        Float matrix with a single 1.0 per row.
    """
    idx = np.asarray(chosen_arm_idx, dtype=np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= n_arms):
        raise ValueError(f"arm indices must lie in [0, {n_arms}), got [{idx.min()}, {idx.max()}]")
    probs = np.zeros((idx.shape[0], n_arms), dtype=np.float64)
    probs[np.arange(idx.shape[0]), idx] = 1.0
    return probs


def _as_1d(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _check_propensity(propensity: np.ndarray) -> None:
    if np.any(propensity <= 0) or np.any(propensity > 1):
        raise ValueError("logged propensities must lie in (0, 1]; a zero propensity cannot be reweighted")


def _check_lengths(**arrays: np.ndarray) -> int:
    lengths = {name: len(arr) for name, arr in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise ValueError("cannot evaluate a policy on zero logged rows")
    return n


def _weight_diagnostics(weights: np.ndarray) -> tuple[float, float, str | None]:
    """Return (ESS, max weight, warning text or None) for importance weights."""
    n = weights.shape[0]
    sum_sq = float(np.sum(weights**2))
    ess = float(np.sum(weights)) ** 2 / sum_sq if sum_sq > 0 else 0.0
    max_w = float(np.max(weights))
    problems = []
    if ess / n < MIN_ESS_FRACTION:
        problems.append(
            f"effective sample size {ess:.1f} is {ess / n:.1%} of n={n} (< {MIN_ESS_FRACTION:.0%})"
        )
    if max_w > MAX_WEIGHT:
        problems.append(f"max importance weight {max_w:.1f} > {MAX_WEIGHT:.0f}")
    if not problems:
        return ess, max_w, None
    text = (
        "off-policy estimate is unreliable: "
        + "; ".join(problems)
        + ". The target policy is far from the logging policy; log more exploration before trusting it."
    )
    return ess, max_w, text


def _result(
    estimator: str, value: float, stderr: float, n: int, weights: np.ndarray, alpha: float
) -> OPEResult:
    ess, max_w, text = _weight_diagnostics(weights)
    if text is not None:
        # stacklevel 3 points at the caller of ips/snips/doubly_robust, not at this helper.
        warnings.warn(f"{estimator}: {text}", OPEWeightWarning, stacklevel=3)
    z = float(stats.norm.ppf(1 - alpha / 2))
    return OPEResult(
        estimator=estimator,
        value=float(value),
        stderr=float(stderr),
        ci_low=float(value - z * stderr),
        ci_high=float(value + z * stderr),
        n=int(n),
        effective_sample_size=ess,
        max_weight=max_w,
        warning=text,
    )


def ips(
    target_prob_of_logged: np.ndarray,
    logged_propensity: np.ndarray,
    reward: np.ndarray,
    *,
    alpha: float = 0.05,
) -> OPEResult:
    """Estimate a policy's value per customer with inverse propensity scoring.

    Args:
        target_prob_of_logged: ``pi(a_i | x_i)``, the target policy's probability of the arm that
            was actually logged (0/1 for a deterministic policy).
        logged_propensity: ``mu(a_i | x_i)``, the logging policy's probability of that arm, in (0, 1].
        reward: Observed reward per row (conversion 0/1, revenue, profit, ...).
        alpha: One minus the confidence level of the interval.

    Returns:
        The IPS estimate ``mean(w r)`` with ``w = pi / mu``.
    """
    pi = _as_1d("target_prob_of_logged", target_prob_of_logged)
    mu = _as_1d("logged_propensity", logged_propensity)
    r = _as_1d("reward", reward)
    n = _check_lengths(target_prob_of_logged=pi, logged_propensity=mu, reward=r)
    _check_propensity(mu)
    w = pi / mu
    terms = w * r
    stderr = float(np.std(terms, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return _result("ips", float(np.mean(terms)), stderr, n, w, alpha)


def snips(
    target_prob_of_logged: np.ndarray,
    logged_propensity: np.ndarray,
    reward: np.ndarray,
    *,
    alpha: float = 0.05,
) -> OPEResult:
    """Estimate a policy's value per customer with self-normalised IPS.

    The standard error is the delta-method one, ``sqrt(sum w^2 (r - v)^2) / sum w``.

    Args:
        target_prob_of_logged: ``pi(a_i | x_i)`` of the logged arm.
        logged_propensity: ``mu(a_i | x_i)`` of the logged arm, in (0, 1].
        reward: Observed reward per row.
        alpha: One minus the confidence level of the interval.

    Returns:
        The SNIPS estimate ``sum(w r) / sum(w)``; NaN (with a warning) when no logged row has
        positive target probability.
    """
    pi = _as_1d("target_prob_of_logged", target_prob_of_logged)
    mu = _as_1d("logged_propensity", logged_propensity)
    r = _as_1d("reward", reward)
    n = _check_lengths(target_prob_of_logged=pi, logged_propensity=mu, reward=r)
    _check_propensity(mu)
    w = pi / mu
    total_w = float(np.sum(w))
    if total_w <= 0:
        return _result("snips", math.nan, math.nan, n, w, alpha)
    value = float(np.sum(w * r)) / total_w
    stderr = math.sqrt(float(np.sum(w**2 * (r - value) ** 2))) / total_w
    return _result("snips", value, stderr, n, w, alpha)


def doubly_robust(
    target_probs: np.ndarray,
    logged_arm_idx: np.ndarray,
    logged_propensity: np.ndarray,
    reward: np.ndarray,
    reward_model: np.ndarray,
    *,
    alpha: float = 0.05,
) -> OPEResult:
    """Estimate a policy's value per customer with the doubly robust estimator.

    Args:
        target_probs: ``[n, A]`` matrix, ``pi(a | x_i)`` for every arm (rows sum to 1).
        logged_arm_idx: Index of the logged arm per row.
        logged_propensity: ``mu(a_i | x_i)`` of the logged arm, in (0, 1].
        reward: Observed reward per row.
        reward_model: ``[n, A]`` matrix of predicted expected reward ``q(x_i, a)`` per arm, fitted
            on data other than these rows where possible.
        alpha: One minus the confidence level of the interval.

    Returns:
        The DR estimate ``mean(sum_a pi q + w (r - q_logged))``.
    """
    pi_all = np.asarray(target_probs, dtype=np.float64)
    q_all = np.asarray(reward_model, dtype=np.float64)
    if pi_all.ndim != 2 or q_all.shape != pi_all.shape:
        raise ValueError(
            "target_probs and reward_model must both be [n, A] matrices, "
            f"got {pi_all.shape} and {q_all.shape}"
        )
    if not (np.all(np.isfinite(pi_all)) and np.all(np.isfinite(q_all))):
        raise ValueError("target_probs and reward_model must be finite")
    idx = np.asarray(logged_arm_idx, dtype=np.int64)
    mu = _as_1d("logged_propensity", logged_propensity)
    r = _as_1d("reward", reward)
    n = _check_lengths(target_probs=pi_all, logged_arm_idx=idx, logged_propensity=mu, reward=r)
    _check_propensity(mu)
    if idx.min() < 0 or idx.max() >= pi_all.shape[1]:
        raise ValueError(f"logged_arm_idx must lie in [0, {pi_all.shape[1]})")
    rows = np.arange(n)
    w = pi_all[rows, idx] / mu
    direct = np.sum(pi_all * q_all, axis=1)
    terms = direct + w * (r - q_all[rows, idx])
    stderr = float(np.std(terms, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
    return _result("dr", float(np.mean(terms)), stderr, n, w, alpha)


def per_arm_mean_reward(
    logged_arm_idx: np.ndarray, logged_propensity: np.ndarray, reward: np.ndarray, n_arms: int
) -> np.ndarray:
    """Fit the simplest reward model: the propensity-weighted mean reward of each arm.

    Arms never logged get the overall mean reward.

    Args:
        logged_arm_idx: Index of the logged arm per row.
        logged_propensity: Propensity of the logged arm per row.
        reward: Observed reward per row.
        n_arms: Number of arms ``A``.

    Returns:
        ``[n, A]`` matrix whose every row is the per-arm mean reward.
    """
    idx = np.asarray(logged_arm_idx, dtype=np.int64)
    w = 1.0 / np.asarray(logged_propensity, dtype=np.float64)
    r = np.asarray(reward, dtype=np.float64)
    sum_wr = np.bincount(idx, weights=w * r, minlength=n_arms)
    sum_w = np.bincount(idx, weights=w, minlength=n_arms)
    fallback = float(np.mean(r)) if r.size else 0.0
    means = np.where(sum_w > 0, sum_wr / np.where(sum_w > 0, sum_w, 1.0), fallback)
    return np.broadcast_to(means, (idx.shape[0], n_arms)).copy()


def evaluate_policy(
    target_probs: np.ndarray,
    logged_arm_idx: np.ndarray,
    logged_propensity: np.ndarray,
    reward: np.ndarray,
    reward_model: np.ndarray | None = None,
    *,
    alpha: float = 0.05,
) -> dict[str, OPEResult]:
    """Estimate a policy's value per customer with IPS, SNIPS and DR.

    Args:
        target_probs: ``[n, A]`` matrix ``pi(a | x_i)``; one-hot for a deterministic policy.
        logged_arm_idx: Index of the logged arm per row.
        logged_propensity: Propensity of the logged arm per row, in (0, 1].
        reward: Observed reward per row.
        reward_model: ``[n, A]`` predicted expected reward per arm for DR. When omitted, DR uses
            the per-arm mean reward (:func:`per_arm_mean_reward`), which keeps DR unbiased and
            still reduces variance when arms differ in level.
        alpha: One minus the confidence level of the intervals.

    Returns:
        ``{"ips": ..., "snips": ..., "dr": ...}``.
    """
    pi_all = np.asarray(target_probs, dtype=np.float64)
    if pi_all.ndim != 2:
        raise ValueError(f"target_probs must be an [n, A] matrix, got shape {pi_all.shape}")
    idx = np.asarray(logged_arm_idx, dtype=np.int64)
    if idx.shape[0] != pi_all.shape[0]:
        raise ValueError("target_probs and logged_arm_idx must have the same number of rows")
    if idx.size and (idx.min() < 0 or idx.max() >= pi_all.shape[1]):
        raise ValueError(f"logged_arm_idx must lie in [0, {pi_all.shape[1]})")
    pi_logged = pi_all[np.arange(idx.shape[0]), idx]
    if reward_model is None:
        reward_model = per_arm_mean_reward(idx, logged_propensity, reward, pi_all.shape[1])
    return {
        "ips": ips(pi_logged, logged_propensity, reward, alpha=alpha),
        "snips": snips(pi_logged, logged_propensity, reward, alpha=alpha),
        "dr": doubly_robust(pi_all, idx, logged_propensity, reward, reward_model, alpha=alpha),
    }


@dataclass(frozen=True)
class PairedDifference:
    """The difference of two policies' values on the same logged rows, with its paired interval.

    Attributes:
        estimator: ``"ips"``, ``"snips"`` or ``"dr"``.
        value: ``value(A) - value(B)`` per customer.
        stderr: Standard error of the difference from the per-row paired terms (their influence
            functions for SNIPS), so what the two policies share cancels.
        ci_low: Lower bound of the normal-approximation interval.
        ci_high: Upper bound.
        n: Logged rows used.
    """

    estimator: str
    value: float
    stderr: float
    ci_low: float
    ci_high: float
    n: int

    def to_dict(self) -> dict[str, Any]:
        """Return the difference as a plain dict (for JSON)."""
        return asdict(self)


def _influence_terms(
    pi_all: np.ndarray, idx: np.ndarray, mu: np.ndarray, r: np.ndarray, q_all: np.ndarray
) -> dict[str, tuple[float, np.ndarray]]:
    """Return each estimator's value and per-row terms whose mean is the value (or its influence)."""
    rows = np.arange(idx.shape[0])
    w = pi_all[rows, idx] / mu
    ips_terms = w * r
    dr_terms = np.sum(pi_all * q_all, axis=1) + w * (r - q_all[rows, idx])
    mean_w = float(np.mean(w))
    snips_value = float(np.sum(w * r) / np.sum(w)) if mean_w > 0 else math.nan
    # The delta method's influence of SNIPS: its mean is 0; the value is carried beside it.
    snips_terms = w * (r - snips_value) / mean_w if mean_w > 0 else np.full_like(r, math.nan)
    return {
        "ips": (float(np.mean(ips_terms)), ips_terms),
        "snips": (snips_value, snips_terms),
        "dr": (float(np.mean(dr_terms)), dr_terms),
    }


def paired_difference(
    target_a: np.ndarray,
    target_b: np.ndarray,
    logged_arm_idx: np.ndarray,
    logged_propensity: np.ndarray,
    reward: np.ndarray,
    reward_model: np.ndarray | None = None,
    *,
    alpha: float = 0.05,
) -> dict[str, PairedDifference]:
    """Estimate ``value(A) - value(B)`` of two policies on the same logged rows (IPS, SNIPS, DR).

    Args:
        target_a: ``[n, A]`` matrix ``pi_A(a | x_i)``.
        target_b: ``[n, A]`` matrix ``pi_B(a | x_i)``.
        logged_arm_idx: Index of the logged arm per row.
        logged_propensity: Propensity of the logged arm per row, in (0, 1].
        reward: Observed reward per row.
        reward_model: ``[n, A]`` reward model for DR (default: :func:`per_arm_mean_reward`).
        alpha: One minus the confidence level of the intervals.

    Returns:
        ``{"ips": ..., "snips": ..., "dr": ...}`` differences with paired standard errors.
    """
    pa, pb = np.asarray(target_a, dtype=np.float64), np.asarray(target_b, dtype=np.float64)
    if pa.ndim != 2 or pa.shape != pb.shape:
        raise ValueError(f"both policies must be [n, A] matrices of one shape, got {pa.shape} and {pb.shape}")
    idx = np.asarray(logged_arm_idx, dtype=np.int64)
    mu = _as_1d("logged_propensity", logged_propensity)
    r = _as_1d("reward", reward)
    n = _check_lengths(target_a=pa, logged_arm_idx=idx, logged_propensity=mu, reward=r)
    _check_propensity(mu)
    if idx.min() < 0 or idx.max() >= pa.shape[1]:
        raise ValueError(f"logged_arm_idx must lie in [0, {pa.shape[1]})")
    q = per_arm_mean_reward(idx, mu, r, pa.shape[1]) if reward_model is None else np.asarray(reward_model)
    ta, tb = _influence_terms(pa, idx, mu, r, q), _influence_terms(pb, idx, mu, r, q)
    z = float(stats.norm.ppf(1 - alpha / 2))
    out = {}
    for name in ("ips", "snips", "dr"):
        value = ta[name][0] - tb[name][0]
        diff = ta[name][1] - tb[name][1]
        stderr = float(np.std(diff, ddof=1)) / math.sqrt(n) if n > 1 else math.nan
        out[name] = PairedDifference(name, value, stderr, value - z * stderr, value + z * stderr, n)
    return out
