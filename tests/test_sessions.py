"""SessionManager: pure session bookkeeping with an injected clock."""

from __future__ import annotations

import pytest

from ghostcloak_relay.protocol import EndReason, new_session_id
from ghostcloak_relay.sessions import Session, SessionExistsError, SessionManager

A = "session-aaaaaaaa"
B = "session-bbbbbbbb"
C = "session-cccccccc"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def manager(clock: FakeClock) -> SessionManager:
    return SessionManager(clock=clock)


OWNER = object()


# -- start / get / end / active_count ------------------------------------------------------


def test_new_manager_is_empty(manager: SessionManager):
    assert manager.active_count() == 0
    assert manager.get(A) is None


def test_start_registers_an_active_session(manager: SessionManager, clock: FakeClock):
    session = manager.start(A, OWNER)
    assert isinstance(session, Session)
    assert session.session_id == A
    assert session.owner is OWNER
    assert session.started_at == clock.now
    assert session.ended_at is None
    assert session.end_reason is None
    assert session.active
    assert manager.get(A) is session
    assert manager.active_count() == 1


def test_active_count_follows_starts_and_ends(manager: SessionManager):
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    manager.start(C, OWNER)
    assert manager.active_count() == 3
    manager.end(B, EndReason.CLIENT)
    assert manager.active_count() == 2
    manager.end(A, EndReason.UPSTREAM_CLOSED)
    manager.end(C, EndReason.SHUTDOWN)
    assert manager.active_count() == 0


def test_end_marks_the_session_ended_with_time_and_reason(
    manager: SessionManager, clock: FakeClock
):
    started = manager.start(A, OWNER)
    clock.advance(42.5)
    ended = manager.end(A, EndReason.UPSTREAM_ERROR)
    assert ended is started
    assert ended.ended_at == clock.now
    assert ended.end_reason is EndReason.UPSTREAM_ERROR
    assert not ended.active
    assert manager.active_count() == 0
    # kept, so the relay can still tell when and why it ended
    assert manager.get(A) is started


def test_end_only_touches_the_named_session(manager: SessionManager):
    manager.start(A, OWNER)
    other = manager.start(B, OWNER)
    manager.end(A, EndReason.CLIENT)
    assert other.active
    assert manager.get(B) is other


def test_end_unknown_session_returns_none(manager: SessionManager):
    assert manager.end(A, EndReason.CLIENT) is None
    assert manager.active_count() == 0


def test_end_twice_returns_none_the_second_time(manager: SessionManager, clock: FakeClock):
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    first = manager.end(A, EndReason.CLIENT)
    assert first is not None
    ended_at = first.ended_at
    clock.advance(5)
    assert manager.end(A, EndReason.SHUTDOWN) is None
    # the second end changes nothing: time, reason and count stay
    assert first.ended_at == ended_at
    assert first.end_reason is EndReason.CLIENT
    assert manager.active_count() == 1


def test_start_with_an_active_id_raises_and_keeps_the_original(manager: SessionManager):
    original = manager.start(A, OWNER)
    intruder = object()
    with pytest.raises(SessionExistsError):
        manager.start(A, intruder)
    assert manager.get(A) is original
    assert original.owner is OWNER
    assert original.active
    assert manager.active_count() == 1


def test_an_ended_id_can_be_started_again(manager: SessionManager, clock: FakeClock):
    old = manager.start(A, OWNER)
    manager.end(A, EndReason.CLIENT)
    clock.advance(1)
    owner2 = object()
    new = manager.start(A, owner2)
    assert new is not old
    assert new.active
    assert new.owner is owner2
    assert new.started_at == clock.now
    assert manager.get(A) is new
    assert manager.active_count() == 1
    # and the restarted one ends normally
    assert manager.end(A, EndReason.CLIENT) is new
    assert manager.active_count() == 0


def test_started_total_counts_every_start(manager: SessionManager):
    manager.start(A, OWNER)
    manager.end(A, EndReason.CLIENT)
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    with pytest.raises(SessionExistsError):
        manager.start(B, OWNER)
    assert manager.started_total == 3


# -- cleanup -------------------------------------------------------------------------------


def test_cleanup_expires_exactly_the_sessions_at_or_over_max_age(
    manager: SessionManager, clock: FakeClock
):
    old = manager.start(A, OWNER)  # age 30 at cleanup
    clock.advance(10)
    boundary = manager.start(B, OWNER)  # age 20 == max_age
    clock.advance(0.5)
    young = manager.start(C, OWNER)  # age 19.5
    clock.advance(19.5)

    expired = manager.cleanup(20)

    assert sorted(s.session_id for s in expired) == sorted([A, B])
    assert all(s.end_reason is EndReason.EXPIRED for s in expired)
    for session in (old, boundary):
        assert session.ended_at == clock.now
        assert not session.active
    assert young.active
    assert young.end_reason is None
    assert manager.active_count() == 1
    # expired sessions are still reported by get
    assert manager.get(A) is old
    assert manager.get(B) is boundary


def test_cleanup_does_not_expire_a_session_twice(manager: SessionManager, clock: FakeClock):
    manager.start(A, OWNER)
    clock.advance(100)
    assert len(manager.cleanup(50)) == 1
    clock.advance(1)
    assert manager.cleanup(50) == []
    assert manager.active_count() == 0


def test_cleanup_with_nothing_old_returns_empty(manager: SessionManager, clock: FakeClock):
    manager.start(A, OWNER)
    clock.advance(10)
    assert manager.cleanup(3600) == []
    assert manager.active_count() == 1


def test_cleanup_does_not_re_end_sessions_ended_by_the_client(
    manager: SessionManager, clock: FakeClock
):
    session = manager.start(A, OWNER)
    clock.advance(100)
    manager.end(A, EndReason.CLIENT)
    expired = manager.cleanup(50)
    assert expired == []
    assert session.end_reason is EndReason.CLIENT
    assert manager.active_count() == 0


def test_cleanup_forgets_old_ended_sessions_and_keeps_young_ones(
    manager: SessionManager, clock: FakeClock
):
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    manager.start(C, OWNER)
    manager.end(A, EndReason.CLIENT)  # will have ended 100 s before cleanup
    clock.advance(70)
    manager.end(B, EndReason.UPSTREAM_CLOSED)  # will have ended 30 s before cleanup
    clock.advance(30)
    c_session = manager.get(C)

    expired = manager.cleanup(60)

    assert manager.get(A) is None  # ended longer ago than max_age: forgotten
    b_session = manager.get(B)
    assert b_session is not None
    assert b_session.end_reason is EndReason.UPSTREAM_CLOSED
    # C was active and 100 s old: it expires now and is kept for reporting
    assert expired == [c_session]
    assert manager.get(C) is c_session
    assert manager.active_count() == 0

    clock.advance(61)
    assert manager.cleanup(60) == []
    assert manager.get(B) is None
    assert manager.get(C) is None
    assert manager.active_count() == 0


def test_forgotten_id_can_be_started_again(manager: SessionManager, clock: FakeClock):
    manager.start(A, OWNER)
    manager.end(A, EndReason.CLIENT)
    clock.advance(10)
    manager.cleanup(5)
    assert manager.get(A) is None
    assert manager.start(A, OWNER).active
    assert manager.active_count() == 1


def test_cleanup_keeps_memory_bounded(manager: SessionManager, clock: FakeClock):
    ids = [new_session_id() for _ in range(500)]
    for sid in ids:
        manager.start(sid, OWNER)
        manager.end(sid, EndReason.CLIENT)
        clock.advance(1)
    clock.advance(10)
    manager.cleanup(10)
    assert [sid for sid in ids if manager.get(sid) is not None] == []
    assert manager.active_count() == 0


# -- discard -------------------------------------------------------------------------------


def test_discard_forgets_an_active_session(manager: SessionManager):
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    manager.discard(A)
    assert manager.get(A) is None
    assert manager.active_count() == 1
    assert manager.started_total == 1
    assert manager.end(A, EndReason.CLIENT) is None
    # the id is free again
    assert manager.start(A, OWNER).active


def test_discard_ended_session_does_not_change_active_count(manager: SessionManager):
    manager.start(A, OWNER)
    manager.start(B, OWNER)
    manager.end(A, EndReason.CLIENT)
    manager.discard(A)
    assert manager.get(A) is None
    assert manager.active_count() == 1


def test_discard_unknown_is_a_no_op(manager: SessionManager):
    manager.start(A, OWNER)
    manager.discard(B)
    assert manager.active_count() == 1
    assert manager.get(A) is not None


# -- repr ----------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", list(EndReason))
def test_session_repr_never_contains_the_session_id(manager: SessionManager, reason: EndReason):
    sid = new_session_id()
    uuid_sid = "3f2b8c1e-9d4a-4e6f-8a7b-1c2d3e4f5a6b"
    for session_id in (sid, uuid_sid):
        session = manager.start(session_id, OWNER)
        for text in (repr(session), str(session), f"{session!r}", repr([session])):
            assert session_id not in text
            assert session_id[:8] not in text
        manager.end(session_id, reason)
        for text in (repr(session), str(session)):
            assert session_id not in text
            assert session_id[:8] not in text
        assert reason.value in repr(session)


def test_session_repr_shows_state(manager: SessionManager):
    session = manager.start(A, OWNER)
    assert "active" in repr(session)
    manager.end(A, EndReason.IDLE)
    assert "idle" in repr(session)
