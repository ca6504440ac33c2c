"""Bounded HTTP resources over raw sockets: header size, header and body deadlines, connection limits,
a drain that ends with a client trickling its body, and every refusal counted in /metrics."""

from __future__ import annotations

import contextlib
import re
import select
import socket
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path

import modelzoo
import orjson
import pytest

from appliance.server.connections import LINGER_S

READ_TIMEOUT_S = 30.0  # generous: the box may be busy; a test only fails on it if the server never answers
TRICKLE_PACE_S = 0.05  # how long the trickling client looks for an answer between two bytes
# An inference request whose body is to come: 60000 bytes is within what the model's body limit allows.
INFER_HEAD = b"POST /v2/models/batchable/infer HTTP/1.1\r\nHost: box\r\nContent-Length: 60000\r\n"


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repository = tmp_path / "repo"
    modelzoo.write(repository, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    return repository


@contextlib.contextmanager
def connection(port: int, source: str = "127.0.0.1") -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", port), READ_TIMEOUT_S, source_address=(source, 0))
    try:
        yield sock
    finally:
        sock.close()


def request(path: str = "/v2/health/live", *, close: bool = False) -> bytes:
    connection_header = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: box\r\n{connection_header}\r\n".encode()


def until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


_UNREAD: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def one_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Read one response on a keep-alive connection (Content-Length framing). Bytes read past it (a
    pipelined answer that came in the same segment) are kept for the next call on this socket."""
    data = _UNREAD.pop(sock, b"")
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed before a whole response: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    status, headers = parse_head(head)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed inside a response body"
        body += chunk
    if len(body) > length:
        _UNREAD[sock] = body[length:]
    return status, headers, body[:length]


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split(" ")[1]), {k.lower(): v for k, v in headers.items()}


def refused(raw: bytes) -> tuple[int, dict[str, str], str]:
    """A refusal: status, headers and the OIP error message; it closes the connection."""
    head, body = raw.split(b"\r\n\r\n", 1)
    status, headers = parse_head(head)
    assert headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    return status, headers, orjson.loads(body)["error"]


def get(sock: socket.socket, path: str = "/v2/health/live") -> tuple[int, bytes]:
    sock.sendall(request(path))
    status, _, body = one_response(sock)
    return status, body


def refusals(sock: socket.socket, reason: str) -> float:
    """appliance_refusals_total{model="",priority="line",reason=...} read over a kept-alive connection."""
    status, body = get(sock, "/metrics")
    assert status == 200
    pattern = rf'^appliance_refusals_total\{{model="",priority="line",reason="{reason}"\}} (\S+)$'
    found = re.search(pattern, body.decode(), re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def trickle(sock: socket.socket, stop: threading.Event | None = None) -> bytes:
    """Send a body one byte at a time until the server answers or closes; return what it sent."""
    while stop is None or not stop.is_set():
        readable, _, _ = select.select([sock], [], [], TRICKLE_PACE_S)
        if readable:
            break
        try:
            sock.send(b"0")
        except (BrokenPipeError, ConnectionResetError):
            break
    return until_closed(sock)


def test_oversized_header_gets_431_and_the_server_serves_on(serve, repo) -> None:
    with serve(repo, server={"max_header_bytes": 1024}) as running:
        whole = request().replace(b"\r\n\r\n", b"\r\nX-Padding: " + b"a" * 4096 + b"\r\n\r\n")
        endless = b"GET /v2/health/live HTTP/1.1\r\nX-Padding: " + b"a" * (1024 * 1024)
        for sent in (whole, endless):
            with connection(running.port) as sock:
                sock.sendall(sent)
                status, _, message = refused(until_closed(sock))
            assert status == 431
            assert message == "request line and headers are larger than 1024 bytes (server.max_header_bytes)"
        with connection(running.port) as sock:
            # Headers and a body larger than the limit, in one read: only the headers count.
            body = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}'
            body += b" " * 4096
            sock.sendall(INFER_HEAD.replace(b"60000", str(len(body)).encode()) + b"\r\n" + body)
            assert one_response(sock)[0] == 200
            assert refusals(sock, "too_large") == 2


def test_malformed_http_gets_400_in_oip_form(serve, repo) -> None:
    with serve(repo) as running:
        with connection(running.port) as sock:
            sock.sendall(b"GET /v2 HTTP/1.1\r\nBad Header\r\n\r\n")
            status, _, message = refused(until_closed(sock))
        assert status == 400
        assert message.startswith("invalid HTTP request: ")
        with connection(running.port) as sock:
            sock.sendall(request() + request())  # pipelined requests are still served in order
            assert one_response(sock)[0] == one_response(sock)[0] == 200
            assert refusals(sock, "bad_request") == 1


def test_slow_or_silent_headers_get_408(serve, repo) -> None:
    with serve(repo, server={"header_timeout_s": 0.2}) as running:
        with connection(running.port) as slow, connection(running.port) as silent:
            slow.sendall(request().split(b"\r\n")[0])
            for sock in (slow, silent):
                status, headers, message = refused(until_closed(sock))
                assert status == 408
                assert "retry-after" not in headers
                assert (
                    message == "request line and headers not received within 0.2 s (server.header_timeout_s)"
                )
        with connection(running.port) as sock:
            assert get(sock)[0] == 200
            assert refusals(sock, "timeout") == 2


def test_an_empty_line_after_a_request_does_not_hold_the_connection_open(serve, repo) -> None:
    """llhttp skips an empty line between requests without beginning one, and the idle timer stops on
    any byte: the line starts the next request's header time, as its first byte would."""
    with serve(repo, server={"header_timeout_s": 0.2, "idle_timeout_s": 3600.0}) as running:
        with connection(running.port) as sock:
            sock.sendall(request() + b"\r\n")  # an empty line within the read of a request: no harm
            assert one_response(sock)[0] == 200
            assert get(sock)[0] == 200
            sock.sendall(b"\r\n")
            status, _, message = refused(until_closed(sock))
        assert status == 408
        assert message == "request line and headers not received within 0.2 s (server.header_timeout_s)"
        with connection(running.port) as other:
            assert refusals(other, "timeout") == 1


def test_a_client_that_takes_none_of_its_answer_is_reset(serve, tmp_path: Path) -> None:
    """A 16 MB answer to a client that reads none of it: past what the kernel holds, the rest waits in
    the transport, which would wait for it forever. The client is reset within idle_timeout_s of the
    answer and its place given back."""
    repository = tmp_path / "wide"
    modelzoo.write(repository, "any_width", modelzoo.any_width())
    width = 4 * 1024 * 1024
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [1, width],
                    "parameters": {"binary_data_size": 4 * width},
                }
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": True}}],
        }
    )
    body = header + bytes(4 * width)
    head = (
        "POST /v2/models/any_width/infer HTTP/1.1\r\nHost: box\r\n"
        f"Inference-Header-Content-Length: {len(header)}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    with serve(repository, server={"idle_timeout_s": 0.2}) as running:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with contextlib.closing(sock):
            sock.connect(("127.0.0.1", running.port))
            sock.sendall(head.encode() + body)
            watch = select.poll()
            watch.register(sock, select.POLLRDHUP)  # not POLLIN: the answer's first bytes wait unread
            events = watch.poll(READ_TIMEOUT_S * 1000)
            assert events, f"the connection is still open {READ_TIMEOUT_S:g} s on"
            assert events[0][1] & (select.POLLERR | select.POLLHUP)  # a reset, not a close after a flush
        assert running.service.gate.open == 0  # given back before the reset was sent


def test_trickled_body_gets_408(serve, repo) -> None:
    with serve(repo, server={"body_timeout_s": 0.2}) as running, connection(running.port) as sock:
        sock.sendall(INFER_HEAD + b"\r\n{")
        status, _, message = refused(trickle(sock))
        assert status == 408
        assert (
            message == "request body not received whole within 0.2 s of its headers (server.body_timeout_s)"
        )
        with connection(running.port) as other:
            assert refusals(other, "timeout") == 1


def test_one_peer_at_its_limit_does_not_lock_out_another(serve, repo) -> None:
    with (
        serve(repo, server={"max_connections_per_peer": 2, "retry_after_s": 3}) as running,
        connection(running.port) as first,
        connection(running.port) as second,
    ):
        assert get(first)[0] == get(second)[0] == 200  # both admitted and held open
        with connection(running.port) as third:
            third.sendall(request())
            status, headers, message = refused(until_closed(third))
        assert status == 503
        assert headers["retry-after"] == "3"
        assert message == (
            "too many connections from 127.0.0.1: 2 open, at most 2 per client address "
            "(server.max_connections_per_peer)"
        )
        with connection(running.port, source="127.0.0.2") as camera:
            assert get(camera)[0] == 200
            assert refusals(camera, "connection_limit") == 1


def test_connections_beyond_the_overall_limit_get_503_until_one_closes(serve, repo) -> None:
    with (
        serve(repo, server={"max_connections": 2}) as running,
        connection(running.port) as first,
        connection(running.port, source="127.0.0.2") as second,
    ):
        assert get(first)[0] == get(second)[0] == 200
        with connection(running.port, source="127.0.0.3") as third:
            third.sendall(request())
            status, headers, message = refused(until_closed(third))
        assert status == 503
        assert headers["retry-after"] == "1"
        assert message == "too many connections: 2 open, at most 2 (server.max_connections)"
        # The server closes its end only after it has given the place back: the next one is admitted.
        first.sendall(request(close=True))
        assert until_closed(first).startswith(b"HTTP/1.1 200 ")
        with connection(running.port, source="127.0.0.3") as fourth:
            assert get(fourth)[0] == 200
            assert refusals(fourth, "connection_limit") == 1


def test_stop_ends_a_trickled_body_within_the_drain(serve, repo) -> None:
    settings = {"drain_timeout_s": 0.2, "body_timeout_s": 3600.0, "header_timeout_s": 3600.0}
    received: list[bytes] = []
    stop_trickling = threading.Event()
    with serve(repo, server=settings) as running:
        sock = socket.create_connection(("127.0.0.1", running.port), READ_TIMEOUT_S)
        sock.sendall(INFER_HEAD + b"Expect: 100-continue\r\n\r\n")
        # The app asks for the body: the request is in, and only its body is missing.
        assert sock.recv(65536) == b"HTTP/1.1 100 Continue\r\n\r\n"
        trickler = threading.Thread(target=lambda: received.append(trickle(sock, stop_trickling)))
        trickler.start()
    # Leaving `serve` stopped the service and asserted that it exited with 0.
    trickler.join(READ_TIMEOUT_S + LINGER_S)
    stop_trickling.set()
    sock.close()
    status, headers, message = refused(received[0])
    assert status == 503
    assert "retry-after" in headers
    assert message == (
        "the service is stopping and the request was not complete within 0.2 s (server.drain_timeout_s)"
    )
    assert dict(running.service.plane.refusals)[("", "line", "draining")] == 1
