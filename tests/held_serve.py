"""`python tests/held_serve.py ARGS`: the real `appliance` command line (`python -m appliance ARGS`), with
the worker's test seam (`appliance.scheduler.worker.before_batch`) holding every batch of the model
named in $TEST_HOLD_MODEL until the test writes a line to its stdin (no APPLIANCE_ prefix: every
APPLIANCE_ variable is a setting).

When a batch waits, it prints `held: <model> batch of <n> request(s)` on stdout. One line on stdin
releases one batch; end of file on stdin releases every batch from then on. This is how a test
signals a real service (SIGTERM, SIGHUP) while a request is surely mid-compute, without a timing
assumption. Only tests run this file: it is not part of the package.
"""

from __future__ import annotations

import os
import sys
import threading

from appliance.cli import main
from appliance.scheduler import worker

HELD_MODEL = os.environ.get("TEST_HOLD_MODEL", "")
_one_at_a_time = threading.Lock()


def hold(running: worker.Worker, run: worker.BatchRun) -> None:
    if running.model.name != HELD_MODEL:
        return
    with _one_at_a_time:
        print(f"held: {HELD_MODEL} batch of {len(run.items)} request(s)", flush=True)
        sys.stdin.readline()


if __name__ == "__main__":
    worker.before_batch = hold
    raise SystemExit(main())
