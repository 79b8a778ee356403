"""Privacy by design: keyed pseudonyms, the key's handling, forget (idempotent, ledger totals kept), purge."""

from __future__ import annotations

import re
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError
from sqlalchemy import func, select

from mlpkg import privacy, stages
from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from mlpkg.delivery import deliver_campaign
from mlpkg.simulator.lab import harness
from tests.fixtures import run_cli, shop_ids

pytestmark = pytest.mark.unit

PSN = re.compile(r"^psn-[0-9a-f]{24}$")


@pytest.fixture
def ingested(ingested):
    """The shared ingested shop, its event-store parts listed at the copy (forget and purge rewrite them)."""
    settings, engine = ingested
    with session_scope(engine) as s:
        for part in s.scalars(select(m.EventPart)):
            part.path = str(settings.event_store_dir / Path(part.path).name)
    return settings, engine


# --- pseudonyms and the key --------------------------------------------------------------------------


def test_a_pseudonym_is_24_hex_digits_of_an_hmac_under_the_key():
    a, b = b"k" * 32, b"j" * 32
    assert PSN.match(privacy.pseudonym(a, "C0000001"))
    assert privacy.pseudonym(a, "C0000001") == privacy.pseudonym(a, "C0000001")
    assert privacy.pseudonym(a, "C0000001") != privacy.pseudonym(a, "C0000002")
    assert privacy.pseudonym(a, "C0000001") != privacy.pseudonym(b, "C0000001"), "keyed, not a plain hash"
    ids = pd.Series(["C1", None, "C2", "C1", privacy.pseudonym(a, "C9")], dtype=object)
    out = privacy.pseudonymise_ids(a, ids)
    assert out.iloc[0] == out.iloc[3] == privacy.pseudonym(a, "C1") and out.iloc[1] is None
    assert out.iloc[4] == privacy.pseudonym(a, "C9"), "a pseudonym (a provider's echo) is kept as it is"


def test_a_missing_key_is_generated_once_with_mode_0600_and_reused(settings):
    path = privacy.key_path(settings)
    assert not path.exists()
    first = privacy.pseudonym_key(settings)
    assert path.is_file() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert privacy.pseudonym_key(settings) == first and len(first) >= 32
    assert privacy.pseudonym(first, "C1") == privacy.pseudonym(privacy.pseudonym_key(settings), "C1")


def test_a_configured_key_is_used_and_no_file_is_written(tmp_path):
    s = Settings(_env_file=None, state_dir=tmp_path / "state",
                 privacy={"pseudonym_key": "s3cret-key-0123456789"})
    assert privacy.pseudonym_key(s) == b"s3cret-key-0123456789"
    assert not privacy.key_path(s).exists()
    assert "s3cret" not in repr(s), "the key is a secret"


def test_without_a_key_and_with_generation_off_is_a_clear_error(tmp_path):
    s = Settings(_env_file=None, state_dir=tmp_path / "state", privacy={"generate_key": False})
    with pytest.raises(privacy.PrivacyError, match="COUPONOPS_PRIVACY__PSEUDONYM_KEY is not set"):
        privacy.pseudonym_key(s)
    assert not privacy.key_path(s).exists()


def test_a_short_key_is_refused_and_the_cli_names_it_without_echoing_it(settings, monkeypatch):
    with pytest.raises(ValidationError, match="at least 16 characters"):
        Settings(_env_file=None, privacy={"pseudonym_key": "short"})
    monkeypatch.setenv("COUPONOPS_PRIVACY__PSEUDONYM_KEY", "tooshort")
    result = run_cli("forget", "C1", "--reason", "x")
    assert result.exit_code == 2
    assert "COUPONOPS_PRIVACY__PSEUDONYM_KEY" in result.output and "tooshort" not in result.output
    assert "Traceback" not in result.output


# --- ingest stores pseudonyms; the shop's id only in contacts -----------------------------------------


def _shop_customers(settings) -> list[str]:
    return pd.read_csv(settings.raw_dir / "initial" / "customers.csv", dtype=str)["customer_id"].tolist()


def test_the_warehouse_holds_the_shop_ids_only_in_contacts(ingested):
    settings, engine = ingested
    raw = _shop_customers(settings)
    key = privacy.pseudonym_key(settings)
    with session_scope(engine) as s:
        customers = q.known_ids(s, m.Customer.customer_id)
        assert customers == {privacy.pseudonym(key, c) for c in raw}
        ids = q.known_ids(s, m.Event.customer_id) | q.known_ids(s, m.Order.customer_id)
        assert ids and all(PSN.match(c) for c in ids)
        external = dict(s.execute(select(m.Contact.customer_id, m.Contact.external_id)).all())
    assert set(external.values()) == set(raw)
    assert all(privacy.pseudonym(key, shop) == psn for psn, shop in external.items())
    parts = [pq.read_table(p, columns=["customer_id"]) for p in (settings.event_store_dir).glob("*.parquet")]
    assert parts and all(PSN.match(c) for t in parts for c in t["customer_id"].to_pylist()[:500])


# --- forget --------------------------------------------------------------------------------------------

T0 = datetime(2025, 7, 1, 9, 0, tzinfo=UTC)


def _ledger(engine, customers: list[str]) -> None:
    """A delivered campaign over ``customers`` (email) with feedback events, as the loop leaves it."""
    with session_scope(engine) as s:
        s.add(m.Coupon(coupon_id="PRIV10", kind="percent_off", face_value=10, min_basket=0, inventory=100,
                       issued=len(customers), valid_from=T0, valid_to=T0 + timedelta(days=30)))
        s.add(m.Campaign(campaign_id="cmp-priv", created_at=T0, as_of=T0, budget=50.0,
                         committed=0.5 * len(customers), objective="profit", status="allocated", summary={}))
        s.flush()
        for i, cid in enumerate(customers):
            s.add(m.Allocation(campaign_id="cmp-priv", customer_id=cid, arm="PRIV10@email",
                               coupon_id="PRIV10", channel="email", policy="model", propensity=0.9,
                               expected_cost=0.5, created_at=T0))
            q.record_consent_events(s, [dict(customer_id=cid, channel="email", opted_in=True,
                                             updated_at=T0 - timedelta(days=1))])
            s.add(m.FeedbackEvent(event_id=f"fb-{i}", campaign_id="cmp-priv", customer_id=cid,
                                  event_type="order",
                                  ts=T0 + timedelta(days=1), revenue=12.5, ingested_at=T0))


def _totals(engine) -> dict:
    with session_scope(engine) as s:
        camp = s.get(m.Campaign, "cmp-priv")
        return {
            "budget": camp.budget,
            "committed": camp.committed,
            "allocations": s.scalar(select(func.count()).select_from(m.Allocation)),
            "expected_cost": s.scalar(select(func.sum(m.Allocation.expected_cost))),
            "deliveries": dict(
                s.execute(select(m.Delivery.status, func.count()).group_by(m.Delivery.status)).all()
            ),
            "feedback": s.scalar(select(func.count()).select_from(m.FeedbackEvent)),
            "revenue": s.scalar(select(func.sum(m.FeedbackEvent.revenue))),
            "log_rows": s.scalar(select(func.count()).select_from(m.CampaignLogRow)),
        }


def _rows_naming(engine, value: str) -> dict[str, int]:
    """Count, per table, the rows with ``value`` anywhere in them (the audit table aside)."""
    found = {}
    with engine.connect() as conn:
        for name, table in m.Base.metadata.tables.items():
            if name == "privacy_audit":
                continue
            n = sum(value in repr(tuple(r)) for r in conn.execute(select(table)))
            if n:
                found[name] = n
    return found


@pytest.fixture
def ledger_state(ingested):
    settings, engine = ingested
    ids = shop_ids(engine)
    contacts = pd.read_csv(settings.raw_dir / "initial" / "contacts.csv", dtype=str)
    with_email = contacts.dropna(subset=["email"])
    shop = with_email["customer_id"].iloc[:4].tolist()
    key = privacy.pseudonym_key(settings)
    customers = [privacy.pseudonym(key, c) for c in shop]
    assert set(customers) <= set(ids)
    _ledger(engine, customers)
    deliver_campaign(engine, "cmp-priv", settings, T0)
    return settings, engine, shop, customers


def test_forget_erases_the_customer_keeps_ledger_totals_and_is_audited(ledger_state):
    settings, engine, shop, customers = ledger_state
    target, psn = shop[0], customers[0]
    with session_scope(engine) as s:
        email = s.get(m.Contact, psn).email
    before = _totals(engine)
    assert before["deliveries"] == {"sent": 4}
    assert _rows_naming(engine, psn), "the customer is there to forget"

    result = stages.forget(settings, target, reason="ticket 42", actor="test", now=T0)

    assert result["status"] == "forgotten" and result["pseudonym"] == psn
    assert result["deleted"]["contacts"] == 1 and result["deleted"]["customers"] == 1
    assert result["deleted"]["events"] > 0 and result["deleted"]["consent"] > 0
    renamed = dict(result["pseudonymised"])
    assert renamed.pop("campaign_log_rows") in (0, 1)  # in the shop's past campaign or not
    assert renamed.pop("allocation_reasons") in (0, 1)  # a reason row where the campaign recorded one
    assert renamed == {"allocations": 1, "feedback_events": 1, "deliveries": 1}
    assert _totals(engine) == before, "budget, spend and counts are unchanged"
    assert _rows_naming(engine, psn) == {} and _rows_naming(engine, target) == {}
    assert _rows_naming(engine, email) == {}
    with session_scope(engine) as s:
        [audit] = q.privacy_audit_rows(s)
        assert (audit.action, audit.pseudonym, audit.actor) == ("forget", psn, "test")
        assert audit.reason == "ticket 42"
        assert target not in repr(audit.details)
        erased = s.scalar(select(m.Allocation.customer_id).where(m.Allocation.customer_id.like("fgt-%")))
        delivery = s.scalar(select(m.Delivery).where(m.Delivery.customer_id == erased))
        assert delivery.dedup_key == f"cmp-priv:{erased}:email" and delivery.payload["customer_id"] == erased
        stmt = select(m.Allocation.customer_id).where(m.Allocation.customer_id.in_(customers))
        others = s.scalars(stmt).all()
        assert sorted(others) == sorted(customers[1:]), "nobody else is touched"
    for part in settings.event_store_dir.glob("*.parquet"):
        assert psn not in pq.read_table(part, columns=["customer_id"])["customer_id"].to_pylist()
    with session_scope(engine) as s:  # the event store still covers the warehouse
        listed = s.scalar(select(func.sum(m.EventPart.rows)))
        assert listed == s.scalar(select(func.count()).select_from(m.Event))


def test_forget_twice_says_already_forgotten_and_an_unknown_id_exits_2(ledger_state):
    settings, engine, shop, _ = ledger_state
    first = run_cli("forget", shop[1], "--reason", "request 7")
    assert first.exit_code == 0 and "forgotten (pseudonym psn-" in first.output
    totals = _totals(engine)

    again = run_cli("forget", shop[1], "--reason", "request 7")
    assert again.exit_code == 0 and "already forgotten" in again.output
    assert _totals(engine) == totals
    with session_scope(engine) as s:
        assert len(q.privacy_audit_rows(s)) == 1

    unknown = run_cli("forget", "NOBODY-123", "--reason", "request 8")
    assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    assert "unknown customer id 'NOBODY-123'" in " ".join(unknown.output.split())
    blank = run_cli("forget", shop[2], "--reason", " ")
    assert blank.exit_code == 2 and "--reason" in blank.output
    with session_scope(engine) as s:
        assert len(q.privacy_audit_rows(s)) == 1


def test_a_later_export_does_not_bring_a_forgotten_customer_back(ledger_state):
    settings, engine, shop, customers = ledger_state
    stages.forget(settings, shop[0], reason="gdpr", actor="test", now=T0)
    # The shop's next export still lists the customer (full snapshots and new events).
    shop_world = harness.load_world(settings)
    shop_world.advance(3)
    shop_world.save(harness.world_path(settings))
    batch = harness.land_simulated_batch(settings, "after-forget")
    assert shop[0] in set(pd.read_csv(f"{batch['batch_dir']}/customers.csv", dtype=str)["customer_id"])

    report = stages.ingest(settings, batch["batch_dir"])

    dropped = report["forgotten_rows_dropped"]
    assert dropped["customers"] == 1 and dropped["contacts"] == 1 and dropped["consent"] >= 1
    assert _rows_naming(engine, customers[0]) == {}
    with session_scope(engine) as s:
        assert s.get(m.Customer, customers[1]) is not None


# --- retention -----------------------------------------------------------------------------------------


def test_purge_deletes_old_behaviour_in_the_warehouse_and_the_event_store_and_is_audited(ingested):
    settings, engine = ingested
    assert stages.purge(settings, now=T0)["skipped"] is True, "no retention set: behaviour is kept"
    with session_scope(engine) as s:
        first, last = s.execute(select(func.min(m.Event.ts), func.max(m.Event.ts))).one()
        total = s.scalar(select(func.count()).select_from(m.Event))
    first, last = q.as_utc(first), q.as_utc(last)
    now = last.to_pydatetime()
    days = max(1, int((last - first).days // 2))
    retention = settings.privacy.model_copy(update={"retention_days": days})
    kept = settings.model_copy(update={"privacy": retention})
    cutoff = now - timedelta(days=days)

    result = stages.purge(kept, now=now)

    assert result["skipped"] is False and 0 < result["events"] < total
    assert result["event_store_rows"] == result["events"]
    with session_scope(engine) as s:
        assert q.as_utc(s.scalar(select(func.min(m.Event.ts)))) >= pd.Timestamp(cutoff)
        left = s.scalar(select(func.count()).select_from(m.Event))
        assert left == total - result["events"] == s.scalar(select(func.sum(m.EventPart.rows)))
        [audit] = q.privacy_audit_rows(s)
        assert audit.action == "purge" and audit.pseudonym is None
        assert audit.details["events"] == result["events"]
    for part in settings.event_store_dir.glob("*.parquet"):
        ts = pq.read_table(part, columns=["ts"])["ts"].to_pandas()
        assert (ts >= pd.Timestamp(cutoff)).all()
    again = stages.purge(kept, now=now)
    assert again["skipped"] is True, "nothing older left: a second run writes nothing"
    with session_scope(engine) as s:
        assert len(q.privacy_audit_rows(s)) == 1
