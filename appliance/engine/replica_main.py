"""The pool process itself: it reopens the service's model from a ReplicaSpec and runs batches sent to it.

    python -m appliance.engine.replica_main FD [FD ...]     (started by engine/replica.py; not for people)

It runs at idle CPU priority with a raised OOM score, ignores SIGTERM (the service drains first, then
closes the sockets, and the child ends with them), and answers every batch, with outputs or an error
frame the parent raises as the batch's own error.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from appliance import errors
from appliance.engine.frames import receive_frame, receive_message, send_message
from appliance.engine.model import LoadedModel
from appliance.engine.priority import lower_priority
from appliance.engine.replica import OOM_SCORE_ADJ, ReplicaSpec, error_header

log = logging.getLogger(__name__)


def open_model(spec: ReplicaSpec) -> LoadedModel:
    """The parent's model, reopened exactly: same files (the digest of model.onnx and its external data,
    checked on the very bytes the session is made from), provider, threads and request bound."""
    from appliance.providers.registry import Registry  # the child's own discovery of plugins and EPs

    registry = Registry.discover()
    model = LoadedModel.load(
        spec.source,
        registry=registry,
        settings=spec.models,
        provider_configs=registry.configs({spec.provider: dict(spec.provider_options)}),
        cache_dir=spec.cache_dir,
        threads_per_call=spec.threads_per_call,
        providers=[spec.provider],
        max_request_bytes=spec.max_request_bytes,
        expected_digest=spec.digest,
    )
    model.warm_up(0)  # first runs allocate; the parent's profile is the one that counts
    return model


def serve(model: LoadedModel, sock: socket.socket) -> None:
    """Answer batches on one channel until the parent closes it."""
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
                send_message(sock, error_header(exc))
                continue
            except Exception as exc:  # a bug must still answer, or the parent's worker waits for ever
                log.exception("pool process for model %s: batch failed unexpectedly", model.name)
                message = (
                    f"model {model.name!r}: internal error in the pool process: {type(exc).__name__}: {exc}"
                )
                send_message(sock, {"error": "InferenceFailed", "message": message})
                continue
            header = {"outputs": list(outputs), "compute_s": compute_s, "pid": os.getpid()}
            send_message(sock, header, list(outputs.values()))


def main(argv: list[str]) -> int:
    # The parent drains on SIGTERM and closes the sockets when done; the child ends with them.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.ERROR)  # what goes wrong reaches the parent in an error frame
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text(str(OOM_SCORE_ADJ))
    sockets = [socket.socket(fileno=int(fd)) for fd in argv]
    try:
        spec: ReplicaSpec = pickle.loads(receive_frame(sockets[0]))
        if spec.idle_priority:
            lower_priority()  # the parent lowered this process at its start; this covers its threads
        model = open_model(spec)
    except (OSError, EOFError):
        return 1
    except errors.ApplianceError as exc:
        for sock in sockets:
            with contextlib.suppress(OSError):
                send_message(sock, {"error": type(exc).__name__, "message": str(exc)})
        return 1
    threads = [threading.Thread(target=serve, args=(model, sock), daemon=True) for sock in sockets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
