"""Attribute each customer's predicted uplift to the model's own input features.

For a customer ``x`` and a treatment arm ``a`` the explained quantity is the arm's uplift
``u_a(x) = p_a(x) - p_control(x)`` (conversion probability points). Every family gives one signed
number per *source* feature (the product's feature names: a categorical feature's one-hot or
embedding columns are summed back into it), and the numbers add up to ``u_a(x) - u_a(reference)``:

* **network** (:class:`~mlpkg.models.network.MultiArmUpliftNet` or an ensemble): integrated
  gradients (Captum) from a reference input to the customer's, over the standardised numerics
  and a one-hot relaxation of each categorical (its embedding is ``weights @ table``, so a
  reference can sit between categories). The reference is the mean encoded input of a reference
  population: the campaign's customers when allocating, the test rows at training.
* **gbm** T-learner: path-dependent tree SHAP (``shap``'s C++ TreeSHAP) of each arm's boosted
  trees. ``shap`` reads a HistGradientBoosting model's categorical splits as numeric thresholds
  and gives wrong values for them, so the trees are handed over with every categorical split
  turned into a threshold on an indicator "category in the left set" (summed back into the
  feature). The reference is the training data the trees were grown on.
* **logistic** T-learner: exact linear attributions ``coef * (z - z_ref)`` on the encoded
  inputs, ``z_ref`` the reference population's mean.

Both T-learner families work in log-odds and are rescaled to probability points per arm (the
DeepLIFT rescale rule: each contribution times ``(p(x) - p(ref)) / (f(x) - f(ref))``), so the
uplift's attributions still add up exactly. Heavy libraries (captum, shap) are imported where used.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mlpkg.models.baseline import TLearner
from mlpkg.models.network import MultiArmUpliftNet, UpliftEnsemble
from mlpkg.models.preprocessing import FeaturePreprocessor

#: Integration steps of integrated gradients (Gauss-Legendre): enough for a smooth MLP's uplift
#: to add up to within a few percent, and cheap enough for 200,000 customers.
IG_STEPS = 16
#: Customers per attribution batch (times IG_STEPS rows per forward pass for the network).
ATTRIBUTION_CHUNK = 4096


@dataclass(frozen=True)
class UpliftAttributions:
    """Signed contributions of each source feature to each row's uplift of its arm vs control.

    Attributes:
        features: Source feature names, in column order of ``values``.
        values: ``float32 [n, F]`` contributions in conversion-probability points.
        uplift: ``float32 [n]`` the explained uplift of each row's arm.
        reference_uplift: ``float32 [n]`` that arm's uplift at the reference input.
        method: ``integrated_gradients``, ``tree_shap`` or ``linear``.
    """

    features: list[str]
    values: np.ndarray
    uplift: np.ndarray
    reference_uplift: np.ndarray
    method: str

    def top(self, row: int, k: int = 5) -> list[dict]:
        """Return the ``k`` largest contributions of one row by magnitude, signed, largest first."""
        vals = self.values[row]
        order = np.argsort(-np.abs(vals), kind="stable")[:k]
        return [{"feature": self.features[j], "contribution": round(float(vals[j]), 6)} for j in order]


def attribute_network(
    net: MultiArmUpliftNet | UpliftEnsemble,
    preprocessor: FeaturePreprocessor,
    df: pd.DataFrame,
    arm_index: np.ndarray,
    *,
    reference: pd.DataFrame | None = None,
    steps: int = IG_STEPS,
    chunk_size: int = ATTRIBUTION_CHUNK,
) -> UpliftAttributions:
    """Integrated gradients of each row's arm uplift, from the reference's mean encoded input.

    Args:
        net: The trained network (any heads, or an ensemble), in eval mode on CPU.
        preprocessor: Its fitted preprocessor.
        df: Raw feature rows to explain.
        arm_index: ``int [n]`` head index (into the model's arms, ``>= 1``) explained per row.
        reference: Rows whose mean encoded input is the integration's start (default: ``df``).
        steps: Integration steps.
        chunk_size: Rows per batch.

    Returns:
        The attributions (``method="integrated_gradients"``).
    """
    from captum.attr import IntegratedGradients

    arm_index = _check_arms(arm_index, len(df), net.n_arms)
    cards = preprocessor.cardinalities
    ref_num, ref_oh = _network_reference(preprocessor, df if reference is None else reference, cards)
    blocks = np.cumsum([0, *cards])

    def uplift_of(x_num: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        weights = [onehot[:, blocks[j] : blocks[j + 1]] for j in range(len(cards))]
        p = torch.sigmoid(net.forward_relaxed(x_num, weights)[0])
        return p - p[:, :1]

    ig = IntegratedGradients(uplift_of)
    n, p_num = len(df), len(preprocessor.numeric)
    names = [*preprocessor.numeric, *preprocessor.categorical]
    values = np.zeros((n, len(names)), dtype=np.float32)
    uplift = np.zeros(n, dtype=np.float32)
    ref_uplift = np.zeros(n, dtype=np.float32)
    base = (torch.from_numpy(ref_num[None, :]), torch.from_numpy(ref_oh[None, :]))
    with torch.no_grad():
        at_ref = uplift_of(*base)[0].numpy()
    for start in range(0, n, chunk_size):
        part = df.iloc[start : start + chunk_size]
        x_num, x_cat = preprocessor.transform(part)
        onehot = _one_hot(x_cat, cards)
        target = torch.from_numpy(arm_index[start : start + len(part)])
        inputs = (torch.from_numpy(x_num), torch.from_numpy(onehot))
        att_num, att_oh = ig.attribute(inputs, baselines=base, target=target, n_steps=steps)
        rows = slice(start, start + len(part))
        values[rows, :p_num] = att_num.detach().numpy()
        oh = att_oh.detach().numpy()
        for j in range(len(cards)):
            values[rows, p_num + j] = oh[:, blocks[j] : blocks[j + 1]].sum(axis=1)
        with torch.no_grad():
            out = uplift_of(*inputs).numpy()
        uplift[rows] = out[np.arange(len(part)), arm_index[rows]]
        ref_uplift[rows] = at_ref[arm_index[rows]]
    return UpliftAttributions(names, values, uplift, ref_uplift, "integrated_gradients")


def _network_reference(
    preprocessor: FeaturePreprocessor, reference: pd.DataFrame, cards: Sequence[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Return the mean standardised numerics and the mean one-hot of the reference rows."""
    ref_num = np.zeros(len(preprocessor.numeric), dtype=np.float64)
    ref_oh = np.zeros(int(sum(cards)), dtype=np.float64)
    total = 0
    for start in range(0, len(reference), 65_536):
        x_num, x_cat = preprocessor.transform(reference.iloc[start : start + 65_536])
        ref_num += x_num.sum(axis=0, dtype=np.float64)
        ref_oh += _one_hot(x_cat, cards).sum(axis=0, dtype=np.float64)
        total += len(x_num)
    return (ref_num / max(total, 1)).astype(np.float32), (ref_oh / max(total, 1)).astype(np.float32)


def _one_hot(x_cat: np.ndarray, cards: Sequence[int]) -> np.ndarray:
    out = np.zeros((len(x_cat), int(sum(cards))), dtype=np.float32)
    offset = 0
    for j, card in enumerate(cards):
        out[np.arange(len(x_cat)), offset + x_cat[:, j]] = 1.0
        offset += card
    return out


def attribute_tlearner(
    learner: TLearner,
    df: pd.DataFrame,
    arm_index: np.ndarray,
    *,
    reference: pd.DataFrame | None = None,
) -> UpliftAttributions:
    """Tree SHAP (``gbm``) or exact linear (``logistic``) attributions of each row's arm uplift.

    Args:
        learner: The fitted T-learner.
        df: Raw feature rows to explain.
        arm_index: ``int [n]`` arm index (into ``learner.arms``, ``>= 1``) explained per row.
        reference: Rows whose mean encoded input is the linear family's reference (default:
            ``df``); the tree family's reference is its training data.

    Returns:
        The attributions (``method="tree_shap"`` or ``"linear"``).
    """
    arm_index = _check_arms(arm_index, len(df), len(learner.arms))
    names = [*learner.numeric, *learner.categorical]
    x = learner.encode(df)
    n = len(df)
    values = np.zeros((n, len(names)), dtype=np.float64)
    uplift = np.zeros(n, dtype=np.float64)
    ref_uplift = np.zeros(n, dtype=np.float64)
    ref_x = None if reference is None else learner.encode(reference)
    explain = _tree_arm if learner.family == "gbm" else _linear_arm
    with learner.thread_limit():
        control = explain(learner.models[learner.arms[0]], x, ref_x, len(learner.numeric), len(names))
        for a in np.unique(arm_index):
            rows = np.flatnonzero(arm_index == a)
            phi, p, p_ref = explain(learner.models[learner.arms[a]], x[rows], ref_x, len(learner.numeric),
                                    len(names))  # fmt: skip
            values[rows] = phi - control[0][rows]
            uplift[rows] = p - control[1][rows]
            ref_uplift[rows] = p_ref - control[2][rows]
    method = "tree_shap" if learner.family == "gbm" else "linear"
    return UpliftAttributions(
        names, values.astype(np.float32), uplift.astype(np.float32), ref_uplift.astype(np.float32), method
    )


def _rescaled(phi: np.ndarray, f: np.ndarray, f_ref: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Turn log-odds contributions into probability points that add up to ``p(x) - p(ref)``."""
    p, p_ref = _sigmoid(f), _sigmoid(np.broadcast_to(f_ref, f.shape))
    df = f - f_ref
    slope = np.where(np.abs(df) > 1e-9, (p - p_ref) / np.where(np.abs(df) > 1e-9, df, 1.0), p * (1 - p))
    return phi * slope[:, None], p, p_ref


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


def _constant(rate: float, n: int, width: int) -> tuple[np.ndarray, ...]:
    return np.zeros((n, width)), np.full(n, rate), np.full(n, rate)


def _linear_arm(model, x, ref_x, n_numeric, width):  # noqa: ANN001, ANN202 - a Pipeline or float
    """Exact linear contributions of one arm's logistic model, rescaled to probability points."""
    if isinstance(model, float):
        return _constant(model, len(x), width)
    columns, logistic = model[:-1], model[-1]
    z = columns.transform(x)
    z = z.toarray() if hasattr(z, "toarray") else np.asarray(z)
    z_ref = (columns.transform(ref_x) if ref_x is not None else z).mean(axis=0)
    z_ref = np.asarray(z_ref).ravel()
    coef = logistic.coef_.ravel()
    contrib = (z - z_ref[None, :]) * coef[None, :]
    # Numerics keep their column; each categorical's one-hot block is summed back into it.
    phi = np.zeros((len(x), width))
    phi[:, :n_numeric] = contrib[:, :n_numeric]
    encoder = model[0].named_transformers_["categorical"][-1] if width > n_numeric else None
    offset = n_numeric
    for j in range(width - n_numeric):
        size = len(encoder.categories_[j])
        phi[:, n_numeric + j] = contrib[:, offset : offset + size].sum(axis=1)
        offset += size
    f = z @ coef + logistic.intercept_[0]
    return _rescaled(phi, f, float(z_ref @ coef + logistic.intercept_[0]))


def _tree_arm(model, x, ref_x, n_numeric, width):  # noqa: ANN001, ANN202 - a HistGradientBoostingClassifier
    """Tree SHAP of one arm's boosted trees (log-odds), rescaled to probability points."""
    import shap

    if isinstance(model, float):
        return _constant(model, len(x), width)
    trees, derived, base = _shap_trees(model)
    # With categorical features the model first reorders its input (categoricals first, each
    # ordinal-encoded); the trees split on that order, so attributions are mapped back after.
    encoder = getattr(model, "_preprocessor", None)
    original = np.arange(x.shape[1])
    if encoder is not None:
        cat = np.asarray(model.is_categorical_, dtype=bool)
        original = np.concatenate([np.flatnonzero(cat), np.flatnonzero(~cat)])
    explainer = shap.TreeExplainer(
        {"trees": trees, "base_offset": base, "tree_output": "log_odds", "objective": "binary_crossentropy",
         "input_dtype": np.float64, "internal_dtype": np.float64},
        feature_perturbation="tree_path_dependent",
    )  # fmt: skip
    phi = np.zeros((len(x), width))
    for start in range(0, len(x), ATTRIBUTION_CHUNK):
        part = x[start : start + ATTRIBUTION_CHUNK]
        if encoder is not None:
            part = np.asarray(encoder.transform(part), dtype=np.float64)
        wide = np.column_stack([part, *[_indicator(part[:, f], bits, known) for f, bits, known in derived]])
        sv = np.asarray(explainer.shap_values(wide, check_additivity=False)).reshape(len(part), -1)
        block = sv[:, : part.shape[1]].copy()
        for k, (f, _, _) in enumerate(derived):
            block[:, f] += sv[:, part.shape[1] + k]
        phi[start : start + len(part), original] = block
    f = model.decision_function(x)
    return _rescaled(phi, f, float(np.ravel(explainer.expected_value)[0]))


def _bit(bitset: np.ndarray, codes: np.ndarray) -> np.ndarray:
    codes = codes.astype(np.int64)
    return ((bitset[codes // 32] >> (codes % 32).astype(np.uint32)) & 1).astype(bool)


def _indicator(values: np.ndarray, left: np.ndarray, known: np.ndarray) -> np.ndarray:
    """Return 0 where a category goes left, 1 where it goes right, NaN where it counts as missing."""
    ok = np.isfinite(values) & (values >= 0) & (values < 256)
    codes = np.where(ok, values, 0).astype(np.int64)
    go_left = ok & _bit(left, codes)
    seen = ok & _bit(known, codes)
    return np.where(go_left, 0.0, np.where(seen, 1.0, np.nan))


def _shap_trees(model) -> tuple[list[dict], list[tuple[int, np.ndarray, np.ndarray]], float]:  # noqa: ANN001
    """Return the model's trees in shap's dict format with categorical splits as indicator thresholds.

    Each distinct (feature, left-category set) becomes one extra column after the model's own
    features; the returned ``derived`` lists ``(feature, left bitset, known bitset)`` per column.
    """
    width = int(model.n_features_in_)
    known_bits, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
    derived: list[tuple[int, np.ndarray, np.ndarray]] = []
    column: dict[tuple[int, bytes], int] = {}
    trees = []
    for iteration in model._predictors:
        predictor = iteration[0]
        nodes = predictor.nodes
        features = nodes["feature_idx"].astype(np.int64).copy()
        thresholds = nodes["num_threshold"].astype(np.float64).copy()
        left, right = nodes["left"].astype(np.int64), nodes["right"].astype(np.int64)
        for i in np.flatnonzero(nodes["is_categorical"] & ~nodes["is_leaf"].astype(bool)):
            f = int(features[i])
            bits = np.asarray(predictor.raw_left_cat_bitsets[nodes["bitset_idx"][i]], dtype=np.uint32)
            key = (f, bits.tobytes())
            if key not in column:
                column[key] = width + len(derived)
                derived.append((f, bits, np.asarray(known_bits[f_idx_map[f]], dtype=np.uint32)))
            features[i], thresholds[i] = column[key], 0.5
        leaf = nodes["is_leaf"].astype(bool)
        default = np.where(nodes["missing_go_to_left"].astype(bool), left, right)
        trees.append({
            "children_left": np.where(leaf, -1, left), "children_right": np.where(leaf, -1, right),
            "children_default": np.where(leaf, -1, default), "features": np.where(leaf, -2, features),
            "thresholds": thresholds, "values": nodes["value"].astype(np.float64)[:, None],
            "node_sample_weight": nodes["count"].astype(np.float64),
        })  # fmt: skip
    return trees, derived, float(np.ravel(model._baseline_prediction)[0])


def _check_arms(arm_index: np.ndarray, n: int, n_arms: int) -> np.ndarray:
    arm_index = np.asarray(arm_index, dtype=np.int64)
    if arm_index.shape != (n,):
        raise ValueError(f"arm_index must have one entry per row ({n}), got shape {arm_index.shape}")
    if n and (arm_index.min() < 1 or arm_index.max() >= n_arms):
        raise ValueError(f"arm_index must name treatment arms (1..{n_arms - 1}), got {arm_index.min()}..")
    return arm_index


#: Most held-out rows a training run's global attributions explain (each for every treatment arm).
GLOBAL_ROWS = 2000
#: Most (row, arm) explanations in all: with many arms fewer rows, so training time barely grows
#: (integrated gradients of the default network: about 0.3 ms each on one CPU thread).
GLOBAL_EXPLANATIONS = 4000
#: Fewest rows explained per arm when the data has them, however many arms there are.
GLOBAL_MIN_ROWS = 200


def global_attributions(model: object, frame: pd.DataFrame, *, max_rows: int = GLOBAL_ROWS,
                        max_explanations: int = GLOBAL_EXPLANATIONS, seed: int = 0) -> dict:  # fmt: skip
    """Summarise what drives a model's uplift: per arm and feature, the mean |contribution| and its sign.

    Every sampled row is explained for every treatment arm (its uplift vs control), from the
    sampled rows' mean input (the reference of :meth:`~mlpkg.models.pyfunc.UpliftPyfunc.attribute_uplift`).
    Against a mean reference the mean *signed* contribution is near zero by construction (exactly
    zero for the linear family), so the direction is read from how the contribution follows the
    feature instead: for a numeric feature the correlation of its value with its contribution
    (positive: higher values raise the uplift), for a categorical one the categories with the
    highest and lowest mean contribution.

    Args:
        model: A loaded uplift model (``arms``, control first, and ``attribute_uplift``).
        frame: Held-out rows with the model's input columns.
        max_rows: Most rows explained (a seeded sample beyond that).
        max_explanations: Most rows times treatment arms (at least :data:`GLOBAL_MIN_ROWS` rows).
        seed: Seed of the sample.

    Returns:
        A JSON-ready dict: ``method``, ``rows``, ``features`` (ranked by ``mean_abs`` averaged over
        arms, each with ``mean``, ``direction`` and ``correlation`` or ``highest``/``lowest``) and
        ``arms`` (per arm: mean uplift, and ``mean_abs``/``mean`` per feature).
    """
    arms = list(model.arms)
    limit = min(max_rows, max(GLOBAL_MIN_ROWS, max_explanations // max(len(arms) - 1, 1)))
    rows = frame if len(frame) <= limit else frame.sample(limit, random_state=seed)
    rows = rows.reset_index(drop=True)
    per_arm: dict[str, dict] = {}
    method, names, shapes = None, [], []
    for a in range(1, len(arms)):
        att = model.attribute_uplift(rows, np.full(len(rows), a, dtype=np.int64), reference=rows)
        method, names = att.method, att.features
        shapes.append(att.values.astype(np.float64))
        per_arm[arms[a]] = {
            "mean_uplift": _r(att.uplift.mean()),
            "mean_abs": {f: _r(v) for f, v in zip(names, np.abs(att.values).mean(axis=0), strict=True)},
            "mean": {f: _r(v) for f, v in zip(names, att.values.mean(axis=0), strict=True)},
        }
    if not shapes:
        return {"method": None, "rows": len(rows), "features": [], "arms": {}}
    stack = np.stack(shapes)  # [arms, rows, features]
    mean_abs, mean = np.abs(stack).mean(axis=(0, 1)), stack.mean(axis=(0, 1))
    features = []
    for j in np.argsort(-mean_abs, kind="stable"):
        name = names[j]
        item = {"feature": name, "mean_abs": _r(mean_abs[j]), "mean": _r(mean[j]),
                **_direction(rows[name], stack[:, :, j].mean(axis=0))}  # fmt: skip
        features.append(item)
    return {"method": method, "rows": len(rows), "sampled_from": len(frame),
            "unit": "conversion probability", "features": features, "arms": per_arm}  # fmt: skip


def _direction(values: pd.Series, contribution: np.ndarray) -> dict:
    """Say how a feature's contribution (averaged over arms) follows its value."""
    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        x = values.to_numpy(dtype=np.float64)
        ok = np.isfinite(x)
        corr = np.nan
        if ok.sum() > 2 and x[ok].std() > 0 and contribution[ok].std() > 0:
            corr = float(np.corrcoef(x[ok], contribution[ok])[0, 1])
        if not np.isfinite(corr) or abs(corr) < 0.1:
            text = "no clear direction"
        else:
            text = "higher raises the uplift" if corr > 0 else "higher lowers the uplift"
        return {"direction": text, "correlation": None if not np.isfinite(corr) else _r(corr, 3)}
    by = pd.Series(contribution).groupby(values.astype(str).to_numpy()).mean().sort_values()
    if len(by) < 2:
        return {"direction": "no clear direction", "highest": None, "lowest": None}
    high, low = str(by.index[-1]), str(by.index[0])
    return {"direction": f"highest for {high}, lowest for {low}", "highest": high, "lowest": low}


def _r(value: float, digits: int = 6) -> float:
    return round(float(value), digits)
