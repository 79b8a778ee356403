import pytest
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError

from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope

pytestmark = pytest.mark.unit

NOW = q.as_utc("2025-06-30").to_pydatetime()


def test_migration_creates_every_model_table(engine):
    tables = set(inspect(engine).get_table_names())
    assert set(m.Base.metadata.tables) <= tables
    assert "alembic_version" in tables


def test_upsert_is_keyed_by_natural_key(engine):
    rows = [dict(channel="email", send_cost=0.01, daily_capacity=10)]
    with session_scope(engine) as s:
        q.upsert_rows(s, m.Channel, rows)
        q.upsert_rows(s, m.Channel, rows)
        q.upsert_rows(s, m.Channel, [dict(channel="email", send_cost=0.02, daily_capacity=10)])
    with session_scope(engine) as s:
        assert q.table_counts(s)["channels"] == 1
        assert s.get(m.Channel, "email").send_cost == 0.02


def _campaign(s, budget=10.0):
    q.claim_campaign(
        s, campaign_id="c1", run_key="r1", owner="r1", as_of=NOW, budget=budget, objective="profit", now=NOW
    )


def test_database_refuses_to_overspend_a_campaign_budget(engine):
    with session_scope(engine) as s:
        _campaign(s)
        q.commit_spend(s, "c1", 9.5)
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        q.commit_spend(s, "c1", 1.0)
    with session_scope(engine) as s:
        assert s.get(m.Campaign, "c1").committed == pytest.approx(9.5)


def test_database_refuses_to_issue_beyond_inventory(engine):
    with session_scope(engine) as s:
        q.upsert_rows(
            s,
            m.Coupon,
            [
                dict(
                    coupon_id="X",
                    kind="fixed_amount",
                    face_value=5,
                    min_basket=0,
                    inventory=3,
                    valid_from=NOW,
                    valid_to=NOW,
                )
            ],
        )
        q.issue_coupons(s, {"X": 3})
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        q.issue_coupons(s, {"X": 1})


def test_coupons_are_issued_in_one_lock_order_whatever_the_counts_order(engine):
    """Two campaigns written at once must lock shared coupon rows in the same order (no deadlock)."""
    from sqlalchemy import event

    coupon = dict(kind="fixed_amount", face_value=5, min_basket=0, inventory=9, valid_from=NOW, valid_to=NOW)
    with session_scope(engine) as s:
        q.upsert_rows(s, m.Coupon, [dict(coupon, coupon_id=c) for c in ("A", "B", "C")])
    updated = []

    def record(conn, cursor, statement, params, context, executemany):
        if statement.lstrip().upper().startswith("UPDATE COUPONS"):
            updated.append(params[-1] if isinstance(params, tuple | list) else params)

    event.listen(engine, "before_cursor_execute", record)
    try:
        with session_scope(engine) as s:
            q.issue_coupons(s, {"C": 1, "A": 2, "B": 1})  # most-issued first, as value_counts() orders
    finally:
        event.remove(engine, "before_cursor_execute", record)
    assert updated == ["A", "B", "C"]


def test_a_second_run_cannot_take_a_campaign_held_by_another(engine):
    with session_scope(engine) as s:
        assert (
            q.claim_campaign(
                s, campaign_id="c1", run_key="a", owner="a", as_of=NOW, budget=1, objective="profit", now=NOW
            )
            == "new"
        )
    with pytest.raises(q.CampaignBusyError, match="being allocated by 'a'"), session_scope(engine) as s:
        q.claim_campaign(
            s, campaign_id="c1", run_key="b", owner="b", as_of=NOW, budget=1, objective="profit", now=NOW
        )


def test_checksums_change_with_content_and_not_with_reloads(engine):
    with session_scope(engine) as s:
        before = q.table_checksums(s)
        q.upsert_rows(s, m.Channel, [dict(channel="sms", send_cost=0.05, daily_capacity=5)])
    with session_scope(engine) as s:
        mid = q.table_checksums(s)
        q.upsert_rows(s, m.Channel, [dict(channel="sms", send_cost=0.05, daily_capacity=5)])
    with session_scope(engine) as s:
        after = q.table_checksums(s)
    assert before["channels"] != mid["channels"]
    assert mid == after


def test_sqlite_events_live_in_their_key_b_tree_and_survive_the_round_trip(tmp_path):
    """0006 clusters events on event_id (WITHOUT ROWID) keeping every row; downgrade undoes it."""
    from alembic import command
    from sqlalchemy import text

    from mlpkg.db.engine import alembic_config, make_engine, migrate

    url = f"sqlite:///{tmp_path / 'w.db'}"
    migrate(url, "0005_event_store")
    eng = make_engine(url)

    def events_ddl() -> str:
        with eng.connect() as conn:
            return conn.execute(text("SELECT sql FROM sqlite_master WHERE name = 'events'")).scalar_one()

    def rows() -> list:
        with eng.connect() as conn:
            return conn.execute(text("SELECT event_id, customer_id, category FROM events ORDER BY 1")).all()

    try:
        with eng.begin() as conn:
            conn.execute(text("INSERT INTO events VALUES"
                              " ('e2', 'c1', '2025-01-01 00:00:00.000000', 'search', 'x'),"
                              " ('e1', 'c2', '2025-01-02 00:00:00.000000', 'page_view', '')"))
        assert "WITHOUT ROWID" not in events_ddl()
        migrate(url)
        assert "WITHOUT ROWID" in events_ddl()
        assert rows() == [("e1", "c2", ""), ("e2", "c1", "x")]
        with pytest.raises(IntegrityError):
            with eng.begin() as conn:
                conn.execute(text("INSERT INTO events (event_id, customer_id, ts, event_type, category)"
                                  " VALUES ('e1', 'c9', '2025-01-03', 'search', '')"))
        eng.dispose()
        command.downgrade(alembic_config(url), "0005_event_store")
        assert "WITHOUT ROWID" not in events_ddl()
        assert rows() == [("e1", "c2", ""), ("e2", "c1", "x")]
    finally:
        eng.dispose()
