"""Per-sender job rates: a token bucket per reply-topic sender, for a bounded number of senders."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

MAX_SENDERS = 1024  # senders tracked at once; the least recently seen is forgotten first
MAX_KEY_CHARS = 128  # a longer sender is tracked by a digest of its name, not the name (up to 64 KB)


class SenderRates:
    """Each sender may start `rate_per_s` jobs per second, in bursts of up to one second's worth.

    Only the `max_senders` most recently seen senders are tracked, each by at most MAX_KEY_CHARS, so a
    peer inventing sender names (or very long ones) costs a bounded amount of memory; a forgotten sender
    starts again with a full bucket. The clock is injected (monotonic seconds).
    """

    def __init__(
        self,
        rate_per_s: float,
        *,
        max_senders: int = MAX_SENDERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, rate_per_s)
        self.max_senders = max_senders
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # sender -> (tokens, at_s)

    def __len__(self) -> int:
        return len(self._buckets)

    def admit(self, sender: str) -> float | None:
        """Take one job for `sender`: None if it may start now, else seconds until it may."""
        now_s = self._clock()
        if len(sender) > MAX_KEY_CHARS:
            sender = (
                "#" + hashlib.blake2b(sender.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
            )
        tokens, at_s = self._buckets.pop(sender, (self.burst, now_s))
        tokens = min(self.burst, tokens + (now_s - at_s) * self.rate_per_s)
        wait_s = None
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait_s = (1.0 - tokens) / self.rate_per_s
        self._buckets[sender] = (tokens, now_s)
        while len(self._buckets) > self.max_senders:
            self._buckets.popitem(last=False)
        return wait_s
