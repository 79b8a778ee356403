"""Lightning wiring for the uplift network: the training objective and the data it reads.

:class:`UpliftLitModule` owns the loss and metrics and receives the network and an optimizer
factory (lightning-hydra-template style); :class:`UpliftDataModule` owns the split, the fitted
preprocessor and the in-memory tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics import MeanMetric
from torchmetrics.classification import BinaryAUROC

from mlpkg.models.network import MultiArmUpliftNet, UpliftEnsemble
from mlpkg.models.preprocessing import FeaturePreprocessor

CONTROL_ARM = "control"
#: Columns of the model input frame besides the features (see the shared contracts).
LABEL_COLUMNS = ("arm", "converted", "revenue", "propensity")
#: Cap on a training row's stabilised inverse-propensity weight (see UpliftDataModule.row_weights).
MAX_TRAINING_WEIGHT = 10.0
OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


def ordered_arms(arms: Sequence[str]) -> list[str]:
    """Return the arms with ``"control"`` first and the others in their given order.

    Head 0 is control everywhere (network, pyfunc output, evaluation helpers such as
    ``multi_arm_qini`` and the T-learner baseline), so callers may pass arms in any order.

    Args:
        arms: Arm names, ``"control"`` included, no duplicates.

    Returns:
        The reordered list.
    """
    arms = [str(a) for a in arms]
    if CONTROL_ARM not in arms:
        raise ValueError(f"arms must include {CONTROL_ARM!r}, got {arms}")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms must be unique, got {arms}")
    return [CONTROL_ARM, *(a for a in arms if a != CONTROL_ARM)]


def uplift_losses(
    conv_logits: torch.Tensor,
    rev_log: torch.Tensor,
    arm: torch.Tensor,
    converted: torch.Tensor,
    revenue: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return unweighted per-row losses of the logged arm's head.

    Only the head of the arm each customer actually received sees a label (the other arms are
    counterfactual). The revenue term is the gamma deviance with a log link,
    ``r - log r - 1`` with ``r = y / exp(rev_log)``: zero at a perfect prediction and minimised
    in expectation by ``exp(rev_log) = E[revenue | converted]``, which is what the head is
    meant to output (a Gaussian on log revenue would estimate the geometric mean instead).

    Args:
        conv_logits: ``[n, A]`` conversion logits.
        rev_log: ``[n, A]`` log expected revenue given conversion.
        arm: ``[n]`` logged arm index.
        converted: ``[n]`` 0/1 labels (float).
        revenue: ``[n]`` revenue (0 when not converted).

    Returns:
        ``(bce, revenue_deviance, revenue_mask)``, each ``[n]``; the deviance is 0 where the mask
        (converted with positive revenue) is 0.
    """
    idx = arm.unsqueeze(1)
    logit = conv_logits.gather(1, idx).squeeze(1)
    bce = nn.functional.binary_cross_entropy_with_logits(logit, converted, reduction="none")
    mask = (converted > 0.5) & (revenue > 0)
    eta = rev_log.gather(1, idx).squeeze(1).clamp(-20.0, 20.0)
    log_ratio = torch.log(torch.where(mask, revenue, torch.ones_like(revenue))) - eta
    deviance = torch.where(mask, torch.exp(log_ratio) - log_ratio - 1.0, torch.zeros_like(eta))
    return bce, deviance, mask.to(conv_logits.dtype)


class UpliftLitModule(pl.LightningModule):
    """Train a :class:`MultiArmUpliftNet` on a logged randomised campaign.

    Loss per batch: ``mean(w · BCE) + revenue_weight · Σ(w · dev · m) / Σ(w · m)`` where ``w`` is
    the inverse propensity of the logged arm (normalised to mean 1 on the training split by
    the data module) and ``dev`` the gamma deviance of revenue on converted rows ``m``.

    An :class:`~mlpkg.models.network.UpliftEnsemble` trains on the mean of its members' losses
    (each member learns as if alone); validation and test score the ensemble's averaged output.

    Metrics: ``train/loss``, ``val/loss``, ``val/auc``, ``val/logloss`` and the same three under
    ``test/``. ``*/loss`` is the weighted objective, ``*/logloss`` the unweighted BCE and
    ``*/auc`` the AUC of the logged arm's conversion probability.

    Args:
        net: The network to train.
        optimizer: Factory building the optimizer from the parameters, for example
            ``functools.partial(torch.optim.AdamW, lr=2e-3, weight_decay=1e-5)``.
        revenue_weight: Weight of the revenue term relative to the conversion term.
    """

    def __init__(
        self,
        net: MultiArmUpliftNet | UpliftEnsemble,
        optimizer: OptimizerFactory,
        revenue_weight: float = 0.1,
    ) -> None:
        """Store the network, optimizer factory and loss weights (see the class docstring)."""
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.net = net
        self.optimizer_factory = optimizer
        self.revenue_weight = float(revenue_weight)
        # Plain tensors for the training loss: a torchmetrics update per step costs more than the
        # step itself on a small network; the epoch mean is synchronised once in on_train_epoch_end.
        self._train_loss_sum = torch.zeros(())
        self._train_rows = torch.zeros(())
        self.val_loss, self.val_logloss, self.val_auc = MeanMetric(), MeanMetric(), BinaryAUROC()
        self.test_loss, self.test_logloss, self.test_auc = MeanMetric(), MeanMetric(), BinaryAUROC()

    def forward(self, x_num: torch.Tensor, x_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(conv_logits, rev_log)`` for every arm; see :meth:`MultiArmUpliftNet.forward`."""
        return self.net(x_num, x_cat)

    def _objective(self, conv_logits, rev_log, arm, converted, revenue, weight):  # noqa: ANN001, ANN202
        bce, deviance, mask = uplift_losses(conv_logits, rev_log, arm, converted, revenue)
        wm = weight * mask
        rev_term = (wm * deviance).sum() / wm.sum().clamp_min(1.0)
        return (weight * bce).mean() + self.revenue_weight * rev_term, bce

    def _losses(self, batch: Sequence[torch.Tensor], *, members: bool = False) -> dict[str, torch.Tensor]:
        x_num, x_cat, arm, converted, revenue, weight = batch
        if members and isinstance(self.net, UpliftEnsemble):
            logits_k, rev_k = self.net.member_outputs(x_num, x_cat)
            losses = [
                self._objective(lk, rk, arm, converted, revenue, weight)
                for lk, rk in zip(logits_k, rev_k, strict=True)
            ]
            return {"loss": torch.stack([loss for loss, _ in losses]).mean(), "bce": losses[0][1]}
        conv_logits, rev_log = self.net(x_num, x_cat)
        loss, bce = self._objective(conv_logits, rev_log, arm, converted, revenue, weight)
        prob = torch.sigmoid(conv_logits.gather(1, arm.unsqueeze(1)).squeeze(1))
        return {"loss": loss, "bce": bce, "prob": prob, "converted": converted}

    def training_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> torch.Tensor:
        """Return the weighted loss of one batch (an ensemble's: the mean of its members')."""
        out = self._losses(batch, members=True)
        n = out["bce"].new_tensor(out["bce"].shape[0])
        self._train_loss_sum = self._train_loss_sum.to(n.device) + out["loss"].detach() * n
        self._train_rows = self._train_rows.to(n.device) + n
        return out["loss"]

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean training loss (synchronised across processes)."""
        mean = self._train_loss_sum / self._train_rows.clamp_min(1.0)
        self.log("train/loss", mean, on_epoch=True, sync_dist=True)
        self._train_loss_sum = torch.zeros((), device=mean.device)
        self._train_rows = torch.zeros((), device=mean.device)

    def _evaluate(self, batch: Sequence[torch.Tensor], stage: str) -> None:
        out = self._losses(batch)
        n = out["bce"].shape[0]
        loss_metric, logloss_metric, auc_metric = (
            (self.val_loss, self.val_logloss, self.val_auc)
            if stage == "val"
            else (self.test_loss, self.test_logloss, self.test_auc)
        )
        # Weighting the batch loss by its row count makes the epoch value independent of batching.
        loss_metric.update(out["loss"], torch.full_like(out["loss"], float(n)))
        logloss_metric.update(out["bce"])
        auc_metric.update(out["prob"], out["converted"].long())
        # torchmetrics objects synchronise their own state across processes in compute().
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/logloss", logloss_metric, on_step=False, on_epoch=True)
        self.log(f"{stage}/auc", auc_metric, on_step=False, on_epoch=True)

    def validation_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """Accumulate validation metrics."""
        self._evaluate(batch, "val")

    def test_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> None:
        """Accumulate test metrics."""
        self._evaluate(batch, "test")

    def predict_step(self, batch: Sequence[torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Return conversion probabilities and expected revenue for every arm."""
        conv_logits, rev_log = self.net(batch[0], batch[1])
        return {"p_conv": torch.sigmoid(conv_logits), "revenue": torch.exp(rev_log.clamp(-20.0, 20.0))}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Build the optimizer from the injected factory."""
        return self.optimizer_factory(self.net.parameters())


class _BatchedTensorDataset(TensorDataset):
    """A TensorDataset that hands the DataLoader a whole batch with one fancy-index per tensor.

    The default path calls ``__getitem__`` per row and stacks the rows again, which costs far
    more than the forward/backward of this small network; ``__getitems__`` is the batched
    fetch hook of ``torch.utils.data`` and keeps the usual samplers (and so Lightning's
    DistributedSampler injection) working unchanged.
    """

    def __getitems__(self, indices: list[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return tuple(t[idx] for t in self.tensors)


def _collate_batched(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    # The dataset already returns stacked tensors (see _BatchedTensorDataset.__getitems__).
    return batch


def split_by_arm(
    frame: pd.DataFrame, fractions: tuple[float, float, float] = (0.70, 0.15, 0.15), seed: int = 7
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split row positions into train/val/test, stratified by logged arm and outcome.

    Stratifying by ``(arm, converted)`` keeps every arm's share and conversion rate equal across
    the splits, so per-arm test metrics are not distorted by an unlucky split. The result
    depends only on the frame and the seed, so every DDP process computes the same split.

    Args:
        frame: Model input frame with ``arm`` (and ``converted`` if present).
        fractions: Train, validation and test shares; must sum to 1.
        seed: Seed of the permutation.

    Returns:
        Sorted integer positions of the train, validation and test rows.
    """
    if not np.isclose(sum(fractions), 1.0) or min(fractions) < 0:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {fractions}")
    keys = frame["arm"].astype(str)
    if "converted" in frame.columns:
        keys = keys + "|" + frame["converted"].astype(str)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    codes, _ = pd.factorize(keys, sort=True)
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    for group in np.split(order, bounds):
        group = rng.permutation(group)
        n_train = int(round(fractions[0] * len(group)))
        n_val = int(round(fractions[1] * len(group)))
        parts[0].append(group[:n_train])
        parts[1].append(group[n_train : n_train + n_val])
        parts[2].append(group[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.empty(0, dtype=np.int64) for p in parts)
    return train, val, test


class UpliftDataModule(pl.LightningDataModule):
    """Split the model input frame, fit the preprocessor on train, and serve tensors.

    Args:
        frame: Model input frame (features, ``arm``, ``converted``, ``revenue``, ``propensity``).
        numeric: Numeric feature columns.
        categorical: Categorical feature columns.
        arms: Arm names; must contain ``"control"``, which becomes head 0 (see :func:`ordered_arms`).
        batch_size: Training batch size (evaluation uses 4x, as no gradients are kept).
        num_workers: DataLoader worker processes; 0 is fastest for in-memory tensors.
        seed: Seed of the split and of the shuffling.
        fractions: Train, validation and test shares.
        holdout: ``bool [n]`` rows kept out of training for evaluation (the gate's frozen,
            customer-disjoint holdout); when given they are the test split, and the other rows
            are split into train and validation in proportion to ``fractions[:2]``.
        max_weight: Cap on a row's stabilised inverse-propensity weight (see :meth:`row_weights`);
            0 trains unweighted.
    """

    def __init__(
        self,
        frame: pd.DataFrame,
        numeric: Sequence[str],
        categorical: Sequence[str],
        arms: Sequence[str],
        *,
        batch_size: int = 1024,
        num_workers: int = 0,
        seed: int = 7,
        fractions: tuple[float, float, float] = (0.70, 0.15, 0.15),
        holdout: np.ndarray | None = None,
        max_weight: float = MAX_TRAINING_WEIGHT,
    ) -> None:
        """Validate the frame and arms; the split happens in :meth:`setup`."""
        super().__init__()
        arms = ordered_arms(arms)
        missing = [c for c in (*numeric, *categorical, *LABEL_COLUMNS) if c not in frame.columns]
        if missing:
            raise KeyError(f"model input frame lacks columns {missing}")
        unknown_arms = sorted(set(frame["arm"].astype(str)) - set(arms))
        if unknown_arms:
            raise ValueError(f"frame has arms not in the arm list: {unknown_arms}")
        propensity = frame["propensity"].to_numpy(dtype=np.float64)
        if not np.all((propensity > 0) & (propensity <= 1)):
            raise ValueError("propensity must lie in (0, 1] for every row")
        self.frame = frame.reset_index(drop=True)
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.arms = arms
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.fractions = fractions
        if holdout is not None:
            holdout = np.asarray(holdout, dtype=bool)
            if holdout.shape != (len(frame),):
                raise ValueError(f"holdout must be a bool array of {len(frame)} rows, got {holdout.shape}")
        self.holdout = holdout
        self.max_weight = float(max_weight)
        self.preprocessor = FeaturePreprocessor(self.numeric, self.categorical)
        self.datasets: dict[str, TensorDataset] = {}
        self.split_index: dict[str, np.ndarray] = {}
        self.weight_scale = 1.0

    def setup(self, stage: str | None = None) -> None:
        """Split, fit the preprocessor on the training rows and build tensors (idempotent)."""
        if self.datasets:
            return
        if self.holdout is None:
            train, val, test = split_by_arm(self.frame, self.fractions, self.seed)
        else:
            rest = np.flatnonzero(~self.holdout)
            share = self.fractions[0] / (self.fractions[0] + self.fractions[1])
            tr, va, _ = split_by_arm(self.frame.iloc[rest], (share, 1.0 - share, 0.0), self.seed)
            train, val, test = rest[tr], rest[va], np.flatnonzero(self.holdout)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"too few rows ({len(self.frame)}) for a train/validation split")
        self.split_index = {"train": train, "val": val, "test": test}
        self.preprocessor.fit(self.frame.iloc[train])
        raw = (
            self.row_weights(self.frame, self.max_weight)
            if self.max_weight > 0
            else np.ones(len(self.frame), dtype=np.float64)
        )
        # Normalise on train only, and apply the same scale to val/test so their weighted
        # losses are on the scale the model was trained on.
        self.weight_scale = float(1.0 / raw[train].mean())
        for name, rows in self.split_index.items():
            self.datasets[name] = self._tensors(self.frame.iloc[rows], raw[rows] * self.weight_scale)

    @staticmethod
    def row_weights(frame: pd.DataFrame, max_weight: float = MAX_TRAINING_WEIGHT) -> np.ndarray:
        """Return stabilised, clipped inverse-propensity weights: ``min(share(arm) / p, max_weight)``.

        Raw ``1 / p`` lets one exploration row (logged with ``p`` ≈ 0.005) outweigh hundreds of
        model-policy rows (``p`` ≈ 0.9), so a few random draws decide the fit. Stabilising by the
        arm's share of rows keeps the within-arm correction (rows the policy rarely gave the arm
        count more) while each arm keeps its own total, and the cap bounds any single row.
        """
        prop = frame["propensity"].to_numpy(dtype=np.float64)
        arm = frame["arm"].astype(str)
        share = arm.map(arm.value_counts(normalize=True)).to_numpy(dtype=np.float64)
        return np.minimum(share / prop, max_weight)

    def _tensors(self, part: pd.DataFrame, weight: np.ndarray) -> TensorDataset:
        x_num, x_cat = self.preprocessor.transform(part)
        arm_index = {a: i for i, a in enumerate(self.arms)}
        arm = np.array(part["arm"].astype(str).map(arm_index).to_numpy(dtype=np.int64))
        return _BatchedTensorDataset(
            torch.from_numpy(x_num),
            torch.from_numpy(x_cat),
            torch.from_numpy(arm),
            # torch.tensor copies: pandas may hand out read-only views of its buffers.
            torch.tensor(part["converted"].to_numpy(dtype=np.float32)),
            torch.tensor(part["revenue"].to_numpy(dtype=np.float32, na_value=0.0)),
            torch.from_numpy(weight.astype(np.float32)),
        )

    def split_frame(self, name: str) -> pd.DataFrame:
        """Return the raw rows of split ``name`` (``train``, ``val`` or ``test``)."""
        self.setup()
        return self.frame.iloc[self.split_index[name]].reset_index(drop=True)

    def training_stats(self) -> tuple[float, float]:
        """Return the training conversion rate and mean revenue of converted training rows."""
        train = self.split_frame("train")
        conv = train["converted"].to_numpy(dtype=np.float64)
        rev = train["revenue"].to_numpy(dtype=np.float64, na_value=0.0)
        paid = (conv > 0.5) & (rev > 0)
        mean_revenue = float(rev[paid].mean()) if paid.any() else 1.0
        return float(conv.mean()), mean_revenue

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        self.setup()
        batch_size = self.batch_size if shuffle else self.batch_size * 4
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.datasets[name],
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=_collate_batched,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """Test batches, for ``Trainer.predict``."""
        return self._loader("test", shuffle=False)

    def hparams_for_logging(self) -> dict[str, Any]:
        """Return the data parameters worth recording with a run."""
        self.setup()
        return {
            "n_rows": len(self.frame),
            "n_train": len(self.split_index["train"]),
            "n_val": len(self.split_index["val"]),
            "n_test": len(self.split_index["test"]),
            "batch_size": self.batch_size,
            "split_seed": self.seed,
        }
