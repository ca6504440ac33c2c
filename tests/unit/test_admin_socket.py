"""Admin socket: a real AF_UNIX server in tmp_path, the blocking client, peer credentials, errors, and
one socket per instance in a folder only the service's user can write."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import tempfile
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from appliance.settings import SystemSettings
from appliance.system.admin import AdminError, AdminServer, Handler, admin_request, in_use_message


async def status(_: dict[str, Any]) -> dict[str, Any]:
    return {"state": "serving"}


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return {"args": args}


async def explode(_: dict[str, Any]) -> dict[str, Any]:
    raise RuntimeError("boom")


HANDLERS: dict[str, Handler] = {"status": status, "drain": echo, "reload": explode}


def serving(
    path: Path,
    body: Callable[[AdminServer], Awaitable[None]],
    handlers: Mapping[str, Handler] = HANDLERS,
    allowed_uids: set[int] | None = None,
) -> None:
    """Run `body` against a started server and close it afterwards, all inside one event loop."""

    async def main() -> None:
        server = AdminServer(path, handlers, allowed_uids)
        await server.start()
        try:
            async with asyncio.timeout(10):
                await body(server)
        finally:
            await server.close()

    asyncio.run(main())


async def request(path: Path, verb: str, args: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    return await asyncio.to_thread(admin_request, path, verb, args, **kw)


async def raw(path: Path, line: bytes) -> dict[str, Any]:
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(line)
    await writer.drain()
    reply = json.loads(await reader.readline())
    writer.close()
    await writer.wait_closed()
    return reply


def test_round_trip_and_socket_mode(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"

    async def body(_: AdminServer) -> None:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert await request(path, "status") == {"ok": True, "state": "serving"}
        assert await request(path, "drain", {"timeout_s": 5}) == {"ok": True, "args": {"timeout_s": 5}}

    serving(path, body)
    assert not path.exists()


def test_unknown_verb_names_the_known_ones(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"

    async def body(_: AdminServer) -> None:
        with pytest.raises(AdminError, match=r"unknown verb 'explode'; known verbs: drain, reload, status"):
            await request(path, "explode")

    serving(path, body)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"{not json\n", "request is not valid JSON"),
        (b"[1, 2]\n", "request must be a JSON object with a string 'verb'"),
        (b'{"verb": "drain", "args": [1]}\n', "'args' must be a JSON object, got list"),
        (b'{"verb": "status"}', None),  # no newline, then EOF: still one request
        (b"[" * 30000 + b"]" * 30000 + b"\n", "request is nested too deeply to parse"),
        (b'{"verb": "status", "args": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001 + b"\n", "nested too deeply"),
        (b"\xff\xfe\n", "request is not valid JSON"),
    ],
)
def test_malformed_requests_get_an_error_reply(tmp_path: Path, line: bytes, expected: str | None) -> None:
    path = tmp_path / "admin.sock"

    async def body(_: AdminServer) -> None:
        if expected is None:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(line)
            writer.write_eof()
            assert json.loads(await reader.readline()) == {"ok": True, "state": "serving"}
            writer.close()
            await writer.wait_closed()
            return
        reply = await raw(path, line)
        assert reply["ok"] is False
        assert expected in reply["error"]

    serving(path, body)


def test_failing_handler_is_an_error_reply_and_the_server_lives_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "admin.sock"

    async def body(_: AdminServer) -> None:
        with pytest.raises(AdminError, match="reload: reload failed: boom"):
            await request(path, "reload")
        assert (await request(path, "status"))["state"] == "serving"

    serving(path, body)
    assert "admin verb reload failed" in caplog.text


def test_refused_peer_is_told_why(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    other_uid = os.getuid() + 4242

    async def body(_: AdminServer) -> None:
        expected = rf"uid {os.getuid()} may not use the admin socket; allowed uids: {other_uid}"
        with pytest.raises(AdminError, match=expected):
            await request(path, "status")

    serving(path, body, allowed_uids={other_uid})


def test_client_names_a_missing_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with pytest.raises(AdminError, match=f"admin socket {path} does not exist; is appliance.service running"):
        admin_request(path, "status")


def test_client_names_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))
    with pytest.raises(AdminError, match="nothing listens there"):
        admin_request(path, "status")


def test_client_times_out_on_a_handler_that_never_answers(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    never = asyncio.Event()

    async def hang(_: dict[str, Any]) -> dict[str, Any]:
        await never.wait()
        return {}

    async def body(_: AdminServer) -> None:
        with pytest.raises(AdminError, match=r"no answer to 'drain' within 0.2 s"):
            await request(path, "drain", timeout_s=0.2)

    serving(path, body, handlers={"drain": hang})  # close() cancels the hung handler


def test_start_replaces_a_stale_socket_but_not_a_live_one_or_a_file(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))

    async def body(_: AdminServer) -> None:
        assert (await request(path, "status"))["ok"] is True
        with pytest.raises(AdminError, match=rf"admin socket {path} is in use by another running appliance"):
            await AdminServer(path, HANDLERS).start()

    serving(path, body)

    regular = tmp_path / "not-a-socket"
    regular.write_text("keep me")

    async def start_on_file() -> None:
        await AdminServer(regular, HANDLERS).start()

    with pytest.raises(AdminError, match="exists and is not a socket; refusing to replace it"):
        asyncio.run(start_on_file())
    assert regular.read_text() == "keep me"


def start_and_close(path: Path) -> None:
    async def main() -> None:
        server = AdminServer(path, HANDLERS)
        await server.start()
        await server.close()

    asyncio.run(main())


def test_a_second_server_on_the_same_path_is_refused_and_the_first_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"

    async def body(first: AdminServer) -> None:
        second = AdminServer(path, HANDLERS)
        with pytest.raises(AdminError) as caught:
            await second.start()
        assert str(caught.value) == in_use_message(path, os.getpid())
        assert "system.admin_socket" in str(caught.value) and "\n" not in str(caught.value)
        assert (await request(path, "status"))["state"] == "serving"  # still the first one's
        await second.close()  # closing a server that never started leaves the first alone
        assert (await request(path, "status"))["state"] == "serving"

    serving(path, body)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # socket and lock gone with the first
    start_and_close(path)  # and the path is free again


def test_a_lock_left_by_a_dead_server_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    (tmp_path / "admin.sock.lock").write_text("999999\n")  # nobody holds its flock any more
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(path))  # and its socket, with nothing listening
    start_and_close(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_the_socket_folder_is_created_private(tmp_path: Path) -> None:
    path = tmp_path / "run" / "appliance" / "admin.sock"

    async def body(_: AdminServer) -> None:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700

    serving(path, body)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_socket_folder_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    folder.chmod(mode)
    expected = f"admin socket folder {folder} has mode {mode:04o}, writable by group or others"
    with pytest.raises(AdminError, match=expected):
        start_and_close(folder / "admin.sock")
    assert list(folder.iterdir()) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_a_socket_folder_another_user_owns_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir(mode=0o700)
    os.chown(folder, 4242, 4242)  # e.g. created first by someone else
    expected = rf"admin socket folder {folder} is owned by uid 4242; expected uid {os.getuid()}"
    with pytest.raises(AdminError, match=expected):
        start_and_close(folder / "admin.sock")
    assert list(folder.iterdir()) == []


def test_a_symlinked_socket_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "run").symlink_to(tmp_path / "real")
    with pytest.raises(AdminError, match=f"admin socket folder {tmp_path / 'run'} is a symlink"):
        start_and_close(tmp_path / "run" / "admin.sock")
    assert list((tmp_path / "real").iterdir()) == []


def test_the_runtime_dir_is_never_a_predictable_tmp_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RUNTIME_DIRECTORY", "XDG_RUNTIME_DIR"):
        monkeypatch.delenv(name, raising=False)
    found = SystemSettings().runtime_dir
    assert not found.is_relative_to(tempfile.gettempdir()) and not found.is_relative_to("/tmp")
    assert found in (Path("/run/appliance"), Path("~/.local/state/appliance/run").expanduser())
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    if found != Path("/run/appliance"):
        assert SystemSettings().runtime_dir == Path("/run/user/1000/appliance")
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/appliance-b")
    assert SystemSettings().runtime_dir == Path("/run/appliance-b")
    assert SystemSettings().admin_socket_path == Path("/run/appliance-b/admin.sock")
    assert SystemSettings(admin_socket="").admin_socket_path is None


def test_a_socket_that_cannot_be_created_names_its_path(tmp_path: Path) -> None:
    folder = tmp_path / ("long-" * 30)  # AF_UNIX paths end at 108 bytes
    path = folder / "admin.sock"
    with pytest.raises(AdminError, match=rf"admin socket {path}: cannot listen \(AF_UNIX path too long\)"):
        start_and_close(path)
    assert list(folder.iterdir()) == []  # nor is its lock left behind
    (tmp_path / "file").write_text("a file where the folder should be")
    with pytest.raises(AdminError, match=rf"admin socket folder {tmp_path / 'file'}: cannot create it"):
        start_and_close(tmp_path / "file" / "admin.sock")


async def unserialisable(_: dict[str, Any]) -> dict[str, Any]:
    return {"pids": {1, 2}}  # a set: json.dumps cannot write it


async def too_deep(_: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for _ in range(100_000):
        nested = {"a": nested}
    return nested


def test_a_reply_that_cannot_be_written_is_an_error_reply_and_the_server_keeps_serving(
    tmp_path: Path,
) -> None:
    path = tmp_path / "admin.sock"

    async def body(_: AdminServer) -> None:
        reply = await raw(path, b'{"verb": "drain"}\n')
        assert reply == {
            "ok": False,
            "error": "request failed: TypeError: Object of type set is not JSON serializable",
        }
        reply = await raw(path, b'{"verb": "reload"}\n')
        assert reply["ok"] is False and reply["error"].startswith("request failed: RecursionError")
        assert await request(path, "status") == {"ok": True, "state": "serving"}

    serving(path, body, {**HANDLERS, "drain": unserialisable, "reload": too_deep})


def test_the_error_a_service_sends_cannot_forge_lines_or_escapes(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"

    async def hostile(_: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("no\nappliance: drained\x1b[2K\r")

    async def body(_: AdminServer) -> None:
        with pytest.raises(AdminError) as raised:
            await request(path, "drain")
        assert str(raised.value) == "drain: drain failed: no\\nappliance: drained\\x1b[2K\\r"

    serving(path, body, {**HANDLERS, "drain": hostile})
