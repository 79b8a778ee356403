"""Turn Airflow connections of the standard types into CouponOps settings overrides.

Pure functions of a Connection-like object (``conn_type``, ``host``, ``port``, ``login``,
``password``, ``schema``, ``extra_dejson``), so they run on ``airflow.sdk.Connection``,
``airflow.models.Connection`` or anything shaped like them, and import nothing heavy.

Each field is read the way the provider that owns the connection type reads it:

* SQL (``postgres``/``postgresql``, ``mysql``, ``sqlite``): ``schema`` is the database; the libpq
  options among the extras (``sslmode``...) become URL query parameters, hook-only extras
  (``cursor``, ``iam``...) are left out. A driver in the type (``postgresql+psycopg2``) is kept.
* HTTP (``http``/``https``, as ``HttpHook`` reads them): ``host`` may be a whole URL; otherwise
  ``schema`` names the scheme (``http``/``https``). A connection given as a URI
  (``https://gw.example/sms/send``) carries its path in ``schema`` instead, so any other value
  of ``schema`` is the path. An ``endpoint`` extra is appended to the path. ``login`` with
  ``password`` is basic auth (kept in the URL); a ``password`` alone is a bearer token.
* SMTP (``smtp``/``email``, as ``SmtpHook`` reads them): ``login``/``password`` log in;
  ``disable_ssl`` (default false: implicit TLS) and ``disable_tls`` (default false: STARTTLS)
  choose the security; ``from_email`` is the sender. CouponOps also reads ``ca_file``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol
from urllib.parse import quote, unquote, urlencode, urlsplit, urlunsplit


class ConnectionLike(Protocol):
    """The fields of an Airflow connection that the adapters read."""

    conn_type: str | None
    host: str | None
    port: int | None
    login: str | None
    password: str | None
    schema: str | None

    @property
    def extra_dejson(self) -> dict:
        """The connection's extra field, parsed from JSON."""
        ...


class ConnectionSettingsError(ValueError):
    """A connection cannot be turned into settings; the message names the connection."""


# libpq connection parameters that may ride in a postgresql URL's query string
# (https://www.postgresql.org/docs/current/libpq-connect.html#LIBPQ-PARAMKEYWORDS).
_LIBPQ_PARAMS = frozenset(
    {
        "application_name", "channel_binding", "client_encoding", "connect_timeout", "gssencmode",
        "keepalives", "keepalives_count", "keepalives_idle", "keepalives_interval", "krbsrvname",
        "load_balance_hosts", "options", "passfile", "require_auth", "service", "sslcert",
        "sslcompression", "sslcrl", "sslcrldir", "sslkey", "sslmode", "sslnegotiation", "sslrootcert",
        "sslsni", "ssl_min_protocol_version", "ssl_max_protocol_version", "target_session_attrs",
        "tcp_user_timeout",
    }
)  # fmt: skip
_MYSQL_PARAMS = frozenset({"charset", "connect_timeout", "ssl_ca", "ssl_cert", "ssl_key", "unix_socket"})
_DEFAULT_DRIVERS = {"postgresql": "psycopg", "mysql": "pymysql"}
_SMTP_PORTS = {"ssl": 465, "starttls": 587, "none": 25}
_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off", ""})


def _fail(conn_id: str, problem: str) -> ConnectionSettingsError:
    return ConnectionSettingsError(f"Airflow connection {conn_id!r}: {problem}")


def _type(conn: ConnectionLike) -> tuple[str, str]:
    """Return ``(base type, driver)`` of ``conn_type``: ``postgresql+psycopg2`` -> (postgres, psycopg2)."""
    base, _, driver = (conn.conn_type or "").strip().lower().partition("+")
    base = base.replace("-", "_")
    return ("postgres" if base == "postgresql" else base), driver


def _userinfo(login: str | None, password: str | None) -> str:
    if not login and not password:
        return ""
    user = quote(login or "", safe="")
    return f"{user}:{quote(password, safe='')}@" if password else f"{user}@"


def _hostport(host: str, port: int | None) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # an IPv6 literal
    return f"{host}:{int(port)}" if port else host


def _query(extra: Mapping[str, Any], allowed: frozenset[str]) -> str:
    params = {}
    for key, value in extra.items():
        if key in allowed and value is not None and not isinstance(value, dict | list):
            params[key] = str(int(value)) if isinstance(value, bool) else str(value)
    return urlencode(sorted(params.items()))


def sqlalchemy_url(conn: ConnectionLike, conn_id: str) -> str:
    """Return the SQLAlchemy URL of a ``postgres``, ``mysql`` or ``sqlite`` connection.

    Args:
        conn: The connection.
        conn_id: Its id, named in errors.

    Returns:
        E.g. ``postgresql+psycopg://user:pa%40ss@host:5432/db?sslmode=require``.

    Raises:
        ConnectionSettingsError: The type is not a SQL database CouponOps can use, or the
            connection lacks the host (or, for sqlite, the file path).
    """
    base, driver = _type(conn)
    extra = conn.extra_dejson or {}
    if base == "sqlite":
        # SqliteHook keeps the file in host; a URI sqlite:////path/x.db lands in schema.
        path = conn.host or conn.schema
        if not path:
            raise _fail(conn_id, "a sqlite connection needs the database file path in host")
        return f"sqlite:///{path}"
    if base not in ("postgres", "mysql"):
        raise _fail(
            conn_id, f"conn_type {conn.conn_type!r} is not a SQL database (use postgres, mysql or sqlite)"
        )
    if not conn.host:
        raise _fail(conn_id, f"a {base} connection needs a host")
    dialect = "postgresql" if base == "postgres" else "mysql"
    scheme = f"{dialect}+{driver or _DEFAULT_DRIVERS[dialect]}"
    allowed = _LIBPQ_PARAMS if dialect == "postgresql" else _MYSQL_PARAMS
    database = quote(conn.schema or "", safe="")
    netloc = _userinfo(conn.login, conn.password) + _hostport(conn.host, conn.port)
    return urlunsplit((scheme, netloc, f"/{database}" if database else "", _query(extra, allowed), ""))


def http_url(conn: ConnectionLike, conn_id: str, *, credentials: bool = True) -> str:
    """Return the full http(s) URL of an HTTP connection, scheme, host, port and path kept.

    Args:
        conn: An ``http``/``https`` connection, or a generic one whose host is a whole URL.
        conn_id: Its id, named in errors.
        credentials: Put ``login:password@`` into the URL (basic auth) when both are set.

    Returns:
        E.g. ``https://user:pw@gw.example:8443/sms/send``.

    Raises:
        ConnectionSettingsError: The type is not HTTP, or the connection has no host.
    """
    base, _ = _type(conn)
    if base not in ("http", "https", "generic", ""):
        raise _fail(conn_id, f"conn_type {conn.conn_type!r} is not an HTTP connection (use http or https)")
    host = (conn.host or "").strip()
    if not host:
        raise _fail(conn_id, "an HTTP connection needs a host (or a whole URL in host)")
    schema = (conn.schema or "").strip()
    if "://" in host:
        # HttpHook takes a host holding a whole URL as the base URL.
        parts = urlsplit(host)
        scheme, path, query = parts.scheme.lower(), parts.path, parts.query
        netloc = parts.netloc.rpartition("@")[2]
        if conn.port and parts.port is None:
            netloc = _hostport(netloc, conn.port)
        login = conn.login or unquote(parts.username or "") or None
        password = conn.password or unquote(parts.password or "") or None
    else:
        if schema.lower() in ("http", "https"):
            scheme, path = schema.lower(), ""
        else:
            scheme, path = ("https" if base == "https" else "http"), schema
        netloc, query = _hostport(host, conn.port), ""
        login, password = conn.login, conn.password
    if scheme not in ("http", "https"):
        raise _fail(conn_id, f"the URL scheme must be http or https, got {scheme!r}")
    endpoint = str((conn.extra_dejson or {}).get("endpoint") or "").strip()
    path = "/".join(p.strip("/") for p in (path, endpoint) if p.strip("/"))
    userinfo = _userinfo(login, password) if credentials and login and password else ""
    return urlunsplit((scheme, userinfo + netloc, f"/{path}" if path else "", query, ""))


def warehouse_overrides(conn: ConnectionLike, conn_id: str) -> dict[str, Any]:
    """Return ``warehouse_url`` from a SQL connection (see :func:`sqlalchemy_url`)."""
    return {"warehouse_url": sqlalchemy_url(conn, conn_id)}


def _is_http(conn: ConnectionLike) -> bool:
    return _type(conn)[0] in ("http", "https", "generic", "")


def mlflow_overrides(conn: ConnectionLike, conn_id: str) -> dict[str, Any]:
    """Return ``mlflow_tracking_uri`` from an HTTP (tracking server) or a SQL (database) connection.

    A server's URL never carries the login (MLflow prints the tracking URL in its run links);
    :func:`mlflow_credentials_env` hands the login to MLflow instead.

    Raises:
        ConnectionSettingsError: The connection is neither HTTP nor SQL.
    """
    if _type(conn)[0] in ("postgres", "mysql", "sqlite"):
        return {"mlflow_tracking_uri": sqlalchemy_url(conn, conn_id)}
    if _is_http(conn):
        return {"mlflow_tracking_uri": http_url(conn, conn_id, credentials=False)}
    raise _fail(conn_id, f"conn_type {conn.conn_type!r} is neither an MLflow server (http/https) nor SQL")


def mlflow_credentials_env(conn: ConnectionLike) -> dict[str, str]:
    """Return MLflow's own credential variables for an MLflow server connection.

    ``login`` and ``password`` are basic auth (``MLFLOW_TRACKING_USERNAME`` /
    ``MLFLOW_TRACKING_PASSWORD``), a ``password`` alone a bearer token (``MLFLOW_TRACKING_TOKEN``);
    MLflow reads them on every request. A database connection needs none.
    """
    if not _is_http(conn) or not conn.password:
        return {}
    if conn.login:
        return {"MLFLOW_TRACKING_USERNAME": conn.login, "MLFLOW_TRACKING_PASSWORD": conn.password}
    return {"MLFLOW_TRACKING_TOKEN": conn.password}


def webhook_overrides(conn: ConnectionLike, conn_id: str, channel: str) -> dict[str, Any]:
    """Return ``<channel>_webhook_url`` and ``<channel>_webhook_token`` from an HTTP connection.

    ``login`` and ``password`` become basic auth in the URL; a ``password`` without a ``login``
    is a bearer token. The connection replaces both settings, so a token from the environment
    never leaks to the gateway the connection names.

    Args:
        conn: The gateway's HTTP connection.
        conn_id: Its id, named in errors.
        channel: ``sms`` or ``push``.
    """
    token = conn.password if conn.password and not conn.login else None
    return {
        f"{channel}_webhook_url": http_url(conn, conn_id),
        f"{channel}_webhook_token": token,
    }


def _flag(extra: Mapping[str, Any], key: str, conn_id: str) -> bool:
    value = extra.get(key, False)
    if isinstance(value, bool):
        return value
    # A URI's query gives strings: "false" must not count as true as bool("false") would.
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(conn_id, f"extra {key}={value!r} is not a boolean")


def smtp_overrides(conn: ConnectionLike, conn_id: str) -> dict[str, Any]:
    """Return the SMTP settings of an ``smtp``/``email`` connection, read as ``SmtpHook`` reads it.

    Security follows the provider: implicit TLS unless ``disable_ssl``; then STARTTLS unless
    ``disable_tls``; plain SMTP when both are disabled. The port defaults to 465, 587 or 25.
    The connection replaces the login settings, so none are left over from the environment.

    Raises:
        ConnectionSettingsError: Wrong type, no host, a non-boolean flag, OAuth2 (unsupported), or
            ``ssl_context`` other than ``default`` (CouponOps always verifies certificates; trust a
            private CA with the ``ca_file`` extra).
    """
    base, _ = _type(conn)
    if base not in ("smtp", "email"):
        raise _fail(conn_id, f"conn_type {conn.conn_type!r} is not an SMTP connection (use smtp)")
    if not conn.host:
        raise _fail(conn_id, "an SMTP connection needs a host")
    extra = conn.extra_dejson or {}
    if str(extra.get("auth_type", "basic")).lower() != "basic":
        raise _fail(conn_id, f"auth_type {extra['auth_type']!r} is not supported (only basic login)")
    if str(extra.get("ssl_context") or "default").lower() != "default":
        raise _fail(
            conn_id,
            f"ssl_context={extra['ssl_context']!r} would skip certificate checks; CouponOps always verifies "
            "them (set the ca_file extra to trust a private CA)",
        )
    if not _flag(extra, "disable_ssl", conn_id):
        security = "ssl"
    elif not _flag(extra, "disable_tls", conn_id):
        security = "starttls"
    else:
        security = "none"
    overrides: dict[str, Any] = {
        "smtp_host": conn.host,
        "smtp_port": int(conn.port) if conn.port else _SMTP_PORTS[security],
        "smtp_security": security,
        "smtp_username": conn.login or None,
        "smtp_password": conn.password or None,
    }
    if extra.get("from_email"):
        overrides["smtp_sender"] = str(extra["from_email"])
    if extra.get("ca_file"):
        overrides["smtp_ca_file"] = str(extra["ca_file"])
    return overrides


def url_quoted_secrets(conn: ConnectionLike) -> list[str]:
    """Return the forms of the connection's password that appear in URLs built from it.

    Airflow masks a connection's password in task logs; a URL carries it percent-encoded, which
    differs when it holds special characters, so that form must be masked too.
    """
    if not conn.password:
        return []
    quoted = quote(conn.password, safe="")
    return [quoted] if quoted != conn.password else []


Adapter = Callable[[ConnectionLike, str], dict[str, Any]]

# Airflow connection id -> the settings it fills (connections, never code, hold endpoints).
CONNECTIONS: dict[str, Adapter] = {
    "couponops_warehouse": warehouse_overrides,
    "couponops_mlflow": mlflow_overrides,
    "couponops_smtp": smtp_overrides,
    "couponops_sms": lambda conn, conn_id: webhook_overrides(conn, conn_id, "sms"),
    "couponops_push": lambda conn, conn_id: webhook_overrides(conn, conn_id, "push"),
}


def settings_overrides(connections: Mapping[str, ConnectionLike]) -> dict[str, Any]:
    """Return the settings overrides of the CouponOps connections present in ``connections``.

    Args:
        connections: Connection id -> connection, for the ids that are defined.

    Returns:
        Keyword arguments for ``mlpkg.config.Settings``.
    """
    overrides: dict[str, Any] = {}
    for conn_id, adapt in CONNECTIONS.items():
        if conn_id in connections:
            overrides.update(adapt(connections[conn_id], conn_id))
    return overrides
