"""CLI mistakes get one clean line and exit code 2: bad budgets, unknown campaigns, unknown versions."""

from __future__ import annotations

import pandas as pd
import pytest

from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import session_scope
from tests.fixtures import one_error_line, run_cli

pytestmark = pytest.mark.unit


_cli = run_cli


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ("inf", "budget must be a finite number, got inf"),
        ("nan", "budget must be a finite number, got nan"),
        ("-5", "budget must be positive, got -5"),
    ],
)
def test_bad_budgets_get_their_own_message(ingested, budget, message):
    settings, engine = ingested
    with session_scope(engine) as s:
        before = q.table_counts(s)
    line = one_error_line(_cli("allocate", "--campaign", "c-bad", "--budget", budget))
    assert message in line and "concurrently" not in line
    with session_scope(engine) as s:
        assert q.table_counts(s) == before


def test_a_bad_budget_for_an_imported_log_is_refused_too(ingested, tmp_path):
    customers = tmp_path / "customers.csv"
    customers.write_text("customer_id,x\nu1,1\n")
    line = one_error_line(
        _cli(
            "allocate",
            "--log",
            "any",
            "--customers",
            customers,
            "--budget",
            "inf",
            "--out",
            tmp_path / "o.csv",
        )
    )
    assert "budget must be a finite number, got inf" in line


@pytest.mark.parametrize(
    "command", [["deliver", "--campaign"], ["report", "--campaign"], ["history", "--campaign"]]
)
def test_unknown_campaign_ids_are_named_with_the_known_ones(ingested, command):
    settings, engine = ingested
    line = one_error_line(_cli(*command, "nope"))
    assert "unknown campaign id 'nope'" in line and "holds no campaign yet" in line
    now = pd.Timestamp("2025-01-01", tz="UTC")
    with session_scope(engine) as s:
        for cid in ("cmp-a", "cmp-b"):
            s.add(
                m.Campaign(
                    campaign_id=cid,
                    created_at=now,
                    as_of=now,
                    budget=1.0,
                    objective="conversions",
                    status="allocated",
                    summary={},
                )
            )
    line = one_error_line(_cli(*command, "nope"))
    assert "unknown campaign id 'nope'" in line and "known campaign ids: cmp-a, cmp-b" in line


def test_report_of_a_known_campaign_is_not_replaced_by_another(ingested):
    settings, engine = ingested
    now = pd.Timestamp("2025-01-01", tz="UTC")
    with session_scope(engine) as s:
        for cid, created in (("old", now), ("new", now + pd.Timedelta(days=1))):
            s.add(
                m.Campaign(
                    campaign_id=cid,
                    created_at=created,
                    as_of=now,
                    budget=1.0,
                    objective="conversions",
                    status="allocated",
                    summary={},
                )
            )
    result = _cli("report", "--campaign", "old")
    assert result.exit_code == 0, result.output
    assert "old" in result.output


def test_promoting_an_unknown_version_names_the_model_and_its_versions(settings):
    line = one_error_line(_cli("promote", "99"))
    assert f"registered model {settings.registered_model_name!r} has no version '99'" in line
    assert "no versions" in line


@pytest.mark.parametrize("command", ["allocate", "plan"])
def test_an_unparseable_as_of_is_one_line_with_an_example(ingested, command):
    settings, engine = ingested
    with session_scope(engine) as s:
        before = q.table_counts(s)
    line = one_error_line(_cli(command, "--campaign", "c-when", "--as-of", "tomorrow"))
    assert line == "error: --as-of 'tomorrow' is not an ISO-8601 time, e.g. 2025-07-07T06:00:00Z"
    with session_scope(engine) as s:
        assert q.table_counts(s) == before


@pytest.mark.parametrize("budget", ["-5", "inf"])
def test_a_bad_budget_for_the_what_if_curve_is_refused(ingested, budget):
    line = one_error_line(_cli("plan", "--campaign", "c-plan", "--budget", "10", "--budget", budget))
    assert "budget must be" in line and budget in line


def test_history_json_of_an_unknown_campaign_isone_error_line(ingested):
    line = one_error_line(_cli("history", "--campaign", "nope", "--json"))
    assert "unknown campaign id 'nope'" in line


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("COUPONOPS_GATE__CONFIDENCE", "2", "COUPONOPS_GATE__CONFIDENCE='2': Input should be less than 1"),
        ("COUPONOPS_TRAINER__FAMILIES", '["forest"]', "COUPONOPS_TRAINER__FAMILIES__0='forest'"),
        ("COUPONOPS_TRAINER__FAMILIES", "forest", 'error parsing value for field "trainer"'),
    ],
)
@pytest.mark.parametrize("command", [("promote", "1"), ("history",), ("train",)])
def test_a_bad_setting_is_one_line_naming_the_variable(
    ingested, monkeypatch, variable, value, words, command
):
    monkeypatch.setenv(variable, value)
    line = one_error_line(_cli(*command))
    assert line.startswith("error: invalid settings: ") and words in line, line
