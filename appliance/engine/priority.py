"""CPU priority of compute: the one way a thread or process drops to idle priority, and back."""

from __future__ import annotations

import contextlib
import logging
import os
import threading

log = logging.getLogger(__name__)

IDLE_NICE = 19  # where SCHED_IDLE is refused


def lower_priority(target: int = 0) -> bool:
    """SCHED_IDLE for `target` (a process or thread id; 0: the calling thread), nice 19 where that is
    refused; neither needs a privilege. Threads a process starts later inherit it. False if both fail."""
    try:
        os.sched_setscheduler(target, os.SCHED_IDLE, os.sched_param(0))
        return True
    except (AttributeError, OSError):
        pass
    try:
        os.setpriority(os.PRIO_PROCESS, target or threading.get_native_id(), IDLE_NICE)
        return True
    except (AttributeError, OSError):
        return False


class ThreadPriority:
    """CPU priority of a pool worker thread: lowest while ONNX Runtime computes, normal otherwise.

    Pool work at idle priority only gets the CPU that line work and the event loop leave: the kernel,
    not a preemption, keeps line latency. But a thread that holds the GIL must not sit at the lowest
    priority, or everyone waits for it (priority inversion): so the thread drops its priority only
    around `session.run`, which releases the GIL, and takes it back after. Going back needs
    RLIMIT_NICE >= 20 (the unit's LimitNICE=+0, or root); without it the thread stays low and the
    windows are short anyway. Create it on the thread it governs.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.can_restore = True
        self.lower()
        self.restore()
        if not self.can_restore:
            self.lower()

    def lower(self) -> None:
        if not lower_priority():
            log.warning("thread %s keeps normal CPU priority: neither SCHED_IDLE nor nice allowed", self.name)

    def restore(self) -> None:
        if not self.can_restore:
            return
        try:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 0)
        except (AttributeError, OSError) as exc:
            self.can_restore = False
            log.info(
                "thread %s stays at the lowest CPU priority (%s); raise LimitNICE to toggle", self.name, exc
            )

    @contextlib.contextmanager
    def lowered(self):  # type: ignore[no-untyped-def]
        """Lowest priority for the block (a `session.run`), normal again after."""
        self.lower()
        try:
            yield
        finally:
            self.restore()
