"""Score a campaign's customers in shards, one Airflow mapped task each, and merge them for the solver.

Scoring (point-in-time features plus a forward pass of the champion for every customer × arm) is
the part of an allocation that grows with the customer base, and it is embarrassingly parallel;
the solve is not, since budget, inventory and channel capacity couple every customer. So a run
is split into :class:`ScoringJob` s, one per shard: each reads only its customers' history,
scores them and writes their option economics to one ``.npz`` file; the allocate step merges
the files and solves once.

A customer's shard is a stable hash of its id (blake2b), the same in every run, process and
machine. Every job of a run carries the same model URI (a pinned version, resolved once by
:func:`plan_scoring_jobs`), so an alias moved mid-run cannot mix two models in one campaign.
The merge checks that the files are exactly the run's shards, scored for the same campaign,
point in time, model and objective, with disjoint customers; anything else is refused with the
file and the field that disagree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
from sqlalchemy import Engine, select

from mlpkg.allocation.campaign import (
    ChallengerScores,
    ScoredPopulation,
    build_catalog,
    read_offer,
    score_population,
)
from mlpkg.allocation.cost_calibration import CostCalibration
from mlpkg.config import Settings
from mlpkg.db import models as m

FORMAT = "couponops-scores/3"


class ShardMismatchError(ValueError):
    """Scoring shard files that do not belong together (another run, model or campaign)."""


@dataclass(frozen=True)
class ScoringJob:
    """One shard of one allocation run: plain values, so it travels through XCom as a dict."""

    campaign_id: str
    run_key: str
    as_of: str
    model_uri: str | None
    model_version: str | None
    objective: str
    shard: int
    n_shards: int
    #: The live challenger scored beside the champion (None: the champion alone).
    challenger_uri: str | None = None
    challenger_version: str | None = None

    def as_dict(self) -> dict:
        """Return the job as a JSON-friendly dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ScoringJob:
        """Rebuild a job from :meth:`as_dict` output."""
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def shard_of(customer_ids: np.ndarray | list[str], n_shards: int) -> np.ndarray:
    """Return each customer's shard in ``[0, n_shards)``: a stable hash of the id, not of its position."""
    if n_shards < 1:
        raise ValueError(f"n_shards must be at least 1, got {n_shards}")
    out = np.empty(len(customer_ids), dtype=np.int64)
    for i, cid in enumerate(customer_ids):
        digest = hashlib.blake2b(str(cid).encode(), digest_size=8, person=b"couponops-shard").digest()
        out[i] = int.from_bytes(digest, "big") % n_shards
    return out


def shard_customers(engine: Engine, shard: int, n_shards: int) -> list[str]:
    """Return the ids of the customers in one shard, sorted."""
    if not 0 <= shard < n_shards:
        raise ValueError(f"shard must be in [0, {n_shards}), got {shard}")
    with engine.connect() as conn:
        ids = np.array(sorted(conn.execute(select(m.Customer.customer_id)).scalars()), dtype=object)
    return ids[shard_of(ids, n_shards) == shard].tolist()


def plan_scoring_jobs(
    *,
    campaign_id: str,
    run_key: str,
    as_of: datetime,
    model_uri: str | None,
    model_version: str | None,
    objective: str,
    n_shards: int,
    challenger_uri: str | None = None,
    challenger_version: str | None = None,
) -> list[ScoringJob]:
    """Return the run's scoring jobs, one per shard, all pinned to the same model version(s)."""
    if n_shards < 1:
        raise ValueError(f"campaign.score_shards must be at least 1, got {n_shards}")
    return [
        ScoringJob(
            campaign_id=campaign_id,
            run_key=run_key,
            as_of=pd.Timestamp(as_of).isoformat(),
            model_uri=model_uri,
            model_version=model_version,
            objective=objective,
            shard=k,
            n_shards=n_shards,
            challenger_uri=challenger_uri,
            challenger_version=challenger_version,
        )
        for k in range(n_shards)
    ]


def shard_dir(settings: Settings, job: ScoringJob) -> Path:
    """Folder of one run's shard files (a run key digest keeps two runs' files apart)."""
    run = hashlib.blake2b(job.run_key.encode(), digest_size=6).hexdigest()
    return settings.state_dir / "scores" / job.campaign_id / run


def score_shard(engine: Engine, settings: Settings, job: ScoringJob) -> dict:
    """Score one shard's customers and write their option economics to an ``.npz`` file.

    Re-running the same job rewrites the same file (atomically), so a retried task is harmless.

    Returns:
        ``path``, ``shard``, ``n_shards``, ``customers`` and ``options`` of the written file.
    """
    ids = shard_customers(engine, job.shard, job.n_shards)
    pop = score_population(
        engine,
        settings,
        as_of=pd.Timestamp(job.as_of).to_pydatetime(),
        model_uri=job.model_uri,
        objective=job.objective,
        customer_ids=ids,
        challenger_uri=job.challenger_uri,
        challenger_version=job.challenger_version,
    )
    live = pop.challenger
    extra = (
        {
            "ch_value": live.value,
            "ch_cost": live.cost,
            "ch_uplift": live.uplift,
            "ch_base_rate": live.base_rate,
        }
        if live is not None
        else {}
    )
    out = shard_dir(settings, job)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"shard-{job.shard:04d}-of-{job.n_shards:04d}.npz"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        np.savez(
            fh,
            meta=np.array(
                json.dumps({"format": FORMAT, **job.as_dict(), "cost_calibration": pop.calibration.as_dict()})
            ),
            ids=np.asarray(pop.ids, dtype=str),
            arms=np.asarray(pop.catalog.arms, dtype=str),
            value=pop.value,
            cost=pop.cost,
            uplift=pop.uplift,
            eligible=pop.eligible,
            base_rate=pop.base_rate,
            **extra,
        )
    tmp.replace(path)
    return {
        "path": str(path),
        "shard": job.shard,
        "n_shards": job.n_shards,
        "customers": len(pop.ids),
        "options": len(pop.catalog.arms),
    }


def _read_shard(path: Path, expected: ScoringJob) -> dict:
    if not path.is_file():
        raise ShardMismatchError(f"scoring shard {path} does not exist (was its score task cleared?)")
    with np.load(path, allow_pickle=False) as npz:
        data = {k: npz[k] for k in npz.files}
    meta = json.loads(str(data.pop("meta")))
    if meta.get("format") != FORMAT:
        raise ShardMismatchError(f"scoring shard {path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    for key in ("campaign_id", "run_key", "as_of", "model_uri", "objective", "n_shards", "challenger_uri"):
        if meta.get(key) != getattr(expected, key):
            raise ShardMismatchError(
                f"scoring shard {path}: {key} is {meta.get(key)!r}, but this run expects "
                f"{getattr(expected, key)!r}; every shard of one allocation must come from the same run"
            )
    data["shard"] = int(meta["shard"])
    data["calibration"] = CostCalibration.from_dict(meta.get("cost_calibration"))
    return data


def merge_shards(engine: Engine, paths: list[str | Path], expected: ScoringJob) -> ScoredPopulation:
    """Merge a run's shard files into the population the solver allocates, ordered by customer id.

    The arms on offer are re-read now, since a coupon may have sold out (another campaign) or
    expired between scoring and solving: options no longer on offer are dropped.

    Raises:
        ShardMismatchError: files from another run, a missing or repeated shard, arms that differ
            between shards, or a customer in two shards.
    """
    parts = [_read_shard(Path(p), expected) for p in paths]
    seen = sorted(p["shard"] for p in parts)
    if seen != list(range(expected.n_shards)):
        raise ShardMismatchError(
            f"campaign {expected.campaign_id!r}: got scoring shards {seen}, expected each of "
            f"0..{expected.n_shards - 1} exactly once"
        )
    arms = parts[0]["arms"].tolist()
    calibration = parts[0]["calibration"]
    for p, path in zip(parts, paths, strict=True):
        if p["calibration"] != calibration:
            raise ShardMismatchError(
                f"scoring shard {path} priced coupons with cost calibration {p['calibration'].as_dict()}, "
                f"shard 0 with {calibration.as_dict()}; a campaign was measured while the shards were "
                "scored: re-run the scoring"
            )
        if p["arms"].tolist() != arms:
            raise ShardMismatchError(
                f"scoring shard {path} has arms {p['arms'].tolist()}, shard 0 has {arms}"
            )
        if ("ch_value" in p) != ("ch_value" in parts[0]):
            raise ShardMismatchError(
                f"scoring shard {path} and shard 0 disagree on whether live challenger "
                f"{expected.challenger_uri} scored them; re-run the scoring"
            )
    ids = np.concatenate([p["ids"] for p in parts]).astype(object)
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    if len(ids) > 1 and (ids[1:] == ids[:-1]).any():
        dup = ids[1:][ids[1:] == ids[:-1]][0]
        raise ShardMismatchError(f"campaign {expected.campaign_id!r}: customer {dup!r} is in two shards")
    coupons, channels = read_offer(engine)
    catalog = build_catalog(arms, coupons, channels, pd.Timestamp(expected.as_of).to_pydatetime())
    keep = [arms.index(a) for a in catalog.arms]

    def stack(key: str) -> np.ndarray:
        return np.concatenate([p[key] for p in parts])[order][:, keep]

    live = None
    if "ch_value" in parts[0]:
        live = ChallengerScores(
            version=str(expected.challenger_version or expected.challenger_uri),
            model_uri=str(expected.challenger_uri),
            value=stack("ch_value"),
            cost=stack("ch_cost"),
            uplift=stack("ch_uplift"),
            base_rate=np.concatenate([p["ch_base_rate"] for p in parts])[order],
        )
    return ScoredPopulation(
        ids=ids,
        catalog=catalog,
        value=stack("value"),
        cost=stack("cost"),
        uplift=stack("uplift"),
        eligible=stack("eligible"),
        base_rate=np.concatenate([p["base_rate"] for p in parts])[order],
        calibration=calibration,
        challenger=live,
    )
