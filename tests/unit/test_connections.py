"""Airflow connections of the standard types become CouponOps settings; no password is ever shown.

Connections are real ``airflow.sdk.Connection`` / ``airflow.models.Connection`` objects built from
the URIs and fields an operator would enter, and ``settings()`` reads them from ``AIRFLOW_CONN_*``
environment variables exactly as a task does.
"""

from __future__ import annotations

import base64
import json
import os
from urllib.parse import quote

import httpx
import pytest
from pydantic import SecretStr, ValidationError
from sqlalchemy.engine import make_url

from mlpkg.config import Settings, get_settings, mask_url, public_dict
from mlpkg.delivery import WebhookSender, build_senders
from mlpkg.delivery.senders import OutboundMessage, SenderSetupError
from plugins.couponops_connections import (
    ConnectionSettingsError,
    mlflow_credentials_env,
    mlflow_overrides,
    smtp_overrides,
    sqlalchemy_url,
    webhook_overrides,
)

pytestmark = pytest.mark.unit

SECRET = "p@ss/w:rd?"  # characters that must be quoted inside a URL


def sdk_conn(uri: str | None = None, **fields):  # noqa: ANN003, ANN201
    from airflow.sdk import Connection

    if uri is not None:
        return Connection.from_uri(uri, conn_id="test_conn")
    if isinstance(fields.get("extra"), dict):
        fields["extra"] = json.dumps(fields["extra"])
    return Connection(conn_id="test_conn", **fields)


def model_conn(uri: str):  # noqa: ANN201
    from airflow.models import Connection

    return Connection(conn_id="test_conn", uri=uri)


# --- SQL connections ---------------------------------------------------------------------------------


@pytest.mark.parametrize("build", [sdk_conn, model_conn], ids=["airflow.sdk", "airflow.models"])
def test_standard_postgres_uri_becomes_a_psycopg_url_with_quoted_credentials(build):
    conn = build(
        "postgres://shop%40ops:p%40ss%2Fw%3Ard%3F@db.example:5432/warehouse?sslmode=require&cursor=dictcursor"
    )
    url = sqlalchemy_url(conn, "couponops_warehouse")
    assert url.startswith("postgresql+psycopg://")
    parsed = make_url(url)
    assert (parsed.drivername, parsed.username, parsed.password) == ("postgresql+psycopg", "shop@ops", SECRET)
    assert (parsed.host, parsed.port, parsed.database) == ("db.example", 5432, "warehouse")
    # libpq options survive; a hook-only extra (PostgresHook's cursor) would make psycopg fail.
    assert dict(parsed.query) == {"sslmode": "require"}


def test_postgresql_fields_without_port_and_a_driver_in_the_type():
    conn = sdk_conn(conn_type="postgresql", host="10.0.0.5", login="u", password=SECRET, schema="db")
    assert make_url(sqlalchemy_url(conn, "c")).port is None
    typed = sdk_conn("postgresql+psycopg2://u:pw@h:6432/db")
    assert sqlalchemy_url(typed, "c") == "postgresql+psycopg2://u:pw@h:6432/db"


def test_sqlite_and_mysql_connections():
    assert (
        sqlalchemy_url(sdk_conn("sqlite:////var/lib/couponops/w.db"), "c")
        == "sqlite:////var/lib/couponops/w.db"
    )
    # SqliteHook's form keeps the path in host.
    assert sqlalchemy_url(sdk_conn(conn_type="sqlite", host="/tmp/w.db"), "c") == "sqlite:////tmp/w.db"
    mysql = sqlalchemy_url(sdk_conn("mysql://u:p%40ss@h:3306/shop?charset=utf8mb4&cursor=sscursor"), "c")
    assert mysql == "mysql+pymysql://u:p%40ss@h:3306/shop?charset=utf8mb4"
    assert make_url(mysql).password == "p@ss"


@pytest.mark.parametrize(
    ("conn", "needle"),
    [
        ({"conn_type": "http", "host": "h"}, "'http' is not a SQL database"),
        ({"conn_type": "postgres", "login": "u"}, "needs a host"),
        ({"conn_type": "sqlite"}, "file path"),
    ],
)
def test_unusable_sql_connections_name_the_connection(conn, needle):
    with pytest.raises(ConnectionSettingsError, match=needle) as err:
        sqlalchemy_url(sdk_conn(**conn), "couponops_warehouse")
    assert "'couponops_warehouse'" in str(err.value)


def test_mlflow_connection_http_https_and_database():
    https = sdk_conn(conn_type="http", host="mlflow.example", port=5000, schema="https")
    assert mlflow_overrides(https, "m") == {"mlflow_tracking_uri": "https://mlflow.example:5000"}
    plain = sdk_conn("http://mlflow.example:5000")
    assert mlflow_overrides(plain, "m") == {"mlflow_tracking_uri": "http://mlflow.example:5000"}
    # The login goes to MLflow's own variables, never into the URL MLflow prints in run links.
    behind_proxy = sdk_conn("https://ops:pw-123456@tools.example/mlflow")
    assert mlflow_overrides(behind_proxy, "m") == {"mlflow_tracking_uri": "https://tools.example/mlflow"}
    assert mlflow_credentials_env(behind_proxy) == {
        "MLFLOW_TRACKING_USERNAME": "ops",
        "MLFLOW_TRACKING_PASSWORD": "pw-123456",
    }
    token = sdk_conn(conn_type="https", host="tools.example", password="tok-123456")
    assert mlflow_credentials_env(token) == {"MLFLOW_TRACKING_TOKEN": "tok-123456"}
    db_conn = sdk_conn("postgres://u:pw@db:5432/mlflow")
    assert mlflow_overrides(db_conn, "m") == {
        "mlflow_tracking_uri": "postgresql+psycopg://u:pw@db:5432/mlflow"
    }
    assert mlflow_credentials_env(db_conn) == {}
    with pytest.raises(ConnectionSettingsError, match="'couponops_mlflow'.*'smtp'"):
        mlflow_overrides(sdk_conn(conn_type="smtp", host="h"), "couponops_mlflow")


# --- webhook connections -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("conn", "url"),
    [
        # The HTTP provider's form: schema holds the scheme, an endpoint extra holds the path.
        (
            dict(
                conn_type="http",
                host="gw.example",
                port=8443,
                schema="https",
                extra={"endpoint": "/sms/send"},
            ),
            "https://gw.example:8443/sms/send",
        ),
        # A URI keeps its path, which Airflow files under schema.
        ("https://gw.example:8443/v1/sms", "https://gw.example:8443/v1/sms"),
        ("http://127.0.0.1:9100/hooks/sms", "http://127.0.0.1:9100/hooks/sms"),
        # HttpHook's documented URI form puts the scheme where the path would be.
        ("http://gw.example:80/https", "https://gw.example:80"),
        # A host holding a whole URL (generic connection), plus an endpoint.
        (
            dict(conn_type="generic", host="https://gw.example/api", extra={"endpoint": "push"}),
            "https://gw.example/api/push",
        ),
    ],
)
def test_webhook_connections_keep_scheme_host_port_and_path(conn, url):
    c = sdk_conn(conn) if isinstance(conn, str) else sdk_conn(**conn)
    assert webhook_overrides(c, "couponops_sms", "sms") == {"sms_webhook_url": url, "sms_webhook_token": None}


def test_webhook_login_is_basic_auth_and_a_lone_password_a_bearer_token():
    basic = webhook_overrides(sdk_conn(f"https://ops:{quote(SECRET, safe='')}@gw.example/sms"), "c", "sms")
    assert basic["sms_webhook_token"] is None
    assert httpx.URL(basic["sms_webhook_url"]).password == SECRET
    token = webhook_overrides(
        sdk_conn(conn_type="https", host="push.example", schema="v2/send", password="tok-123456"), "c", "push"
    )
    assert token == {"push_webhook_url": "https://push.example/v2/send", "push_webhook_token": "tok-123456"}


def test_webhook_sender_sends_basic_auth_or_bearer_and_never_shows_the_password():
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("Authorization")))
        return httpx.Response(401 if len(seen) == 3 else 200, json={"id": "gw-1"})

    client = httpx.Client(transport=httpx.MockTransport(handler))
    basic = WebhookSender("https://ops:hunter2-secret@gw.example/sms", client=client)
    bearer = WebhookSender("https://gw.example/push", client=client, token="tok-123456")
    msg = OutboundMessage("c:1:sms", "sms", "+15550000001", "s", "b")
    basic.send(msg)
    bearer.send(msg)
    with pytest.raises(SenderSetupError, match="401") as err:
        basic.send(msg)
    assert seen[0] == ("https://gw.example/sms", "Basic " + base64.b64encode(b"ops:hunter2-secret").decode())
    assert seen[1] == ("https://gw.example/push", "Bearer tok-123456")
    assert basic.url == "https://gw.example/sms" and "hunter2" not in repr(basic) + str(err.value)
    with pytest.raises(ValueError, match="not both"):
        WebhookSender("https://u:p@gw.example/sms", token="t")


def test_build_senders_passes_tokens_and_smtp_login(tmp_path):
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        delivery_mode="live",
        smtp_host="mail.example",
        smtp_port=587,
        smtp_security="starttls",
        smtp_username="mailer",
        smtp_password="pw-123456",
        sms_webhook_url="https://gw.example/sms",
        sms_webhook_token="tok-123456",
    )
    senders = build_senders(settings, ["email", "sms"])
    email, sms = senders["email"], senders["sms"]
    assert (email.security, email.username, email._password) == ("starttls", "mailer", "pw-123456")
    assert sms._headers == {"Authorization": "Bearer tok-123456"}
    assert "pw-123456" not in repr(email) and "tok-123456" not in repr(sms)
    sms.close()
    missing = settings.model_copy(update={"smtp_ca_file": tmp_path / "nope.pem"})
    with pytest.raises(ValueError, match="smtp_ca_file .*nope.pem: no such file"):
        build_senders(missing, ["email"])


# --- SMTP connections --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "security", "port"),
    [
        ({}, "ssl", 465),  # SmtpHook's defaults: SSL on
        ({"disable_ssl": True}, "starttls", 587),
        ({"disable_ssl": True, "disable_tls": True}, "none", 25),
        ({"disable_ssl": "true", "disable_tls": "false"}, "starttls", 587),  # as a URI's query gives them
    ],
)
def test_smtp_connection_security_follows_the_smtp_provider(extra, security, port):
    conn = sdk_conn(conn_type="smtp", host="mail.example", login="mailer", password=SECRET, extra=extra)
    got = smtp_overrides(conn, "couponops_smtp")
    assert got == {
        "smtp_host": "mail.example",
        "smtp_port": port,
        "smtp_security": security,
        "smtp_username": "mailer",
        "smtp_password": SECRET,
    }


def test_smtp_uri_with_port_sender_and_ca_file():
    conn = sdk_conn(
        "smtp://mailer:pw-123456@mail.example:2525?disable_ssl=1&from_email=offers%40shop.example&ca_file=%2Fetc%2Fca.pem"
    )
    got = smtp_overrides(conn, "couponops_smtp")
    assert (got["smtp_port"], got["smtp_security"], got["smtp_sender"]) == (
        2525,
        "starttls",
        "offers@shop.example",
    )
    assert got["smtp_ca_file"] == "/etc/ca.pem"
    settings = Settings(_env_file=None, **got)
    assert settings.smtp_password == SecretStr("pw-123456")


@pytest.mark.parametrize(
    ("conn", "needle"),
    [
        (
            dict(conn_type="smtp", host="m", extra={"disable_ssl": "maybe"}),
            "disable_ssl='maybe' is not a boolean",
        ),
        (dict(conn_type="smtp", host="m", extra={"ssl_context": "none"}), "always verifies"),
        (dict(conn_type="smtp", host="m", extra={"auth_type": "oauth2"}), "oauth2"),
        (dict(conn_type="smtp"), "needs a host"),
        (dict(conn_type="http", host="m"), "not an SMTP connection"),
    ],
)
def test_unusable_smtp_connections_are_clear_errors(conn, needle):
    with pytest.raises(ConnectionSettingsError, match=needle) as err:
        smtp_overrides(sdk_conn(**conn), "couponops_smtp")
    assert "'couponops_smtp'" in str(err.value)


# --- settings() as a task calls it ------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith(("COUPONOPS_", "AIRFLOW_CONN_")):
            monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("COUPONOPS_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.chdir(tmp_path)  # no .env file of the checkout
    get_settings.cache_clear()
    yield monkeypatch
    get_settings.cache_clear()


def test_airflow_settings_reads_every_connection_from_the_environment(clean_env):
    from airflow.sdk.log import _secrets_masker

    from plugins.couponops_airflow import settings

    clean_env.setenv(
        "AIRFLOW_CONN_COUPONOPS_WAREHOUSE",
        "postgres://shop:p%40ss%2Fw%3Ard%3F@db.example:5432/wh?sslmode=require",
    )
    clean_env.setenv("AIRFLOW_CONN_COUPONOPS_MLFLOW", "http://ops:ml-pw-123@mlflow.example:5000/https")
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        clean_env.setenv(name, "placeholder")  # so that monkeypatch restores what settings() sets
    clean_env.setenv(
        "AIRFLOW_CONN_COUPONOPS_SMTP",
        json.dumps(
            {
                "conn_type": "smtp",
                "host": "mail.example",
                "port": 587,
                "login": "mailer",
                "password": "smtp-pw-123",
                "extra": {"disable_ssl": True, "from_email": "offers@shop.example"},
            }
        ),
    )
    clean_env.setenv(
        "AIRFLOW_CONN_COUPONOPS_SMS",
        json.dumps(
            {"conn_type": "http", "host": "gw.example", "schema": "https", "extra": {"endpoint": "/sms"}}
        ),
    )
    clean_env.setenv("COUPONOPS_PUSH_WEBHOOK_URL", "http://127.0.0.1:9/push")  # no connection: env applies

    s = settings()

    assert make_url(s.warehouse_url).password == SECRET and s.warehouse_url.startswith(
        "postgresql+psycopg://"
    )
    assert s.mlflow_tracking_uri == "https://mlflow.example:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == (
        "ops",
        "ml-pw-123",
    )
    assert (s.smtp_host, s.smtp_port, s.smtp_security, s.smtp_username) == (
        "mail.example",
        587,
        "starttls",
        "mailer",
    )
    assert s.smtp_password.get_secret_value() == "smtp-pw-123" and s.smtp_sender == "offers@shop.example"
    assert s.sms_webhook_url == "https://gw.example/sms"
    assert s.push_webhook_url == "http://127.0.0.1:9/push"
    # The password as it appears inside the URL is masked in task logs too.
    assert "p%40ss" not in _secrets_masker().redact(f"connecting to {s.warehouse_url}")


def test_airflow_settings_rejects_a_bad_connection_by_name(clean_env):
    from plugins.couponops_airflow import settings

    clean_env.setenv("AIRFLOW_CONN_COUPONOPS_WAREHOUSE", "https://not-a-database.example")
    with pytest.raises(ConnectionSettingsError, match="'couponops_warehouse'.*not a SQL database"):
        settings()


# --- masking -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql+psycopg://u:p%40ss@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:***@h:5432/db?sslmode=require",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://h/db?password=pw&sslmode=require", "postgresql://h/db?password=***&sslmode=require"),
        ("postgresql://u:raw/slash@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:raw@at@h/db", "postgresql://u:***@h/db"),
        ("https://ops:s3cret@gw.example:8443/sms?x=1#top", "https://ops:***@gw.example:8443/sms?x=1#top"),
        (
            "http://gw.example/sms?token=abc&to=me@x.example",
            "http://gw.example/sms?token=***&to=me@x.example",
        ),
        ("s3://AKIA:secretkey@bucket/artifacts", "s3://AKIA:***@bucket/artifacts"),
        ("sqlite:////tmp/state/warehouse.db", "sqlite:////tmp/state/warehouse.db"),
        ("/tmp/state/landing", "/tmp/state/landing"),
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ],
)
def test_mask_url(url, masked):
    assert mask_url(url) == masked


def test_public_dict_has_no_secret_anywhere(tmp_path):
    settings = Settings(
        _env_file=None,
        state_dir=tmp_path,
        warehouse_url="postgresql+psycopg://u:wh-secret-1@db/wh",
        mlflow_tracking_uri="postgresql+psycopg://ml:ml-secret-2@db/mlflow",
        smtp_host="mail.example",
        smtp_security="ssl",
        smtp_username="mailer",
        smtp_password="smtp-secret-3",
        sms_webhook_url="https://ops:sms-secret-4@gw.example/sms",
        push_webhook_url="https://gw.example/push",
        push_webhook_token="push-secret-5",
    )
    shown = public_dict(settings)
    text = json.dumps(shown)
    assert "secret-" not in text
    assert (
        shown["smtp_password"] == shown["push_webhook_token"] == "***" and shown["sms_webhook_token"] is None
    )
    assert shown["warehouse_url"] == shown["resolved_warehouse_url"] == "postgresql+psycopg://u:***@db/wh"
    assert shown["trainer"]["max_epochs"] == settings.trainer.max_epochs


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"smtp_password": "pw-secret-9"}, "smtp_username"),
        ({"smtp_host": "mail.example", "smtp_username": "u", "smtp_password": "pw-secret-9"}, "clear text"),
        ({"sms_webhook_url": "ftp://u:pw-secret-9@gw/sms"}, "sms_webhook_url must be an http"),
        ({"warehouse_url": "ftp://u:pw-secret-9@h/x"}, "ftp://u:***@h/x"),
        ({"mlflow_tracking_uri": "https://u:pw-secret-9@mlflow.example"}, "MLFLOW_TRACKING_PASSWORD"),
    ],
)
def test_unsafe_secret_settings_are_rejected_without_echoing_the_secret(kwargs, needle):
    with pytest.raises(ValidationError) as err:
        Settings(_env_file=None, **kwargs)
    assert needle in str(err.value) and "pw-secret-9" not in str(err.value)


def test_password_to_a_loopback_relay_may_go_without_tls():
    s = Settings(_env_file=None, smtp_host="127.0.0.1", smtp_username="u", smtp_password="pw")
    assert s.smtp_security == "none" and s.smtp_password.get_secret_value() == "pw"


def test_couponops_init_prints_masked_urls(clean_env, tmp_path):
    from typer.testing import CliRunner

    from mlpkg import cli

    clean_env.setenv("COUPONOPS_MLFLOW_ARTIFACT_ROOT", "s3://AKIAEXAMPLE:art-secret-7@bucket/mlartifacts")
    clean_env.setenv("COUPONOPS_SMTP_USERNAME", "mailer")
    clean_env.setenv("COUPONOPS_SMTP_PASSWORD", "smtp-secret-8")
    clean_env.setattr(cli.console, "width", 300)  # keep each URL on one line
    result = CliRunner().invoke(cli.app, ["init"])
    assert result.exit_code == 0, result.output
    assert "s3://AKIAEXAMPLE:***@bucket/mlartifacts" in result.output
    assert f"sqlite:///{tmp_path / 'state' / 'warehouse.db'}" in result.output
    assert "secret-" not in result.output


def test_couponops_init_reports_a_bad_setting_without_a_traceback_or_the_password(clean_env):
    from typer.testing import CliRunner

    from mlpkg import cli

    clean_env.setenv("COUPONOPS_SMTP_HOST", "mail.example")
    clean_env.setenv("COUPONOPS_SMTP_USERNAME", "mailer")
    clean_env.setenv("COUPONOPS_SMTP_PASSWORD", "smtp-secret-8")
    clean_env.setattr(cli.console, "width", 300)
    result = CliRunner().invoke(cli.app, ["init"])
    assert result.exit_code == 2
    assert "smtp_security" in result.output and "clear text" in result.output
    assert "smtp-secret-8" not in result.output and "Traceback" not in result.output
