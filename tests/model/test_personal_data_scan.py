"""Acceptance 5 of issue 14: after a full loop, personal data is only in the contacts table; forget erases it.

Planted data: a few customers get unmistakable contact details (``zq.planted.<n>@privacy-scan.example``,
``+1555000<n>...``, push token ``feedc0de...``), and every customer's shop id (``C0000123``) is
recognisable. Two weekly rounds of the closed loop run on embedded stores: ingest, train, allocate,
deliver (file channel), feedback, measure, retrain and the gate, with every log record of the run
written to a file in the state folder. Then every file under the state folder (warehouse, MLflow
database and artifacts, snapshots, reports, Data Docs, outbox, logs) is scanned, Parquet decoded.

Allowed: the ``contacts`` table, the shop's input copies under ``raw/`` (the simulated shop's
exports, as a real shop drops them in the landing zone) and the simulated shop's own state
(``world*.json``: the world, not the product; it holds seeds and clocks, no customer row).
"""

from __future__ import annotations

import logging
import re
import sqlite3
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mlpkg import stages
from mlpkg.simulator import world as sim_world

pytestmark = [pytest.mark.model, pytest.mark.slow]

N_PLANTED = 6


def _planting(real):  # noqa: ANN001, ANN202 - wraps mlpkg.simulator.export.draw_contacts
    def draw(pop, rng):  # noqa: ANN001, ANN202 - called per signup cohort: plant on the first ids only
        book = real(pop, rng)
        for i, cid in enumerate(pop.customer_id):
            n = int(str(cid)[1:])
            if n <= N_PLANTED:
                book.email[i] = f"zq.planted.{n}@privacy-scan.example"
                book.phone[i] = f"+1555000{n:04d}"
                book.push_token[i] = f"feedc0de{n:024d}"
        return book

    return draw


def _allowed(rel: Path) -> bool:
    return rel.parts[0] in ("raw", "staging") or rel.name.startswith("world")


def _text_of(path: Path) -> str:
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    if path.suffix == ".parquet":
        table = pq.read_table(path).to_pandas()
        text += "\n".join(map(str, [*table.columns, *table.to_numpy().ravel().tolist()]))
    return text


def _hits(text: str, values: re.Pattern) -> list[str]:
    return sorted(set(values.findall(text)))


def _patterns(values: list[str]) -> re.Pattern:
    """One pattern finding any of ``values`` in a single pass over a file (not one pass per value).

    An id like C0000123 must not be found inside a longer token (C00001234, a hex digest); longer
    values come first so that one which starts another is still tried whole.
    """
    alternatives = "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True))
    return re.compile(rf"(?<![A-Za-z0-9])({alternatives})(?![A-Za-z0-9])")


def _scan(state: Path, values: re.Pattern, *, contacts_allowed: bool) -> dict[str, list[str]]:
    """Return the files (and warehouse tables) that hold any value, the allowed places aside."""
    found: dict[str, list[str]] = {}
    for path in sorted(state.rglob("*")):
        rel = path.relative_to(state)
        if not path.is_file() or _allowed(rel):
            continue
        if contacts_allowed and rel.name.startswith("warehouse.db"):
            continue  # scanned table by table below: only ``contacts`` may hold them
        hits = _hits(_text_of(path), values)
        if hits:
            found[str(rel)] = hits
    con = sqlite3.connect(state / "warehouse.db")
    try:
        for (table,) in con.execute("SELECT name FROM sqlite_master WHERE type='table'"):
            if contacts_allowed and table == "contacts":
                continue
            text = "\n".join(map(repr, con.execute(f'SELECT * FROM "{table}"')))
            hits = _hits(text, values)
            if hits:
                found[f"warehouse.db:{table}"] = hits
    finally:
        con.close()
    return found


def test_personal_data_lives_only_in_contacts_and_forget_leaves_none_of_a_customer(settings, monkeypatch):
    from mlpkg.simulator.lab import harness
    from mlpkg.simulator.lab.closed_loop import run_closed_loop

    monkeypatch.setattr(sim_world, "draw_contacts", _planting(sim_world.draw_contacts))
    state = settings.state_dir
    (state / "logs").mkdir(parents=True)
    handler = logging.FileHandler(state / "logs" / "loop.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        rows = run_closed_loop(settings, 2, budget=40.0)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()
    assert rows[1]["model_version"] not in (None, "none (explore)"), "a trained model allocated round 2"
    # The DAG's content steps too: recommendations (a registered recommender) and a rendered preview.
    campaign = rows[-1]["campaign"]
    assert not stages.recommend(settings, campaign).get("skipped"), "the recommender ranked products"
    con = sqlite3.connect(state / "warehouse.db")
    (treated,) = con.execute(
        "SELECT customer_id FROM allocations WHERE campaign_id = ? AND coupon_id IS NOT NULL LIMIT 1",
        (campaign,),
    ).fetchone()
    con.close()
    shown = stages.preview(settings, campaign, treated)
    assert Path(shown["text"]).read_text(encoding="utf-8").strip()
    assert (state / "logs" / "loop.log").stat().st_size > 0
    assert list((state / "mlartifacts").rglob("MLmodel")) and (state / "mlflow.db").exists()
    assert list(state.glob("snapshots/*.parquet")) and list(settings.outbox_dir.glob("*.json"))

    shop = harness.load_world(settings)
    ids = list(shop.customer_ids)
    addresses = {ch: shop.addresses(ch) for ch in ("email", "sms", "push")}
    planted = [a for book in addresses.values() for a in book.values() if "planted" in a or "feedc0de" in a
               or a.startswith("+1555000")]
    assert len(planted) >= N_PLANTED, planted
    every = _patterns(ids + [a for book in addresses.values() for a in book.values()])

    # The warehouse holds them all, in contacts: the scan sees what it looks for.
    con = sqlite3.connect(state / "warehouse.db")
    contacts = "\n".join(map(repr, con.execute("SELECT * FROM contacts")))
    con.close()
    assert set(_hits(contacts, _patterns(planted))) == set(planted)

    assert _scan(state, every, contacts_allowed=True) == {}

    # Forget a planted customer who was treated and sent a message: nothing of them is left.
    con = sqlite3.connect(state / "warehouse.db")
    sent = {r for (r,) in con.execute("SELECT customer_id FROM deliveries WHERE status = 'sent'")}
    external = dict(con.execute("SELECT customer_id, external_id FROM contacts"))
    con.close()
    planted_ids = {c for c in ids if int(c[1:]) <= N_PLANTED}
    candidates = sorted(external[p] for p in sent if external.get(p) in planted_ids) or sorted(
        external[p] for p in sent
    )
    target = candidates[0]
    result = stages.forget(settings, target, reason="acceptance scan", actor="test")
    assert result["status"] == "forgotten"
    mine = [target, *(book[target] for book in addresses.values() if target in book)]
    assert len(mine) >= 2

    assert _scan(state, _patterns(mine), contacts_allowed=False) == {}
    # The others are still there, where they belong.
    con = sqlite3.connect(state / "warehouse.db")
    assert con.execute("SELECT COUNT(*) FROM contacts").fetchone()[0] == len(external) - 1
    con.close()
    assert np.isfinite(rows[0]["share_of_oracle"])
