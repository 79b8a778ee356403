"""SMTP over STARTTLS and implicit TLS with AUTH, against a real aiosmtpd relay on loopback.

The relay demands STARTTLS before anything else and AUTH only over TLS, so a message that
arrives proves the sender upgraded the session and logged in after the handshake. Its
certificate comes from a throwaway CA made in ``tmp_path``: the sender trusts it through
``smtp_ca_file`` (verification stays on), and without it the sender refuses to talk.
"""

from __future__ import annotations

import datetime as dt
import email
import ipaddress
import json
import socket
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mlpkg.config import Settings
from mlpkg.delivery import OutboundMessage, SmtpSender, build_senders
from mlpkg.delivery.senders import RetryableSendError, SenderSetupError

pytestmark = pytest.mark.integration

USER = "mailer"
PASSWORD = "s3cret-Pa55:word@x"
SENDER = "offers@shop.example"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Certs:
    ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    """A CA and a server certificate for 127.0.0.1 / localhost that it signed."""
    out = tmp_path_factory.mktemp("tls")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("CouponOps test CA"))
        .issuer_name(_name("CouponOps test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    certs = Certs(out / "ca.pem", out / "server.pem", out / "server.key")
    certs.ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    certs.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    certs.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return certs


def over_tls(server, session) -> bool:  # noqa: ANN001
    """Whether the SMTP session runs over TLS (after STARTTLS, or implicit TLS from the start)."""
    return session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None


@dataclass
class Relay:
    """What the relay saw: every AUTH attempt and every accepted message."""

    port: int = 0
    logins: list[tuple[str, str, bool]] = field(default_factory=list)  # (mechanism, user, over TLS)
    messages: list[tuple[email.message.Message, bool, bool]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authenticator(self, server, session, envelope, mechanism, auth_data) -> AuthResult:  # noqa: ANN001
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login == USER.encode()
            and auth_data.password == PASSWORD.encode()
        )
        with self.lock:
            self.logins.append((mechanism, auth_data.login.decode(), over_tls(server, session)))
        return AuthResult(success=ok, handled=False)  # handled=False: the relay answers 235/535

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, ANN201, N802
        with self.lock:
            received = email.message_from_bytes(envelope.content)
            self.messages.append((received, over_tls(server, session), bool(session.authenticated)))
        return "250 OK"


def start_relay(relay: Relay, **kwargs) -> Controller:  # noqa: ANN003
    relay.port = free_port()
    controller = Controller(
        relay,
        hostname="127.0.0.1",
        port=relay.port,
        authenticator=relay.authenticator,
        auth_required=True,
        **kwargs,
    )
    controller.start()
    return controller


@pytest.fixture
def starttls_relay(certs, request):
    """A relay on loopback that demands STARTTLS, then AUTH (one mechanism, chosen by the test)."""
    relay = Relay()
    excluded = getattr(request, "param", None)
    controller = start_relay(
        relay,
        tls_context=certs.server_context(),
        require_starttls=True,
        auth_require_tls=True,
        auth_exclude_mechanism=[excluded] if excluded else None,
    )
    yield relay
    controller.stop()


@pytest.fixture
def ssl_relay(certs):
    """A relay on loopback that speaks implicit TLS (SMTPS) and demands AUTH."""
    relay = Relay()
    # aiosmtpd's auth_require_tls only counts STARTTLS; the whole session is TLS here, which the
    # test checks from the session itself.
    controller = start_relay(relay, ssl_context=certs.server_context(), auth_require_tls=False)
    yield relay
    controller.stop()


@pytest.fixture
def plain_relay():
    """A relay that offers no TLS at all (and so can take no AUTH either)."""
    relay = Relay()
    relay.port = free_port()
    controller = Controller(relay, hostname="127.0.0.1", port=relay.port)
    controller.start()
    yield relay
    controller.stop()


def message(n: int = 1) -> OutboundMessage:
    return OutboundMessage(f"cmp:c{n}:email", "email", f"c{n}@customers.example", "Coupon", f"PCT10 #{n}")


@pytest.mark.parametrize(
    ("starttls_relay", "mechanism"), [("LOGIN", "PLAIN"), ("PLAIN", "LOGIN")], indirect=["starttls_relay"]
)
def test_starttls_then_login_delivers_and_reuses_the_session(certs, starttls_relay, mechanism):
    sender = SmtpSender(
        "127.0.0.1",
        starttls_relay.port,
        SENDER,
        timeout=5,
        security="starttls",
        username=USER,
        password=PASSWORD,
        ca_file=certs.ca_file,
    )
    try:
        first = sender.send(message(1))
        sender.send(message(2))
    finally:
        sender.close()
    # One login for both messages, made over TLS with the mechanism the relay offered.
    assert starttls_relay.logins == [(mechanism, USER, True)]
    assert [(m["Message-ID"], tls, authed) for m, tls, authed in starttls_relay.messages[:1]] == [
        (first.provider_message_id, True, True)
    ]
    assert [m["To"] for m, _, _ in starttls_relay.messages] == [f"c{n}@customers.example" for n in (1, 2)]
    assert "PCT10 #1" in starttls_relay.messages[0][0].get_payload()


def test_wrong_password_is_a_setup_error_that_names_the_user_not_the_password(certs, starttls_relay):
    sender = SmtpSender(
        "127.0.0.1",
        starttls_relay.port,
        SENDER,
        timeout=5,
        security="starttls",
        username=USER,
        password="not-the-password",
        ca_file=certs.ca_file,
    )
    with pytest.raises(SenderSetupError) as err:
        sender.send(message())
    sender.close()
    text = str(err.value)
    assert "535" in text and repr(USER) in text and "smtp_password" in text
    assert "not-the-password" not in text
    # Retryable, not a bounce: the customer's address is fine, the settings are not.
    assert isinstance(err.value, RetryableSendError)
    # smtplib tries each offered mechanism before giving up; every try came over TLS.
    assert {(user, tls) for _, user, tls in starttls_relay.logins} == {(USER, True)}
    assert starttls_relay.messages == []


def test_certificate_is_verified_by_default(starttls_relay):
    sender = SmtpSender(
        "127.0.0.1",
        starttls_relay.port,
        SENDER,
        timeout=5,
        security="starttls",
        username=USER,
        password=PASSWORD,
    )
    with pytest.raises(SenderSetupError, match="certificate not trusted.*smtp_ca_file"):
        sender.send(message())
    sender.close()
    assert starttls_relay.logins == [] and starttls_relay.messages == []


def test_plain_session_against_a_starttls_relay_is_refused_not_bounced(starttls_relay):
    sender = SmtpSender("127.0.0.1", starttls_relay.port, SENDER, timeout=5)
    with pytest.raises(SenderSetupError, match="530"):
        sender.send(message())
    sender.close()
    assert starttls_relay.messages == []


def test_starttls_is_never_skipped_when_the_relay_does_not_offer_it(certs, plain_relay):
    sender = SmtpSender(
        "127.0.0.1",
        plain_relay.port,
        SENDER,
        timeout=5,
        security="starttls",
        username=USER,
        password=PASSWORD,
        ca_file=certs.ca_file,
    )
    with pytest.raises(SenderSetupError, match="does not offer STARTTLS"):
        sender.send(message())
    sender.close()
    assert plain_relay.logins == [] and plain_relay.messages == []


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS:UserWarning")
def test_implicit_tls_login_delivers(certs, ssl_relay):
    sender = SmtpSender(
        "127.0.0.1",
        ssl_relay.port,
        SENDER,
        timeout=5,
        security="ssl",
        username=USER,
        password=PASSWORD,
        ca_file=certs.ca_file,
    )
    try:
        sender.send(message())
    finally:
        sender.close()
    assert [(user, tls) for _, user, tls in ssl_relay.logins] == [(USER, True)]
    assert [(m["To"], authed) for m, _, authed in ssl_relay.messages] == [("c1@customers.example", True)]


def test_airflow_smtp_connection_drives_the_live_sender(certs, starttls_relay, tmp_path):
    from airflow.sdk import Connection

    from plugins.couponops_connections import smtp_overrides

    conn = Connection(
        conn_id="couponops_smtp",
        conn_type="smtp",
        host="127.0.0.1",
        port=starttls_relay.port,
        login=USER,
        password=PASSWORD,
        extra=json.dumps({"disable_ssl": True, "from_email": SENDER, "ca_file": str(certs.ca_file)}),
    )
    overrides = smtp_overrides(conn, conn.conn_id)
    settings = Settings(_env_file=None, state_dir=tmp_path / "state", delivery_mode="live", **overrides)
    assert settings.smtp_security == "starttls" and settings.smtp_password.get_secret_value() == PASSWORD
    sender = build_senders(settings, ["email"])["email"]
    try:
        sender.send(message())
    finally:
        sender.close()
    assert starttls_relay.logins == [("PLAIN", USER, True)]
    assert [m["From"] for m, _, _ in starttls_relay.messages] == [SENDER]
