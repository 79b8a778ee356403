"""Model registry logic: aliases, version tags, loading a model, the gate, and recorded promotions.

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
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy import Engine

from mlpkg.config import GateSettings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.evaluation.ope import snips
from mlpkg.evaluation.uplift_metrics import expected_calibration_error
from mlpkg.models.pyfunc import UpliftPyfunc

CHAMPION = "champion"
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


@dataclass
class GateDecision:
    """Outcome of comparing a challenger with the champion on the same held-out data."""

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
    required_value: float | None = None
    outcome: str = ""

    def as_dict(self) -> dict:
        """Return a JSON-friendly dict."""
        return asdict(self)

    def sentence(self) -> str:
        """Say the decision in one sentence with its numbers (the version's MLflow description).

        Built only from the decision's fields, so whatever the gate measures is what it says.
        """
        version = f"v{self.challenger_version}"
        mine = _with_stderr(self.challenger_value, self.challenger_stderr)
        theirs = _with_stderr(self.champion_value, self.champion_stderr)
        rows = f"on {self.test_rows:,} held-out rows"
        if self.outcome == "refused":
            guards = self.reason.removeprefix("guard failed: ")
            versus = f" vs champion v{self.champion_version} {theirs}" if self.champion_version else ""
            return f"{version} refused by the gate ({guards}): policy value {mine}{versus} {rows}."
        if self.champion_version is None or self.champion_value is None or self.challenger_value is None:
            calib = _fmt(self.challenger_calibration_error)
            return (
                f"{version} promoted as the first champion: policy value {mine} {rows}, "
                f"calibration error {calib}."
            )
        head = (
            f"{version} promoted over v{self.champion_version}"
            if self.promoted
            else f"{version} kept as challenger, champion v{self.champion_version} stays"
        )
        gain = self.challenger_value - self.champion_value
        text = f"{head}: policy value {mine} vs {theirs}, gain {_fmt(gain, signed=True)}"
        text += _relative(gain, self.champion_value)
        if self.required_value is not None:
            needed = self.required_value - self.champion_value
            text += f" {'>' if self.promoted else '≤'} required {_fmt(needed, signed=True)}"
            text += _relative(needed, self.champion_value)
        return f"{text}, {rows}."


def _fmt(value: float | None, *, signed: bool = False) -> str:
    # Four significant digits: enough to compare two policy values, short enough to read.
    if value is None:
        return "n/a"
    return f"{value:+.4g}" if signed else f"{value:.4g}"


def _with_stderr(value: float | None, stderr: float | None) -> str:
    if stderr is None or value is None:
        return _fmt(value)
    return f"{_fmt(value)} ± {stderr:.2g}"


def _relative(delta: float, base: float) -> str:
    return f" ({delta / base:+.1%})" if base else ""


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


def model_description(gate: GateSettings, treat_fraction: float) -> str:
    """Return the registered model's description: what the model is and how its champion is chosen."""
    return (
        "CouponOps multi-arm uplift model: for every customer it predicts the probability of "
        "conversion and the revenue under control and under each coupon-and-channel arm; campaigns "
        f"give each customer the arm with the best predicted uplift within the budget, using the "
        f"version the '{CHAMPION}' alias points at. Every newly trained version becomes "
        f"'{CHALLENGER}' and is compared with the champion on the same held-out randomized rows: the "
        f"policy value (SNIPS conversions per customer when the top {treat_fraction:.0%} by predicted "
        f"uplift are treated) must beat the champion's by more than {gate.min_policy_value_gain:.1%}, "
        f"with at least {gate.min_test_rows} test rows and a calibration error of at most "
        f"{gate.max_calibration_error:g}, or the champion stays. Each version's description states the "
        "gate's decision and its numbers; a person may also promote a version by hand "
        "(couponops promote), which is recorded in the warehouse with who and why."
    )


def tag_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str]) -> None:
    """Set ``tags`` on a registered model version (lineage: run id, DAG run, snapshot, commit)."""
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, str(value))


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
        order as an object array.

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
    return {
        "p_conv": p,
        "revenue": scores["revenue"],
        "uplift": p - p[:, [model.control_index]],
        "arms": np.asarray(model.arms, dtype=object),
    }


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


def policy_value_on_frame(
    model_uri: str, test_frame: pd.DataFrame, treat_fraction: float, *, tracking_uri: str
) -> dict:
    """Estimate the value of a model's targeting policy on held-out randomized data (SNIPS).

    The policy gives each customer the arm with the highest predicted uplift, treating only the
    ``treat_fraction`` with the largest positive uplift; everyone else gets control.
    """
    scorer = load_uplift_model(model_uri, tracking_uri=tracking_uri)
    arms = list(scorer.arms)
    scores = scorer.score_arrays(test_frame)
    p = scores["p_conv"]
    c0 = arms.index("control")
    uplift = p - p[:, [c0]]
    uplift[:, c0] = 0.0
    best = np.argmax(uplift, axis=1)
    best_uplift = uplift[np.arange(len(p)), best]
    n_treat = int(round(treat_fraction * len(p)))
    order = np.argsort(-best_uplift)
    chosen = np.full(len(p), c0)
    top = order[:n_treat]
    top = top[best_uplift[top] > 0]
    chosen[top] = best[top]
    logged = test_frame["arm"].map({a: i for i, a in enumerate(arms)}).to_numpy()
    known = ~pd.isna(logged)
    logged = logged[known].astype(int)
    y = test_frame["converted"].to_numpy(float)[known]
    prop = test_frame["propensity"].to_numpy(float)[known]
    match = (chosen[known] == logged).astype(float)
    est = snips(match, prop, y)
    calib = expected_calibration_error(p[known][np.arange(len(logged)), logged], y)
    return {
        "policy_value": float(est.value),
        "policy_value_stderr": float(est.stderr),
        "calibration_error": float(calib),
        "test_rows": int(known.sum()),
    }


def gate_challenger(
    client: MlflowClient,
    engine: Engine,
    *,
    name: str,
    tracking_uri: str,
    challenger_version: str,
    test_frame: pd.DataFrame,
    gate: GateSettings,
    treat_fraction: float,
    now: datetime,
    run_id: str | None = None,
) -> GateDecision:
    """Set ``challenger``, compare it with the champion on the same data, promote only if better.

    The comparison is written as version tags on the challenger and as a JSON/CSV table artifact
    of its run, so the decision and its numbers are visible in the MLflow UI.
    """
    move_alias(
        client,
        engine,
        name=name,
        alias=CHALLENGER,
        version=challenger_version,
        actor="gate",
        reason="newly trained version",
        now=now,
    )
    champion = alias_version(client, name, CHAMPION)
    uri = tracking_uri
    chall = policy_value_on_frame(
        f"models:/{name}/{challenger_version}", test_frame, treat_fraction, tracking_uri=uri
    )
    champ = (
        policy_value_on_frame(f"models:/{name}/{champion}", test_frame, treat_fraction, tracking_uri=uri)
        if champion
        else None
    )
    guards = []
    if chall["test_rows"] < gate.min_test_rows:
        guards.append(f"test set has {chall['test_rows']} rows < min_test_rows={gate.min_test_rows}")
    if chall["calibration_error"] > gate.max_calibration_error:
        guards.append(f"calibration error {chall['calibration_error']:.4f} > {gate.max_calibration_error}")
    needed = None
    if champion is None and not guards:
        promoted, reason = True, "no champion yet: first model that passes the guards"
    elif guards:
        promoted, reason = False, "guard failed: " + "; ".join(guards)
    else:
        needed = champ["policy_value"] * (1 + gate.min_policy_value_gain)
        promoted = chall["policy_value"] > needed
        verdict = "beats" if promoted else "does not beat"
        reason = (
            f"challenger policy value {chall['policy_value']:.5f} {verdict} champion "
            f"{champ['policy_value']:.5f} x (1 + {gate.min_policy_value_gain})"
        )
    decision = GateDecision(
        promoted=promoted,
        reason=reason,
        challenger_version=str(challenger_version),
        champion_version=champion,
        challenger_value=chall["policy_value"],
        champion_value=champ["policy_value"] if champ else None,
        challenger_calibration_error=chall["calibration_error"],
        test_rows=chall["test_rows"],
        challenger_stderr=chall.get("policy_value_stderr"),
        champion_stderr=champ.get("policy_value_stderr") if champ else None,
        required_value=needed,
        outcome="refused" if guards else ("promoted" if promoted else "kept"),
    )
    for key, value in decision.as_dict().items():
        client.set_model_version_tag(name, str(challenger_version), f"gate.{key}", str(value))
    summary = decision.sentence()
    client.update_model_version(name, str(challenger_version), description=summary)
    client.update_registered_model(name, description=model_description(gate, treat_fraction))
    if run_id:
        client.set_tag(run_id, "gate.outcome", decision.outcome)
        client.set_tag(run_id, NOTE_TAG, summary)
        with tempfile.TemporaryDirectory() as tmp:
            table = pd.DataFrame(
                [dict(role="challenger", version=challenger_version, **chall)]
                + ([dict(role="champion", version=champion, **champ)] if champ else [])
            )
            table.to_csv(Path(tmp) / "gate_comparison.csv", index=False)
            (Path(tmp) / "gate_decision.json").write_text(
                json.dumps({**decision.as_dict(), "summary": summary}, indent=2)
            )
            client.log_artifacts(run_id, tmp, artifact_path="gate")
    if promoted:
        move_alias(
            client,
            engine,
            name=name,
            alias=CHAMPION,
            version=str(challenger_version),
            actor="gate",
            reason=reason,
            now=now,
            details=decision.as_dict(),
        )
    return decision
