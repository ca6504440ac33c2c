"""A replica: the pool's copy of a LoadedModel in a child process at idle CPU priority, run over sockets.

Pool work on threads of the serving process shares its GIL with line work. A pool thread at idle
priority that holds the GIL (ORT takes it back before `run` returns, and numpy needs it to build the
outputs) and is then preempted by line work stalls every thread of the process until a core falls
idle: a priority inversion that lands in the line's p99. In a process of its own, pool compute can only
take CPU time that line work leaves, and never a lock line work waits for.

This module is the service's side: it starts the child (engine/replica_main.py) with a small spec of the
model, talks to it in frames (engine/frames.py), one Unix stream socket per pool worker, and restarts it
when it dies. The child reopens the same files (same digest, external data included) on the same provider
with the same threads per call and the same request bound, so its outputs are the parent's. The spec is
sent from a thread of its own: the child reads it only after its imports, at idle priority, so a caller
(the event loop, a worker holding the replica's lock) must never wait for that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from appliance import errors
from appliance.engine.frames import receive_message, send_frame, send_message
from appliance.engine.model import LoadedModel
from appliance.engine.priority import lower_priority
from appliance.engine.repository import ModelSource
from appliance.settings import ModelSettings

log = logging.getLogger(__name__)
OOM_SCORE_ADJ = 500  # short of memory, the kernel kills pool work before the line; raising needs no right
LOAD_LIMIT_S = 300.0  # a child not ready by then is given up (killed): pool work runs in-process
SPEC_JOIN_S = 5.0  # the spec's sender ends at once when its socket is shut down; this only bounds it

# What a batch in the child may fail with, carried across by name (engine/replica_main.py sends the
# nearest of these its error is): each is answered as the same error in-process would be, so a memory
# failure is a 503 with its Retry-After (Overloaded) and a request no memory can hold a 413, not a 500.
_ERRORS: dict[str, type[errors.ApplianceError]] = {
    kind.__name__: kind
    for kind in (
        errors.InvalidInput,
        errors.RequestTooLarge,
        errors.InferenceFailed,
        errors.Overloaded,
    )
}


def error_header(exc: errors.ApplianceError) -> dict[str, Any]:
    """The child's frame for a batch that failed with `exc`: the nearest error the parent knows (its
    own class or the closest base of it in _ERRORS; InferenceFailed for none), its message and, for
    Overloaded, when to try again."""
    kind = next((k for k in type(exc).__mro__ if _ERRORS.get(k.__name__) is k), errors.InferenceFailed)
    header: dict[str, Any] = {"error": kind.__name__, "message": str(exc)}
    if isinstance(exc, errors.Overloaded):
        header["retry_after_s"] = float(exc.retry_after_s)
    return header


def raised_error(header: Mapping[str, Any]) -> errors.ApplianceError:
    """The error a child's error frame stands for, as the batch's own."""
    kind = _ERRORS.get(str(header["error"]), errors.InferenceFailed)
    message = str(header["message"])
    if issubclass(kind, errors.Overloaded):
        return kind(message, retry_after_s=float(header.get("retry_after_s", 1.0)))
    return kind(message)


# The parent's side.


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """What the child needs to reopen the parent's model exactly: no more (never the whole Settings)."""

    source: ModelSource
    provider: str
    provider_options: Mapping[str, Any]  # the provider's [providers.<name>] table, as configured
    models: ModelSettings
    cache_dir: Path
    threads_per_call: int
    digest: str  # of model.onnx and its external data (engine/modelfiles.py): the child checks it
    idle_priority: bool = True  # the child computes at idle CPU priority
    max_request_bytes: int | None = None  # the parent's bound on warm-up feeds and batches (engine/bounds.py)

    @classmethod
    def of(
        cls,
        model: LoadedModel,
        *,
        models: ModelSettings,
        provider_options: Mapping[str, Any],
        cache_dir: Path,
        idle_priority: bool = True,
    ) -> ReplicaSpec:
        # Free text (labels: up to a MiB of them; the description, parameters) is for people and model
        # metadata: the child does not need it, and every byte of the spec is one it must read.
        manifest = model.source.manifest.model_copy(
            update={"description": "", "labels": [], "parameters": {}}
        )
        return cls(
            replace(model.source, manifest=manifest),
            model.provider,
            dict(provider_options),
            models,
            cache_dir,
            model.threads_per_call,
            model.digest,
            idle_priority,
            model.max_request_bytes or None,
        )


class _Child:
    """One child process and its sockets (one per channel); replaced whole when it dies."""

    def __init__(self, spec: ReplicaSpec, channels: int) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(channels)]
        self.sockets = [ours for ours, _ in pairs]
        theirs = [child for _, child in pairs]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance.engine.replica_main", *(str(s.fileno()) for s in theirs)],
                pass_fds=[s.fileno() for s in theirs],
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": _package_parent()},
            )
        finally:
            for sock in theirs:
                sock.close()
        if spec.idle_priority:
            lower_priority(self.process.pid)  # before its imports burn a second of CPU at normal priority
        with contextlib.suppress(OSError):  # first for the OOM killer from its start (it writes it too)
            Path(f"/proc/{self.process.pid}/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
        self.ready = [False] * channels
        self.started_s = time.monotonic()
        # Nothing is sent on channel 0 before the child's ready, which it sends once it has read this.
        self.sending = threading.Thread(
            target=self._send_spec, args=(spec,), name=f"replica-spec-{self.process.pid}", daemon=True
        )
        self.sending.start()

    def _send_spec(self, spec: ReplicaSpec) -> None:
        """Send the spec; the child reads it when it gets to it (or dies, or is closed: then nothing)."""
        with contextlib.suppress(OSError):
            send_frame(self.sockets[0], pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL))

    @property
    def has_exited(self) -> bool:
        return self.process.poll() is not None

    def close(self, timeout_s: float) -> int | None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # a spec still being sent fails at once (EPIPE)
        self.sending.join(SPEC_JOIN_S)  # before the close: its fd must not be reused while it sends
        for sock in self.sockets:
            sock.close()
        try:
            return self.process.wait(timeout_s)  # it exits once its sockets close
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


class Replica:
    """The pool's copy of one model in a child process; worker `i` calls `run(i, feed)` from its thread.

    The child starts with `start()` and loads while the service serves. A child that dies is started
    again for the next batch; the batch it held fails with InferenceFailed (it may be what killed it).
    A child that cannot load its model is given up: `failure` says why, and pool work runs in-process.
    """

    def __init__(self, spec: ReplicaSpec, channels: int) -> None:
        self.spec = spec
        self.channels = channels
        self.failure: str | None = None
        self.restarts = 0
        self.ran: dict[int, int] = {}  # batches each child answered, by its pid: pool work really ran there
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._is_closed = False

    @property
    def name(self) -> str:
        return self.spec.source.name

    @property
    def pid(self) -> int | None:
        child = self._child
        return child.process.pid if child is not None and not child.has_exited else None

    @property
    def is_usable(self) -> bool:
        return self.failure is None and not self._is_closed

    def start(self) -> None:
        with self._lock:
            self._current()

    def run(
        self, channel: int, feed: Mapping[str, np.ndarray], wait_s: float | None = None
    ) -> tuple[dict[str, np.ndarray], float]:
        """Run one batch in the child: its outputs and ORT's time on it there.

        Raises the child's InvalidInput, RequestTooLarge, InferenceFailed or Overloaded (with its
        Retry-After) as its own. A child that has not answered within `wait_s` (the caller's: past the
        batch's last deadline) is taken as hung, killed and started again for the next batch; this one
        gets DeadlineExceeded. An idle-priority child is slow while line work keeps the cores: only the
        deadline says when slow is no use.
        """
        with self._lock:
            child = self._current()
        sock = child.sockets[channel]
        try:
            if not child.ready[channel]:
                self._await_ready(child, channel, wait_s)
            send_message(sock, {"inputs": list(feed)}, list(feed.values()))
            sock.settimeout(wait_s)
            header, arrays = receive_message(sock)
            sock.settimeout(None)
        except TimeoutError:
            child.process.kill()  # a stopped or spinning child ends at once; its other batches fail too
            self._lost(child)
            log.warning(
                "model %s: the pool process did not answer in %.1f s; started again", self.name, wait_s
            )
            raise errors.DeadlineExceeded(
                f"model {self.name!r}: the pool process did not answer this batch in {wait_s:.1f} s "
                "(past its deadline; hung); it was killed and is started again for the next one"
            ) from None
        except (OSError, EOFError) as exc:
            code = self._lost(child)
            if self.failure is not None:  # another channel read why the child could not serve
                raise errors.ModelNotReady(f"model {self.name!r}: pool process: {self.failure}") from None
            raise errors.InferenceFailed(
                f"model {self.name!r}: the pool process exited (code {code}) while running this batch "
                f"({type(exc).__name__}); it is started again for the next one"
            ) from None
        if "error" in header:
            raise raised_error(header)
        with self._lock:
            pid = int(header.get("pid", 0))
            self.ran[pid] = self.ran.get(pid, 0) + 1
        return dict(zip(header["outputs"], arrays, strict=True)), header["compute_s"]

    def _await_ready(self, child: _Child, channel: int, wait_s: float | None) -> None:
        """The child's word that it opened the model, waited for no longer than the batch may wait.

        A child still loading fails this batch (DeadlineExceeded) and keeps loading: at idle priority
        on busy cores a load can take longer than one deadline. One not ready `LOAD_LIMIT_S` after its
        start is hung (or starved for good): it is given up, and pool work runs in-process.
        """
        sock = child.sockets[channel]
        readable, _, _ = select.select([sock], [], [], wait_s)
        if not readable:
            loading_s = time.monotonic() - child.started_s
            if loading_s > LOAD_LIMIT_S:
                self._give_up(f"not ready {loading_s:.0f} s after its start (limit {LOAD_LIMIT_S:.0f} s)")
                raise errors.ModelNotReady(f"model {self.name!r}: pool process: {self.failure}")
            raise errors.DeadlineExceeded(
                f"model {self.name!r}: the pool process is still loading the model ({loading_s:.1f} s "
                f"after its start); this batch could not wait {wait_s:.1f} s more"
            )
        header, _ = receive_message(sock)
        if "error" in header:
            self._give_up(header["message"])
            raise errors.ModelNotReady(f"model {self.name!r}: pool process: {header['message']}")
        child.ready[channel] = True

    def close(self, timeout_s: float = 10.0) -> None:
        with self._lock:
            self._is_closed = True
            child, self._child = self._child, None
        if child is not None:
            child.close(timeout_s)

    def _current(self) -> _Child:
        """The running child, started (again) if there is none; under the lock."""
        if self._is_closed:
            raise errors.ModelNotReady(f"model {self.name!r}: the pool process is closed")
        if self._child is not None and self._child.has_exited:
            code = self._child.close(0)
            log.warning("model %s: pool process exited (code %s); starting another", self.name, code)
            self._child = None
            self.restarts += 1
        if self._child is None:
            self._child = _Child(self.spec, self.channels)
            log.info("model %s: pool process %d started", self.name, self._child.process.pid)
        return self._child

    def _lost(self, child: _Child) -> int | None:
        with self._lock:
            if self._child is child:
                self._child = None
                self.restarts += 1
        return child.close(1.0)

    def _give_up(self, reason: str) -> None:
        log.warning("model %s: pool process cannot serve (%s); pool work runs in-process", self.name, reason)
        self.failure = reason
        with self._lock:
            child, self._child = self._child, None
        if child is not None:
            child.close(1.0)


def _package_parent() -> str:
    """The child must import this very package, wherever it was imported from (a checkout, a venv)."""
    here = str(Path(__file__).resolve().parent.parent.parent)
    inherited = os.environ.get("PYTHONPATH")
    return here if not inherited else f"{here}{os.pathsep}{inherited}"
