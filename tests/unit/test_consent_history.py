"""Consent is an event history: the state at a time is the latest event by ``updated_at``.

Whatever order the events arrive in (within one file, across batches), an older opt-in never
undoes a newer opt-out, two events at the same instant that disagree count as an opt-out, and
allocation and delivery read consent as of the campaign's time and the send time.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from sqlalchemy import inspect, select, text

from mlpkg.allocation.campaign import allocate_campaign, score_population
from mlpkg.data import _load_table, customer_features, ingest_batch
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import alembic_config, make_engine, migrate, session_scope
from mlpkg.delivery import SendReceipt, deliver_campaign, enqueue_campaign
from mlpkg.simulator.lab import harness
from tests.fixtures import plant_contacts, shop_ids, use_oracle

unit = pytest.mark.unit

CUSTOMERS = ("k1", "k2", "k3")
CHANNELS = ("email", "sms")
BASE = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
ZONES = (UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5)))


def _at(minute: int) -> datetime:
    return BASE + timedelta(minutes=minute)


def _ev(customer: str, opted_in: bool, ts: datetime, channel: str = "email") -> dict:
    """One consent event as the writers take it."""
    return dict(customer_id=customer, channel=channel, opted_in=opted_in, updated_at=ts)


def _reference(events, as_of: datetime | None = None, *, strict: bool = False) -> dict[tuple[str, str], bool]:
    """Each (customer, channel)'s state from the latest event at (or strictly before) ``as_of``."""
    latest: dict[tuple[str, str], tuple[datetime, bool]] = {}
    for customer, channel, minute, opted in events:
        ts = _at(minute)
        if as_of is not None and (ts >= as_of if strict else ts > as_of):
            continue
        seen = latest.get((customer, channel))
        if seen is None or ts > seen[0]:
            latest[(customer, channel)] = (ts, opted)
        elif ts == seen[0]:
            latest[(customer, channel)] = (ts, seen[1] and opted)  # the opt-out wins a tie
    return {key: opted for key, (_, opted) in latest.items()}


def _opted_in(reference: dict[tuple[str, str], bool]) -> set[tuple[str, str]]:
    return {key for key, opted in reference.items() if opted}


def _pairs(by_channel: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(customer, channel) for channel, ids in by_channel.items() for customer in ids}


@pytest.fixture
def consent_engine(engine):
    """A migrated warehouse with the property tests' customers and channels."""
    with session_scope(engine) as s:
        q.upsert_rows(s, m.Channel, [dict(channel=c, send_cost=0.01, daily_capacity=10) for c in CHANNELS])
        q.upsert_rows(s, m.Customer, [
            dict(customer_id=c, signup_date=date(2025, 1, 1), region="north", device="ios", segment="regular")
            for c in CUSTOMERS
        ])
    return engine


_events = st.lists(
    st.tuples(st.sampled_from(CUSTOMERS), st.sampled_from(CHANNELS), st.integers(0, 6), st.booleans()),
    min_size=1,
    max_size=24,
)


@unit
@hsettings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events=_events, data=st.data())
def test_loaded_consent_is_the_latest_event_whatever_the_arrival_order(consent_engine, events, data):
    engine = consent_engine
    arrived = [events[i] for i in data.draw(st.permutations(range(len(events))), label="arrival order")]
    cuts = sorted(data.draw(st.sets(st.integers(1, len(arrived)), max_size=4), label="batch ends"))
    batches = [arrived[a:b] for a, b in zip([0, *cuts], [*cuts, len(arrived)], strict=True) if b > a]
    with session_scope(engine) as s:
        q.delete_rows(s, m.Consent)
    for batch in batches:
        with session_scope(engine) as s:  # one transaction per batch, as ingestion does
            if data.draw(st.booleans(), label="as a file"):
                frame = pd.DataFrame({
                    "customer_id": [e[0] for e in batch],
                    "channel": [e[1] for e in batch],
                    "opted_in": [int(e[3]) for e in batch],
                    "updated_at": pd.to_datetime([_at(e[2]) for e in batch], utc=True),
                })
                _load_table(s, "consent", frame, BASE)
            else:  # straight from a writer, each timestamp in some time zone
                zones = data.draw(st.lists(st.sampled_from(ZONES), min_size=len(batch), max_size=len(batch)))
                q.record_consent_events(s, [
                    _ev(c, o, _at(k).astimezone(z), ch) for (c, ch, k, o), z in zip(batch, zones, strict=True)
                ])

    with session_scope(engine) as s:
        rows = s.scalars(select(m.Consent))
        stored = {(r.customer_id, r.channel, q.as_utc(r.updated_at)): r.opted_in for r in rows}
        expected: dict[tuple[str, str, pd.Timestamp], bool] = {}
        for c, ch, k, o in events:
            key = (c, ch, pd.Timestamp(_at(k)))
            expected[key] = expected.get(key, True) and o
        assert stored == expected  # the full history, one opt-out per contradictory instant

        assert _pairs(q.consent_as_of(s, _at(10_000))) == _opted_in(_reference(events))
        for half_minutes in data.draw(st.lists(st.integers(-1, 14), min_size=1, max_size=4), label="as of"):
            as_of = BASE + timedelta(seconds=30 * half_minutes)
            assert _pairs(q.consent_as_of(s, as_of)) == _opted_in(_reference(events, as_of))
            before = {(r.customer_id, r.channel): r.opted_in
                      for r in s.scalars(q.consent_state_query(as_of, inclusive=False))}
            assert before == _reference(events, as_of, strict=True)


@unit
def test_the_same_event_arriving_twice_with_different_values_is_stored_as_an_opt_out(consent_engine):
    ts = _at(3)
    for first, second in ((True, False), (False, True)):
        with session_scope(consent_engine) as s:
            q.delete_rows(s, m.Consent)
            q.record_consent_events(s, [_ev("k1", first, ts)])
        with session_scope(consent_engine) as s:
            # The same instant written in another zone is the same event.
            q.record_consent_events(s, [_ev("k1", second, ts.astimezone(ZONES[1]))])
        with session_scope(consent_engine) as s:
            rows = s.scalars(select(m.Consent)).all()
            assert [(r.customer_id, r.opted_in) for r in rows] == [("k1", False)]
            assert q.consent_as_of(s, _at(60)) == {}


@unit
def test_features_take_the_opt_out_between_rows_at_the_same_instant_in_either_order():
    from mlpkg.features import build_features

    customers = pd.DataFrame({"customer_id": ["k1"], "signup_date": ["2025-01-01"], "region": ["north"],
                              "device": ["ios"], "segment": ["regular"]})
    empty = pd.DataFrame({"customer_id": [], "ts": [], "event_type": [], "revenue": [], "coupon_id": []})
    for values in ([1, 0], [0, 1]):
        consent = pd.DataFrame({"customer_id": ["k1", "k1"], "channel": ["email", "email"],
                                "opted_in": values, "updated_at": [_at(1), _at(1)]})
        f = build_features(customers, empty, empty, pd.Timestamp(_at(60)), consent=consent)
        assert f.loc[0, "consent_email"] == 0


# --- the named defect, through ingestion -----------------------------------------------------------

NOW = datetime(2025, 6, 30, tzinfo=UTC)
T_IN = datetime(2025, 6, 1, 9, 0, tzinfo=UTC)  # the older opt-in
T_OUT = datetime(2025, 6, 10, 9, 0, tzinfo=UTC)  # the newer opt-out


def _snapshot(engine) -> pd.DataFrame:
    """The warehouse's consent as a shop export (a full file, so the volume rule is satisfied)."""
    with engine.connect() as conn:
        df = pd.read_sql(select(m.Consent), conn)
    return pd.DataFrame({
        "customer_id": df["customer_id"].map(shop_ids(engine)),  # the shop exports its own ids
        "channel": df["channel"],
        "opted_in": df["opted_in"].astype(int),
        "updated_at": pd.to_datetime(df["updated_at"], utc=True).dt.strftime("%Y-%m-%dT%H:%M:%SZ"),
    })


def _event(customer: str, opted_in: int, ts: datetime) -> dict:
    return {"customer_id": customer, "channel": "email", "opted_in": opted_in,
            "updated_at": ts.strftime("%Y-%m-%dT%H:%M:%SZ")}


def _land(tmp_path, name: str, frame: pd.DataFrame):
    folder = tmp_path / "landing" / name
    folder.mkdir(parents=True)
    frame.to_csv(folder / "consent.csv", index=False)
    return folder


def _opted_in_on_email(engine, as_of: datetime) -> set[str]:
    with session_scope(engine) as s:
        return q.consent_as_of(s, as_of).get("email", set())


@unit
def test_an_older_opt_in_later_in_the_same_file_does_not_undo_a_newer_opt_out(ingested, tmp_path):
    settings, engine = ingested
    customer = sorted(_opted_in_on_email(engine, NOW))[0]
    shop_id = shop_ids(engine)[customer]
    rows = pd.DataFrame([_event(shop_id, 0, T_OUT), _event(shop_id, 1, T_IN)])  # the opt-out comes first
    batch = _land(tmp_path, "late-opt-in", pd.concat([_snapshot(engine), rows], ignore_index=True))

    report = ingest_batch(engine, batch, settings, now=NOW)

    assert report.loaded["consent"] > 0
    assert customer not in _opted_in_on_email(engine, NOW)
    assert customer in _opted_in_on_email(engine, T_IN + timedelta(days=1))  # the history keeps the opt-in
    with session_scope(engine) as s:
        assert q.consent_as_of(s, NOW).get("email", set()) == _opted_in_on_email(engine, NOW)


@unit
def test_an_older_opt_in_in_a_later_batch_does_not_undo_a_newer_opt_out(ingested, tmp_path):
    settings, engine = ingested
    customer = sorted(_opted_in_on_email(engine, NOW))[0]
    shop_id = shop_ids(engine)[customer]
    snapshot = _snapshot(engine)
    first = _land(tmp_path, "b1", pd.concat([snapshot, pd.DataFrame([_event(shop_id, 0, T_OUT)])]))
    second = _land(tmp_path, "b2", pd.concat([snapshot, pd.DataFrame([_event(shop_id, 1, T_IN)])]))

    ingest_batch(engine, first, settings, now=NOW)
    assert customer not in _opted_in_on_email(engine, NOW)
    ingest_batch(engine, second, settings, now=NOW)

    assert customer not in _opted_in_on_email(engine, NOW)
    assert customer in _opted_in_on_email(engine, T_IN + timedelta(days=1))
    features = customer_features(engine, NOW, [customer])
    assert features["consent_email"].tolist() == [0.0]


# --- allocation reads consent as of the campaign's time ------------------------------------------------


@unit
def test_allocation_never_treats_a_customer_who_opted_out_before_the_campaign(ingested, monkeypatch):
    settings, engine = ingested
    shop = harness.load_world(settings)
    use_oracle(monkeypatch, shop)
    as_of = shop.now.to_pydatetime()

    def population():
        return score_population(engine, settings, as_of=as_of, model_uri="oracle", objective="profit")

    before = population()
    email = np.array([arm.endswith("@email") for arm in before.catalog.arms])
    open_ids = before.ids[before.eligible[:, email].any(axis=1)]
    assert len(open_ids) >= 12
    opted_out, at_the_time, later = list(open_ids[:6]), list(open_ids[6:9]), list(open_ids[9:12])
    with session_scope(engine) as s:
        # Arrival order matters to the old upsert: the opt-out first, then an older opt-in, then
        # an opt-in dated after the campaign (not in force yet at as_of).
        for ts, opted, ids in (
            (as_of - timedelta(days=2), False, opted_out),
            (as_of, False, at_the_time),
            (as_of + timedelta(days=1), False, later),
            (as_of - timedelta(days=5), True, opted_out),
            (as_of + timedelta(days=3), True, opted_out),
        ):
            q.record_consent_events(s, [_ev(c, opted, ts) for c in ids])

    after = population()
    row = {c: i for i, c in enumerate(after.ids)}
    for c in opted_out + at_the_time:
        assert not after.eligible[row[c], email].any(), c
        np.testing.assert_array_equal(after.eligible[row[c], ~email], before.eligible[row[c], ~email])
    for c in later:  # an opt-out dated after the campaign does not count yet
        np.testing.assert_array_equal(after.eligible[row[c]], before.eligible[row[c]])

    allocate_campaign(engine, settings, campaign_id="c-consent", as_of=as_of, run_key="r1",
                      model_uri="oracle", model_version="0", now=as_of, budget=500.0, objective="profit")
    with engine.connect() as conn:
        ledger = pd.read_sql(select(m.Allocation).where(m.Allocation.campaign_id == "c-consent"), conn)
    emailed = ledger[(ledger["channel"] == "email") & ledger["coupon_id"].notna()]
    assert len(emailed) > 0
    assert not emailed["customer_id"].isin(opted_out + at_the_time).any()


# --- delivery reads consent as of the send time ------------------------------------------------------

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class _Recorder:
    def __init__(self) -> None:
        self.received: list[str] = []

    def send(self, message) -> SendReceipt:  # noqa: ANN001
        self.received.append(message.dedup_key.split(":")[1])
        return SendReceipt(provider_message_id=f"id-{len(self.received)}")

    def close(self) -> None:
        return None


def _email_campaign(engine, campaign_id: str, customers: list[str]) -> None:
    with session_scope(engine) as s:
        if s.get(m.Coupon, "PCT10") is None:
            s.add(m.Coupon(coupon_id="PCT10", kind="percent_off", face_value=10, min_basket=0, inventory=1000,
                           issued=0, valid_from=T0, valid_to=T0 + timedelta(days=30)))
        s.add(m.Campaign(campaign_id=campaign_id, created_at=T0, as_of=T0, budget=100.0, committed=0.0,
                         objective="profit", status="allocated", summary={}))
        s.flush()
        for c in customers:
            s.add(m.Allocation(campaign_id=campaign_id, customer_id=c, arm="PCT10@email", coupon_id="PCT10",
                               channel="email", policy="model", propensity=0.5, created_at=T0))


@pytest.fixture
def outbox_world(engine):
    """Six customers with email contacts, opted in since 2025, then each given its own consent story."""
    with session_scope(engine) as s:
        plant_contacts(s, ["d1", "d2", "d3", "d4", "d5"])
        plant_contacts(s, ["d6"], consent=False)  # an address but never a consent
        hour = timedelta(hours=1)
        q.record_consent_events(s, [_ev("d1", False, T0 - hour), _ev("d2", False, T0 + hour),
                                    _ev("d3", False, T0 - hour), _ev("d5", False, T0 - hour, "sms")])
    with session_scope(engine) as s:  # d3's older opt-in arrives after its opt-out
        q.record_consent_events(s, [_ev("d3", True, T0 - timedelta(hours=2))])
    return engine


@unit
def test_delivery_skips_a_customer_whose_opt_out_is_dated_before_the_send(outbox_world):
    engine = outbox_world
    customers = ["d1", "d2", "d3", "d4", "d5", "d6"]
    _email_campaign(engine, "cmp-a", customers)
    _email_campaign(engine, "cmp-b", customers)
    with session_scope(engine) as s:
        # Enqueued three hours after the send time it states: consent as of the send time counts.
        assert enqueue_campaign(s, "cmp-a", now=T0 + timedelta(hours=3), sent_at=T0) == 6
        # Without a send time the messages go out now, after d2's opt-out too.
        assert enqueue_campaign(s, "cmp-b", now=T0 + timedelta(hours=3)) == 6
    with session_scope(engine) as s:
        rows = {(d.campaign_id, d.customer_id): d for d in s.scalars(select(m.Delivery))}
    for campaign, skipped in (("cmp-a", {"d1", "d3", "d6"}), ("cmp-b", {"d1", "d2", "d3", "d6"})):
        for c in customers:
            d = rows[(campaign, c)]
            if c in skipped:
                assert (d.status, d.last_error) == ("skipped", "no email consent"), (campaign, c)
            else:
                assert d.status == "pending" and d.last_error is None, (campaign, c)


@unit
def test_deliver_campaign_never_sends_to_an_opted_out_customer(outbox_world, settings):
    engine = outbox_world
    _email_campaign(engine, "cmp-c", ["d1", "d2", "d3", "d4"])
    sender = _Recorder()
    result = deliver_campaign(engine, "cmp-c", settings, T0, senders={"email": sender}, max_wait_seconds=0)
    assert sorted(sender.received) == ["d2", "d4"]
    assert result["skipped_reasons"] == {"no email consent": 2}
    assert result["campaign_status"] == "delivered"


# --- the schema: migration 0004 on SQLite and PostgreSQL -----------------------------------------------


def assert_models_match(url: str) -> None:
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), m.Base.metadata) == []
        # Autogenerate does not compare primary keys: check them table by table.
        insp = inspect(eng)
        for name, table in m.Base.metadata.tables.items():
            pk = [c.name for c in table.primary_key]
            assert insp.get_pk_constraint(name)["constrained_columns"] == pk, name
    finally:
        eng.dispose()


def assert_upgrade_keeps_rows_and_downgrade_keeps_the_latest(url: str) -> None:
    migrate(url, "0003_landed_batches")
    eng = make_engine(url)
    try:
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO channels VALUES ('email', 0.01, 10)"))
            conn.execute(text("INSERT INTO customers VALUES ('a', '2025-01-01', 'n', 'ios', 'r'), "
                              "('b', '2025-01-01', 'n', 'ios', 'r')"))
        with session_scope(eng) as s:
            s.add_all([m.Consent(customer_id="a", channel="email", opted_in=True, updated_at=_at(0)),
                       m.Consent(customer_id="b", channel="email", opted_in=False, updated_at=_at(0))])
        migrate(url)
        with session_scope(eng) as s:
            assert q.consent_as_of(s, _at(1)) == {"email": {"a"}}
            q.record_consent_events(s, [_ev("a", False, _at(5)), _ev("b", True, _at(5))])
        with session_scope(eng) as s:
            q.record_consent_events(s, [_ev("b", False, _at(5))])
        with session_scope(eng) as s:
            assert q.consent_as_of(s, _at(1)) == {"email": {"a"}}
            assert q.consent_as_of(s, _at(6)) == {}
        eng.dispose()
        command.downgrade(alembic_config(url), "0003_landed_batches")
        with eng.connect() as conn:
            rows = conn.execute(text("SELECT customer_id, opted_in FROM consent ORDER BY customer_id")).all()
        assert [(c, bool(o)) for c, o in rows] == [("a", False), ("b", False)]
        eng.dispose()
        migrate(url)
    finally:
        eng.dispose()
    assert_models_match(url)


@unit
def test_models_match_the_migrated_schema_on_sqlite(engine, settings):
    assert_models_match(settings.resolved_warehouse_url)


@unit
def test_migration_keeps_existing_consent_on_sqlite(tmp_path):
    assert_upgrade_keeps_rows_and_downgrade_keeps_the_latest(f"sqlite:///{tmp_path / 'w.db'}")

