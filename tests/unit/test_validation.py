"""Data-contract gate: readers, GX suites, explicit checks, quarantine and Data Docs."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlpkg.validation import (
    DataContractError,
    ValidationContext,
    gate_batch,
    population_stability_index,
    read_table,
    validate_campaign_log,
    validate_table,
)

pytestmark = pytest.mark.unit

NOW = "2026-03-10T00:00:00Z"
OPENED = "2025-01-01T00:00:00Z"


def _ctx(**kw) -> ValidationContext:
    return ValidationContext(now=NOW, shop_opened=OPENED, **kw)


def _frames() -> dict[str, pd.DataFrame]:
    """Return a tiny batch that satisfies the contract (strings as written to files)."""
    customers = pd.DataFrame({
        "customer_id": [f"c{i}" for i in range(1, 7)],
        "signup_date": ["2025-02-01", "2025-03-15", "2025-06-30", "2025-09-01", "2026-01-02", "2026-02-20"],
        "region": ["north", "south", "east", "west", "north", "south"],
        "device": ["ios", "android", "desktop", "ios", "android", "desktop"],
        "segment": ["new", "regular", "vip", "lapsed", "regular", "new"],
    })
    consent = pd.DataFrame({
        "customer_id": ["c1", "c1", "c2", "c3"],
        "channel": ["email", "sms", "email", "push"],
        "opted_in": [1, 0, 1, 1],
        "updated_at": ["2026-01-01T10:00:00Z"] * 4,
    })
    channels = pd.DataFrame({"channel": ["email", "sms", "push"], "send_cost": [0.01, 0.05, 0.0],
                             "daily_capacity": [10000, 2000, 5000]})
    coupons = pd.DataFrame({
        "coupon_id": ["PCT10", "PCT20", "USD5", "FREESHIP"],
        "kind": ["percent_off", "percent_off", "fixed_amount", "free_shipping"],
        "face_value": [10.0, 20.0, 5.0, 4.99],
        "min_basket": [0.0, 0.0, 25.0, 0.0],
        "inventory": [1000, 500, 800, 1000],
        "valid_from": ["2026-01-01T00:00:00Z"] * 4,
        "valid_to": ["2026-06-30T00:00:00Z"] * 4,
    })
    events = pd.DataFrame({
        "event_id": [f"e{i}" for i in range(1, 7)],
        "customer_id": ["c1", "c2", "c2", "c3", "c5", "c6"],
        "ts": pd.to_datetime(["2026-03-01T12:00:00Z", "2026-03-01T13:00:00Z", "2026-03-02T08:30:00Z",
                              "2026-03-03T09:00:00Z", "2026-03-04T10:00:00Z", "2026-03-05T11:00:00Z"],
                             utc=True),
        "event_type": ["page_view", "search", "add_to_cart", "email_open", "coupon_page_view", "push_open"],
        "category": ["shoes", "", "bags", "", "shoes", "toys"],
    })
    orders = pd.DataFrame({
        "order_id": ["o1", "o2", "o3", "o4"],
        "customer_id": ["c1", "c2", "c3", "c5"],
        "ts": ["2026-03-02T10:00:00Z", "2026-03-03T11:00:00Z", "2026-03-04T12:00:00Z",
               "2026-03-05T13:00:00Z"],
        "revenue": [42.5, 19.99, 120.0, 0.0],
        "n_items": [2, 1, 5, 1],
        "coupon_id": ["PCT10", "", "USD5", ""],
    })
    campaign_log = pd.DataFrame({
        "campaign_id": ["k1"] * 6,
        "customer_id": [f"c{i}" for i in range(1, 7)],
        "arm": ["control", "PCT10@email", "USD5@sms", "control", "FREESHIP@push", "PCT20@email"],
        "coupon_id": ["", "PCT10", "USD5", "", "FREESHIP", "PCT20"],
        "channel": ["", "email", "sms", "", "push", "email"],
        "propensity": [0.2, 0.2, 0.2, 0.2, 0.1, 0.1],
        "policy": ["random"] * 6,
        "sent_at": ["2026-02-01T09:00:00Z"] * 6,
        "opened": [0, 1, 1, 0, 0, 1],
        "clicked": [0, 1, 0, 0, 0, 1],
        "converted": [0, 1, 0, 1, 0, 1],
        "redeemed": [0, 1, 0, 0, 0, 1],
        "revenue": [0.0, 55.0, 0.0, 30.0, 0.0, 80.0],
        "coupon_cost": [0.0, 5.5, 0.0, 0.0, 0.0, 16.0],
    })
    feedback = pd.DataFrame({
        "event_id": ["f1", "f2", "f3", "f4"],
        "campaign_id": ["k1"] * 4,
        "customer_id": ["c2", "c2", "c2", "c6"],
        "event_type": ["delivered", "open", "order", "delivered"],
        "ts": ["2026-02-01T09:01:00Z", "2026-02-01T10:00:00Z", "2026-02-02T10:00:00Z",
               "2026-02-01T09:02:00Z"],
        "coupon_id": ["PCT10", "PCT10", "PCT10", "PCT20"],
        "channel": ["email", "email", "", "email"],
        "order_id": ["", "", "o9", ""],
        "revenue": [0.0, 0.0, 55.0, 0.0],
    })
    return {"customers": customers, "consent": consent, "channels": channels, "coupons": coupons,
            "events": events, "orders": orders, "campaign_log": campaign_log, "feedback": feedback}


def _write_batch(root: Path, name: str = "batch-001", only: tuple[str, ...] | None = None, **changes) -> Path:
    """Write the valid batch (or the ``only`` tables of it); ``changes[table]`` replaces a frame or file."""
    batch = root / "raw" / name
    batch.mkdir(parents=True)
    for table, frame in _frames().items():
        if only is not None and table not in only:
            continue
        suffix = ".parquet" if table == "events" else ".csv"
        content = changes.get(table, frame)
        path = batch / f"{table}{suffix}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        elif suffix == ".parquet":
            content.to_parquet(path, index=False)
        else:
            content.to_csv(path, index=False)
    return batch


KNOWN = {"known_customers": set(_frames()["customers"]["customer_id"]),
         "known_coupons": set(_frames()["coupons"]["coupon_id"])}


def _gate(tmp_path: Path, batch: Path, **ctx_kw):
    return gate_batch(batch, context=_ctx(**{**KNOWN, **ctx_kw}), quarantine_dir=tmp_path / "quarantine",
                      data_docs_dir=tmp_path / "docs")


def _rejected(tmp_path: Path, **changes) -> DataContractError:
    """Gate a batch holding only the changed tables (GX costs ~10 ms per expectation)."""
    batch = _write_batch(tmp_path, only=tuple(changes), **changes)
    with pytest.raises(DataContractError) as info:
        _gate(tmp_path, batch)
    return info.value


def _csv(frame: pd.DataFrame) -> str:
    return frame.to_csv(index=False)


# --- the happy path -------------------------------------------------------------------------------


def test_valid_batch_passes_builds_data_docs_and_types_frames(tmp_path, capfd):
    batch = _write_batch(tmp_path)
    result = _gate(tmp_path, batch)
    assert result.success, "\n".join(r.message() for r in result.reports.values())
    assert set(result.reports) == set(_frames())
    assert result.data_docs_index is not None and result.data_docs_index.is_file()
    assert "couponops.orders" in result.data_docs_index.read_text(encoding="utf-8")
    assert batch.is_dir()
    orders = result.frames["orders"]
    assert str(orders["ts"].dt.tz) == "UTC"
    assert orders["revenue"].dtype == "float64" and orders["n_items"].dtype == "int64"
    assert orders.loc[1, "coupon_id"] == ""
    assert result.frames["campaign_log"]["converted"].dtype == "int64"
    assert not result.reports["orders"].warnings
    # GX's tqdm bars must never reach the terminal.
    assert "Calculating Metrics" not in capfd.readouterr().err


def test_data_docs_keep_earlier_batches(tmp_path):
    for name in ("day-1", "day-2"):
        _gate(tmp_path, _write_batch(tmp_path, name=name, only=("orders",)))
    index = (tmp_path / "docs" / "index.html").read_text(encoding="utf-8")
    assert "validations/couponops/orders/day-1/" in index and "validations/couponops/orders/day-2/" in index


def test_read_table_parses_dtypes_and_utc(tmp_path):
    path = tmp_path / "customers.csv"
    path.write_text(_csv(_frames()["customers"]), encoding="utf-8")
    df = read_table(path, "customers")
    assert list(df.columns) == ["customer_id", "signup_date", "region", "device", "segment"]
    assert str(df["signup_date"].dt.tz) == "UTC"
    assert df.loc[0, "signup_date"] == pd.Timestamp("2025-02-01", tz="UTC")


# --- structural problems, caught while reading -------------------------------------------------------


def test_quoted_fields_and_bom_are_read(tmp_path):
    customers = _frames()["customers"]
    customers.loc[0, "region"] = "north, upper"
    path = tmp_path / "customers.csv"
    path.write_bytes(b"\xef\xbb\xbf" + _csv(customers).encode("utf-8"))
    df = read_table(path, "customers")
    assert df.columns[0] == "customer_id" and df.loc[0, "region"] == "north, upper"
    path.write_text(_csv(customers)[:-12] + '"unterminated\n', encoding="utf-8")
    with pytest.raises(DataContractError, match=r"customers\.csv"):
        read_table(path, "customers")



def test_empty_file_is_rejected(tmp_path):
    err = _rejected(tmp_path, orders=b"")
    msg = str(err)
    assert "orders.csv" in msg and "empty (0 bytes)" in msg


def test_header_only_file_is_rejected(tmp_path):
    err = _rejected(tmp_path, orders="order_id,customer_id,ts,revenue,n_items,coupon_id\n")
    assert "orders.csv" in str(err) and "header but no data rows" in str(err)


def test_truncated_last_line_names_the_line(tmp_path):
    text = _csv(_frames()["orders"]).rstrip("\n")
    truncated = text[: text.rindex(",") - 3]  # cut inside the last record
    err = _rejected(tmp_path, orders=truncated)
    msg = str(err)
    assert "orders.csv" in msg and "line 5 has 4" in msg and "must have 6 fields" in msg


def test_non_utf8_bytes_name_offset_and_line(tmp_path):
    data = _csv(_frames()["customers"]).encode("utf-8").replace(b"north", b"n\xf6rth", 1)
    err = _rejected(tmp_path, customers=data)
    msg = str(err)
    assert "customers.csv" in msg and "not valid UTF-8" in msg
    assert "byte 0xf6" in msg and "line 2" in msg and "byte offset" in msg


def test_missing_required_column(tmp_path):
    err = _rejected(tmp_path, orders=_frames()["orders"].drop(columns=["revenue"]))
    msg = str(err)
    assert "orders.csv" in msg and "required column 'revenue' is missing" in msg


def test_non_numeric_value_names_column_lines_and_values(tmp_path):
    orders = _frames()["orders"].astype({"revenue": object})
    orders.loc[2, "revenue"] = "abc"
    err = _rejected(tmp_path, orders=orders)
    msg = str(err)
    assert "orders.csv" in msg and "'revenue'" in msg and "must parse as a number" in msg
    assert "line 4 = 'abc'" in msg
    failure = err.reports[[r.table for r in err.reports].index("orders")].failures[0]
    assert failure.column == "revenue" and failure.sample_rows[0]["_line"] == 4


def test_bad_timestamp_is_a_parse_error(tmp_path):
    path = tmp_path / "orders.csv"
    orders = _frames()["orders"]
    orders.loc[0, "ts"] = "yesterday"
    path.write_text(_csv(orders), encoding="utf-8")
    with pytest.raises(DataContractError, match=r"(?s)orders\.csv.*'ts'.*ISO-8601 timestamp.*'yesterday'"):
        read_table(path, "orders")


def test_extra_column_warns_or_fails_when_strict(tmp_path):
    orders = _frames()["orders"].assign(loyalty_tier="gold")
    batch = _write_batch(tmp_path, only=("orders",), orders=orders)
    result = _gate(tmp_path, batch)
    assert result.success
    warning = result.reports["orders"].warnings[0]
    assert warning.column == "loyalty_tier" and "not in the orders contract" in warning.rule_text
    assert "WARN" in result.reports["orders"].message()

    path = batch / "orders.csv"
    with pytest.raises(DataContractError, match=r"(?s)orders\.csv.*loyalty_tier.*strict"):
        read_table(path, "orders", strict=True)
    with pytest.raises(DataContractError, match=r"(?s)orders\.csv.*unexpected_column.*loyalty_tier"):
        _gate(tmp_path, batch, strict=True)


# --- value rules (GX suites) -----------------------------------------------------------------------


def test_null_ids_are_rejected(tmp_path):
    orders = _frames()["orders"]
    orders.loc[1, "customer_id"] = ""
    err = _rejected(tmp_path, orders=orders)
    msg = str(err)
    assert "orders.csv" in msg and "expect_column_values_to_not_be_null on column 'customer_id'" in msg
    assert "row 1, line 3" in msg


def test_duplicate_event_ids_are_rejected(tmp_path):
    events = _frames()["events"]
    events.loc[4, "event_id"] = "e2"
    err = _rejected(tmp_path, events=events)
    msg = str(err)
    assert "events.parquet" in msg and "event_id must be unique" in msg
    assert "expect_column_values_to_be_unique" in msg and "'e2'" in msg


@pytest.mark.parametrize(
    ("table", "column", "value", "rule"),
    [
        ("channels", "send_cost", -0.5, "send_cost must be >= 0"),
        ("orders", "revenue", -10.0, "revenue must be in [0, 1,000,000]"),
        ("coupons", "face_value", -5.0, "face_value must be > 0"),
        ("orders", "revenue", 1e12, "revenue must be in [0, 1,000,000]"),
    ],
)
def test_out_of_range_values_are_rejected(tmp_path, table, column, value, rule):
    frame = _frames()[table]
    frame.loc[1, column] = value
    err = _rejected(tmp_path, **{table: frame})
    msg = str(err)
    assert f"{table}.csv" in msg and f"column '{column}'" in msg and rule in msg
    assert "line 3" in msg


def test_future_event_timestamp_is_rejected(tmp_path):
    events = _frames()["events"]
    events.loc[3, "ts"] = pd.Timestamp("2026-04-01T00:00:00Z")
    err = _rejected(tmp_path, events=events)
    msg = str(err)
    assert "events.parquet" in msg and "column 'ts'" in msg and "must lie between the shop opening" in msg
    assert "row 3" in msg and "'e4'" in msg


def test_unknown_customer_id_is_rejected(tmp_path):
    # The known ids come from the batch's own customers.csv (the context knows none).
    events = _frames()["events"]
    events.loc[0, "customer_id"] = "ghost"
    batch = _write_batch(tmp_path, only=("customers", "events"), events=events)
    with pytest.raises(DataContractError) as info:
        gate_batch(batch, context=_ctx(), quarantine_dir=tmp_path / "q", data_docs_dir=tmp_path / "docs")
    err = info.value
    msg = str(err)
    assert "events.parquet" in msg and "referential_integrity on column 'customer_id'" in msg
    assert "['ghost']" in msg


def test_unknown_coupon_id_is_rejected(tmp_path):
    orders = _frames()["orders"]
    orders.loc[3, "coupon_id"] = "BOGUS50"
    err = _rejected(tmp_path, orders=orders)
    msg = str(err)
    assert "orders.csv" in msg and "referential_integrity on column 'coupon_id'" in msg
    assert "BOGUS50" in msg and "line 5" in msg


def test_known_ids_from_context_cover_batches_without_reference_tables(tmp_path):
    batch = tmp_path / "raw" / "events-only"
    batch.mkdir(parents=True)
    _frames()["events"].to_parquet(batch / "events.parquet", index=False)
    ok = _gate(tmp_path, batch, known_customers={"c1", "c2", "c3", "c5", "c6"})
    assert ok.success
    with pytest.raises(DataContractError, match="referential_integrity"):
        _gate(tmp_path, batch, known_customers={"c1"})


def test_frames_given_in_memory_replace_the_files(tmp_path):
    batch = _write_batch(tmp_path, only=("orders",))
    bad = read_table(batch / "orders.csv", "orders")
    bad.loc[0, "n_items"] = 0
    with pytest.raises(DataContractError, match=r"(?s)orders\.csv.*n_items must be >= 1"):
        gate_batch(batch, {"orders": bad}, context=_ctx(**KNOWN), quarantine_dir=tmp_path / "q",
                   data_docs_dir=tmp_path / "docs")


def test_failed_batch_is_moved_to_quarantine_with_result(tmp_path):
    orders = _frames()["orders"]
    orders.loc[0, "revenue"] = -1.0
    batch = _write_batch(tmp_path, name="batch-007", only=("orders", "events"), orders=orders)
    with pytest.raises(DataContractError) as info:
        _gate(tmp_path, batch)
    assert not batch.exists()
    dest = info.value.quarantine_path
    assert dest is not None and dest.parent == tmp_path / "quarantine" and dest.name.startswith("batch-007-")
    assert (dest / "orders.csv").is_file() and (dest / "events.parquet").is_file()
    result = json.loads((dest / "validation_result.json").read_text(encoding="utf-8"))
    assert result["success"] is False and result["batch"] == "batch-007"
    assert result["reports"]["orders"]["success"] is False
    assert result["reports"]["events"]["success"] is True
    failure = result["reports"]["orders"]["failures"][0]
    assert failure["column"] == "revenue" and failure["sample_rows"][0]["order_id"] == "o1"
    assert str(dest) in str(info.value)
    assert (tmp_path / "docs" / "index.html").is_file()


# --- product tables and explicit checks -------------------------------------------------------------


def test_allocations_suite_checks_policy_propensity_and_pairs():
    ctx = _ctx()
    good = pd.DataFrame({"campaign_id": ["k2"] * 3, "customer_id": ["c1", "c2", "c3"],
                         "arm": ["PCT10@email", "control", "USD5@sms"], "coupon_id": ["PCT10", "", "USD5"],
                         "channel": ["email", "", "sms"], "policy": ["model", "control", "explore"],
                         "propensity": [1.0, 0.1, 0.05]})
    assert validate_table(good, "allocations", context=ctx).success
    bad = good.copy()
    bad.loc[2, "customer_id"] = "c1"
    bad.loc[1, "policy"] = "greedy"
    bad.loc[0, "propensity"] = 0.0
    report = validate_table(bad, "allocations", context=ctx)
    rules = {(f.expectation, f.column) for f in report.failures}
    assert ("expect_compound_columns_to_be_unique", "campaign_id+customer_id") in rules
    assert ("expect_column_values_to_be_in_set", "policy") in rules
    assert ("expect_column_values_to_be_between", "propensity") in rules


def test_model_scores_and_feature_snapshot_must_be_finite():
    ctx = _ctx()
    scores = pd.DataFrame({"customer_id": ["c1", "c2"], "p_conv__control": [0.1, 0.2],
                           "p_conv__PCT10@email": [0.3, 1.5], "uplift__PCT10@email": [0.2, 1.3],
                           "revenue__PCT10@email": [40.0, np.inf]})
    report = validate_table(scores, "model_scores", context=ctx)
    failing = {f.column for f in report.failures}
    assert {"p_conv__PCT10@email", "uplift__PCT10@email", "revenue__PCT10@email"} <= failing
    features = pd.DataFrame({"customer_id": ["c1", "c2"], "recency_days": [3.0, np.nan],
                             "spend": [1.0, -np.inf], "segment": ["new", "vip"]})
    report = validate_table(features, "feature_snapshot", context=ctx)
    assert {(f.expectation, f.column) for f in report.failures} >= {
        ("expect_column_values_to_not_be_null", "recency_days"), ("values_finite", "spend")}


def test_volume_anomaly_fails_and_drift_only_warns():
    ctx = _ctx(previous_row_counts={"orders": 100})
    orders = read_like_file(_frames()["orders"])
    report = validate_table(orders, "orders", context=ctx)
    assert [f.expectation for f in report.failures] == ["volume_anomaly"]
    assert "0.04x the previous batch" in report.message()

    rng = np.random.default_rng(0)
    reference = pd.DataFrame({"revenue": rng.gamma(2.0, 20.0, 2000), "n_items": rng.integers(1, 4, 2000)})
    shifted = pd.DataFrame({"order_id": [f"o{i}" for i in range(500)], "customer_id": "c1",
                            "ts": pd.Timestamp("2026-03-01", tz="UTC"), "revenue": rng.gamma(2.0, 60.0, 500),
                            "n_items": rng.integers(1, 4, 500), "coupon_id": ""})
    report = validate_table(shifted, "orders", context=_ctx(reference={"orders": reference}))
    assert report.success
    assert [w.column for w in report.warnings] == ["revenue"]
    assert population_stability_index(reference["n_items"], shifted["n_items"]) < 0.1


def read_like_file(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.assign(ts=pd.to_datetime(frame["ts"], utc=True))


def test_validate_table_handles_200k_events_quickly():
    n = 200_000
    rng = np.random.default_rng(1)
    events = pd.DataFrame({
        "event_id": [f"e{i}" for i in range(n)],
        "customer_id": [f"c{i % 5000}" for i in range(n)],
        "ts": pd.Timestamp("2026-02-01", tz="UTC")
        + pd.to_timedelta(rng.integers(0, 86400 * 30, n), unit="s"),
        "event_type": rng.choice(["page_view", "search", "add_to_cart"], n),
        "category": rng.choice(["shoes", "bags", ""], n),
    })
    ctx = _ctx(known_customers={f"c{i}" for i in range(5000)})
    validate_table(events.head(10), "events", context=ctx)  # context creation is not what we time
    start = time.perf_counter()
    report = validate_table(events, "events", context=ctx)
    elapsed = time.perf_counter() - start
    assert report.success, report.message()
    assert elapsed < 15, f"200k events took {elapsed:.1f}s"


# --- imported campaign logs ------------------------------------------------------------------------


def _log(**cols) -> pd.DataFrame:
    base = {"uid": ["u1", "u2", "u3", "u4"], "treat": ["ctrl", "A", "B", "A"],
            "p": [0.5, 0.25, 0.25, 0.25], "conv": [0, 1, 0, 1]}
    base.update(cols)
    return pd.DataFrame(base)


def _check_log(df: pd.DataFrame, propensity: str | None = "p"):
    return validate_campaign_log(df, id_column="uid", treatment_column="treat", arms={"A", "B"},
                                 control_label="ctrl", propensity_column=propensity, outcome_columns=["conv"])


def test_campaign_log_spec_accepts_a_valid_log():
    report = _check_log(_log())
    assert report.success and not report.warnings


def test_campaign_log_label_outside_spec():
    report = _check_log(_log(treat=["ctrl", "A", "Z", "A"]))
    failure = next(f for f in report.failures if f.expectation == "treatment_in_spec")
    assert failure.column == "treat" and failure.failing_count == 1 and failure.sample_rows[0]["treat"] == "Z"
    assert "declared arms ['A', 'B', 'ctrl']" in report.message()


def test_campaign_log_single_arm_without_control():
    report = _check_log(_log(treat=["A"] * 4), propensity=None)
    names = {f.expectation for f in report.failures}
    assert {"at_least_two_arms", "control_present"} <= names
    assert "no rows with the control label 'ctrl'" in report.message()


def test_campaign_log_propensity_outside_unit_interval():
    report = _check_log(_log(p=[0.5, 0.0, 1.2, np.nan]))
    failure = next(f for f in report.failures if f.expectation == "propensity_in_range")
    assert failure.failing_count == 3 and "(0, 1]" in failure.rule_text
    assert [r["_row"] for r in failure.sample_rows] == [1, 2, 3]
