"""Deliver allocated coupons: a transactional outbox, channel senders and a crash-safe dispatcher.

``enqueue_campaign`` turns a campaign's allocation ledger into outbox rows, ``dispatch_outbox``
sends them through one :class:`Sender` per channel (SMTP, webhook or file) and
``deliver_campaign`` does both for one campaign. See :mod:`mlpkg.delivery.dispatch` for the
exactly-once-in-effect guarantee.
"""

from mlpkg.delivery.dispatch import DispatchStats, deliver_campaign, dispatch_outbox
from mlpkg.delivery.outbox import (
    backoff_delay,
    claim_batch,
    enqueue_campaign,
    mark_bounced,
    mark_failed,
    mark_sent,
    release_claims,
    status_counts,
)
from mlpkg.delivery.senders import (
    FileSender,
    OutboundMessage,
    PermanentSendError,
    RetryableSendError,
    Sender,
    SendReceipt,
    SmtpSender,
    WebhookSender,
    build_senders,
)

__all__ = [
    "DispatchStats",
    "FileSender",
    "OutboundMessage",
    "PermanentSendError",
    "RetryableSendError",
    "SendReceipt",
    "Sender",
    "SmtpSender",
    "WebhookSender",
    "backoff_delay",
    "build_senders",
    "claim_batch",
    "deliver_campaign",
    "dispatch_outbox",
    "enqueue_campaign",
    "mark_bounced",
    "mark_failed",
    "mark_sent",
    "release_claims",
    "status_counts",
]
