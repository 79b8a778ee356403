"""The simulated shop as a source and channel provider: drops land whole, responses are reported once."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from mlpkg.delivery.senders import FileSender, OutboundMessage
from mlpkg.simulator import Shop, ShopConfig
from mlpkg.simulator.landing import (
    ChannelProvider,
    addressed_customers,
    answer_messages,
    export_to_landing,
    read_outbox,
)

pytestmark = pytest.mark.unit


@pytest.fixture
def shop():
    return Shop(ShopConfig(n_customers=300, seed=3))


def _outbox(tmp_path, shop, n=40, sent_at=None):
    """Write file-channel messages with the product's FileSender (one JSON per message, no address).

    The payload names a pseudonym, as the product's does; the provider finds the customer by address.
    """
    out = tmp_path / "outbox"
    sender = FileSender(out)
    addresses = shop.addresses("email")
    for i, cid in enumerate([c for c in shop.customer_ids if c in addresses][:n]):
        payload = {"campaign_id": "cmp-1", "customer_id": f"psn-{i:024x}", "channel": "email",
                   "coupon_id": "PCT10"}
        if sent_at is not None:
            payload["sent_at"] = sent_at.isoformat()
        sender.send(OutboundMessage(f"k{i}", "email", addresses[cid], "subject", "body", payload))
    assert not any(a in p.read_text() for p in out.glob("*.json") for a in addresses.values())
    return out


def test_an_export_lands_whole_with_its_marker_and_export_time(shop, tmp_path):
    drop = export_to_landing(shop, tmp_path / "zone")
    assert drop.parent.name == "batches" and not list(drop.parent.glob(".tmp-*"))
    marker = json.loads((drop / "_SUCCESS").read_text())
    assert pd.Timestamp(marker["exported_at"]) == shop.now
    assert {"customers.csv", "contacts.csv", "events.parquet", "orders.csv"} <= {
        p.name for p in drop.iterdir()
    }
    again = export_to_landing(shop, tmp_path / "zone", batch_id=drop.name)
    assert again == drop, "publishing the same drop twice changes nothing"


def test_the_provider_reports_each_response_exactly_once_as_the_clock_moves(shop, tmp_path):
    sent_at = shop.now
    outbox = _outbox(tmp_path, shop, sent_at=sent_at)
    messages = read_outbox(outbox)
    assert len(messages) == 40 and (messages["sent_at"] == sent_at).all()
    zone = tmp_path / "zone"
    provider = ChannelProvider(tmp_path / "provider.json")
    assert provider.answer(shop, zone, outbox) is None, "nothing has happened yet at the send time"
    shop.advance(3)
    first = provider.answer(shop, zone, outbox)
    shop.advance(5)
    second = ChannelProvider(tmp_path / "provider.json").answer(shop, zone, outbox)  # a new process
    shop.advance(2)
    assert ChannelProvider(tmp_path / "provider.json").answer(shop, zone, outbox) is None, (
        "the window is over"
    )
    parts = [pd.read_csv(d / "feedback.csv") for d in (first, second)]
    ts = [pd.to_datetime(p["ts"], utc=True) for p in parts]
    assert ts[0].max() < sent_at + pd.Timedelta(days=3) <= ts[1].min()
    both = pd.concat(parts)
    assert both["event_id"].is_unique, "no response is reported twice"
    # Together the slices are exactly the responses over the whole window.
    received = addressed_customers(shop, messages)
    assert len(received) == 40, "the provider finds every addressee by the address's digest"
    whole = answer_messages(shop, tmp_path / "whole", received.assign(sent_at=sent_at), until=shop.now)
    assert sorted(both["event_id"]) == sorted(pd.read_csv(whole / "feedback.csv")["event_id"])
    assert set(both.loc[both["event_type"] == "delivered", "customer_id"]) <= set(received["customer_id"])
