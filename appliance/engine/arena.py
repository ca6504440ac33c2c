"""A model's sessions after a run failure that may have spoiled their memory arena (engine/failures.py).

ONNX Runtime 1.32's BFCArena keeps the doubled size of its next region when an allocation fails: after a
request that asked 2^63 bytes every later run that needs the arena to grow fails with "Integer overflow"
(and after one that asked more than the machine's memory, the next growth reserves about all of it). The
request doing this is a few bytes (ConstantOfShape of n = 2^61), so what mends the session must cost no
more than such a request, or a client repeating it (a pool peer is a stranger) would slow the line.

So a failure that may spoil the arena is followed at once by a reset: a run of zeros (one row, every open
dimension 1) carrying the run option memory.enable_memory_arena_shrinkage. ORT shrinks the arena at the
end of every run past input validation, one that fails included, and BFCArena::Shrink sets the next
region's size back to its initial one (it also frees the regions nothing uses, the first one aside). On
ORT 1.32's CPU provider (2 cores) that took 12 us on the ConstantOfShape model and a batch-of-one run on
the others (1.4-11 ms), against 9-46 ms of a core to open the 128/224 models' sessions again, 0.75 s a
192 MB model's, up to 0.12 and 1.2 s their solo (all-cores) sessions'. After 3000 rounds of absurd
request and reset on one session, every ordinary request still ran, with no growth in virtual memory.

A session is opened again (renewed, as the engine did before) only where a reset cannot help: ORT names no
arena of the session to shrink (a provider whose allocator is no BFCArena), or the run that met an overflow
met one again right after a reset. A renewal costs a model load, so a model renews at most once every
RENEWAL_INTERVAL_S. Until a session that could not be reset is renewed, a run that meets an overflow on it
is answered 503 with the time left (the box's state, not the request's); the failure that spoiled it keeps
its own answer (413).

A CPU session on the process's bounded arena (engine/memory.py, the default) is never spoiled so: the arena
refuses a buffer past its bound before it doubles anything. It keeps the free regions of earlier runs, and
may refuse a buffer under its bound that they add up to but none holds: the same reset frees them and the
run goes again (once, unless other failures came between); refused again right after it, other runs hold
the memory (503). A new session would share the same arena, so none is opened for that.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import onnxruntime as ort

from appliance.engine.failures import is_overflow, needs_room, spoils_session
from appliance.engine.signature import Signature, example_feed
from appliance.errors import Overloaded
from appliance.providers.host import ort_reason
from appliance.providers.selection import Placement

log = logging.getLogger(__name__)

SHRINK_OPTION = "memory.enable_memory_arena_shrinkage"
# A renewal is a model load: 0.8 s of a core for a 192 MB model here, more for larger ones. One a minute
# per model keeps what any client can make the box spend on them near 1% of a core; a reset does the
# work in every case this was measured in, so a renewal is a rare fallback, not the remedy.
RENEWAL_INTERVAL_S = 60.0
# ORT's refusals of a shrink list naming a device without an arena (checked before the run; nothing shrunk).
_NO_ARENA = ("memory arena shrink list", "not an arena based allocator")
_RAN = "Non-zero status code returned while running"  # ORT's failure of a node: the run had begun
# Runs of one request, at most: the first; after a reset; again after a reset where other failures spoiled
# the arena meanwhile (several requests at once); after a renewal.
ATTEMPTS = 4


class Sessions(Protocol):
    """What the keeper reads and replaces of a model (LoadedModel; model.py imports this module)."""

    signature: Signature
    placement: Placement  # the shared session
    solo: ort.InferenceSession | None
    solo_threads: int
    reopen: Callable[[], ort.InferenceSession] | None

    @property
    def name(self) -> str: ...

    def new_solo_session(self, threads: int) -> ort.InferenceSession: ...


@dataclass(slots=True)
class Tries:
    """One request's failed runs so far (LoadedModel.run), for ArenaKeeper.recover."""

    failed: int = 0
    seen: int = 0  # the keeper's `spoils` when this request's last reset ended


class ArenaKeeper:
    """Resets, and where that cannot help renews, the sessions of one model (LoadedModel.arena).

    Counts what it met and did: `spoils` (failures that may have spoiled an arena, or found a bounded
    one without room: engine/memory.py), `resets` (runs that shrank one) and `renewals` (sessions
    opened again). `lock` also guards the model's sessions against close (LoadedModel.close).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self.clock = clock
        self.spoils = 0  # failures that may have spoiled an arena
        self.resets = 0
        self.renewals = 0
        self._renewed_s = -math.inf
        self._shrink_lists: tuple[str, ...] | None = None  # the lists ORT accepts, once known; () none
        self._feed: dict[str, np.ndarray] | None = None
        self._unreset: dict[bool, ort.InferenceSession] = {}  # spoiled, no reset possible: by `solo`
        self._warned = False  # that a reset run was refused (once: every spoiled run would say it)

    def recover(
        self, model: Sessions, spoiled: ort.InferenceSession, exc: Exception, *, solo: bool, tries: Tries
    ) -> ort.InferenceSession | Overloaded | None:
        """After `exc` failed a run of a request on `spoiled` (the model's solo session where `solo`;
        `tries`: the request's failed runs so far): the session to run it again on, or None (answer `exc`:
        failures.translate), or the Overloaded to answer. Only an overflow runs again: it may be what an
        arena another request spoiled answers any run that needs it to grow, which a reset (or a new
        session) does not have. And a buffer a bounded arena refused under its bound (engine/memory.py)
        runs again once after a reset: the arena keeps the free regions of earlier runs, which may add up
        to what it needs but none of which holds it, and the reset frees them."""
        crowded = needs_room(exc)
        if not crowded and not spoils_session(exc):
            return None
        overflow = is_overflow(exc)
        with self.lock:
            others = tries.failed > 0 and self.spoils > tries.seen  # since this request's last reset
            self.spoils += 1
        # Still no room right after a reset that no other failure followed: other runs hold the memory.
        held = crowded and tries.failed > 0 and not others
        reset = not held and self._reset(model, spoiled)  # outside the lock: ORT's shrink takes the arena's
        with self.lock:
            tries.failed, tries.seen = tries.failed + 1, self.spoils
            self.resets += reset
            more = (overflow or crowded) and tries.failed < ATTEMPTS
            current = model.solo if solo else model.placement.session
            if current is not spoiled:  # another run renewed (or dropped) it meanwhile; closed: None
                again = current if current is not None else model.placement.session
                return again if more else None
            if crowded:  # a new session would share the same arena: only a reset makes room, or time
                again = reset and more and (tries.failed == 1 or others)
                return spoiled if again else None
            if reset:
                self._unreset.pop(solo, None)
                if tries.failed == 1 or others:  # others spoil it as fast as it is reset: once more
                    return spoiled if more else None
                if not more:
                    return None
            # No arena of this session could be reset, or the run met an overflow again right after a
            # reset that no other failure followed: the request's own size, or an arena the reset did
            # not mend. Only a new session tells.
            wait_s = self._renewed_s + RENEWAL_INTERVAL_S - self.clock()
            if wait_s <= 0:
                fresh = self._renew(model, spoiled, solo=solo)
                return fresh if more and fresh is not None else None
            if reset:
                return None
            known = self._unreset.get(solo) is spoiled  # spoiled before this run met it
            self._unreset[solo] = spoiled
            if overflow and known:
                return Overloaded(
                    f"model {model.name!r} cannot run requests that need more memory now: a request "
                    f"spoiled its session's memory arena, which is renewed in {wait_s:.0f} s",
                    retry_after_s=max(1.0, wait_s),
                )
            return None

    def forget(self) -> None:
        """Let go of the model's sessions (LoadedModel.close, under `lock`)."""
        self._unreset.clear()

    def _reset(self, model: Sessions, session: ort.InferenceSession) -> bool:
        """Run zeros on `session` with arena shrinkage; whether ORT got as far as shrinking. (What it
        learns, the feed and the lists ORT accepts, is the same whichever thread learns it first.)"""
        if self._feed is None:
            self._feed = reset_feed(model)
        for shrink in self._shrink_lists if self._shrink_lists is not None else shrink_lists(session):
            options = ort.RunOptions()
            options.add_run_config_entry(SHRINK_OPTION, shrink)
            try:
                session.run(None, self._feed, options)
            except Exception as exc:  # noqa: BLE001 - ORT raises many types; a failing run shrinks too
                text = str(exc)
                if any(marker in text for marker in _NO_ARENA):  # the list without that device, if any
                    continue
                # A kernel that could not compute with the zeros (a 3x3 Conv over 1x1, a Gather past
                # them: "Non-zero status code returned while running <node>", INVALID_ARGUMENT too) ran:
                # the arena shrank at the run's end. Refused before it ran (the feed's own checks), or by
                # Python's: nothing shrank (then the session is renewed, once a minute at most).
                ran = _RAN in text
                if not ran and (
                    "INVALID_ARGUMENT" in text or not type(exc).__module__.startswith("onnxruntime")
                ):
                    if not self._warned:
                        log.warning("model %s: no reset of a spoiled arena: %s", model.name, ort_reason(exc))
                        self._warned = True
                    return False
            self._shrink_lists = (shrink,)
            return True
        self._shrink_lists = ()
        return False

    def _renew(
        self, model: Sessions, spoiled: ort.InferenceSession, *, solo: bool
    ) -> ort.InferenceSession | None:
        """A new session in place of `spoiled` (under `lock`); None where none could be made (it keeps
        the old one). A solo session that cannot be made again is dropped: lone requests run on the
        shared one."""
        self._renewed_s = self.clock()  # a failed attempt costs as much: it counts
        try:
            if solo:
                fresh = model.new_solo_session(model.solo_threads)
            elif model.reopen is not None:
                fresh = model.reopen()
            else:
                return None
        except Exception as exc:  # noqa: BLE001 - ORT raises many types; the model serves as it can
            log.error("model %s: could not replace a spoiled session: %s", model.name, ort_reason(exc))
            if solo:
                model.solo = None
                self._unreset.pop(solo, None)
                return model.placement.session
            return None
        self.renewals += 1
        self._unreset.pop(solo, None)
        if solo:
            model.solo = fresh
        else:
            model.placement.session = fresh
        log.warning(
            "model %s: a run failed in a way that can spoil its session's memory arena and a reset did not "
            "mend it; the %s session was replaced",
            model.name,
            "solo" if solo else "shared",
        )
        return fresh


def shrink_lists(session: ort.InferenceSession) -> tuple[str, ...]:
    """The run option's device lists to try, most first: a device provider's arena and the host's (ORT
    refuses a list naming a device without an arena: the next one leaves it out)."""
    provider = session.get_providers()[0]
    if provider == "CPUExecutionProvider":
        return ("cpu:0",)
    device = str(session.get_provider_options().get(provider, {}).get("device_id", "0"))
    return (f"cpu:0;gpu:{device}", "cpu:0")


def reset_feed(model: Sessions) -> dict[str, np.ndarray]:
    """Zeros (empty strings) for every input: one row, every open dimension 1 (the cheapest inputs that
    every model takes; ORT shrinks after the run even if the model cannot compute with them)."""
    feed = example_feed(model.signature, None, open_as=1)
    assert feed is not None  # no dimension is left open
    return feed
