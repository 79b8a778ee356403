"""Drive the simulated shop in-process beside the product (tests, benchmarks, the closed loop).

The shop lives in ``<state>/world.json``. These helpers export its batches, let its customers
answer a campaign's ledger directly (no channel in between) and move its clock: the closed
loop and the tests use them where going through the landing zone would only add files.
"""

from __future__ import annotations

import functools
import zlib
from pathlib import Path

import pandas as pd
from sqlalchemy import select

from mlpkg.config import Settings
from mlpkg.db import models as m
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.db.queries import as_utc, get_campaign
from mlpkg.privacy import pseudonym, pseudonym_key
from mlpkg.simulator.spec import ShopConfig
from mlpkg.simulator.world import Shop
from mlpkg.stages import campaign_id_for


def world_path(settings: Settings) -> Path:
    """Return the file that holds the simulated shop of this state folder."""
    return settings.state_dir / "world.json"


def load_world(settings: Settings) -> Shop:
    """Load the simulated shop of this state folder, creating it from settings the first time."""
    path = world_path(settings)
    if path.exists():
        shop = Shop.load(path)
    else:
        shop = Shop(ShopConfig.from_settings(settings))
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        shop.save(path)
    # The product's ledger names pseudonyms: the lab lets the shop's truth answer for them.
    key = pseudonym_key(settings)
    shop.know_ids(functools.partial(pseudonym, key))
    return shop


def land_simulated_batch(settings: Settings, batch: str = "initial") -> dict:
    """Export a batch of raw files from the simulated shop into ``<state>/raw/<batch>``."""
    shop = load_world(settings)
    out = settings.raw_dir / batch
    files = shop.export_batch(out, batch=batch)
    shop.save(world_path(settings))  # the export cursor lives in world.json
    return {
        "batch_dir": str(out),
        "files": sorted(p.name for p in files.values()),
        "as_of": shop.now.isoformat(),
    }


def land_next_batch(settings: Settings) -> dict:
    """Export the shop's activity since its last export as ``batch-<now>``."""
    return land_simulated_batch(settings, f"batch-{load_world(settings).now:%Y%m%d}")


def simulate_responses(settings: Settings, campaign_id: str, *, seed: int | None = None) -> dict:
    """Let the simulated customers respond to a campaign's sent messages; write feedback.csv.

    Returns:
        ``feedback_dir``, ``feedback_file`` and the number of ``events``.
    """
    shop = load_world(settings)
    engine = make_engine(settings.resolved_warehouse_url)
    with engine.connect() as conn:
        ledger = pd.read_sql(
            select(m.Allocation.customer_id, m.Allocation.arm).where(m.Allocation.campaign_id == campaign_id),
            conn,
        )
        sent = pd.read_sql(
            select(m.Delivery.customer_id).where(
                m.Delivery.campaign_id == campaign_id, m.Delivery.status == "sent"
            ),
            conn,
        )
        campaign = conn.execute(select(m.Campaign.as_of).where(m.Campaign.campaign_id == campaign_id)).first()
    if campaign is None:
        raise LookupError(f"campaign {campaign_id!r} is not in the warehouse table campaigns")
    # Only messages that actually went out can change behaviour.
    treated = ledger[ledger["customer_id"].isin(set(sent["customer_id"])) & (ledger["arm"] != "control")]
    seed = seed if seed is not None else zlib.crc32(campaign_id.encode())  # stable across processes
    feedback = shop.respond(
        ledger["customer_id"].tolist(),
        treated,
        campaign_id=campaign_id,
        sent_at=as_utc(campaign.as_of),
        seed=seed,
    )
    out_dir = settings.raw_dir / f"feedback-{campaign_id}"
    path = shop.write_feedback(feedback, out_dir)
    return {"feedback_dir": str(out_dir), "feedback_file": str(path), "events": int(len(feedback))}


def world_clock(settings: Settings, *, next_round: bool = False, days: int = 7) -> str:
    """Return the simulated shop's clock; with ``next_round``, first move it on if it was used.

    The clock counts as used once a campaign was allocated at it, so each round after the first
    runs a new weekly campaign instead of re-allocating the same one.
    """
    shop = load_world(settings)
    if next_round:
        settings.ensure_dirs()
        with session_scope(make_engine(settings.resolved_warehouse_url)) as session:
            used = get_campaign(session, campaign_id_for(shop.now)) is not None
        if used:
            shop.advance(days)
            shop.save(world_path(settings))
    return shop.now.isoformat()
