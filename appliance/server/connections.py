"""Bounded HTTP connections: header size, read timeouts, connection counts and a bounded drain.

uvicorn's httptools protocol reads headers of any size, waits forever for slow headers or bodies and
takes every connection offered. `BoundedHttpProtocol` adds the bounds of `[server]` settings (the box's)
or of any settings with the same names (`ConnectionBounds`: the platform gateway's `[gateway]`); give it
to `uvicorn.Config(http=bounded_protocol(...))`. Every refusal made here is counted by `refuse` (on the
box, the data plane's, under model "" and priority class `line`), and answered from the one status table
with the OIP body.

A connection has one timer for what it reads, armed at most once per deadline it has to watch: a
request only notes its deadline when a read leaves it incomplete, and a timer that fires early re-arms
for the deadline then current. Writes have their own timer, armed only while bytes wait to be sent
(the transport buffers them: a client that reads fast leaves none). With a fake transport (no
sockets), a GET costs 2 us more than with uvicorn's protocol and a 150 KB inference body in three reads
5 us more, against milliseconds of inference (bench/throughput.py). The places connections take are
counted by `ConnectionGate` (server/gate.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Protocol

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from appliance import errors
from appliance.dataplane.outcomes import NO_MODEL
from appliance.server.errors import appliance_error_response
from appliance.server.gate import ConnectionGate

log = logging.getLogger(__name__)

# How long a refused connection may go on sending after its answer before it is reset. Closing a socket
# with unread input resets it at once, and the client may lose the answer with it; nginx lingers too
# (lingering_timeout 5 s).
LINGER_S = 5.0
_CLOCK_SLACK_S = 0.001  # asyncio runs a timer up to its clock's resolution early

# (model, priority class label, refusal): a connection's refusals are the line's, under no model. The
# label, not the scheduler's Priority: the platform's gateway serves through this module too.
Refuse = Callable[[str | None, str, BaseException], None]
LINE = "line"


class ConnectionBounds(Protocol):
    """The settings a server's connections are held to: the box's `ServerSettings`, the gateway's
    `GatewaySettings`; messages name them under the section given to `bounded_protocol`."""

    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    idle_timeout_s: float
    drain_timeout_s: float
    retry_after_s: float


class HeadersLate(errors.RequestTimeout):
    """The request line and headers were not in within header_timeout_s (408)."""


class BodyLate(errors.RequestTimeout):
    """A request body was not in whole within body_timeout_s of its headers (408)."""


def bounded_protocol(
    server: ConnectionBounds,
    gate: ConnectionGate,
    refuse: Refuse,
    *,
    section: str = "server",
    body_grace_s: float = 0.0,
) -> Callable[..., BoundedHttpProtocol]:
    """What `uvicorn.Config(http=...)` takes: uvicorn calls it once per accepted connection.

    `section` names the settings in refusals (`server.header_timeout_s`). `body_grace_s` is for an app
    that answers a late body itself on the routes that read one (408, or the answer to a refusal it was
    reading the body's rest for): the connection's own body deadline comes that much later, and ends
    bodies no route reads."""
    return functools.partial(
        BoundedHttpProtocol,
        settings=server,
        gate=gate,
        refuse=refuse,
        section=section,
        body_grace_s=body_grace_s,
    )


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol within `[server]` bounds (or `section`'s, of the same names).

    - request line and headers: at most `max_header_bytes` (431), within `header_timeout_s` of the
      connection opening or of the request's first byte (408);
    - body: whole within `body_timeout_s` of its headers (408, or a plain close once an answer began);
    - idle keep-alive: closed after `idle_timeout_s` (uvicorn's `timeout_keep_alive`); bytes sent
      between requests (an empty line, which begins no request) start the next request's header time;
    - answers: a client that takes none of its unsent answer for `idle_timeout_s` is reset (nginx's
      send_timeout, between two writes rather than for the whole answer, so a slow link is served);
    - connections: `max_connections` in all and `max_connections_per_peer` per address (503);
    - on shutdown: a request still incomplete after `drain_timeout_s` gets 503 and the connection
      closes; an answer still being sent then is reset.
    """

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        settings: ConnectionBounds,
        gate: ConnectionGate,
        refuse: Refuse,
        section: str = "server",
        body_grace_s: float = 0.0,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.settings = settings
        self.section = section
        self.body_grace_s = body_grace_s
        self.gate = gate
        self._count = refuse
        self._peer: str | None = None  # set while this connection holds a place at the gate
        self._is_refused = False  # answered and closing: input is read and dropped
        self._is_lingering = False  # refused at the gate, holding one of its lingering places
        self._is_stopping = False
        self._in_headers = True  # a request (or the connection) began and its headers are incomplete
        self._in_body = False
        self._header_bytes = 0  # bytes read since the last request's headers, while in headers
        self._headers_due: float | None = None  # loop time by which the headers must be in
        self._body_due: float | None = None  # loop time by which the body must be in
        self._timer: asyncio.TimerHandle | None = None  # fires by the nearest deadline, or ends a linger
        self._drain_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None  # armed while bytes wait to be sent
        self._unsent_bytes = 0  # what waited to be sent when the send timer was armed

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        peer = self.client[0] if self.client else ""
        refusal = self.gate.admit(peer, self.settings.retry_after_s)
        if refusal is not None:
            self._count(NO_MODEL, LINE, refusal)
            may_linger = self.gate.lingering < self.gate.max_connections
            if may_linger:
                self.gate.lingering += 1
                self._is_lingering = True
            self._answer(refusal, linger=may_linger)
            return
        self._peer = peer
        self._headers_due = self.loop.time() + self.settings.header_timeout_s
        self._watch(self._headers_due)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        for timer in (self._drain_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._drain_timer = self._send_timer = None
        if self._peer is not None:
            self.gate.release(self._peer)
            self._peer = None
        if self._is_lingering:
            self.gate.lingering -= 1
            self._is_lingering = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._is_refused:
            return
        self._unset_keepalive_if_required()
        if not (self._in_headers or self._in_body) and (self.cycle is None or self.cycle.response_complete):
            # Between requests: the idle timer is cancelled above, and llhttp skips an empty line here
            # without beginning a request. Whatever came begins the next request's time for headers.
            self._in_headers = True
        if not self._in_body:
            self._header_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()  # served as plain HTTP: the app has no WebSocket route
        except httptools.HttpParserError as exc:
            cause = exc.__context__
            if not isinstance(cause, errors.ApplianceError):
                log.debug("invalid HTTP request from %s: %s", self.client, cause or exc)
                cause = errors.InvalidInput(f"invalid HTTP request: {cause or exc}")
            self._refuse(cause)
            return
        if self._in_headers:
            if self._header_bytes > self.settings.max_header_bytes:
                self._refuse(self._too_large())
            elif self._headers_due is None:
                self._headers_due = self.loop.time() + self.settings.header_timeout_s
                self._watch(self._headers_due)
        elif self._in_body and self._body_due is None:
            self._body_due = self.loop.time() + self.settings.body_timeout_s + self.body_grace_s
            self._watch(self._body_due)

    # httptools callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True

    def on_headers_complete(self) -> None:
        limit = self.settings.max_header_bytes
        # Only the reads that carried these headers can have passed the limit: measure them then.
        if self._header_bytes > limit and self._measured_header_bytes() > limit:
            raise self._too_large()  # feed_data raises it as the __context__ of a parser error
        self._in_headers = False
        self._in_body = True
        self._header_bytes = 0
        self._headers_due = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._body_due = None
        super().on_message_complete()

    # Writes

    def pause_writing(self) -> None:
        """Called by the transport when more than its high-water mark waits to be sent."""
        super().pause_writing()
        self._watch_send()

    def on_response_complete(self) -> None:
        """Called by uvicorn once an answer is written whole (into the transport, not yet sent)."""
        super().on_response_complete()
        if self.transport.get_write_buffer_size():
            # Closing, or kept alive, the transport waits for these bytes to go without a deadline.
            self._watch_send()

    # uvicorn.Server

    def shutdown(self) -> None:
        """Called when the server stops: idle connections close now, the others within the drain (an
        answer still being sent too: uvicorn waits for every connection to close before it stops)."""
        self._is_stopping = True
        super().shutdown()
        is_done = self.transport.is_closing() and not self.transport.get_write_buffer_size()
        if not is_done and self._drain_timer is None:
            stop_by = self.gate.stop_by
            delay_s = (
                self.settings.drain_timeout_s if stop_by is None else max(0.0, stop_by - self.loop.time())
            )
            self._drain_timer = self.loop.call_later(delay_s, self._drain_late)

    # Deadlines

    def _watch(self, due: float) -> None:
        """Have the timer fire by `due` (loop time)."""
        if self._timer is not None:
            if self._timer.when() <= due:
                return
            self._timer.cancel()
        self._timer = self.loop.call_at(due, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._in_headers and self._headers_due is not None:
            due, late = self._headers_due, self._headers_late
        elif self._in_body and self._body_due is not None:
            due, late = self._body_due, self._body_late
        else:
            return  # the deadline it was armed for was met, and no other runs
        if due - self.loop.time() > _CLOCK_SLACK_S:
            self._watch(due)  # armed for an earlier deadline, since met
        else:
            late()

    def _headers_late(self) -> None:
        exc = HeadersLate(
            f"request line and headers not received within {self.settings.header_timeout_s:g} s "
            f"({self.section}.header_timeout_s)"
        )
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # The next request stalls while this one is answered: close after the answer.
            self._count(NO_MODEL, LINE, exc)
            cycle.keep_alive = False
            self._is_refused = True
            return
        self._refuse(exc)

    def _body_late(self) -> None:
        if self.flow.read_paused:  # the service stopped reading, not the client: not the client's delay
            self._body_due = self.loop.time() + self.settings.body_timeout_s + self.body_grace_s
            self._watch(self._body_due)
            return
        self._refuse(
            BodyLate(
                f"request body not received whole within {self.settings.body_timeout_s:g} s of its "
                f"headers ({self.section}.body_timeout_s)"
            )
        )

    def _watch_send(self) -> None:
        """Have the send timer fire `idle_timeout_s` after the latest answer was written."""
        if self._send_timer is not None:
            self._send_timer.cancel()
        self._unsent_bytes = self.transport.get_write_buffer_size()
        self._send_timer = self.loop.call_later(self.settings.idle_timeout_s, self._send_late)

    def _send_late(self) -> None:
        self._send_timer = None
        unsent = self.transport.get_write_buffer_size()
        if not unsent:
            return
        if unsent < self._unsent_bytes:
            self._watch_send()  # the client takes its answer, if slowly: as long as it takes some
            return
        log.debug(
            "%s took none of %d unsent bytes in %g s (%s.idle_timeout_s): reset",
            self.client,
            unsent,
            self.settings.idle_timeout_s,
            self.section,
        )
        self._reset()

    def _drain_late(self) -> None:
        self._drain_timer = None
        if self.transport.is_closing():
            if self.transport.get_write_buffer_size():
                self._reset()  # its answer is still going out, slowly: the stop is due
            return
        if self._is_refused:
            self.transport.abort()
            return
        self._refuse(
            errors.Draining(
                f"the service is stopping and the request was not complete within "
                f"{self.settings.drain_timeout_s:g} s ({self.section}.drain_timeout_s)",
                retry_after_s=self.settings.retry_after_s,
            )
        )

    # Refusals

    def _too_large(self) -> errors.HeaderTooLarge:
        return errors.HeaderTooLarge(
            f"request line and headers are larger than {self.settings.max_header_bytes} bytes "
            f"({self.section}.max_header_bytes)"
        )

    def _measured_header_bytes(self) -> int:
        """The request line and headers as sent, give or take whitespace."""
        request_line = len(self.url) + len(" HTTP/1.1\r\n") + len(self.parser.get_method()) + 1
        return request_line + sum(len(name) + len(value) + 4 for name, value in self.headers) + 2

    def _refuse(self, exc: errors.ApplianceError) -> None:
        """Count a refusal; answer it unless an answer has begun, then close the connection."""
        self._count(NO_MODEL, LINE, exc)
        self._cancel_timer()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        if cycle is None:
            self._answer(exc, linger=not self._is_stopping)
            return
        # An answer to the request being read, or one half written, cannot be followed by ours.
        has_begun = cycle.response_started and (self._in_body or not cycle.response_complete)
        if not cycle.response_complete:
            cycle.disconnected = True  # the app reads a disconnect and anything it sends goes nowhere
            cycle.message_event.set()
        if has_begun:
            self._is_refused = True
            self._close()
        else:
            self._answer(exc, linger=not self._is_stopping)

    def _answer(self, exc: errors.ApplianceError, *, linger: bool) -> None:
        """Write the error answer with `Connection: close`; then close, after lingering if asked."""
        self._is_refused = True
        response = appliance_error_response(exc, self.settings.retry_after_s)
        parts = [STATUS_LINE[response.status_code]]
        for name, value in (*self.server_state.default_headers, *response.raw_headers):
            if name.lower() != b"connection":
                parts += [name, b": ", value, b"\r\n"]
        parts += [b"connection: close\r\n\r\n", response.body]
        self.transport.write(b"".join(parts))
        if linger and self.transport.can_write_eof() and not self.transport.get_write_buffer_size():
            # Half-close and drop what still comes, until the client closes or LINGER_S passes.
            self.transport.write_eof()
            self.flow.resume_reading()
            self._timer = self.loop.call_later(LINGER_S, self.transport.abort)
        else:
            self._close()

    def _close(self) -> None:
        """Close now; a client that does not read what is still unsent is reset rather than waited on."""
        if self.transport.get_write_buffer_size():
            self._reset()
        else:
            self.transport.close()

    def _reset(self) -> None:
        """Abort with a TCP reset: what the kernel still holds for a client that does not read goes too,
        rather than waiting out its retries (nginx's reset_timedout_connection)."""
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
