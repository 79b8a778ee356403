"""`couponops history` and `couponops report` fit a terminal, say every gate outcome and read only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pytest

from mlpkg import gate, registry, stages
from mlpkg.allocation.campaign import allocate_campaign
from mlpkg.config import GateSettings
from mlpkg.feedback import measure_campaign
from mlpkg.simulator.lab import harness
from tests.fixtures import gate_numbers, run_cli, use_oracle

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
RUN_KEY = "couponops_allocate/scheduled__2025-07-07T06:00:00+00:00"
GATE_NOW = datetime(2025, 7, 6, 12, 30, 15, 123456, tzinfo=UTC)


_cli = run_cli


def _gate_three_versions(settings, engine) -> None:
    """Record v1 (promoted: first champion), v2 (kept: gain within noise), v3 (refused: calibration)."""
    client = registry.make_client(settings.resolved_tracking_uri)
    name = settings.registered_model_name
    exp = client.create_experiment("cli-output-gate")
    client.create_registered_model(name)
    champion = None
    for value, calibration in ((0.040, 0.01), (0.041, 0.01), (0.050, 0.2)):
        run = client.create_run(exp)
        version = str(
            client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version
        )
        other = 0.030 if champion is None else 0.040
        nums = gate_numbers(value, other, gain_se=0.002, calibration=calibration)
        decision = gate.decide(
            nums, challenger_version=version, champion_version=champion, gate=GateSettings(),
            holdout="test holdout", economics="test economics",
        )  # fmt: skip
        gate.record_decision(
            client, engine, name=name, decision=decision, numbers=nums, gate=GateSettings(), now=GATE_NOW
        )
        if decision.promoted:
            champion = version


@pytest.fixture
def loop(ingested, monkeypatch):
    """A measured campaign ``c1`` scored by v1, three gated versions and one retraining decision."""
    settings, engine = ingested
    _gate_three_versions(settings, engine)
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    now = shop.now.to_pydatetime()
    allocate_campaign(
        engine,
        settings,
        campaign_id="c1",
        as_of=now,
        run_key=RUN_KEY,
        model_uri="oracle",
        model_version="1",
        now=now,
        budget=80.0,
        objective="conversions",
    )
    stages.deliver(settings, "c1", now=now)
    batch = harness.simulate_responses(settings, "c1")
    later = now + pd.Timedelta(days=8)
    stages.ingest_feedback(settings, batch["feedback_dir"], now=later)
    measure_campaign(engine, settings, "c1", now=later)  # measured, but no HTML report written yet
    ctx = stages.RunContext(dag_id="couponops_retrain", run_id="scheduled__2025-07-15T00:00:00+00:00")
    stages.decide_retrain(settings, ctx, campaign_id="c1")
    return settings, engine


def _row_extents(lines: list[str], title: str, keys: list[str]) -> list[int]:
    """Return how many printed lines each row of the table titled ``title`` takes, rows found by ``keys``."""
    start = next(i for i, ln in enumerate(lines) if ln.strip() == title)
    rule = next(i for i in range(start, len(lines)) if lines[i].lstrip().startswith("─"))
    end = next((i for i in range(rule + 1, len(lines)) if not lines[i].strip()), len(lines))
    body = lines[rule + 1 : end]
    starts, at = [], 0
    for key in keys:
        at = next(i for i in range(at, len(body)) if body[i].lstrip().startswith(key))
        starts.append(at)
        at += 1
    return [b - a for a, b in zip(starts, [*starts[1:], len(body)], strict=True)]


def test_history_fits_80_columns_says_refusals_and_json_holds_the_same_rows(loop):
    settings, _ = loop
    env = {**os.environ, "COLUMNS": "80", "NO_COLOR": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "mlpkg.cli", "history"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = [ln for ln in done.stdout.splitlines() if " INFO mlflow." not in ln]
    assert max(len(ln) for ln in lines) <= 80, done.stdout
    assert "Traceback" not in done.stdout + done.stderr

    result = _cli("history", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["campaign"] for r in rows["campaigns"]] == ["c1"]
    gates = {r["version"]: r for r in rows["gate_decisions"]}
    assert {v: r["outcome"] for v, r in gates.items()} == {"1": "promoted", "2": "kept", "3": "refused"}
    assert gates["3"]["reason"].startswith("guard failed: calibration error 0.2000 > 0.0600 allowed")
    assert gates["2"]["champion"] == "1" and gates["2"]["challenger_value"] == pytest.approx(0.041)
    assert rows["retrain_decisions"] and rows["retrain_decisions"][0]["triggers"]

    tables = {
        "campaigns": ["c1"],
        "gate decisions": [f"v{r['version']}" for r in rows["gate_decisions"]],
        "alias moves": [r["when"][:16].replace("T", " ") for r in rows["promotions"]],
        "retraining decisions": [r["when"][:16].replace("T", " ") for r in rows["retrain_decisions"]],
    }
    for title, keys in tables.items():
        extents = _row_extents(lines, title, keys)
        assert len(extents) == len(keys) and max(extents) <= 2, (title, done.stdout)
    text = done.stdout
    assert "refused" in text and "calibration error 0.2000" in text
    assert "2025-07-06 12:30 " in text and "12:30:15" not in text  # minutes, not microseconds
    assert "allocate" in text and "07-07 06:00" in text and RUN_KEY not in text
    assert "retrain 07-15 00:00" in text


def test_history_of_one_campaign_shows_its_detail_in_text_and_json(loop):
    result = _cli("history", "--campaign", "c1", "--json")
    assert result.exit_code == 0, result.output
    detail = json.loads(result.output)
    assert detail["campaign"] == "c1" and detail["budget"] == 80.0 and detail["model_version"] == "1"
    assert 0 < detail["spent"] <= 80.0 and detail["sent"] > 0 and detail["report"] is None
    assert "incremental_conversions" in detail["measured"]["model_policy"]

    text = _cli("history", "--campaign", "c1")
    assert text.exit_code == 0, text.output
    out = text.output
    assert (
        "campaign c1" in out
        and "observed after customers responded (vs control)" in out
        and "model_policy" in out
    )
    assert f"{detail['sent']}" in out and "v1" in out and RUN_KEY in out
    assert "Campaign report: none yet" in out


def test_report_reads_only_and_leads_with_the_campaign(loop):
    from mlpkg.reports import campaign_report

    settings, _ = loop
    html = settings.reports_dir / "c1" / "index.html"
    quiet = _cli("report")
    assert quiet.exit_code == 0, quiet.output
    assert "Campaign report: none yet" in quiet.output and not html.exists()
    assert quiet.output.index("campaign c1") < quiet.output.index("model registry")
    assert "model metrics" not in quiet.output and "coupons allocated per" not in quiet.output
    assert (
        "observed after customers responded (vs control)" in quiet.output and "model_policy" in quiet.output
    )

    path = campaign_report(settings, "c1", log_to_mlflow=False)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    verbose = _cli("report", "--campaign", "c1", "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert f"Campaign report: {path}" in verbose.output
    assert "coupons allocated per coupon/channel" in verbose.output
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before

    as_json = _cli("report", "--json")
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.output)
    assert summary["campaign"]["campaign_id"] == "c1" and summary["report"] == str(path)
    assert summary["model"]["champion"] == "1" and "model_policy" in summary["observed"]
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_the_campaign_report_leads_with_a_readable_headline_and_works_offline(loop):
    """The page a product owner opens: dates, spend vs budget in the shop's currency, the fair
    comparison first with intervals, what was sent, no raw floats, NaN or None, nothing from a CDN."""
    import re

    from mlpkg.reports import campaign_detail, campaign_report

    settings, _engine = loop
    settings = settings.model_copy(update={"currency": "EUR", "mlflow_ui_url": "http://127.0.0.1:5000"})
    html = campaign_report(settings, "c1", log_to_mlflow=False).read_text(encoding="utf-8")
    text = re.sub(r"<[^>]+>", " ", html.split("<body>", 1)[1])
    text = " ".join(text.replace("&#39;", "'").split())
    detail = campaign_detail(settings, "c1")

    head = text[: text.index("Did the model's targeting work?")]
    for words in (
        "Incremental conversions",
        "Incremental revenue",
        "Profit",
        "Spend vs budget",
        "ROI",
        "Messages sent",
        "95% interval",
        "Sent 2025-",
        "measured 2025-",
        "€80.00 budget",
    ):
        assert words in head, words
    assert f"{detail['sent']:,}" in head
    assert "couponops-uplift v1" in head
    model_link = "http://127.0.0.1:5000/#/models/couponops-uplift/versions/1?workflowType=machine_learning"
    assert f'href="{model_link}"' in html
    # The fair comparison comes before the biased one, which is labelled as such.
    assert text.index("Model policy vs random control") < text.index("All treated vs random control")
    assert "biased: for reference only" in text
    # What was sent: coupon x channel x policy with customers and messages.
    sent_part = text[text.index("What was sent") :]
    assert "model policy" in sent_part and re.search(r"\b(email|sms|push)\b", sent_part)
    # Readable numbers only: percentages, currency, rounded intervals; no NaN/None, no 6-decimal floats.
    assert not re.search(r"\bNaN\b|\bNone\b|\bnan\b", text)
    assert not re.search(r"\d\.\d{4,}", text)
    assert "snake_case" not in text and "incremental_conversions" not in text
    assert re.search(r"\d+\.\d%", text) and "Glossary" in text
    # Offline: images inline, no script or stylesheet fetched from anywhere.
    assert "<script" not in html and not re.search(r"<link[^>]+href=", html)
    assert not re.search(r"src=\"(?!data:)", html)


def test_evaluate_on_a_campaigns_ledger_reweights_its_logged_propensities_and_compares_paired(loop, tmp_path):
    """Sending nobody anything is worth the control rows' conversions weighted by 1/propensity."""
    settings, engine = loop
    from mlpkg.feedback import attribute_campaign

    ledger = attribute_campaign(engine, "c1", settings.campaign.attribution_window_days)
    logged = tmp_path / "logged.csv"
    ledger[["customer_id", "arm"]].to_csv(logged, index=False)
    nobody = tmp_path / "nobody.csv"
    ledger[["customer_id"]].assign(arm="control").to_csv(nobody, index=False)

    result = _cli("evaluate", "--campaign", "c1", "--policy", nobody, "--compare", logged, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["source"]["kind"] == "campaign" and out["source"]["rows"] == len(ledger)
    assert out["logged_value"] == pytest.approx(ledger["converted"].mean())
    control = ledger[ledger["arm"] == "control"]
    weights = 1.0 / control["propensity"]
    expected = float((weights * control["converted"]).sum() / weights.sum())
    assert out["estimates"]["snips"]["value"] == pytest.approx(expected)
    diff = out["compare"]["difference"]["dr"]
    mine, theirs = out["estimates"]["dr"]["value"], out["compare"]["estimates"]["dr"]["value"]
    assert diff["value"] == pytest.approx(mine - theirs) and diff["stderr"] > 0
