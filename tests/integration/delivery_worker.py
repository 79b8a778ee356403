"""A dispatcher process for the kill -9 test: sends a warehouse's outbox to an SMTP peer.

Run as a script (``python tests/integration/delivery_worker.py --url ... --smtp-port ...``). It
dispatches until every delivery is terminal or the deadline passes, sleeping ``--delay`` seconds
after each accepted send so that a SIGKILL lands between a send and its recorded result.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlpkg.config import Settings
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.delivery import OutboundMessage, SendReceipt, SmtpSender, dispatch_outbox, status_counts


class SlowSender:
    """Wrap a sender and pause after each accepted message (the window a crash should hit)."""

    def __init__(self, inner: SmtpSender, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def send(self, message: OutboundMessage) -> SendReceipt:
        receipt = self.inner.send(message)
        time.sleep(self.delay)
        return receipt

    def close(self) -> None:
        self.inner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--delay", type=float, default=0.1)
    parser.add_argument("--lease", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=5)
    parser.add_argument("--deadline", type=float, default=15.0)
    args = parser.parse_args(argv)

    settings = Settings(_env_file=None, state_dir=Path.cwd() / ".worker-state", delivery_backoff_seconds=0.05)
    engine = make_engine(args.url)
    sender = SlowSender(SmtpSender("127.0.0.1", args.smtp_port, settings.smtp_sender, timeout=5), args.delay)
    stop_at = time.monotonic() + args.deadline
    totals = {"sent": 0, "failed": 0, "bounced": 0, "retried": 0}
    counts: dict[str, int] = {}
    try:
        while time.monotonic() < stop_at:
            stats = dispatch_outbox(engine, {"email": sender}, worker_id=args.worker_id, settings=settings,
                                    batch_size=args.batch_size, lease_seconds=args.lease)
            totals = {k: totals[k] + v for k, v in stats.as_dict().items()}
            with session_scope(engine) as session:
                counts = status_counts(session)
            if counts["pending"] + counts["sending"] == 0:
                break
            # Rows left behind by a killed worker become claimable when their lease expires.
            time.sleep(0.1)
    finally:
        sender.close()
        engine.dispose()
    print(json.dumps({"dispatched": totals, "counts": counts}))
    return 0 if counts.get("pending", 1) + counts.get("sending", 1) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
