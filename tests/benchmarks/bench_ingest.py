"""Benchmark ingest (read + validate + load) and the point-in-time feature build against DuckDB.

A batch of ``N`` behaviour events (``COUPONOPS_BENCH_EVENTS``, default 10,000,000;
``COUPONOPS_BENCH_QUICK=1``: 200,000) is written in the shop's ``events.parquet`` format beside a
simulated shop's customers, contacts, consent, channels, coupons and orders, so the batch passes
the data contract. Every measurement runs in its own child process, so each peak RSS is its own:

* ``ingest_sqlite_rows_per_s`` / ``ingest_postgres_rows_per_s``: :func:`mlpkg.stages.ingest` of the
  batch into a fresh warehouse (SQLite in a temporary state folder; PostgreSQL in a throwaway
  database when 127.0.0.1:5432 answers), against DuckDB's ``CREATE TABLE events AS SELECT * FROM
  read_parquet(...)`` into a fresh DuckDB file. Ratio = our wall time / the median of three
  DuckDB loads; target <= 25x.
* ``ingest_peak_rss``: the larger peak RSS of the two ingests (MB); target < 2048 MB.
* ``feature_build_seconds``: :func:`mlpkg.data.customer_features` over the loaded SQLite warehouse
  against the same aggregation in DuckDB SQL over the batch's files. Ratio = ours / DuckDB; target
  <= 1.5x. DuckDB computes every numeric feature of :func:`mlpkg.features.build_features` (tenure,
  order RFM, the windowed event counts, cart abandonment, days since the last event, consent per
  channel) and the two tables are compared value by value. Each side runs three times; the ratio
  is of the medians.

A child that fails or runs past :data:`CHILD_TIMEOUT_S` becomes a row with its error, not a crash.
Run ``python -m tests.benchmarks.run --only ingest`` (or this module with ``--events N``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CHILD_TIMEOUT_S = 40 * 60
ROW_GROUP = 1_000_000
EVENTS_PER_CUSTOMER = 200
INGEST_TARGET = 25.0
REFERENCE_RUNS = 3
FEATURE_TARGET = 1.5
RSS_LIMIT_MB = 2048.0
PG_ADMIN_URL = os.environ.get("COUPONOPS_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")

# Every numeric feature of mlpkg.features.build_features, in DuckDB SQL over the batch's raw files:
# tenure, order recency/frequency/monetary/basket/coupon share, the seven windowed event counts,
# cart abandonment, days since the last event and each channel's latest consent (an opt-out wins a
# tie), all strictly before as_of. The same aggregation CouponOps runs, so the ratio is fair.
DUCKDB_FEATURES_SQL = """
WITH e AS (
    SELECT customer_id, event_type,
           (epoch_us(TIMESTAMPTZ '{as_of}') - epoch_us(ts)) / 1e6 / 86400.0 AS age
    FROM read_parquet('{events}') WHERE ts < TIMESTAMPTZ '{as_of}'
), ev AS (
    SELECT customer_id,
        count(*) FILTER (WHERE event_type = 'page_view' AND age <= 30) AS page_views_30d,
        count(*) FILTER (WHERE event_type = 'search' AND age <= 30) AS searches_30d,
        count(*) FILTER (WHERE event_type = 'add_to_cart' AND age <= 30) AS cart_adds_30d,
        count(*) FILTER (WHERE event_type = 'coupon_page_view' AND age <= 30) AS coupon_page_views_30d,
        count(*) FILTER (WHERE event_type = 'email_open' AND age <= 90) AS email_opens_90d,
        count(*) FILTER (WHERE event_type = 'sms_click' AND age <= 90) AS sms_clicks_90d,
        count(*) FILTER (WHERE event_type = 'push_open' AND age <= 90) AS push_opens_90d,
        count(*) FILTER (WHERE event_type = 'add_to_cart' AND age <= 90) AS carts_90d,
        min(age) AS last_event
    FROM e GROUP BY customer_id
), o AS (
    SELECT customer_id, revenue, coalesce(coupon_id, '') <> '' AS with_coupon,
           (epoch_us(TIMESTAMPTZ '{as_of}') - epoch_us(ts)) / 1e6 / 86400.0 AS age
    FROM read_csv('{orders}',
                  types = {{'ts': 'TIMESTAMPTZ', 'customer_id': 'VARCHAR', 'coupon_id': 'VARCHAR'}})
    WHERE ts < TIMESTAMPTZ '{as_of}'
), oa AS (
    SELECT customer_id,
        count(*) FILTER (WHERE age <= 90) AS frequency_90d,
        coalesce(sum(revenue) FILTER (WHERE age <= 90), 0) AS monetary_90d,
        count(*) AS orders_total, sum(revenue) AS revenue_total,
        count(*) FILTER (WHERE with_coupon) AS coupon_orders, min(age) AS last_order
    FROM o GROUP BY customer_id
), cs AS (
    SELECT customer_id, channel, opted_in FROM (
        SELECT customer_id, channel, opted_in::INTEGER AS opted_in,
               row_number() OVER (PARTITION BY customer_id, channel
                                  ORDER BY updated_at DESC, opted_in::INTEGER ASC) AS latest
        FROM read_csv('{consent}', types = {{'updated_at': 'TIMESTAMPTZ', 'customer_id': 'VARCHAR'}})
        WHERE updated_at < TIMESTAMPTZ '{as_of}'
    ) WHERE latest = 1
), cp AS (
    SELECT customer_id,
        max(opted_in) FILTER (WHERE channel = 'email') AS consent_email,
        max(opted_in) FILTER (WHERE channel = 'sms') AS consent_sms,
        max(opted_in) FILTER (WHERE channel = 'push') AS consent_push
    FROM cs GROUP BY customer_id
)
SELECT c.customer_id,
    greatest((epoch_us(TIMESTAMPTZ '{as_of}') - epoch_us(c.signup_date::TIMESTAMPTZ)) / 1e6 / 86400.0, 0)
        AS tenure_days,
    least(coalesce(last_order, 365.0), 365.0) AS recency_days,
    coalesce(frequency_90d, 0)::DOUBLE AS frequency_90d,
    coalesce(monetary_90d, 0)::DOUBLE AS monetary_90d,
    CASE WHEN coalesce(orders_total, 0) > 0 THEN revenue_total / orders_total ELSE 0 END AS avg_basket,
    coalesce(orders_total, 0)::DOUBLE AS orders_total,
    CASE WHEN coalesce(orders_total, 0) > 0 THEN coupon_orders / orders_total ELSE 0 END
        AS coupon_order_share,
    coalesce(page_views_30d, 0)::DOUBLE AS page_views_30d,
    coalesce(searches_30d, 0)::DOUBLE AS searches_30d,
    coalesce(cart_adds_30d, 0)::DOUBLE AS cart_adds_30d,
    greatest(coalesce(carts_90d, 0) - coalesce(frequency_90d, 0), 0) / (coalesce(carts_90d, 0) + 1.0)
        AS cart_abandon_rate,
    coalesce(coupon_page_views_30d, 0)::DOUBLE AS coupon_page_views_30d,
    coalesce(email_opens_90d, 0)::DOUBLE AS email_opens_90d,
    coalesce(sms_clicks_90d, 0)::DOUBLE AS sms_clicks_90d,
    coalesce(push_opens_90d, 0)::DOUBLE AS push_opens_90d,
    least(coalesce(last_event, 365.0), 365.0) AS days_since_last_event,
    coalesce(consent_email, 0)::DOUBLE AS consent_email,
    coalesce(consent_sms, 0)::DOUBLE AS consent_sms,
    coalesce(consent_push, 0)::DOUBLE AS consent_push
FROM read_csv('{customers}', types = {{'customer_id': 'VARCHAR', 'signup_date': 'DATE'}}) c
LEFT JOIN ev USING (customer_id) LEFT JOIN oa USING (customer_id) LEFT JOIN cp USING (customer_id)
"""
def _numeric_features() -> list[str]:
    """The columns the DuckDB reference replicates: every numeric feature of the product."""
    from mlpkg.features import NUMERIC_FEATURES

    return list(NUMERIC_FEATURES)


# --- the batch ------------------------------------------------------------------------------------


def make_batch(batch_dir: Path, n_events: int, *, seed: int = 0) -> dict:
    """Write a valid shop batch whose ``events.parquet`` holds ``n_events`` rows.

    The simulated shop (one customer per :data:`EVENTS_PER_CUSTOMER` events, at least 2,000) writes
    the other tables; its own events are resampled with replacement (customer, type and category
    together) and each copy's time moved by up to a day either way, kept inside the shop's history.
    Ids are ``B0``, ``B1``, ... (unique); rows are written in row groups of :data:`ROW_GROUP`.

    Returns:
        ``as_of`` (the shop's now, ISO), customers, events, and the paths of the files.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from mlpkg.simulator import Shop, ShopConfig
    from mlpkg.simulator.export import to_seconds

    n_customers = max(2_000, n_events // EVENTS_PER_CUSTOMER)
    shop = Shop(ShopConfig(n_customers=n_customers, seed=seed))
    paths = shop.export_batch(batch_dir)
    source = pq.read_table(paths["events"])
    schema = source.schema
    start_us = to_seconds(shop.config.opened_at) * 1_000_000
    end_us = to_seconds(shop.now) * 1_000_000 - 1
    src_ts = source["ts"].cast(pa.int64()).to_numpy()
    rng = np.random.default_rng(seed)
    day_us = 86_400 * 1_000_000
    with pq.ParquetWriter(paths["events"], schema) as writer:
        for a in range(0, n_events, ROW_GROUP):
            b = min(a + ROW_GROUP, n_events)
            pick = pa.array(rng.integers(0, len(source), b - a))
            ts = np.clip(src_ts[pick.to_numpy()] + rng.integers(-day_us, day_us, b - a), start_us, end_us)
            ids = pa.array(np.arange(a, b, dtype=np.int64)).cast(pa.string())
            chunk = pa.table(
                {
                    "event_id": pc.binary_join_element_wise("B", ids, ""),
                    "customer_id": source["customer_id"].take(pick),
                    "ts": pa.array(ts, pa.int64()).cast(schema.field("ts").type),
                    "event_type": source["event_type"].take(pick),
                    "category": source["category"].take(pick),
                },
                schema=schema,
            )
            writer.write_table(chunk, row_group_size=ROW_GROUP)
    return {
        "as_of": shop.now.isoformat(),
        "n_customers": n_customers,
        "n_events": n_events,
        "events_mb": paths["events"].stat().st_size / 2**20,
        "paths": {k: str(v) for k, v in paths.items()},
    }


# --- child processes -------------------------------------------------------------------------------


def _peak_mb() -> float:
    """Return this process's peak RSS in MB.

    ``VmHWM`` belongs to the process's own address space: ``ru_maxrss`` of a child keeps the
    parent's size at the fork, which would credit the runner's memory to the child.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # not Linux: KiB elsewhere too


def _settings(state: Path, warehouse_url: str | None):  # noqa: ANN202
    from mlpkg.config import Settings

    extra = {"warehouse_url": warehouse_url} if warehouse_url else {}
    return Settings(_env_file=None, state_dir=state, **extra)


def _worker(job: dict) -> dict:
    """Run one measurement (in a child process) and return its numbers."""
    kind = job["kind"]
    if kind == "init":
        from mlpkg import stages

        stages.init_stores(_settings(Path(job["state"]), job.get("warehouse_url")))
        return {}
    if kind == "ingest":
        from mlpkg import stages

        settings = _settings(Path(job["state"]), job.get("warehouse_url"))
        rss_before = _peak_mb()
        start = time.perf_counter()
        report = stages.ingest(settings, job["batch"])
        seconds = time.perf_counter() - start
        return {
            "seconds": seconds,
            "peak_rss_mb": _peak_mb(),
            "rss_before_mb": rss_before,
            "loaded": report.get("loaded"),
        }
    if kind == "duckdb_load":
        import duckdb

        rss_before = _peak_mb()
        start = time.perf_counter()
        con = duckdb.connect(job["db"])
        con.execute(f"CREATE TABLE events AS SELECT * FROM read_parquet('{job['events']}')")
        rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
        con.close()
        return {
            "seconds": time.perf_counter() - start,
            "peak_rss_mb": _peak_mb(),
            "rss_before_mb": rss_before,
            "rows": rows,
        }
    if kind == "features_ours":
        from mlpkg.data import customer_features
        from mlpkg.db.engine import make_engine

        settings = _settings(Path(job["state"]), None)
        engine = make_engine(settings.resolved_warehouse_url)
        import pandas as pd

        start = time.perf_counter()
        feats = customer_features(engine, pd.Timestamp(job["as_of"]).to_pydatetime())
        seconds = time.perf_counter() - start
        feats[["customer_id", *_numeric_features()]].to_parquet(job["features_out"])
        return {"seconds": seconds, "peak_rss_mb": _peak_mb(), "rows": len(feats)}
    if kind == "features_duckdb":
        import duckdb

        sql = DUCKDB_FEATURES_SQL.format(
            as_of=job["as_of"], events=job["events"], orders=job["orders"], customers=job["customers"],
            consent=job["consent"],
        )
        start = time.perf_counter()
        con = duckdb.connect()
        feats = con.execute(sql).df()
        seconds = time.perf_counter() - start
        feats.to_parquet(job["features_out"])
        return {"seconds": seconds, "peak_rss_mb": _peak_mb(), "rows": len(feats)}
    raise ValueError(f"unknown job kind {kind!r}")


def run_child(job: dict, timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """Run ``job`` in a child process; return its numbers or ``{"error": ...}`` (never raise)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "tests.benchmarks.bench_ingest",
            "--worker",
            json.dumps(job),
            "--worker-out",
            str(out),
        ]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return {"error": f"{job['kind']} timed out after {timeout_s:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            lines = (proc.stderr or proc.stdout).strip().splitlines()
            # The exception line (MemoryError, DataContractError: ...), not the traceback's last frame.
            raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b", line)]
            why = (raised or lines or ["no output"])[-1][-600:]
            if proc.returncode < 0:
                why = f"killed by signal {-proc.returncode} (9: likely out of memory); {why}"
            return {
                "error": f"{job['kind']} failed (exit {proc.returncode}): {why}",
                "child_wall_s": time.perf_counter() - start,
            }
        return json.loads(out.read_text())


# --- PostgreSQL ------------------------------------------------------------------------------------


def _pg_answers() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def _pg_admin():  # noqa: ANN202
    from sqlalchemy import create_engine

    url = PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1)
    return create_engine(url, isolation_level="AUTOCOMMIT"), url


# --- the benchmark ---------------------------------------------------------------------------------


def _linked_copy(src: Path, dst: Path) -> Path:
    """Copy a batch folder by hard links (ingest moves its batch; the original must stay)."""
    shutil.copytree(src, dst, copy_function=os.link)
    return dst


def _failed(name: str, unit: str, reference: str, error: str, **extra) -> dict:  # noqa: ANN003
    nan = float("nan")
    return {
        "name": name,
        "value": nan,
        "unit": unit,
        "reference": reference,
        "reference_value": nan,
        "ratio": nan,
        "passed": False,
        "error": error,
        "detail": error,
        **extra,
    }


def _ingest_row(name: str, ours: dict, duck: dict, n: int, common: dict) -> dict:
    reference = "DuckDB CREATE TABLE AS read_parquet"
    if "error" in ours:
        return _failed(name, "rows/s", reference, ours["error"], **common)
    if "error" in duck:
        return _failed(name, "rows/s", reference, f"reference failed: {duck['error']}", **common)
    loaded = (ours.get("loaded") or {}).get("events")
    if loaded != n:
        return _failed(name, "rows/s", reference, f"loaded {loaded} of {n} events", **common)
    ratio = ours["seconds"] / duck["seconds"]
    return {
        "name": name,
        "value": n / ours["seconds"],
        "unit": "rows/s",
        "reference": reference,
        "reference_value": n / duck["seconds"],
        "ratio": ratio,
        "target": f"<= {INGEST_TARGET:g}x time",
        "passed": bool(ratio <= INGEST_TARGET),
        "seconds": ours["seconds"],
        "duckdb_seconds": duck["seconds"],
        "peak_rss_mb": ours["peak_rss_mb"],
        "loaded": ours.get("loaded"),
        "duckdb_runs_s": duck.get("runs_s"),
        "detail": f"{n:,} events: ours {ours['seconds']:.1f} s, DuckDB {duck['seconds']:.2f} s "
        f"(median of {duck.get('runs_s')})",
        **common,
    }


def _median_run(jobs: list[dict]) -> dict:
    """Run each job in its own child; return the median run's numbers, with every run's seconds.

    A run of a few seconds varies by half from run to run here (DuckDB's 10M load: 2.8-7.0 s
    seen), so one run would move a ratio more than any change to CouponOps does.
    """
    runs = [run_child(job) for job in jobs]
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    ranked = sorted(runs, key=lambda r: r["seconds"])
    median = dict(ranked[len(ranked) // 2])
    median["runs_s"] = [round(r["seconds"], 2) for r in runs]
    return median


def _duckdb_reference(root: Path, events: str) -> dict:
    """Load the events file into DuckDB :data:`REFERENCE_RUNS` times (fresh files); the median run."""
    jobs = [{"kind": "duckdb_load", "db": str(root / f"ref-{i}.duckdb"), "events": events}
            for i in range(REFERENCE_RUNS)]
    try:
        return _median_run(jobs)
    finally:
        for i in range(REFERENCE_RUNS):
            (root / f"ref-{i}.duckdb").unlink(missing_ok=True)


def bench_ingest(n_events: int, *, seed: int = 0) -> list[dict]:
    """Generate the batch, run every child and return the four results."""
    import pandas as pd

    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="couponops-bench-ingest-") as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        batch = make_batch(root / "batch", n_events, seed=seed)
        gen_s = time.perf_counter() - started
        paths = batch["paths"]
        common = {
            "n_events": n_events,
            "n_customers": batch["n_customers"],
            "events_file_mb": round(batch["events_mb"], 1),
            "generate_s": round(gen_s, 1),
        }
        print(
            f"   batch: {n_events:,} events, {batch['n_customers']:,} customers, "
            f"{batch['events_mb']:.0f} MB parquet, {gen_s:.1f} s",
            flush=True,
        )

        duck = _duckdb_reference(root, paths["events"])
        print(f"   duckdb load: {duck}", flush=True)

        sqlite_state = root / "state-sqlite"
        init = run_child({"kind": "init", "state": str(sqlite_state)})
        ours = (
            init
            if "error" in init
            else run_child(
                {
                    "kind": "ingest",
                    "state": str(sqlite_state),
                    "batch": str(_linked_copy(root / "batch", root / "in-sqlite")),
                }
            )
        )
        print(f"   sqlite ingest: {ours}", flush=True)
        results.append(_ingest_row("ingest_sqlite_rows_per_s", ours, duck, n_events, common))

        pg: dict = {"error": "skipped: PostgreSQL does not answer on 127.0.0.1:5432"}
        if _pg_answers():
            from sqlalchemy import text

            admin, admin_url = _pg_admin()
            name = f"couponops_bench_{uuid.uuid4().hex[:10]}"
            try:
                with admin.connect() as conn:
                    conn.execute(text(f'CREATE DATABASE "{name}"'))
                url = admin_url.rsplit("/", 1)[0] + f"/{name}"
                pg_state = root / "state-pg"
                init = run_child({"kind": "init", "state": str(pg_state), "warehouse_url": url})
                pg = (
                    init
                    if "error" in init
                    else run_child(
                        {
                            "kind": "ingest",
                            "state": str(pg_state),
                            "warehouse_url": url,
                            "batch": str(_linked_copy(root / "batch", root / "in-pg")),
                        }
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a broken server is a result, not a crash
                pg = {"error": f"PostgreSQL setup failed: {exc}"[:600]}
            finally:
                try:
                    with admin.connect() as conn:
                        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                except Exception:  # noqa: BLE001, S110 - dropping is best effort
                    pass
                admin.dispose()
        print(f"   postgres ingest: {pg}", flush=True)
        results.append(_ingest_row("ingest_postgres_rows_per_s", pg, duck, n_events, common))

        peaks = {k: r.get("peak_rss_mb") for k, r in (("sqlite", ours), ("postgres", pg)) if "error" not in r}
        if peaks:
            peak = max(peaks.values())
            results.append(
                {
                    "name": "ingest_peak_rss",
                    "value": peak,
                    "unit": "MB",
                    "reference": "memory limit",
                    "reference_value": RSS_LIMIT_MB,
                    "ratio": peak / RSS_LIMIT_MB,
                    "target": "< 2048 MB",
                    "passed": bool(peak < RSS_LIMIT_MB),
                    **{f"{k}_mb": v for k, v in peaks.items()},
                    "duckdb_load_mb": duck.get("peak_rss_mb"),
                    "detail": ", ".join(f"{k} {v:.0f} MB" for k, v in peaks.items())
                    + f", DuckDB load {duck.get('peak_rss_mb', float('nan')):.0f} MB",
                    **common,
                }
            )
        else:
            results.append(_failed("ingest_peak_rss", "MB", "memory limit", "no ingest finished", **common))

        reference = "DuckDB SQL, same event aggregation"
        if "error" in ours:
            results.append(
                _failed(
                    "feature_build_seconds", "s", reference, "no SQLite warehouse to build from", **common
                )
            )
            return results
        job = {
            "as_of": batch["as_of"],
            "events": paths["events"],
            "orders": paths["orders"],
            "customers": paths["customers"],
            "consent": paths["consent"],
        }
        # Both sides REFERENCE_RUNS times, the median of each (the last runs' tables are compared).
        ours_job = {"kind": "features_ours", "state": str(sqlite_state), **job,
                    "features_out": str(root / "f-ours.parquet")}
        duck_job = {"kind": "features_duckdb", **job, "features_out": str(root / "f-duck.parquet")}
        f_ours = _median_run([ours_job] * REFERENCE_RUNS)
        f_duck = _median_run([duck_job] * REFERENCE_RUNS)
        print(f"   features: ours {f_ours}, duckdb {f_duck}", flush=True)
        if "error" in f_ours or "error" in f_duck:
            results.append(
                _failed(
                    "feature_build_seconds",
                    "s",
                    reference,
                    f_ours.get("error") or f"reference failed: {f_duck['error']}",
                    **common,
                )
            )
            return results
        a = pd.read_parquet(root / "f-ours.parquet").set_index("customer_id").sort_index()
        b = pd.read_parquet(root / "f-duck.parquet").set_index("customer_id").sort_index()
        same_ids = a.index.equals(b.index)
        columns = _numeric_features()
        diff = float((a[columns] - b.reindex(a.index)[columns]).abs().max().max())
        ratio = f_ours["seconds"] / f_duck["seconds"]
        results.append(
            {
                "name": "feature_build_seconds",
                "value": f_ours["seconds"],
                "unit": "s",
                "reference": reference,
                "reference_value": f_duck["seconds"],
                "ratio": ratio,
                "target": f"<= {FEATURE_TARGET:g}x",
                "passed": bool(ratio <= FEATURE_TARGET),
                "peak_rss_mb": f_ours["peak_rss_mb"],
                "duckdb_peak_rss_mb": f_duck["peak_rss_mb"],
                "replicated_features": columns,
                "same_customers": same_ids,
                "max_abs_diff": diff,
                "detail": f"{batch['n_customers']:,} customers, as of {batch['as_of']}: ours "
                f"{f_ours['seconds']:.1f} s, DuckDB {f_duck['seconds']:.2f} s; max |diff| {diff:.2g}",
                **common,
            }
        )
    return results


def _n_events(quick: bool | None) -> int:
    if quick is None:
        quick = os.environ.get("COUPONOPS_BENCH_QUICK", "0") == "1"
    if quick:
        return 200_000
    return int(os.environ.get("COUPONOPS_BENCH_EVENTS", "10000000"))


def run(out_dir: Path, quick: bool | None = None, n_events: int | None = None) -> list[dict]:
    """Run the ingest and feature-build benchmarks and return their results.

    Args:
        out_dir: Folder for JSON results (the runner writes them; created here if missing).
        quick: 200,000 events; defaults to ``COUPONOPS_BENCH_QUICK=1``.
        n_events: Events in the batch; defaults to ``COUPONOPS_BENCH_EVENTS`` or 10,000,000.

    Returns:
        ``ingest_sqlite_rows_per_s``, ``ingest_postgres_rows_per_s``, ``ingest_peak_rss`` and
        ``feature_build_seconds``; a failed or skipped measurement is a row with ``error``.
    """
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    results = bench_ingest(n_events or _n_events(quick))
    for r in results:
        if not math.isfinite(r["value"]):
            print(f"   {r['name']}: {r['error']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or, internally, one child measurement)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, help="events in the batch")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench-results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.worker_out.write_text(json.dumps(_worker(json.loads(args.worker))))
        return 0
    from tests.benchmarks.run import print_table, write_result

    results = run(args.out_dir, n_events=args.events)
    for r in results:
        write_result(args.out_dir, r)
    print_table(results)
    return 0 if all(r.get("passed") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
