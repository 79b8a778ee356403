"""The simulated shop as a data source and channel provider, through the landing zone.

A real shop drops its exports into the landing zone and its e-mail/SMS/push providers report
deliveries, opens, clicks and the shop's orders back; the simulated shop does exactly that:

* :func:`export_to_landing` writes the shop's export since its previous one as
  ``<zone>/batches/<batch_id>/`` and its ``_SUCCESS`` marker last (with the export time).
* :func:`read_outbox` reads the messages the product handed to the file channel (what a channel
  provider received); :func:`answer_messages` lets the customers respond to them and writes the
  responses that happened in a time slice as ``<zone>/feedback/<export_id>/`` + marker.

The product reads both through :mod:`mlpkg.sources`, exactly as it reads a real shop's drops.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path

import pandas as pd

from mlpkg.simulator.world import Shop

MARKER = "_SUCCESS"  # the product's mlpkg.sources reads the same name; the world does not import it
MESSAGE_COLUMNS = ["campaign_id", "customer_id", "channel", "coupon_id", "sent_at"]


def _publish(tmp: Path, final: Path, exported_at: pd.Timestamp) -> Path:
    """Move a fully written drop into place, then write its completion marker."""
    if final.exists():
        shutil.rmtree(tmp)
        return final  # the same drop was published before: a re-export changes nothing
    os.replace(tmp, final)
    marker = final / MARKER
    marker.write_text(json.dumps({"exported_at": exported_at.isoformat().replace("+00:00", "Z")}))
    return final


def export_to_landing(shop: Shop, zone: str | Path, batch_id: str | None = None) -> Path:
    """Write the shop's export since its previous one into the landing zone.

    Args:
        shop: The simulated shop (its export cursor moves; save it afterwards).
        zone: The landing zone folder.
        batch_id: The drop's name; default ``shop-<now>``.

    Returns:
        The published batch folder.
    """
    batch_id = batch_id or f"shop-{shop.now:%Y%m%dT%H%M%S}"
    base = Path(zone) / "batches"
    tmp = base / f".tmp-{batch_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shop.export_batch(tmp, batch=batch_id)
    return _publish(tmp, base / batch_id, shop.now)


def read_outbox(outbox_dir: str | Path) -> pd.DataFrame:
    """Return the messages the file channel received (one row per message file).

    Columns: ``campaign_id``, ``customer_id`` (the product's pseudonym), ``channel``,
    ``coupon_id``, ``sent_at`` (the message's own send time when it carries one, else NaT),
    ``recipient_sha256`` (the file channel's stand-in for the address) and ``products`` (the ids
    of the products the message shows, a list, empty when it shows none).
    """
    rows = []
    for path in sorted(Path(outbox_dir).glob("*.json")):
        message = json.loads(path.read_text(encoding="utf-8"))
        payload = message.get("payload") or {}
        rows.append(
            {
                "campaign_id": payload.get("campaign_id"),
                "customer_id": payload.get("customer_id"),
                "channel": message.get("channel") or payload.get("channel"),
                "coupon_id": payload.get("coupon_id"),
                "sent_at": payload.get("sent_at"),
                "recipient_sha256": message.get("recipient_sha256"),
                "products": [
                    str(p.get("product_id")) for p in payload.get("products") or [] if isinstance(p, dict)
                ],
            }
        )
    frame = pd.DataFrame(rows, columns=[*MESSAGE_COLUMNS, "recipient_sha256", "products"])
    frame["sent_at"] = pd.to_datetime(frame["sent_at"], utc=True, errors="coerce")
    return frame


def addressed_customers(shop: Shop, messages: pd.DataFrame) -> pd.DataFrame:
    """Return the messages with ``customer_id`` = the shop's customer at each address (others dropped).

    The product's messages name pseudonyms; the provider knows its customers by address, as a real
    one does (the file channel gives the address's SHA-256).
    """
    digests = messages["recipient_sha256"].tolist()
    shop_ids = shop.customers_of_recipients(messages["channel"].tolist(), digests)
    return messages.assign(customer_id=shop_ids).dropna(subset=["customer_id"])


def campaign_responses(shop: Shop, messages: pd.DataFrame, sent_at: pd.Timestamp) -> pd.DataFrame:
    """Draw every response to one campaign's messages over its whole window (seeded by the campaign).

    Everyone who had signed up by the send may order at their baseline rate; the customers who
    received a message react to its coupon. The same campaign always draws the same responses.
    """
    campaign_id = str(messages["campaign_id"].iloc[0])
    signed_up = shop.signed_up_before(sent_at)
    columns = {
        "customer_id": messages["customer_id"].astype(str).to_numpy(),
        "arm": (messages["coupon_id"].astype(str) + "@" + messages["channel"].astype(str)).to_numpy(),
    }
    if "products" in messages.columns:
        # What the message showed changes how its reader responds (the truth's relevance lift).
        columns["products"] = [list(p) if isinstance(p, list) else [] for p in messages["products"]]
    allocation = pd.DataFrame(columns).drop_duplicates("customer_id")
    return shop.respond(
        signed_up,
        allocation,
        campaign_id=campaign_id,
        sent_at=sent_at,
        seed=zlib.crc32(campaign_id.encode()),
    )


def answer_messages(
    shop: Shop,
    zone: str | Path,
    messages: pd.DataFrame,
    *,
    since: pd.Timestamp | None = None,
    until: pd.Timestamp | None = None,
    export_id: str | None = None,
) -> Path | None:
    """Publish the responses to received messages that happened in ``[since, until)``.

    Args:
        shop: The simulated shop.
        zone: The landing zone folder.
        messages: Received messages (:data:`MESSAGE_COLUMNS`); a missing ``sent_at`` means "now".
        since: Start of the slice (default: the beginning of each campaign).
        until: End of the slice (default: the shop's ``now``).
        export_id: The drop's name; default ``responses-<until>``.

    Returns:
        The published feedback folder, or None when no response fell in the slice.
    """
    until = pd.Timestamp(until if until is not None else shop.now).tz_convert("UTC")
    frames = []
    for _, group in messages.groupby("campaign_id", sort=True):
        sent_at = group["sent_at"].min()
        sent_at = pd.Timestamp(shop.now if pd.isna(sent_at) else sent_at).tz_convert("UTC")
        events = campaign_responses(shop, group, sent_at)
        ts = pd.to_datetime(events["ts"], utc=True)
        keep = ts < until
        if since is not None:
            keep &= ts >= pd.Timestamp(since).tz_convert("UTC")
        frames.append(events[keep.to_numpy()])
    if not frames or not sum(len(f) for f in frames):
        return None
    feedback = pd.concat(frames, ignore_index=True)
    export_id = export_id or f"responses-{until:%Y%m%dT%H%M%S}"
    base = Path(zone) / "feedback"
    tmp = base / f".tmp-{export_id}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shop.write_feedback(feedback, tmp)
    return _publish(tmp, base / export_id, until)


def window_end(sent_at: pd.Timestamp, shop: Shop) -> pd.Timestamp:
    """Return when responses to a send stop (the shop's response window)."""
    return pd.Timestamp(sent_at) + pd.Timedelta(days=int(shop.config.window_days))


class ChannelProvider:
    """The simulated channel provider: answers every campaign it received, slice by slice.

    It remembers, in a small JSON file, when it first saw each campaign's messages and up to
    when it has reported responses, so each response is reported exactly once however often it
    is asked, and late in the window responses keep arriving as the shop's clock moves.
    """

    def __init__(self, state_path: str | Path) -> None:
        """Load the provider's memory from ``state_path`` (created on the first save)."""
        self.state_path = Path(state_path)
        self.state: dict[str, dict] = (
            json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        )

    def save(self) -> None:
        """Write the provider's memory atomically."""
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))
        os.replace(tmp, self.state_path)

    def answer(self, shop: Shop, zone: str | Path, outbox_dir: str | Path) -> Path | None:
        """Report the responses that happened since the last call, up to the shop's ``now``.

        Returns:
            The feedback folder published, or None when nothing new happened.
        """
        messages = read_outbox(outbox_dir)
        if messages.empty:
            return None
        messages = addressed_customers(shop, messages)
        if messages.empty:
            return None
        now = shop.now
        slices = []
        for campaign_id, group in messages.groupby("campaign_id", sort=True):
            memory = self.state.setdefault(str(campaign_id), {})
            if "sent_at" not in memory:
                stamped = group["sent_at"].min()
                memory["sent_at"] = (now if pd.isna(stamped) else stamped).isoformat()
                memory["answered_until"] = memory["sent_at"]
            sent_at = pd.Timestamp(memory["sent_at"])
            since = pd.Timestamp(memory["answered_until"])
            if since >= window_end(sent_at, shop) or since >= now:
                continue
            slices.append((group.assign(sent_at=sent_at), since))
            memory["answered_until"] = min(now, window_end(sent_at, shop)).isoformat()
        published = None
        for group, since in slices:
            campaign_id = str(group["campaign_id"].iloc[0])
            published = (
                answer_messages(
                    shop,
                    zone,
                    group,
                    since=since,
                    until=now,
                    export_id=f"responses-{campaign_id}-{now:%Y%m%dT%H%M%S}",
                )
                or published
            )
        self.save()
        return published
