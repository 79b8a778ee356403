"""Benchmarks of the uplift model's training loop and batch scoring.

(a) ``lightning_fit``: wall time of ``Trainer.fit`` against a hand-written PyTorch loop on the
    same network, data loader, optimizer and number of epochs (validation disabled on both
    sides, so only the training loop is compared). Target: ratio <= 1.15.
(b) ``pyfunc_scoring``: rows per second of ``mlflow.pyfunc.load_model(...).predict`` on a raw
    65,536-row DataFrame (schema check, preprocessing, forward, DataFrame assembly included)
    against a bare ``net(x_num, x_cat)`` forward on the same rows already as tensors.
    Target: ratio >= 0.8. ``score_arrays`` (the allocator's path) is reported as well.

Run: ``python tests/benchmarks/bench_model.py [out_dir]``; each result is printed as a table row
and written to ``out_dir/<name>.json``. Timings use one torch thread unless ``--threads`` says
otherwise: on a small shared machine extra intra-op threads mostly wait on each other.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch

from mlpkg.config import TrainerSettings
from mlpkg.models.lightning import UpliftDataModule, UpliftLitModule, uplift_losses
from mlpkg.models.network import MultiArmUpliftNet
from mlpkg.models.pyfunc import UpliftPyfunc, write_model_artifacts
from tests.benchmarks.run import write_result

ARMS = ["control"] + [
    f"{c}@{ch}" for c in ("PCT10", "PCT20", "USD5", "FREESHIP") for ch in ("email", "sms", "push")
]
NUMERIC = [f"num_{i:02d}" for i in range(12)]
CATEGORICAL = ["region", "device", "segment", "top_category"]
SCORING_ROWS = 65_536


def make_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """Return a synthetic model input frame shaped like production (12 numeric, 4 categorical, 13 arms).

    Args:
        n: Number of rows.
        seed: Seed of the draws.

    Returns:
        Features plus ``customer_id``, ``arm``, ``converted``, ``revenue`` and ``propensity``.
    """
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame({"customer_id": [f"c{i:07d}" for i in range(n)]})
    for i, col in enumerate(NUMERIC):
        frame[col] = rng.lognormal(1.0, 1.0, n) if i % 3 == 0 else rng.normal(0.0, 1.0, n)
    frame["region"] = rng.choice([f"r{i}" for i in range(12)], n)
    frame["device"] = rng.choice(["ios", "android", "desktop"], n)
    frame["segment"] = rng.choice(["new", "regular", "vip", "lapsed"], n)
    frame["top_category"] = rng.choice([f"cat{i}" for i in range(30)], n)
    arm_idx = rng.integers(0, len(ARMS), n)
    logit = (
        -2.0 + 0.5 * frame["num_01"] + 0.3 * (frame["segment"] == "vip") + 0.05 * arm_idx * frame["num_02"]
    )
    frame["arm"] = np.asarray(ARMS, dtype=object)[arm_idx]
    frame["converted"] = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    frame["revenue"] = np.where(frame["converted"] == 1, rng.lognormal(3.5, 0.5, n), 0.0)
    frame["propensity"] = 1.0 / len(ARMS)
    return frame


def _result(
    name: str,
    value: float,
    unit: str,
    reference: str,
    reference_value: float,
    ratio: float,
    target: str,
    **extra: Any,
) -> dict[str, Any]:
    return {
        "name": name,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": ratio,
        "target": target,
        **extra,
    }


def _median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _build_net(data: UpliftDataModule, cfg: TrainerSettings) -> MultiArmUpliftNet:
    return MultiArmUpliftNet(
        len(NUMERIC),
        data.preprocessor.cardinalities,
        len(ARMS),
        embedding_dim=cfg.embedding_dim,
        hidden_dim=cfg.hidden_dim,
        head_dim=cfg.head_dim,
        dropout=cfg.dropout,
        arms=data.arms,
        arm_heads=cfg.arm_heads,
    )


def _new_net(
    data: UpliftDataModule, cfg: TrainerSettings, state: dict[str, torch.Tensor]
) -> MultiArmUpliftNet:
    net = _build_net(data, cfg)
    net.load_state_dict(state)
    return net


def bench_training(data: UpliftDataModule, cfg: TrainerSettings, epochs: int, repeats: int) -> dict[str, Any]:
    """Time Lightning's fit against a plain loop on identical network, data and epochs."""
    torch.manual_seed(0)
    state = _build_net(data, cfg).state_dict()
    optimizer = functools.partial(torch.optim.AdamW, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    revenue_weight = 0.1

    def lightning_fit() -> None:
        module = UpliftLitModule(_new_net(data, cfg, state), optimizer, revenue_weight=revenue_weight)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=epochs,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
        )
        trainer.fit(module, train_dataloaders=data.train_dataloader())

    def plain_fit() -> None:
        net = _new_net(data, cfg, state).train()
        opt = optimizer(net.parameters())
        loader = data.train_dataloader()
        for _ in range(epochs):
            for x_num, x_cat, arm, converted, revenue, weight in loader:
                conv_logits, rev_log = net(x_num, x_cat)
                bce, deviance, mask = uplift_losses(conv_logits, rev_log, arm, converted, revenue)
                wm = weight * mask
                loss = (weight * bce).mean() + revenue_weight * (wm * deviance).sum() / wm.sum().clamp_min(
                    1.0
                )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

    lightning_fit()  # warm-up: first-call costs (allocator, lazy imports) are not the loop's
    plain_fit()
    lightning_times, plain_times = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both sides alike
        lightning_times.append(_median_time(lightning_fit, 1))
        plain_times.append(_median_time(plain_fit, 1))
    lt, pt = statistics.median(lightning_times), statistics.median(plain_times)
    steps = epochs * len(data.train_dataloader())
    return _result(
        "lightning_fit",
        lt,
        "s",
        "plain_torch_loop",
        pt,
        lt / pt,
        "<= 1.15",
        epochs=epochs,
        steps=steps,
        train_rows=len(data.datasets["train"]),
    )


def bench_scoring(
    data: UpliftDataModule, cfg: TrainerSettings, work_dir: Path, repeats: int
) -> list[dict[str, Any]]:
    """Time pyfunc predict and score_arrays against a bare forward pass on 65,536 rows."""
    torch.manual_seed(0)
    net = _build_net(data, cfg).eval()
    raw = make_frame(SCORING_ROWS, seed=1).drop(columns=["arm", "converted", "revenue", "propensity"])
    art_dir = work_dir / "artifacts"
    art_dir.mkdir()
    artifacts = write_model_artifacts(net, data.preprocessor, ARMS, art_dir)
    example = raw[[*NUMERIC, *CATEGORICAL]].head(5)
    mlflow.pyfunc.save_model(
        path=str(work_dir / "model"),
        python_model=UpliftPyfunc(chunk_size=SCORING_ROWS),
        artifacts=artifacts,
        input_example=example,
        pip_requirements=["torch", "pandas"],
    )
    loaded = mlflow.pyfunc.load_model(str(work_dir / "model"))
    fast = loaded.unwrap_python_model()
    x_num, x_cat = data.preprocessor.transform(raw)
    x_num_t, x_cat_t = torch.from_numpy(x_num), torch.from_numpy(x_cat)

    def forward() -> None:
        with torch.inference_mode():
            net(x_num_t, x_cat_t)

    sides = {
        "forward": forward,
        "pyfunc": lambda: loaded.predict(raw),
        "arrays": lambda: fast.score_arrays(raw),
    }
    for fn in sides.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(repeats):  # interleaved, so drift in machine load hits every side alike
        for key, fn in sides.items():
            times[key].append(_median_time(fn, 1))
    t_forward, t_pyfunc, t_arrays = (statistics.median(times[k]) for k in ("forward", "pyfunc", "arrays"))
    ref = SCORING_ROWS / t_forward
    return [
        _result(
            "pyfunc_scoring",
            SCORING_ROWS / t_pyfunc,
            "rows/s",
            "raw_torch_forward",
            ref,
            t_forward / t_pyfunc,
            ">= 0.8",
            rows=SCORING_ROWS,
            arms=len(ARMS),
        ),
        _result(
            "pyfunc_score_arrays",
            SCORING_ROWS / t_arrays,
            "rows/s",
            "raw_torch_forward",
            ref,
            t_forward / t_arrays,
            ">= 0.8",
            rows=SCORING_ROWS,
            arms=len(ARMS),
        ),
    ]


def run(
    out_dir: Path, *, threads: int | None = 1, train_rows: int = 60_000, epochs: int = 4, repeats: int = 3
) -> list[dict[str, Any]]:
    """Run both benchmarks, print a table and write ``out_dir/<name>.json`` per result.

    Args:
        out_dir: Folder for the JSON results (created if missing).
        threads: torch intra-op threads; ``None`` keeps torch's default.
        train_rows: Rows of the synthetic training frame (70 % are trained on).
        epochs: Epochs per timed fit.
        repeats: Timed repetitions per side (median reported).

    Returns:
        The result dicts (name, value, unit, reference, reference_value, ratio, target, ...).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = TrainerSettings()
    pl.seed_everything(cfg.seed, verbose=False)
    data = UpliftDataModule(
        make_frame(train_rows), NUMERIC, CATEGORICAL, ARMS, batch_size=cfg.batch_size, seed=cfg.seed
    )
    data.setup()
    results = [bench_training(data, cfg, epochs, repeats)]
    with tempfile.TemporaryDirectory() as work_dir:
        results.extend(bench_scoring(data, cfg, Path(work_dir), max(repeats, 5)))
    print(f"{'name':<22} {'value':>14} {'unit':<7} {'reference':<18} {'ref value':>14} {'ratio':>7}  target")
    for r in results:
        r["torch_threads"] = torch.get_num_threads()
        print(
            f"{r['name']:<22} {r['value']:>14.4g} {r['unit']:<7} {r['reference']:<18} "
            f"{r['reference_value']:>14.4g} {r['ratio']:>7.3f}  {r['target']}"
        )
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=".couponops/bench", type=Path)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    parser.add_argument("--train-rows", type=int, default=60_000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for result in run(
        args.out_dir,
        threads=args.threads or None,
        train_rows=args.train_rows,
        epochs=args.epochs,
        repeats=args.repeats,
    ):
        write_result(args.out_dir, result)
