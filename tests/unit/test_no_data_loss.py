"""Nothing is lost or overwritten by a load: facts are inserted once, contradictions are refused.

Every refusal goes through the real front door (``couponops ingest`` / ``import-log``): exit code
2, one message naming the file, the key, the column and both values, the input quarantined with
its ``validation_result.json`` and the warehouse unchanged.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
from sqlalchemy import select

from mlpkg import stages
from mlpkg.campaign_logs import LogSpecError, load_log_spec
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from tests.fixtures import run_cli, stored_id

pytestmark = pytest.mark.unit


_cli = run_cli


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def _orders(settings) -> pd.DataFrame:
    return pd.read_csv(settings.raw_dir / "initial" / "orders.csv", dtype=str, keep_default_na=False)


def _batch(settings, name: str, **files: pd.DataFrame):
    folder = settings.raw_dir / name
    folder.mkdir(parents=True)
    for table, frame in files.items():
        frame.to_csv(folder / f"{table}.csv", index=False)
    return folder


def _quarantined(settings, prefix: str):
    found = [p for p in settings.quarantine_dir.iterdir() if p.name.startswith(prefix)]
    assert len(found) == 1, found
    return found[0], json.loads((found[0] / "validation_result.json").read_text())


def _stored_order(engine, order_id):
    with session_scope(engine) as s:
        row = s.get(m.Order, order_id)
        return row.customer_id, row.revenue


def test_an_order_id_sent_again_with_other_content_is_refused_naming_both_values(ingested):
    settings, engine = ingested
    orders = _orders(settings).head(5).copy()
    oid, old_revenue = orders.loc[2, "order_id"], float(orders.loc[2, "revenue"])
    orders.loc[2, "revenue"] = "777.5"
    folder = _batch(settings, "resent", orders=orders)
    before = _snapshot(engine)

    result = _cli("ingest", folder)

    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "orders.csv" in out and "no_contradiction" in out and "'revenue'" in out
    assert repr(oid) in out and str(old_revenue) in out and "777.5" in out and "line 4" in out
    assert "Traceback" not in result.output
    assert _snapshot(engine) == before
    assert _stored_order(engine, oid)[1] == pytest.approx(old_revenue)
    _, report = _quarantined(settings, "resent-")
    assert report["reports"]["orders"]["failures"][0]["expectation"] == "no_contradiction"


def test_an_identical_replay_of_stored_orders_is_a_no_op(ingested):
    settings, engine = ingested
    replay = _orders(settings).head(20).iloc[::-1]  # other bytes, same facts
    folder = _batch(settings, "replay", orders=replay)
    before = _snapshot(engine)

    report = stages.ingest(settings, folder)

    assert report["loaded"]["orders"] == 20
    counts, sums = _snapshot(engine)
    assert counts["orders"] == before[0]["orders"] and sums["orders"] == before[1]["orders"]


def test_a_row_flagged_as_correction_overwrites_the_stored_order(ingested):
    settings, engine = ingested
    orders = _orders(settings).head(3).copy()
    oid = orders.loc[1, "order_id"]
    orders["is_correction"] = ["0", "1", "0"]
    orders.loc[1, "revenue"] = "12.34"
    folder = _batch(settings, "correction", orders=orders)

    report = stages.ingest(settings, folder)

    assert not any("is_correction" in w for w in report["warnings"])
    assert _stored_order(engine, oid)[1] == pytest.approx(12.34)


def test_contradicting_orders_across_files_of_one_batch_are_refused(ingested):
    settings, engine = ingested
    with session_scope(engine) as s:
        a, b = s.execute(select(m.Customer.customer_id).order_by(m.Customer.customer_id).limit(2)).scalars()
        last = q.as_utc(q.latest_ts(s, m.Order.ts))
        s.add(
            m.Campaign(
                campaign_id="c1",
                created_at=last,
                as_of=last,
                budget=10.0,
                objective="conversions",
                status="allocated",
                summary={},
            )
        )
        s.flush()
        for cid in (a, b):
            s.add(
                m.Allocation(
                    campaign_id="c1",
                    customer_id=cid,
                    arm="control",
                    policy="control",
                    propensity=1.0,
                    created_at=last,
                )
            )
    when = (last + pd.Timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    orders = pd.DataFrame(
        [
            {
                "order_id": "NEW-1",
                "customer_id": a,
                "ts": when,
                "revenue": "40.0",
                "n_items": "1",
                "coupon_id": "",
            }
        ]
    )
    feedback = pd.DataFrame(
        [
            {
                "event_id": "c1-E1",
                "campaign_id": "c1",
                "customer_id": b,
                "event_type": "order",
                "ts": when,
                "coupon_id": "",
                "channel": "",
                "order_id": "NEW-1",
                "revenue": "55.0",
            }
        ]
    )
    folder = _batch(settings, "two-files", orders=orders, feedback=feedback)
    before = _snapshot(engine)

    result = _cli("ingest", folder)

    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "one_order_per_id" in out and "'NEW-1'" in out
    assert (
        f"customer '{a}'" in out
        and f"customer '{b}'" in out
        and "orders.csv" in out
        and "feedback.csv" in out
    )
    assert _snapshot(engine) == before
    _quarantined(settings, "two-files-")


def _shop_log(engine):
    with session_scope(engine) as s:
        return s.execute(select(m.CampaignLog.name).where(m.CampaignLog.source == "shop-export")).scalar_one()


def _log_frame(settings, engine, name):
    log = pd.read_csv(settings.raw_dir / "initial" / "campaign_log.csv", dtype=str, keep_default_na=False)
    return log.assign(campaign_id=name)


def test_import_log_may_not_replace_a_shop_batch_log(ingested, tmp_path):
    settings, engine = ingested
    name = _shop_log(engine)
    frame = pd.DataFrame(
        {
            "user": [f"u{i}" for i in range(40)],
            "variant": ["a", "holdout"] * 20,
            "bought": [0, 1] * 20,
            "x": range(40),
        }
    )
    frame.to_csv(tmp_path / "mine.csv", index=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        f"name: {name}\nid_column: user\ntreatment:\n  column: variant\n  control: holdout\n"
        "  costs: {a: 1.0}\noutcomes:\n  conversion: bought\n"
    )
    with session_scope(engine) as s:
        rows_before = q.count_log_rows(s, name)
    before = _snapshot(engine)

    result = _cli("import-log", tmp_path / "mine.csv", "--spec", spec)

    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "log_name_owned" in out and repr(name) in out and "shop-export" in out
    assert _snapshot(engine) == before
    with session_scope(engine) as s:
        assert q.count_log_rows(s, name) == rows_before
    _quarantined(settings, f"{name}-")


def test_a_shop_batch_may_not_overwrite_an_imported_log(ingested, tmp_path):
    settings, engine = ingested
    frame = pd.DataFrame(
        {
            "user": [f"u{i}" for i in range(40)],
            "variant": ["a", "holdout"] * 20,
            "bought": [0, 1] * 20,
            "x": range(40),
        }
    )
    frame.to_csv(tmp_path / "mine.csv", index=False)
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "name: hist-20990101\nid_column: user\ntreatment:\n  column: variant\n  control: holdout\n"
        "  costs: {a: 1.0}\noutcomes:\n  conversion: bought\n"
    )
    assert _cli("import-log", tmp_path / "mine.csv", "--spec", spec).exit_code == 0
    folder = _batch(settings, "steal", campaign_log=_log_frame(settings, engine, "hist-20990101").head(10))
    before = _snapshot(engine)

    result = _cli("ingest", folder)

    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "log_name_owned" in out and "'hist-20990101'" in out and "campaign_log.csv" in out
    assert _snapshot(engine) == before
    with session_scope(engine) as s:
        assert q.count_log_rows(s, "hist-20990101") == 40


def test_a_campaign_log_row_contradicting_the_stored_one_is_refused(ingested):
    settings, engine = ingested
    name = _shop_log(engine)
    log = _log_frame(settings, engine, name).head(10).copy()
    customer, old = log.loc[4, "customer_id"], float(log.loc[4, "propensity"])
    log.loc[4, "propensity"] = "0.999" if old != 0.999 else "0.5"
    folder = _batch(settings, "relog", campaign_log=log)
    before = _snapshot(engine)

    result = _cli("ingest", folder)

    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    # The refusal names the customer by the pseudonym the rules see, never by the shop's id.
    assert "no_contradiction" in out and "'propensity'" in out and str(old) in out
    assert repr(stored_id(settings, customer)) in out and repr(customer) not in out
    assert _snapshot(engine) == before


def test_dry_run_reports_what_would_change_and_writes_nothing(ingested):
    settings, engine = ingested
    orders = _orders(settings).head(3).copy()
    orders["is_correction"] = ["0", "1", "0"]
    orders.loc[1, "revenue"] = "9.99"
    extra = orders.head(1).assign(order_id="BRAND-NEW-1", is_correction="0")
    folder = _batch(settings, "dry", orders=pd.concat([orders, extra], ignore_index=True))
    before = _snapshot(engine)

    report = stages.ingest(settings, folder, dry_run=True)
    result = _cli("ingest", folder, "--dry-run")

    assert report["dry_run"] is True and report["loaded"] == {}
    assert report["changes"]["orders"] == {"new": 1, "unchanged": 2, "updated": 0, "corrected": 1}
    assert result.exit_code == 0, result.output
    assert "what would change" in result.output and "orders" in result.output
    assert _snapshot(engine) == before and folder.exists()


def test_dry_run_of_a_refused_batch_moves_nothing(ingested):
    settings, engine = ingested
    orders = _orders(settings).head(3).copy()
    with session_scope(engine) as s:
        others = set(s.execute(select(m.Customer.customer_id).limit(5)).scalars()) - {
            orders.loc[0, "customer_id"]
        }
    orders.loc[0, "customer_id"] = sorted(others)[0]
    folder = _batch(settings, "dry-bad", orders=orders)
    before = _snapshot(engine)

    result = _cli("ingest", folder, "--dry-run")

    assert result.exit_code == 2, result.output
    assert "dry run" in result.output and "would be rejected" in result.output
    assert folder.exists() and not any(settings.quarantine_dir.glob("dry-bad-*"))
    assert _snapshot(engine) == before


def test_a_yaml_spec_with_a_duplicated_key_is_refused_naming_key_and_lines(tmp_path):
    spec = tmp_path / "dup.yaml"
    spec.write_text(
        "name: dup\nid_column: user\ntreatment:\n  column: variant\n  control: holdout\n  costs: {a: 1.0}\n"
        "outcomes:\n  conversion: bought\n  extra: [clicked]\noutcomes:\n  conversion: bought\n"
    )
    with pytest.raises(LogSpecError, match=r"duplicate key 'outcomes' at line 10 \(first given at line 7\)"):
        load_log_spec(spec)
