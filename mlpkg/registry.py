"""Model registry logic: aliases, version tags, loading a model, and recorded promotions.

This is the only module that loads a logged model (:func:`load_uplift_model`,
:func:`score_with_model`): allocation and the gate score through it, never through training
code. All alias moves go through :func:`move_alias`, which also writes who moved which alias,
why and when into the warehouse, so ``couponops history`` shows every change however it was
made. Aliases (``champion``, ``challenger``) replace MLflow's deprecated stages.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from datetime import datetime
from statistics import NormalDist

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy import Engine

from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.models.pyfunc import UpliftPyfunc

CHAMPION = "champion"
#: Run artifact folder of a training run's global attributions (``global.json``, ``.csv``, ``.png``).
ATTRIBUTIONS_DIR = "attributions"
CHALLENGER = "challenger"
#: Experiment tag the MLflow 3 UI reads to decide what an experiment is for; without it the UI
#: may open the experiment in GenAI mode on an empty Traces page instead of on its runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
#: The UI's value for classic model training ("Machine learning" in the experiment's type menu).
MODEL_TRAINING_KIND = "custom_model_development"
#: Run and experiment tag the MLflow UI shows as the description (rendered as Markdown).
NOTE_TAG = "mlflow.note.content"
#: Description of the training experiment in the MLflow UI.
TRAINING_EXPERIMENT_DESCRIPTION = (
    "Training runs of the CouponOps uplift model: one run per training, named after the DAG or the "
    "CLI, the registered version and the data's date, with its training snapshot as a dataset "
    "input, test metrics under test/, and the promotion gate's decision as the run's description "
    "and under its gate/ artifacts."
)


def make_client(tracking_uri: str) -> MlflowClient:
    """Return a client for ``tracking_uri`` (no global MLflow state is touched)."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def alias_version(client: MlflowClient, name: str, alias: str) -> str | None:
    """Return the version an alias points at, or None when the alias (or model) does not exist."""
    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def ensure_experiment(
    client: MlflowClient, name: str, *, artifact_location: str, description: str | None = None
) -> str:
    """Return the id of experiment ``name``, creating it if missing, typed for model training.

    Idempotent: an existing experiment gets the model-training type tag (so the MLflow UI opens it
    on its runs) and the description when it has none; nothing else about it changes.

    Args:
        client: The tracking client.
        name: Experiment name.
        artifact_location: Artifact root for a new experiment (ignored for an existing one).
        description: Experiment description shown in the UI, set only where none is.

    Returns:
        The experiment id.
    """
    tags = {EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND}
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(
                name, artifact_location=artifact_location, tags={**tags, NOTE_TAG: description or ""}
            )
        except MlflowException:
            exp = client.get_experiment_by_name(name)  # created meanwhile by a concurrent task
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
    if description and not exp.tags.get(NOTE_TAG):
        client.set_experiment_tag(exp.experiment_id, NOTE_TAG, description)
    return exp.experiment_id


def tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a registered model version (lineage: run id, DAG run, snapshot, commit)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


def global_attributions(client: MlflowClient, run_id: str | None) -> dict | None:
    """Return what drives a training run's uplift, as logged at training (``attributions/global.json``).

    Read back as it was logged, never recomputed. ``None`` for a run logged before global
    attributions existed (or no run).
    """
    if not run_id:
        return None
    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(run_id, f"{ATTRIBUTIONS_DIR}/global.json", folder)
        except (MlflowException, OSError):
            return None
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)


def load_uplift_model(model_uri: str, tracking_uri: str | None = None) -> UpliftPyfunc:
    """Load a logged uplift model and return the unwrapped :class:`UpliftPyfunc`.

    Args:
        model_uri: ``models:/<name>@champion``, ``models:/<name>/<version>``, ``runs:/...`` or a path.
        tracking_uri: Tracking/registry URI to resolve ``models:/`` and ``runs:/`` against; the
            process-wide URI is used when ``None`` and is left unchanged either way.

    Returns:
        The loaded model, ready for :meth:`UpliftPyfunc.score_arrays`.

    Raises:
        TypeError: ``model_uri`` holds a model that is not a CouponOps uplift model.
    """
    previous = mlflow.get_tracking_uri()
    if tracking_uri is not None:
        mlflow.set_tracking_uri(tracking_uri)
    try:
        loaded = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(previous)
    model = loaded.unwrap_python_model()
    if not isinstance(model, UpliftPyfunc):
        raise TypeError(f"{model_uri} is not a CouponOps uplift model: {type(model).__name__}")
    return model


def score_with_model(
    model: str | mlflow.pyfunc.PyFuncModel | UpliftPyfunc,
    df: pd.DataFrame,
    chunk_size: int | None = None,
    *,
    tracking_uri: str | None = None,
) -> dict[str, np.ndarray]:
    """Score every arm for ``df`` with a logged model, bypassing DataFrame output.

    Args:
        model: A model URI (``models:/name@champion``, ``runs:/...``), a loaded pyfunc, or an
            :class:`UpliftPyfunc`.
        df: Raw customer features.
        chunk_size: Rows per forward pass; defaults to the model's setting.
        tracking_uri: Where to resolve a model URI (see :func:`load_uplift_model`).

    Returns:
        ``{"p_conv": [n, A], "revenue": [n, A], "uplift": [n, A]}`` float32 arrays (uplift is
        relative to control, 0 in the control column) plus ``"arms"``, the arm names in column
        order as an object array, and ``"p_redeem"`` (P(coupon redeemed)) when the
        version has a redemption model.

    Raises:
        TypeError: ``model`` is not a CouponOps uplift model.
    """
    if isinstance(model, str):
        model = load_uplift_model(model, tracking_uri)
    if isinstance(model, mlflow.pyfunc.PyFuncModel):
        model = model.unwrap_python_model()
    if not isinstance(model, UpliftPyfunc):
        raise TypeError(f"not a CouponOps uplift model: {type(model).__name__}")
    scores = model.score_arrays(df, chunk_size)
    p = scores["p_conv"]
    out = {
        "p_conv": p,
        "revenue": scores["revenue"],
        "uplift": p - p[:, [model.control_index]],
        "arms": np.asarray(model.arms, dtype=object),
    }
    if "p_redeem" in scores:
        out["p_redeem"] = scores["p_redeem"]
    return out


def load_recommender(tracking_uri: str, name: str, alias: str = CHAMPION) -> tuple[object, str] | None:
    """Return the recommender an alias points at and its version, or None when there is none.

    The logged pyfunc (``mlpkg.recommend.pyfunc.RecommenderPyfunc``) is loaded through MLflow and
    unwrapped: the caller ranks with its fitted ``FactorRecommender``.
    """
    client = make_client(tracking_uri)
    version = alias_version(client, name, alias)
    if version is None:
        return None
    mlflow.set_tracking_uri(tracking_uri)
    wrapped = mlflow.pyfunc.load_model(f"models:/{name}@{alias}").unwrap_python_model()
    return wrapped.model, version


def move_alias(
    client: MlflowClient,
    engine: Engine,
    *,
    name: str,
    alias: str,
    version: str,
    actor: str,
    reason: str,
    now: datetime,
    details: dict | None = None,
) -> str | None:
    """Point ``alias`` at ``version`` and record the move; return the previous version."""
    previous = alias_version(client, name, alias)
    client.get_model_version(name, version)  # raises a clear MlflowException for an unknown version
    client.set_registered_model_alias(name, alias, version)
    with session_scope(engine) as session:
        q.record_promotion(
            session,
            model_name=name,
            alias=alias,
            version=str(version),
            previous_version=previous,
            actor=actor,
            reason=reason,
            details=details or {},
            now=now,
        )
    return previous


def promote(
    client: MlflowClient, engine: Engine, *, name: str, version: str, actor: str, reason: str, now: datetime
) -> str | None:
    """Make ``version`` the champion by hand (the CLI's and the MLflow UI user's path)."""
    return move_alias(
        client, engine, name=name, alias=CHAMPION, version=version, actor=actor, reason=reason, now=now
    )


def live_challenger(
    client: MlflowClient, name: str, *, champion: str | None, confidence: float
) -> str | None:
    """Return the version that allocates beside the champion in a live comparison, or None.

    That is the ``challenger`` alias's version when it is newer than the champion, passed the
    gate's guards and was kept for want of evidence without being shown worse: the gate's outcome
    is ``kept`` and the upper bound of its paired gain at the gate's confidence is above zero. A
    refused version (failed guards) or one the holdout showed worse never reaches customers.
    """
    if champion is None:
        return None
    version = alias_version(client, name, CHALLENGER)
    if version is None or int(version) <= int(champion):
        return None
    tags = client.get_model_version(name, version).tags or {}
    if tags.get("gate.outcome") != "kept":
        return None
    try:
        gain, stderr = float(tags["gate.gain"]), float(tags["gate.gain_stderr"])
    except (KeyError, ValueError):
        return None
    if not (np.isfinite(gain) and np.isfinite(stderr)):
        return None
    return version if gain + NormalDist().inv_cdf(confidence) * stderr > 0 else None


def no_champion_message(client: MlflowClient, name: str, *, log_name: str | None = None) -> str:
    """Say why model ``name`` has no champion and how to go on (for every command that needs one).

    Names the newest version and what the gate said about it (its ``gate.reason`` tag), then the
    two ways forward: promote a version by hand with a reason, or bring more data and train again.
    """
    log = f" --log {log_name}" if log_name else ""
    train = f"couponops train{log}"
    try:
        versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    except MlflowException:
        versions = []
    if not versions:
        return f"model {name!r} has no trained version yet; run `{train}` first"
    last = versions[-1]
    tags = last.tags or {}
    outcome = tags.get("gate.outcome")
    reason = tags.get("gate.reason", "").removeprefix("guard failed: ")
    said = {
        "refused": f"was refused by the gate: {reason}",
        "kept": f"was kept by the gate: {reason}",
    }.get(outcome or "", "has not been through the gate")
    return (
        f"model {name!r} has no champion: v{last.version} (the newest of {len(versions)}) {said}. "
        f"To go on, promote a version by hand with a reason (`couponops promote {last.version}{log} "
        f"--reason '...'`), or add data and run `{train}` again"
    )
