"""Test helpers shared by several test modules (an oracle scorer, the CLI runner, the demo's environment)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd


class OracleScorer:
    """Scores customers with the simulator's ground truth (a perfect model, for allocation tests)."""

    def __init__(self, shop):
        self.shop = shop
        self.arms = list(shop.arm_names)

    def score_arrays(self, df: pd.DataFrame, chunk_size: int | None = None) -> dict[str, np.ndarray]:
        ids = df["customer_id"].astype(str).tolist()
        return {
            "p_conv": self.shop.true_conversion(ids).astype(np.float32),
            "revenue": self.shop.true_revenue(ids).astype(np.float32),
        }


def use_oracle(monkeypatch, shop) -> None:
    """Make allocation load the oracle scorer instead of an MLflow model."""
    import mlpkg.registry

    monkeypatch.setattr(
        mlpkg.registry, "load_uplift_model", lambda uri, tracking_uri=None: OracleScorer(shop)
    )


def planted_contact(customer_id: str, channel: str) -> str:
    """Return the planted address of a test customer on a channel (recognisable, valid format)."""
    import zlib

    if channel == "email":
        return f"{customer_id.lower()}@planted.example"
    if channel == "sms":
        return f"+1555{zlib.crc32(customer_id.encode()) % 10**7:07d}"
    return f"ptk-{customer_id}-{zlib.crc32(customer_id.encode()):08x}"


def plant_contacts(session, customer_ids, channels=("email", "sms", "push"), consent=True) -> None:
    """Add customers (if missing) with planted contacts on ``channels`` only (others left empty).

    With ``consent`` the customers are also opted in to those channels (dated 2025-01-01), as a
    shop's customers who gave an address for marketing are: delivery sends only to them.
    """
    from datetime import UTC, date, datetime

    from mlpkg.db import queries as q
    from mlpkg.db.models import Channel, Contact, Customer

    for cid in customer_ids:
        session.merge(
            Customer(
                customer_id=cid, signup_date=date(2025, 1, 1), region="north", device="ios", segment="regular"
            )
        )
    session.flush()  # without a relationship() the unit of work does not order the two tables
    columns = {"email": "email", "sms": "phone", "push": "push_token"}
    for cid in customer_ids:
        values = {columns[ch]: planted_contact(cid, ch) for ch in channels}
        session.merge(Contact(customer_id=cid, updated_at=datetime(2025, 1, 1, tzinfo=UTC), **values))
    if consent:
        for ch in channels:  # consent rows point at the channel
            if session.get(Channel, ch) is None:
                session.add(Channel(channel=ch, send_cost=0.01, daily_capacity=100_000))
        session.flush()
        q.record_consent_events(
            session,
            [
                dict(customer_id=cid, channel=ch, opted_in=True, updated_at=datetime(2025, 1, 1, tzinfo=UTC))
                for cid in customer_ids
                for ch in channels
            ],
        )


def one_error_line(result) -> str:  # noqa: ANN001 - a typer Result
    """Return the CLI's one ``error:`` line, asserting exit code 2, that line alone and no traceback."""
    assert result.exit_code == 2, result.output
    # MLflow logs the creation of a fresh tracking store on first use; that is not the CLI speaking.
    lines = [ln for ln in result.output.splitlines() if ln.strip() and " INFO mlflow." not in ln]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def run_cli(*args):  # noqa: ANN002, ANN201 - CLI words; a typer Result
    """Invoke ``couponops`` in-process with fresh settings (read from the environment) before and after."""
    from typer.testing import CliRunner

    from mlpkg.cli import app
    from mlpkg.config import get_settings

    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()


def demo_env() -> dict[str, str]:
    """The environment of the tests' `make demo` run: this process's, without CouponOps/Airflow/MLflow
    settings, and a small shop (1,500 customers, 4 epochs) so the loop runs in about two minutes."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COUPONOPS_", "AIRFLOW", "MLFLOW"))}
    env.update(
        COUPONOPS_SIMULATOR_CUSTOMERS="1500",
        COUPONOPS_TRAINER__MAX_EPOCHS="4",
        COUPONOPS_TRAINER__ENSEMBLE_MEMBERS="1",
        COUPONOPS_CAMPAIGN__BUDGET="120",
        COUPONOPS_GATE__MIN_TEST_ROWS="50",
        COUPONOPS_CAMPAIGN__SCORE_SHARDS="3",
    )
    return env


def gate_numbers(value=0.040, other=0.040, gain_se=0.001, calibration=0.01, limit=0.06, rows=1000) -> dict:
    """Return numbers shaped like ``mlpkg.gate.evaluate``'s: a challenger of ``value`` against ``other``."""
    gain = value - other
    return {
        "challenger_value": value,
        "challenger_stderr": 0.004,
        "other_value": other,
        "other_stderr": 0.004,
        "gain": gain,
        "gain_stderr": gain_se,
        "gain_lcb": gain - 1.2816 * gain_se,
        "gain_ucb": gain + 1.2816 * gain_se,
        "snips_gain": gain,
        "challenger_vs_control": value - 0.03,
        "other_vs_control": other - 0.03,
        "calibration_error": calibration,
        "calibration_limit": limit,
        "test_rows": rows,
        "test_customers": rows,
        "challenger_treated": 300,
        "other_treated": 300.0,
        "challenger_spend": 150.0,
        "other_spend": 150.0,
        "budget": 150.0,
    }


def shop_ids(engine) -> dict[str, str]:  # noqa: ANN001 - a SQLAlchemy Engine
    """Return each stored customer's pseudonym -> the shop's own id (kept only in ``contacts.external_id``).

    Tests that write a shop export from what the warehouse holds need the shop's ids back: the
    warehouse stores pseudonyms everywhere else (see mlpkg.privacy).
    """
    from sqlalchemy import select

    from mlpkg.db import models as m

    with engine.connect() as conn:
        rows = conn.execute(select(m.Contact.customer_id, m.Contact.external_id)).all()
    return {psn: shop for psn, shop in rows if shop is not None}


def stored_id(settings, customer_id):  # noqa: ANN001, ANN201 - Settings; a str or a list of them
    """Return the id(s) the warehouse stores for shop customer id(s): their keyed pseudonyms."""
    from mlpkg.privacy import pseudonym_key
    from mlpkg.privacy import stored_id as _stored_id

    key = pseudonym_key(settings)
    if isinstance(customer_id, str):
        return _stored_id(key, customer_id)
    return [_stored_id(key, str(c)) for c in customer_id]


ATTRIBUTION_ARMS = ["control", "PCT10@email"]
ATTRIBUTION_NUMERIC = ["drive", "baseline_only", "noise"]
ATTRIBUTION_CATEGORICAL = ["segment"]


def planted(
    n: int = 8000, seed: int = 0, driver: str = "drive", arms: list[str] | None = None
) -> pd.DataFrame:
    """Logged rows whose uplift depends on ``driver`` only; ``baseline_only`` moves conversion, not uplift.

    With more than one treatment arm, arm ``k`` of ``K`` gets ``k / K`` of the planted lift.
    """
    arms = arms or ATTRIBUTION_ARMS
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "drive": rng.normal(size=n),
            "baseline_only": rng.normal(size=n),
            "noise": rng.normal(size=n),
            "segment": rng.choice(["new", "regular", "vip", "lapsed"], size=n),
            "arm": rng.choice(arms, size=n),
            "propensity": 1.0 / len(arms),
        }
    )
    base = 0.10 + 0.08 * np.tanh(frame["baseline_only"].to_numpy())
    if driver == "drive":
        lift = 0.30 / (1 + np.exp(-3 * frame["drive"].to_numpy()))
    else:
        lift = np.where(frame["segment"].to_numpy() == "vip", 0.35, 0.0)
    share = frame["arm"].map({a: k / (len(arms) - 1) for k, a in enumerate(arms)}).to_numpy()
    p = base + share * lift
    frame["converted"] = (rng.random(n) < p).astype(np.int64)
    frame["revenue"] = frame["converted"] * 50.0
    return frame
