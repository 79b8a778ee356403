"""A kill -9 during a large ingest into PostgreSQL leaves nothing or everything; a re-run loads once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pandas as pd
import pytest

from mlpkg import stages
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.simulator.lab import harness

pytestmark = pytest.mark.integration

TABLES = ("customers", "contacts", "consent", "channels", "coupons", "events", "orders", "campaign_log_rows")
CHILD = textwrap.dedent(
    """
    import logging, sys
    from mlpkg import stages
    from mlpkg.config import Settings

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
    settings = Settings(_env_file=None, state_dir=sys.argv[1], warehouse_url=sys.argv[2],
                        simulator_customers=int(sys.argv[4]), ingest_chunk_rows=20_000)
    stages.ingest(settings, sys.argv[3])
    print("finished", flush=True)
    """
)


def _counts(engine) -> dict[str, int]:
    with session_scope(engine) as s:
        counts = q.table_counts(s)
    return {t: counts[t] for t in TABLES}


def test_kill_9_inside_the_load_transaction_leaves_the_warehouse_unchanged(pg_url, tmp_path):
    from mlpkg.config import Settings

    n = 6000
    settings = Settings(
        _env_file=None, state_dir=tmp_path / "state", warehouse_url=pg_url, simulator_customers=n
    )
    stages.init_stores(settings)
    batch = harness.land_simulated_batch(settings, "initial")["batch_dir"]
    expected = {
        "customers": len(pd.read_csv(f"{batch}/customers.csv")),
        "events": len(pd.read_parquet(f"{batch}/events.parquet")),
        "orders": len(pd.read_csv(f"{batch}/orders.csv")),
    }
    engine = make_engine(pg_url)
    empty = _counts(engine)
    assert set(empty.values()) == {0}
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(settings.state_dir), pg_url, str(batch), str(n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    deadline = time.monotonic() + 300
    try:
        for line in proc.stderr:
            if "loading batch" in line:
                # Inside the one load transaction: the tables are being written right now.
                time.sleep(0.3)
                proc.send_signal(signal.SIGKILL)
                break
            assert time.monotonic() < deadline, "the child never reached the load"
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the ingest finished before it could be killed mid-load"

    after_kill = _counts(engine)
    full = {t: after_kill[t] for t in expected} == expected
    assert after_kill == empty or full, after_kill

    first = stages.ingest(settings, batch)
    loaded = _counts(engine)
    assert {t: loaded[t] for t in expected} == expected
    if after_kill == empty:
        assert first["loaded"]["events"] == expected["events"]
    again = stages.ingest(settings, batch)
    assert again["loaded"] == {} and _counts(engine) == loaded
    # The event store lists the one part the committed load wrote, holding every event once.
    with session_scope(engine) as s:
        parts = q.event_part_paths(s)
    assert len(parts) == 1 and len(pd.read_parquet(parts[0])) == expected["events"]
    engine.dispose()
