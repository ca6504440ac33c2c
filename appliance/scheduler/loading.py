"""Model loads with a deadline: each on a daemon thread of its own, awaited for at most a time limit.

Nothing can stop a thread inside ONNX Runtime, so a load past its deadline is left behind: being a
daemon thread, it does not hold the process's exit (the default executor's threads are joined at exit,
and by asyncio.run), and if it ever finishes, what it loaded is closed there and then, never served.
While it runs, no further load of that model starts (one stuck thread per model), and the process
exits without the interpreter's teardown (`exit_if_loads_stuck`).
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from appliance.errors import ModelLoadError

log = logging.getLogger(__name__)

T = TypeVar("T")

_abandoned_loads: list[tuple[str, threading.Thread]] = []  # every DeadlineLoads', for the exit


class DeadlineLoads(Generic[T]):
    """One hub's loads. `abandoned`: the loads that passed their deadline and may still run, by model."""

    def __init__(self, discard: Callable[[T], None]) -> None:
        self.discard = discard  # closes what a load abandoned at its deadline finished with after all
        self.abandoned: dict[str, threading.Thread] = {}

    async def run(self, name: str, load: Callable[[], T], timeout_s: float) -> T:
        """`load()` on a daemon thread, awaited for at most `timeout_s`: ModelLoadError past it.

        The caller being cancelled (a stop while loading) abandons the load the same way."""
        if (stuck := self.abandoned.get(name)) is not None:
            if stuck.is_alive():
                raise ModelLoadError(
                    f"model {name!r}: its last load passed the {timeout_s:g} s deadline and is "
                    "still running; restart the service to load it again"
                )
            del self.abandoned[name]
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()
        lock = threading.Lock()
        state = {"finished": False, "abandoned": False}

        def settle(outcome: T | None, error: BaseException | None) -> None:  # on the loop
            if error is not None:
                done.set_exception(error)
            else:
                done.set_result(outcome)  # type: ignore[arg-type]

        def work() -> None:
            outcome, error = None, None
            try:
                outcome = load()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task as it is
                error = exc
            with lock:
                state["finished"] = True
                if not state["abandoned"]:
                    try:
                        loop.call_soon_threadsafe(settle, outcome, error)
                        return
                    except RuntimeError:  # the loop is closed: nobody waits for it any more
                        pass
            self._late(name, outcome, error)

        thread = threading.Thread(target=work, name=f"load {name}", daemon=True)
        thread.start()
        try:
            return await asyncio.wait_for(asyncio.shield(done), timeout_s)
        except BaseException as exc:
            if done.done() and exc is done.exception():
                raise  # the load's own failure
            with lock:
                state["abandoned"] = not state["finished"]
            if state["abandoned"]:
                self.abandoned[name] = thread
                _keep_abandoned(name, thread)
            elif isinstance(exc, TimeoutError):
                return await done  # it finished at the deadline: its result is on the way
            else:  # cancelled as it finished: close what it loaded when it arrives
                done.add_done_callback(
                    lambda f: self._late(name, None if f.exception() else f.result(), f.exception())
                )
            if isinstance(exc, TimeoutError):
                log.error(
                    "model %s did not load in %g s (models.load_timeout_s); its loading thread is left to "
                    "end on its own, and what it loads is discarded",
                    name,
                    timeout_s,
                )
                raise ModelLoadError(
                    f"model {name!r} did not load in {timeout_s:g} s (models.load_timeout_s)"
                ) from None
            raise

    def _late(self, name: str, outcome: T | None, error: BaseException | None) -> None:
        """What a load finished with after nobody waited for it any more: closed, never served."""
        if outcome is not None:
            self.discard(outcome)
            log.warning("model %s: a load abandoned at its deadline finished after all; discarded", name)
        else:
            log.warning("model %s: a load abandoned at its deadline ended: %s", name, error)


def stuck_loads() -> list[str]:
    """The models whose load passed its deadline and whose thread still runs, in any hub."""
    _abandoned_loads[:] = [(name, thread) for name, thread in _abandoned_loads if thread.is_alive()]
    return [name for name, _ in _abandoned_loads]


def exit_if_loads_stuck(status: int) -> None:
    """End the process now with `status` if a load thread is stuck, without the interpreter's teardown.

    That thread is inside ONNX Runtime: a normal exit tears the runtime down under it, and the process
    dies of SIGABRT ("terminate called without an active exception") instead of exiting. The service
    calls this once it has stopped; an exit hook calls it with 1 where nothing did."""
    if names := stuck_loads():
        log.warning("exiting with the load of %s still stuck: skipping ONNX Runtime's teardown", names)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os._exit(status)


def _keep_abandoned(name: str, thread: threading.Thread) -> None:
    atexit.unregister(exit_if_loads_stuck)
    atexit.register(exit_if_loads_stuck, 1)  # runs before the teardown (once: unregistered first)
    _abandoned_loads.append((name, thread))
