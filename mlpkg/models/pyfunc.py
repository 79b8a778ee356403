"""The uplift model as a self-contained MLflow pyfunc, whichever family won the training.

The logged model carries two artifacts: a JSON config (family, arms, feature lists, and for the
network its fitted preprocessor and hyperparameters) and the fitted parameters: the network's
``state_dict``, or a T-learner (:mod:`mlpkg.models.baseline`) saved with joblib. Loading needs
only the installed ``mlpkg`` package and its pinned libraries; never the training data or a
Lightning checkpoint. Both families score through :meth:`UpliftPyfunc.score_arrays`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import joblib
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

from mlpkg import progress
from mlpkg.models.attribution import UpliftAttributions, attribute_network, attribute_tlearner
from mlpkg.models.baseline import TLearner
from mlpkg.models.network import MultiArmUpliftNet, UpliftEnsemble, build_network
from mlpkg.models.preprocessing import FeaturePreprocessor
from mlpkg.models.redemption import RedemptionModel

CONFIG_ARTIFACT = "config"
WEIGHTS_ARTIFACT = "weights"
#: Optional: the redemption model (:mod:`mlpkg.models.redemption`) that prices a contact's coupon.
REDEMPTION_ARTIFACT = "redemption"
DEFAULT_CHUNK_SIZE = 65_536
_CONFIG_VERSION = 1
_CONTROL_ARM = "control"


def write_model_artifacts(
    net: MultiArmUpliftNet | UpliftEnsemble,
    preprocessor: FeaturePreprocessor,
    arms: list[str],
    directory: str | Path,
) -> dict[str, str]:
    """Write the network weights and config JSON that :class:`UpliftPyfunc` loads.

    Args:
        net: Trained network (any device; weights are saved on CPU).
        preprocessor: The preprocessor fitted on the training split.
        arms: Arm names in head order.
        directory: Existing folder to write into.

    Returns:
        The ``artifacts`` mapping for ``mlflow.pyfunc.log_model``.
    """
    if len(arms) != net.n_arms:
        raise ValueError(f"{len(arms)} arm names for a network with {net.n_arms} heads")
    if _CONTROL_ARM not in arms:
        raise ValueError(f"arms must include {_CONTROL_ARM!r}")
    directory = Path(directory)
    weights = directory / "state_dict.pt"
    config = directory / "uplift_config.json"
    torch.save({k: v.detach().cpu() for k, v in net.state_dict().items()}, weights)
    config.write_text(
        json.dumps(
            {
                "format_version": _CONFIG_VERSION,
                "arms": list(arms),
                "control_arm": _CONTROL_ARM,
                "numeric": list(preprocessor.numeric),
                "categorical": list(preprocessor.categorical),
                "preprocessor": preprocessor.to_dict(),
                "net": net.config(),
            },
            indent=2,
        )
    )
    return {CONFIG_ARTIFACT: str(config), WEIGHTS_ARTIFACT: str(weights)}


def write_tlearner_artifacts(learner: TLearner, directory: str | Path) -> dict[str, str]:
    """Write a fitted T-learner and its config JSON that :class:`UpliftPyfunc` loads.

    Args:
        learner: The fitted T-learner (``learner.arms[0]`` is control).
        directory: Existing folder to write into.

    Returns:
        The ``artifacts`` mapping for ``mlflow.pyfunc.log_model``.
    """
    directory = Path(directory)
    weights = directory / "tlearner.joblib"
    config = directory / "uplift_config.json"
    joblib.dump(learner, weights)
    config.write_text(
        json.dumps(
            {
                "format_version": _CONFIG_VERSION,
                "family": f"{learner.family}_tlearner",
                "arms": list(learner.arms),
                "control_arm": _CONTROL_ARM,
                "numeric": list(learner.numeric),
                "categorical": list(learner.categorical),
            },
            indent=2,
        )
    )
    return {CONFIG_ARTIFACT: str(config), WEIGHTS_ARTIFACT: str(weights)}


def write_redemption_artifact(model: RedemptionModel, directory: str | Path) -> str:
    """Write the redemption model :class:`UpliftPyfunc` loads beside the uplift model; return its path."""
    path = Path(directory) / "redemption.joblib"
    joblib.dump(model, path)
    return str(path)


class UpliftPyfunc(mlflow.pyfunc.PythonModel):
    """Score customers for every arm with the trained multi-arm uplift network.

    ``predict`` returns, per arm ``a``, ``p_conv__{a}`` (conversion probability),
    ``uplift__{a}`` (``p_conv__a - p_conv__control``, treatment arms only) and ``revenue__{a}``
    (expected revenue given conversion), and with a redemption model ``p_redeem__{a}``
    (P(coupon redeemed), treatment arms only), all float32 and aligned with the input index. The
    allocator should call :meth:`score_arrays` on the unwrapped model
    (``loaded.unwrap_python_model()``), which skips DataFrame assembly and MLflow's schema checks:
    through ``PyFuncModel.predict`` MLflow enforces the logged signature, i.e. the training
    frame's dtypes (an int64 column where training had float64 is rejected).

    Args:
        chunk_size: Rows scored per forward pass; bounds peak memory on large batches.
    """

    def __init__(self, chunk_size: int = DEFAULT_CHUNK_SIZE) -> None:
        """Create an empty model; MLflow fills it in :meth:`load_context`."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        self.chunk_size = int(chunk_size)
        self.arms: list[str] = []
        self.net: MultiArmUpliftNet | UpliftEnsemble | None = None
        self.preprocessor: FeaturePreprocessor | None = None
        self.tlearner: TLearner | None = None
        self.redemption: RedemptionModel | None = None
        self.family = "network"

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        """Rebuild the network on CPU from the logged artifacts."""
        self.load_artifacts(
            context.artifacts[CONFIG_ARTIFACT],
            context.artifacts[WEIGHTS_ARTIFACT],
            context.artifacts.get(REDEMPTION_ARTIFACT),
        )

    def load_artifacts(
        self, config_path: str | Path, weights_path: str | Path, redemption_path: str | Path | None = None
    ) -> UpliftPyfunc:
        """Load the config JSON and weights written by :func:`write_model_artifacts`.

        Args:
            config_path: Path of the config JSON.
            weights_path: Path of the saved ``state_dict``.
            redemption_path: Path of the redemption model, when the version has one.

        Returns:
            ``self``, ready to score.
        """
        if redemption_path is not None:
            redemption = joblib.load(redemption_path)
            if not isinstance(redemption, RedemptionModel):
                raise ValueError(f"{redemption_path} does not hold a redemption model")
            self.redemption = redemption
        config = json.loads(Path(config_path).read_text())
        if config.get("format_version") != _CONFIG_VERSION:
            raise ValueError(f"unsupported uplift model config version {config.get('format_version')!r}")
        self.arms = list(config["arms"])
        self.family = str(config.get("family", "network"))
        if self.family != "network":
            learner = joblib.load(weights_path)
            if not isinstance(learner, TLearner) or list(learner.arms) != self.arms:
                raise ValueError(f"{weights_path} does not hold the T-learner its config describes")
            self.tlearner = learner
            return self
        self.preprocessor = FeaturePreprocessor.from_dict(config["preprocessor"])
        net = build_network(config["net"])
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        self.net = net.eval()
        return self

    @property
    def control_index(self) -> int:
        """Position of the control arm in :attr:`arms`."""
        return self.arms.index(_CONTROL_ARM)

    @property
    def feature_columns(self) -> list[str]:
        """Raw input columns the model reads."""
        if self.tlearner is not None:
            return [*self.tlearner.numeric, *self.tlearner.categorical]
        if self.preprocessor is None:
            raise RuntimeError("model not loaded")
        return [*self.preprocessor.numeric, *self.preprocessor.categorical]

    def score_arrays(self, df: pd.DataFrame, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        """Score every arm for every row, without building a DataFrame.

        Args:
            df: Raw customer features (extra columns are ignored).
            chunk_size: Rows per forward pass; defaults to the model's ``chunk_size``.

        Returns:
            ``{"p_conv": [n, A], "revenue": [n, A]}`` float32 arrays, plus ``"p_redeem"``
            (P(coupon redeemed), 0 for control) when the version has a redemption
            model; columns follow :attr:`arms`.
        """
        scores = self._score_uplift(df, chunk_size)
        if self.redemption is not None:
            scores["p_redeem"] = self.redemption.predict(df, self.arms)
        return scores

    def _score_uplift(self, df: pd.DataFrame, chunk_size: int | None) -> dict[str, np.ndarray]:
        if self.tlearner is not None:
            scores = self.tlearner.score_arrays(df)
            progress.report("scoring customers", len(df), len(df))
            return scores
        if self.net is None or self.preprocessor is None:
            raise RuntimeError("model not loaded; call load_artifacts() or load it through MLflow")
        step = int(chunk_size or self.chunk_size)
        n, n_arms = len(df), len(self.arms)
        p_conv = np.empty((n, n_arms), dtype=np.float32)
        revenue = np.empty((n, n_arms), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, n, step):
                x_num, x_cat = self.preprocessor.transform(df.iloc[start : start + step])
                conv_logits, rev_log = self.net(torch.from_numpy(x_num), torch.from_numpy(x_cat))
                p_conv[start : start + step] = torch.sigmoid(conv_logits).numpy()
                revenue[start : start + step] = torch.exp(rev_log.clamp(-20.0, 20.0)).numpy()
                progress.report("scoring customers", min(start + step, n), n)
        return {"p_conv": p_conv, "revenue": revenue}

    def attribute_uplift(
        self, df: pd.DataFrame, arms: np.ndarray, *, reference: pd.DataFrame | None = None
    ) -> UpliftAttributions:
        """Attribute each row's uplift of its arm (vs control) to the source features.

        Integrated gradients for the network, tree SHAP for the ``gbm`` T-learner, exact linear
        attributions for the ``logistic`` one (see :mod:`mlpkg.models.attribution`).

        Args:
            df: Raw customer features (extra columns are ignored).
            arms: ``int [n]`` index into :attr:`arms` of the treatment arm explained per row.
            reference: Rows whose mean input is the reference customer (default: ``df``).

        Returns:
            Per-row signed contributions in conversion-probability points.
        """
        if self.tlearner is not None:
            return attribute_tlearner(self.tlearner, df, arms, reference=reference)
        if self.net is None or self.preprocessor is None:
            raise RuntimeError("model not loaded; call load_artifacts() or load it through MLflow")
        return attribute_network(self.net, self.preprocessor, df, arms, reference=reference)

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext | None,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        """Return per-arm conversion probability, uplift and revenue columns.

        Args:
            context: MLflow context (unused; artifacts are read in :meth:`load_context`).
            model_input: Raw customer features.
            params: Optional ``{"chunk_size": int}``.

        Returns:
            A float32 DataFrame with the input's index.
        """
        chunk_size = int((params or {}).get("chunk_size") or self.chunk_size)
        scores = self.score_arrays(model_input, chunk_size)
        p_conv, revenue = scores["p_conv"], scores["revenue"]
        control = p_conv[:, self.control_index]
        columns: dict[str, np.ndarray] = {}
        for j, arm in enumerate(self.arms):
            columns[f"p_conv__{arm}"] = p_conv[:, j]
        for j, arm in enumerate(self.arms):
            if arm != _CONTROL_ARM:
                columns[f"uplift__{arm}"] = p_conv[:, j] - control
        for j, arm in enumerate(self.arms):
            columns[f"revenue__{arm}"] = revenue[:, j]
        if "p_redeem" in scores:
            for j, arm in enumerate(self.arms):
                if arm != _CONTROL_ARM:
                    columns[f"p_redeem__{arm}"] = scores["p_redeem"][:, j]
        return pd.DataFrame(columns, index=model_input.index)
