r"""The delivery outbox: enqueue a campaign's messages, claim them, record each result.

One ``deliveries`` row per message, keyed by ``dedup_key = "{campaign}:{customer}:{channel}"``,
moves through these states::

    pending --claim--> sending --mark_sent------------------> sent
       ^                | |  \--mark_bounced---------------> bounced
       |                | \----mark_failed (last attempt)---> failed
       +--mark_failed---+      (retryable: due again after an exponential backoff)

    skipped  (terminal from the start: no contact for the channel, or no consent to it)

Recipients come from the ``contacts`` table (email address, phone number, push token), read by
the sender at send time: no outbox row stores an address (see :mod:`mlpkg.privacy`). A treated
customer without a contact for the arm's channel is never sent anything: the row is written as
``skipped`` with the reason (``"no sms contact"``) in ``last_error``. Nor is a
customer not opted in to the channel as of the send time (``"no sms consent"``): consent is read
again at enqueue time, so an opt-out dated after the allocation but before the send still holds.

A ``sending`` row whose claim is older than the lease (its worker died mid-send) is due again
and is claimed as it is.

``attempts`` counts claims, so it doubles as a fencing token: a worker may only record a result
for a row it still holds (``status='sending'``, same ``claimed_by`` and ``attempts``). Every
function takes the session as an argument and leaves the commit to the caller.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, insert, or_, select, update
from sqlalchemy.orm import Session

from mlpkg.db.models import Allocation, Contact, Coupon, Delivery
from mlpkg.db.queries import consent_as_of, product_catalogue, recommendations_for
from mlpkg.delivery.templates import products_for_message

TERMINAL_STATUSES: tuple[str, ...] = ("sent", "failed", "bounced", "skipped")
STATUSES: tuple[str, ...] = ("pending", "sending", *TERMINAL_STATUSES)
# Policies whose allocation rows carry a coupon to send; control rows get no message.
SENDING_POLICIES: tuple[str, ...] = ("model", "explore")
#: The ``contacts`` column that holds a customer's address on each channel.
CONTACT_COLUMN_OF_CHANNEL: dict[str, str] = {"email": "email", "sms": "phone", "push": "push_token"}
_INSERT_CHUNK = 500


def as_utc(value: datetime) -> datetime:
    """Return ``value`` as an aware UTC datetime (naive values are taken to be UTC already).

    SQLite hands timestamps back naive and compares them as text, so every timestamp written
    or compared by the outbox goes through here first.
    """
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def dedup_key_for(campaign_id: str, customer_id: str, channel: str) -> str:
    """Return the outbox key of one campaign message (one per customer and channel)."""
    return f"{campaign_id}:{customer_id}:{channel}"


def recipient_for(contact: Contact | None, channel: str) -> str | None:
    """Return the address of a customer on ``channel`` from their contact row.

    Args:
        contact: The customer's ``contacts`` row, or None when the shop sent none.
        channel: ``email`` (the email address), ``sms`` (the phone number) or ``push`` (the
            push token).

    Returns:
        The address, or None when the customer has no contact for that channel.

    Raises:
        ValueError: ``channel`` is not email, sms or push.
    """
    if channel not in CONTACT_COLUMN_OF_CHANNEL:
        raise ValueError(f"unknown channel {channel!r}; expected one of {sorted(CONTACT_COLUMN_OF_CHANNEL)}")
    if contact is None:
        return None
    value = getattr(contact, CONTACT_COLUMN_OF_CHANNEL[channel])
    value = value.strip() if isinstance(value, str) else None
    return value or None


def skip_reason(channel: str) -> str:
    """Return the reason recorded on a delivery skipped for want of a contact on ``channel``."""
    return f"no {channel} contact"


def consent_skip_reason(channel: str) -> str:
    """Return the reason recorded on a delivery skipped for want of consent to ``channel``."""
    return f"no {channel} consent"


def describe_offer(coupon: Coupon | None, coupon_id: str) -> str:
    """Return a short human text for a coupon ("10% off", "5.00 off orders over 25.00", ...)."""
    if coupon is None:
        return f"coupon {coupon_id}"
    if coupon.kind == "percent_off":
        text = f"{coupon.face_value:g}% off"
    elif coupon.kind == "fixed_amount":
        text = f"{coupon.face_value:.2f} off"
    elif coupon.kind == "free_shipping":
        text = "free shipping"
    else:
        text = f"coupon {coupon_id}"
    if coupon.min_basket > 0:
        text += f" on orders over {coupon.min_basket:.2f}"
    return text


def render_payload(
    campaign_id: str,
    customer_id: str,
    channel: str,
    coupon_id: str,
    offer: str,
    sent_at: datetime | None = None,
    products: list[dict[str, Any]] | None = None,
) -> dict:
    """Return the JSON payload of one message: ids, the send time (campaign time), offer and products.

    The texts are rendered from the templates at send time (:mod:`mlpkg.delivery.templates`), so
    the row holds what the message says, never the message with an address in it.
    """
    return {
        "campaign_id": campaign_id,
        "customer_id": customer_id,
        "channel": channel,
        "coupon_id": coupon_id,
        "sent_at": as_utc(sent_at).isoformat() if sent_at is not None else None,
        "offer": offer,
        "products": list(products or []),
    }


def message_products(
    session: Session, campaign_id: str, customer_ids: Sequence[str], coupons: dict[str, Coupon], n: int
) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Return the products each (customer, coupon) message shows: recommended, in stock, eligible.

    Reads the campaign's recommendations (written by the recommendation stage) and keeps the first
    ``n`` in-stock products whose price reaches the coupon's minimum basket. A campaign without
    recommendations (or ``n`` = 0) shows no products.
    """
    if n <= 0:
        return {}
    ranked = recommendations_for(session, campaign_id, customer_ids)
    if not ranked:
        return {}
    catalogue = {p["product_id"]: p for p in product_catalogue(session)}
    out = {}
    for customer, products in ranked.items():
        for coupon_id, coupon in coupons.items():
            minimum = float(coupon.min_basket)
            out[(customer, coupon_id)] = products_for_message(products, catalogue, minimum, n)
    return out


def message_payload(
    session: Session, campaign_id: str, customer_id: str, *, sent_at: datetime | None = None,
    products_per_message: int = 4,
) -> dict | None:
    """Return the payload the campaign's message to one customer has (or will have), or None.

    The same pieces as :func:`enqueue_campaign` (offer, eligible recommended products), for one
    customer: ``couponops preview`` renders it. A row already queued keeps the payload it was
    queued with, which is returned instead.
    """
    a = session.execute(
        select(Allocation.channel, Allocation.coupon_id).where(
            Allocation.campaign_id == campaign_id,
            Allocation.customer_id == customer_id,
            Allocation.policy.in_(SENDING_POLICIES),
            Allocation.coupon_id.is_not(None),
            Allocation.channel.is_not(None),
        )
    ).first()
    if a is None:
        return None
    queued = session.scalar(select(Delivery.payload).where(
        Delivery.dedup_key == dedup_key_for(campaign_id, customer_id, a.channel)))
    if queued:
        return dict(queued)
    coupon = session.get(Coupon, a.coupon_id)
    coupons = {a.coupon_id: coupon} if coupon is not None else {}
    shown = message_products(session, campaign_id, [customer_id], coupons, products_per_message)
    offer = describe_offer(coupon, a.coupon_id)
    return render_payload(campaign_id, customer_id, a.channel, a.coupon_id, offer, sent_at,
                          shown.get((customer_id, a.coupon_id), []))


def enqueue_campaign(
    session: Session, campaign_id: str, *, now: datetime, sent_at: datetime | None = None,
    products_per_message: int = 4,
) -> int:
    """Insert one delivery per coupon-carrying allocation of a campaign.

    Only ``model`` and ``explore`` allocations with a coupon and a channel produce a row. The
    recipient is looked up in ``contacts``: with one the row is ``pending``; without a contact
    for the channel it is ``skipped`` with the reason (``"no email contact"``) in ``last_error``
    and is never sent. A customer with a contact who is not opted in to the channel as of the
    send time (latest consent event at or before ``sent_at``) is ``skipped`` the same way, with
    ``"no email consent"``. No row stores the address: the sender reads it at send time.
    Re-running is harmless: rows whose ``dedup_key`` already exists are left untouched (a
    skipped row stays skipped even if contacts or consent arrive later: the campaign's
    measurement window has started).

    Args:
        session: Open session; the caller commits.
        campaign_id: The campaign whose allocation ledger is read.
        now: Creation time of new rows.
        sent_at: The send time the messages state, on the campaign's clock (default ``now``);
            consent is checked as of this time.
        products_per_message: Recommended products each message shows (see :func:`message_products`).

    Returns:
        The number of rows added by this call (pending and skipped).
    """
    now = as_utc(now)
    send_time = as_utc(sent_at) if sent_at is not None else now
    allocations = session.execute(
        select(Allocation.customer_id, Allocation.channel, Allocation.coupon_id, Contact)
        .outerjoin(Contact, Contact.customer_id == Allocation.customer_id)
        .where(
            Allocation.campaign_id == campaign_id,
            Allocation.policy.in_(SENDING_POLICIES),
            Allocation.coupon_id.is_not(None),
            Allocation.channel.is_not(None),
        )
        .order_by(Allocation.customer_id)
    ).all()
    if not allocations:
        return 0
    coupon_ids = sorted({row.coupon_id for row in allocations})
    coupons = {
        c.coupon_id: c for c in session.scalars(select(Coupon).where(Coupon.coupon_id.in_(coupon_ids)))
    }
    offers = {cid: describe_offer(coupons.get(cid), cid) for cid in coupon_ids}
    consented = consent_as_of(session, send_time)
    shown = message_products(session, campaign_id, sorted({a.customer_id for a in allocations}), coupons,
                             products_per_message)
    rows = []
    for a in allocations:
        recipient = recipient_for(a.Contact, a.channel)
        reason = None if recipient else skip_reason(a.channel)
        if reason is None and a.customer_id not in consented.get(a.channel, set()):
            reason = consent_skip_reason(a.channel)
        rows.append(
            {
                "dedup_key": dedup_key_for(campaign_id, a.customer_id, a.channel),
                "campaign_id": campaign_id,
                "customer_id": a.customer_id,
                "channel": a.channel,
                "coupon_id": a.coupon_id,
                "payload": render_payload(
                    campaign_id, a.customer_id, a.channel, a.coupon_id, offers[a.coupon_id], send_time,
                    shown.get((a.customer_id, a.coupon_id), []),
                ),
                "status": "skipped" if reason else "pending",
                "attempts": 0,
                "last_error": reason,
                "created_at": now,
            }
        )
    added = 0
    for start in range(0, len(rows), _INSERT_CHUNK):
        added += _insert_missing(session, rows[start : start + _INSERT_CHUNK])
    return added


def _insert_missing(session: Session, rows: list[dict[str, Any]]) -> int:
    dialect = session.get_bind().dialect.name
    table = Delivery.__table__
    if dialect in ("sqlite", "postgresql"):
        if dialect == "sqlite":
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        else:
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        # ON CONFLICT DO NOTHING keeps concurrent enqueuers of the same campaign from failing;
        # RETURNING yields only the rows that were really inserted.
        stmt = dialect_insert(table).on_conflict_do_nothing(index_elements=["dedup_key"])
        return len(session.execute(stmt.returning(table.c.delivery_id), rows).all())
    keys = [r["dedup_key"] for r in rows]
    existing = set(session.scalars(select(Delivery.dedup_key).where(Delivery.dedup_key.in_(keys))))
    missing = [r for r in rows if r["dedup_key"] not in existing]
    if missing:
        session.execute(insert(table), missing)
    return len(missing)


def _due_clause(now: datetime, lease_seconds: float):  # noqa: ANN202 - SQLAlchemy expression
    lease_cutoff = now - timedelta(seconds=lease_seconds)
    return or_(
        and_(
            Delivery.status == "pending",
            or_(Delivery.next_attempt_at.is_(None), Delivery.next_attempt_at <= now),
        ),
        # A 'sending' row whose lease ran out belongs to a worker that died mid-send.
        and_(Delivery.status == "sending", Delivery.claimed_at < lease_cutoff),
    )


def _channel_clause(channel: str | Iterable[str] | None):  # noqa: ANN202 - SQLAlchemy expression
    if channel is None:
        return None
    if isinstance(channel, str):
        return Delivery.channel == channel
    return Delivery.channel.in_(list(channel))


def claim_batch(
    session: Session,
    channel: str | Iterable[str] | None,
    worker_id: str,
    limit: int,
    now: datetime,
    lease_seconds: float = 60,
    *,
    campaign_id: str | None = None,
) -> list[Delivery]:
    """Atomically claim up to ``limit`` due deliveries for ``worker_id``.

    Due rows are ``pending`` ones whose ``next_attempt_at`` has passed (or is unset), and
    ``sending`` ones whose claim is older than ``lease_seconds`` (their worker crashed). On
    PostgreSQL the candidates are selected ``FOR UPDATE SKIP LOCKED`` (concurrent workers claim
    disjoint rows without waiting) and then updated; on SQLite one
    ``UPDATE ... WHERE delivery_id IN (SELECT ... LIMIT n) RETURNING`` runs under the single
    writer lock. Either way the UPDATE re-checks that each row is still due.

    Args:
        session: Open session; commit right after so other workers see the claim.
        channel: One channel, several, or None for all.
        worker_id: Name recorded in ``claimed_by``.
        limit: Largest number of rows to claim.
        now: Claim time (also the clock that decides what is due and which leases expired).
        lease_seconds: How long a claim protects a row from other workers.
        campaign_id: Only claim this campaign's rows (None: any campaign).

    Returns:
        The claimed rows (status ``sending``, ``attempts`` already counting this attempt),
        ordered by ``delivery_id``.
    """
    if limit <= 0:
        return []
    now = as_utc(now)
    candidates = select(Delivery.delivery_id).where(_due_clause(now, lease_seconds))
    channel_clause = _channel_clause(channel)
    if channel_clause is not None:
        candidates = candidates.where(channel_clause)
    if campaign_id is not None:
        candidates = candidates.where(Delivery.campaign_id == campaign_id)
    candidates = candidates.order_by(Delivery.delivery_id).limit(limit)
    if session.get_bind().dialect.name == "sqlite":
        # SQLite runs the whole UPDATE under its single writer lock, sub-select included.
        chosen = Delivery.delivery_id.in_(candidates.scalar_subquery())
    else:
        # Lock first, then update: PostgreSQL may re-run an ``IN (SELECT ... LIMIT n)`` sub-select
        # inside an UPDATE and so claim more than ``n`` rows.
        ids = list(session.scalars(candidates.with_for_update(skip_locked=True)))
        if not ids:
            return []
        chosen = Delivery.delivery_id.in_(ids)
    stmt = (
        update(Delivery)
        .where(chosen)
        # Re-checking the due condition keeps the claim safe where the candidates were not locked.
        .where(_due_clause(now, lease_seconds))
        .values(status="sending", claimed_by=worker_id, claimed_at=now, attempts=Delivery.attempts + 1)
        .execution_options(synchronize_session=False)
    )
    if session.get_bind().dialect.update_returning:
        claimed = list(session.scalars(stmt.returning(Delivery).execution_options(populate_existing=True)))
    else:
        # MySQL has no UPDATE ... RETURNING; the locked rows are read back inside the transaction.
        session.execute(stmt)
        claimed = list(
            session.scalars(
                select(Delivery)
                .where(
                    chosen,
                    Delivery.status == "sending",
                    Delivery.claimed_by == worker_id,
                    Delivery.claimed_at == now,
                )
                .execution_options(populate_existing=True)
            )
        )
    claimed.sort(key=lambda d: d.delivery_id)
    return claimed


def _owned(delivery: Delivery):  # noqa: ANN202 - SQLAlchemy expression
    return and_(
        Delivery.delivery_id == delivery.delivery_id,
        Delivery.status == "sending",
        Delivery.claimed_by == delivery.claimed_by,
        Delivery.attempts == delivery.attempts,
    )


def backoff_delay(attempts: int, base_seconds: float) -> timedelta:
    """Return the wait before the next try after ``attempts`` failed tries (no jitter).

    The schedule is ``base, 2*base, 4*base, ...``: ``base * 2**(attempts - 1)``.
    """
    return timedelta(seconds=base_seconds * 2 ** max(attempts - 1, 0))


def mark_sent(
    session: Session, delivery: Delivery, *, now: datetime, provider_message_id: str | None = None
) -> bool:
    """Record that ``delivery`` was accepted by its receiver.

    A successful send is a fact whoever holds the claim, so this only requires that the row
    is not terminal yet (a slow worker whose lease was taken over still records its send).

    Returns:
        True if the row changed, False if it was already terminal.
    """
    result = session.execute(
        update(Delivery)
        .where(Delivery.delivery_id == delivery.delivery_id, Delivery.status.in_(("pending", "sending")))
        .values(
            status="sent",
            sent_at=as_utc(now),
            provider_message_id=provider_message_id,
            last_error=None,
            claimed_by=None,
            claimed_at=None,
        )
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def mark_failed(
    session: Session,
    delivery: Delivery,
    error: str,
    *,
    retryable: bool,
    now: datetime,
    max_attempts: int,
    backoff_seconds: float,
) -> str | None:
    """Record a failed attempt: back to ``pending`` after a backoff, or terminal ``failed``.

    Args:
        session: Open session; the caller commits.
        delivery: The row as returned by :func:`claim_batch` (its ``attempts`` is the fence).
        error: Text kept in ``last_error``.
        retryable: False makes the failure terminal at once.
        now: Time of the failure; the next try is due at ``now + backoff_delay(attempts)``.
        max_attempts: Attempts after which a retryable failure becomes terminal.
        backoff_seconds: Base of the exponential backoff.

    Returns:
        The new status (``pending`` or ``failed``), or None if the claim was lost meanwhile.
    """
    now = as_utc(now)
    terminal = not retryable or delivery.attempts >= max_attempts
    values: dict[str, Any] = {"last_error": error[:2000], "claimed_by": None, "claimed_at": None}
    if terminal:
        values.update(status="failed", next_attempt_at=None)
    else:
        due = now + backoff_delay(delivery.attempts, backoff_seconds)
        values.update(status="pending", next_attempt_at=due)
    result = session.execute(
        update(Delivery).where(_owned(delivery)).values(**values).execution_options(synchronize_session=False)
    )
    return values["status"] if result.rowcount == 1 else None


def mark_bounced(session: Session, delivery: Delivery, error: str) -> bool:
    """Record that the receiver rejected ``delivery`` for good (terminal ``bounced``).

    Returns:
        True if the row changed, False if the claim was lost meanwhile.
    """
    result = session.execute(
        update(Delivery)
        .where(_owned(delivery))
        .values(status="bounced", last_error=error[:2000], claimed_by=None, claimed_at=None, sent_at=None)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_claims(session: Session, deliveries: Sequence[Delivery]) -> int:
    """Hand claimed but unsent rows back to the queue (undoing their claim's attempt count).

    Used when a worker stops mid-batch on purpose (shutdown, lease about to run out), so other
    workers need not wait for the lease to expire.

    Returns:
        The number of rows released.
    """
    released = 0
    for delivery in deliveries:
        result = session.execute(
            update(Delivery)
            .where(_owned(delivery))
            .values(status="pending", claimed_by=None, claimed_at=None, attempts=Delivery.attempts - 1)
            .execution_options(synchronize_session=False)
        )
        released += result.rowcount
    return released


def skipped_reasons(session: Session, campaign_id: str | None = None) -> dict[str, int]:
    """Return how many deliveries were skipped for each reason (e.g. ``{"no sms contact": 3}``)."""
    stmt = (
        select(Delivery.last_error, func.count())
        .where(Delivery.status == "skipped")
        .group_by(Delivery.last_error)
        .order_by(Delivery.last_error)
    )
    if campaign_id is not None:
        stmt = stmt.where(Delivery.campaign_id == campaign_id)
    return {str(reason): int(n) for reason, n in session.execute(stmt)}


def status_counts(session: Session, campaign_id: str | None = None) -> dict[str, int]:
    """Return the number of deliveries in each status (every status present, zeros included)."""
    stmt = select(Delivery.status, func.count()).group_by(Delivery.status)
    if campaign_id is not None:
        stmt = stmt.where(Delivery.campaign_id == campaign_id)
    counts = dict.fromkeys(STATUSES, 0)
    counts.update({status: int(n) for status, n in session.execute(stmt)})
    return counts


def next_due_at(
    session: Session,
    *,
    campaign_id: str | None = None,
    channel: str | Iterable[str] | None = None,
    lease_seconds: float | None = None,
) -> datetime | None:
    """Return when the next not-yet-due row becomes claimable (None if no row is waiting).

    Considers ``pending`` rows (due at ``next_attempt_at``, or at once when unset) and, when
    ``lease_seconds`` is given, ``sending`` rows (claimable again when their lease expires).
    """
    filters = []
    if campaign_id is not None:
        filters.append(Delivery.campaign_id == campaign_id)
    channel_clause = _channel_clause(channel)
    if channel_clause is not None:
        filters.append(channel_clause)
    candidates = [
        session.scalar(
            select(func.min(func.coalesce(Delivery.next_attempt_at, Delivery.created_at))).where(
                Delivery.status == "pending", *filters
            )
        )
    ]
    if lease_seconds is not None:
        oldest_claim = session.scalar(
            select(func.min(Delivery.claimed_at)).where(Delivery.status == "sending", *filters)
        )
        if oldest_claim is not None:
            candidates.append(_to_datetime(oldest_claim) + timedelta(seconds=lease_seconds))
    found = [_to_datetime(value) for value in candidates if value is not None]
    return min(found) if found else None


def _to_datetime(value: datetime | str) -> datetime:
    if isinstance(value, str):
        # SQLite returns aggregates of timestamp columns as text.
        value = datetime.fromisoformat(value)
    return as_utc(value)
