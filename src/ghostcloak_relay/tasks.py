"""Task ownership: every background task has an owner that cancels and awaits it.

picows calls listeners synchronously, so work that must await (dialing a node) is
started as a task from a callback. Such tasks are never fire-and-forget: they are
spawned through a :class:`TaskOwner`, which keeps a reference, logs a failure without
its text, and cancels and awaits every task in :meth:`TaskOwner.aclose`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

from .logs import safe_exception

__all__ = ["TaskOwner"]

log = logging.getLogger("ghostcloak_relay.tasks")
T = TypeVar("T")


class TaskOwner:
    """A set of tasks with one owner (a connection, the server)."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("task %s failed: %s", task.get_name(), safe_exception(exc))

    async def aclose(self) -> None:
        """Cancel every task and wait until all have finished."""
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
