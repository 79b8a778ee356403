"""Benchmark: how much of the oracle's incremental conversions does each targeting policy get?

For each seed a simulated shop with default magnitudes runs a randomized campaign over
``N_CUSTOMERS`` customers (every customer is in it, so the campaign log has ``N_CUSTOMERS`` rows).
:func:`mlpkg.simulator.lab.policy_quality.evaluate_policies` trains the uplift network (through
the product's ``train_uplift_model``) and the T-learner on it, then allocates the held-out test
split's customers (15 %, features as of ``shop.now``) with every policy through the product's
allocator under one budget, and values each allocation exactly with the simulator's truth.

Budget: enough to give ``TREAT_SHARE`` (25 %) of the evaluation population the arm with its
highest true uplift, at the product's expected cost (see ``treat_share_budget``); coupon
inventory and channel capacity are the shop's shares of the population.

Results (mean over seeds, 95 % t-interval in ``ci95``):

* ``uplift_policy_share_of_oracle``: the network's true incremental conversions / the oracle's.
* ``tlearner_share_of_oracle``, ``response_model_share_of_oracle``, ``random_share_of_oracle``
  (the ``noisy_oracle`` reference, the oracle's scores blurred by the network's uplift RMSE, is
  an extra of the first result).
* ``network_vs_tlearner_qini``: Qini coefficient on the test split, network over T-learner:
  per arm on the control and arm rows of customers consented to the arm's channel (the only
  customers the arm could reach), averaged over arms: the product's ``test/qini``. Extras: the
  best-arm Qini, the former definition (every control row), the same on expected outcomes (true
  P(conversion) of the logged arm instead of the coin flip) and the Qini of the true uplift.

``COUPONOPS_BENCH_QUICK=1`` runs 40,000 customers and 2 seeds. Run:
``python -m tests.benchmarks.run --only uplift_quality --out bench-results``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

QUICK = os.environ.get("COUPONOPS_BENCH_QUICK", "") not in ("", "0")
N_CUSTOMERS = 40_000 if QUICK else 200_000
# World seeds apart from the ones the trainer settings below were tuned on (1 and 2).
SEEDS = (11, 12) if QUICK else (11, 12, 13, 14, 15)
TREAT_SHARE = 0.25
# One thread for torch and the T-learner: on the shared 2-core machine a training step took
# 12.6 ms with one thread and 272 ms with two (threads waiting on each other and on neighbours).
THREADS = 1
# The network's settings for this benchmark, chosen on seeds 1 and 2 (share of oracle 0.75-0.77
# against 0.70-0.71 with the product's defaults, which are sized for the 4000-customer demo):
# a narrow representation and small heads vary less between arms, and large batches average
# the rare conversions (about 3.6 % of rows) into steadier gradients. Factorised arm heads
# (baseline + coupon/channel arm effects, see mlpkg.models.network) took the share on seeds 1-4
# from 0.74 (per-arm heads) to 0.79; they need more steps, and early stopping (patience 4) ended
# those runs after 12-35 epochs: a cap of 20 stopped three of four early, hence 40.
TRAINER: dict[str, Any] = {
    "accelerator": "cpu",
    "max_epochs": 40,
    "batch_size": 4096,
    "learning_rate": 3e-3,
    "weight_decay": 1e-5,
    "hidden_dim": 32,
    "head_dim": 8,
    "embedding_dim": 4,
    "dropout": 0.2,
    "arm_heads": "factorised",
    "num_threads": THREADS,
}
POLICY_LABELS = {
    "network": "uplift network",
    "tlearner": "T-learner (HGB)",
    "response": "response model",
    "random": "random",
    "noisy_oracle": "noisy oracle",
    "oracle": "oracle",
}


def _quiet() -> None:
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Imported first: both configure their loggers at import, which would undo the levels below.
    import mlflow  # noqa: F401
    import pytorch_lightning  # noqa: F401

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "mlflow"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """Return the mean and a 95 % t-interval over seeds (the mean twice for a single value)."""
    from scipy import stats

    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def print_seed(out: dict[str, Any]) -> None:
    """Print one seed's policies as a table."""
    print(
        f"\nseed {out['seed']}: {out['n_training_rows']} training rows, {out['n_eval']} evaluated customers, "
        f"budget {out['budget']:.0f} ({out['budget_per_customer']:.3f}/customer); "
        f"data {out['data_seconds']:.0f} s, network {out['network_train_seconds']:.0f} s, "
        f"T-learner {out['tlearner_train_seconds']:.0f} s, seed total {out['seconds']:.0f} s; "
        f"noisy oracle sd {out['noisy_oracle_sd']:.4f}"
    )
    print(f"  {'policy':<18} {'incr. conv':>10} {'share':>7} {'treated':>8} {'true spend':>11}")
    for key, label in POLICY_LABELS.items():
        print(
            f"  {label:<18} {out[f'{key}_incremental_conversions']:>10.1f} {out[f'{key}_share']:>7.3f} "
            f"{out[f'{key}_treated']:>8d} {out[f'{key}_true_spend']:>11.0f}"
        )
    for label, key in (
        ("Qini, arms' eligible rows (test/qini)", "qini_eligible"),
        ("Qini, every control row", "qini"),
    ):
        for outcome, prefix in (("logged", ""), ("expected", "expected_")):
            cells = ", ".join(
                f"{who} {out[f'{name}_{prefix}{key}_mean_arm']:.5f} / "
                f"{out[f'{name}_{prefix}{key}_best_arm']:.5f}"
                for who, name in (("network", "network"), ("T-learner", "tlearner"), ("true uplift", "truth"))
            )
            print(f"  {label} ({outcome} outcomes; mean arm / best arm): {cells}")
    print(
        f"  uplift vs truth (rmse / corr / best-arm rank corr): network {out['network_uplift_rmse']:.4f} / "
        f"{out['network_uplift_corr']:.3f} / {out['network_best_arm_corr']:.3f}, T-learner "
        f"{out['tlearner_uplift_rmse']:.4f} / {out['tlearner_uplift_corr']:.3f} / "
        f"{out['tlearner_best_arm_corr']:.3f}",
        flush=True,
    )


def _share_result(name: str, key: str, runs: list[dict[str, Any]], target: str) -> dict[str, Any]:
    shares = [r[f"{key}_share"] for r in runs]
    mean, low, high = mean_ci(shares)
    return {
        "name": name,
        "value": mean,
        "unit": "share",
        "reference": "oracle",
        "reference_value": 1.0,
        "ratio": mean,
        "ci95": [low, high],
        "per_seed": shares,
        "incremental_conversions": statistics.fmean(r[f"{key}_incremental_conversions"] for r in runs),
        "oracle_incremental_conversions": statistics.fmean(r["oracle_incremental_conversions"] for r in runs),
        "treated": statistics.fmean(r[f"{key}_treated"] for r in runs),
        "target": target,
        "n_customers": N_CUSTOMERS,
        "seeds": list(SEEDS),
        "treat_share": TREAT_SHARE,
    }


def run(out_dir: Path) -> list[dict[str, Any]]:
    """Run every seed, print the tables and return the results (see the module docstring)."""
    _quiet()
    import torch

    from mlpkg.config import Settings, TrainerSettings
    from mlpkg.simulator import Shop, ShopConfig
    from mlpkg.simulator.lab.policy_quality import POLICIES, evaluate_policies

    torch.set_num_threads(THREADS)
    print(f"uplift quality: {N_CUSTOMERS} customers, seeds {list(SEEDS)}, trainer {TRAINER}", flush=True)
    runs = []
    for seed in SEEDS:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-uplift-") as tmp:
            settings = Settings(
                _env_file=None,
                state_dir=Path(tmp) / "state",
                trainer=TrainerSettings(**TRAINER, seed=seed),
            )
            shop = Shop(ShopConfig(seed=seed, n_customers=N_CUSTOMERS, campaign_share=1.0))
            out = evaluate_policies(
                shop,
                settings,
                Path(tmp) / "work",
                treat_share=TREAT_SHARE,
                seed=seed,
                n_threads=THREADS,
            )
        out["seconds"] = time.perf_counter() - started
        runs.append(out)
        print_seed(out)

    print(f"\nshare of the oracle's incremental conversions over {len(runs)} seeds (mean, 95% CI):")
    for key in POLICIES:
        mean, low, high = mean_ci([r[f"{key}_share"] for r in runs])
        print(f"  {POLICY_LABELS[key]:<18} {mean:.3f}  [{low:.3f}, {high:.3f}]")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "uplift_quality_per_seed.json").write_text(json.dumps(runs, indent=2, default=float))

    net_qini = statistics.fmean(r["network_qini_eligible_mean_arm"] for r in runs)
    tl_qini = statistics.fmean(r["tlearner_qini_eligible_mean_arm"] for r in runs)
    qini_ratios = [r["network_qini_eligible_mean_arm"] / r["tlearner_qini_eligible_mean_arm"] for r in runs]
    results = [
        {
            **_share_result("uplift_policy_share_of_oracle", "network", runs, ">= 0.80 and >= tlearner"),
            "tlearner_share": statistics.fmean(r["tlearner_share"] for r in runs),
            "noisy_oracle_share": statistics.fmean(r["noisy_oracle_share"] for r in runs),
            "uplift_rmse": statistics.fmean(r["network_uplift_rmse"] for r in runs),
            "trainer": TRAINER,
            "network_train_seconds": statistics.fmean(r["network_train_seconds"] for r in runs),
        },
        _share_result("tlearner_share_of_oracle", "tlearner", runs, "reference"),
        _share_result("response_model_share_of_oracle", "response", runs, "reference"),
        _share_result("random_share_of_oracle", "random", runs, "reference"),
        {
            "name": "network_vs_tlearner_qini",
            "value": net_qini,
            "unit": "qini",
            "reference": "tlearner",
            "reference_value": tl_qini,
            "ratio": net_qini / tl_qini if tl_qini else math.nan,
            "ratio_per_seed": qini_ratios,
            "definition": "mean over arms of the Qini on control + arm rows of customers consented to the "
            "arm's channel (logged outcomes, IPW), test split",
            **{
                f"{name}_{prefix}{key}_{kind}": statistics.fmean(
                    r[f"{name}_{prefix}{key}_{kind}"] for r in runs
                )
                for name in ("network", "tlearner", "truth")
                for prefix in ("", "expected_")
                for key in ("qini", "qini_eligible")
                for kind in ("mean_arm", "best_arm")
            },
            "network_train_seconds": statistics.fmean(r["network_train_seconds"] for r in runs),
            "tlearner_train_seconds": statistics.fmean(r["tlearner_train_seconds"] for r in runs),
            "target": ">= 1",
            "n_customers": N_CUSTOMERS,
            "seeds": list(SEEDS),
        },
    ]
    return results


if __name__ == "__main__":
    from tests.benchmarks.run import main

    raise SystemExit(main(["--only", "uplift_quality"]))
