"""T-learners: one conversion model per arm, gradient-boosted trees or regularised logistic regression.

Each arm's model sees only the customers logged in that arm, weighted by ``1 / propensity``
(normalised within the arm and capped, so a few rarely-logged rows cannot decide the fit) so
that an arm's training rows stand for the whole population even when the logging policy favoured
some customers. Uplift is the difference between an arm's predicted conversion probability and
control's. Two families:

* ``gbm``: scikit-learn's HistGradientBoostingClassifier with early stopping on an inner
  validation split (strong on tabular data with interactions);
* ``logistic``: standardised (log-compressed) numeric features and one-hot categories into an
  L2-regularised logistic regression whose strength is chosen by cross-validated log loss
  (strong on small, weak-effect logs where trees overfit noise).

Both expose :meth:`TLearner.score_arrays`, the scoring interface of the logged network, so the
product's allocator and gate score either through :class:`mlpkg.models.pyfunc.UpliftPyfunc`.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from sklearn.compose import ColumnTransformer
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegressionCV
from sklearn.pipeline import FunctionTransformer, Pipeline, make_pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler
from threadpoolctl import threadpool_limits

CONTROL_ARM = "control"
# HistGradientBoosting bins categories into at most 255 codes; rarer categories become "missing".
MAX_CATEGORIES = 250
# Arms with fewer rows than this (or a single outcome class) get a smoothed constant rate instead
# of a tree model, which would otherwise fail or overfit.
MIN_ROWS_PER_ARM = 30
PRIOR_STRENGTH = 10.0
# Fewest rows of the rarer outcome an arm's model needs: early stopping and cross-validation
# split each class, and a handful of conversions cannot tell customers apart anyway.
MIN_CLASS_ROWS = 10

DEFAULT_PARAMS: dict[str, object] = {
    "max_iter": 200,
    "learning_rate": 0.05,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
}
#: The ``gbm`` family's settings: more rounds than DEFAULT_PARAMS, stopped early on an inner
#: validation split, and larger leaves (a leaf's uplift is a difference of two noisy rates).
GBM_FAMILY_PARAMS: dict[str, object] = {
    "max_iter": 500,
    "learning_rate": 0.05,
    "max_leaf_nodes": 15,
    "min_samples_leaf": 100,
    "l2_regularization": 1.0,
    "early_stopping": True,
    "validation_fraction": 0.15,
    "n_iter_no_change": 20,
}
#: Inverse regularisation strengths the ``logistic`` family chooses from by 3-fold CV log loss.
LOGISTIC_CS = (0.001, 0.01, 0.1, 1.0, 10.0)
#: Cap on a row's inverse-propensity weight after normalising to mean 1 within its arm.
MAX_WEIGHT = 10.0
FAMILIES = ("gbm", "logistic")


@dataclass
class TLearner:
    """A fitted T-learner: per-arm conversion models over one shared feature encoding.

    Attributes:
        arms: Arm names in output column order; ``arms[0]`` is ``"control"``.
        numeric: Numeric feature columns.
        categorical: Categorical feature columns (encoded with the training categories).
        categories: Known categories per categorical column, in code order.
        models: Per arm, a fitted classifier or a constant conversion rate.
        outcome: Name of the outcome column the models were fitted on.
        n_threads: OpenMP threads for fitting and scoring; ``None`` lets scikit-learn use all cores.
    """

    arms: list[str]
    numeric: list[str]
    categorical: list[str]
    categories: dict[str, list[str]]
    models: dict[str, HistGradientBoostingClassifier | Pipeline | float] = field(default_factory=dict)
    outcome: str = "converted"
    n_threads: int | None = None
    family: str = "gbm"
    mean_revenue: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def thread_limit(self) -> Iterator[None]:
        """Limit OpenMP threads while fitting or scoring, when ``n_threads`` is set.

        On a shared worker, two OpenMP threads competing with other processes for two cores spin
        in barriers and can be several times slower than one thread.

        Yields:
            Nothing; the limit holds inside the ``with`` block.
        """
        if self.n_threads is None:
            yield
            return
        with threadpool_limits(limits=self.n_threads, user_api="openmp"):
            yield

    def encode(self, df: pd.DataFrame) -> np.ndarray:
        """Build the float feature matrix: numeric columns, then categorical codes (NaN if unseen).

        Args:
            df: Frame holding the numeric and categorical columns.

        Returns:
            ``[n, len(numeric) + len(categorical)]`` float matrix.
        """
        missing = [c for c in self.numeric + self.categorical if c not in df.columns]
        if missing:
            raise KeyError(f"feature columns missing from frame: {missing}")
        parts = [df[c].to_numpy(dtype=np.float64, na_value=np.nan) for c in self.numeric]
        for col in self.categorical:
            lookup = {cat: float(code) for code, cat in enumerate(self.categories[col])}
            codes = df[col].astype("string").map(lookup).to_numpy(dtype=np.float64, na_value=np.nan)
            parts.append(codes)
        if not parts:
            raise ValueError("the T-learner needs at least one feature column")
        return np.column_stack(parts)

    def predict_proba_arms(self, df: pd.DataFrame) -> np.ndarray:
        """Predict the conversion probability of every customer under every arm.

        Args:
            df: Frame with the feature columns.

        Returns:
            ``[n, len(arms)]`` matrix, columns in ``arms`` order (column 0 = control).
        """
        x = self.encode(df)
        out = np.empty((x.shape[0], len(self.arms)), dtype=np.float64)
        with self.thread_limit():
            for j, arm in enumerate(self.arms):
                model = self.models[arm]
                if isinstance(model, float):
                    out[:, j] = model
                else:
                    out[:, j] = model.predict_proba(x)[:, list(model.classes_).index(1)]
        return out

    def score_arrays(self, df: pd.DataFrame, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        """Score every arm for every row: the interface of the logged network's pyfunc.

        Args:
            df: Frame with the feature columns (extra columns are ignored).
            chunk_size: Unused (the models score the whole frame at once); kept for the interface.

        Returns:
            ``{"p_conv": [n, A], "revenue": [n, A]}`` float32; revenue given conversion is each
            arm's mean over its converted training rows.
        """
        p = self.predict_proba_arms(df).astype(np.float32)
        fallback = float(np.mean(list(self.mean_revenue.values()))) if self.mean_revenue else 1.0
        revenue = np.array([self.mean_revenue.get(a, fallback) for a in self.arms], dtype=np.float32)
        return {"p_conv": p, "revenue": np.broadcast_to(revenue, p.shape).copy()}

    def predict_uplift(self, df: pd.DataFrame) -> np.ndarray:
        """Predict ``p_conv(arm) - p_conv(control)`` for every treatment arm.

        Args:
            df: Frame with the feature columns.

        Returns:
            ``[n, len(arms) - 1]`` matrix, columns in ``arms[1:]`` order.
        """
        probs = self.predict_proba_arms(df)
        return probs[:, 1:] - probs[:, [0]]

    def score_frame(self, df: pd.DataFrame) -> pd.DataFrame:
        """Score customers into the contract's columns ``p_conv__{arm}`` and ``uplift__{arm}``.

        Args:
            df: Frame with the feature columns (and ``customer_id`` if present, which is kept).

        Returns:
            Frame aligned with ``df``'s index.
        """
        probs = self.predict_proba_arms(df)
        columns: dict[str, np.ndarray] = {}
        if "customer_id" in df.columns:
            columns["customer_id"] = df["customer_id"].to_numpy()
        for j, arm in enumerate(self.arms):
            columns[f"p_conv__{arm}"] = probs[:, j]
        for j, arm in enumerate(self.arms[1:], start=1):
            columns[f"uplift__{arm}"] = probs[:, j] - probs[:, 0]
        return pd.DataFrame(columns, index=df.index)


def category_levels(values: pd.Series) -> list[str]:
    """Return a column's categories, most frequent first, at most :data:`MAX_CATEGORIES`."""
    counts = values.astype("string").dropna().value_counts()
    # Most frequent first so that truncation drops the rare ones; ties by name for reproducibility.
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return [str(cat) for cat, _ in ordered[:MAX_CATEGORIES]]


def fit_t_learner(
    train_df: pd.DataFrame,
    numeric: list[str],
    categorical: list[str],
    arms: list[str],
    *,
    outcome: str = "converted",
    seed: int = 0,
    arm_column: str = "arm",
    propensity_column: str = "propensity",
    params: dict[str, object] | None = None,
    n_threads: int | None = None,
    family: str = "gbm",
    weighting: str = "inverse_propensity",
) -> TLearner:
    """Fit one conversion model per arm on that arm's logged customers.

    With ``weighting="inverse_propensity"`` rows are weighted by ``1 / propensity`` (normalised
    to mean 1 within each arm and capped at :data:`MAX_WEIGHT`) when the propensity column is
    present; with ``"none"`` every row weighs 1 (each arm's model is a regression on the features,
    which the logged assignment depends on, so it needs no reweighting to be unbiased). An arm
    with too few rows or a single outcome class gets a constant rate shrunk towards the overall
    rate instead of a model (with a warning).

    Args:
        train_df: Model input frame (features, ``arm``, outcome, ``propensity``).
        numeric: Numeric feature columns.
        categorical: Categorical (string) feature columns.
        arms: Arms to model, output order; ``arms[0]`` must be ``"control"``.
        outcome: Binary outcome column.
        seed: Random seed for the boosting models.
        arm_column: Column holding the logged arm.
        propensity_column: Column holding the logged arm's propensity.
        params: Overrides for the HistGradientBoostingClassifier parameters (``gbm``; the
            defaults are :data:`DEFAULT_PARAMS`) or ``{"Cs": [...]}`` (``logistic``).
        n_threads: OpenMP threads for fitting and later scoring; ``None`` = all cores.
        family: ``gbm`` or ``logistic`` (see the module docstring).
        weighting: ``inverse_propensity`` or ``none`` (see above).

    Returns:
        The fitted :class:`TLearner`.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if weighting not in ("inverse_propensity", "none"):
        raise ValueError(f"weighting must be inverse_propensity or none, got {weighting!r}")
    if not arms or arms[0] != CONTROL_ARM:
        raise ValueError(f"arms[0] must be {CONTROL_ARM!r}, got {arms[:1]}")
    if len(set(arms)) != len(arms):
        raise ValueError("arms must be unique")
    for col in (arm_column, outcome):
        if col not in train_df.columns:
            raise KeyError(f"training frame has no {col!r} column")
    learner = TLearner(
        arms=list(arms),
        numeric=list(numeric),
        categorical=list(categorical),
        categories={c: category_levels(train_df[c]) for c in categorical},
        outcome=outcome,
        n_threads=n_threads,
        family=family,
    )
    x_all = learner.encode(train_df)
    y_all = train_df[outcome].to_numpy(dtype=np.float64, na_value=np.nan)
    if np.isnan(y_all).any() or not np.isin(y_all, (0.0, 1.0)).all():
        raise ValueError(f"outcome column {outcome!r} must be 0/1 without missing values")
    if propensity_column in train_df.columns and weighting == "inverse_propensity":
        prop = train_df[propensity_column].to_numpy(dtype=np.float64, na_value=np.nan)
        if np.any(~np.isfinite(prop)) or np.any(prop <= 0) or np.any(prop > 1):
            raise ValueError(f"{propensity_column!r} must lie in (0, 1]")
        w_all = 1.0 / prop
    else:
        w_all = np.ones_like(y_all)
    overall_rate = float(np.sum(w_all * y_all) / np.sum(w_all)) if len(y_all) else 0.0
    arm_values = train_df[arm_column].astype("string").to_numpy()
    cat_mask = [False] * len(numeric) + [True] * len(categorical)
    hgb_params = {**DEFAULT_PARAMS, **(params or {})}
    revenue_all = (
        train_df["revenue"].to_numpy(dtype=np.float64, na_value=0.0)
        if "revenue" in train_df.columns
        else np.zeros_like(y_all)
    )
    paid = (y_all > 0.5) & (revenue_all > 0)
    overall_revenue = float(revenue_all[paid].mean()) if paid.any() else 1.0
    for arm in arms:
        rows = arm_values == arm
        x, y, w = x_all[rows], y_all[rows], w_all[rows]
        if len(w):
            w = np.minimum(w / w.mean(), MAX_WEIGHT)
        arm_paid = paid[rows]
        # Mean order value given conversion, shrunk to the overall mean on few orders.
        learner.mean_revenue[arm] = float(
            (revenue_all[rows][arm_paid].sum() + PRIOR_STRENGTH * overall_revenue)
            / (arm_paid.sum() + PRIOR_STRENGTH)
        )
        minority = int(min((y > 0.5).sum(), (y <= 0.5).sum()))
        if rows.sum() < MIN_ROWS_PER_ARM or minority < MIN_CLASS_ROWS:
            learner.models[arm] = float(
                (np.sum(w * y) + PRIOR_STRENGTH * overall_rate) / (np.sum(w) + PRIOR_STRENGTH)
            )
            warnings.warn(
                f"arm {arm!r}: {int(rows.sum())} rows, {minority} of the rarer outcome; "
                "using a constant conversion rate instead of a model",
                stacklevel=2,
            )
            continue
        model = (
            HistGradientBoostingClassifier(
                categorical_features=cat_mask if any(cat_mask) else None,
                random_state=seed,
                **hgb_params,
            )
            if family == "gbm"
            else logistic_pipeline(
                len(numeric), len(categorical), (params or {}).get("Cs", LOGISTIC_CS), seed
            )
        )
        with learner.thread_limit():
            fit_weight = {"sample_weight": w / w.mean()}
            if family == "logistic":
                fit_weight = {"logisticregressioncv__sample_weight": w / w.mean()}
            model.fit(x, y.astype(np.int64), **fit_weight)
        learner.models[arm] = model
    return learner


def _signed_log1p(x: np.ndarray) -> np.ndarray:
    return np.sign(x) * np.log1p(np.abs(x))


def logistic_pipeline(n_numeric: int, n_categorical: int, cs: object, seed: int) -> Pipeline:
    """Return the ``logistic`` family's per-arm model over the encoded feature matrix."""
    numeric = list(range(n_numeric))
    categorical = list(range(n_numeric, n_numeric + n_categorical))
    columns = ColumnTransformer(
        [
            (
                "numeric",
                make_pipeline(
                    SimpleImputer(strategy="median", keep_empty_features=True),
                    FunctionTransformer(_signed_log1p),
                    StandardScaler(),
                ),
                numeric,
            ),
            (
                "categorical",
                make_pipeline(
                    SimpleImputer(strategy="constant", fill_value=-1.0, keep_empty_features=True),
                    OneHotEncoder(handle_unknown="ignore"),
                ),
                categorical,
            ),
        ]
    )
    return make_pipeline(
        columns,
        LogisticRegressionCV(Cs=list(cs), cv=3, scoring="neg_log_loss", max_iter=2000, random_state=seed),
    )
