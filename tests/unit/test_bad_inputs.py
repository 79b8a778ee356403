"""Every class of bad input, fed through the real front door, is rejected and changes nothing.

Raw batch files go through ``couponops ingest`` and campaign logs through ``couponops import-log``
(the CLI, as a user would run them). Each case asserts exit code 2, a message naming the file, the
column and the broken rule, unchanged warehouse row counts and checksums, and the quarantined input.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from tests.fixtures import stored_id

pytestmark = pytest.mark.unit

# --- helpers ------------------------------------------------------------------------------------


def _snapshot(engine):
    with session_scope(engine) as s:
        return q.table_counts(s), q.table_checksums(s)


def _cli(*args, env: dict[str, str] | None = None):
    from mlpkg.cli import app
    from mlpkg.config import get_settings

    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args], env=env)
    finally:
        get_settings.cache_clear()


def _flat(text: str) -> str:
    # Rich wraps long lines (even inside paths) at the console width; compare without whitespace.
    return "".join(text.split())


def _assert_names(output: str, *parts: str | None) -> None:
    flat = _flat(output)
    for part in parts:
        if part is not None:
            assert _flat(part) in flat, f"{part!r} not in output:\n{output}"


def _quarantined(settings) -> list[Path]:
    root = settings.quarantine_dir
    return sorted(root.iterdir()) if root.exists() else []


# --- raw batch files ------------------------------------------------------------------------------

ORDERS_ROWS = 30


def _orders(src: Path) -> pd.DataFrame:
    return pd.read_csv(src / "orders.csv", dtype=str, keep_default_na=False).head(ORDERS_ROWS)


def _write_orders(dst: Path, df: pd.DataFrame) -> None:
    df.to_csv(dst / "orders.csv", index=False)


def _orders_with(column: str, value: str, row: int = 3) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        df = _orders(src)
        df.loc[row, column] = value
        _write_orders(dst, df)

    return build


def _orders_without_revenue(src: Path, dst: Path) -> None:
    _write_orders(dst, _orders(src).drop(columns=["revenue"]))


def _orders_bytes(transform: Callable[[bytes], bytes]) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        tmp = dst / "orders.csv"
        _write_orders(dst, _orders(src))
        tmp.write_bytes(transform(tmp.read_bytes()))

    return build


def _truncate_last_line(data: bytes) -> bytes:
    lines = data.rstrip(b"\n").split(b"\n")
    return b"\n".join([*lines[:-1], lines[-1][: len(lines[-1]) // 3]]) + b"\n"


def _non_utf8(data: bytes) -> bytes:
    lines = data.split(b"\n")
    lines[5] = lines[5].replace(b",", b",caf\xe9 ", 1)  # Latin-1 "é" inside a UTF-8 file
    return b"\n".join(lines)


def _events_with(mutate: Callable[[pd.DataFrame], None]) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        df = pd.read_parquet(src / "events.parquet").head(40).reset_index(drop=True)
        mutate(df)
        df.to_parquet(dst / "events.parquet", index=False)

    return build


def _duplicate_event_id(df: pd.DataFrame) -> None:
    df.loc[7, "event_id"] = df.loc[6, "event_id"]


def _future_event(df: pd.DataFrame) -> None:
    df.loc[4, "ts"] = pd.Timestamp("2099-01-01T00:00:00Z")


def _negative_face_value(src: Path, dst: Path) -> None:
    df = pd.read_csv(src / "coupons.csv", dtype=str, keep_default_na=False)
    df.loc[1, "face_value"] = "-5"
    df.to_csv(dst / "coupons.csv", index=False)


def _products_with(column: str, value: str, row: int = 2) -> Callable[[Path, Path], None]:
    def build(src: Path, dst: Path) -> None:
        df = pd.read_csv(src / "products.csv", dtype=str, keep_default_na=False)
        df.loc[row, column] = value
        df.to_csv(dst / "products.csv", index=False)

    return build


def _duplicate_product_id(src: Path, dst: Path) -> None:
    df = pd.read_csv(src / "products.csv", dtype=str, keep_default_na=False)
    df.loc[5, "product_id"] = df.loc[4, "product_id"]
    df.to_csv(dst / "products.csv", index=False)


def _unknown_event_product(df: pd.DataFrame) -> None:
    df.loc[3, "product_id"] = "P_GHOST"


# (builder, file, column, rule words)
RAW_CASES = {
    "negative-price": (_products_with("price", "-3.50"), "products.csv", "price", "price must be"),
    "duplicate-product-id": (
        _duplicate_product_id, "products.csv", "product_id", "product_id must be unique"
    ),
    "in-stock-not-a-flag": (_products_with("in_stock", "yes"), "products.csv", "in_stock", "parse_flag"),
    "in-stock-out-of-set": (
        _products_with("in_stock", "2"), "products.csv", "in_stock", "in_stock must be one of"
    ),
    "unknown-product-in-events": (
        _events_with(_unknown_event_product),
        "events.parquet",
        "product_id",
        "referential_integrity",
    ),
    "unknown-product-in-orders": (
        _orders_with("product_id", "P_NOPE"),
        "orders.csv",
        "product_id",
        "referential_integrity",
    ),
    "missing-required-column": (_orders_without_revenue, "orders.csv", "revenue", "required_column"),
    "wrong-type-abc-in-numeric": (_orders_with("revenue", "abc"), "orders.csv", "revenue", "parse_float"),
    "null-id": (_orders_with("order_id", ""), "orders.csv", "order_id", "order_id must not be null"),
    "duplicate-event-ids": (
        _events_with(_duplicate_event_id),
        "events.parquet",
        "event_id",
        "event_id must be unique",
    ),
    "negative-revenue": (_orders_with("revenue", "-12.5"), "orders.csv", "revenue", "revenue must be"),
    "negative-face-value": (_negative_face_value, "coupons.csv", "face_value", "face_value must be"),
    "future-timestamp": (_events_with(_future_event), "events.parquet", "ts", "ts must lie between"),
    "unknown-customer": (
        _orders_with("customer_id", "C_GHOST"),
        "orders.csv",
        "customer_id",
        "referential_integrity",
    ),
    "unknown-coupon": (
        _orders_with("coupon_id", "NOPE50"),
        "orders.csv",
        "coupon_id",
        "referential_integrity",
    ),
    "empty-file": (_orders_bytes(lambda b: b""), "orders.csv", None, "file is empty"),
    "header-only": (
        _orders_bytes(lambda b: b.split(b"\n")[0] + b"\n"),
        "orders.csv",
        None,
        "header but no data rows",
    ),
    "truncated-last-line": (_orders_bytes(_truncate_last_line), "orders.csv", None, "csv_field_count"),
    "non-utf8-bytes": (_orders_bytes(_non_utf8), "orders.csv", None, "utf8_encoding"),
    "revenue-outlier-1e12": (_orders_with("revenue", "1e12"), "orders.csv", "revenue", "revenue must be"),
}


@pytest.fixture
def bad_batch(ingested):
    """A new batch folder next to the already-ingested ``initial`` batch."""
    settings, engine = ingested
    src = settings.raw_dir / "initial"
    dst = settings.raw_dir / "bad-batch"
    dst.mkdir()
    return settings, engine, src, dst


@pytest.mark.parametrize("case", list(RAW_CASES))
def test_bad_raw_batch_is_rejected_through_the_cli(case, bad_batch):
    settings, engine, src, dst = bad_batch
    build, file, column, rule = RAW_CASES[case]
    build(src, dst)
    before = _snapshot(engine)

    result = _cli("ingest", dst)

    assert result.exit_code == 2, result.output
    _assert_names(result.output, "rejected by the data contract", file, column and f"'{column}'", rule)
    assert _snapshot(engine) == before
    assert not dst.exists()
    [quarantined] = _quarantined(settings)
    assert quarantined.name.startswith("bad-batch-") and (quarantined / file).exists()
    report = json.loads((quarantined / "validation_result.json").read_text())
    assert report["success"] is False


def test_extra_column_warns_and_loads_but_fails_in_strict_mode(bad_batch):
    settings, engine, src, dst = bad_batch
    _write_orders(dst, _orders(src).assign(gift_note="hello"))
    strict_dst = settings.raw_dir / "strict-batch"
    shutil.copytree(dst, strict_dst)

    before = _snapshot(engine)
    strict = _cli("ingest", strict_dst, env={"COUPONOPS_STRICT_COLUMNS": "true"})
    assert strict.exit_code == 2, strict.output
    _assert_names(strict.output, "orders.csv", "'gift_note'", "unexpected_column", "strict mode")
    assert _snapshot(engine) == before and not strict_dst.exists()

    lenient = _cli("ingest", dst)
    assert lenient.exit_code == 0, lenient.output
    counts, _ = _snapshot(engine)
    assert counts["orders"] == before[0]["orders"]  # same orders again: upserted, not duplicated
    assert counts["ingested_files"] == before[0]["ingested_files"] + 1


def test_extra_column_warning_reaches_the_ingest_report(bad_batch):
    from mlpkg import stages

    settings, _, src, dst = bad_batch
    _write_orders(dst, _orders(src).assign(gift_note="hello"))
    report = stages.ingest(settings, dst)
    assert any("gift_note" in w for w in report["warnings"])


# --- imported campaign logs -------------------------------------------------------------------------

LOG_NAME = "spring_sms_test"
BASE_SPEC = {
    "name": LOG_NAME,
    "id_column": "user_ref",
    "treatment": {"column": "variant", "control": "holdout", "costs": {"10pct_sms": 0.8, "5usd_sms": 1.2}},
    "propensity_column": None,
    "outcomes": {"conversion": "purchased", "revenue": "order_value", "extra": ["clicked"]},
    "features": {"numeric": ["days_since_last_order", "lifetime_value"], "categorical": ["region", "device"]},
}


def _base_log(n: int = 36) -> pd.DataFrame:
    arms = ["holdout", "10pct_sms", "5usd_sms"]
    return pd.DataFrame(
        {
            "user_ref": [f"u{i:03d}" for i in range(n)],
            "variant": [arms[i % 3] for i in range(n)],
            "purchased": [int(i % 4 == 0) for i in range(n)],
            "order_value": [round(20.0 + i, 2) if i % 4 == 0 else 0.0 for i in range(n)],
            "clicked": [int(i % 2 == 0) for i in range(n)],
            "days_since_last_order": [float(i % 30) for i in range(n)],
            "lifetime_value": [100.0 + 3 * i for i in range(n)],
            "region": [["north", "south"][i % 2] for i in range(n)],
            "device": [["ios", "android", "desktop"][i % 3] for i in range(n)],
        }
    )


def _log_edit(column: str, value, row: int = 4):  # noqa: ANN001, ANN202
    def edit(df: pd.DataFrame, spec: dict) -> None:
        df[column] = df[column].astype(object)
        df.loc[row, column] = value

    return edit


def _single_arm(df: pd.DataFrame, spec: dict) -> None:
    df["variant"] = "10pct_sms"


def _bad_propensity(df: pd.DataFrame, spec: dict) -> None:
    df["p"] = 1 / 3
    df.loc[2, "p"] = 0.0
    df.loc[5, "p"] = 1.5
    spec["propensity_column"] = "p"


def _spec_names_missing_column(df: pd.DataFrame, spec: dict) -> None:
    spec["features"]["numeric"].append("basket_size")


def _abc_in_inferred_numeric(df: pd.DataFrame, spec: dict) -> None:
    spec.pop("features")  # types are inferred: a column of numbers with one stray string is numeric
    _log_edit("lifetime_value", "abc", row=7)(df, spec)


def _duplicate_id(df: pd.DataFrame, spec: dict) -> None:
    df.loc[9, "user_ref"] = df.loc[8, "user_ref"]


def _raw(transform: Callable[[bytes], bytes]):  # noqa: ANN202
    return ("bytes", transform)


# (edit of frame/spec or raw-bytes transform, column, rule words)
LOG_CASES = {
    "spec-names-missing-column": (_spec_names_missing_column, "basket_size", "spec_column_exists"),
    "treatment-label-not-in-spec": (_log_edit("variant", "20pct_push"), "variant", "treatment_in_spec"),
    "single-arm-no-control": (_single_arm, "variant", "control_present"),
    "propensity-outside-0-1": (_bad_propensity, "p", "propensity_in_range"),
    "revenue-outlier-1e12": (_log_edit("order_value", 1e12), "order_value", "revenue_range"),
    "negative-revenue": (_log_edit("order_value", -3.5), "order_value", "revenue_range"),
    "conversion-not-binary": (_log_edit("purchased", 2), "purchased", "conversion_binary"),
    "wrong-type-abc-in-numeric": (_log_edit("lifetime_value", "abc"), "lifetime_value", "feature_numeric"),
    "abc-in-inferred-numeric": (_abc_in_inferred_numeric, "lifetime_value", "inferred numeric"),
    "null-id": (_log_edit("user_ref", ""), "user_ref", "ids_not_null"),
    "duplicate-id": (_duplicate_id, "user_ref", "ids_unique"),
    "empty-file": (_raw(lambda b: b""), None, "file is empty"),
    "header-only": (_raw(lambda b: b.split(b"\n")[0] + b"\n"), None, "header but no data rows"),
    "truncated-last-line": (_raw(_truncate_last_line), None, "csv_field_count"),
    "non-utf8-bytes": (_raw(_non_utf8), None, "utf8_encoding"),
}


@pytest.fixture
def log_store(ingested, tmp_path):
    """The ingested warehouse plus a good imported log that every bad import must leave alone."""
    from mlpkg import stages

    settings, engine = ingested
    exports = tmp_path / "exports"
    exports.mkdir()
    good, spec = exports / "good.csv", exports / "spec.yaml"
    _base_log().to_csv(good, index=False)
    spec.write_text(yaml.safe_dump(BASE_SPEC))
    assert stages.import_log(settings, good, spec)["rows"] == len(_base_log())
    return settings, engine, exports


def _write_case(exports: Path, edit) -> tuple[Path, Path]:  # noqa: ANN001
    df, spec = _base_log(), json.loads(json.dumps(BASE_SPEC))
    path, spec_path = exports / "bad_log.csv", exports / "bad_spec.yaml"
    if isinstance(edit, tuple):
        df.to_csv(path, index=False)
        path.write_bytes(edit[1](path.read_bytes()))
    else:
        edit(df, spec)
        df.to_csv(path, index=False)
    spec_path.write_text(yaml.safe_dump(spec))
    return path, spec_path


@pytest.mark.parametrize("case", list(LOG_CASES))
def test_bad_campaign_log_is_rejected_through_the_cli(case, log_store):
    settings, engine, exports = log_store
    edit, column, rule = LOG_CASES[case]
    path, spec = _write_case(exports, edit)
    original = path.read_bytes()
    before = _snapshot(engine)

    result = _cli("import-log", path, "--spec", spec)

    assert result.exit_code == 2, result.output
    _assert_names(
        result.output,
        f"Campaign log '{LOG_NAME}'",
        "rejected by its data contract",
        str(path),
        column and f"'{column}'",
        rule,
    )
    assert _snapshot(engine) == before  # the earlier good import of the same name is intact too
    assert path.read_bytes() == original  # the user's export outside the state folder is only copied
    [quarantined] = _quarantined(settings)
    assert quarantined.name.startswith(f"{LOG_NAME}-")
    assert (quarantined / path.name).read_bytes() == original
    report = json.loads((quarantined / "validation_result.json").read_text())
    assert report["success"] is False and report["original_moved"] is False
    assert report["report"]["failures"]


def test_extra_log_column_warns_but_fails_in_strict_mode(log_store):
    settings, engine, exports = log_store
    path, spec = _write_case(exports, _log_edit("region", "east"))
    df = pd.read_csv(path).assign(coupon_batch="B7")
    df.to_csv(path, index=False)
    before = _snapshot(engine)

    strict = _cli("import-log", path, "--spec", spec, env={"COUPONOPS_STRICT_COLUMNS": "true"})
    assert strict.exit_code == 2, strict.output
    _assert_names(strict.output, str(path), "'coupon_batch'", "unexpected_column", "strict mode")
    assert _snapshot(engine) == before

    lenient = _cli("import-log", path, "--spec", spec)
    assert lenient.exit_code == 0, lenient.output
    _assert_names(lenient.output, "warning:", "'coupon_batch'", "replaced")
    with session_scope(engine) as s:
        from mlpkg.db import models as m

        row = s.get(m.CampaignLogRow, (LOG_NAME, stored_id(settings, "u004")))
        assert row.features["region"] == "east" and "coupon_batch" not in row.features
