"""Relay configuration: one table of options, read from the environment and flags.

Every option has an environment variable and a command-line flag; the flag wins.
``PORT`` and ``MIDNIGHT_NODE`` keep the names of the original design, everything else
is ``RELAY_*``. A bad value raises :class:`ConfigError` whose message is the single line
the CLI prints before exiting non-zero: it names the variable, the value and what is
allowed. This module is pure: it reads a mapping, never ``os.environ`` itself.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .policy import SAFE_POLICY, MethodPolicy, load_policy

__all__ = ["OPTIONS", "ConfigError", "Option", "Settings", "load_settings"]

LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """An invalid setting; ``str(err)`` is one line naming variable, value and rule."""


def _positive_int(raw: str) -> int:
    value = int(raw.strip(), 10)
    if value <= 0:
        raise ValueError
    return value


def _workers(raw: str) -> int:
    value = int(raw.strip(), 10)
    if value < 0:
        raise ValueError
    return value


def _port(raw: str) -> int:
    value = int(raw.strip(), 10)
    if not 0 <= value <= 65535:
        raise ValueError
    return value


def _seconds(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value) or value <= 0:
        raise ValueError
    return value


def _node_urls(raw: str) -> tuple[str, ...]:
    urls = tuple(part.strip() for part in raw.split(",") if part.strip())
    if not urls:
        raise ValueError
    for url in urls:
        parts = urlsplit(url)
        if parts.scheme not in ("ws", "wss") or not parts.hostname:
            raise ValueError
        _ = parts.port  # raises ValueError on a malformed port
    return urls


def _rate(raw: str) -> float:
    value = float(raw.strip())
    if not math.isfinite(value) or value < 0:
        raise ValueError
    return value


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError
        return value

    return parse


def _log_level(raw: str) -> str:
    value = raw.strip().lower()
    if value not in LOG_LEVELS:
        raise ValueError
    return value


def _text(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError
    return value


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it comes from, how it parses, what it means."""

    name: str  # attribute of Settings
    env: str
    default: str | None
    parse: Callable[[str], Any]
    allowed: str  # human rule, used in errors and --help
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "port",
        "PORT",
        "8443",
        _port,
        "an integer 0-65535 (0 picks a free port)",
        "TCP port for /relay, /health and the other routes",
    ),
    Option(
        "host",
        "RELAY_HOST",
        "0.0.0.0",
        _text,
        "an interface address or host name",
        "address to listen on",
    ),
    Option(
        "node",
        "MIDNIGHT_NODE",
        "ws://127.0.0.1:9944",
        _node_urls,
        "one or more ws:// or wss:// URLs, comma-separated",
        "upstream Midnight node WebSocket URL; a comma-separated list makes a pool",
    ),
    Option(
        "tls_cert",
        "RELAY_TLS_CERT",
        None,
        _text,
        "a path to a PEM certificate chain",
        "serve TLS (1.2 or newer) with this certificate; needs RELAY_TLS_KEY",
    ),
    Option(
        "tls_key",
        "RELAY_TLS_KEY",
        None,
        _text,
        "a path to a PEM private key",
        "private key for RELAY_TLS_CERT",
    ),
    Option(
        "max_sessions_per_connection",
        "RELAY_MAX_SESSIONS_PER_CONNECTION",
        "16",
        _positive_int,
        "an integer above zero",
        "sessions one client connection may hold open at once",
    ),
    Option(
        "session_max_age",
        "RELAY_SESSION_MAX_AGE",
        "3600",
        _seconds,
        "seconds above zero (fractions allowed)",
        "a session older than this is ended (reason expired) at the next cleanup",
    ),
    Option(
        "cleanup_interval",
        "RELAY_CLEANUP_INTERVAL",
        "600",
        _seconds,
        "seconds above zero (fractions allowed)",
        "how often expired sessions are ended",
    ),
    Option(
        "log_interval",
        "RELAY_LOG_INTERVAL",
        "60",
        _seconds,
        "seconds above zero (fractions allowed)",
        "how often the 'Active sessions: N, RSS: ..' line is logged",
    ),
    Option(
        "shutdown_timeout",
        "RELAY_SHUTDOWN_TIMEOUT",
        "10",
        _seconds,
        "seconds above zero (fractions allowed)",
        "longest a graceful shutdown may take after SIGTERM/SIGINT",
    ),
    Option(
        "log_level",
        "RELAY_LOG_LEVEL",
        "info",
        _log_level,
        "one of " + ", ".join(LOG_LEVELS),
        "log verbosity",
    ),
    Option(
        "max_queued_messages",
        "RELAY_MAX_QUEUED_MESSAGES",
        "64",
        _positive_int,
        "an integer above zero",
        "proxy messages held per session while its upstream is still connecting",
    ),
    Option(
        "max_message_bytes",
        "RELAY_MAX_MESSAGE_BYTES",
        str(16 * 1024 * 1024),
        _positive_int,
        "an integer above zero (bytes)",
        "largest WebSocket message accepted in either direction",
    ),
    Option(
        "rpc_methods",
        "RELAY_RPC_METHODS",
        "safe",
        load_policy,
        "safe, off, or the path of a readable allowlist file",
        "which JSON-RPC methods may reach the node (unsafe ones always refused); off "
        "parses nothing, so rate limits, request timeouts and batch/subscription caps are off too",
    ),
    Option(
        "max_subscriptions_per_session",
        "RELAY_MAX_SUBSCRIPTIONS_PER_SESSION",
        "64",
        _positive_int,
        "an integer above zero",
        "live subscriptions one session may hold; the excess subscribe call gets an error",
    ),
    Option(
        "max_batch",
        "RELAY_MAX_BATCH",
        "10",
        _positive_int,
        "an integer above zero",
        "largest JSON-RPC batch accepted; a longer one is answered with an error",
    ),
    Option(
        "upstream_connect_timeout",
        "RELAY_UPSTREAM_CONNECT_TIMEOUT",
        "10",
        _seconds,
        "seconds above zero (fractions allowed)",
        "longest the TCP connect plus WebSocket handshake to a node may take",
    ),
    Option(
        "max_connections",
        "RELAY_MAX_CONNECTIONS",
        "10000",
        _positive_int,
        "an integer above zero",
        "client WebSocket connections open at once; more are refused with HTTP 503",
    ),
    Option(
        "max_sessions",
        "RELAY_MAX_SESSIONS",
        "20000",
        _positive_int,
        "an integer above zero",
        "sessions (both endpoints) open at once in this process",
    ),
    Option(
        "max_connections_per_client",
        "RELAY_MAX_CONNECTIONS_PER_CLIENT",
        "64",
        _positive_int,
        "an integer above zero",
        "connections from one client address at once (kept in memory only, as a keyed hash)",
    ),
    Option(
        "rate_limit",
        "RELAY_RATE_LIMIT",
        "50",
        _rate,
        "requests per second, 0 or more (0 turns it off)",
        "JSON-RPC calls per second per session (token bucket, burst of twice the rate)",
    ),
    Option(
        "rate_limit_per_client",
        "RELAY_RATE_LIMIT_PER_CLIENT",
        "200",
        _rate,
        "requests per second, 0 or more (0 turns it off)",
        "JSON-RPC calls per second per client address, all its sessions together",
    ),
    Option(
        "idle_timeout",
        "RELAY_IDLE_TIMEOUT",
        "600",
        _seconds,
        "seconds above zero (fractions allowed)",
        "a session with no message either way for this long is ended (reason idle)",
    ),
    Option(
        "ping_interval",
        "RELAY_PING_INTERVAL",
        "30",
        _seconds,
        "seconds above zero (fractions allowed)",
        "WebSocket ping on both legs after this much silence; no answer within it closes",
    ),
    Option(
        "request_timeout",
        "RELAY_REQUEST_TIMEOUT",
        "60",
        _seconds,
        "seconds above zero (fractions allowed)",
        "a request the node has not answered by then gets a JSON-RPC timeout error",
    ),
    Option(
        "client_buffer_bytes",
        "RELAY_CLIENT_BUFFER_BYTES",
        str(1024 * 1024),
        _positive_int,
        "an integer above zero (bytes)",
        "outbound buffer per connection before the relay stops reading its other side",
    ),
    Option(
        "slow_client_timeout",
        "RELAY_SLOW_CLIENT_TIMEOUT",
        "30",
        _seconds,
        "seconds above zero (fractions allowed)",
        "a connection whose outbound buffer stays full this long is closed (1013)",
    ),
    Option(
        "node_probe_interval",
        "RELAY_NODE_PROBE_INTERVAL",
        "10",
        _seconds,
        "seconds above zero (fractions allowed)",
        "how often each node is probed (system_health and best block)",
    ),
    Option(
        "node_stale_after",
        "RELAY_NODE_STALE_AFTER",
        "60",
        _seconds,
        "seconds above zero (fractions allowed)",
        "a node whose best block has not advanced for this long is taken out",
    ),
    Option(
        "log_format",
        "RELAY_LOG_FORMAT",
        "text",
        _choice("text", "json"),
        "text or json",
        "log line format (json: one object per line)",
    ),
    Option(
        "workers",
        "RELAY_WORKERS",
        "1",
        _workers,
        "an integer 0 or more (0: one per CPU)",
        "worker processes sharing the port (SO_REUSEPORT), supervised",
    ),
    Option(
        "metrics_port",
        "RELAY_METRICS_PORT",
        None,
        _port,
        "an integer 0-65535 (unset: /metrics on the main port)",
        "serve /metrics, /health and /ready on this separate plain-HTTP port instead",
    ),
    Option(
        "metrics_host",
        "RELAY_METRICS_HOST",
        "127.0.0.1",
        _text,
        "an interface address or host name",
        "address of the RELAY_METRICS_PORT listener",
    ),
    Option(
        "proxy_protocol",
        "RELAY_PROXY_PROTOCOL",
        "off",
        _choice("off", "on"),
        "off or on (on needs TLS terminated in front)",
        "expect a PROXY protocol v1/v2 header on every connection; its source address "
        "keys the per-client limits only",
    ),
)


@dataclass(frozen=True, slots=True)
class Settings:
    """The relay's validated configuration (see :data:`OPTIONS` for meanings)."""

    port: int = 8443
    host: str = "0.0.0.0"
    node: tuple[str, ...] = ("ws://127.0.0.1:9944",)
    tls_cert: str | None = None
    tls_key: str | None = None
    max_sessions_per_connection: int = 16
    session_max_age: float = 3600.0
    cleanup_interval: float = 600.0
    log_interval: float = 60.0
    shutdown_timeout: float = 10.0
    log_level: str = "info"
    max_queued_messages: int = 64
    max_message_bytes: int = 16 * 1024 * 1024
    upstream_connect_timeout: float = 10.0
    max_connections: int = 10000
    max_sessions: int = 20000
    max_connections_per_client: int = 64
    rate_limit: float = 50.0
    rate_limit_per_client: float = 200.0
    idle_timeout: float = 600.0
    ping_interval: float = 30.0
    request_timeout: float = 60.0
    client_buffer_bytes: int = 1024 * 1024
    slow_client_timeout: float = 30.0
    node_probe_interval: float = 10.0
    node_stale_after: float = 60.0
    log_format: str = "text"
    workers: int = 1
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    proxy_protocol: str = "off"
    rpc_methods: MethodPolicy = SAFE_POLICY
    max_subscriptions_per_session: int = 64
    max_batch: int = 10

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None


def _describe(raw: str) -> str:
    return repr(raw) if len(raw) <= 200 else repr(raw[:200] + "...")


def load_settings(
    environ: Mapping[str, str], flags: Mapping[str, str | None] | None = None
) -> Settings:
    """Build :class:`Settings` from ``environ`` and ``flags`` (flag wins).

    ``flags`` maps option names (``"port"``) to raw strings, ``None`` meaning not given.
    """
    flags = flags or {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = flags.get(opt.name)
        source = opt.flag
        if raw is None:
            raw = environ.get(opt.env)
            source = opt.env
        if raw is None:
            if opt.default is None:
                values[opt.name] = None
                continue
            raw, source = opt.default, opt.env
        try:
            values[opt.name] = opt.parse(raw)
        except ValueError:
            label = opt.env if source == opt.env else f"{opt.env} ({opt.flag})"
            raise ConfigError(f"invalid {label}={_describe(raw)}: expected {opt.allowed}") from None
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        given, missing = ("RELAY_TLS_CERT", "RELAY_TLS_KEY")
        if values["tls_cert"] is None:
            given, missing = missing, given
        value = values["tls_cert"] if values["tls_key"] is None else values["tls_key"]
        raise ConfigError(
            f"invalid {given}={_describe(value)} without {missing}: "
            "expected both set (TLS) or neither (plain)"
        )
    if values["proxy_protocol"] == "on" and values["tls_cert"] is not None:
        raise ConfigError(
            "invalid RELAY_PROXY_PROTOCOL='on' with RELAY_TLS_CERT set: expected TLS "
            "terminated in front of the relay (the proxy header precedes the TLS handshake)"
        )
    return Settings(**values)
