"""Train the multi-arm uplift model, evaluate it on held-out rows and log it to MLflow.

One call, :func:`train_uplift_model`, does the whole stage: split and preprocess, fit with
Lightning (any accelerator/strategy from the settings), compute test metrics on rank 0, log the
self-contained pyfunc and register it. Promotion (aliases), version tags and loading a logged
model are the registry module's job (:mod:`mlpkg.registry`).

Distributed runs: with ``strategy="ddp"`` Lightning re-executes the calling script once per
extra process, so call this from a script or the CLI (not from an interactive session or a
process that must not be re-executed); every process computes the same split from the seed,
and only rank 0 logs the model and returns a populated :class:`TrainResult`.
"""

from __future__ import annotations

import functools
import math
import re
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import sklearn
import torch
from mlflow.data.pandas_dataset import PandasDataset
from mlflow.entities import Metric, Param
from pytorch_lightning.callbacks import Callback, EarlyStopping, ModelCheckpoint
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from mlpkg import progress, registry
from mlpkg.config import Settings
from mlpkg.evaluation.uplift_metrics import (
    auuc,
    consent_eligibility,
    expected_calibration_error,
    ipw_policy_value,
    multi_arm_auuc,
    multi_arm_qini,
    uplift_at_k,
)
from mlpkg.features import feature_snapshot_id
from mlpkg.models.attribution import global_attributions
from mlpkg.models.baseline import GBM_FAMILY_PARAMS, fit_t_learner
from mlpkg.models.lightning import UpliftDataModule, UpliftLitModule, ordered_arms, uplift_losses
from mlpkg.models.network import MultiArmUpliftNet, UpliftEnsemble, build_network
from mlpkg.models.pyfunc import (
    REDEMPTION_ARTIFACT,
    UpliftPyfunc,
    write_model_artifacts,
    write_redemption_artifact,
    write_tlearner_artifacts,
)
from mlpkg.models.redemption import RedemptionModel

#: Epochs without a val/loss improvement before training stops. The validation loss is mostly
#: the baseline's, which settles early while the arm effects still improve; on 200k-customer
#: campaigns a patience of 3 stopped some runs a few epochs short of the better model.
EARLY_STOPPING_PATIENCE = 4
#: Weight of the revenue term in the training loss (conversion is the main target).
REVENUE_WEIGHT = 0.1
#: Longest parameter value MLflow accepts (MLFlowLogger.log_hyperparams would cut at 250).
_MAX_PARAM_CHARS = 6000

_UNSAFE_METRIC_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")
#: The model's target and logging columns, described in the MLflow dataset next to the features.
_LABEL_COLUMNS = ("arm", "converted", "revenue", "propensity")
#: Features whose mean |attribution| is logged as an ``attr/<feature>`` metric (all are in the JSON).
TOP_ATTRIBUTION_METRICS = 10

ExtraMetricsFn = Callable[[pd.DataFrame, dict[str, np.ndarray], list[str]], Mapping[str, float]]


@dataclass
class TrainResult:
    """What a training run produced.

    Attributes:
        mlflow_run_id: The MLflow run (``None`` on non-zero DDP ranks).
        model_uri: ``runs:/<run_id>/model`` of the logged pyfunc (``None`` on non-zero ranks).
        registered_version: Registered model version, when a model name was given.
        metrics: Test metrics logged to the run (``test/...``) plus the best ``val/loss``.
        test_frame: Held-out test rows (raw), for the registry's promotion gate.
        arms: Arm names in head order (control first).
    """

    mlflow_run_id: str | None
    model_uri: str | None
    registered_version: str | None
    metrics: dict[str, float]
    test_frame: pd.DataFrame
    arms: list[str] = field(default_factory=list)


class _EpochProgress(Callback):
    """Report finished epochs to :mod:`mlpkg.progress` (the CLI's bar); rank 0 only."""

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Report ``epoch + 1`` of ``max_epochs``."""
        if trainer.is_global_zero:
            progress.report("training epochs", trainer.current_epoch + 1, trainer.max_epochs)


def git_commit(cwd: str | Path | None = None) -> str:
    """Return the git commit of ``cwd`` (default: the mlpkg source folder), or ``"unknown"``."""
    # The package's own folder, not the caller's working directory: an Airflow worker runs in
    # an arbitrary folder, while an editable install sits in the repository that built the model.
    cwd = Path(__file__).resolve().parent if cwd is None else cwd
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def snapshot_columns(frame: pd.DataFrame, numeric: list[str], categorical: list[str]) -> list[str]:
    """Return the snapshot columns MLflow may describe: the model's features, arm and outcomes.

    An allow-list, so identifiers (``customer_id``), contact details and bookkeeping columns of
    the snapshot never reach MLflow, whatever else the frame holds.
    """
    return [c for c in dict.fromkeys([*numeric, *categorical, *_LABEL_COLUMNS]) if c in frame.columns]


class SnapshotDataset(PandasDataset):
    """A training snapshot as MLflow records it: schema, row count, id and source, never a row.

    MLflow stores a dataset's schema and profile, not its data. The schema comes from the
    snapshot's model columns with no rows (cheap on any size, and no value can leak); the profile
    reports the snapshot's real size, which the empty frame alone would not.
    """

    def __init__(
        self, frame: pd.DataFrame, columns: list[str], *, source: str | None, name: str, digest: str
    ) -> None:
        """Describe ``frame[columns]`` stored at ``source`` (a path or URI; None: the calling code)."""
        empty = frame[columns].head(0)
        with warnings.catch_warnings():
            # MLflow registers its local-file source twice and warns that a path is ambiguous.
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            resolved = mlflow.data.from_pandas(empty, source=source, digest=digest).source
        targets = "converted" if "converted" in columns else None
        super().__init__(empty, source=resolved, targets=targets, name=name, digest=digest)
        self._rows = len(frame)

    @property
    def profile(self) -> dict[str, int]:
        """Return the snapshot's size: rows and cells of the described columns."""
        return {"num_rows": self._rows, "num_elements": self._rows * len(self._df.columns)}


def metric_key(prefix: str, arm: str) -> str:
    """Return an MLflow-safe metric name for a per-arm metric (``@`` is not allowed in names)."""
    return f"{prefix}/{_UNSAFE_METRIC_CHARS.sub('.', arm)}"


def _finite(values: Mapping[str, float]) -> dict[str, float]:
    # MLflow stores NaN, but a NaN metric only hides that an arm had no rows; leave it out.
    return {k: float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}


def _auc(y: np.ndarray, p: np.ndarray) -> float:
    pos = y > 0.5
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _logloss(y: np.ndarray, p: np.ndarray) -> float:
    if len(y) == 0:
        return math.nan
    q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))


def compute_test_metrics(
    frame: pd.DataFrame,
    scores: Mapping[str, np.ndarray],
    arms: list[str],
    *,
    weights: np.ndarray | None = None,
    revenue_weight: float = REVENUE_WEIGHT,
) -> dict[str, float]:
    """Evaluate scores on held-out logged rows.

    Metrics (all ``test/...``): ``loss`` (the training objective), ``auc``, ``logloss`` and
    ``ece`` of the logged arm's conversion probability, the same AUC/logloss per arm, Qini and
    AUUC per treatment arm (``qini/<arm>``, ``auuc/<arm>``) and the Qini's mean over arms
    (``qini``), AUUC and uplift in the top 20 % ranked by the best treatment's uplift, and the
    SNIPS value (conversions and revenue per customer) of the greedy policies "argmax
    P(conversion)" and "argmax expected revenue" next to "control for everyone".

    The uplift rankings compare an arm's rows only with the control rows of customers the arm
    could have reached (:func:`~mlpkg.evaluation.uplift_metrics.consent_eligibility`: consented to
    the arm's channel): a randomized campaign never logs an arm for a customer it cannot reach,
    and counting those customers' control outcomes would reward a ranking for separating
    reachable from unreachable customers rather than for finding uplift. The best-treatment
    rankings take each row's best reachable arm and leave out rows no arm can reach.

    Args:
        frame: Test rows with ``arm``, ``converted``, ``revenue``, ``propensity``.
        scores: ``{"p_conv": [n, A], "revenue": [n, A]}`` as from :meth:`UpliftPyfunc.score_arrays`.
        arms: Arm names in column order; ``arms[0]`` is control.
        weights: Row weights of ``test/loss`` as training used them (default: the stabilised
            inverse-propensity weights of :meth:`UpliftDataModule.row_weights`, mean 1).
        revenue_weight: Weight of the revenue term in ``test/loss``.

    Returns:
        Finite metrics by name.
    """
    p, rev = scores["p_conv"].astype(np.float64), scores["revenue"].astype(np.float64)
    arm_idx = np.array(frame["arm"].astype(str).map({a: i for i, a in enumerate(arms)}), dtype=np.int64)
    # np.array copies: pandas may return read-only views, which torch.from_numpy warns about.
    y = np.array(frame["converted"], dtype=np.float64)
    revenue = np.array(frame["revenue"].fillna(0.0), dtype=np.float64)
    prop = np.array(frame["propensity"], dtype=np.float64)
    rows = np.arange(len(frame))
    p_logged = p[rows, arm_idx]
    m: dict[str, float] = {"test/n_rows": float(len(frame))}

    bce, dev, mask = uplift_losses(
        torch.logit(torch.from_numpy(p), eps=1e-7),
        torch.log(torch.from_numpy(rev).clamp_min(1e-9)),
        torch.from_numpy(arm_idx),
        torch.from_numpy(y),
        torch.from_numpy(revenue),
    )
    if weights is None:
        weights = UpliftDataModule.row_weights(frame)
        weights = weights / weights.mean() if len(weights) else weights
    w = torch.from_numpy(np.asarray(weights, dtype=np.float64))
    revenue_term = (w * mask * dev).sum() / (w * mask).sum().clamp_min(1.0)
    m["test/loss"] = float((w * bce).mean() + revenue_weight * revenue_term)
    m["test/auc"] = _auc(y, p_logged)
    m["test/logloss"] = _logloss(y, p_logged)
    m["test/ece"] = expected_calibration_error(p_logged, y)
    for j, arm in enumerate(arms):
        in_arm = arm_idx == j
        m[metric_key("test/auc", arm)] = _auc(y[in_arm], p_logged[in_arm])
        m[metric_key("test/logloss", arm)] = _logloss(y[in_arm], p_logged[in_arm])

    eligible = consent_eligibility(frame, arms)
    qini = multi_arm_qini(p, arm_idx, y, prop, arms, eligible=eligible)
    m.update({metric_key("test/qini", arm): v for arm, v in qini.items()})
    finite_qini = [v for v in qini.values() if math.isfinite(v)]
    m["test/qini"] = float(np.mean(finite_qini)) if finite_qini else math.nan
    per_arm_auuc = multi_arm_auuc(p, arm_idx, y, prop, arms, eligible=eligible)
    m.update({metric_key("test/auuc", arm): v for arm, v in per_arm_auuc.items()})
    reach = eligible.any(axis=1)
    best_uplift = np.where(eligible, p[:, 1:] - p[:, :1], -np.inf).max(axis=1, initial=-np.inf)[reach]
    treated = arm_idx[reach] > 0
    if treated.any() and not treated.all():
        m["test/auuc"] = auuc(best_uplift, treated, y[reach], prop[reach])
        m["test/uplift_at_20"] = uplift_at_k(best_uplift, treated, y[reach], 0.2)

    expected_revenue = p * rev
    control = np.zeros_like(arm_idx)
    m["test/policy_value_conv"] = ipw_policy_value(p.argmax(axis=1), arm_idx, y, prop, snips=True)
    m["test/policy_value_conv_control"] = ipw_policy_value(control, arm_idx, y, prop, snips=True)
    m["test/policy_value_revenue"] = ipw_policy_value(
        expected_revenue.argmax(axis=1), arm_idx, revenue, prop, snips=True
    )
    m["test/policy_value_revenue_control"] = ipw_policy_value(control, arm_idx, revenue, prop, snips=True)
    return _finite(m)


def _trainer_params(
    settings: Settings,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    data_params: Mapping[str, Any],
    net: MultiArmUpliftNet | UpliftEnsemble,
) -> dict[str, Any]:
    params: dict[str, Any] = {f"trainer.{k}": v for k, v in settings.trainer.model_dump().items()}
    params.update({f"data.{k}": v for k, v in data_params.items()})
    params.update({f"net.{k}": v for k, v in net.config().items()})
    params.update(
        {
            "features.numeric": ",".join(numeric),
            "features.categorical": ",".join(categorical),
            "arms": ",".join(arms),
            "n_arms": len(arms),
            "early_stopping_patience": EARLY_STOPPING_PATIENCE,
        }
    )
    return params


@rank_zero_only
def _log_params(logger: MLFlowLogger, params: Mapping[str, Any]) -> None:
    # Logged directly rather than through logger.log_hyperparams, which truncates every value to
    # 250 characters: a long feature list would be cut silently.
    items = [Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()]
    for start in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        logger.experiment.log_batch(logger.run_id, params=items[start : start + 100])


@rank_zero_only
def _ensure_experiment(tracking_uri: str, experiment: str, artifact_location: str) -> None:
    # Created (or typed) here rather than by MLFlowLogger, which would leave it untyped: the
    # MLflow UI would then open it in GenAI mode instead of on its runs.
    registry.ensure_experiment(
        registry.make_client(tracking_uri),
        experiment,
        artifact_location=artifact_location,
        description=registry.TRAINING_EXPERIMENT_DESCRIPTION,
    )


def _snapshot_dataset(
    frame: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    snapshot_id: str | None,
    source: str | None,
) -> tuple[SnapshotDataset, dict[str, str]]:
    snapshot_id = snapshot_id or feature_snapshot_id(frame)
    dataset = SnapshotDataset(
        frame,
        snapshot_columns(frame, numeric, categorical),
        source=source,
        name="training snapshot",
        digest=snapshot_id[:36],  # MLflow stores at most 36 characters of a dataset digest
    )
    return dataset, {"snapshot_id": snapshot_id, "rows": str(len(frame))}


def _artifact_location(settings: Settings, experiment: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]", "_", experiment)
    return f"{settings.resolved_artifact_root.rstrip('/')}/{slug}"


def train_uplift_model(
    frame: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    *,
    settings: Settings,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    registered_model_name: str | None = None,
    extra_metrics_fn: ExtraMetricsFn | None = None,
    snapshot_id: str | None = None,
    snapshot_source: str | None = None,
    version_run_name: str | None = None,
    holdout: np.ndarray | None = None,
    redemption: RedemptionModel | None = None,
) -> TrainResult:
    """Fit, evaluate, log and (optionally) register the multi-arm uplift model.

    Args:
        frame: Model input frame (features, ``arm``, ``converted``, ``revenue``, ``propensity``).
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        arms: Arm names including ``"control"`` (reordered so control is head 0).
        settings: CouponOps settings; ``settings.trainer`` configures the Trainer and network.
        tracking_uri: MLflow tracking (and registry) URI.
        experiment: MLflow experiment name; created under the settings' artifact root if missing.
        run_name: MLflow run name.
        tags: Lineage tags (``dag_id``, ``run_id``, ``try_number``, ``snapshot_id``...);
            ``git.commit`` is added when absent (and mirrored in MLflow's own source tag).
        registered_model_name: Register the logged model under this name; ``None`` skips it.
        extra_metrics_fn: ``f(test_frame, scores, arms) -> {name: value}``, logged with the
            test metrics (for example the simulator's true uplift in evaluation runs).
        snapshot_id: Id of the training snapshot, the digest of its MLflow dataset input;
            computed from ``frame`` when ``None``.
        snapshot_source: Where the snapshot is stored (a path or URI), the dataset's source.
        version_run_name: Run name once a version is registered, with ``{version}`` in it
            (e.g. ``"retrain · v{version} · 2025-07-07"``); ``None`` keeps ``run_name``.
        holdout: ``bool [len(frame)]`` rows never trained on (the gate's frozen holdout): they
            are the test split; ``None`` draws a row-wise test split.
        redemption: The redemption model logged beside the uplift model (prices a contact's coupon).

    Returns:
        The run id, model URI, registered version, metrics and held-out test rows.
    """
    cfg = settings.trainer
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = UpliftDataModule(
        frame,
        numeric,
        categorical,
        arms,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        seed=cfg.seed,
        holdout=holdout,
        max_weight=cfg.max_weight if cfg.weighting == "stabilised" else 0.0,
    )
    data.setup("fit")
    arms = data.arms
    module = _network(settings, data, numeric)
    net = module.net
    run_tags = _lineage_tags(tags)
    run_tags.setdefault("model_family", "multi_arm_uplift_net")
    previous_uri = mlflow.get_tracking_uri()
    _ensure_experiment(tracking_uri, experiment, _artifact_location(settings, experiment))
    logger = MLFlowLogger(
        experiment_name=experiment,
        run_name=run_name,
        tracking_uri=tracking_uri,
        tags=run_tags,
        artifact_location=_artifact_location(settings, experiment),
        log_model=False,
    )
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    if cfg.num_threads is not None:
        # Intra-op threads for this run only (fit and test scoring); None leaves torch's default.
        torch.set_num_threads(cfg.num_threads)
    try:
        # Each process gets its own folder; only rank 0 writes checkpoints, and only rank 0 reads
        # the best one back, so the folders need not be shared.
        with tempfile.TemporaryDirectory(prefix="ckpt-", dir=settings.state_dir) as ckpt_dir:
            checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/loss", mode="min", save_top_k=1)
            trainer = pl.Trainer(
                accelerator=cfg.accelerator,
                devices=cfg.devices,
                num_nodes=cfg.num_nodes,
                strategy=cfg.strategy,
                precision=cfg.precision,
                max_epochs=cfg.max_epochs,
                # "warn" rather than True: some CUDA kernels have no deterministic variant, and a
                # training run should not fail over bit-exactness.
                deterministic="warn",
                logger=logger,
                callbacks=[
                    EarlyStopping(monitor="val/loss", mode="min", patience=EARLY_STOPPING_PATIENCE),
                    checkpoint,
                    _EpochProgress(),
                ],
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=ckpt_dir,
                log_every_n_steps=50,
            )
            _log_params(
                logger, _trainer_params(settings, numeric, categorical, arms, data.hparams_for_logging(), net)
            )
            trainer.fit(module, datamodule=data)
            test_frame = data.split_frame("test")
            if not trainer.is_global_zero:
                return TrainResult(None, None, None, {}, test_frame, arms)
            best_val = checkpoint.best_model_score
            if checkpoint.best_model_path:
                state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
                module.load_state_dict(state["state_dict"])
        snapshot = _snapshot_dataset(frame, data.numeric, data.categorical, snapshot_id, snapshot_source)
        net = module.net.cpu().eval()
        return _log_model(
            lambda folder: write_model_artifacts(net, data.preprocessor, arms, folder),
            [*data.numeric, *data.categorical],
            data.datasets["test"].tensors[5].numpy().astype(np.float64),
            test_frame,
            arms,
            run_id=logger.run_id,
            tracking_uri=tracking_uri,
            settings=settings,
            run_tags=run_tags,
            best_val_loss=float(best_val) if best_val is not None else math.nan,
            registered_model_name=registered_model_name,
            extra_metrics_fn=extra_metrics_fn,
            snapshot=snapshot,
            version_run_name=version_run_name,
            redemption=redemption,
        )
    finally:
        # MLFlowLogger sets the process-wide tracking URI; give the caller back its own.
        mlflow.set_tracking_uri(previous_uri)
        if cfg.num_threads is not None:
            torch.set_num_threads(threads_before)


def _log_model(
    write_artifacts: Callable[[str], dict[str, str]],
    features: list[str],
    test_weights: np.ndarray | None,
    test_frame: pd.DataFrame,
    arms: list[str],
    *,
    run_id: str,
    tracking_uri: str,
    settings: Settings,
    run_tags: Mapping[str, str],
    best_val_loss: float,
    registered_model_name: str | None,
    extra_metrics_fn: ExtraMetricsFn | None,
    snapshot: tuple[SnapshotDataset, dict[str, str]],
    version_run_name: str | None,
    redemption: RedemptionModel | None,
) -> TrainResult:
    client = registry.make_client(tracking_uri)
    try:
        with tempfile.TemporaryDirectory() as art_dir:
            artifacts = write_artifacts(art_dir)
            if redemption is not None:
                artifacts[REDEMPTION_ARTIFACT] = write_redemption_artifact(redemption, art_dir)
                client.log_batch(run_id, params=[
                    Param("redemption.rows", str(redemption.rows)),
                    Param("redemption.redeemed_share", f"{redemption.redeemed_share:.4f}"),
                    Param("redemption.family", redemption.family),
                    *(Param(f"redemption.log_loss.{f}", f"{v:.5f}")
                      for f, v in redemption.validation_log_loss.items()),
                ])  # fmt: skip
            # Score through the same code path serving uses, so the metrics describe the logged model.
            scorer = UpliftPyfunc().load_artifacts(
                artifacts["config"], artifacts["weights"], artifacts.get(REDEMPTION_ARTIFACT)
            )
            scores = scorer.score_arrays(test_frame)
            metrics = compute_test_metrics(test_frame, scores, arms, weights=test_weights)
            metrics.update(_finite({"val/loss_best": best_val_loss}))
            if extra_metrics_fn is not None:
                metrics.update(_finite(extra_metrics_fn(test_frame, scores, arms)))
            now = int(time.time() * 1000)
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
            drivers = _log_global_attributions(client, run_id, scorer, test_frame, seed=settings.trainer.seed)
            # The inferred signature keeps the training dtypes: MLflow refuses int64 input for a
            # double column and vice versa, and features are built the same way for scoring.
            # score_arrays (the allocator's path) skips this schema check entirely.
            example = test_frame[features].head(5)
            mlflow.set_tracking_uri(tracking_uri)
            with mlflow.start_run(run_id=run_id):
                dataset, dataset_tags = snapshot
                mlflow.log_input(dataset, context="training", tags=dataset_tags)
                info = mlflow.pyfunc.log_model(
                    name="model",
                    # An empty instance: MLflow pickles it by reference to the installed mlpkg, and
                    # the weights travel as artifacts, not inside the pickle.
                    python_model=UpliftPyfunc(chunk_size=settings.campaign.score_chunk_size),
                    artifacts=artifacts,
                    input_example=example,
                    registered_model_name=registered_model_name,
                    # Explicit pins skip MLflow's requirement inference, which re-imports the model
                    # in a subprocess. mlpkg itself must be installed where the model is served.
                    pip_requirements=[
                        f"torch=={torch.__version__.split('+')[0]}",
                        f"scikit-learn=={sklearn.__version__}",
                        f"mlflow=={mlflow.__version__}",
                        f"pandas=={pd.__version__}",
                        f"numpy=={np.__version__}",
                    ],
                )
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    version = None
    if registered_model_name is not None and info.registered_model_version is not None:
        version = str(info.registered_model_version)
        lineage = {k: v for k, v in run_tags.items() if not k.startswith("mlflow.")}
        top = ", ".join(f["feature"] for f in drivers["features"][:5])
        registry.tag_version(client, registered_model_name, version,
                             {**lineage, "mlflow_run_id": run_id, "attributions.top": top})  # fmt: skip
        client.set_tag(run_id, "model.name", registered_model_name)
        client.set_tag(run_id, "model.version", version)
        if version_run_name is not None:
            client.update_run(run_id, name=version_run_name.format(version=version))
    return TrainResult(
        mlflow_run_id=run_id,
        model_uri=f"runs:/{run_id}/model",
        registered_version=version,
        metrics=metrics,
        test_frame=test_frame,
        arms=list(arms),
    )


def _log_global_attributions(
    client: mlflow.MlflowClient, run_id: str, scorer: UpliftPyfunc, test_frame: pd.DataFrame, *, seed: int
) -> dict:
    """Explain the logged model on (a sample of) its test rows and log what drives its uplift.

    Logs ``attributions/global.json`` (every arm and feature), ``global.csv`` (one row per
    feature), ``global.png`` (the top features' mean |contribution|, averaged over arms) and
    ``attr/<feature>`` metrics of the top features.
    """
    started = time.perf_counter()
    doc = global_attributions(scorer, test_frame, seed=seed)
    doc["seconds"] = round(time.perf_counter() - started, 3)
    table = pd.DataFrame(
        [{"feature": f["feature"], "mean_abs": f["mean_abs"], "mean": f["mean"], "direction": f["direction"],
          **{f"mean_abs:{arm}": part["mean_abs"][f["feature"]] for arm, part in doc["arms"].items()}}
         for f in doc["features"]]
    )  # fmt: skip
    client.log_dict(run_id, doc, f"{registry.ATTRIBUTIONS_DIR}/global.json")
    client.log_text(run_id, table.to_csv(index=False), f"{registry.ATTRIBUTIONS_DIR}/global.csv")
    top = doc["features"][:TOP_ATTRIBUTION_METRICS]
    if top:
        client.log_figure(run_id, _attribution_figure(top, doc), f"{registry.ATTRIBUTIONS_DIR}/global.png")
    now = int(time.time() * 1000)
    metrics = {f"attr/{_UNSAFE_METRIC_CHARS.sub('.', f['feature'])}": f["mean_abs"] for f in top}
    client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _finite(metrics).items()])
    return doc


def _attribution_figure(top: list[dict], doc: dict):  # noqa: ANN202 - a matplotlib Figure
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 0.8 + 0.35 * len(top)))
    ax = fig.subplots()
    names = [f["feature"] for f in top][::-1]
    ax.barh(names, [100 * f["mean_abs"] for f in top][::-1], color="#4C72B0")
    ax.set_xlabel("mean |contribution| to the uplift vs control (percentage points)")
    ax.set_title(f"What drives the uplift ({doc['method']}, {doc['rows']:,} test rows, mean over arms)")
    fig.tight_layout()
    return fig


def _lineage_tags(tags: Mapping[str, str] | None) -> dict[str, str]:
    """Return a run's tags: the caller's lineage plus the commit.

    One commit tag for people (``git.commit``, also copied to the version) and MLflow's own
    source tag, which the UI shows in the run's overview rather than among the tags.
    """
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    run_tags.setdefault("git.commit", git_commit())
    run_tags.setdefault("mlflow.source.git.commit", run_tags["git.commit"])
    return run_tags


def _network(settings: Settings, data: UpliftDataModule, numeric: list[str]) -> UpliftLitModule:
    cfg = settings.trainer
    net = build_network(
        dict(
            n_numeric=len(numeric),
            cat_cardinalities=data.preprocessor.cardinalities,
            n_arms=len(data.arms),
            embedding_dim=cfg.embedding_dim,
            hidden_dim=cfg.hidden_dim,
            head_dim=cfg.head_dim,
            dropout=cfg.dropout,
            arms=data.arms,
            arm_heads=cfg.arm_heads,
            members=cfg.ensemble_members,
        )
    )
    net.init_output_bias(*data.training_stats())
    return UpliftLitModule(
        net,
        optimizer=functools.partial(torch.optim.AdamW, lr=cfg.learning_rate, weight_decay=cfg.weight_decay),
        revenue_weight=REVENUE_WEIGHT,
    )


def fit_family(
    family: str,
    frame: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    *,
    settings: Settings,
) -> Any:
    """Fit one model family on ``frame`` without logging anything; return a scorer.

    The scorer has ``arms`` (control first) and ``score_arrays(df)``, like a loaded model. The
    network trains on the CPU with the settings' network and early stopping on a validation part
    of ``frame``; ``gbm`` and ``logistic`` are the T-learners of :mod:`mlpkg.models.baseline`.

    Args:
        family: ``network``, ``gbm`` or ``logistic``.
        frame: Model input rows to fit on.
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        arms: Arm names including control.
        settings: CouponOps settings (``trainer`` for the network and the seed).

    Returns:
        The fitted scorer.
    """
    cfg = settings.trainer
    if family in ("gbm", "logistic"):
        with warnings.catch_warnings():
            # An arm without enough rows gets a constant rate; the warning says so per arm.
            warnings.simplefilter("ignore", UserWarning)
            return fit_t_learner(
                frame.reset_index(drop=True),
                numeric,
                categorical,
                ordered_arms(arms),
                seed=cfg.seed,
                params=GBM_FAMILY_PARAMS if family == "gbm" else None,
                n_threads=cfg.num_threads or 1,
                family=family,
                weighting="none" if cfg.weighting == "none" else "inverse_propensity",
            )
    if family != "network":
        raise ValueError(f"unknown model family {family!r}; known: network, gbm, logistic")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    data = UpliftDataModule(
        frame.reset_index(drop=True),
        numeric,
        categorical,
        arms,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        # The shares train_uplift_model gives train and validation once the holdout is out.
        fractions=(0.70 / 0.85, 0.15 / 0.85, 0.0),
        max_weight=cfg.max_weight if cfg.weighting == "stabilised" else 0.0,
    )
    data.setup("fit")
    module = _network(settings, data, numeric)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ckpt-", dir=settings.state_dir) as ckpt_dir:
        # The best epoch by val/loss, as train_uplift_model keeps it, not the last one.
        checkpoint = ModelCheckpoint(dirpath=ckpt_dir, monitor="val/loss", mode="min", save_top_k=1)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_epochs=cfg.max_epochs,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[
                EarlyStopping(monitor="val/loss", mode="min", patience=EARLY_STOPPING_PATIENCE),
                checkpoint,
            ],
            default_root_dir=ckpt_dir,
            deterministic="warn",
        )
        trainer.fit(module, datamodule=data)
        if checkpoint.best_model_path:
            state = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
            module.load_state_dict(state["state_dict"])
    with tempfile.TemporaryDirectory() as folder:
        artifacts = write_model_artifacts(module.net.cpu().eval(), data.preprocessor, data.arms, folder)
        return UpliftPyfunc().load_artifacts(artifacts["config"], artifacts["weights"])


def train_tlearner_model(
    frame: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    *,
    family: str,
    settings: Settings,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    tags: Mapping[str, str] | None = None,
    registered_model_name: str | None = None,
    snapshot_id: str | None = None,
    snapshot_source: str | None = None,
    version_run_name: str | None = None,
    holdout: np.ndarray | None = None,
    redemption: RedemptionModel | None = None,
) -> TrainResult:
    """Fit a T-learner family on the non-holdout rows, evaluate on the holdout, log and register it.

    The run looks like a network's: the same naming, lineage tags, snapshot dataset input, test
    metrics and pyfunc (:class:`UpliftPyfunc` holding the T-learner), so the gate, the allocator
    and the UIs treat every family alike.

    Args:
        frame: Model input frame.
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        arms: Arm names including control.
        family: ``gbm`` or ``logistic``.
        settings: CouponOps settings.
        tracking_uri: MLflow tracking (and registry) URI.
        experiment: MLflow experiment name.
        run_name: MLflow run name.
        tags: Lineage tags; ``git.commit`` is added when absent.
        registered_model_name: Register under this name; ``None`` skips it.
        snapshot_id: Id of the training snapshot (its MLflow dataset digest).
        snapshot_source: Where the snapshot is stored.
        version_run_name: Run name once registered, with ``{version}`` in it.
        holdout: ``bool [len(frame)]`` rows never trained on (the test rows); ``None``: 15 % of
            rows drawn at random.
        redemption: The redemption model logged beside the uplift model (prices a contact's coupon).

    Returns:
        The run id, model URI, registered version, metrics and held-out test rows.
    """
    frame = frame.reset_index(drop=True)
    if holdout is None:
        holdout = np.random.default_rng(settings.trainer.seed).random(len(frame)) < 0.15
    test_frame = frame[holdout].reset_index(drop=True)
    learner = fit_family(family, frame[~holdout], numeric, categorical, arms, settings=settings)
    run_tags = {**_lineage_tags(tags), "model_family": f"{family}_tlearner"}
    location = _artifact_location(settings, experiment)
    _ensure_experiment(tracking_uri, experiment, location)
    client = registry.make_client(tracking_uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    run = client.create_run(experiment_id, run_name=run_name, tags=run_tags)
    params = {
        "model_family": f"{family}_tlearner",
        "features.numeric": ",".join(numeric),
        "features.categorical": ",".join(categorical),
        "arms": ",".join(learner.arms),
        "n_arms": len(learner.arms),
        "data.n_rows": len(frame),
        "data.n_train": int((~holdout).sum()),
        "data.n_test": int(holdout.sum()),
        **({f"gbm.{k}": v for k, v in GBM_FAMILY_PARAMS.items()} if family == "gbm" else {}),
    }
    client.log_batch(run.info.run_id, params=[Param(k, str(v)[:_MAX_PARAM_CHARS]) for k, v in params.items()])
    snapshot = _snapshot_dataset(frame, numeric, categorical, snapshot_id, snapshot_source)
    previous_uri = mlflow.get_tracking_uri()
    try:
        return _log_model(
            lambda folder: write_tlearner_artifacts(learner, folder),
            [*numeric, *categorical],
            None,
            test_frame,
            list(learner.arms),
            run_id=run.info.run_id,
            tracking_uri=tracking_uri,
            settings=settings,
            run_tags=run_tags,
            best_val_loss=math.nan,
            registered_model_name=registered_model_name,
            extra_metrics_fn=None,
            snapshot=snapshot,
            version_run_name=version_run_name,
            redemption=redemption,
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)
