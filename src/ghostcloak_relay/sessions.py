"""Session state of the whole server: pure bookkeeping, clock injected, no sockets.

One :class:`SessionManager` per relay process holds every session of every connection
and endpoint, so ``sessionId`` uniqueness and ``/health``'s ``activeSessions`` are
server-wide. The connection handlers own the sockets; they ask the manager what to do
and act on its answers (for example :meth:`SessionManager.cleanup` returns the sessions
to tell and close).

Invariants: a session id maps to at most one active session; ``active_count`` equals the
number of sessions whose ``ended_at`` is None; an ended session is kept (so ``get`` can
still report when and why it ended) until ``cleanup`` forgets it once it is older than
``max_age``. Memory is bounded by the session start rate times ``max_age``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .protocol import EndReason

__all__ = ["Session", "SessionExistsError", "SessionManager"]


class SessionExistsError(Exception):
    """``start`` was asked for an id that an active session already uses."""


class Session:
    """One wallet session: one upstream connection, owned by one client connection."""

    __slots__ = ("end_reason", "ended_at", "owner", "session_id", "started_at")

    def __init__(self, session_id: str, owner: object, started_at: float) -> None:
        self.session_id = session_id
        # identity of the connection that started it (compared with `is`); None once ended
        self.owner: object | None = owner
        self.started_at = started_at
        self.ended_at: float | None = None
        self.end_reason: EndReason | None = None

    @property
    def active(self) -> bool:
        return self.ended_at is None

    def __repr__(self) -> str:  # never shows the raw id: reprs end up in logs
        state = "active" if self.active else f"ended:{self.end_reason}"
        return f"<Session {state}>"


class SessionManager:
    """``start``, ``end``, ``get``, ``active_count`` and ``cleanup(max_age)``."""

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._active = 0
        self.started_total = 0
        self._on_change = on_change  # told the new active count (shared with other workers)

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self._active)

    def start(self, session_id: str, owner: object) -> Session:
        """Register a new active session; raise :class:`SessionExistsError` if taken."""
        old = self._sessions.get(session_id)
        if old is not None and old.active:
            raise SessionExistsError
        session = Session(session_id, owner, self._clock())
        self._sessions[session_id] = session
        self._active += 1
        self.started_total += 1
        self._changed()
        return session

    def end(self, session_id: str, reason: EndReason) -> Session | None:
        """Mark the session ended; return it, or None if unknown or already ended."""
        session = self._sessions.get(session_id)
        if session is None or not session.active:
            return None
        session.ended_at = self._clock()
        session.end_reason = reason
        session.owner = None  # an ended record must not keep its connection alive
        self._active -= 1
        self._changed()
        return session

    def discard(self, session_id: str) -> None:
        """Forget a session that never really started (its upstream never opened)."""
        session = self._sessions.pop(session_id, None)
        if session is not None and session.active:
            self._active -= 1
            self.started_total -= 1
            self._changed()

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def active_count(self) -> int:
        return self._active

    def cleanup(self, max_age: float) -> list[Session]:
        """End active sessions older than ``max_age`` (reason ``expired``) and return them;
        forget ended sessions that ended at least ``max_age`` ago."""
        now = self._clock()
        expired: list[Session] = []
        forget: list[str] = []
        for sid, session in self._sessions.items():
            if session.ended_at is None:
                if now - session.started_at >= max_age:
                    session.ended_at = now
                    session.end_reason = EndReason.EXPIRED
                    self._active -= 1
                    expired.append(session)
            elif now - session.ended_at >= max_age:
                forget.append(sid)
        for sid in forget:
            del self._sessions[sid]
        if expired:
            self._changed()
        return expired
