"""Logging that cannot identify a wallet.

Rules (``docs/privacy.md``): no client IP or port, no raw session id, no payload, method
or parameter, no client header value, no exception text, at every level. Events that
must be correlated use :func:`ref`, a keyed hash with a random per-process key, so the
same session shows the same short token within one process and nothing outside it can
recompute it. picows logs peer addresses at INFO, so its loggers are given a logger
that is switched off (:data:`SILENT`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import sys
import time
import traceback
from types import TracebackType
from typing import Any

__all__ = ["SILENT", "configure_logging", "ref", "safe_exception"]

_KEY = secrets.token_bytes(32)

#: A logger that drops everything, for libraries that would log peer addresses.
_SILENCED = logging.Logger("ghostcloak_relay.silenced", logging.CRITICAL + 10)
_SILENCED.propagate = False
_SILENCED.disabled = True
#: An adapter rather than the Logger itself: given a Logger, picows makes a child Logger
#: for every connection (about a kilobyte each); given an adapter it uses it as it is.
SILENT: logging.LoggerAdapter[logging.Logger] = logging.LoggerAdapter(_SILENCED, {})


def ref(value: str) -> str:
    """A short keyed hash of ``value`` for correlating log lines (not reversible)."""
    return hashlib.blake2b(value.encode(), key=_KEY, digest_size=6).hexdigest()


def safe_exception(exc: BaseException) -> str:
    """Exception type and where it was raised, without its message (which may hold data)."""
    tb: TracebackType | None = exc.__traceback__
    where = ""
    if tb is not None:
        last = traceback.extract_tb(tb)[-1]
        where = f" at {last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
    return f"{type(exc).__name__}{where}"


class _NoExceptionText(logging.Formatter):
    """Formats tracebacks as type and location only, whatever a caller passes."""

    def formatException(self, ei: Any) -> str:
        exc = ei[1]
        return "exception: " + (safe_exception(exc) if exc is not None else "unknown")

    def formatStack(self, stack_info: str) -> str:
        return ""


class _JsonFormatter(_NoExceptionText):
    """One JSON object per line, for log shippers; the same privacy rules as text."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, fmt: str = "text") -> None:
    """Send relay logs to stderr at ``level`` as ``text`` or ``json``; quiet libraries."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        formatter: logging.Formatter = _JsonFormatter()
        formatter.converter = time.gmtime
    else:
        formatter = _NoExceptionText("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # picows is always given SILENT, but in case a default logger sneaks in:
    logging.getLogger("picows").setLevel(logging.CRITICAL + 10)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL + 10)
