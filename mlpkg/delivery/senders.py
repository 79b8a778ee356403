"""Senders: one interface for every channel, with exactly-once-in-effect hooks.

Every sender carries the outbox row's ``dedup_key`` to the receiver in the form that receiver
deduplicates on: SMTP gets a ``Message-ID`` derived from the key (plus an
``X-CouponOps-Dedup-Key`` header), webhooks get an ``Idempotency-Key`` header, and the file
sender names its file after the key. A re-send of the same row therefore reaches the customer
at most once at any receiver that honours those keys.

Errors are classified so the dispatcher knows what to do next: :class:`RetryableSendError`
(try again later: 4xx SMTP replies, HTTP 5xx/408/429, timeouts, refused connections) or
:class:`PermanentSendError` (give up and record a bounce: 5xx SMTP replies, other HTTP 4xx).
A receiver that refuses the sender itself (wrong SMTP password, HTTP 401/403, no STARTTLS, an
untrusted certificate) raises :class:`SenderSetupError`, a retryable error: the fault is in the
settings, not in the message, so no customer is recorded as bounced for it.

Credentials never appear in an error message: SMTP errors name the user and the relay, webhook
errors name the URL without its user info.
"""

from __future__ import annotations

import hashlib
import json
import os
import smtplib
import ssl
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import httpx
from pydantic import SecretStr

from mlpkg.config import Settings

CHANNELS: tuple[str, ...] = ("email", "sms", "push")
DEFAULT_TIMEOUT_SECONDS = 10.0
# 4xx replies that mean "not now" rather than "never": the request may succeed if repeated.
_RETRYABLE_HTTP_4XX = frozenset({408, 425, 429})
# SMTP replies about the session, not the message: authentication or encryption required (RFC 4954).
_SMTP_SETUP_CODES = frozenset({530, 534, 535, 538})


class SendError(Exception):
    """Base class of send failures."""


class RetryableSendError(SendError):
    """The message was not delivered but may be on a later attempt."""


class PermanentSendError(SendError):
    """The receiver rejected the message for good (a bounce); do not retry."""


class SenderSetupError(RetryableSendError):
    """The receiver refused the sender (credentials, TLS): fix the settings; the message is kept."""


@dataclass(frozen=True)
class OutboundMessage:
    """One message, as handed to a sender.

    Attributes:
        dedup_key: Stable key of the outbox row; receivers deduplicate on it.
        channel: ``email``, ``sms`` or ``push``.
        recipient: Address, phone number or device token.
        subject: Short subject (email subject, push title).
        body: Plain-text body.
        payload: The outbox row's JSON payload (coupon, campaign, products, ...).
        html: HTML body (email only; empty: a text-only message).
    """

    dedup_key: str
    channel: str
    recipient: str
    subject: str
    body: str
    payload: dict[str, Any] = field(default_factory=dict)
    html: str = ""


@dataclass(frozen=True)
class SendReceipt:
    """What the receiver answered to an accepted message.

    Attributes:
        provider_message_id: The receiver's id for the message (or the id we gave it).
        duplicate: True when the receiver reported it had already accepted this key.
    """

    provider_message_id: str
    duplicate: bool = False


@runtime_checkable
class Sender(Protocol):
    """Anything that can hand an :class:`OutboundMessage` to a receiver."""

    def send(self, message: OutboundMessage) -> SendReceipt:
        """Deliver ``message`` or raise :class:`RetryableSendError` / :class:`PermanentSendError`."""
        ...

    def close(self) -> None:
        """Release connections held by the sender."""
        ...


def key_digest(dedup_key: str) -> str:
    """Return a stable hex digest of a dedup key (safe in file names and Message-IDs)."""
    return hashlib.sha256(dedup_key.encode("utf-8")).hexdigest()[:40]


def message_id_for(dedup_key: str, sender: str) -> str:
    """Return the deterministic RFC 5322 ``Message-ID`` of the message with ``dedup_key``."""
    domain = sender.rsplit("@", 1)[-1] if "@" in sender else "couponops.local"
    return f"<{key_digest(dedup_key)}@{domain}>"


SmtpSecurity = Literal["none", "starttls", "ssl"]


def tls_context(ca_file: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """Return a client TLS context that verifies the server's certificate and host name.

    Args:
        ca_file: PEM bundle of trusted CAs; None trusts the system's CAs.

    Raises:
        ValueError: ``ca_file`` does not exist or holds no usable certificate.
    """
    if ca_file is None:
        return ssl.create_default_context()
    path = Path(ca_file)
    if not path.is_file():
        raise ValueError(f"smtp_ca_file {path}: no such file")
    try:
        return ssl.create_default_context(cafile=str(path))
    except ssl.SSLError as exc:
        raise ValueError(f"smtp_ca_file {path}: not a PEM certificate bundle ({exc})") from exc


class SmtpSender:
    """Send email through an SMTP relay, reusing one connection across messages.

    The session is secured as asked (``starttls`` never falls back to plain text, ``ssl`` is
    implicit TLS), the relay's certificate is verified, and the sender logs in after the TLS
    handshake when a user name is given. Holds one SMTP session, so it is not thread-safe: give
    each worker its own sender.
    """

    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        *,
        security: SmtpSecurity = "none",
        username: str | None = None,
        password: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
    ) -> None:
        """Configure the relay; the connection is opened on the first send.

        Args:
            host: SMTP relay host.
            port: SMTP relay port.
            sender: ``From`` address; its domain also names the ``Message-ID``.
            timeout: Socket timeout in seconds.
            security: ``none``, ``starttls`` or ``ssl`` (implicit TLS, e.g. port 465).
            username: SMTP AUTH user; None sends without logging in.
            password: SMTP AUTH password (needs ``username``).
            ca_file: PEM bundle trusted for the relay's certificate; None: the system's CAs.

        Raises:
            ValueError: Unknown ``security``, a password without a user name, or a bad ``ca_file``.
        """
        if security not in ("none", "starttls", "ssl"):
            raise ValueError(f"smtp security must be 'none', 'starttls' or 'ssl', got {security!r}")
        if password is not None and not username:
            raise ValueError("an SMTP password needs a user name (smtp_username)")
        self.host = host
        self.port = port
        self.sender = sender
        self.timeout = timeout
        self.security: SmtpSecurity = security
        self.username = username
        self._password = password
        self._tls = tls_context(ca_file) if security != "none" else None
        self._smtp: smtplib.SMTP | None = None

    def __repr__(self) -> str:
        user = f"{self.username}@" if self.username else ""
        return f"SmtpSender({user}{self.host}:{self.port}, security={self.security!r})"

    def _connection(self) -> smtplib.SMTP:
        if self._smtp is None:
            if self.security == "ssl":
                smtp = smtplib.SMTP_SSL(self.host, self.port, timeout=self.timeout, context=self._tls)
            else:
                smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
            try:
                self._secure_and_login(smtp)
            except BaseException:
                smtp.close()
                raise
            self._smtp = smtp
        return self._smtp

    def _secure_and_login(self, smtp: smtplib.SMTP) -> None:
        where = f"SMTP {self.host}:{self.port}"
        if self.security == "starttls":
            smtp.ehlo()
            if not smtp.has_extn("starttls"):
                # Sending anyway would put the message (and the password) on the wire in clear text.
                raise SenderSetupError(f"{where} does not offer STARTTLS (smtp_security='starttls')")
            try:
                smtp.starttls(context=self._tls)
            except smtplib.SMTPResponseException as exc:
                reply = _reply_text(exc.smtp_error)
                raise SenderSetupError(f"{where} refused STARTTLS: {exc.smtp_code} {reply}") from exc
            smtp.ehlo()
        if not self.username:
            return
        try:
            smtp.login(self.username, self._password or "")
        except smtplib.SMTPAuthenticationError as exc:
            reply = _reply_text(exc.smtp_error)
            raise SenderSetupError(
                f"{where} rejected the login of {self.username!r}: {exc.smtp_code} {reply} "
                "(check smtp_username / smtp_password)"
            ) from exc
        except smtplib.SMTPNotSupportedError as exc:
            raise SenderSetupError(
                f"{where} offers no AUTH for {self.username!r} in this session "
                f"(smtp_security={self.security!r}; many relays allow AUTH only after TLS)"
            ) from exc

    def _drop_connection(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            try:
                smtp.close()
            except OSError:
                # The socket is already gone; there is nothing left to release.
                return

    def build_email(self, message: OutboundMessage) -> EmailMessage:
        """Return the MIME message for ``message`` with its dedup headers."""
        email = EmailMessage()
        email["From"] = self.sender
        email["To"] = message.recipient
        email["Subject"] = message.subject
        email["Date"] = formatdate(usegmt=True)
        email["Message-ID"] = message_id_for(message.dedup_key, self.sender)
        email["X-CouponOps-Dedup-Key"] = message.dedup_key
        email.set_content(message.body)
        if message.html:
            # multipart/alternative: clients that show HTML show it, the others the text.
            email.add_alternative(message.html, subtype="html")
        return email

    def send(self, message: OutboundMessage) -> SendReceipt:
        """Send one email; 5xx replies are permanent, 4xx replies and I/O errors retryable.

        Args:
            message: The message to send.

        Returns:
            A receipt whose id is the message's deterministic ``Message-ID``.

        Raises:
            PermanentSendError: The relay answered 5xx (e.g. 550 unknown mailbox).
            RetryableSendError: The relay answered 4xx, or the connection failed or timed out.
            SenderSetupError: The relay refused the login or TLS, or its certificate is not trusted.
        """
        email = self.build_email(message)
        try:
            refused = self._send_email(email)
        except SenderSetupError:
            self._drop_connection()
            raise
        except ssl.SSLCertVerificationError as exc:
            self._drop_connection()
            raise SenderSetupError(
                f"SMTP {self.host}:{self.port}: certificate not trusted ({exc.verify_message}); "
                "set smtp_ca_file to the CA bundle that signed it"
            ) from exc
        except (smtplib.SMTPConnectError, smtplib.SMTPHeloError) as exc:
            # The relay refused the session, not this message: another attempt may get through.
            self._drop_connection()
            raise RetryableSendError(f"SMTP {self.host}:{self.port}: {exc}") from exc
        except smtplib.SMTPRecipientsRefused as exc:
            self._reset_after_error()
            code, reply = next(iter(exc.recipients.values()))
            raise _classify_smtp(code, reply, message.recipient) from exc
        except smtplib.SMTPResponseException as exc:
            self._reset_after_error()
            raise _classify_smtp(exc.smtp_code, exc.smtp_error, message.recipient) from exc
        except (smtplib.SMTPException, OSError) as exc:
            # Disconnects, timeouts and refused connections say nothing about the message itself.
            self._drop_connection()
            raise RetryableSendError(f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}") from exc
        if refused:
            code, reply = next(iter(refused.values()))
            raise _classify_smtp(code, reply, message.recipient)
        return SendReceipt(provider_message_id=str(email["Message-ID"]))

    def _send_email(self, email: EmailMessage) -> dict:
        reused = self._smtp is not None
        try:
            return self._connection().send_message(email)
        except smtplib.SMTPServerDisconnected:
            if not reused:
                raise
            # Relays close idle sessions; one fresh connection is tried before calling it a failure.
            self._drop_connection()
            return self._connection().send_message(email)

    def _reset_after_error(self) -> None:
        # After a rejected transaction the session must be reset before the next MAIL FROM.
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._drop_connection()

    def close(self) -> None:
        """Quit the SMTP session if one is open."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            smtp.quit()
        except (smtplib.SMTPException, OSError):
            smtp.close()


def _reply_text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)


def _classify_smtp(code: int, reply: bytes | str, recipient: str) -> SendError:
    detail = f"SMTP {code} for {recipient}: {_reply_text(reply)}"
    if code in _SMTP_SETUP_CODES:
        return SenderSetupError(f"{detail} (the relay wants TLS or a login: see smtp_security)")
    return PermanentSendError(detail) if 500 <= code < 600 else RetryableSendError(detail)


class WebhookSender:
    """POST messages as JSON to an HTTP gateway (SMS or push) with an ``Idempotency-Key``.

    Credentials travel as the gateway expects them: ``user:password@`` in the URL becomes HTTP
    basic auth (and is removed from :attr:`url`, which error messages show), a token becomes an
    ``Authorization: Bearer`` header.
    """

    def __init__(
        self,
        url: str,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
        client: httpx.Client | None = None,
        *,
        token: str | None = None,
    ) -> None:
        """Configure the gateway.

        Args:
            url: Endpoint that receives one POST per message, optionally with ``user:password@``.
            timeout: Request timeout in seconds.
            client: HTTP client to reuse (default: one owned and closed by this sender).
            token: Bearer token sent in the ``Authorization`` header.

        Raises:
            ValueError: The URL is not http(s), or it carries a password and a token is given too.
        """
        parsed = httpx.URL(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"webhook URL must be http(s), got scheme {parsed.scheme!r}")
        self._auth: httpx.BasicAuth | None = None
        if parsed.username or parsed.password:
            if token:
                raise ValueError("webhook: give basic auth (user:password in the URL) or a token, not both")
            self._auth = httpx.BasicAuth(parsed.username, parsed.password)
            parsed = parsed.copy_with(username=None, password=None)
            url = str(parsed)
        self.url = url
        self.timeout = timeout
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_client = client is None
        self._client = client or httpx.Client(timeout=timeout)

    def __repr__(self) -> str:
        auth = ", basic auth" if self._auth else ", bearer token" if self._headers else ""
        return f"WebhookSender({self.url}{auth})"

    def send(self, message: OutboundMessage) -> SendReceipt:
        """POST one message; 2xx and 409 (already received) count as sent.

        Args:
            message: The message to send.

        Returns:
            A receipt with the gateway's id (``id`` or ``message_id`` in a JSON answer) or the key.

        Raises:
            PermanentSendError: The gateway answered 4xx other than 401/403/408/409/425/429.
            RetryableSendError: 5xx, 408/425/429, a timeout or a connection error.
            SenderSetupError: 401/403: the gateway refused the credentials.
        """
        body = {
            "dedup_key": message.dedup_key,
            "channel": message.channel,
            "recipient": message.recipient,
            "subject": message.subject,
            "body": message.body,
            "payload": message.payload,
        }
        try:
            response = self._client.post(
                self.url,
                json=body,
                headers={**self._headers, "Idempotency-Key": message.dedup_key},
                auth=self._auth if self._auth is not None else httpx.USE_CLIENT_DEFAULT,
                timeout=self.timeout,
            )
        except httpx.HTTPError as exc:
            raise RetryableSendError(f"POST {self.url}: {type(exc).__name__}: {exc}") from exc
        status = response.status_code
        if 200 <= status < 300:
            return SendReceipt(provider_message_id=_provider_id(response, message.dedup_key))
        if status == 409:
            # The gateway already holds a message with this Idempotency-Key: it was sent before.
            return SendReceipt(provider_message_id=_provider_id(response, message.dedup_key), duplicate=True)
        detail = f"POST {self.url} -> HTTP {status}: {response.text[:200]}"
        if status in (401, 403):
            raise SenderSetupError(f"{detail} (check the gateway's credentials)")
        if status >= 500 or status in _RETRYABLE_HTTP_4XX:
            raise RetryableSendError(detail)
        raise PermanentSendError(detail)

    def close(self) -> None:
        """Close the HTTP client if this sender created it."""
        if self._owns_client:
            self._client.close()


def _provider_id(response: httpx.Response, fallback: str) -> str:
    try:
        data = response.json()
    except ValueError:
        return fallback
    if isinstance(data, dict):
        for name in ("id", "message_id", "sid"):
            if data.get(name):
                return str(data[name])
    return fallback


def recipient_digest(recipient: str) -> str:
    """Return the SHA-256 hex digest of an address (what the file channel writes instead of it)."""
    return hashlib.sha256(recipient.strip().encode("utf-8")).hexdigest()


class FileSender:
    """Write each message as one JSON file (dry runs); a key already written is not rewritten.

    The file holds no address: ``recipient_sha256`` (the SHA-256 of the address) stands for it, so
    the state folder carries no contact details; a test channel (the simulated provider) that
    knows its customers' addresses matches the digests.
    """

    def __init__(self, out_dir: str | os.PathLike[str]) -> None:
        """Write into ``out_dir`` (created on the first send)."""
        self.out_dir = Path(out_dir)

    def path_for(self, dedup_key: str) -> Path:
        """Return the file that holds the message with ``dedup_key``."""
        return self.out_dir / f"{key_digest(dedup_key)}.json"

    def send(self, message: OutboundMessage) -> SendReceipt:
        """Write ``message`` atomically (temp file + rename) unless its file already exists.

        Args:
            message: The message to write.

        Returns:
            A receipt naming the file; ``duplicate`` is True when it was already there.

        Raises:
            RetryableSendError: The folder could not be written (disk full, permissions).
        """
        target = self.path_for(message.dedup_key)
        if target.exists():
            return SendReceipt(provider_message_id=target.name, duplicate=True)
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".tmp-", suffix=".json")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    record = asdict(message)
                    record["recipient_sha256"] = recipient_digest(record.pop("recipient"))
                    json.dump(record, fh, sort_keys=True, indent=1)
                # A rename is atomic: readers see no file or a whole one, and two writers of the
                # same key leave one identical file.
                os.replace(tmp, target)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise RetryableSendError(f"write {target}: {exc}") from exc
        return SendReceipt(provider_message_id=target.name)

    def close(self) -> None:
        """Do nothing: the file sender holds no connection."""
        return None


def build_senders(settings: Settings, channels: Iterable[str] | None = None) -> dict[str, Sender]:
    """Build one sender per channel from the settings.

    ``delivery_mode="file"`` writes every channel to ``settings.outbox_dir``; ``"live"`` sends
    email through ``smtp_host:smtp_port`` (with ``smtp_security``, ``smtp_username`` /
    ``smtp_password`` and ``smtp_ca_file``) and SMS/push to their webhook URLs (with their tokens).

    Args:
        settings: CouponOps settings (the Airflow side maps its connections into them).
        channels: Channels to build senders for; default all of :data:`CHANNELS`. Only these
            need their settings, so an email-only shop needs no webhook URLs.

    Returns:
        A mapping from channel name to sender.

    Raises:
        ValueError: A channel is unknown, a live channel's URL setting is missing, or
            ``smtp_ca_file`` cannot be read.
    """
    wanted = list(CHANNELS if channels is None else dict.fromkeys(channels))
    unknown = sorted(set(wanted) - set(CHANNELS))
    if unknown:
        raise ValueError(f"unknown delivery channel(s) {unknown}; known: {list(CHANNELS)}")
    if settings.delivery_mode == "file":
        file_sender = FileSender(settings.outbox_dir)
        return {channel: file_sender for channel in wanted}
    senders: dict[str, Sender] = {}
    for channel in wanted:
        if channel == "email":
            senders[channel] = SmtpSender(
                settings.smtp_host,
                settings.smtp_port,
                settings.smtp_sender,
                security=settings.smtp_security,
                username=settings.smtp_username,
                password=_secret(settings.smtp_password),
                ca_file=settings.smtp_ca_file,
            )
            continue
        setting = f"{channel}_webhook_url"
        url = getattr(settings, setting)
        if not url:
            raise ValueError(
                f"delivery_mode='live' needs settings.{setting} (env COUPONOPS_{setting.upper()}) "
                f"to send {channel} messages"
            )
        senders[channel] = WebhookSender(url, token=_secret(getattr(settings, f"{channel}_webhook_token")))
    return senders


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None else None
