"""Two-process DDP training (gloo, CPU) learns the same model as one process.

DDP re-executes the launching script for every extra rank, so the fit runs in a small script
in a subprocess (never inside pytest itself). DDP with 2 ranks x batch B averages the two
ranks' gradients, which is the gradient of one batch of 2B; the single-process reference
therefore uses batch 2B and the same number of optimizer steps. The runs still differ in the
order rows are drawn (DistributedSampler vs RandomSampler) and in dropout masks, so they agree
within SGD noise, not bit for bit. Tolerances are set from the spread between two
single-process runs that differ only in their seed (measured on this machine: |delta val/loss|
0.001, |delta val/auc| 0.003, mean |delta p| 0.02, correlation of p 0.99, |delta mean uplift of a
kind| up to 0.03-0.05 after 4 epochs): about 10x for the loss and AUC, 2x for the rest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

SCRIPT = textwrap.dedent(
    """
    import functools, json, sys
    sys.path.insert(0, {tests_dir!r})
    import numpy as np, pandas as pd, pytorch_lightning as pl, torch
    from test_train import ARMS, CATEGORICAL, NUMERIC, make_planted_world
    from mlpkg.models.lightning import UpliftDataModule, UpliftLitModule
    from mlpkg.models.network import MultiArmUpliftNet

    devices, batch_size, seed, out_path = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    pl.seed_everything(seed, verbose=False)
    world = make_planted_world(16_000, seed=1)
    data = UpliftDataModule(world, NUMERIC, CATEGORICAL, ARMS, batch_size=batch_size, seed=0)
    data.setup()
    cards = data.preprocessor.cardinalities
    net = MultiArmUpliftNet(len(NUMERIC), cards, len(ARMS), hidden_dim=32, head_dim=16)
    net.init_output_bias(*data.training_stats())
    module = UpliftLitModule(net, functools.partial(torch.optim.AdamW, lr=3e-3))
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=4,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(module, datamodule=data)
    if trainer.is_global_zero:
        test = data.split_frame("test")
        x_num, x_cat = data.preprocessor.transform(test)
        with torch.inference_mode():
            p = torch.sigmoid(net.eval()(torch.from_numpy(x_num), torch.from_numpy(x_cat))[0]).numpy()
        uplift = pd.Series(p[:, 1] - p[:, 0]).groupby(test["kind"].to_numpy()).mean()
        json.dump({{
            "world_size": trainer.world_size,
            "steps": trainer.global_step,
            "val_loss": float(trainer.callback_metrics["val/loss"]),
            "val_auc": float(trainer.callback_metrics["val/auc"]),
            "uplift_by_kind": uplift.to_dict(),
            "p_conv": p.tolist(),
        }}, open(out_path, "w"))
    """
)


def _fit(script: Path, devices: int, batch_size: int, seed: int, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, str(script), str(devices), str(batch_size), str(seed), str(out)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=script.parent,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


def test_ddp_two_processes_match_single_process(tmp_path: Path) -> None:
    """Validation loss, AUC and predicted uplift agree between DDP x2 and one process."""
    script = tmp_path / "ddp_fit.py"
    script.write_text(SCRIPT.format(tests_dir=str(Path(__file__).parent)))
    ddp = _fit(script, devices=2, batch_size=256, seed=0, out=tmp_path / "ddp.json")
    single = _fit(script, devices=1, batch_size=512, seed=0, out=tmp_path / "single.json")
    assert ddp["world_size"] == 2 and single["world_size"] == 1
    assert ddp["steps"] == single["steps"]  # same optimizer steps: 2 x 256 per step vs 512
    assert abs(ddp["val_loss"] - single["val_loss"]) < 0.01
    assert abs(ddp["val_auc"] - single["val_auc"]) < 0.02
    for kind, value in single["uplift_by_kind"].items():
        assert abs(ddp["uplift_by_kind"][kind] - value) < 0.08, kind
    # The planted ordering holds under DDP too.
    assert ddp["uplift_by_kind"]["persuadable"] > ddp["uplift_by_kind"]["sure_thing"] + 0.1
    assert ddp["uplift_by_kind"]["sleeping_dog"] < 0
    p_ddp, p_single = np.asarray(ddp["p_conv"]), np.asarray(single["p_conv"])
    assert np.abs(p_ddp - p_single).mean() < 0.04
    assert np.corrcoef(p_ddp.ravel(), p_single.ravel())[0, 1] > 0.97
