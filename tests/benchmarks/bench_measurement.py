"""Is the measurement honest? Incrementality CIs vs the simulator's truth, and OPE vs true policy value.

1. 20 seeded weekly campaigns of one shop through the product's real stages (allocate,
   deliver, simulated response, feedback ingest, attribution, measurement): how often does the
   measured incremental-conversions 95% CI (model-policy group vs random control) cover the true
   value of what the model-policy group was given?
2. Off-policy evaluation on several seeded shops' logged randomized campaigns: SNIPS and DR
   estimates of a different policy's conversion rate vs that policy's true value.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

QUICK = os.environ.get("COUPONOPS_BENCH_QUICK") == "1"


def ci_coverage(n_campaigns: int, n_customers: int) -> dict:
    """Run seeded weekly campaigns through the product and count CI coverage of the true increment.

    Each campaign is its own week of the same simulated shop: the clock moves on by a week, the
    week's batch is ingested (coupons are restocked), and only then is the next campaign
    allocated. Campaigns therefore never share an attribution window (in the simulator each
    campaign's feedback is an independent draw of every customer's week, so two campaigns in the
    same window would count one customer's week twice) and never run out of coupons (which would
    leave the model group untreated and the "coverage" that of a null effect).
    """
    import mlpkg.registry
    from mlpkg import stages
    from mlpkg.allocation.campaign import allocate_campaign
    from mlpkg.config import Settings
    from mlpkg.db import models as m
    from mlpkg.db.engine import make_engine
    from mlpkg.feedback import measure_campaign
    from mlpkg.simulator.lab import harness

    with tempfile.TemporaryDirectory(prefix="couponops-measure-") as tmp:
        settings = Settings(
            _env_file=None,
            state_dir=Path(tmp) / "state",
            simulator_customers=n_customers,
            campaign={"cooldown_days": 0, "control_share": 0.2, "exploration_share": 0.05},
        )
        window = settings.campaign.attribution_window_days
        stages.init_stores(settings)
        stages.ingest(settings, harness.land_simulated_batch(settings, "initial")["batch_dir"])

        class Oracle:
            """Scores every customer with the simulator's true response (the best possible model)."""

            def __init__(self, shop) -> None:  # noqa: ANN001
                self.shop = shop
                self.arms = list(shop.arm_names)

            def score_arrays(self, df, chunk_size=None):  # noqa: ANN001, ANN201
                ids = df["customer_id"].astype(str).tolist()
                return {"p_conv": self.shop.true_conversion(ids), "revenue": self.shop.true_revenue(ids)}

        original = mlpkg.registry.load_uplift_model
        engine = make_engine(settings.resolved_warehouse_url)
        rows = []
        try:
            for k in range(n_campaigns):
                if k:
                    harness.world_clock(settings, next_round=True, days=window)
                    shop = harness.load_world(settings)
                    stages.ingest(
                        settings, harness.land_next_batch(settings)["batch_dir"], now=shop.now.to_pydatetime()
                    )
                shop = harness.load_world(settings)
                mlpkg.registry.load_uplift_model = lambda uri, tracking_uri=None, shop=shop: Oracle(shop)
                now = shop.now.to_pydatetime()
                later = now + pd.Timedelta(days=window + 1)
                cid = stages.campaign_id_for(now)
                summary = allocate_campaign(
                    engine,
                    settings,
                    campaign_id=cid,
                    as_of=now,
                    run_key=cid,
                    model_uri="oracle",
                    model_version="oracle",
                    now=now,
                    budget=settings.campaign.budget * 3,
                    objective="conversions",
                )
                stages.deliver(settings, cid, now=now)
                batch = harness.simulate_responses(settings, cid)
                stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
                # The measurement itself (attribution, incrementality, stored metrics), without
                # the HTML report that stages.measure also draws (plots only, a third of its time).
                measured = measure_campaign(engine, settings, cid, now=later)
                with engine.connect() as conn:
                    ledger = pd.read_sql(
                        m.Allocation.__table__.select().where(m.Allocation.campaign_id == cid), conn
                    )
                model_group = ledger.loc[ledger.policy == "model", ["customer_id", "arm"]]
                truth = shop.oracle_value(model_group)
                lo, hi = measured["incremental_conversions_ci"]
                rows.append(
                    {
                        "campaign": cid,
                        "treated": int((model_group["arm"] != "control").sum()),
                        "spend": float(summary["spend"]),
                        "true": truth["incremental_conversions"],
                        "measured": measured["incremental_conversions"],
                        "lo": lo,
                        "hi": hi,
                        "covered": lo <= truth["incremental_conversions"] <= hi,
                    }
                )
        finally:
            mlpkg.registry.load_uplift_model = original
            engine.dispose()
    table = pd.DataFrame(rows)
    print(table.round(2).to_string(index=False))
    if (table["treated"] == 0).any():
        raise RuntimeError("a campaign treated nobody: its coverage would be that of a null effect")
    return {
        "coverage": float(table["covered"].mean()),
        "n": len(table),
        "covered": int(table["covered"].sum()),
        "mean_true": float(table["true"].mean()),
        "mean_measured": float(table["measured"].mean()),
    }


def ope_accuracy(n_customers: int, seed: int = 11) -> dict:
    """SNIPS and DR estimates of a non-logging policy on one seeded shop's randomized campaign log."""
    from mlpkg.evaluation.ope import doubly_robust, snips
    from mlpkg.simulator import Shop, ShopConfig

    shop = Shop(ShopConfig(seed=seed, n_customers=n_customers, campaign_share=1.0))
    log = shop.past_campaign()
    arms = list(shop.arm_names)
    ids = log["customer_id"].astype(str).tolist()
    truth = shop.true_conversion(ids)
    # Target policy: the best *email* coupon by a noisy version of the truth where consented, else control.
    rng = np.random.default_rng(seed)
    noisy = truth + rng.normal(0, 0.01, truth.shape)
    deliverable = np.column_stack([np.ones(len(ids), bool), shop.deliverable(ids)])
    email = np.array([a == "control" or a.endswith("@email") for a in arms])
    score = np.where(deliverable & email[None, :], noisy, -np.inf)
    target_arm = np.argmax(score, axis=1)
    true_value = float(truth[np.arange(len(ids)), target_arm].mean())
    logged = log["arm"].map({a: i for i, a in enumerate(arms)}).to_numpy()
    y = log["converted"].to_numpy(float)
    prop = log["propensity"].to_numpy(float)
    follows = (logged == target_arm).astype(float)
    sn = snips(follows, prop, y)
    target = np.zeros((len(ids), len(arms)))
    target[np.arange(len(ids)), target_arm] = 1.0
    # A deliberately simple reward model (per-arm mean): DR must not need a perfect one.
    arm_means = pd.Series(y).groupby(logged).mean().reindex(range(len(arms))).fillna(y.mean()).to_numpy()
    dr = doubly_robust(target, logged, prop, y, np.tile(arm_means, (len(ids), 1)))
    return {
        "seed": seed,
        "true": true_value,
        "snips": float(sn.value),
        "snips_stderr": float(sn.stderr),
        "dr": float(dr.value),
        "n": len(ids),
        "ess": float(sn.effective_sample_size),
    }


def ope_accuracy_over_seeds(n_customers: int, seeds: list[int], tolerance: float = 0.10) -> dict:
    """Run :func:`ope_accuracy` on several seeded shops and summarise the relative errors.

    One shop's estimate has a standard error of about 5% of the value at 60k customers (the
    randomized log spreads customers over 13 arms, so the target policy matches about one row
    in nine), so a single seed lands outside a 10% band now and then by chance alone; several
    seeds say how often it does.
    """
    per_seed = pd.DataFrame([ope_accuracy(n_customers, seed) for seed in seeds])
    per_seed["snips_ratio"] = per_seed["snips"] / per_seed["true"]
    per_seed["dr_ratio"] = per_seed["dr"] / per_seed["true"]
    per_seed["snips_z"] = (per_seed["snips"] - per_seed["true"]) / per_seed["snips_stderr"]
    print(per_seed.round(4).to_string(index=False))
    return {
        "true": float(per_seed["true"].mean()),
        "snips": float(per_seed["snips"].mean()),
        "dr": float(per_seed["dr"].mean()),
        "snips_within": int((abs(per_seed["snips_ratio"] - 1) <= tolerance).sum()),
        "dr_within": int((abs(per_seed["dr_ratio"] - 1) <= tolerance).sum()),
        "seeds": len(per_seed),
        "n": int(per_seed["n"].iloc[0]),
        "ess": float(per_seed["ess"].mean()),
        "per_seed": per_seed.to_dict("records"),
    }


def run(out_dir: Path) -> list[dict]:
    """Run both checks and return benchmark results."""
    cov = ci_coverage(8 if QUICK else 20, 1500 if QUICK else 4000)
    ope = ope_accuracy_over_seeds(20_000 if QUICK else 60_000, [11, 12] if QUICK else [11, 12, 13, 14, 15])
    print(
        f"OPE over {ope['seeds']} seeds: true {ope['true']:.5f}  SNIPS {ope['snips']:.5f} "
        f"({ope['snips_within']}/{ope['seeds']} within 10%)  DR {ope['dr']:.5f} "
        f"({ope['dr_within']}/{ope['seeds']} within 10%)  (n={ope['n']}, mean ESS={ope['ess']:.0f})"
    )
    return [
        {
            "name": "incrementality_ci_coverage",
            "value": cov["coverage"],
            "unit": "share",
            "reference": "nominal 95% (target >= 0.90)",
            "reference_value": 0.95,
            "ratio": cov["coverage"] / 0.95,
            "campaigns": cov["n"],
            "covered": cov["covered"],
            "mean_true_incremental": cov["mean_true"],
            "mean_measured_incremental": cov["mean_measured"],
        },
        {
            "name": "ope_snips_vs_truth",
            "value": ope["snips"],
            "unit": "conv/customer",
            "reference": "simulator true policy value (mean over seeds)",
            "reference_value": ope["true"],
            "ratio": ope["snips"] / ope["true"],
            "n": ope["n"],
            "seeds": ope["seeds"],
            "seeds_within_10pct": ope["snips_within"],
            "per_seed": [
                {k: r[k] for k in ("seed", "true", "snips", "snips_ratio")} for r in ope["per_seed"]
            ],
        },
        {
            "name": "ope_dr_vs_truth",
            "value": ope["dr"],
            "unit": "conv/customer",
            "reference": "simulator true policy value (mean over seeds)",
            "reference_value": ope["true"],
            "ratio": ope["dr"] / ope["true"],
            "n": ope["n"],
            "seeds": ope["seeds"],
            "seeds_within_10pct": ope["dr_within"],
            "per_seed": [{k: r[k] for k in ("seed", "true", "dr", "dr_ratio")} for r in ope["per_seed"]],
        },
    ]
