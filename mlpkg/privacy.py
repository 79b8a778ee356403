"""Privacy by design: keyed pseudonyms, the right to be forgotten, and retention of behaviour data.

The shop's customer id is a direct identifier. It is replaced at ingest by a keyed pseudonym,
``psn-`` + the first 24 hex digits of HMAC-SHA256(key, customer id), in every table, file,
feature, model artifact, report and log line; the raw id survives only in the ``contacts``
table (``external_id``), beside the email address, phone number and push token that only
delivery reads, at send time.

* :func:`pseudonym_key` reads the key from ``COUPONOPS_PRIVACY__PSEUDONYM_KEY`` or, when that is
  unset, from ``<state>/secrets/pseudonym.key`` (generated once, mode 0600, unless
  ``COUPONOPS_PRIVACY__GENERATE_KEY=false``). Changing the key breaks the link between the
  stored data and the shop's later exports: keep it with the warehouse's backups.
* :func:`forget` erases one customer in one transaction (contacts, consent history, behaviour
  events, also in the Parquet event store, orders and the customer row) and replaces the
  pseudonym in the rows the ledger's accounting keeps (allocations, deliveries, feedback, campaign
  logs) by a random one that nothing links back; a ``privacy_audit`` row (never the raw id) keeps
  the customer's pseudonym as a tombstone, so a later shop export cannot bring them back.
* :func:`purge` deletes behaviour events older than ``COUPONOPS_PRIVACY__RETENTION_DAYS``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
from sqlalchemy import Engine

from mlpkg.config import Settings
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

_log = logging.getLogger(__name__)

PSEUDONYM_PREFIX = "psn-"
#: Replacement ids of forgotten customers in the rows the ledger keeps (unlinked to anyone).
ERASED_PREFIX = "fgt-"
_HEX_DIGITS = 24
#: Raw tables whose ``customer_id`` column holds the shop's customer id.
CUSTOMER_TABLES: tuple[str, ...] = (
    "customers", "contacts", "consent", "events", "orders", "campaign_log", "feedback",
)
MIN_KEY_LENGTH = 16


class PrivacyError(ValueError):
    """A privacy operation cannot run: a missing key, an unknown customer, a bad argument."""


def key_path(settings: Settings) -> Path:
    """Return where a generated pseudonym key is kept (``<state>/secrets/pseudonym.key``)."""
    return settings.state_dir / "secrets" / "pseudonym.key"


def pseudonym_key(settings: Settings) -> bytes:
    """Return the pseudonym key: the setting, else the state folder's key file (generated once).

    Raises:
        PrivacyError: No key is set, none was generated and ``privacy.generate_key`` is false.
    """
    configured = settings.privacy.pseudonym_key
    if configured is not None:
        return configured.get_secret_value().encode()
    path = key_path(settings)
    if path.is_file():
        return path.read_text(encoding="ascii").strip().encode()
    if not settings.privacy.generate_key:
        raise PrivacyError(
            "pseudonym key: COUPONOPS_PRIVACY__PSEUDONYM_KEY is not set and COUPONOPS_PRIVACY__GENERATE_KEY"
            f"=false forbids generating one (no key file at {path}); set the key (at least {MIN_KEY_LENGTH} "
            "characters) from the secret backend"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    try:
        # O_EXCL: two processes starting at once keep one key (the loser reads the winner's).
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text(encoding="ascii").strip().encode()
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    _log.info("generated a pseudonym key in %s (mode 0600); back it up with the warehouse", path)
    return path.read_text(encoding="ascii").strip().encode()


def pseudonym(key: bytes, customer_id: str) -> str:
    """Return the keyed pseudonym of one customer id: ``psn-`` + 24 hex digits of HMAC-SHA256."""
    digest = hmac.new(key, str(customer_id).encode("utf-8"), hashlib.sha256).hexdigest()
    return PSEUDONYM_PREFIX + digest[:_HEX_DIGITS]


_PSEUDONYM_SHAPE = re.compile(rf"^(?:{PSEUDONYM_PREFIX}|{ERASED_PREFIX})[0-9a-f]{{{_HEX_DIGITS}}}$")


def pseudonymise_ids(key: bytes, ids: pd.Series) -> pd.Series:
    """Return ``ids`` with every non-null value replaced by its pseudonym (nulls stay null).

    A value that is a pseudonym already is kept: feedback from a channel provider names the
    customers by the ids the product put in its messages, which are pseudonyms. Each distinct id
    is hashed once: an events file repeats a few thousand ids millions of times.
    """
    codes, uniques = pd.factorize(ids, use_na_sentinel=True)
    if not len(uniques):
        return ids
    mapped = pd.Index([stored_id(key, str(u)) for u in uniques], dtype=object)
    out = pd.Series(mapped.take(codes, allow_fill=True, fill_value=None), index=ids.index, dtype=object)
    return out.where(codes >= 0, ids)


def stored_id(key: bytes, customer_id: str) -> str:
    """Return the id the warehouse stores for ``customer_id``: its pseudonym, or itself if it is one."""
    return str(customer_id) if is_pseudonym(customer_id) else pseudonym(key, customer_id)


def is_pseudonym(value: str) -> bool:
    """Tell whether ``value`` has the shape of a pseudonym (``psn-``, or ``fgt-`` once erased)."""
    return bool(_PSEUDONYM_SHAPE.match(str(value)))


@dataclass
class Pseudonymiser:
    """Turns the shop's customer ids of raw frames into pseudonyms and drops forgotten customers' rows.

    Called by the validation gate on every typed frame and chunk (``pseudonymiser(table, frame)``),
    so the rules, their failure samples and the load see pseudonyms only. The contacts frame
    keeps the raw id in ``external_id`` (the only column that ever stores it).
    """

    key: bytes
    forgotten: frozenset[str] = frozenset()
    dropped: dict[str, int] = field(default_factory=dict)

    def __call__(self, table: str, frame: pd.DataFrame) -> pd.DataFrame:
        """Return ``frame`` with pseudonymous customer ids, without forgotten customers' rows."""
        if table not in CUSTOMER_TABLES or "customer_id" not in frame.columns:
            return frame
        raw = frame["customer_id"]
        ids = pseudonymise_ids(self.key, raw)
        frame = frame.assign(customer_id=ids)
        if table == "contacts":
            frame = frame.assign(external_id=raw)
        if self.forgotten:
            gone = ids.isin(self.forgotten).to_numpy()
            if gone.any():
                self.dropped[table] = self.dropped.get(table, 0) + int(gone.sum())
                frame = frame[~gone]
        return frame


def pseudonymiser(engine: Engine, settings: Settings) -> Pseudonymiser:
    """Return the ingest's pseudonymiser: the key and the tombstones of forgotten customers."""
    with session_scope(engine) as session:
        forgotten = frozenset(q.forgotten_pseudonyms(session))
    return Pseudonymiser(pseudonym_key(settings), forgotten)


# --- the right to be forgotten -------------------------------------------------------------------------


def forget(
    engine: Engine, settings: Settings, customer_id: str, *, reason: str, actor: str, now: datetime
) -> dict:
    """Erase one customer's personal data and unlink the ledger rows that must be kept.

    In one transaction: deletes the customer's contacts, consent history, behaviour events,
    orders and customer row; replaces the pseudonym by a random ``fgt-`` id in allocations,
    deliveries (their keys and payloads too), feedback events and campaign-log rows, so every
    ledger total (budget, spend, counts) is unchanged; writes a ``privacy_audit`` row. The
    event-store parts holding the customer's events are rewritten without them once the
    transaction committed (again on a repeated call, should a crash have come between).

    Args:
        engine: The warehouse.
        settings: Settings (pseudonym key, event store).
        customer_id: The shop's customer id (the raw one; never stored).
        reason: Why (a request id, "GDPR art. 17 request of ..."); stored in the audit row.
        actor: Who asked (recorded in the audit row).
        now: The time recorded.

    Returns:
        ``{"status": "forgotten" | "already forgotten", "pseudonym": ..., "deleted": {...},
        "pseudonymised": {...}}``.

    Raises:
        PrivacyError: Blank reason, or no customer with that id was ever loaded.
    """
    customer_id = str(customer_id).strip()
    if not reason or not reason.strip():
        raise PrivacyError("forget: --reason must say why (e.g. the request's reference); got an empty one")
    if not customer_id:
        raise PrivacyError("forget: CUSTOMER_ID is empty")
    psn = pseudonym(pseudonym_key(settings), customer_id)
    with session_scope(engine) as session:
        if psn in q.forgotten_pseudonyms(session, [psn]):
            status, deleted, renamed = "already forgotten", {}, {}
        elif not q.customer_exists(session, psn):
            raise PrivacyError(
                f"forget: unknown customer id {customer_id!r}: no customer with that id was ever loaded "
                "(give the shop's id as in its customers export)"
            )
        else:
            erased = ERASED_PREFIX + uuid.uuid4().hex[:_HEX_DIGITS]
            deleted = q.delete_customer_personal_rows(session, psn)
            renamed = q.rename_customer_in_ledger(session, psn, erased)
            q.record_privacy_audit(
                session, action="forget", pseudonym=psn, actor=actor, reason=reason.strip(),
                details={"deleted": deleted, "pseudonymised": renamed}, now=now,
            )
            status = "forgotten"
        parts = q.event_part_paths(session)
    deleted["event_store_rows"] = _rewrite_parts(engine, parts, customers=[psn])
    with session_scope(engine) as session:
        q.checkpoint_wal(session)  # the log's earlier page images still held the erased rows
    _log.info("forget %s: %s", psn, status)
    return {"status": status, "pseudonym": psn, "deleted": deleted, "pseudonymised": renamed}


# --- retention -----------------------------------------------------------------------------------------


def purge(engine: Engine, settings: Settings, *, now: datetime, actor: str) -> dict:
    """Delete behaviour events older than ``privacy.retention_days`` (warehouse and event store).

    Returns:
        ``{"skipped": True, ...}`` when no retention is set; else the cutoff and the rows deleted
        (recorded in ``privacy_audit``).
    """
    days = settings.privacy.retention_days
    if days is None:
        return {"skipped": True, "reason": "no retention set (COUPONOPS_PRIVACY__RETENTION_DAYS)"}
    cutoff = q.as_utc(now).to_pydatetime() - timedelta(days=days)
    with session_scope(engine) as session:
        deleted = q.delete_events_before(session, cutoff)
        if not deleted:
            # A run with nothing to do writes nothing (the event store mirrors the table).
            return {"skipped": True, "reason": f"no behaviour event before {cutoff.isoformat()}"}
        q.record_privacy_audit(
            session, action="purge", pseudonym=None, actor=actor,
            reason=f"retention: behaviour older than {days} days",
            details={"cutoff": cutoff.isoformat(), "events": deleted}, now=now,
        )
        parts = q.event_part_paths(session)
    store_rows = _rewrite_parts(engine, parts, before=cutoff)
    _log.info("purge: %d events before %s (%d in the event store)", deleted, cutoff.isoformat(), store_rows)
    return {"skipped": False, "cutoff": cutoff.isoformat(), "events": deleted, "event_store_rows": store_rows}


def _rewrite_parts(
    engine: Engine, parts: Iterable[str], *, customers: Iterable[str] = (), before: datetime | None = None
) -> int:
    """Rewrite each event-store part without some customers' events or events before a time.

    Each part is rewritten to a temporary file and renamed over the old one, and its listed row
    count updated; a part left with no events is removed and unlisted.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    customers = list(customers)
    removed = 0
    for path in map(Path, parts):
        if not path.is_file():
            continue
        table = pq.read_table(path)
        drop = pc.is_in(table["customer_id"], value_set=_arrow_strings(customers)) if customers else None
        if before is not None:
            old = pc.less(table["ts"], pd.Timestamp(before).tz_convert("UTC"))
            drop = old if drop is None else pc.or_(drop, old)
        n = int(pc.sum(drop).as_py() or 0) if drop is not None else 0
        if not n:
            continue
        kept = table.filter(pc.invert(drop))
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        pq.write_table(kept, tmp, compression="zstd")
        os.replace(tmp, path)
        with session_scope(engine) as session:
            q.update_event_part_rows(session, str(path), kept.num_rows)
        if not kept.num_rows:
            path.unlink()
        removed += n
    return removed


def _arrow_strings(values: list[str]):  # noqa: ANN202 - a pyarrow Array
    import pyarrow as pa

    return pa.array(values, pa.string())


def redact(text: str, *values: str | None) -> str:
    """Return ``text`` with every given value (an address, a phone number) replaced by ``<redacted>``."""
    for value in values:
        if value:
            text = text.replace(value, "<redacted>")
    return text
