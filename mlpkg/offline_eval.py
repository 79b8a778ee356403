"""Offline evaluation of any allocation policy on a logged campaign (``couponops evaluate``).

The logged rows are a campaign log of the warehouse (imported with ``import-log`` or exported by
the shop) or one of CouponOps' own campaigns (its ledger, with each customer's logged arm and
propensity, and the outcomes attributed in its window). The candidate policy is a CSV file:

* deterministic: ``customer_id,arm`` (one row per customer);
* stochastic: ``customer_id,arm,probability`` (a customer's probabilities sum to 1).

Arms are the log's own labels (``control`` also names the log's control arm). Every logged
customer must get an arm; customers the log does not hold are ignored and counted. The policy's
value per customer is estimated with IPS, SNIPS and DR (:mod:`mlpkg.evaluation.ope`) with 95%
intervals, the importance weights' effective sample size and largest weight, and a warning when
they make the estimate untrustworthy; ``compare`` adds the paired difference with another policy
on the same rows. A malformed policy file is refused with its file, line, column, rule and value.
"""

from __future__ import annotations

import csv
import math
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select

from mlpkg.db import models as m
from mlpkg.evaluation import ope

OUTCOMES = ("converted", "revenue")


class PolicyFileError(ValueError):
    """A policy file breaks a rule; the message names the file, line, column, rule and value."""


#: Probabilities of one customer may miss 1 by this much (rounding in the file).
SUM_TOLERANCE = 1e-6


@dataclass(frozen=True)
class LoggedRows:
    """The rows a policy is evaluated on: who got which arm, with what probability, and the outcome."""

    kind: str  # "log" or "campaign"
    name: str
    customer_id: np.ndarray
    arm_idx: np.ndarray
    propensity: np.ndarray
    reward: np.ndarray
    arms: list[str]
    control: str
    outcome: str
    control_label: str = "control"  # the shop's own name of the control arm (also accepted in policies)
    #: Maps a policy file's customer id to the stored one (the shop's id -> its pseudonym).
    id_of: Callable[[str], str] | None = None

    def describe(self) -> str:
        """Say which rows these are, for messages."""
        return f"{'campaign log' if self.kind == 'log' else 'campaign'} {self.name!r}"


def _rows(
    kind: str, name: str, frame: pd.DataFrame, control: str, outcome: str, *, label: str | None = None
) -> LoggedRows:
    arms = sorted(set(frame["arm"].astype(str)), key=lambda a: (a != control, a))
    index = {a: i for i, a in enumerate(arms)}
    return LoggedRows(
        kind=kind,
        name=name,
        customer_id=frame["customer_id"].astype(str).to_numpy(),
        arm_idx=frame["arm"].astype(str).map(index).to_numpy(dtype=np.int64),
        propensity=frame["propensity"].to_numpy(dtype=np.float64),
        reward=frame[outcome].to_numpy(dtype=np.float64),
        arms=arms,
        control=control,
        outcome=outcome,
        control_label=label or control,
    )


def _check_outcome(outcome: str) -> None:
    if outcome not in OUTCOMES:
        raise ValueError(f"--outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")


def log_rows(engine: Engine, name: str, outcome: str = "converted") -> LoggedRows:
    """Return the rows of the warehouse's campaign log ``name``.

    Raises:
        LookupError: no such log (the message lists the logs there are).
    """
    _check_outcome(outcome)
    with engine.connect() as conn:
        log = conn.execute(select(m.CampaignLog).where(m.CampaignLog.name == name)).first()
        if log is None:
            names = [n for (n,) in conn.execute(select(m.CampaignLog.name).order_by(m.CampaignLog.name))]
            known = ", ".join(names[:10]) or "none yet: run `couponops ingest` or `couponops import-log`"
            raise LookupError(f"no campaign log {name!r} in the warehouse (logs: {known})")
        frame = pd.read_sql(
            select(
                m.CampaignLogRow.customer_id,
                m.CampaignLogRow.arm,
                m.CampaignLogRow.propensity,
                m.CampaignLogRow.converted,
                m.CampaignLogRow.revenue,
            )
            .where(m.CampaignLogRow.log_name == name)
            .order_by(m.CampaignLogRow.customer_id),
            conn,
        )
    if frame.empty:
        raise LookupError(f"campaign log {name!r} holds no rows")
    # Imported logs store their control arm as "control" (the spec keeps the shop's label).
    stored = set(frame["arm"].astype(str))
    control = "control" if "control" in stored else str(log.control_label)
    return _rows("log", name, frame, control, outcome, label=str(log.control_label))


def campaign_rows(
    engine: Engine, campaign_id: str, window_days: int, outcome: str = "converted"
) -> LoggedRows:
    """Return a CouponOps campaign's ledger rows with their attributed outcomes.

    Raises:
        LookupError: no such campaign (the message names the table).
    """
    from mlpkg.feedback import attribute_campaign

    _check_outcome(outcome)
    frame = attribute_campaign(engine, campaign_id, window_days).sort_values("customer_id")
    if frame.empty:
        raise LookupError(f"campaign {campaign_id!r} has no ledger rows")
    return _rows("campaign", campaign_id, frame, "control", outcome)


def _refuse(
    path: Path, line: int | None, column: str | None, rule: str, value: Any = None
) -> PolicyFileError:  # noqa: ANN401
    where = f"{path.name}" + (f" line {line}" if line else "") + (f", column {column}" if column else "")
    shown = "" if value is None else f", got {value!r}"
    return PolicyFileError(f"policy file {where}: {rule}{shown}")


def _bad_id(value: str) -> str | None:
    if value == "":
        return "customer_id must not be empty"
    if value != value.strip():
        return "customer_id must not start or end with whitespace"
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in value):
        return "customer_id must not hold control or invisible characters"
    return None


def read_policy(path: Path, rows: LoggedRows) -> pd.DataFrame:
    """Read and check a policy file against the logged rows' arms.

    Returns:
        ``customer_id, arm, probability, line`` (``probability`` 1.0 for a deterministic file).

    Raises:
        FileNotFoundError: the file does not exist.
        PolicyFileError: the file breaks a rule (named with its line, column and value).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"policy file {path} does not exist")
    aliases = {a: a for a in rows.arms} | {"control": rows.control, rows.control_label: rows.control}
    records: list[tuple[str, str, float, int]] = []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise _refuse(
                    path, None, None, "the file is empty (expected a header customer_id,arm[,probability])"
                )
            header = [h.strip() for h in header]
            repeated = sorted({h for h in header if header.count(h) > 1})
            if repeated:
                raise _refuse(path, 1, repeated[0], "a column name appears twice in the header")
            missing = [c for c in ("customer_id", "arm") if c not in header]
            if missing:
                raise _refuse(path, 1, missing[0], f"missing column (header: {','.join(header)})")
            unknown = [h for h in header if h not in ("customer_id", "arm", "probability")]
            if unknown:
                raise _refuse(path, 1, unknown[0], "unknown column (allowed: customer_id, arm, probability)")
            pos = {h: i for i, h in enumerate(header)}
            stochastic = "probability" in pos
            for fields in reader:
                line = reader.line_num
                if not fields:
                    continue
                if len(fields) != len(header):
                    raise _refuse(path, line, None, f"expected {len(header)} fields, found {len(fields)}")
                cid, arm = fields[pos["customer_id"]], fields[pos["arm"]]
                problem = _bad_id(cid)
                if problem:
                    raise _refuse(path, line, "customer_id", problem, cid)
                if arm not in aliases:
                    raise _refuse(
                        path,
                        line,
                        "arm",
                        f"not an arm of {rows.describe()} (arms: {', '.join(rows.arms)})",
                        arm,
                    )
                prob = 1.0
                if stochastic:
                    text = fields[pos["probability"]]
                    try:
                        prob = float(text)
                    except ValueError:
                        raise _refuse(path, line, "probability", "must be a number in [0, 1]", text) from None
                    if not math.isfinite(prob) or not 0.0 <= prob <= 1.0:
                        raise _refuse(path, line, "probability", "must be a number in [0, 1]", text)
                records.append((cid, aliases[arm], prob, line))
    except UnicodeDecodeError as err:
        raise _refuse(path, None, None, f"is not UTF-8 text ({err.reason} at byte {err.start})") from None
    except csv.Error as err:
        raise _refuse(path, None, None, f"is not valid CSV ({err})") from None
    policy = pd.DataFrame(records, columns=["customer_id", "arm", "probability", "line"])
    if policy.empty:
        raise _refuse(path, None, None, "holds no rows")
    twice = policy[policy.duplicated(["customer_id", "arm"] if stochastic else ["customer_id"], keep=False)]
    if len(twice):
        first, again = twice.iloc[0], twice.iloc[1]
        what = f"customer {first.customer_id!r}" + (f" and arm {first.arm!r}" if stochastic else "")
        raise _refuse(
            path,
            int(again.line),
            "customer_id",
            f"{what} appears again (first on line {int(first.line)}); one row per "
            f"{'customer and arm' if stochastic else 'customer'}",
        )
    if stochastic:
        sums = policy.groupby("customer_id", sort=False)["probability"].sum()
        off = sums[(sums - 1.0).abs() > SUM_TOLERANCE]
        if len(off):
            cid = off.index[0]
            lines = ", ".join(str(x) for x in policy.loc[policy["customer_id"] == cid, "line"])
            raise _refuse(
                path,
                None,
                "probability",
                f"the probabilities of customer {cid!r} (lines {lines}) sum to {off.iloc[0]:.6g}, not 1",
            )
    if rows.id_of is not None:  # checked with the file's ids, matched with the stored ones
        policy["customer_id"] = policy["customer_id"].map(rows.id_of)
    return policy


def policy_matrix(path: Path, rows: LoggedRows) -> tuple[np.ndarray, dict[str, Any]]:
    """Return the policy's ``[n, A]`` probabilities on the logged rows and what the file held."""
    policy = read_policy(path, rows)
    logged = pd.Index(rows.customer_id)
    known = policy["customer_id"].isin(logged)
    covered = pd.Index(policy.loc[known, "customer_id"].unique())
    missing = logged.difference(covered)
    if len(missing):
        raise PolicyFileError(
            f"policy file {Path(path).name}: gives no arm for {len(missing):,} of {len(logged):,} "
            f"customers of {rows.describe()} (e.g. {missing[0]!r}); a policy must cover every logged customer"
        )
    probs = np.zeros((len(logged), len(rows.arms)), dtype=np.float64)
    mine = policy[known]
    row_of = pd.Series(np.arange(len(logged)), index=logged)
    arm_of = {a: i for i, a in enumerate(rows.arms)}
    rows_idx = row_of.loc[mine["customer_id"]].to_numpy(dtype=np.int64)
    arms_idx = mine["arm"].map(arm_of).to_numpy(dtype=np.int64)
    np.add.at(probs, (rows_idx, arms_idx), mine["probability"].to_numpy(dtype=np.float64))
    info = {
        "file": str(path),
        "kind": "stochastic" if (policy["probability"] < 1.0).any() else "deterministic",
        "customers": int(policy["customer_id"].nunique()),
        "ignored_customers": int(policy.loc[~known, "customer_id"].nunique()),
    }
    return probs, info


def _estimates(probs: np.ndarray, rows: LoggedRows, alpha: float) -> dict[str, dict[str, Any]]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ope.OPEWeightWarning)  # the result carries the warning text
        found = ope.evaluate_policy(probs, rows.arm_idx, rows.propensity, rows.reward, alpha=alpha)
    return {name: result.to_dict() for name, result in found.items()}


def evaluate(
    rows: LoggedRows, policy: Path, *, compare: Path | None = None, alpha: float = 0.05
) -> dict[str, Any]:
    """Estimate a policy's value on logged rows (and its difference with ``compare``).

    Returns:
        A JSON-ready dict: ``source``, ``policy``, ``estimates`` (``ips``/``snips``/``dr``, each with
        ``value``, ``stderr``, ``ci_low``, ``ci_high``, ``effective_sample_size``, ``max_weight``,
        ``warning``), ``logged_value`` (the logging policy's own mean outcome), ``warnings`` and,
        with ``compare``, ``compare`` (the other policy's estimates and the paired ``difference``).
    """
    probs, info = policy_matrix(policy, rows)
    estimates = _estimates(probs, rows, alpha)
    out: dict[str, Any] = {
        "source": {
            "kind": rows.kind,
            "name": rows.name,
            "rows": int(len(rows.customer_id)),
            "outcome": rows.outcome,
            "arms": rows.arms,
            "control": rows.control,
        },
        "policy": info,
        "estimates": estimates,
        "logged_value": float(np.mean(rows.reward)),
        "confidence": 1 - alpha,
    }
    warnings_ = {e["warning"] for e in estimates.values() if e["warning"]}
    if compare is not None:
        other, other_info = policy_matrix(compare, rows)
        other_estimates = _estimates(other, rows, alpha)
        difference = ope.paired_difference(
            probs, other, rows.arm_idx, rows.propensity, rows.reward, alpha=alpha
        )
        out["compare"] = {
            "policy": other_info,
            "estimates": other_estimates,
            "difference": {k: v.to_dict() for k, v in difference.items()},
        }
        warnings_ |= {e["warning"] for e in other_estimates.values() if e["warning"]}
    out["warnings"] = sorted(warnings_)
    return out
