"""The admin unix socket (drain, resume, status, reload): its asyncio server and blocking client."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from appliance.errors import ApplianceError
from appliance.text import printable

logger = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
MAX_LINE_BYTES = 64 * 1024
MAX_ERROR_CHARS = 2000  # longest error text the server sends, or the client shows from a reply
MAX_WAIT_S = 86400.0  # longest drain wait the verbs accept: one that waits longer is a mistake, not a plan


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
        self._lock: _Lock | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen; AdminError (one line naming the path) if the folder is not this user's
        alone, or another server holds the path: two instances never share or take over a socket."""
        check_private_folder(self.path.parent)
        self._lock = _Lock.acquire(self.path)
        try:
            sock = _bind(self.path)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_LINE_BYTES)
        except BaseException:
            self._lock.release()
            self._lock = None
            raise
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
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            writer.write(await self._reply_line(reader, writer.get_extra_info("socket")))
            await writer.drain()
        except ConnectionError as exc:
            logger.debug("admin client went away: %s", exc)
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def _reply_line(self, reader: asyncio.StreamReader, sock: Any) -> bytes:
        """The reply to send: whatever goes wrong in answering is an ok=false reply, never a hang-up."""
        try:
            return json.dumps(await self._answer(reader, sock)).encode() + b"\n"
        except ConnectionError:
            raise
        except Exception as exc:  # one bad request is one error reply; the server keeps serving
            logger.exception("admin request failed")
            message = f"request failed: {type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
            return json.dumps(_error(message)).encode() + b"\n"

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
    """Send one request and return the reply (with "ok": True); raise AdminError on any failure.

    The folder holding the socket belongs to the service's user, who could put a symlink to some
    other socket there (root would then talk, as uid 0, to whatever listens on it) or answer slowly
    or absurdly. So the socket must be a socket, not a symlink, owned by the folder's owner; the
    peer (SO_PEERCRED) must run as that uid before anything is sent; `timeout_s` bounds the whole
    exchange, not each recv(); and a reply JSON cannot parse is an AdminError, however deep.
    """
    line = json.dumps({"verb": verb, "args": dict(args or {})}).encode() + b"\n"
    deadline_s = time.monotonic() + timeout_s
    try:
        owner_uid = _socket_owner(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_left_s(deadline_s))
            sock.connect(str(path))
            _check_peer(sock, path, owner_uid)
            sock.settimeout(_left_s(deadline_s))
            sock.sendall(line)
            reply_line = _read_line(sock, deadline_s)
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
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise AdminError(
            f"admin socket {path}: reply to {verb!r} is not JSON it can read: {reply_line[:200]!r}"
        ) from exc
    if not isinstance(reply, dict) or "ok" not in reply:
        raise AdminError(f"admin socket {path}: reply to {verb!r} has no 'ok' field: {reply_line[:200]!r}")
    if reply["ok"] is not True:
        # The service's words, shown to root: control characters escaped, so they forge no line.
        raise AdminError(f"{verb}: {_printable(reply.get('error', 'failed without a reason'))}")
    return reply


def _socket_owner(path: Path) -> int:
    """The uid that must serve `path`: the owner of its folder, if `path` is a socket it owns."""
    st = os.lstat(path)  # FileNotFoundError: not running
    if stat.S_ISLNK(st.st_mode):
        raise AdminError(f"admin socket {path} is a symlink; refusing to follow it")
    if not stat.S_ISSOCK(st.st_mode):
        raise AdminError(f"admin socket {path} is not a socket")
    folder = os.stat(path.parent)
    if st.st_uid != folder.st_uid:
        raise AdminError(
            f"admin socket {path} is owned by uid {st.st_uid}, its folder {path.parent} by uid "
            f"{folder.st_uid}; expected the service's user to own both"
        )
    return folder.st_uid


def _check_peer(sock: socket.socket, path: Path, owner_uid: int) -> None:
    _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    if uid != owner_uid:
        raise AdminError(
            f"admin socket {path}: the process listening runs as uid {uid}, not uid {owner_uid} who owns "
            f"{path.parent}; not sending it anything"
        )


def _left_s(deadline_s: float) -> float:
    """Seconds left before `deadline_s`; TimeoutError once none are."""
    left_s = deadline_s - time.monotonic()
    if left_s <= 0:
        raise TimeoutError
    return left_s


def check_private_folder(folder: Path) -> None:
    """Create `folder` (mode 0700) if missing; AdminError unless it is a real folder, not a symlink,
    owned by this process's uid and writable by no one else, so no other user can place or swap
    the socket in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(folder)
    except OSError as exc:
        raise AdminError(f"admin socket folder {folder}: cannot create it ({exc.strerror or exc})") from exc
    uid = os.getuid()
    if stat.S_ISLNK(st.st_mode):
        raise AdminError(
            f"admin socket folder {folder} is a symlink; expected a real folder owned by uid {uid}"
        )
    if not stat.S_ISDIR(st.st_mode):
        raise AdminError(f"admin socket folder {folder} is not a folder")
    if st.st_uid != uid:
        raise AdminError(
            f"admin socket folder {folder} is owned by uid {st.st_uid}; expected uid {uid}, who runs the "
            "service (set system.runtime_dir or system.admin_socket to a folder of its own)"
        )
    if st.st_mode & 0o022:
        raise AdminError(
            f"admin socket folder {folder} has mode {stat.S_IMODE(st.st_mode):04o}, writable by group or "
            "others; expected no write access beyond its owner (e.g. 0700)"
        )


def in_use_message(path: Path, pid: int | None) -> str:
    holder = f"another running appliance (pid {pid})" if pid else "another running process"
    return (
        f"admin socket {path} is in use by {holder}; give this instance its own with system.admin_socket "
        'or system.runtime_dir (APPLIANCE_SYSTEM__ADMIN_SOCKET), or set system.admin_socket = "" to '
        "run without one"
    )


class _Lock:
    """`<socket>.lock`, flock()ed for as long as a server owns the socket path, holding its pid.

    Checking that the socket is live and then replacing a stale one is a race between two
    starting instances (one could unlink the other's fresh socket); the lock serialises them.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, socket_path: Path) -> _Lock:
        path = socket_path.with_name(socket_path.name + ".lock")
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise AdminError(f"admin socket {socket_path}: cannot open {path} ({exc.strerror})") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise AdminError(in_use_message(socket_path, pid)) from None
            except OSError as exc:
                os.close(fd)
                raise AdminError(f"admin socket {socket_path}: cannot lock {path} ({exc.strerror})") from exc
            held, now = os.fstat(fd), _stat_or_none(path)
            if now is not None and (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                break
            os.close(fd)  # the previous holder removed the file after we opened it: take the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        """Remove the file while still holding it (waiting starters then see a new inode), unlock."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        os.close(self._fd)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _bind(path: Path) -> socket.socket:
    """A listening socket at `path`, mode 0600 from the start (fchmod before bind, no umask race)."""
    if path.is_symlink() or (path.exists() and not stat.S_ISSOCK(path.stat().st_mode)):
        raise AdminError(f"admin socket path {path} exists and is not a socket; refusing to replace it")
    if path.exists():
        pid = _listener_pid(path)
        if pid is not None:
            raise AdminError(in_use_message(path, pid or None))
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


def _listener_pid(path: Path) -> int | None:
    """None when nothing listens at `path`; else the listener's pid (SO_PEERCRED; 0 if unknown)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError as exc:
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return None
            raise AdminError(f"admin socket {path}: cannot tell whether it is in use ({exc})") from exc
        pid, _, _ = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid


def _parse(line: bytes) -> tuple[str, dict[str, Any]] | str:
    """(verb, args) from a request line, or the error message to send back."""
    try:
        request = json.loads(line)
    except RecursionError:
        return 'request is nested too deeply to parse; expected {"verb": ..., "args": {...}}'
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return f'request is not valid JSON ({exc}); expected {{"verb": ..., "args": {{...}}}}'
    if not isinstance(request, dict) or not isinstance(request.get("verb"), str):
        return "request must be a JSON object with a string 'verb'"
    args = request.get("args", {})
    if not isinstance(args, dict):
        return f"'args' must be a JSON object, got {type(args).__name__}"
    return request["verb"], args


def _read_line(sock: socket.socket, deadline_s: float) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while not chunks or not chunks[-1].endswith(b"\n"):
        sock.settimeout(_left_s(deadline_s))  # one deadline for the reply, however it is dripped
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


def _printable(value: object) -> str:
    """`value` as text, at most MAX_ERROR_CHARS of it, with control characters escaped."""
    return printable(str(value)[:MAX_ERROR_CHARS])
