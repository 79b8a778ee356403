"""``couponops init`` against PostgreSQL with a password in the URL prints it masked.

The loopback PostgreSQL trusts local connections, so the password in the URL is accepted
and ignored: the command really migrates that database while its output must never show it.
"""

from __future__ import annotations

import os

import pytest
from sqlalchemy import create_engine, inspect

from mlpkg.config import get_settings

pytestmark = pytest.mark.integration

PASSWORD = "pg-Secret-4711"


def test_init_migrates_postgres_and_prints_the_url_masked(pg_url, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from mlpkg import cli

    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.chdir(tmp_path)
    database = pg_url.rsplit("/", 1)[1]
    url = f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:5432/{database}"
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("COUPONOPS_WAREHOUSE_URL", url)
    monkeypatch.setattr(cli.console, "width", 300)  # keep each URL on one line
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli.app, ["init"])
    finally:
        get_settings.cache_clear()

    assert result.exit_code == 0, result.output
    assert f"postgresql+psycopg://postgres:***@127.0.0.1:5432/{database}" in result.output
    assert PASSWORD not in result.output
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        assert "alembic_version" in inspect(engine).get_table_names()
    finally:
        engine.dispose()
