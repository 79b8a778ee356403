"""Real recipients: contacts.csv, its contract, the contacts table, delivery from it, and privacy.

Contact details (email address, phone number, push token) arrive in their own file and table.
Delivery reads them; a treated customer without a contact for the arm's channel is recorded as
skipped with the reason. Contact details never enter features, training frames, snapshots,
MLflow, the delivery summary or log lines.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow import MlflowClient
from sqlalchemy import event, select

from mlpkg import stages
from mlpkg.config import Settings
from mlpkg.data import customer_features, read_history, training_frame
from mlpkg.db import models as m
from mlpkg.db import queries as q
from mlpkg.db.engine import make_engine, session_scope
from mlpkg.delivery import deliver_campaign
from mlpkg.delivery.senders import recipient_digest
from mlpkg.privacy import pseudonym, pseudonym_key
from mlpkg.simulator import Shop, ShopConfig
from mlpkg.simulator import world as sim_world
from mlpkg.validation import DataContractError, ValidationContext, gate_batch
from mlpkg.validation.contract import EMAIL_PATTERN, PHONE_PATTERN, PUSH_TOKEN_PATTERN
from tests.fixtures import run_cli, shop_ids

pytestmark = pytest.mark.unit

CONTACT_COLUMNS = ["email", "phone", "push_token"]
CHANNEL_COLUMN = {"email": "email", "sms": "phone", "push": "push_token"}
SHOP = ShopConfig(seed=23, n_customers=300, history_days=90)
# Recognisable contact strings planted in the batch; none may leak out of the contacts table.
CANARY = {"email": "zq.canary.4242@example.com", "phone": "+15559994242", "push_token": "ptkcanaryzq4242beef"}


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# --- the simulator's export ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    shop = Shop(ShopConfig(seed=11, n_customers=1500))
    out = tmp_path_factory.mktemp("sim") / "initial"
    paths = shop.export_batch(out)
    return shop, out, paths


def test_simulator_writes_one_contact_row_per_customer_consistent_with_consent(exported):
    shop, out, paths = exported
    assert paths["contacts"] == out / "contacts.csv"
    contacts = read_csv(out / "contacts.csv")
    customers = read_csv(out / "customers.csv")
    assert list(contacts.columns) == ["customer_id", *CONTACT_COLUMNS, "updated_at"]
    assert contacts["customer_id"].tolist() == customers["customer_id"].tolist()

    has = contacts.set_index("customer_id")[CONTACT_COLUMNS] != ""
    rates = has.mean()
    # Most customers have an email address, fewer a phone number or a push token.
    assert rates["email"] > 0.9
    assert rates["phone"] < rates["email"] - 0.2 and rates["push_token"] < rates["email"]
    assert 0.4 < rates["phone"] < 0.7 and 0.5 < rates["push_token"] < 0.8
    # Whoever consented to a channel can be reached on it.
    consent = read_csv(out / "consent.csv")
    opted = consent[consent["opted_in"] == "1"]
    for channel, column in CHANNEL_COLUMN.items():
        ids = opted.loc[opted["channel"] == channel, "customer_id"]
        assert has.loc[ids, column].all(), channel

    emails = contacts.loc[has["email"].to_numpy(), ["customer_id", "email"]]
    parsed = emails["email"].str.extract(r"^([a-z]+)\.([a-z]+)\.(\d+)@example\.com$")
    assert parsed.notna().all().all()
    assert (parsed[2].astype(int) == emails["customer_id"].str[1:].astype(int)).all()
    assert emails["email"].is_unique
    for column, pattern in (("email", EMAIL_PATTERN), ("phone", PHONE_PATTERN),
                            ("push_token", PUSH_TOKEN_PATTERN)):
        values = contacts.loc[has[column].to_numpy(), column]
        assert values.str.match(pattern).all(), column
    assert contacts.loc[has["phone"].to_numpy(), "phone"].str.startswith("+1555").all()
    updated = pd.to_datetime(contacts["updated_at"], utc=True)
    assert (updated < shop.now).all() and (updated >= pd.Timestamp(shop.config.opened_at)).all()


def test_contacts_come_from_their_own_random_stream(tmp_path, exported, monkeypatch):
    _, first, _ = exported
    # Another contacts stream changes contacts.csv and nothing else, byte for byte.
    monkeypatch.setattr(sim_world, "_STREAM_CONTACTS", 301)
    Shop(ShopConfig(seed=11, n_customers=1500)).export_batch(tmp_path / "other")
    assert (tmp_path / "other" / "contacts.csv").read_bytes() != (first / "contacts.csv").read_bytes()
    for path in first.iterdir():
        if path.name != "contacts.csv":
            assert path.read_bytes() == (tmp_path / "other" / path.name).read_bytes(), path.name


def test_contacts_stay_the_same_across_batches_and_cover_new_customers(tmp_path):
    shop = Shop(ShopConfig(seed=11, n_customers=300))
    first = read_csv(shop.export_batch(tmp_path / "a")["contacts"])
    shop.advance(30)
    second = read_csv(shop.export_batch(tmp_path / "b", batch="b")["contacts"])
    assert len(second) > len(first)
    assert second.head(len(first)).equals(first)
    assert set(second["customer_id"]) == set(read_csv(tmp_path / "b" / "customers.csv")["customer_id"])


# --- the contract of contacts.csv ------------------------------------------------------------------

NOW = "2026-03-10T00:00:00Z"


def _contract_batch(root: Path, contacts: pd.DataFrame) -> Path:
    batch = root / "raw" / "batch-1"
    batch.mkdir(parents=True)
    pd.DataFrame({
        "customer_id": ["c1", "c2", "c3"],
        "signup_date": ["2025-02-01", "2025-03-15", "2025-06-30"],
        "region": ["north", "south", "east"],
        "device": ["ios", "android", "desktop"],
        "segment": ["new", "regular", "vip"],
    }).to_csv(batch / "customers.csv", index=False)
    contacts.to_csv(batch / "contacts.csv", index=False)
    return batch


def _contacts(changes: dict | None = None) -> pd.DataFrame:
    """Return a valid contacts file of customers c1..c3; ``changes[(row, column)]`` replaces a value."""
    frame = pd.DataFrame({
        "customer_id": ["c1", "c2", "c3"],
        "email": ["ann.lee.1@example.com", "", "bo+offers@mail.example.org"],
        "phone": ["+15550100001", "+447911123456", ""],
        "push_token": ["", "ExponentPushToken[xyz123456]", "f" * 64],
        "updated_at": ["2026-01-01T10:00:00Z"] * 3,
    })
    for (row, column), value in (changes or {}).items():
        frame.loc[row, column] = value
    return frame


def _gate(tmp_path: Path, batch: Path):
    return gate_batch(batch, context=ValidationContext(now=NOW, shop_opened="2025-01-01T00:00:00Z"),
                      quarantine_dir=tmp_path / "quarantine", data_docs_dir=tmp_path / "docs")


def test_valid_contacts_pass_and_blanks_mean_no_contact(tmp_path):
    result = _gate(tmp_path, _contract_batch(tmp_path, _contacts()))
    assert result.success, result.reports["contacts"].message()
    frame = result.frames["contacts"]
    assert frame.loc[1, "email"] == "" and frame.loc[2, "phone"] == ""
    assert str(frame["updated_at"].dt.tz) == "UTC"


BAD_CONTACTS = {
    "email-without-at": ({(0, "email"): "ann.lee.example.com"}, "email", "email must be an address",
                         "ann.lee.example.com", 2),
    "email-with-space": ({(2, "email"): "bo lee@example.com"}, "email", "email must be an address",
                         "bo lee@example.com", 4),
    "phone-not-e164": ({(1, "phone"): "555-0100"}, "phone", "E.164", "555-0100", 3),
    "push-token-too-short": ({(0, "push_token"): "abc"}, "push_token", "8 to 512 visible characters",
                             "abc", 2),
    "unknown-customer": ({(2, "customer_id"): "C_GHOST"}, "customer_id", "referential_integrity",
                         "C_GHOST", 4),
    "duplicate-customer": ({(2, "customer_id"): "c1"}, "customer_id", "customer_id must be unique", "c1", 4),
    "future-update": ({(1, "updated_at"): "2099-01-01T00:00:00Z"}, "updated_at",
                      "updated_at must lie between", "2099-01-01", 3),
    "unparseable-update": ({(0, "updated_at"): "yesterday"}, "updated_at", "parse_timestamp", "yesterday", 2),
}


@pytest.mark.parametrize("case", list(BAD_CONTACTS))
def test_bad_contacts_are_rejected_naming_file_line_column_rule_and_value(tmp_path, case):
    changes, column, rule, value, line = BAD_CONTACTS[case]
    contacts = _contacts(changes)
    batch = _contract_batch(tmp_path, contacts)
    with pytest.raises(DataContractError) as info:
        _gate(tmp_path, batch)
    message = str(info.value)
    assert "contacts.csv" in message and f"'{column}'" in message and rule in message, message
    assert value in message and f"line {line}" in message, message
    # The failing rows' other contact details stay out of the message.
    others = {v for c in CONTACT_COLUMNS if c != column for v in contacts[c] if v}
    assert [v for v in others if v in message] == []
    assert not batch.exists()  # quarantined


# --- an ingested shop with planted contacts ---------------------------------------------------------


def _settings(state: Path) -> Settings:
    return Settings(
        _env_file=None,
        state_dir=state,
        trainer={"max_epochs": 2, "batch_size": 512, "hidden_dim": 16, "head_dim": 8, "ensemble_members": 1},
        gate={"min_test_rows": 20},
    )


@pytest.fixture(scope="module")
def shop_template(tmp_path_factory):
    """A state folder holding a 300-customer shop ingested with canary contacts, and the canaries' owners."""
    root = tmp_path_factory.mktemp("contacts-shop")
    settings = _settings(root / "state")
    stages.init_stores(settings)
    batch = root / "landed" / "initial"
    Shop(SHOP).export_batch(batch)
    contacts = read_csv(batch / "contacts.csv")
    log = read_csv(batch / "campaign_log.csv")
    # Canary owners are in the past campaign, so their rows reach the training frame.
    owners = log["customer_id"].iloc[:3].tolist()
    for i, owner in enumerate(owners):
        row = contacts.index[contacts["customer_id"] == owner][0]
        for column, canary in CANARY.items():
            contacts.loc[row, column] = canary.replace("4242", f"42{i}2")
    contacts.to_csv(batch / "contacts.csv", index=False)
    report = stages.ingest(settings, batch)
    assert report["loaded"]["contacts"] == len(contacts)
    # The warehouse knows the owners by their pseudonyms (the shop's ids stay in contacts.external_id).
    key = pseudonym_key(settings)
    return root / "state", [pseudonym(key, o) for o in owners]


def canaries(owners) -> list[str]:
    return [c.replace("4242", f"42{i}2") for i in range(len(owners)) for c in CANARY.values()]


@pytest.fixture
def shop_state(tmp_path, shop_template, monkeypatch):
    """Settings and engine over a private copy of the ingested shop."""
    from mlpkg.config import get_settings

    template, owners = shop_template
    for key in list(os.environ):
        if key.startswith("COUPONOPS_"):
            monkeypatch.delenv(key, raising=False)
    state = tmp_path / "state"
    shutil.copytree(template, state)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(state))
    get_settings.cache_clear()
    settings = _settings(state)
    engine = make_engine(settings.resolved_warehouse_url)
    yield settings, engine, owners
    engine.dispose()
    get_settings.cache_clear()


def test_ingest_loads_contacts_with_blanks_as_null_and_reloads_change_nothing(shop_state, tmp_path):
    settings, engine, owners = shop_state
    with session_scope(engine) as s:
        rows = {c.customer_id: c for c in s.scalars(select(m.Contact))}
        n_customers = len(q.known_ids(s, m.Customer.customer_id))
    assert len(rows) == n_customers == SHOP.n_customers
    assert rows[owners[0]].email == "zq.canary.4202@example.com" and rows[owners[0]].phone == "+15559994202"
    assert any(c.phone is None for c in rows.values()) and all(c.email != "" for c in rows.values())
    # The same file again is skipped by checksum; a changed contact is an upsert, not a second row.
    assert all(c.external_id and c.customer_id.startswith("psn-") for c in rows.values())
    batch = tmp_path / "again"
    Shop(SHOP).export_batch(batch)
    contacts = read_csv(batch / "contacts.csv")
    contacts.loc[contacts["customer_id"] == shop_ids(engine)[owners[1]], "email"] = ""
    contacts.to_csv(batch / "contacts.csv", index=False)
    report = stages.ingest(settings, batch)
    assert report["loaded"] == {"contacts": len(contacts)}
    with session_scope(engine) as s:
        assert s.get(m.Contact, owners[1]).email is None
        assert len(q.known_ids(s, m.Contact.customer_id)) == SHOP.n_customers


_cli = run_cli


def test_bad_contacts_file_is_rejected_through_the_cli_and_changes_nothing(shop_state, tmp_path):
    settings, engine, _ = shop_state
    batch = tmp_path / "bad"
    batch.mkdir()
    Shop(SHOP).export_batch(tmp_path / "src")
    frame = read_csv(tmp_path / "src" / "contacts.csv")
    frame.loc[5, "phone"] = "call me maybe"
    frame.to_csv(batch / "contacts.csv", index=False)
    with session_scope(engine) as s:
        before = q.table_checksums(s)

    result = _cli("ingest", batch)

    assert result.exit_code == 2, result.output
    flat = "".join(result.output.split())
    for part in ("rejected by the data contract", "contacts.csv", "'phone'", "E.164", "call me maybe",
                 "line 7"):
        assert "".join(part.split()) in flat, result.output
    assert "Traceback" not in result.output
    with session_scope(engine) as s:
        assert q.table_checksums(s) == before
    assert not batch.exists()


# --- delivery reads the contacts table ------------------------------------------------------------


T0 = datetime(2025, 7, 1, 9, 0, tzinfo=UTC)


def _campaign(engine, campaign_id: str, arms: dict[str, str]) -> None:
    """Allocate a coupon through the given channel to each customer (plus a control row if possible)."""
    with session_scope(engine) as s:
        coupon = s.scalars(select(m.Coupon.coupon_id).order_by(m.Coupon.coupon_id)).first()
        if coupon is None:
            coupon = "PCT10"
            s.add(m.Coupon(coupon_id=coupon, kind="percent_off", face_value=10, min_basket=0, inventory=100,
                           issued=0, valid_from=T0, valid_to=T0 + timedelta(days=30)))
        s.add(m.Campaign(campaign_id=campaign_id, created_at=T0, as_of=T0, budget=100.0, committed=0.0,
                         objective="profit", status="allocated", summary={}))
        s.flush()
        for customer_id, channel in arms.items():
            s.add(m.Allocation(campaign_id=campaign_id, customer_id=customer_id, arm=f"{coupon}@{channel}",
                               coupon_id=coupon, channel=channel, policy="model", propensity=0.9,
                               created_at=T0))
        control = s.scalars(select(m.Customer.customer_id).where(m.Customer.customer_id.not_in(arms))).first()
        if control is not None:
            s.add(m.Allocation(campaign_id=campaign_id, customer_id=control, arm="control", policy="control",
                               propensity=0.1, created_at=T0))


def _contact_table(engine) -> pd.DataFrame:
    with engine.connect() as conn:
        return pd.read_sql(select(m.Contact), conn).set_index("customer_id")


def test_delivery_sends_to_real_contacts_and_skips_customers_without_one(shop_state, caplog):
    settings, engine, owners = shop_state
    contacts = _contact_table(engine)
    pool = contacts.drop(index=owners)
    no_phone = pool.index[pool["phone"].isna()][:4].tolist()
    no_push = pool.index[pool["push_token"].isna() & pool["phone"].notna()][:3].tolist()
    # Delivery sends only to customers opted in to the channel as of the send: the canary's owner
    # opts in to email, the others with every contact are picked among those opted in everywhere.
    with session_scope(engine) as s:
        q.record_consent_events(s, [dict(customer_id=owners[0], channel="email", opted_in=True,
                                         updated_at=T0 - timedelta(days=1))])
        consented = q.consent_as_of(s, T0)
    everywhere = set.intersection(*(consented.get(ch, set()) for ch in CHANNEL_COLUMN))
    with_all = [c for c in pool.dropna().index if c in everywhere][:5]
    arms = {
        **{c: "sms" for c in no_phone},
        **{c: "push" for c in no_push},
        **{c: ch for c, ch in zip(with_all, ["email", "sms", "push", "email", "sms"], strict=True)},
        owners[0]: "email",
    }
    _campaign(engine, "cmp-contacts", arms)

    with caplog.at_level(logging.DEBUG):
        result = deliver_campaign(engine, "cmp-contacts", settings, T0)

    with session_scope(engine) as s:
        rows = {d.customer_id: d for d in s.scalars(select(m.Delivery))}
    assert set(rows) == set(arms)  # one row per treated customer, none for control
    for customer_id, channel in arms.items():
        row = rows[customer_id]
        address = contacts.loc[customer_id, CHANNEL_COLUMN[channel]]
        if customer_id in no_phone or customer_id in no_push:
            assert (row.status, row.attempts) == ("skipped", 0)
            assert row.last_error == f"no {channel} contact"
        else:
            # The address was read from contacts at send time; the row does not keep it.
            assert row.status == "sent" and address not in repr(row.payload)
    assert rows[owners[0]].status == "sent"
    assert result["skipped"] == len(no_phone) + len(no_push) and result["sent"] == len(with_all) + 1
    assert result["skipped_reasons"] == {"no push contact": len(no_push), "no sms contact": len(no_phone)}
    assert result["campaign_status"] == "delivered"

    # The file channel's messages are the messages: each names its address by digest, never in clear.
    written = {p.name for p in settings.outbox_dir.glob("*.json")}
    assert len(written) == result["sent"]
    files = "".join(p.read_text() for p in settings.outbox_dir.glob("*.json"))
    assert recipient_digest("zq.canary.4202@example.com") in files and "zq.canary" not in files
    # The summary and the log lines carry counts, never an address.
    addresses = [a for c in arms for a in contacts.loc[c, CONTACT_COLUMNS].dropna()]
    text = repr(result) + "\n".join(r.getMessage() for r in caplog.records)
    assert [a for a in addresses if a in text] == []
    assert any("skipped" in r.getMessage() for r in caplog.records)


def test_a_shop_without_contacts_gets_every_treated_customer_skipped(settings, engine, tmp_path):
    batch = tmp_path / "no-contacts"
    Shop(ShopConfig(seed=5, n_customers=120)).export_batch(batch)
    (batch / "contacts.csv").unlink()
    stages.ingest(settings, batch)
    with session_scope(engine) as s:
        ids = sorted(q.known_ids(s, m.Customer.customer_id))[:6]
        assert s.scalars(select(m.Contact)).first() is None
    arms = dict(zip(ids, ["email", "sms", "push"] * 2, strict=True))
    _campaign(engine, "cmp-blind", arms)

    result = deliver_campaign(engine, "cmp-blind", settings, T0)

    assert result["enqueued"] == 6 and result["skipped"] == 6 and result["sent"] == 0
    assert result["skipped_reasons"] == {"no email contact": 2, "no push contact": 2, "no sms contact": 2}
    assert result["campaign_status"] == "delivered"
    assert not list(settings.outbox_dir.glob("*.json"))  # nothing sent, no invented addresses
    with session_scope(engine) as s:
        assert {d.status for d in s.scalars(select(m.Delivery))} == {"skipped"}


# --- privacy: contacts never reach features, training, snapshots or MLflow ---------------------------


class _Statements:
    """Record every SQL statement an engine runs."""

    def __init__(self, engine) -> None:
        self.sql: list[str] = []
        self.engine = engine

    def __enter__(self):
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self

    def __exit__(self, *exc):
        event.remove(self.engine, "before_cursor_execute", self._record)

    def _record(self, conn, cursor, statement, parameters, context, executemany):
        self.sql.append(statement)


def _assert_clean(frame: pd.DataFrame, secrets: list[str]) -> None:
    """Assert that no column is a contact column and no cell holds (or embeds) a contact string."""
    assert not set(frame.columns) & set(CONTACT_COLUMNS), list(frame.columns)
    text = "\n".join(map(str, frame.to_numpy().ravel().tolist()))
    assert [s for s in secrets if s in text] == []


def test_features_and_training_frames_never_read_the_contacts_table(shop_state):
    settings, engine, owners = shop_state
    secrets = canaries(owners)
    as_of = datetime(2025, 6, 30, tzinfo=UTC)
    with _Statements(engine) as seen:
        history = read_history(engine, as_of)
        features = customer_features(engine, as_of)
        frame = training_frame(engine)
    assert seen.sql and not [s for s in seen.sql if re.search(r"\bcontacts\b", s)]
    assert "contacts" not in history
    for table in history.values():
        _assert_clean(table, secrets)
    _assert_clean(features, secrets)
    _assert_clean(frame, secrets)
    assert set(owners) <= set(frame["customer_id"])  # the canaries' owners were there to leak


def _files_with(root: Path, secrets: list[str]) -> dict[str, list[str]]:
    """Return files under ``root`` whose bytes (or Parquet values) contain any secret."""
    found = {}
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        data = path.read_bytes()
        hits = [s for s in secrets if s.encode() in data]
        if path.suffix == ".parquet":
            table = pq.read_table(path).to_pandas()
            text = "\n".join(map(str, [*table.columns, *table.to_numpy().ravel().tolist()]))
            hits += [s for s in secrets if s in text]
        if hits:
            found[str(path.relative_to(root))] = sorted(set(hits))
    return found


@pytest.mark.model
@pytest.mark.slow
def test_training_snapshots_and_mlflow_hold_no_contact_details(shop_state):
    settings, engine, owners = shop_state
    secrets = canaries(owners)
    # The scan does see secrets where they are: the warehouse holds them (in its file or its WAL).
    assert any(k.startswith("warehouse.db") for k in _files_with(settings.state_dir, secrets))

    result = stages.train(settings, stages.RunContext(run_id="privacy"))

    assert result["model_version"]
    snapshots = sorted((settings.state_dir / "snapshots").glob("*.parquet"))
    assert len(snapshots) >= 2  # the training snapshot and its test frame
    # Artifacts (runs' and logged models') live where the experiment says; for a copied state
    # folder that is the original's.
    client = MlflowClient(tracking_uri=settings.resolved_tracking_uri)
    experiment = client.get_experiment(client.get_run(result["mlflow_run_id"]).info.experiment_id)
    artifacts = Path(urlparse(experiment.artifact_location).path)
    [mlmodel] = list(artifacts.rglob("MLmodel"))
    inputs = [c["name"] for c in json.loads(yaml.safe_load(mlmodel.read_text())["signature"]["inputs"])]
    assert "segment" in inputs and not set(inputs) & set(CONTACT_COLUMNS)
    assert (settings.state_dir / "mlflow.db").exists()
    # Everything else in the state folder (MLflow's database, the snapshots, Data Docs) and the
    # run's artifacts (model, input example, metrics) are free of contact details.
    found = _files_with(settings.state_dir, secrets)
    leaks = {k: v for k, v in found.items() if not k.startswith("warehouse.db")}
    assert leaks == {} and _files_with(artifacts, secrets) == {}
    [training] = [p for p in snapshots if p.name == f"{result['snapshot_id']}.parquet"]
    assert pd.read_parquet(training)["customer_id"].isin(owners).any()


class _QuotingSender:
    """A receiver whose errors quote the address, as SMTP servers do (``550 <a@b>: no such user``)."""

    def __init__(self) -> None:
        self.calls = 0

    def send(self, message):
        from mlpkg.delivery import PermanentSendError, RetryableSendError

        self.calls += 1
        if message.dedup_key.endswith(":r1:email"):
            raise RetryableSendError(f"451 <{message.recipient}>: mailbox busy")
        if message.dedup_key.endswith(":r2:email"):
            raise ValueError(f"bug while sending to {message.recipient}")
        raise PermanentSendError(f"550 <{message.recipient}>: no such user")

    def close(self) -> None:
        return None


def test_log_lines_of_failed_sends_name_the_delivery_not_the_address(engine, settings, caplog):
    from tests.fixtures import plant_contacts, planted_contact

    ids = ["r0", "r1", "r2"]
    with session_scope(engine) as s:
        plant_contacts(s, ids)
    _campaign(engine, "cmp-errors", dict.fromkeys(ids, "email"))
    with caplog.at_level(logging.DEBUG):
        result = deliver_campaign(engine, "cmp-errors", settings, T0, senders={"email": _QuotingSender()},
                                  max_wait_seconds=0)
    assert result["bounced"] == 1 and result["dispatched"]["retried"] == 2
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "cmp-errors:r0:email" in logged and "<recipient>" in logged
    assert [c for c in ids if planted_contact(c, "email") in logged] == []
    with session_scope(engine) as s:  # the outbox row keeps the receiver's answer, without the address
        bounced = s.scalar(select(m.Delivery).where(m.Delivery.customer_id == "r0"))
        assert planted_contact("r0", "email") not in bounced.last_error
        assert bounced.last_error == "550 <<recipient>>: no such user"
