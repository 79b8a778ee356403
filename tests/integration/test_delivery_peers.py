"""Delivery against real SMTP and HTTP peers on loopback, including a kill -9 of the dispatcher.

The peers deduplicate like real receivers (SMTP by ``Message-ID``, HTTP by ``Idempotency-Key``)
but also count every raw receipt, so the tests can tell "seen once" from "sent once".
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from mlpkg.config import Settings
from mlpkg.db.engine import make_engine, migrate, session_scope
from mlpkg.db.models import Allocation, Campaign, Coupon, Delivery, Product, Recommendation
from mlpkg.delivery import (
    WebhookSender,
    claim_batch,
    deliver_campaign,
    dispatch_outbox,
    enqueue_campaign,
    status_counts,
)
from mlpkg.delivery.dispatch import message_for
from tests.fixtures import plant_contacts, planted_contact
from tests.integration.peers import email_part, free_port, wait_until
from tests.integration.peers import http_peer as run_http_peer
from tests.integration.peers import smtp_peer as run_smtp_peer

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("delivery_worker.py")
PG_URL = os.environ.get("COUPONOPS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
CAMPAIGN = "cmp-peers"


@pytest.fixture
def smtp_peer():
    with run_smtp_peer() as peer:
        yield peer


@pytest.fixture
def http_peer():
    with run_http_peer() as peer:
        yield peer


def _postgres_database():
    """Create a throw-away database on the test server; skip if PostgreSQL does not answer."""
    admin_url = make_url(PG_URL)
    try:
        admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "no server here"
        pytest.skip(f"PostgreSQL at {PG_URL} does not answer: {type(exc).__name__}: {exc}")
    name = f"couponops_dlv_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def warehouse_url(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'warehouse.db'}"
        migrate(url)
        yield url
        return
    databases = _postgres_database()
    url = next(databases)
    migrate(url)
    yield url
    next(databases, None)


@pytest.fixture
def engine(warehouse_url):
    eng = make_engine(warehouse_url)
    yield eng
    eng.dispose()


def seed(engine, customers: list[tuple[str, str]], campaign_id: str = CAMPAIGN) -> None:
    """Insert a campaign whose (customer_id, channel) rows all get coupon PCT10 (and planted contacts)."""
    with session_scope(engine) as s:
        plant_contacts(s, [customer_id for customer_id, _ in customers])
        s.add(Campaign(campaign_id=campaign_id, created_at=T0, as_of=T0, budget=100.0, committed=0.0,
                       objective="profit", status="allocated", summary={}))
        s.flush()  # without a relationship() the unit of work does not order the two tables
        for customer_id, channel in customers:
            s.add(Allocation(campaign_id=campaign_id, customer_id=customer_id, arm=f"PCT10@{channel}",
                             coupon_id="PCT10", channel=channel, policy="model", propensity=0.9,
                             created_at=T0))


def live_settings(tmp_path, smtp_port: int, http_url: str | None = None, **overrides) -> Settings:
    return Settings(
        _env_file=None,
        state_dir=tmp_path / "state",
        delivery_mode="live",
        smtp_host="127.0.0.1",
        smtp_port=smtp_port,
        sms_webhook_url=f"{http_url}/sms" if http_url else None,
        push_webhook_url=f"{http_url}/push" if http_url else None,
        delivery_backoff_seconds=0.05,
        **overrides,
    )


def deliveries(engine) -> dict[str, Delivery]:
    with session_scope(engine) as s:
        return {d.dedup_key: d for d in s.scalars(select(Delivery))}


def test_normal_run_delivers_each_message_exactly_once(engine, smtp_peer, http_peer, tmp_path):
    channels = ["email", "sms", "push"]
    seed(engine, [(f"c{i:02d}", channels[i % 3]) for i in range(12)])
    settings = live_settings(tmp_path, smtp_peer.port, http_peer.url)

    result = deliver_campaign(engine, CAMPAIGN, settings, T0, batch_size=5)

    rows = deliveries(engine)
    assert len(rows) == 12 and result["sent"] == 12 and result["campaign_status"] == "delivered"
    emails = {k for k, d in rows.items() if d.channel == "email"}
    webhooks = {k for k, d in rows.items() if d.channel != "email"}
    assert len(smtp_peer.raw) == len(smtp_peer.unique_keys) == len(emails)
    assert smtp_peer.unique_keys == emails
    assert len(http_peer.raw) == len(http_peer.accepted) == len(http_peer.posts) == len(webhooks)
    assert set(http_peer.accepted) == webhooks
    sample = rows[f"{CAMPAIGN}:c00:email"]
    received = smtp_peer.messages[sample.provider_message_id]
    assert received["To"] == planted_contact("c00", "email") and "PCT10" in email_part(received)
    assert http_peer.accepted[f"{CAMPAIGN}:c01:sms"]["recipient"] == planted_contact("c01", "sms")
    assert http_peer.accepted[f"{CAMPAIGN}:c02:push"]["recipient"] == planted_contact("c02", "push")

    again = deliver_campaign(engine, CAMPAIGN, settings, T0)
    assert again["enqueued"] == 0 and again["dispatched"]["sent"] == 0
    assert len(smtp_peer.raw) == len(emails) and len(http_peer.posts) == len(webhooks)


def test_smtp_peer_receives_the_message_couponops_preview_wrote(engine, warehouse_url, smtp_peer, tmp_path):
    from typer.testing import CliRunner

    from mlpkg.cli import app
    from mlpkg.config import get_settings
    from mlpkg.privacy import pseudonym_key, stored_id

    settings = live_settings(tmp_path, smtp_peer.port, warehouse_url=warehouse_url)
    customer = stored_id(pseudonym_key(settings), "C0000042")  # the shop's id, as the warehouse keeps it
    seed(engine, [(customer, "email")])
    with session_scope(engine) as s:
        s.add(Coupon(coupon_id="PCT10", kind="percent_off", face_value=10.0, min_basket=20.0, inventory=100,
                     issued=0, valid_from=T0, valid_to=T0))
        s.add_all([Product(product_id="P1", category="home", price=59.0, in_stock=True),
                   Product(product_id="P2", category="books", price=12.0, in_stock=True),  # under min basket
                   Product(product_id="P3", category="home", price=80.0, in_stock=False),  # out of stock
                   Product(product_id="P4", category="toys", price=25.5, in_stock=True)])
        s.flush()
        s.add_all([Recommendation(campaign_id=CAMPAIGN, customer_id=customer, rank=r, product_id=p,
                                  score=1.0 / r, model_version="1", created_at=T0)
                   for r, p in enumerate(["P3", "P2", "P4", "P1"], start=1)])
    env = {"COUPONOPS_STATE_DIR": str(settings.state_dir), "COUPONOPS_WAREHOUSE_URL": warehouse_url}
    get_settings.cache_clear()
    try:
        args = ["preview", "--campaign", CAMPAIGN, "--customer", "C0000042"]
        shown = CliRunner().invoke(app, args, env=env)
    finally:
        get_settings.cache_clear()
    assert shown.exit_code == 0, shown.output
    folder = settings.previews_dir / CAMPAIGN
    html, text = (folder / f"{customer}.html").read_text(), (folder / f"{customer}.txt").read_text()
    assert str(folder / f"{customer}.html") in "".join(shown.output.split())
    # Eligible products only, in the recommender's order: in stock and reaching the minimum basket.
    assert text.index("P4") < text.index("P1") and "P2" not in text and "P3" not in text
    assert 'data-product-id="P4"' in html and "PCT10" in html
    assert planted_contact(customer, "email") not in html + text  # no address in the preview

    deliver_campaign(engine, CAMPAIGN, settings, T0)

    [received] = smtp_peer.messages.values()
    assert received["To"] == planted_contact(customer, "email")
    assert email_part(received).replace("\r\n", "\n") == text.split("\n\n", 1)[1]
    assert received["Subject"] == text.split("\n", 1)[0].removeprefix("Subject: ")
    assert email_part(received, "html").replace("\r\n", "\n") == html


def test_webhook_5xx_then_ok_is_retried_and_repeat_409_counts_as_sent(engine, http_peer, tmp_path):
    seed(engine, [(f"s{i}", "sms") for i in range(6)])
    flaky = [f"{CAMPAIGN}:s1:sms", f"{CAMPAIGN}:s4:sms"]
    http_peer.fail_first.update({flaky[0]: 1, flaky[1]: 2})
    settings = live_settings(tmp_path, free_port(), http_peer.url)

    result = deliver_campaign(engine, CAMPAIGN, settings, T0, max_wait_seconds=10)

    rows = deliveries(engine)
    assert result["sent"] == 6 and result["dispatched"]["retried"] == 3
    assert rows[flaky[0]].attempts == 2 and rows[flaky[1]].attempts == 3
    assert len(http_peer.posts) == 6 + 3 and len(http_peer.raw) == len(http_peer.accepted) == 6

    # A receipt that got lost on the way back: the gateway already has the key and answers 409.
    sender = WebhookSender(f"{http_peer.url}/sms")
    row = rows[flaky[0]]
    receipt = sender.send(message_for(row, planted_contact(row.customer_id, "sms")))
    sender.close()
    assert receipt.duplicate and len(http_peer.accepted) == 6


def test_smtp_550_bounces_and_451_is_retried(engine, smtp_peer, tmp_path):
    seed(engine, [(f"m{i}", "email") for i in range(5)])
    smtp_peer.bounce.add(planted_contact("m1", "email"))
    smtp_peer.defer[planted_contact("m3", "email")] = 1
    settings = live_settings(tmp_path, smtp_peer.port)

    result = deliver_campaign(engine, CAMPAIGN, settings, T0, max_wait_seconds=10)

    rows = deliveries(engine)
    bounced = rows[f"{CAMPAIGN}:m1:email"]
    assert bounced.status == "bounced" and bounced.attempts == 1 and "550" in bounced.last_error
    deferred = rows[f"{CAMPAIGN}:m3:email"]
    assert deferred.status == "sent" and deferred.attempts == 2
    assert (result["sent"], result["bounced"], result["dispatched"]["retried"]) == (4, 1, 1)
    assert result["campaign_status"] == "delivered"
    assert len(smtp_peer.raw) == len(smtp_peer.unique_keys) == 4


def test_claim_takes_at_most_limit_rows(engine):
    seed(engine, [(f"l{i:02d}", "email") for i in range(16)])
    with session_scope(engine) as s:
        enqueue_campaign(s, CAMPAIGN, now=T0)
    with session_scope(engine) as s:
        first = claim_batch(s, "email", "w1", 5, T0)
    with session_scope(engine) as s:
        second = claim_batch(s, "email", "w2", 5, T0)
    assert len(first) == len(second) == 5
    assert not {d.delivery_id for d in first} & {d.delivery_id for d in second}
    with session_scope(engine) as s:
        assert status_counts(s)["sending"] == 10


def test_concurrent_workers_never_send_the_same_row(engine, http_peer, tmp_path):
    seed(engine, [(f"p{i:02d}", "push") for i in range(30)])
    with session_scope(engine) as s:
        enqueue_campaign(s, CAMPAIGN, now=T0)
    settings = live_settings(tmp_path, free_port(), http_peer.url)
    stats, errors = {}, []

    def work(worker_id: str) -> None:
        sender = WebhookSender(f"{http_peer.url}/push")
        try:
            stats[worker_id] = dispatch_outbox(engine, {"push": sender}, worker_id=worker_id,
                                               settings=settings, batch_size=3)
        except Exception as exc:  # noqa: BLE001 - surfaced by the assertion below
            errors.append(exc)
        finally:
            sender.close()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=15)
    assert not errors and not any(t.is_alive() for t in threads)
    assert sum(s.sent for s in stats.values()) == 30
    assert len(http_peer.posts) == len(http_peer.raw) == len(http_peer.accepted) == 30
    with session_scope(engine) as s:
        assert status_counts(s)["sent"] == 30


def start_worker(url: str, smtp_port: int, worker_id: str, tmp_path: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                     os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(WORKER), "--url", url, "--smtp-port", str(smtp_port), "--worker-id", worker_id,
         "--delay", "0.1", "--lease", "2", "--batch-size", "5", "--deadline", "15"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def test_kill_9_mid_batch_loses_nothing_and_resends_at_most_the_in_flight_message(
    warehouse_url, engine, smtp_peer, tmp_path
):
    n = 16
    seed(engine, [(f"k{i:02d}", "email") for i in range(n)])
    with session_scope(engine) as s:
        enqueue_campaign(s, CAMPAIGN, now=T0)

    first = start_worker(warehouse_url, smtp_peer.port, "doomed", tmp_path)
    try:
        wait_until(lambda: smtp_peer.received() >= 6 or first.poll() is not None, 15, "6 received messages")
        assert first.poll() is None, f"worker exited early: {first.communicate()}"
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=5)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(timeout=5)
    assert first.returncode == -signal.SIGKILL
    first.stdout.close()
    first.stderr.close()

    at_kill = deliveries(engine)
    in_flight = {k for k, d in at_kill.items() if d.status == "sending"}
    assert sum(d.status == "sent" for d in at_kill.values()) >= 5
    assert 1 <= len(in_flight) <= 5  # the killed worker's batch, still leased to it
    received_before_restart = smtp_peer.received()

    second = start_worker(warehouse_url, smtp_peer.port, "survivor", tmp_path)
    out, err = second.communicate(timeout=20)
    assert second.returncode == 0, err[-2000:]
    assert json.loads(out.strip().splitlines()[-1])["counts"]["sent"] == n

    final = deliveries(engine)
    assert {d.status for d in final.values()} == {"sent"}
    keys = {m["X-CouponOps-Dedup-Key"]: m for m in smtp_peer.messages.values()}
    assert set(keys) == set(final)  # none lost: the receiver saw every delivery
    assert len(smtp_peer.unique_keys) == n
    counts = Counter(smtp_peer.raw)
    duplicated = {mid for mid, c in counts.items() if c > 1}
    assert len(smtp_peer.raw) - n <= 1 and all(c <= 2 for c in counts.values())
    # A duplicate can only be the message that was in flight when the worker died.
    dup_keys = {smtp_peer.messages[mid]["X-CouponOps-Dedup-Key"] for mid in duplicated}
    assert dup_keys <= in_flight
    assert received_before_restart >= 6
    assert all(final[k].attempts == 2 for k in dup_keys)
