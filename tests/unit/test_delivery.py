"""Outbox, senders and dispatcher against a SQLite warehouse and fake receivers."""

from __future__ import annotations

import json
import socket
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from sqlalchemy import func, select

from mlpkg.config import Settings
from mlpkg.db.engine import make_engine, migrate, session_scope
from mlpkg.db.models import Allocation, Campaign, Coupon, Delivery
from mlpkg.delivery import (
    FileSender,
    OutboundMessage,
    PermanentSendError,
    RetryableSendError,
    SendReceipt,
    SmtpSender,
    WebhookSender,
    backoff_delay,
    build_senders,
    claim_batch,
    deliver_campaign,
    dispatch_outbox,
    enqueue_campaign,
    mark_failed,
    mark_sent,
    release_claims,
    status_counts,
)
from mlpkg.delivery.dispatch import recipient_now
from mlpkg.delivery.outbox import as_utc
from tests.fixtures import plant_contacts, planted_contact

pytestmark = pytest.mark.unit

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CAMPAIGN = "cmp-2026-03-01"


class FakeClock:
    """A settable clock shared by the dispatcher and the fake sleep."""

    def __init__(self, start: datetime = T0) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class RecordingSender:
    """Accept every message and remember its key; fail according to a per-key script."""

    def __init__(self, script: dict[str, list[Exception]] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.received: list[str] = []
        self.calls: list[str] = []

    def send(self, message: OutboundMessage) -> SendReceipt:
        self.calls.append(message.dedup_key)
        errors = self.script.get(message.dedup_key)
        if errors:
            raise errors.pop(0)
        self.received.append(message.dedup_key)
        return SendReceipt(provider_message_id=f"id-{len(self.received)}")

    def close(self) -> None:
        return None


class Crash(BaseException):
    """Stands in for the process dying (not an Exception, so nothing handles it)."""


@pytest.fixture
def engine(tmp_path):
    url = f"sqlite:///{tmp_path / 'warehouse.db'}"
    migrate(url)
    eng = make_engine(url)
    yield eng
    eng.dispose()


@pytest.fixture
def settings(tmp_path) -> Settings:
    return Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        delivery_max_attempts=3,
        delivery_backoff_seconds=2.0,
    )


def seed_campaign(engine, allocations: list[tuple[str, str | None, str | None, str]], campaign_id=CAMPAIGN):
    """Insert a campaign with (customer_id, coupon_id, channel, policy) allocation rows.

    Every allocated customer gets planted contacts on all channels.
    """
    with session_scope(engine) as s:
        plant_contacts(s, [a[0] for a in allocations])
        if s.get(Coupon, "PCT10") is None:
            s.add(Coupon(coupon_id="PCT10", kind="percent_off", face_value=10, min_basket=0, inventory=1000,
                         issued=0, valid_from=T0, valid_to=T0 + timedelta(days=30)))
        s.add(Campaign(campaign_id=campaign_id, created_at=T0, as_of=T0, budget=100.0, committed=0.0,
                       objective="profit", status="allocated", summary={}))
        s.flush()  # without a relationship() the unit of work does not order the two tables
        for customer_id, coupon_id, channel, policy in allocations:
            arm = "control" if coupon_id is None else f"{coupon_id}@{channel}"
            s.add(Allocation(campaign_id=campaign_id, customer_id=customer_id, arm=arm, coupon_id=coupon_id,
                             channel=channel, policy=policy, propensity=0.5, created_at=T0))


def email_campaign(engine, n: int, campaign_id=CAMPAIGN) -> list[str]:
    seed_campaign(engine, [(f"c{i:03d}", "PCT10", "email", "model") for i in range(n)], campaign_id)
    with session_scope(engine) as s:
        enqueue_campaign(s, campaign_id, now=T0)
    return [f"{campaign_id}:c{i:03d}:email" for i in range(n)]


def rows(engine) -> dict[str, Delivery]:
    with session_scope(engine) as s:
        return {d.dedup_key: d for d in s.scalars(select(Delivery))}


def test_enqueue_inserts_one_row_per_coupon_allocation_and_is_idempotent(engine):
    seed_campaign(engine, [
        ("c1", "PCT10", "email", "model"),
        ("c2", "PCT10", "sms", "model"),
        ("c3", "PCT10", "push", "explore"),
        ("c4", None, None, "control"),
    ])
    with session_scope(engine) as s:
        assert enqueue_campaign(s, CAMPAIGN, now=T0) == 3
    with session_scope(engine) as s:
        assert enqueue_campaign(s, CAMPAIGN, now=T0 + timedelta(hours=1)) == 0
        assert s.scalar(select(func.count()).select_from(Delivery)) == 3
    by_key = rows(engine)
    assert set(by_key) == {f"{CAMPAIGN}:c1:email", f"{CAMPAIGN}:c2:sms", f"{CAMPAIGN}:c3:push"}
    email = by_key[f"{CAMPAIGN}:c1:email"]
    # Recipients come from the customers' contact rows at send time, one column per channel;
    # no outbox row stores one.
    assert recipient_now(engine, email) == planted_contact("c1", "email") == "c1@planted.example"
    assert email.status == "pending" and email.attempts == 0
    assert email.payload["coupon_id"] == "PCT10" and "10% off" in email.payload["offer"]
    assert as_utc(email.created_at) == T0  # the rerun did not touch existing rows
    assert recipient_now(engine, by_key[f"{CAMPAIGN}:c2:sms"]) == planted_contact("c2", "sms")
    assert recipient_now(engine, by_key[f"{CAMPAIGN}:c3:push"]) == planted_contact("c3", "push")
    stored = repr([(c.name, getattr(d, c.name)) for d in by_key.values() for c in Delivery.__table__.columns])
    assert not [c for c in ("c1", "c2", "c3") for ch in ("email", "sms", "push")
                if planted_contact(c, ch) in stored]


def test_enqueue_adds_only_new_allocations(engine):
    email_campaign(engine, 2)
    with session_scope(engine) as s:
        s.add(Allocation(campaign_id=CAMPAIGN, customer_id="late", arm="PCT10@sms", coupon_id="PCT10",
                         channel="sms", policy="model", propensity=0.5, created_at=T0))
    with session_scope(engine) as s:
        assert enqueue_campaign(s, CAMPAIGN, now=T0) == 1


def test_claims_are_disjoint_and_expired_leases_are_reclaimed(engine):
    keys = email_campaign(engine, 5)
    with session_scope(engine) as s:
        first = claim_batch(s, "email", "w1", 3, T0, lease_seconds=60)
    with session_scope(engine) as s:
        second = claim_batch(s, None, "w2", 10, T0, lease_seconds=60)
    assert [d.dedup_key for d in first] == keys[:3]
    assert [d.dedup_key for d in second] == keys[3:]
    assert {d.status for d in first + second} == {"sending"} and {d.attempts for d in first} == {1}
    with session_scope(engine) as s:
        assert claim_batch(s, None, "w3", 10, T0 + timedelta(seconds=59), lease_seconds=60) == []
    with session_scope(engine) as s:
        mark_sent(s, first[0], now=T0, provider_message_id="x")
    with session_scope(engine) as s:
        again = claim_batch(s, None, "w3", 10, T0 + timedelta(seconds=61), lease_seconds=60)
    # Every unfinished row is claimable again once its worker's lease ran out; the sent one is not.
    assert [d.dedup_key for d in again] == keys[1:]
    assert {d.claimed_by for d in again} == {"w3"} and {d.attempts for d in again} == {2}


def test_claim_filters_by_channel(engine):
    seed_campaign(engine, [("c1", "PCT10", "email", "model"), ("c2", "PCT10", "sms", "model")])
    with session_scope(engine) as s:
        enqueue_campaign(s, CAMPAIGN, now=T0)
    with session_scope(engine) as s:
        assert [d.channel for d in claim_batch(s, "sms", "w", 10, T0)] == ["sms"]
        assert [d.channel for d in claim_batch(s, ["email", "push"], "w", 10, T0)] == ["email"]


def test_backoff_schedule_doubles_and_ends_in_failed(engine):
    (key,) = email_campaign(engine, 1)
    assert [backoff_delay(n, 2.0).total_seconds() for n in (1, 2, 3, 4)] == [2.0, 4.0, 8.0, 16.0]
    now, outcomes, waits = T0, [], []
    for _ in range(3):
        with session_scope(engine) as s:
            (d,) = claim_batch(s, None, "w", 1, now)
            outcomes.append(mark_failed(s, d, "451 try later", retryable=True, now=now,
                                        max_attempts=3, backoff_seconds=2.0))
        row = rows(engine)[key]
        if row.status == "pending":
            due = as_utc(row.next_attempt_at)
            waits.append((due - now).total_seconds())
            with session_scope(engine) as s:  # not due a moment before the backoff ends
                assert claim_batch(s, None, "w", 1, due - timedelta(milliseconds=1)) == []
            now = due
    assert outcomes == ["pending", "pending", "failed"]
    assert waits == [2.0, 4.0]
    final = rows(engine)[key]
    assert final.status == "failed" and final.attempts == 3 and final.last_error == "451 try later"


def test_stale_worker_cannot_overwrite_a_taken_over_claim(engine):
    (key,) = email_campaign(engine, 1)
    with session_scope(engine) as s:
        (old,) = claim_batch(s, None, "slow", 1, T0, lease_seconds=10)
    with session_scope(engine) as s:
        (new,) = claim_batch(s, None, "fresh", 1, T0 + timedelta(seconds=11), lease_seconds=10)
    with session_scope(engine) as s:
        outcome = mark_failed(s, old, "timeout", retryable=True, now=T0, max_attempts=5, backoff_seconds=1)
        assert outcome is None
        assert release_claims(s, [old]) == 0
    assert rows(engine)[key].claimed_by == "fresh"
    # A send that succeeded is a fact whoever holds the claim: the slow worker still records it.
    with session_scope(engine) as s:
        assert mark_sent(s, old, now=T0, provider_message_id="m1")
        assert not mark_sent(s, new, now=T0, provider_message_id="m2")
    assert rows(engine)[key].status == "sent" and rows(engine)[key].provider_message_id == "m1"


def test_release_claims_returns_rows_without_spending_an_attempt(engine):
    keys = email_campaign(engine, 2)
    with session_scope(engine) as s:
        claimed = claim_batch(s, None, "w", 2, T0)
    with session_scope(engine) as s:
        assert release_claims(s, claimed) == 2
    assert {(r.status, r.attempts, r.claimed_by) for r in rows(engine).values()} == {("pending", 0, None)}
    with session_scope(engine) as s:
        assert [d.dedup_key for d in claim_batch(s, None, "w2", 5, T0)] == keys


def test_dispatch_classifies_permanent_and_retryable_errors(engine, settings):
    keys = email_campaign(engine, 4)
    sender = RecordingSender({
        keys[0]: [PermanentSendError("550 no such user")],
        keys[1]: [RetryableSendError("451 busy")],
        keys[2]: [RetryableSendError("451 busy")] * 5,
    })
    clock = FakeClock()
    stats = dispatch_outbox(engine, {"email": sender}, worker_id="w", settings=settings, now_fn=clock)
    assert (stats.sent, stats.bounced, stats.retried, stats.failed) == (1, 1, 2, 0)
    total = stats
    for _ in range(5):  # bounded: max 3 attempts with 2 s, 4 s backoff
        clock.advance(10)
        total = total + dispatch_outbox(engine, {"email": sender}, worker_id="w", settings=settings,
                                        now_fn=clock)
    by_key = rows(engine)
    assert [by_key[k].status for k in keys] == ["bounced", "sent", "failed", "sent"]
    assert [by_key[k].attempts for k in keys] == [1, 2, 3, 1]
    assert "550" in by_key[keys[0]].last_error and by_key[keys[1]].last_error is None
    assert (total.sent, total.bounced, total.failed, total.retried) == (2, 1, 1, 3)
    assert sender.calls.count(keys[0]) == 1  # a bounce is never retried


def test_unexpected_sender_exception_is_retried_not_left_sending(engine, settings):
    (key,) = email_campaign(engine, 1)
    sender = RecordingSender({key: [ValueError("bug")]})
    stats = dispatch_outbox(engine, {"email": sender}, worker_id="w", settings=settings, now_fn=FakeClock())
    assert stats.retried == 1
    row = rows(engine)[key]
    assert row.status == "pending" and "ValueError" in row.last_error


def test_crash_between_send_and_record_resends_only_the_in_flight_message(engine, settings):
    keys = email_campaign(engine, 6)

    class CrashAfterThird(RecordingSender):
        def send(self, message):
            receipt = super().send(message)
            if len(self.received) == 3:
                raise Crash
            return receipt

    receiver = CrashAfterThird()
    clock = FakeClock()
    with pytest.raises(Crash):
        dispatch_outbox(engine, {"email": receiver}, worker_id="w1", settings=settings, now_fn=clock,
                        batch_size=4, lease_seconds=30)
    counts = status_counts_now(engine)
    # Two recorded, one in flight (sent but unrecorded), the unsent rest of the batch handed back.
    assert (counts["sent"], counts["sending"], counts["pending"]) == (2, 1, 3)
    clock.advance(31)
    stats = dispatch_outbox(engine, {"email": receiver}, worker_id="w2", settings=settings, now_fn=clock,
                            lease_seconds=30)
    assert stats.sent == 4
    assert status_counts_now(engine)["sent"] == 6
    assert sorted(set(receiver.received)) == keys
    assert [k for k in keys if receiver.received.count(k) > 1] == [keys[2]]


def status_counts_now(engine) -> dict[str, int]:
    with session_scope(engine) as s:
        return status_counts(s)


def test_worker_that_keeps_dying_on_a_message_gives_up(engine, settings):
    (key,) = email_campaign(engine, 1)
    now = T0
    for _ in range(settings.delivery_max_attempts):
        with session_scope(engine) as s:
            assert claim_batch(s, None, "doomed", 1, now, lease_seconds=5)
        now += timedelta(seconds=6)
    sender = RecordingSender()
    stats = dispatch_outbox(engine, {"email": sender}, worker_id="w", settings=settings,
                            now_fn=lambda: now, lease_seconds=5)
    assert stats.failed == 1 and sender.calls == []
    assert rows(engine)[key].status == "failed"


def test_max_messages_bounds_a_run(engine, settings):
    email_campaign(engine, 5)
    sender = RecordingSender()
    stats = dispatch_outbox(engine, {"email": sender}, worker_id="w", settings=settings, max_messages=2,
                            batch_size=10, now_fn=FakeClock())
    assert stats.sent == 2 and status_counts_now(engine)["pending"] == 3


def test_file_mode_writes_each_message_once_and_reruns_add_nothing(engine, settings):
    seed_campaign(engine, [("c1", "PCT10", "email", "model"), ("c2", "PCT10", "sms", "explore"),
                           ("c3", "PCT10", "push", "model"), ("c4", None, None, "control")])
    result = deliver_campaign(engine, CAMPAIGN, settings, T0)
    files = sorted(settings.outbox_dir.glob("*.json"))
    assert result["enqueued"] == 3 and result["sent"] == 3 and result["dispatched"]["sent"] == 3
    assert result["campaign_status"] == "delivered"
    assert len(files) == 3
    written = {json.loads(p.read_text())["dedup_key"] for p in files}
    assert written == {f"{CAMPAIGN}:c1:email", f"{CAMPAIGN}:c2:sms", f"{CAMPAIGN}:c3:push"}
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    again = deliver_campaign(engine, CAMPAIGN, settings, T0)
    assert again["enqueued"] == 0 and again["dispatched"]["sent"] == 0 and again["sent"] == 3
    assert {p: p.stat().st_mtime_ns for p in settings.outbox_dir.glob("*.json")} == mtimes
    assert not list(settings.outbox_dir.glob(".tmp-*"))


def test_file_sender_rewrite_of_a_key_is_a_harmless_duplicate(tmp_path):
    sender = FileSender(tmp_path / "out")
    message = OutboundMessage("k:1:email", "email", "a@b.example", "s", "b")
    first, second = sender.send(message), sender.send(message)
    assert not first.duplicate and second.duplicate
    assert first.provider_message_id == second.provider_message_id
    assert len(list((tmp_path / "out").iterdir())) == 1


def test_deliver_campaign_waits_for_retries_then_marks_delivered(engine, settings):
    keys = email_campaign(engine, 2)
    sender = RecordingSender({keys[0]: [RetryableSendError("503")] * 2})
    clock = FakeClock()
    result = deliver_campaign(engine, CAMPAIGN, settings, T0, senders={"email": sender}, now_fn=clock,
                              sleep_fn=clock.advance)
    assert result["sent"] == 2 and result["pending"] == 0 and result["campaign_status"] == "delivered"
    assert result["dispatched"] == {"sent": 2, "failed": 0, "bounced": 0, "retried": 2}
    assert clock.now - T0 == timedelta(seconds=2 + 4)


def test_campaign_stays_allocated_while_a_retry_is_outstanding(engine, settings):
    (key,) = email_campaign(engine, 1)
    sender = RecordingSender({key: [RetryableSendError("503")]})
    result = deliver_campaign(engine, CAMPAIGN, settings, T0, senders={"email": sender},
                              now_fn=FakeClock(), max_wait_seconds=0)
    assert result["pending"] == 1 and result["campaign_status"] == "allocated"


def test_build_senders_file_and_live(settings):
    file_senders = build_senders(settings)
    assert set(file_senders) == {"email", "sms", "push"}
    assert all(isinstance(s, FileSender) for s in file_senders.values())
    live = settings.model_copy(update={"delivery_mode": "live", "sms_webhook_url": "http://127.0.0.1:9/sms"})
    with pytest.raises(ValueError, match="push_webhook_url"):
        build_senders(live)
    senders = build_senders(live, ["email", "sms"])
    assert isinstance(senders["email"], SmtpSender) and senders["email"].port == live.smtp_port
    assert isinstance(senders["sms"], WebhookSender) and senders["sms"].url == "http://127.0.0.1:9/sms"
    senders["sms"].close()
    with pytest.raises(ValueError, match="fax"):
        build_senders(settings, ["fax"])


@pytest.mark.parametrize(
    ("status", "outcome"),
    [(200, "sent"), (202, "sent"), (409, "duplicate"), (400, "permanent"), (404, "permanent"),
     (429, "retryable"), (408, "retryable"), (500, "retryable"), (503, "retryable")],
)
def test_webhook_sender_classifies_status_codes(status, outcome):
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.headers["Idempotency-Key"], json.loads(request.content)["recipient"]))
        return httpx.Response(status, json={"id": "gw-1"})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    sender = WebhookSender("http://gateway.test/sms", client=client)
    message = OutboundMessage("c:1:sms", "sms", "+15550000001", "s", "b")
    if outcome in ("sent", "duplicate"):
        receipt = sender.send(message)
        assert receipt.provider_message_id == "gw-1" and receipt.duplicate == (outcome == "duplicate")
    else:
        error = PermanentSendError if outcome == "permanent" else RetryableSendError
        with pytest.raises(error, match=str(status)):
            sender.send(message)
    assert seen == [("c:1:sms", "+15550000001")]


def test_webhook_transport_errors_are_retryable():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    client = httpx.Client(transport=httpx.MockTransport(handler))
    sender = WebhookSender("http://gateway.test/sms", client=client)
    with pytest.raises(RetryableSendError, match="ConnectTimeout"):
        sender.send(OutboundMessage("c:1:sms", "sms", "+15550000001", "s", "b"))


def test_smtp_refused_connection_is_retryable():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = SmtpSender("127.0.0.1", port, "offers@couponops.local", timeout=2)
    with pytest.raises(RetryableSendError):
        sender.send(OutboundMessage("c:1:email", "email", "c1@customers.example", "s", "b"))
    sender.close()


def test_smtp_message_id_is_derived_from_the_dedup_key():
    sender = SmtpSender("127.0.0.1", 25, "offers@shop.example")
    message = OutboundMessage("c:1:email", "email", "c1@customers.example", "Hi", "Body")
    first, second = sender.build_email(message), sender.build_email(message)
    assert first["Message-ID"] == second["Message-ID"]
    assert first["Message-ID"].endswith("@shop.example>")
    assert first["X-CouponOps-Dedup-Key"] == "c:1:email"
    other = sender.build_email(OutboundMessage("c:2:email", "email", "c2@customers.example", "Hi", "Body"))
    assert other["Message-ID"] != first["Message-ID"]
