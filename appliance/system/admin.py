"""The admin unix socket (drain, resume, status, reload): its asyncio server and blocking client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE_BYTES = 64 * 1024
SOCKET_NAME = "admin.sock"


def admin_socket_path(runtime_dir: Path) -> Path:
    """Where the service listens and `appliance ota` calls: <runtime_dir>/admin.sock."""
    return runtime_dir / SOCKET_NAME


_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class AdminError(ApplianceError):
    """The admin socket could not be reached, refused the caller, or the service answered ok=false."""


class AdminServer:
    """Serves `handlers` by verb on a unix socket at `path`, mode 0600.

    Protocol, one request per connection: the client sends one JSON line
    `{"verb": "drain", "args": {...}}`; the server answers one JSON line, `{"ok": true, ...}` or
    `{"ok": false, "error": "..."}`, and closes. Only peers whose uid (SO_PEERCRED) is in
    `allowed_uids` are served; by default root and the service's own user.

    A handler gets the request's `args` and returns the reply's fields; whatever it raises becomes
    an `{"ok": false}` reply naming the verb, and the server keeps serving.
    """

    def __init__(
        self,
        path: Path,
        handlers: Mapping[str, Handler],
        allowed_uids: set[int] | None = None,
        *,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.path = path
        self._handlers = dict(handlers)
        self._allowed_uids = {0, os.getuid()} if allowed_uids is None else set(allowed_uids)
        self._request_timeout_s = request_timeout_s
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen; raises AdminError if another live server holds the path."""
        sock = _bind(self.path)
        st = os.stat(self.path)
        self._inode = (st.st_dev, st.st_ino)
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)
        logger.info("admin socket listening on %s", self.path)

    async def close(self) -> None:
        """Stop listening, cancel connections still open, and remove the socket file if it is ours."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                self.path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            reply = await self._answer(reader, writer.get_extra_info("socket"))
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except ConnectionError as exc:
            logger.debug("admin client went away: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader, sock: Any) -> dict[str, Any]:
        # Read the line even from a peer about to be refused: closing a unix socket with unread
        # data resets it, and the refused client deserves the reason rather than ECONNRESET.
        try:
            async with asyncio.timeout(self._request_timeout_s):
                line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            line = exc.partial  # the client shut down its side without a newline
        except TimeoutError:
            return _error(f"no request line within {self._request_timeout_s} s")
        except asyncio.LimitOverrunError:
            return _error(f"request line longer than {MAX_LINE_BYTES} bytes")
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid not in self._allowed_uids:
            allowed = ", ".join(str(u) for u in sorted(self._allowed_uids))
            logger.warning("admin socket refused uid %d", uid)
            return _error(f"uid {uid} may not use the admin socket; allowed uids: {allowed}")
        request = _parse(line)
        if isinstance(request, str):
            return _error(request)
        verb, args = request
        handler = self._handlers.get(verb)
        if handler is None:
            known = ", ".join(sorted(self._handlers)) or "none"
            return _error(f"unknown verb {verb!r}; known verbs: {known}")
        try:
            result = await handler(args)
        except Exception as exc:  # a failing handler is one failed request, not a dead server
            logger.exception("admin verb %s failed", verb)
            return _error(f"{verb} failed: {exc}")
        if not isinstance(result, dict):
            return _error(f"{verb} returned {type(result).__name__}, expected a dict")
        return {"ok": True, **result}


def admin_request(
    path: Path, verb: str, args: Mapping[str, Any] | None = None, *, timeout_s: float = 60.0
) -> dict[str, Any]:
    """Send one request and return the reply (with "ok": True); raise AdminError on any failure."""
    line = json.dumps({"verb": verb, "args": dict(args or {})}).encode() + b"\n"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(line)
            reply_line = _read_line(sock)
    except FileNotFoundError as exc:
        raise AdminError(f"admin socket {path} does not exist; is appliance.service running?") from exc
    except PermissionError as exc:
        raise AdminError(f"admin socket {path}: permission denied; run as root") from exc
    except ConnectionRefusedError as exc:
        message = f"admin socket {path}: nothing listens there; is appliance.service running?"
        raise AdminError(message) from exc
    except TimeoutError as exc:
        raise AdminError(f"admin socket {path}: no answer to {verb!r} within {timeout_s} s") from exc
    except OSError as exc:
        raise AdminError(f"admin socket {path}: {exc.strerror or exc}") from exc
    try:
        reply = json.loads(reply_line)
    except json.JSONDecodeError as exc:
        raise AdminError(f"admin socket {path}: reply to {verb!r} is not JSON: {reply_line[:200]!r}") from exc
    if not isinstance(reply, dict) or "ok" not in reply:
        raise AdminError(f"admin socket {path}: reply to {verb!r} has no 'ok' field: {reply!r}")
    if reply["ok"] is not True:
        raise AdminError(f"{verb}: {reply.get('error', 'failed without a reason')}")
    return reply


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600 from the start (fchmod before bind, no umask race)."""
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise AdminError(f"admin socket path {path} exists and is not a socket; refusing to replace it")
    if path.exists():
        if _is_live(path):
            raise AdminError(f"admin socket {path} is in use by another running process")
        path.unlink()  # stale: left by a process that died without cleaning up
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.fchmod(sock.fileno(), 0o600)
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen()
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise AdminError(f"admin socket {path}: cannot listen ({exc.strerror or exc})") from exc
    return sock


def _is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise AdminError(f"admin socket {path}: cannot tell whether it is in use ({exc})") from exc
    return True


def _parse(line: bytes) -> tuple[str, dict[str, Any]] | str:
    """(verb, args) from a request line, or the error message to send back."""
    try:
        request = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return f'request is not valid JSON ({exc}); expected {{"verb": ..., "args": {{...}}}}'
    if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
        return "request must be a JSON object with a string 'verb'"
    args = request.get("args", {})
    if not isinstance(args, dict):
        return f"'args' must be a JSON object, got {type(args).__name__}"
    return request["verb"], args


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > MAX_LINE_BYTES * 16:
            raise OSError(errno.EMSGSIZE, f"reply longer than {MAX_LINE_BYTES * 16} bytes")
    return b"".join(chunks)


def _error(message: str) -> dict[str, Any]:
    return {"ok": False, "error": message}
