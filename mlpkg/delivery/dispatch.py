"""Dispatch the outbox: claim due deliveries, send them, record each result.

Delivery guarantee -- exactly once *in effect*, at least once on the wire
=========================================================================
A send and a database commit can never be one atomic step, so the dispatcher orders them to
lose nothing and to bound duplicates to what a receiver can recognise:

1. **Claim** a batch in its own short transaction (``pending``/lease-expired rows become
   ``sending`` with ``claimed_by``, ``claimed_at`` and ``attempts + 1``), then commit.
2. **Send** one message. Its identity towards the receiver is derived only from the row's
   ``dedup_key`` (``"{campaign}:{customer}:{channel}"``): the SMTP ``Message-ID`` and
   ``X-CouponOps-Dedup-Key`` header, the webhook ``Idempotency-Key`` header, the file name.
3. **Record** the result in its own transaction right after that send (``sent``; ``pending``
   with a backoff; ``failed``; ``bounced``), before the next message is sent.

What a crash (``kill -9``, power loss, OOM) can do at each point:

* before 2: the row stays ``sending`` until its lease (``lease_seconds``) expires, then any
  worker claims and sends it. Nothing was sent, nothing is lost.
* between 2 and 3 (the *in-flight* message, at most one per worker): the receiver has the
  message but the row still says ``sending``. After the lease expires it is sent **again with
  the same dedup key, Message-ID and Idempotency-Key**. A receiver that deduplicates on that key
  (ESPs on Message-ID, SMS/push gateways on Idempotency-Key, :class:`FileSender` on its file
  name) shows the customer one message; the wire may carry it twice. A receiver that does
  *not* deduplicate may deliver that one message twice -- this is the only duplicate possible.
* after 3: the result is durable; the message is never sent again.

So per worker crash at most one message is re-sent (raw duplicates <= crashed workers), no
message is lost, and deduplicating receivers see each message exactly once. Concurrent workers
never claim the same row (PostgreSQL ``FOR UPDATE SKIP LOCKED``; SQLite's single writer), and a
worker only records a failure for a row it still holds (``attempts`` is a fencing token). A
worker that notices its lease running out hands the unsent rest of its batch back instead of
racing the worker that would take it over. A row claimed more than ``delivery_max_attempts``
times without a recorded result (a message that crashes its worker) is marked ``failed``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, exists, select, update

from mlpkg.config import Settings
from mlpkg.db.engine import session_scope
from mlpkg.db.models import Campaign, Delivery
from mlpkg.db.queries import contact_of
from mlpkg.delivery.outbox import (
    as_utc,
    claim_batch,
    enqueue_campaign,
    mark_bounced,
    mark_failed,
    mark_sent,
    next_due_at,
    recipient_for,
    release_claims,
    skip_reason,
    skipped_reasons,
    status_counts,
)
from mlpkg.delivery.senders import (
    OutboundMessage,
    PermanentSendError,
    RetryableSendError,
    Sender,
    build_senders,
)
from mlpkg.delivery.templates import MessageRenderer, renderer_for

logger = logging.getLogger(__name__)

DEFAULT_LEASE_SECONDS = 60.0


def utc_now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def default_worker_id() -> str:
    """Return a worker name unique per process: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class DispatchStats:
    """What one dispatch run did.

    Attributes:
        sent: Messages the receiver accepted (including ones it already had).
        failed: Messages given up on for good (retryable errors past the last attempt).
        bounced: Messages the receiver rejected permanently.
        retried: Messages that failed with a retryable error and were scheduled again.
    """

    sent: int = 0
    failed: int = 0
    bounced: int = 0
    retried: int = 0

    def __add__(self, other: DispatchStats) -> DispatchStats:
        """Return the field-wise sum of two runs' counts."""
        return DispatchStats(
            self.sent + other.sent,
            self.failed + other.failed,
            self.bounced + other.bounced,
            self.retried + other.retried,
        )

    @property
    def handled(self) -> int:
        """Return the number of messages whose attempt was recorded."""
        return self.sent + self.failed + self.bounced + self.retried

    def as_dict(self) -> dict[str, int]:
        """Return the counts as a plain dict (JSON/XCom friendly)."""
        return asdict(self)


def redact_recipient(text: str, recipient: str | None) -> str:
    """Return ``text`` with the recipient's address replaced, so neither logs nor rows carry it.

    Receivers often quote the address in their errors (``SMTP 550 for a@b.example``): the error
    is redacted before it is logged or stored on the outbox row.
    """
    return text.replace(recipient, "<recipient>") if recipient else text


def recipient_now(engine: Engine, delivery: Delivery) -> str | None:
    """Return the delivery's address from ``contacts`` as it is now (None: no contact any more)."""
    with session_scope(engine) as session:
        return recipient_for(contact_of(session, delivery.customer_id), delivery.channel)


def message_for(
    delivery: Delivery, recipient: str, renderer: MessageRenderer | None = None
) -> OutboundMessage:
    """Build the message a sender gets for an outbox row and the address read at send time.

    The texts are rendered now from the row's payload (coupon, offer, products) with the
    templates; a row queued before templates existed carries its ``subject`` and ``body``.
    """
    payload = dict(delivery.payload or {})
    if "offer" in payload:
        rendered = (renderer or MessageRenderer()).render({**payload, "channel": delivery.channel})
        subject, body, html = rendered.subject, rendered.text, rendered.html
    else:
        subject, body, html = str(payload.get("subject", "")), str(payload.get("body", "")), ""
    return OutboundMessage(
        dedup_key=delivery.dedup_key,
        channel=delivery.channel,
        recipient=recipient,
        subject=subject,
        body=body,
        payload=payload,
        html=html,
    )


def dispatch_outbox(
    engine: Engine,
    senders: Mapping[str, Sender],
    *,
    worker_id: str,
    settings: Settings,
    batch_size: int = 100,
    max_messages: int | None = None,
    now_fn: Callable[[], datetime] = utc_now,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    campaign_id: str | None = None,
) -> DispatchStats:
    """Send due outbox rows until none is due (or ``max_messages`` were handled).

    Only rows of channels present in ``senders`` are claimed. See the module docstring for
    the crash guarantees.

    Args:
        engine: Warehouse engine; each claim and each result is its own transaction.
        senders: Sender per channel.
        worker_id: Name recorded on claimed rows.
        settings: Supplies ``delivery_max_attempts`` and ``delivery_backoff_seconds``.
        batch_size: Rows claimed per transaction.
        max_messages: Stop after this many recorded attempts (None: until nothing is due).
        now_fn: Clock for claims, leases and backoff (aware UTC).
        lease_seconds: How long a claim protects a row; a batch still unsent after half of
            it is handed back.
        campaign_id: Only dispatch this campaign's rows (None: every campaign).

    Returns:
        Counts of what was sent, retried, failed and bounced.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stats = DispatchStats()
    channels = sorted(senders)
    if not channels:
        return stats
    while max_messages is None or stats.handled < max_messages:
        limit = batch_size if max_messages is None else min(batch_size, max_messages - stats.handled)
        with session_scope(engine) as session:
            batch = claim_batch(
                session, channels, worker_id, limit, now_fn(), lease_seconds, campaign_id=campaign_id
            )
        if not batch:
            break
        claimed_at = time.monotonic()
        unsent = list(batch)
        try:
            while unsent and time.monotonic() - claimed_at < lease_seconds / 2:
                delivery = unsent.pop(0)
                _deliver_one(engine, senders[delivery.channel], delivery, settings, now_fn, stats)
        finally:
            if unsent:
                _release(engine, unsent)
    return stats


def _release(engine: Engine, deliveries: list[Delivery]) -> None:
    try:
        with session_scope(engine) as session:
            released = release_claims(session, deliveries)
        logger.info("released %d unsent claimed deliveries", released)
    except Exception:
        # The rows' leases expire anyway; a failed release must not hide the original error.
        logger.exception("could not release %d claimed deliveries", len(deliveries))


def _deliver_one(
    engine: Engine,
    sender: Sender,
    delivery: Delivery,
    settings: Settings,
    now_fn: Callable[[], datetime],
    stats: DispatchStats,
) -> None:
    max_attempts = settings.delivery_max_attempts
    if delivery.attempts > max_attempts:
        error = (
            f"claimed {delivery.attempts} times without a recorded result (its workers stopped "
            "mid-send); giving up"
        )
        _record_failure(engine, delivery, error, False, settings, now_fn, stats, None)
        return
    recipient = recipient_now(engine, delivery)
    if recipient is None:
        # The contact was removed (or the customer forgotten) after the row was queued.
        _record_failure(engine, delivery, skip_reason(delivery.channel) + " at send time", False, settings,
                        now_fn, stats, None)
        return
    try:
        receipt = sender.send(message_for(delivery, recipient, renderer_for(settings)))
    except PermanentSendError as exc:
        error = redact_recipient(str(exc), recipient)
        with session_scope(engine) as session:
            recorded = mark_bounced(session, delivery, error)
        if recorded:
            stats.bounced += 1
        logger.info("delivery %s bounced: %s", delivery.dedup_key, error)
        return
    except RetryableSendError as exc:
        _record_failure(engine, delivery, str(exc), True, settings, now_fn, stats, recipient)
        return
    except Exception as exc:
        # A sender bug must not leave the row 'sending' until its lease expires; it is retried
        # like a transient error and ends 'failed' after the last attempt.
        # The frames without the exception's own text, which may quote the recipient.
        logger.error(
            "sender raised unexpectedly for %s: %s: %s\n%s",
            delivery.dedup_key,
            type(exc).__name__,
            redact_recipient(str(exc), recipient),
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        error = f"{type(exc).__name__}: {exc}"
        _record_failure(engine, delivery, error, True, settings, now_fn, stats, recipient)
        return
    with session_scope(engine) as session:
        mark_sent(session, delivery, now=now_fn(), provider_message_id=receipt.provider_message_id)
    stats.sent += 1


def _record_failure(
    engine: Engine,
    delivery: Delivery,
    error: str,
    retryable: bool,
    settings: Settings,
    now_fn: Callable[[], datetime],
    stats: DispatchStats,
    recipient: str | None,
) -> None:
    error = redact_recipient(error, recipient)
    with session_scope(engine) as session:
        status = mark_failed(
            session,
            delivery,
            error,
            retryable=retryable,
            now=now_fn(),
            max_attempts=settings.delivery_max_attempts,
            backoff_seconds=settings.delivery_backoff_seconds,
        )
    if status == "failed":
        stats.failed += 1
    elif status == "pending":
        stats.retried += 1
    logger.info(
        "delivery %s attempt %d failed (%s): %s",
        delivery.dedup_key,
        delivery.attempts,
        status,
        error,
    )


def deliver_campaign(
    engine: Engine,
    campaign_id: str,
    settings: Settings,
    now: datetime,
    *,
    senders: Mapping[str, Sender] | None = None,
    worker_id: str | None = None,
    batch_size: int = 100,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    max_wait_seconds: float = 60.0,
    now_fn: Callable[[], datetime] = utc_now,
    sleep_fn: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Enqueue a campaign's messages and dispatch them until none is left to send.

    Retries scheduled within ``max_wait_seconds`` are waited for; later ones stay ``pending``
    for the next run. Treated customers without a contact for their channel are recorded as
    ``skipped`` and never sent. The campaign moves from ``allocated`` to ``delivered`` once every
    one of its deliveries is terminal (sent, failed, bounced or skipped). Re-running is harmless.
    The summary and the log carry counts only, never an address.

    Args:
        engine: Warehouse engine.
        campaign_id: Campaign whose allocations are delivered.
        settings: Delivery mode, connections, attempts and backoff.
        now: Logical time of the run, used as ``created_at`` of new outbox rows.
        senders: Sender per channel; default :func:`build_senders` for the campaign's channels.
        worker_id: Name recorded on claimed rows; default ``host:pid``.
        batch_size: Rows claimed per transaction.
        lease_seconds: How long a claim protects a row from other workers.
        max_wait_seconds: Longest total time spent waiting for retries to become due.
        now_fn: Wall clock used for claims and backoff.
        sleep_fn: How to wait for a retry (tests pass a fake).

    Returns:
        ``campaign_id``, ``enqueued`` (rows added now), the campaign's delivery count per status
        (``skipped`` included), ``skipped_reasons`` (count per reason, e.g. ``{"no sms contact":
        3}``), ``dispatched`` (this run's :class:`DispatchStats` as a dict) and ``campaign_status``.
    """
    with session_scope(engine) as session:
        campaign = session.get(Campaign, campaign_id)
        # On the data clock (a simulated shop's fast clock) messages go out at the campaign's as-of.
        stamp = campaign.as_of if campaign is not None and settings.clock == "data" else now
        enqueued = enqueue_campaign(session, campaign_id, now=now, sent_at=stamp,
                                    products_per_message=settings.recommender.products_per_message)
        # Only channels with something to send need a sender (skipped rows are never claimed).
        channels = sorted(
            session.scalars(
                select(Delivery.channel)
                .where(Delivery.campaign_id == campaign_id, Delivery.status != "skipped")
                .distinct()
            )
        )
    owned = senders is None
    active = build_senders(settings, channels) if senders is None else senders
    worker = worker_id or default_worker_id()
    stats = DispatchStats()
    deadline = time.monotonic() + max_wait_seconds
    try:
        while True:
            run = dispatch_outbox(
                engine,
                active,
                worker_id=worker,
                settings=settings,
                batch_size=batch_size,
                now_fn=now_fn,
                lease_seconds=lease_seconds,
                campaign_id=campaign_id,
            )
            stats = stats + run
            with session_scope(engine) as session:
                due = next_due_at(
                    session, campaign_id=campaign_id, channel=sorted(active), lease_seconds=lease_seconds
                )
            if due is None:
                break
            wait = (due - as_utc(now_fn())).total_seconds()
            remaining = deadline - time.monotonic()
            if wait > remaining or remaining <= 0:
                break
            # A short floor keeps a due-but-unclaimable row (another worker's) from spinning.
            sleep_fn(max(wait, 0.01))
    finally:
        if owned:
            for sender in {id(s): s for s in active.values()}.values():
                sender.close()
    with session_scope(engine) as session:
        counts = status_counts(session, campaign_id)
        reasons = skipped_reasons(session, campaign_id)
        unfinished = exists().where(
            Delivery.campaign_id == campaign_id, Delivery.status.in_(("pending", "sending"))
        )
        session.execute(
            update(Campaign)
            .where(Campaign.campaign_id == campaign_id, Campaign.status == "allocated", ~unfinished)
            .values(status="delivered")
            .execution_options(synchronize_session=False)
        )
        campaign_status = session.scalar(select(Campaign.status).where(Campaign.campaign_id == campaign_id))
    logger.info(
        "campaign %s delivery: %d enqueued now, %d sent, %d skipped (%s), %d failed, %d bounced, %d pending",
        campaign_id,
        enqueued,
        counts["sent"],
        counts["skipped"],
        ", ".join(f"{reason}: {n}" for reason, n in reasons.items()) or "none",
        counts["failed"],
        counts["bounced"],
        counts["pending"] + counts["sending"],
    )
    return {
        "campaign_id": campaign_id,
        "enqueued": enqueued,
        **counts,
        "skipped_reasons": reasons,
        "dispatched": stats.as_dict(),
        "campaign_status": campaign_status,
    }
