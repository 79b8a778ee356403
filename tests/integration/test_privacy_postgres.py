"""Forget on PostgreSQL: one transaction erases a customer and keeps the ledger totals; 0007 round-trips."""

import pandas as pd
import pytest
from alembic import command
from sqlalchemy import inspect, select

from mlpkg import privacy, stages
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import alembic_config, make_engine, session_scope
from mlpkg.delivery import deliver_campaign
from mlpkg.simulator.lab import harness
from tests.unit.test_privacy import T0, _ledger, _rows_naming, _totals

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_shop(pg_url, tmp_path):
    from mlpkg.config import Settings

    settings = Settings(
        _env_file=None, state_dir=tmp_path / "state", warehouse_url=pg_url, simulator_customers=300
    )
    stages.init_stores(settings)
    stages.ingest(settings, harness.land_simulated_batch(settings, "initial")["batch_dir"])
    engine = make_engine(pg_url)
    yield settings, engine
    engine.dispose()


def test_forget_on_postgresql_erases_the_customer_and_keeps_the_ledger_totals(pg_shop):
    settings, engine = pg_shop
    contacts = pd.read_csv(settings.raw_dir / "initial" / "contacts.csv", dtype=str).dropna(subset=["email"])
    shop = contacts["customer_id"].iloc[:3].tolist()
    key = privacy.pseudonym_key(settings)
    customers = [privacy.pseudonym(key, c) for c in shop]
    _ledger(engine, customers)
    deliver_campaign(engine, "cmp-priv", settings, T0)
    with session_scope(engine) as s:
        email = s.get(m.Contact, customers[0]).email
    before = _totals(engine)

    result = stages.forget(settings, shop[0], reason="pg request", actor="test", now=T0)

    assert result["status"] == "forgotten" and result["deleted"]["customers"] == 1
    assert _totals(engine) == before
    for value in (customers[0], shop[0], email):
        assert _rows_naming(engine, value) == {}, value
    again = stages.forget(settings, shop[0], reason="pg request", actor="test", now=T0)
    assert again["status"] == "already forgotten"
    with pytest.raises(privacy.PrivacyError, match="unknown customer id"):
        stages.forget(settings, "NOBODY", reason="x", actor="test", now=T0)
    with session_scope(engine) as s:
        assert [a.pseudonym for a in q.privacy_audit_rows(s)] == [customers[0]]
        assert s.scalar(select(m.Customer).where(m.Customer.customer_id == customers[1])) is not None


def test_migration_0007_round_trips_on_postgresql(pg_url):
    cfg = alembic_config(pg_url)
    command.upgrade(cfg, "head")
    command.downgrade(cfg, "0006_events_without_rowid")
    engine = make_engine(pg_url)
    try:
        tables = inspect(engine).get_table_names()
        assert "privacy_audit" not in tables
        assert "recipient" in {c["name"] for c in inspect(engine).get_columns("deliveries")}
        command.upgrade(cfg, "head")
        engine.dispose()
        insp = inspect(engine)
        assert "privacy_audit" in insp.get_table_names()
        assert "external_id" in {c["name"] for c in insp.get_columns("contacts")}
        assert "recipient" not in {c["name"] for c in insp.get_columns("deliveries")}
    finally:
        engine.dispose()
