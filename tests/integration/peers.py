"""Loopback channel providers for integration tests: an SMTP relay and an SMS/push HTTP gateway.

The peers deduplicate like real receivers (SMTP by ``Message-ID``, HTTP by ``Idempotency-Key``)
but also count every raw receipt, so a test can tell "seen once" from "sent once". Both run in
threads of the test process; :func:`smtp_peer` and :func:`http_peer` start and stop them.
"""

from __future__ import annotations

import email
import json
import logging
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller

_COUPON_IN_EMAIL = re.compile(r"use code (\S+) at checkout")


def email_part(message: email.message.Message, subtype: str = "plain") -> str | None:
    """Return the decoded ``text/<subtype>`` part of a received email (None when it has none)."""
    for part in message.walk():
        if part.get_content_type() == f"text/{subtype}":
            return part.get_payload(decode=True).decode(part.get_content_charset() or "utf-8")
    return None


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class SmtpPeer:
    """aiosmtpd handler: accepts mail, bounces or defers chosen recipients, records receipts."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.raw: list[str] = []  # Message-ID of every accepted DATA, duplicates included
        self.messages: dict[str, email.message.Message] = {}  # deduplicated by Message-ID
        self.bounce: set[str] = set()
        self.defer: Counter[str] = Counter()  # recipient -> number of 451 answers still to give
        self.port: int | None = None

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
        if address in self.bounce:
            return f"550 5.1.1 <{address}>: mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: N802
        message = email.message_from_bytes(envelope.content)
        with self.lock:
            recipient = envelope.rcpt_tos[0]
            if self.defer[recipient] > 0:
                self.defer[recipient] -= 1
                return "451 4.3.0 mailbox busy, try again later"
            message_id = message["Message-ID"]
            self.raw.append(message_id)
            self.messages.setdefault(message_id, message)
        return "250 2.0.0 queued"

    @property
    def unique_keys(self) -> set[str]:
        with self.lock:
            return {m["X-CouponOps-Dedup-Key"] for m in self.messages.values()}

    def received(self) -> int:
        with self.lock:
            return len(self.raw)

    def offers(self) -> list[dict]:
        """Return one row per distinct message: campaign, customer, channel and coupon it carried."""
        with self.lock:
            messages = list(self.messages.values())
        rows = []
        for message in messages:
            campaign_id, customer_id, channel = message["X-CouponOps-Dedup-Key"].rsplit(":", 2)
            coupon = _COUPON_IN_EMAIL.search(email_part(message) or "")
            rows.append(
                {
                    "campaign_id": campaign_id,
                    "customer_id": customer_id,
                    "channel": channel,
                    "coupon_id": coupon.group(1) if coupon else None,
                }
            )
        return rows


class HttpPeer:
    """A gateway that deduplicates by Idempotency-Key (409 on repeats) and can answer 5xx first."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.posts: list[str] = []  # every request's key
        self.raw: list[str] = []  # keys of requests the gateway took in (first or repeat)
        self.accepted: dict[str, dict] = {}
        self.fail_first: Counter[str] = Counter()  # key -> 503 answers still to give
        peer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers["Idempotency-Key"]
                with peer.lock:
                    peer.posts.append(key)
                    if peer.fail_first[key] > 0:
                        peer.fail_first[key] -= 1
                        status, answer = 503, {"error": "upstream carrier unavailable"}
                    else:
                        peer.raw.append(key)
                        status = 409 if key in peer.accepted else 200
                        peer.accepted.setdefault(key, body)
                        answer = {"id": f"gw-{list(peer.accepted).index(key)}"}
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format, *args):  # noqa: A002 - signature of the base class
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def offers(self) -> list[dict]:
        """Return one row per accepted message: campaign, customer, channel and coupon it carried."""
        with self.lock:
            bodies = list(self.accepted.values())
        return [
            {
                "campaign_id": body["payload"]["campaign_id"],
                "customer_id": body["payload"]["customer_id"],
                "channel": body["channel"],
                "coupon_id": body["payload"]["coupon_id"],
            }
            for body in bodies
        ]


@contextmanager
def smtp_peer() -> Iterator[SmtpPeer]:
    """Run an :class:`SmtpPeer` on a free loopback port (``.port``) for the ``with`` block."""
    # aiosmtpd logs every SMTP command at INFO; a campaign would flood the test's output.
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    handler = SmtpPeer()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    handler.port = controller.port
    try:
        yield handler
    finally:
        controller.stop()


@contextmanager
def http_peer() -> Iterator[HttpPeer]:
    """Run an :class:`HttpPeer` on a free loopback port (``.url``) for the ``with`` block."""
    peer = HttpPeer()
    peer.thread.start()
    try:
        yield peer
    finally:
        peer.server.shutdown()
        peer.server.server_close()
