"""The offline validation summary: every gated batch gets one self-contained page that names what broke."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from mlpkg import stages
from mlpkg.simulator.lab import harness
from mlpkg.validation import DataContractError
from tests.fixtures import stored_id

pytestmark = pytest.mark.unit


def _body(html: str) -> str:
    """The page without its style sheet (class names are not words on the page)."""
    return re.sub(r"<style>.*?</style>", "", html, flags=re.S)


def _offline(html: str) -> None:
    """Nothing to fetch: no script, no stylesheet or image from elsewhere."""
    assert "<script" not in html.lower()
    fetched = re.search(r"<(link|img)[^>]+(href|src)=\"(https?:)?//", html, flags=re.I)
    assert not fetched, f"loads from a network: {fetched.group(0)}"


def test_a_passed_batch_has_a_summary_beside_its_data_docs(settings):
    stages.init_stores(settings)
    batch = harness.land_simulated_batch(settings, "initial")["batch_dir"]
    report = stages.ingest(settings, batch)
    page = settings.data_docs_dir / "summaries" / "initial.html"
    assert report["validation_summary"] == str(page) and page.is_file()
    html = page.read_text()
    _offline(html)
    body = _body(html)
    assert "Batch initial" in body and "passed" in body and "rejected" not in body
    assert "customers.csv" in body and "orders.csv" in body
    assert f"{report['loaded']['customers']:,} rows checked" in body


def test_a_refused_batch_names_file_column_rule_and_value_offline_and_in_its_quarantine(settings):
    stages.init_stores(settings)
    landed = Path(harness.land_simulated_batch(settings, "initial")["batch_dir"])
    bad = settings.raw_dir / "bad"
    bad.mkdir()
    customers = pd.read_csv(landed / "customers.csv", dtype=str)
    customers.loc[3, "customer_id"] = customers.loc[0, "customer_id"]  # a repeated id
    customers.to_csv(bad / "customers.csv", index=False)
    shutil.copy(landed / "coupons.csv", bad / "coupons.csv")
    repeated = stored_id(settings, customers.loc[0, "customer_id"])  # the rules see pseudonyms

    with pytest.raises(DataContractError) as err:
        stages.ingest(settings, bad)
    assert "validation_summary.html" in str(err.value)
    quarantined = err.value.quarantine_path / "validation_summary.html"
    latest = settings.data_docs_dir / "summaries" / "bad.html"
    for page in (quarantined, latest):
        html = page.read_text()
        _offline(html)
        html = _body(html)
        assert "Batch bad" in html and "rejected" in html
        assert "customers.csv" in html and "customer_id" in html and "unique" in html
        assert f"&#34;{repeated}&#34;" in html or f"&quot;{repeated}&quot;" in html  # the value, quoted
        # the rows the file has: 0-based data rows 0 and 3, CSV lines 2 and 5
        assert re.search(r"<td>5</td>", html), html[:3000]
