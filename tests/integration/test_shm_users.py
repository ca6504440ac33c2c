"""A camera process and the service as two users (README: "Sharing memory with a camera process"):
the service runs as its own uid with a shared group, also inside a user namespace of its own as the
unit's PrivateUsers= puts it (the group shows as nogroup there, and still counts); a region the
camera's uid made with that group and mode 0660 serves, 0640 serves inputs only, 0600 is refused
with 403 and says what to change."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest
from shm_objects import ShmObject, shm_object
from subprocesses import READY, Process, environment

from appliance.protocol import codec

SERVICE_UID, SERVICE_GID = 61_001, 61_001  # `appliance` in sysusers; numeric ids need no passwd entry
CAMERA_UID, CAMERA_GID = 61_002, 61_002
SHARED_GID = 61_003  # the group both are in (the unit's SupplementaryGroups=)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the service as another uid")


AS_SERVICE = {"user": SERVICE_UID, "group": SERVICE_GID, "extra_groups": [SHARED_GID]}
ROOT = Path(__file__).resolve().parents[2]


PRIVATE_USERS = ["unshare", "--user", "--map-current-user"]  # what PrivateUsers=yes does to the groups


def _python(env: dict[str, str], prefix: list[str]) -> str:
    """An interpreter the service's uid may run: this one, or the system's of the same version (this
    one may live under /root) with this one's packages on PYTHONPATH."""
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"]])
    for candidate in (sys.executable, f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"):
        try:
            check = subprocess.run([*prefix, candidate, "-c", "import appliance.service"], env=env, cwd="/",
                                   capture_output=True, timeout=120, **AS_SERVICE)  # fmt: skip
        except OSError:
            continue
        if check.returncode == 0:
            return candidate
    pytest.skip(f"no Python interpreter that uid {SERVICE_UID} may run and import appliance with {prefix}")


@pytest.fixture(params=["plain", "private_users"])
def service_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """`appliance serve` as SERVICE_UID in SERVICE_GID plus SHARED_GID, nothing else; with
    `private_users`, in a user namespace of its own where only its uid is mapped."""
    prefix = PRIVATE_USERS if request.param == "private_users" else []
    if prefix and shutil.which(prefix[0]) is None:
        pytest.skip("no unshare(1) here")
    scratch = Path(tempfile.mkdtemp(prefix="appliance-users-"))
    try:
        os.chmod(scratch, 0o755)
        modelzoo.write(scratch / "repo", "batchable", modelzoo.batchable())
        home = scratch / "home"
        home.mkdir()
        os.chown(home, SERVICE_UID, SERVICE_GID)
        env = {**environment(home), "HOME": str(home)}
        command = ["-m", "appliance", "serve", "--model-repository", str(scratch / "repo"), "--port", "0"]
        popen = subprocess.Popen(
            [*prefix, _python(env, prefix), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env=env, cwd=home, **AS_SERVICE,
        )  # fmt: skip
        process = Process(popen)
        reader = threading.Thread(target=_pump, args=(process,), daemon=True)
        reader.start()
        try:
            # Slow to start under load: no bytecode cache for this uid, every module compiled again.
            host, port = process.wait_for(READY, timeout_s=300).groups()
            if prefix:  # only its own uid is mapped: the shared group is nogroup in there
                assert Path(f"/proc/{popen.pid}/uid_map").read_text().split() == [str(SERVICE_UID)] * 2 + [
                    "1"
                ]
            yield f"http://{host}:{port}"
        finally:
            popen.terminate()
            code = popen.wait(60)
            reader.join(30)
            popen.stdout.close()  # type: ignore[union-attr]
            assert code == 0, "".join(process.seen)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _pump(process: Process) -> None:
    assert process.popen.stdout is not None
    for line in process.popen.stdout:
        process.lines.put(line)
    process.lines.put(None)


def _camera_region(mode: int) -> ShmObject:
    """What a camera process does: shm_open as its own user, then give the region the shared group."""
    return shm_object(4096, owner=(CAMERA_UID, SHARED_GID), mode=mode)


def _register(http: httpx.Client, name: str, obj: ShmObject) -> httpx.Response:
    body = {"key": obj.key, "offset": 0, "byte_size": obj.size}
    return http.post(f"/v2/systemsharedmemory/region/{name}/register", json=body)


def _infer(http: httpx.Client, inputs: str, outputs: str | None) -> httpx.Response:
    document: dict = {
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "parameters": {
            "shared_memory_region": inputs, "shared_memory_byte_size": 16}}],
    }  # fmt: skip
    if outputs is not None:
        where = {"shared_memory_region": outputs, "shared_memory_byte_size": 16, "shared_memory_offset": 64}
        document["outputs"] = [{"name": "y", "parameters": where}]
    return http.post("/v2/models/batchable/infer", json=document)


def test_a_camera_region_shared_by_group_and_mode(service_url: str) -> None:
    x = np.array([[1, 2, 3, 4]], np.float32)
    with (
        httpx.Client(base_url=service_url, timeout=60) as http,
        _camera_region(0o660) as shared,
        _camera_region(0o640) as read_only,
        _camera_region(0o600) as private,
    ):
        for obj in (shared, read_only):
            obj.write(x.tobytes())
        assert _register(http, "shared", shared).status_code == 200
        answer = _infer(http, "shared", "shared")
        assert answer.status_code == 200, answer.text
        assert np.frombuffer(shared.read(16, 64), np.float32).tolist() == [3.0, 5.0, 7.0, 9.0]

        assert _register(http, "read_only", read_only).status_code == 200  # inputs only
        inputs_only = _infer(http, "read_only", None)
        assert codec.decode_response(inputs_only.content)["y"].tolist() == [[3.0, 5.0, 7.0, 9.0]]
        refused = _infer(http, "read_only", "read_only")
        assert refused.status_code == 400 and "read-only to the service" in refused.json()["error"]

        forbidden = _register(http, "private", private)
        assert forbidden.status_code == 403
        assert "uid 61001" in forbidden.json()["error"] and "mode 0660" in forbidden.json()["error"]
