"""Turn a raw customer-feature frame into the two tensors the network reads.

The preprocessor is fitted on the training split only and serialised to plain JSON
(:meth:`FeaturePreprocessor.to_dict`), so it travels inside the logged MLflow model and the
scorer applies exactly the transformation the network was trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

#: Integer code of the bucket that receives categories never seen in training.
UNKNOWN_CODE = 0
#: Token that stands for a missing categorical value (it gets its own code when seen in training).
MISSING_TOKEN = "__missing__"
_FORMAT_VERSION = 1


def _as_float(frame: pd.DataFrame, column: str) -> np.ndarray:
    # Coerce rather than trust the dtype: exports deliver numbers as strings or nullable ints.
    return pd.to_numeric(frame[column], errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)


def _factorize_tokens(frame: pd.DataFrame, column: str) -> tuple[np.ndarray, list[str]]:
    """Return codes into a list of text tokens, missing values included as MISSING_TOKEN.

    Factorising first and converting only the distinct values to text is one hash pass in
    C; casting every row to ``str`` first costs several times more on 65k-row scoring chunks.
    """
    codes, uniques = pd.factorize(frame[column], use_na_sentinel=True)
    tokens = [str(u) for u in uniques]
    if (codes < 0).any():
        codes = np.where(codes < 0, len(tokens), codes)
        tokens.append(MISSING_TOKEN)
    return codes, tokens


class FeaturePreprocessor:
    """Standardise numeric features and encode categoricals as integer codes.

    Numeric columns: missing values are replaced by the training median; non-negative columns
    whose training skewness exceeds ``skew_threshold`` are passed through ``log1p``; then each
    column is standardised with the training mean/std and clipped to ``[-clip, clip]`` so one
    outlier cannot dominate a batch. Categorical columns: the training categories get codes
    ``1..K`` (sorted, so the mapping is deterministic); everything else maps to
    :data:`UNKNOWN_CODE`.

    Args:
        numeric: Numeric feature column names.
        categorical: Categorical feature column names.
        clip: Absolute bound on standardised values.
        skew_threshold: Skewness above which a non-negative column is log1p-transformed; ``None``
            disables the transform.
        min_category_count: Categories seen fewer times in training map to the unknown bucket,
            which keeps rare levels from getting an untrained embedding.
    """

    def __init__(
        self,
        numeric: Sequence[str],
        categorical: Sequence[str],
        *,
        clip: float = 5.0,
        skew_threshold: float | None = 2.0,
        min_category_count: int = 1,
    ) -> None:
        """Declare the columns and options; statistics are learned in :meth:`fit`."""
        overlap = set(numeric) & set(categorical)
        if overlap:
            raise ValueError(f"columns cannot be both numeric and categorical: {sorted(overlap)}")
        if clip <= 0:
            raise ValueError(f"clip must be positive, got {clip}")
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.clip = float(clip)
        self.skew_threshold = skew_threshold
        self.min_category_count = int(min_category_count)
        self.medians: dict[str, float] = {}
        self.log1p: list[str] = []
        self.means: dict[str, float] = {}
        self.stds: dict[str, float] = {}
        self.vocab: dict[str, list[str]] = {}
        self._positions: dict[str, dict[str, int]] = {}
        self._fitted = False

    @property
    def is_fitted(self) -> bool:
        """Whether :meth:`fit` (or :meth:`from_dict`) has set the statistics."""
        return self._fitted

    @property
    def cardinalities(self) -> list[int]:
        """Number of codes per categorical column, including the unknown bucket."""
        self._require_fitted()
        return [len(self.vocab[c]) + 1 for c in self.categorical]

    def fit(self, frame: pd.DataFrame) -> FeaturePreprocessor:
        """Learn medians, scales and vocabularies from the training frame.

        Args:
            frame: Training rows holding every declared feature column.

        Returns:
            ``self``, fitted.
        """
        self._check_columns(frame)
        if len(frame) == 0:
            raise ValueError("cannot fit the preprocessor on an empty frame")
        self.log1p = []
        for col in self.numeric:
            x = _as_float(frame, col)
            finite = x[np.isfinite(x)]
            median = float(np.median(finite)) if finite.size else 0.0
            x = np.where(np.isfinite(x), x, median)
            if self.skew_threshold is not None and x.min() >= 0 and _skewness(x) > self.skew_threshold:
                self.log1p.append(col)
                x = np.log1p(x)
            std = float(x.std())
            self.medians[col] = median
            self.means[col] = float(x.mean())
            # A constant column carries no signal; a unit scale keeps it at zero instead of NaN.
            self.stds[col] = std if std > 1e-12 else 1.0
        for col in self.categorical:
            codes, tokens = _factorize_tokens(frame, col)
            counts: dict[str, int] = {}
            # Different raw values can print the same (1 and "1"); they share one token.
            for token, count in zip(tokens, np.bincount(codes, minlength=len(tokens)), strict=True):
                counts[token] = counts.get(token, 0) + int(count)
            self.vocab[col] = sorted(t for t, c in counts.items() if c >= self.min_category_count)
        self._positions = {}
        self._fitted = True
        return self

    def transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Map raw rows to network inputs.

        Args:
            frame: Rows holding every declared feature column (extra columns are ignored).

        Returns:
            ``(x_num, x_cat)``: float32 array of shape ``[n, len(numeric)]`` and int64 array of
            shape ``[n, len(categorical)]``.
        """
        self._require_fitted()
        self._check_columns(frame)
        n = len(frame)
        x_num = np.empty((n, len(self.numeric)), dtype=np.float32)
        for j, col in enumerate(self.numeric):
            x = _as_float(frame, col)
            x = np.where(np.isfinite(x), x, self.medians[col])
            if col in self.log1p:
                # Clamp at zero first: a negative value at scoring time would give NaN in log1p.
                x = np.log1p(np.maximum(x, 0.0))
            x = (x - self.means[col]) / self.stds[col]
            x_num[:, j] = np.clip(x, -self.clip, self.clip)
        x_cat = np.empty((n, len(self.categorical)), dtype=np.int64)
        for j, col in enumerate(self.categorical):
            codes, tokens = _factorize_tokens(frame, col)
            position = self._position(col)
            lookup = np.array([position.get(t, UNKNOWN_CODE) for t in tokens], dtype=np.int64)
            x_cat[:, j] = lookup[codes] if len(tokens) else UNKNOWN_CODE
        return x_num, x_cat

    def fit_transform(self, frame: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Fit on ``frame`` and transform it.

        Args:
            frame: Training rows.

        Returns:
            The output of :meth:`transform` on ``frame``.
        """
        return self.fit(frame).transform(frame)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable description of the fitted preprocessor."""
        self._require_fitted()
        return {
            "format_version": _FORMAT_VERSION,
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "clip": self.clip,
            "skew_threshold": self.skew_threshold,
            "min_category_count": self.min_category_count,
            "medians": dict(self.medians),
            "log1p": list(self.log1p),
            "means": dict(self.means),
            "stds": dict(self.stds),
            "vocab": {k: list(v) for k, v in self.vocab.items()},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeaturePreprocessor:
        """Rebuild a fitted preprocessor from :meth:`to_dict` output.

        Args:
            data: The dictionary (for example read back from JSON).

        Returns:
            A fitted preprocessor whose :meth:`transform` equals the original's.
        """
        version = data.get("format_version")
        if version != _FORMAT_VERSION:
            raise ValueError(f"unsupported preprocessor format_version {version!r}")
        pre = cls(
            data["numeric"],
            data["categorical"],
            clip=data["clip"],
            skew_threshold=data["skew_threshold"],
            min_category_count=data["min_category_count"],
        )
        pre.medians = {k: float(v) for k, v in data["medians"].items()}
        pre.log1p = list(data["log1p"])
        pre.means = {k: float(v) for k, v in data["means"].items()}
        pre.stds = {k: float(v) for k, v in data["stds"].items()}
        pre.vocab = {k: [str(x) for x in v] for k, v in data["vocab"].items()}
        pre._fitted = True
        return pre

    def _position(self, column: str) -> dict[str, int]:
        # Token -> code, built once per column; codes start at 1 because 0 is the unknown bucket.
        position = self._positions.get(column)
        if position is None:
            position = self._positions[column] = {t: i + 1 for i, t in enumerate(self.vocab[column])}
        return position

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("FeaturePreprocessor is not fitted; call fit() first")

    def _check_columns(self, frame: pd.DataFrame) -> None:
        missing = [c for c in (*self.numeric, *self.categorical) if c not in frame.columns]
        if missing:
            raise KeyError(f"feature columns missing from the frame: {missing}")


def _skewness(x: np.ndarray) -> float:
    std = x.std()
    if std < 1e-12:
        return 0.0
    return float(np.mean(((x - x.mean()) / std) ** 3))
