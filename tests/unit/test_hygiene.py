"""Identifier, type and file hygiene: each class of silently-accepted bad input is refused loudly.

Readers are tested directly on small files (fast); the file-level rules (symbolic links, the batch
folder itself, case-insensitive names) also go through the CLI, with the warehouse unchanged and
the quarantine holding its ``validation_result.json``.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from mlpkg.validation import DataContractError, ValidationContext, gate_batch
from mlpkg.validation.checks import validate_campaign_log
from mlpkg.validation.readers import (
    read_raw_table,
    read_table,
    resolve_batch_folder,
    scan_batch,
)
from tests.fixtures import run_cli

pytestmark = pytest.mark.unit

HEADER = "order_id,customer_id,ts,revenue,n_items,coupon_id\n"
GOOD = "O1,007,2025-01-01T00:00:00Z,1.5,2,\n"


def _orders(tmp_path: Path, body: str, name: str = "orders.csv") -> Path:
    path = tmp_path / name
    path.write_text(HEADER + GOOD + body, encoding="utf-8")
    return path


def _refusal(path: Path, table: str = "orders") -> str:
    with pytest.raises(DataContractError) as err:
        read_table(path, table)
    return str(err.value)


def _names(message: str, *parts: str) -> None:
    for part in parts:
        assert part in message, f"{part!r} not in:\n{message}"


# --- identifiers ----------------------------------------------------------------------------------


def test_csv_ids_are_exact_strings_with_leading_zeros(tmp_path):
    df = read_table(_orders(tmp_path, "O2,0042,2025-01-01T00:00:00Z,2,1,00PCT\n"), "orders")
    assert df["customer_id"].tolist() == ["007", "0042"]
    assert df["coupon_id"].tolist() == ["", "00PCT"]


def _parquet_orders(tmp_path: Path, customer_ids: pd.Series) -> Path:
    df = pd.DataFrame({"order_id": ["O1", "O2"], "customer_id": customer_ids,
                       "ts": pd.to_datetime(["2025-01-01", "2025-01-02"], utc=True), "revenue": [1.0, 2.0],
                       "n_items": [1, 2], "coupon_id": ["", ""]})
    path = tmp_path / "orders.parquet"
    df.to_parquet(path)
    return path


def test_float_parquet_id_column_is_a_type_error_naming_column_and_value(tmp_path):
    path = _parquet_orders(tmp_path, pd.Series([100000.0, 7.0]))
    _names(_refusal(path), "orders.parquet", "type_string", "'customer_id'", "100000.0", "float64")


def test_integer_parquet_ids_convert_exactly(tmp_path):
    big = 2**62 + 1  # a float64 would round it
    df = read_table(_parquet_orders(tmp_path, pd.Series([big, 7], dtype="int64")), "orders")
    assert df["customer_id"].tolist() == [str(big), "7"]


@pytest.mark.parametrize("value, rule", [
    (" C2", "id_no_surrounding_whitespace"),
    ("C2\t", "id_no_surrounding_whitespace"),
    ("C\u200b2", "id_visible_characters"),
    ("\ufeffC2", "id_visible_characters"),
    ("C\u00a02", "id_visible_characters"),
    ("C\u202e2", "id_visible_characters"),
    ("C\x072", "id_visible_characters"),
])
def test_ids_with_whitespace_control_or_invisible_characters_are_refused(tmp_path, value, rule):
    message = _refusal(_orders(tmp_path, f"O2,{value},2025-01-01T00:00:00Z,2,1,\n"))
    _names(message, "orders.csv", rule, "'customer_id'", "line 3", repr(value))


def test_nul_bytes_anywhere_in_text_are_refused(tmp_path):
    message = _refusal(_orders(tmp_path, "O2,C\x002,2025-01-01T00:00:00Z,2,1,\n"))
    _names(message, "no_nul_bytes", "'customer_id'", "line 3", repr("C\x002"))
    extra = tmp_path / "extra.csv"
    extra.write_text(HEADER.rstrip("\n") + ",note\n" + GOOD.rstrip("\n") + ",a\x00b\n")
    _names(_refusal(extra), "no_nul_bytes", "'note'", "line 2")


def test_strings_longer_than_the_warehouse_column_are_refused(tmp_path):
    long_id = "O" + "9" * 64  # orders.order_id is String(64)
    message = _refusal(_orders(tmp_path, f"{long_id},C2,2025-01-01T00:00:00Z,2,1,\n"))
    _names(message, "max_length", "'order_id'", "at most 64", "line 3", long_id)
    read_table(_orders(tmp_path, f"{long_id[:64]},C2,2025-01-01T00:00:00Z,2,1,\n"), "orders")


def test_campaign_log_ids_must_be_exact_text(tmp_path):
    base = {"variant": ["holdout", "a", "a"], "purchased": [0, 1, 0]}
    spec = dict(id_column="user_ref", treatment_column="variant", arms={"a"}, control_label="holdout",
                propensity_column=None, outcome_columns=["purchased"])
    floats = validate_campaign_log(pd.DataFrame({"user_ref": [100000.0, 2.0, 3.0], **base}), **spec)
    assert [f.expectation for f in floats.failures] == ["type_string"]
    assert "100000.0" in floats.message()
    padded = validate_campaign_log(pd.DataFrame({"user_ref": ["u1", "u1 ", "u\u200b1"], **base}), **spec)
    rules = {f.expectation for f in padded.failures}
    assert rules == {"id_no_surrounding_whitespace", "id_visible_characters"}
    assert validate_campaign_log(pd.DataFrame({"user_ref": ["u1", "u2", "u3"], **base}), **spec).success


# --- numbers and timestamps -----------------------------------------------------------------------


@pytest.mark.parametrize("column, value, rule", [
    ("revenue", "inf", "finite_number"),
    ("revenue", "nan", "finite_number"),
    ("revenue", "1e999", "finite_number"),
    ("revenue", "12345678901234567891", "float_precision"),
    ("n_items", "99999999999", "integer_range"),
    ("n_items", "9223372036854775808", "integer_range"),
])
def test_non_finite_overflowing_and_lossy_numbers_are_refused_with_the_file_value(tmp_path, column, value,
                                                                                    rule):
    row = {"order_id": "O2", "customer_id": "C2", "ts": "2025-01-01T00:00:00Z", "revenue": "2",
           "n_items": "1", "coupon_id": ""}
    row[column] = value
    message = _refusal(_orders(tmp_path, ",".join(row.values()) + "\n"))
    _names(message, rule, f"'{column}'", "line 3", repr(value))


def test_exact_numbers_are_kept(tmp_path):
    path = _orders(tmp_path, "O2,C2,2025-01-01T00:00:00Z,0.30000000000000004,2147483647,\n")
    df = read_table(path, "orders")
    assert df["n_items"].tolist() == [2, 2147483647] and df["revenue"].iloc[1] == 0.30000000000000004


@pytest.mark.parametrize("value", ["1700000000", "20250101"])
def test_integers_in_timestamp_columns_are_refused(tmp_path, value):
    _names(_refusal(_orders(tmp_path, f"O2,C2,{value},2,1,\n")), "parse_timestamp", "'ts'", "line 3", value)


def test_integer_typed_parquet_timestamps_are_refused(tmp_path):
    df = pd.DataFrame({"event_id": ["E1"], "customer_id": ["C1"], "ts": [1700000000],
                       "event_type": ["search"], "category": [""]})
    df.to_parquet(tmp_path / "events.parquet")
    _names(_refusal(tmp_path / "events.parquet", "events"), "parse_timestamp", "'ts'", "int64")


def test_zones_naive_taken_as_utc_mixed_refused_several_offsets_reported(tmp_path):
    body = "O2,C2,2025-01-01T10:00:00,2,1,\n"
    path = tmp_path / "orders.csv"
    path.write_text(HEADER + GOOD + body)
    _names(_refusal(path), "timestamp_zone_consistent", "'ts'", "line 3", "2025-01-01T10:00:00")
    path.write_text(HEADER + GOOD + "O2,C2,2025-01-01T12:00:00+02:00,2,1,\n")
    read = read_raw_table(path, "orders")
    assert read.frame["ts"].iloc[1] == pd.Timestamp("2025-01-01T10:00:00Z")
    assert [w.expectation for w in read.warnings] == ["timestamp_offsets_mixed"]


def test_all_naive_timestamps_are_utc(tmp_path):
    path = tmp_path / "orders.csv"
    path.write_text(HEADER + "O1,C1,2025-01-01T10:00:00,2,1,\nO2,C2,2025-01-02 11:00,2,1,\n")
    assert read_table(path, "orders")["ts"].iloc[0] == pd.Timestamp("2025-01-01T10:00:00Z")


# --- CSV structure ----------------------------------------------------------------------------------


def test_duplicated_csv_header_is_refused(tmp_path):
    path = tmp_path / "orders.csv"
    path.write_text("order_id,customer_id,ts,revenue,n_items,coupon_id,revenue\nO1,C1,2025-01-01T00:00:00Z,1,1,,9\n")
    _names(_refusal(path), "csv_unique_header", "'revenue'", "2 times")


def test_line_numbers_count_newlines_inside_quoted_fields(tmp_path):
    path = tmp_path / "orders.csv"
    path.write_text(HEADER.rstrip("\n") + ",note\n"
                    + 'O1,C1,2025-01-01T00:00:00Z,1,1,,"two\nlines"\n'
                    + 'O2,C2,2025-01-01T00:00:00Z,1,1,,"three\nmore\nlines"\n'
                    + "O3,C3,2025-01-01T00:00:00Z,abc,1,,x\n")
    message = _refusal(path)
    _names(message, "parse_float", "line 7 = 'abc'")
    assert "line 4 = 'abc'" not in message


# --- batch folders ----------------------------------------------------------------------------------


def _write_good_orders(folder: Path, name: str = "orders.csv") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(HEADER + GOOD)
    return path


def test_file_names_match_case_insensitively_and_gzip_csv_is_read(tmp_path):
    _write_good_orders(tmp_path / "b", "Orders.CSV")
    with gzip.open(tmp_path / "b" / "customers.csv.gz", "wt") as fh:
        fh.write("customer_id,signup_date,region,device,segment\n007,2025-01-01,east,ios,new\n")
    scan = scan_batch(tmp_path / "b")
    assert not scan.failures and set(scan.tables) == {"orders", "customers"}
    assert read_table(scan.tables["customers"], "customers")["customer_id"].tolist() == ["007"]


def test_two_files_of_one_table_are_refused(tmp_path):
    _write_good_orders(tmp_path / "b")
    (tmp_path / "b" / "orders.parquet").write_bytes(b"PAR1")
    [failure] = scan_batch(tmp_path / "b").failures
    assert failure.expectation == "one_file_per_table" and "orders.csv" in failure.rule_text


@pytest.mark.parametrize("name, rule", [
    ("orders.csv.zip", "supported_format"),
    ("orders.tsv", "supported_format"),
    ("export.zip", "compressed_file"),
    ("customers.parquet.gz", "supported_format"),
    ("dump.csv.bz2", "compressed_file"),
])
def test_compressed_and_unsupported_data_files_are_refused_not_ignored(tmp_path, name, rule):
    _write_good_orders(tmp_path / "b", "channels.csv")
    (tmp_path / "b" / name).write_bytes(b"\x00\x01")
    [failure] = scan_batch(tmp_path / "b").failures
    assert failure.expectation == rule and name in failure.rule_text


def test_unknown_files_are_reported_as_warnings(tmp_path):
    _write_good_orders(tmp_path / "b")
    (tmp_path / "b" / "notes.txt").write_text("hi")
    (tmp_path / "b" / "_SUCCESS").write_text("")
    scan = scan_batch(tmp_path / "b")
    assert not scan.failures and scan.warnings == ["notes.txt: not a raw table of the contract (not read)"]


def test_symlinks_are_refused_and_never_followed_or_copied(tmp_path):
    secret = tmp_path / "outside" / "secret.csv"
    secret.parent.mkdir()
    secret.write_text(HEADER + GOOD)
    batch = tmp_path / "b"
    _write_good_orders(batch, "channels.csv")
    (batch / "orders.csv").symlink_to(secret)
    ctx = ValidationContext(now="2026-01-01T00:00:00Z")
    with pytest.raises(DataContractError) as err:
        gate_batch(batch, context=ctx, quarantine_dir=tmp_path / "q", data_docs_dir=tmp_path / "docs")
    _names(str(err.value), "no_symlinks", "orders.csv", "symbolic link")
    dest = err.value.quarantine_path
    assert (dest / "orders.csv").is_symlink() and json.loads((dest / "validation_result.json").read_text())
    assert set(err.value.reports[0].to_dict()["failures"][0]) >= {"expectation", "rule_text"}
    assert "channels" not in {r.table for r in err.value.reports}  # nothing was read


def test_batch_folder_may_not_be_cwd_home_root_or_contain_a_protected_folder(tmp_path, monkeypatch):
    batch = tmp_path / "work"
    _write_good_orders(batch)
    monkeypatch.chdir(batch)
    for given in (Path("."), batch / "sub" / "..", Path("/"), Path.home()):
        if given == batch / "sub" / "..":
            (batch / "sub").mkdir()
        with pytest.raises(DataContractError, match="batch_folder_safe"):
            resolve_batch_folder(given)
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(DataContractError, match="contains the protected folder"):
        resolve_batch_folder(tmp_path, protected=[tmp_path / "state"])
    link = tmp_path / "link"
    link.symlink_to(batch)
    with pytest.raises(DataContractError, match="symbolic link"):
        resolve_batch_folder(link)
    assert resolve_batch_folder(batch / "sub" / "..") == batch.resolve()


def test_quarantine_of_a_dotdot_path_writes_its_result(tmp_path):
    batch = tmp_path / "b"
    (batch / "sub").mkdir(parents=True)
    (batch / "orders.csv").write_text(HEADER + "O1,C1,2025-01-01T00:00:00Z,abc,1,\n")
    with pytest.raises(DataContractError) as err:
        gate_batch(batch / "sub" / "..", context=ValidationContext(now="2026-01-01T00:00:00Z"),
                   quarantine_dir=tmp_path / "q", data_docs_dir=tmp_path / "docs")
    dest = err.value.quarantine_path
    assert dest.name.startswith("b-") and (dest / "validation_result.json").exists()
    assert (dest / "orders.csv").exists() and not batch.exists()


# --- through the CLI ------------------------------------------------------------------------------------


_cli = run_cli


def _snapshot(engine):
    from mlpkg.db import queries as q
    from mlpkg.db.engine import session_scope

    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def test_cli_refuses_the_working_directory_and_moves_nothing(ingested, monkeypatch):
    settings, engine = ingested
    before = _snapshot(engine)
    batch = settings.raw_dir / "initial"
    monkeypatch.chdir(batch)
    result = _cli("ingest", ".")
    assert result.exit_code == 2, result.output
    assert "batch_folder_safe" in "".join(result.output.split()) and "Traceback" not in result.output
    assert batch.is_dir() and (batch / "orders.csv").exists()
    assert not settings.quarantine_dir.exists() or not any(settings.quarantine_dir.iterdir())
    assert _snapshot(engine) == before


def test_cli_quarantines_a_batch_with_a_symlink_without_reading_it(ingested, tmp_path):
    settings, engine = ingested
    before = _snapshot(engine)
    batch = settings.raw_dir / "linked"
    batch.mkdir()
    secret = tmp_path / "secret.csv"
    secret.write_text("customer_id,signup_date,region,device,segment\n")
    (batch / "customers.csv").symlink_to(secret)
    result = _cli("ingest", batch)
    assert result.exit_code == 2, result.output
    assert "no_symlinks" in "".join(result.output.split())
    [dest] = settings.quarantine_dir.iterdir()
    assert (dest / "customers.csv").is_symlink() and (dest / "validation_result.json").exists()
    assert _snapshot(engine) == before


def test_cli_refuses_a_symlinked_campaign_log_without_copying_its_target(ingested, tmp_path):
    import yaml

    settings, engine = ingested
    target = tmp_path / "private" / "log.csv"
    target.parent.mkdir()
    target.write_text("user_ref,variant,purchased\nu1,holdout,0\nu2,a,1\n")
    link = tmp_path / "log.csv"
    link.symlink_to(target)
    spec = tmp_path / "spec.yaml"
    treatment = {"column": "variant", "control": "holdout", "costs": {"a": 1.0}}
    spec.write_text(yaml.safe_dump({"name": "linked", "id_column": "user_ref", "treatment": treatment,
                                    "outcomes": {"conversion": "purchased"}}))
    before = _snapshot(engine)
    result = _cli("import-log", link, "--spec", spec)
    assert result.exit_code == 2, result.output
    assert "no_symlinks" in "".join(result.output.split())
    [dest] = settings.quarantine_dir.iterdir()
    assert sorted(os.listdir(dest)) == ["validation_result.json"]
    assert _snapshot(engine) == before and target.exists()


def test_upper_case_file_name_is_discovered_for_loading(tmp_path):
    from mlpkg.data import discover_batch

    _write_good_orders(tmp_path / "b", "ORDERS.CSV")
    assert discover_batch(tmp_path / "b") == {"orders": (tmp_path / "b" / "ORDERS.CSV").resolve()}
