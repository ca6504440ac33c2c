"""A replica: the pool's copy of a LoadedModel in a child process at idle CPU priority, run over sockets.

Pool work on threads of the serving process shares its GIL with line work. A pool thread at idle
priority that holds the GIL (ORT takes it back before `run` returns, and numpy needs it to build the
outputs) and is then preempted by line work stalls every thread of the process until a core falls
idle: a priority inversion that lands in the line's p99. In a process of its own, pool compute can only
take CPU time that line work leaves, and never a lock line work waits for.

The child reopens the same file (same digest) on the same provider with the same threads per call, so
its outputs are the parent's. Parent and child talk over one Unix stream socket per pool worker. A
message is frames: an 8-byte little-endian length, then that many bytes. The first frame is a JSON header
naming each tensor's dtype and shape; one frame per tensor follows, the array's bytes as they lie in
memory (BYTES tensors, numpy object arrays, pickled). The child answers `run` with the outputs, or with
{"error": kind, "message": text} for the caller to raise.

    python -m appliance.engine.replica FD [FD ...]     (started by Replica; not a command for people)
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from appliance import errors
from appliance.engine.model import LoadedModel
from appliance.engine.repository import ModelSource, file_digest
from appliance.settings import Settings

log = logging.getLogger(__name__)

_LENGTH = struct.Struct("<Q")
_OOM_SCORE_ADJ = 500  # the child's; raising one's own needs no privilege
_PICKLED = "pickle"
_ERRORS: dict[str, type[errors.ApplianceError]] = {
    "InvalidInput": errors.InvalidInput,
    "InferenceFailed": errors.InferenceFailed,
}


# Frames, for both sides.


def send_message(sock: socket.socket, header: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """One header and its tensors; a numeric tensor's bytes go to the socket without a copy."""
    metas: list[list[Any]] = []
    payloads: list[Any] = []
    for array in arrays:
        if array.dtype == object:
            metas.append([_PICKLED, list(array.shape)])
            payloads.append(pickle.dumps(array, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            contiguous = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d
            metas.append([contiguous.dtype.str, list(contiguous.shape)])
            payloads.append(contiguous.reshape(-1).view(np.uint8))
    head = orjson.dumps({**header, "tensors": metas})
    sock.sendall(_frame(head))
    for payload in payloads:
        sock.sendall(_LENGTH.pack(len(payload)))
        if len(payload):
            sock.sendall(payload)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and its tensors; EOFError when the other side has gone."""
    header = orjson.loads(_receive_frame(sock))
    arrays: list[np.ndarray] = []
    for dtype, shape in header.pop("tensors"):
        data = _receive_frame(sock)
        if dtype == _PICKLED:
            arrays.append(pickle.loads(data))
        else:
            arrays.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape))
    return header, arrays


def _receive_frame(sock: socket.socket) -> bytearray:
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    return _receive_exactly(sock, length)


def _receive_exactly(sock: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)  # writable: ONNX Runtime and numpy take views of it as they are
    view = memoryview(buffer)
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise EOFError("the other end closed the socket")
        view = view[count:]
    return buffer


# The parent's side.


@dataclass(frozen=True, slots=True)
class ReplicaSpec:
    """What the child needs to reopen the parent's model exactly."""

    settings: Settings
    source: ModelSource
    provider: str
    threads_per_call: int
    digest: str

    @classmethod
    def of(cls, model: LoadedModel, settings: Settings) -> ReplicaSpec:
        return cls(settings, model.source, model.provider, model.threads_per_call, model.digest)


class _Child:
    """One child process and its sockets (one per channel); replaced whole when it dies."""

    def __init__(self, spec: ReplicaSpec, channels: int) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(channels)]
        self.sockets = [ours for ours, _ in pairs]
        theirs = [child for _, child in pairs]
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "appliance.engine.replica", *(str(s.fileno()) for s in theirs)],
                pass_fds=[s.fileno() for s in theirs],
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": _package_parent()},
            )
        finally:
            for sock in theirs:
                sock.close()
        _lower_priority(self.process.pid)  # before its imports burn a second of CPU at normal priority
        self.ready = [False] * channels
        self.sockets[0].sendall(_frame(pickle.dumps(spec, protocol=pickle.HIGHEST_PROTOCOL)))

    @property
    def has_exited(self) -> bool:
        return self.process.poll() is not None

    def close(self, timeout_s: float) -> int | None:
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
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

    def run(self, channel: int, feed: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Run one batch in the child: its outputs and ORT's time on it there.

        Raises the child's InvalidInput or InferenceFailed as its own.
        """
        with self._lock:
            child = self._current()
        sock = child.sockets[channel]
        try:
            if not child.ready[channel]:
                header, _ = receive_message(sock)
                if "error" in header:
                    self._give_up(header["message"])
                    raise errors.ModelNotReady(f"model {self.name!r}: pool process: {header['message']}")
                child.ready[channel] = True
            send_message(sock, {"inputs": list(feed)}, list(feed.values()))
            header, arrays = receive_message(sock)
        except (OSError, EOFError) as exc:
            code = self._lost(child)
            if self.failure is not None:  # another channel read why the child could not serve
                raise errors.ModelNotReady(f"model {self.name!r}: pool process: {self.failure}") from None
            raise errors.InferenceFailed(
                f"model {self.name!r}: the pool process exited (code {code}) while running this batch "
                f"({type(exc).__name__}); it is started again for the next one"
            ) from None
        if "error" in header:
            raise _ERRORS.get(header["error"], errors.InferenceFailed)(header["message"])
        return dict(zip(header["outputs"], arrays, strict=True)), header["compute_s"]

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


def _frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data


def _package_parent() -> str:
    """The child must import this very package, wherever it was imported from (a checkout, a venv)."""
    here = str(Path(__file__).resolve().parent.parent.parent)
    inherited = os.environ.get("PYTHONPATH")
    return here if not inherited else f"{here}{os.pathsep}{inherited}"


# The child's side.


def _lower_priority(pid: int = 0) -> None:
    """SCHED_IDLE for a process (threads it starts later inherit it); nice 19 where refused."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        with contextlib.suppress(AttributeError, OSError):
            os.setpriority(os.PRIO_PROCESS, pid, 19)


def _open(spec: ReplicaSpec) -> LoadedModel:
    from appliance.providers.registry import Registry  # the child's own discovery of plugins and EPs

    try:
        digest = file_digest(spec.source.path)
    except OSError as exc:
        raise errors.ModelLoadError(f"cannot read {spec.source.path}: {exc.strerror}") from exc
    if digest != spec.digest:
        raise errors.ModelLoadError(
            f"{spec.source.path} changed since the service loaded it (sha256 {digest}, served {spec.digest})"
        )
    registry = Registry.discover()
    model = LoadedModel.load(
        spec.source,
        registry=registry,
        settings=spec.settings.models,
        provider_configs=registry.configs(spec.settings.providers),
        cache_dir=spec.settings.system.cache_dir,
        threads_per_call=spec.threads_per_call,
        providers=[spec.provider],
    )
    model.warm_up(0)  # first runs allocate; the parent's profile is the one that counts
    return model


def _serve(model: LoadedModel, sock: socket.socket) -> None:
    with contextlib.suppress(OSError, EOFError):
        send_message(sock, {"ready": True, "pid": os.getpid()})
        while True:
            header, arrays = receive_message(sock)
            feed = dict(zip(header["inputs"], arrays, strict=True))
            try:
                started = time.perf_counter()
                outputs = model.run(feed)
                compute_s = time.perf_counter() - started
            except errors.ApplianceError as exc:
                send_message(sock, {"error": type(exc).__name__, "message": str(exc)})
                continue
            except Exception as exc:  # a bug must still answer, or the parent's worker waits for ever
                log.exception("pool process for model %s: batch failed unexpectedly", model.name)
                message = (
                    f"model {model.name!r}: internal error in the pool process: {type(exc).__name__}: {exc}"
                )
                send_message(sock, {"error": "InferenceFailed", "message": message})
                continue
            send_message(sock, {"outputs": list(outputs), "compute_s": compute_s}, list(outputs.values()))


def main(argv: list[str]) -> int:
    # The parent drains on SIGTERM and closes the sockets when done; the child ends with them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.ERROR)  # what goes wrong reaches the parent in an error frame
    _lower_priority()
    with contextlib.suppress(OSError):  # short of memory, the kernel kills pool work before the line
        Path("/proc/self/oom_score_adj").write_text(str(_OOM_SCORE_ADJ))
    sockets = [socket.socket(fileno=int(fd)) for fd in argv]
    try:
        spec: ReplicaSpec = pickle.loads(_receive_frame(sockets[0]))
        model = _open(spec)
    except (OSError, EOFError):
        return 1
    except errors.ApplianceError as exc:
        for sock in sockets:
            with contextlib.suppress(OSError):
                send_message(sock, {"error": type(exc).__name__, "message": str(exc)})
        return 1
    threads = [threading.Thread(target=_serve, args=(model, sock), daemon=True) for sock in sockets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
