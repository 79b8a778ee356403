"""The loop's stages as plain functions: one call per Airflow task, CLI command or test.

Each function takes settings and plain values (ids, paths, the run's context) and returns a
JSON-friendly dict, so DAG task bodies stay a few lines and XCom never carries DataFrames.
Nothing here imports Airflow: the run's context is passed in as a :class:`RunContext`.
"""

from __future__ import annotations

import json
import math
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from mlpkg.config import Settings, mask_url


@dataclass(frozen=True)
class RunContext:
    """Where a stage call comes from (an Airflow run, the CLI or a test)."""

    dag_id: str = "cli"
    run_id: str = "manual"
    try_number: int = 1
    logical_date: str | None = None

    @property
    def run_key(self) -> str:
        """Key that makes a stage idempotent: the same run writes the same rows."""
        return f"{self.dag_id}/{self.run_id}"

    def tags(self) -> dict[str, str]:
        """Lineage tags for MLflow runs."""
        tags = {
            "airflow.dag_id": self.dag_id,
            "airflow.run_id": self.run_id,
            "airflow.try_number": str(self.try_number),
        }
        if self.logical_date:  # CLI runs have none: no "None" tag
            tags["airflow.logical_date"] = str(self.logical_date)
        return tags


def utcnow() -> datetime:
    """Return the current time in UTC."""
    return datetime.now(UTC)


def _engine(settings: Settings):  # noqa: ANN202
    from mlpkg.db.engine import make_engine

    return make_engine(settings.resolved_warehouse_url)


def git_commit() -> str:
    """Return the current git commit, or "unknown" outside a checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# --- stores ----------------------------------------------------------------------------------------


def init_stores(settings: Settings) -> dict:
    """Create the state folders, migrate the warehouse and create the MLflow experiments.

    Both experiments (training and campaigns) are created if missing and typed for model training,
    so the MLflow UI opens them on their runs; an existing one only gets the type tag (idempotent).

    Returns:
        Where the stores are, with any password in their URLs masked (the result is printed).
    """
    from mlpkg.db.engine import migrate
    from mlpkg.registry import TRAINING_EXPERIMENT_DESCRIPTION, ensure_experiment, make_client
    from mlpkg.reports import campaign_experiment

    settings.ensure_dirs()
    migrate(settings.resolved_warehouse_url)
    client = make_client(settings.resolved_tracking_uri)
    ensure_experiment(
        client,
        settings.mlflow_experiment,
        artifact_location=settings.resolved_artifact_root,
        description=TRAINING_EXPERIMENT_DESCRIPTION,
    )
    campaign_experiment(settings, client)
    return {
        "state_dir": str(settings.state_dir),
        "warehouse": mask_url(settings.resolved_warehouse_url),
        "mlflow": mask_url(settings.resolved_tracking_uri),
        "artifacts": mask_url(settings.resolved_artifact_root),
    }


# --- the landing zone and the product's clock ------------------------------------------------------


def product_now(settings: Settings, ctx: RunContext | None = None) -> datetime | None:
    """Return the product's "now": the run's logical date or the wall clock, or the data clock.

    With ``clock="data"`` it is the export time of the newest loaded drop (None before any), so a
    simulated shop whose days pass in seconds is scored, sent and measured on its own time.
    """
    if settings.clock == "data":
        from mlpkg.db.engine import session_scope
        from mlpkg.sources import data_clock

        with session_scope(_engine(settings)) as session:
            return data_clock(session)
    if ctx is not None and ctx.logical_date:
        from mlpkg.db.queries import as_utc

        return as_utc(ctx.logical_date).to_pydatetime()
    return utcnow()


def skipped(reason: str, **extra) -> dict:  # noqa: ANN003 - JSON-friendly details
    """Return the result of a stage that had nothing to do (Airflow marks the task skipped)."""
    return {"skipped": True, "reason": reason, **extra}


def _ingest_drops(settings: Settings, kind: str, *, now: datetime) -> dict:
    """Load every complete, not yet handled drop of one kind, oldest first, each exactly once."""
    from mlpkg.data import ingest_batch
    from mlpkg.db.engine import session_scope
    from mlpkg.sources import pending_drops, record_drop, stage_drop
    from mlpkg.validation import DataContractError

    engine = _engine(settings)
    zone = settings.resolved_landing_url
    with session_scope(engine) as session:
        pending = pending_drops(session, zone, kind)
    if not pending:
        return skipped(
            f"no new complete drop in {zone}/{kind} (a drop counts once its _SUCCESS marker exists; "
            "every earlier one was already loaded or quarantined)",
            loaded=[],
        )
    loaded = []
    for drop in pending:
        local = stage_drop(drop, settings.state_dir / "staging")
        try:
            report = ingest_batch(engine, local, settings, now=now).as_dict()
        except DataContractError as exc:
            with session_scope(engine) as session:
                record_drop(session, drop, status="quarantined", detail={"error": str(exc)[:4000]}, now=now)
            raise
        with session_scope(engine) as session:
            record_drop(session, drop, status="loaded", detail={"loaded": report["loaded"]}, now=now)
        loaded.append({**drop.as_dict(), "rows": report["loaded"], "warnings": report["warnings"],
                       "forgotten_rows_dropped": report["forgotten_rows_dropped"]})
    return {"skipped": False, "loaded": loaded, "zone": zone}


def ingest_landed(settings: Settings, *, now: datetime | None = None) -> dict:
    """Load every complete shop batch in the landing zone not yet loaded, oldest first.

    Returns:
        ``loaded`` (one entry per drop), or ``skipped`` with the ``reason`` when nothing is new.

    Raises:
        mlpkg.validation.DataContractError: a batch broke its contract; it is quarantined and
            recorded, and the batches after it wait for the next run.
    """
    return _ingest_drops(settings, "batches", now=now or utcnow())


def ingest_landed_feedback(settings: Settings, *, now: datetime | None = None) -> dict:
    """Load every complete feedback export in the landing zone not yet loaded, oldest first."""
    return _ingest_drops(settings, "feedback", now=now or utcnow())


def ingest_source(settings: Settings, *, batch_dir: str | None = None, now: datetime | None = None) -> dict:
    """Load one given batch folder, or every new complete batch of the landing zone.

    With ``source="simulator"`` the simulated shop writes into the same landing zone, so the
    product reads it exactly as it reads a real shop's drops.
    """
    if batch_dir:
        report = ingest(settings, batch_dir, now=now)
        return {"skipped": False, "loaded": [{"drop_id": Path(batch_dir).name, "rows": report["loaded"]}]}
    return ingest_landed(settings, now=now)


def ingest_feedback_source(
    settings: Settings, *, feedback_dir: str | None = None, now: datetime | None = None
) -> dict:
    """Load one given feedback folder, or every new complete feedback export of the landing zone."""
    if feedback_dir:
        report = ingest(settings, feedback_dir, now=now)
        return {"skipped": False, "loaded": [{"drop_id": Path(feedback_dir).name, "rows": report["loaded"]}]}
    return ingest_landed_feedback(settings, now=now)


def campaign_id_for(logical_date: str | datetime | None) -> str:
    """Derive a campaign id from a run's logical date (one campaign per scheduled run)."""
    if logical_date is None:
        raise ValueError("a campaign id is needed: pass campaign_id, or run with a logical date")
    from mlpkg.db.queries import as_utc

    return f"cmp-{as_utc(logical_date):%Y%m%d}"


# --- product stages ------------------------------------------------------------------------------------


def ingest(
    settings: Settings, batch_dir: str | Path, *, now: datetime | None = None, dry_run: bool = False
) -> dict:
    """Validate and load one raw batch (see :func:`mlpkg.data.ingest_batch`).

    With ``dry_run`` the batch is validated and ``changes`` says, per table, how many rows would be
    new, unchanged replays, updated snapshot rows or corrected orders; nothing is written or moved.
    """
    from mlpkg.data import ingest_batch

    report = ingest_batch(_engine(settings), Path(batch_dir), settings, now=now or utcnow(), dry_run=dry_run)
    return report.as_dict()


def check_budget(budget: float | None) -> float | None:
    """Return a campaign budget if it is usable (``None`` means the configured default).

    Raises:
        ValueError: The budget is not a finite number (``inf``, ``nan``) or is negative.
    """
    if budget is None:
        return None
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"budget must be a finite number, got {budget!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"budget must be a finite number, got {value}")
    if value < 0:
        raise ValueError(f"budget must be positive, got {value:g}")
    return value


def require_campaign(settings: Settings, campaign_id: str) -> str:
    """Return ``campaign_id`` if the warehouse holds that campaign.

    Raises:
        LookupError: No such campaign; the message lists the known ids (or says there are none).
    """
    from sqlalchemy import select

    from mlpkg.db import models as m
    from mlpkg.db.engine import session_scope

    with session_scope(_engine(settings)) as session:
        if session.get(m.Campaign, campaign_id) is not None:
            return campaign_id
        known = sorted(session.execute(select(m.Campaign.campaign_id)).scalars())
    listing = f"known campaign ids: {', '.join(known)}" if known else "the warehouse holds no campaign yet"
    raise LookupError(f"unknown campaign id {campaign_id!r} in table campaigns; {listing}")


def import_log(
    settings: Settings, file: str | Path, spec_path: str | Path, now: datetime | None = None
) -> dict:
    """Validate a bring-your-own campaign log against its YAML spec and import it.

    See :func:`mlpkg.campaign_logs.import_campaign_log`: a rejected log is quarantined and the
    warehouse is left unchanged; re-importing the same file is a no-op.
    """
    from mlpkg.campaign_logs import import_campaign_log, load_log_spec

    spec = load_log_spec(Path(spec_path))
    return import_campaign_log(_engine(settings), Path(file), spec, settings, now=now or utcnow())


def model_name_for(settings: Settings, log_names: list[str] | None) -> str:
    """Registered-model name: the shop's model, or ``<name>-<log>`` for one imported log's own arms."""
    if not log_names:
        return settings.registered_model_name
    from mlpkg.db import models as m
    from mlpkg.db.engine import session_scope

    with session_scope(_engine(settings)) as session:
        logs = [session.get(m.CampaignLog, name) for name in log_names]
    missing = [n for n, log in zip(log_names, logs, strict=True) if log is None]
    if missing:
        raise LookupError(f"no campaign log named {missing} in the warehouse (couponops import-log first)")
    imported = [
        log.name
        for log in logs
        if (log.spec or {}).get("format") not in ("shop-export", "couponops-campaign")
    ]
    if not imported:
        return settings.registered_model_name
    if len(log_names) > 1:
        raise ValueError(f"train an imported log on its own (its arms are its own): got {log_names}")
    return f"{settings.registered_model_name}-{imported[0]}"


def train(
    settings: Settings, ctx: RunContext, *, log_names: list[str] | None = None, now: datetime | None = None
) -> dict:
    """Build a point-in-time training snapshot, train, log and register a model version.

    The MLflow run is named ``train · <dag or cli> · <date>`` (the run's logical date, else
    ``now``) and renamed ``<dag or cli> · v<version> · <date>`` once the version is registered.
    Idempotent per run: a second call with the same run context returns the first result.
    """
    import pandas as pd
    from sqlalchemy import func, select

    from mlpkg.campaign_logs import training_columns
    from mlpkg.data import training_frame
    from mlpkg.db import models as m
    from mlpkg.db.engine import session_scope
    from mlpkg.db.queries import as_utc
    from mlpkg.features import feature_snapshot_id
    from mlpkg.gate import gate_economics, holdout_mask, holdout_rule
    from mlpkg.model_selection import choose_family
    from mlpkg.models.redemption import fit_redemption
    from mlpkg.registry import make_client
    from mlpkg.train import train_tlearner_model, train_uplift_model

    engine = _engine(settings)
    snap_dir = settings.state_dir / "snapshots"
    with session_scope(engine) as session:
        done = session.execute(
            select(m.TrainingRun).where(m.TrainingRun.run_key == ctx.run_key)
        ).scalar_one_or_none()
        if done is not None:
            return {
                "mlflow_run_id": done.mlflow_run_id,
                "model_version": done.model_version,
                "snapshot_id": done.snapshot_id,
                "test_frame": str(snap_dir / f"{done.snapshot_id}-test.parquet"),
                "idempotent_rerun": True,
            }
    model_name = model_name_for(settings, log_names)
    frame = training_frame(engine, log_names)
    # Each log names its own features and arms: an imported log's are not the shop's.
    numeric, categorical, arms = training_columns(engine, frame)
    snapshot_id = feature_snapshot_id(frame)
    snap_dir.mkdir(parents=True, exist_ok=True)
    snapshot_path = snap_dir / f"{snapshot_id}.parquet"
    frame.to_parquet(snapshot_path, index=False)
    # Short names the MLflow UI does not cut to one shared prefix: who trained, which version, when.
    who = ctx.dag_id.removeprefix("couponops_")
    day = (as_utc(ctx.logical_date) if ctx.logical_date else as_utc(now or utcnow())).date().isoformat()
    # The gate's frozen holdout: the same customers in every snapshot, never trained on.
    holdout = holdout_mask(frame["customer_id"], settings.gate.holdout_share)
    tags = {
        **ctx.tags(),
        "data.snapshot_id": snapshot_id,
        "git.commit": git_commit(),
        "data.logs": ",".join(sorted(frame["log_name"].unique())),
        "data.holdout": holdout_rule(settings.gate.holdout_share),
        "data.holdout_rows": str(int(holdout.sum())),
        "data.holdout_customers": str(int(frame.loc[holdout, "customer_id"].nunique())),
    }
    # The family (network, gradient-boosting or logistic T-learner) is chosen on the log's own
    # validation part by the policy value of its budget-constrained allocation.
    choice = choose_family(
        frame,
        holdout,
        numeric,
        categorical,
        arms,
        settings=settings,
        economics_for=lambda rows, columns: gate_economics(engine, settings, rows, columns),
    )
    # What a contact costs in coupons: P(redeemed), learnt from the logs that record redemptions.
    redemption = fit_redemption(frame[~holdout], numeric, categorical, seed=settings.trainer.seed)
    common = dict(
        settings=settings,
        tracking_uri=settings.resolved_tracking_uri,
        experiment=settings.mlflow_experiment,
        run_name=f"train · {who} · {day}",
        tags={**tags, **choice.tags()},
        registered_model_name=model_name,
        snapshot_id=snapshot_id,
        snapshot_source=str(snapshot_path),
        version_run_name=f"{who} · v{{version}} · {day}",
        holdout=holdout,
        redemption=redemption,
    )
    if choice.family == "network":
        result = train_uplift_model(frame, numeric, categorical, arms, **common)
    else:
        result = train_tlearner_model(frame, numeric, categorical, arms, family=choice.family, **common)
    if not choice.table.empty:
        make_client(settings.resolved_tracking_uri).log_text(
            result.mlflow_run_id, choice.table.to_csv(index=False), "selection/families.csv"
        )
    test_path = snap_dir / f"{snapshot_id}-test.parquet"
    pd.DataFrame(result.test_frame).to_parquet(test_path, index=False)
    with session_scope(engine) as session:
        labelled = int(session.execute(select(func.coalesce(func.sum(m.CampaignLog.n_rows), 0))).scalar_one())
        session.add(
            m.TrainingRun(
                mlflow_run_id=result.mlflow_run_id,
                model_name=model_name,
                model_version=result.registered_version,
                trained_at=now or utcnow(),
                n_rows=len(frame),
                labelled_rows_seen=labelled,
                snapshot_id=snapshot_id,
                run_key=ctx.run_key,
            )
        )
    return {
        "model_name": model_name,
        "mlflow_run_id": result.mlflow_run_id,
        "model_version": result.registered_version,
        "snapshot_id": snapshot_id,
        "test_frame": str(test_path),
        "model_family": choice.family,
        "family_choice": choice.reason,
        "metrics": {k: round(float(v), 5) for k, v in result.metrics.items()},
    }


def gate(
    settings: Settings,
    *,
    model_version: str,
    test_frame: str,
    run_id: str | None = None,
    now: datetime | None = None,
    model_name: str | None = None,
) -> dict:
    """Compare the new version with the champion on the frozen holdout; promote only on evidence."""
    import pandas as pd

    from mlpkg.gate import gate_challenger, gate_economics
    from mlpkg.registry import make_client, no_champion_message

    name = model_name or settings.registered_model_name
    uri = settings.resolved_tracking_uri
    engine = _engine(settings)
    decision = gate_challenger(
        make_client(uri),
        engine,
        name=name,
        tracking_uri=uri,
        challenger_version=str(model_version),
        test_frame=pd.read_parquet(test_frame),
        economics_for=lambda rows, arms: gate_economics(engine, settings, rows, arms),
        gate=settings.gate,
        now=now or utcnow(),
        run_id=run_id,
    )
    out = {**decision.as_dict(), "model_name": name, "summary": decision.sentence()}
    if not decision.promoted and decision.champion_version is None:
        # Nothing to allocate with yet: say why and how to go on, here rather than at the next command.
        own = name == settings.registered_model_name
        log_name = None if own else name.removeprefix(f"{settings.registered_model_name}-")
        out["next_step"] = no_champion_message(make_client(uri), name, log_name=log_name)
    return out


def promote(
    settings: Settings, version: str, *, actor: str, reason: str, log_name: str | None = None
) -> dict:
    """Make a version the champion by hand and record who did it and why.

    ``log_name`` picks an imported log's own model (``couponops train --log NAME`` registers it).
    """
    from mlpkg.registry import make_client
    from mlpkg.registry import promote as _promote

    client = make_client(settings.resolved_tracking_uri)
    name = model_name_for(settings, [log_name] if log_name else None)
    versions = sorted(
        (str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=lambda v: int(v)
    )
    if str(version) not in versions:
        listing = f"its versions: {', '.join(versions)}" if versions else "it has no versions (train first)"
        raise LookupError(f"registered model {name!r} has no version {str(version)!r}; {listing}")
    previous = _promote(
        client,
        _engine(settings),
        name=name,
        version=str(version),
        actor=actor,
        reason=reason,
        now=utcnow(),
    )
    return {"model": name, "champion": str(version), "previous": previous}


def _champion(settings: Settings, *, cold_start: bool) -> tuple[str | None, str | None]:
    """Return the champion's (version, pinned model URI); ``(None, None)`` for an allowed cold start."""
    from mlpkg.registry import CHAMPION, alias_version, make_client, no_champion_message

    client = make_client(settings.resolved_tracking_uri)
    version = alias_version(client, settings.registered_model_name, CHAMPION)
    if version is None and not cold_start:
        raise LookupError(
            no_champion_message(client, settings.registered_model_name)
            + ", or allow a cold start (pure exploration)"
        )
    return version, (f"models:/{settings.registered_model_name}/{version}" if version else None)


def _live_challenger(settings: Settings, champion: str | None) -> tuple[str | None, str | None]:
    """Return the live challenger's (version, pinned model URI), ``(None, None)`` when there is none.

    See :func:`mlpkg.registry.live_challenger`; ``campaign.challenger_share=0`` turns it off.
    """
    from mlpkg.registry import live_challenger, make_client

    if settings.campaign.challenger_share <= 0:
        return None, None
    client = make_client(settings.resolved_tracking_uri)
    name = settings.registered_model_name
    version = live_challenger(client, name, champion=champion, confidence=settings.gate.confidence)
    return version, (f"models:/{name}/{version}" if version else None)


def allocate(
    settings: Settings,
    ctx: RunContext,
    *,
    campaign_id: str,
    as_of: datetime | str,
    budget: float | None = None,
    objective: str | None = None,
    now: datetime | None = None,
    cold_start: bool = False,
) -> dict:
    """Allocate a campaign with the current champion and write the ledger, scoring in-process.

    With ``cold_start`` and no champion yet, the campaign is pure exploration within the budget.
    A live challenger (:func:`_live_challenger`) allocates its share of the model group.
    """
    from mlpkg.allocation.campaign import allocate_campaign
    from mlpkg.db.queries import as_utc

    budget = check_budget(budget)
    version, model_uri = _champion(settings, cold_start=cold_start)
    challenger_version, challenger_uri = _live_challenger(settings, version)
    return allocate_campaign(
        _engine(settings),
        settings,
        campaign_id=campaign_id,
        as_of=as_utc(as_of).to_pydatetime(),
        run_key=ctx.run_key,
        model_uri=model_uri,
        model_version=version,
        now=now or utcnow(),
        budget=budget,
        objective=objective,
        challenger_uri=challenger_uri,
        challenger_version=challenger_version,
    )


def plan_scoring(
    settings: Settings,
    ctx: RunContext,
    *,
    campaign_id: str | None = None,
    as_of: datetime | str | None = None,
    objective: str | None = None,
    n_shards: int | None = None,
    cold_start: bool = False,
) -> list[dict] | dict:
    """Split a campaign's scoring into shard jobs (one Airflow mapped task each), pinned to the champion.

    The point in time defaults to the product's clock (:func:`product_now`) and the campaign id to
    ``cmp-<that day>``.

    Returns:
        The jobs, or a :func:`skipped` result with the reason when there is nothing to allocate:
        no data loaded yet, no champion (and no cold start allowed), or the campaign of this day
        already allocated by another run.
    """
    from sqlalchemy import select

    from mlpkg.allocation.shards import plan_scoring_jobs
    from mlpkg.db import models as m
    from mlpkg.db.engine import session_scope
    from mlpkg.db.queries import as_utc, get_campaign

    when = as_utc(as_of).to_pydatetime() if as_of else product_now(settings, ctx)
    if when is None:
        return skipped(f"no batch has been loaded from {settings.resolved_landing_url} yet: nothing to score")
    campaign_id = campaign_id or campaign_id_for(when)
    with session_scope(_engine(settings)) as session:
        if session.execute(select(m.Customer.customer_id).limit(1)).first() is None:
            return skipped("the warehouse holds no customers yet: nothing to score")
        existing = get_campaign(session, campaign_id)
        if existing is not None and existing.run_key != ctx.run_key:
            return skipped(
                f"campaign {campaign_id} was already allocated by run {existing.run_key} "
                f"(status {existing.status}); no new campaign until new data lands"
            )
    try:
        version, model_uri = _champion(settings, cold_start=cold_start)
    except LookupError as exc:
        return skipped(f"{exc} (couponops_train bootstraps one when labelled data lands)")
    challenger_version, challenger_uri = _live_challenger(settings, version)
    jobs = plan_scoring_jobs(
        campaign_id=campaign_id,
        run_key=ctx.run_key,
        as_of=when,
        model_uri=model_uri,
        model_version=version,
        challenger_uri=challenger_uri,
        challenger_version=challenger_version,
        objective=objective or settings.campaign.objective,
        n_shards=n_shards or settings.campaign.score_shards,
    )
    return [job.as_dict() for job in jobs]


def score_shard(settings: Settings, job: dict) -> dict:
    """Score one shard of a campaign (a job from :func:`plan_scoring`); returns the job and its file."""
    from mlpkg.allocation.shards import ScoringJob
    from mlpkg.allocation.shards import score_shard as _score_shard

    return {**job, **_score_shard(_engine(settings), settings, ScoringJob.from_dict(job))}


def allocate_scored(
    settings: Settings,
    ctx: RunContext,
    shards: list[dict],
    *,
    budget: float | None = None,
    now: datetime | None = None,
) -> dict:
    """Merge a run's scored shards, solve once and write the ledger; the shard files are removed after.

    Raises:
        mlpkg.allocation.shards.ShardMismatchError: the shards are not exactly this run's.
    """
    import shutil

    from mlpkg.allocation.campaign import allocate_campaign
    from mlpkg.allocation.shards import ScoringJob, ShardMismatchError, merge_shards, shard_dir
    from mlpkg.db.queries import as_utc

    budget = check_budget(budget)
    if not shards:
        raise ShardMismatchError(f"run {ctx.run_key}: no scoring shards to allocate from")
    job = ScoringJob.from_dict(shards[0])
    if job.run_key != ctx.run_key:
        raise ShardMismatchError(
            f"scoring shards of run {job.run_key!r} cannot be allocated by run {ctx.run_key!r}"
        )
    engine = _engine(settings)
    summary = allocate_campaign(
        engine,
        settings,
        campaign_id=job.campaign_id,
        as_of=as_utc(job.as_of).to_pydatetime(),
        run_key=ctx.run_key,
        model_uri=job.model_uri,
        model_version=job.model_version,
        now=now or utcnow(),
        budget=budget,
        objective=job.objective,
        scored=lambda: merge_shards(engine, [s["path"] for s in shards], job),
        challenger_uri=job.challenger_uri,
        challenger_version=job.challenger_version,
    )
    shutil.rmtree(shard_dir(settings, job), ignore_errors=True)
    return {**summary, "campaign_id": job.campaign_id, "shards": len(shards)}


def plan(
    settings: Settings,
    *,
    campaign_id: str,
    as_of: datetime | str,
    objective: str | None = None,
    budgets: list[float] | None = None,
) -> dict:
    """Tabulate and plot expected value vs budget with the champion (the what-if curve)."""
    from mlpkg.allocation.plan import budget_curve, plot_budget_curve
    from mlpkg.db.queries import as_utc

    budgets = [check_budget(b) for b in budgets] if budgets else budgets
    _, model_uri = _champion(settings, cold_start=False)
    objective = objective or settings.campaign.objective
    table = budget_curve(
        _engine(settings),
        settings,
        as_of=as_utc(as_of).to_pydatetime(),
        model_uri=model_uri,
        objective=objective,
        budgets=budgets,
    )
    out = settings.reports_dir / f"plan-{campaign_id}"
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "budget_curve.csv", index=False)
    plot = plot_budget_curve(
        table, out / "budget_curve.png", objective=objective, current_budget=settings.campaign.budget
    )
    return {
        "table": table.round(4).to_dict("records"),
        "csv": str(out / "budget_curve.csv"),
        "plot": str(plot),
    }


def allocate_log(
    settings: Settings,
    *,
    log_name: str,
    customers_file: str | Path,
    budget: float,
    objective: str = "conversions",
    out: str | Path = "allocations.csv",
) -> dict:
    """Allocate an imported log's arms to a customers file within a budget; write ``customer_id,arm``."""
    from mlpkg.allocation.imported import allocate_imported

    budget = check_budget(budget)
    return allocate_imported(
        _engine(settings),
        settings,
        log_name=log_name,
        customers_file=Path(customers_file),
        budget=budget,
        objective=objective,
        out=Path(out),
    )


def deliver(settings: Settings, campaign_id: str, *, now: datetime | None = None) -> dict:
    """Enqueue a campaign's messages in the outbox and send them exactly-once in effect."""
    from mlpkg.delivery.dispatch import deliver_campaign

    require_campaign(settings, campaign_id)
    return deliver_campaign(_engine(settings), campaign_id, settings, now or utcnow())


def train_recommender(settings: Settings, *, as_of: datetime | None = None, now: datetime | None = None,
                      actor: str = "cli") -> dict:
    """Evaluate the recommender on a time split, fit it on the history before ``as_of``, register it.

    ``as_of`` defaults to the product's clock (see :func:`product_now`).
    """
    from mlpkg.recommend.training import train_recommender as _train

    now = now or utcnow()
    as_of = as_of or product_now(settings) or now
    return _train(_engine(settings), settings, as_of, actor=actor, now=now,
                  tags={"couponops.actor": actor, "git.commit": git_commit()})


def recommend(settings: Settings, campaign_id: str, *, now: datetime | None = None,
              actor: str = "cli") -> dict:
    """Rank in-stock products for a campaign's treated customers with the champion recommender.

    Without a champion (the first campaign) one is trained on the history before the campaign's
    as-of time first; a shop without products is skipped (messages then show none).
    """
    from mlpkg import registry
    from mlpkg.db import queries as q
    from mlpkg.db.engine import session_scope
    from mlpkg.recommend.training import recommend_campaign

    require_campaign(settings, campaign_id)
    now = now or utcnow()
    engine = _engine(settings)
    with session_scope(engine) as session:
        as_of = q.as_utc(q.get_campaign(session, campaign_id).as_of).to_pydatetime()
        has_products = q.has_products(session)
    if not has_products:
        return skipped("the warehouse holds no products (no products.csv loaded): messages show none")
    name = settings.recommender.registered_model_name
    trained = None
    loaded = registry.load_recommender(settings.resolved_tracking_uri, name)
    if loaded is None:
        trained = train_recommender(settings, as_of=as_of, now=now, actor=actor)
        loaded = registry.load_recommender(settings.resolved_tracking_uri, name, trained["alias"])
    model, version = loaded
    result = recommend_campaign(engine, settings, campaign_id, model, version, now)
    return {**result, "trained": trained}


def preview(settings: Settings, campaign_id: str, customer_id: str) -> dict:
    """Render the campaign's message to one customer and write it under ``<state>/previews/``.

    ``customer_id`` is the shop's id or the warehouse's pseudonym. Writes ``<pseudonym>.txt``
    (subject, blank line, text body) and, for email, ``<pseudonym>.html``; no address is written.

    Raises:
        LookupError: no such campaign, or the campaign sends that customer nothing.
    """
    from mlpkg.db import queries as q
    from mlpkg.db.engine import session_scope
    from mlpkg.delivery.outbox import message_payload
    from mlpkg.delivery.templates import renderer_for
    from mlpkg.privacy import pseudonym_key, stored_id

    require_campaign(settings, campaign_id)
    customer = stored_id(pseudonym_key(settings), str(customer_id).strip())
    with session_scope(_engine(settings)) as session:
        as_of = q.as_utc(q.get_campaign(session, campaign_id).as_of).to_pydatetime()
        payload = message_payload(session, campaign_id, customer, sent_at=as_of,
                                  products_per_message=settings.recommender.products_per_message)
    if payload is None:
        raise LookupError(f"campaign {campaign_id!r} sends customer {customer_id!r} no coupon (not treated)")
    rendered = renderer_for(settings).render(payload)
    folder = settings.previews_dir / campaign_id
    folder.mkdir(parents=True, exist_ok=True)
    text = folder / f"{customer}.txt"
    text.write_text(f"Subject: {rendered.subject}\n\n{rendered.text}", encoding="utf-8")
    out = {"campaign_id": campaign_id, "customer_id": customer, "channel": payload["channel"],
           "coupon_id": payload["coupon_id"], "products": [p["product_id"] for p in payload["products"]],
           "subject": rendered.subject, "text": str(text), "html": None}
    if rendered.html:
        html = folder / f"{customer}.html"
        html.write_text(rendered.html, encoding="utf-8")
        out["html"] = str(html)
    return out


def explain(settings: Settings, campaign_id: str, customer_id: str) -> dict:
    """Return why one customer got their arm (or none) in a campaign: the ledger row and its reason.

    ``customer_id`` is the shop's id (as in its exports) or the stored pseudonym.

    Raises:
        LookupError: Unknown campaign, or the campaign has no ledger row for the customer.
    """
    from mlpkg.db import queries as q
    from mlpkg.db.engine import session_scope
    from mlpkg.privacy import pseudonym_key, stored_id

    require_campaign(settings, campaign_id)
    customer_id = str(customer_id).strip()
    stored = stored_id(pseudonym_key(settings), customer_id)
    with session_scope(_engine(settings)) as session:
        row = q.allocation_reason(session, campaign_id, stored)
        campaign = q.get_campaign(session, campaign_id)
        objective, status = campaign.objective, campaign.status
        prices = (campaign.summary or {}).get("reasons")
    if row is None:
        shown = repr(customer_id) if stored == customer_id else f"{customer_id!r} (stored as {stored})"
        raise LookupError(
            f"unknown customer {shown} in campaign {campaign_id!r}: "
            "the campaign's ledger has no row for them (give the shop's customer id as in its exports)"
        )
    row["created_at"] = row["created_at"].isoformat() if row.get("created_at") else None
    if row["reason"] is not None:
        row["reason"]["created_at"] = row["reason"]["created_at"].isoformat()
    return {"campaign_id": campaign_id, "customer": customer_id, "stored_id": stored, "objective": objective,
            "campaign_status": status, "reasons_summary": prices, **row}  # fmt: skip


def evaluate_policy(
    settings: Settings,
    policy: str | Path,
    *,
    log: str | None = None,
    campaign: str | None = None,
    compare: str | Path | None = None,
    outcome: str = "converted",
) -> dict:
    """Estimate a candidate policy's value offline on a campaign log or on one of our campaigns.

    Raises:
        ValueError: neither or both of ``log`` and ``campaign``, an unknown outcome, or a policy
            file that breaks a rule (:class:`mlpkg.offline_eval.PolicyFileError`).
        LookupError: no such log or campaign.
    """
    from mlpkg import offline_eval

    if (log is None) == (campaign is None):
        raise ValueError("give one of --log NAME (a campaign log) or --campaign ID (one of our campaigns)")
    engine = _engine(settings)
    if log is not None:
        rows = offline_eval.log_rows(engine, log, outcome)
    else:
        require_campaign(settings, str(campaign))
        window = settings.campaign.attribution_window_days
        rows = offline_eval.campaign_rows(engine, str(campaign), window, outcome)
    # A policy names the shop's customers; the warehouse knows them by pseudonym (kept as they are).
    from dataclasses import replace

    from mlpkg.privacy import pseudonym_key, stored_id

    key = pseudonym_key(settings)
    rows = replace(rows, id_of=lambda cid: stored_id(key, cid))
    return offline_eval.evaluate(rows, Path(policy), compare=Path(compare) if compare else None)


def ingest_feedback(settings: Settings, feedback_dir: str | Path, *, now: datetime | None = None) -> dict:
    """Validate and load a feedback batch (idempotent: replayed events change nothing)."""
    return ingest(settings, feedback_dir, now=now)


def measure(settings: Settings, campaign_id: str, *, now: datetime | None = None) -> dict:
    """Attribute feedback to the campaign and measure incrementality vs control."""
    from mlpkg.feedback import measure_campaign
    from mlpkg.reports import campaign_report

    overall = measure_campaign(_engine(settings), settings, campaign_id, now=now or utcnow())
    overall["report"] = str(campaign_report(settings, campaign_id))
    return overall


def measure_due(settings: Settings, ctx: RunContext | None = None, *, now: datetime | None = None) -> dict:
    """Measure every campaign whose attribution window closed (and re-measure on late events).

    Returns:
        What :func:`mlpkg.feedback.measure_due` returns, with a campaign report per measured
        campaign; ``skipped`` with the reason when no window closed and no late event arrived.
    """
    from mlpkg.feedback import measure_due as _measure_due
    from mlpkg.reports import campaign_report

    clock = product_now(settings, ctx if settings.clock == "data" else None)
    if clock is None:
        return skipped("no data has been loaded yet: no campaign to measure")
    result = _measure_due(_engine(settings), settings, clock=clock, now=now or utcnow())
    for row in result["measured"]:
        row["report"] = str(campaign_report(settings, row["campaign_id"]))
    if not result["measured"]:
        waiting = ", ".join(f"{w['campaign_id']} (closes {w['window_closes']})" for w in result["waiting"])
        return skipped(
            "no campaign's attribution window has closed since the last measurement and no late event "
            f"arrived; waiting: {waiting or 'none'}"
            + (
                f"; provisional numbers updated for {', '.join(result['provisional'])}"
                if result["provisional"]
                else ""
            ),
            **result,
        )
    return {"skipped": False, **result}


def needs_bootstrap(settings: Settings) -> dict:
    """Decide whether the train DAG should train now: only while no champion exists.

    Returns:
        ``{"train": True, "reason": ...}`` when there is no champion and labelled rows exist, else
        ``train`` False with the reason (retraining an existing champion is couponops_retrain's job).
    """
    from sqlalchemy import func, select

    from mlpkg.db import models as m
    from mlpkg.db.engine import session_scope

    champion, _ = _champion(settings, cold_start=True)
    if champion is not None:
        return {
            "train": False,
            "reason": f"{settings.registered_model_name} already has a champion (version {champion}); "
            "retraining is couponops_retrain's job (trigger this DAG with conf force=true to train anyway)",
        }
    with session_scope(_engine(settings)) as session:
        rows = int(session.execute(select(func.count()).select_from(m.CampaignLogRow)).scalar_one())
    if rows == 0:
        return {"train": False, "reason": "no labelled campaign rows in the warehouse yet"}
    return {"train": True, "reason": f"no champion yet and {rows} labelled rows to learn from"}


def decide_retrain(
    settings: Settings, ctx: RunContext, *, campaign_id: str | None = None, now: datetime | None = None
) -> dict:
    """Decide whether new feedback warrants retraining; the decision is stored with its reasons."""
    from mlpkg.feedback import decide_retrain as _decide

    return _decide(
        _engine(settings), settings, run_key=ctx.run_key, now=now or utcnow(), campaign_id=campaign_id
    )


def latest_campaign(settings: Settings) -> str | None:
    """Return the id of the most recently created campaign, if any."""
    from mlpkg.db import queries as q
    from mlpkg.db.engine import session_scope

    with session_scope(_engine(settings)) as session:
        rows = q.campaigns(session, limit=1)
        return rows[0].campaign_id if rows else None


def write_json(path: Path, payload: dict) -> Path:
    """Write a JSON file atomically (for summaries and benchmark results)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)
    return path


# --- privacy ---------------------------------------------------------------------------------------


def forget(
    settings: Settings, customer_id: str, *, reason: str, actor: str, now: datetime | None = None
) -> dict:
    """Erase one customer's personal data, keep the ledger's totals (see :func:`mlpkg.privacy.forget`)."""
    from mlpkg.privacy import forget as _forget

    return _forget(_engine(settings), settings, customer_id, reason=reason, actor=actor, now=now or utcnow())


def purge(settings: Settings, ctx: RunContext | None = None, *, now: datetime | None = None) -> dict:
    """Delete behaviour older than the retention setting, on the product's clock (see mlpkg.privacy.purge).

    Returns:
        What :func:`mlpkg.privacy.purge` returns; ``skipped`` when no retention is set or no batch
        was loaded yet (the data clock has no time).
    """
    from mlpkg.privacy import purge as _purge

    if settings.privacy.retention_days is None:
        return skipped("no retention set (COUPONOPS_PRIVACY__RETENTION_DAYS): behaviour events are kept")
    ctx = ctx or RunContext()
    now = now or product_now(settings, ctx)
    if now is None:
        return skipped("no batch has been loaded yet: nothing to purge")
    return _purge(_engine(settings), settings, now=now, actor=ctx.run_key)
