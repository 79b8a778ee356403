"""The closed loop runs end to end on a tiny shop: cold start, then a trained model takes over."""

import math

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_two_rounds_from_a_cold_start(settings):
    from mlpkg.simulator.lab.closed_loop import run_closed_loop

    rows = run_closed_loop(settings, 2, budget=40.0)
    first, second = rows
    assert first["model_version"] == "none (explore)" and first["retrained"] is True
    assert second["model_version"] not in (None, "none (explore)")
    for row in rows:
        assert row["spend"] <= 40.0 + 1e-6
        assert row["oracle_incremental"] > 0 and math.isfinite(row["share_of_oracle"])
        lo, hi = row["measured_ci"]
        # The measured interval covers what the simulator knows the model group truly gained.
        assert lo < hi and lo <= row["model_group_true"] <= hi, row
        assert math.isfinite(row["ope_snips_incremental"]) and math.isfinite(row["ope_dr_incremental"])
    assert (settings.reports_dir / first["campaign"] / "index.html").exists()
