"""What root's OTA verbs read from the service user: its model repository, its admin socket, its status
strings; and what root keeps for itself: the config file's mode and owner, the credstore token.

These run as root (as the hooks do); files and folders owned by another uid stand for the service
user's.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance.ota import golden, repofiles, restore, snapshot
from appliance.ota import verify as verifying
from appliance.ota.link import describe_instance
from appliance.ota.store import OtaError, Store
from appliance.settings import Settings
from appliance.system.admin import AdminError, admin_request

SERVICE_UID = 65534  # nobody: a uid other than root's, standing for the service user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the OTA verbs run as root")


def model(repo: Path, name: str = "m") -> Path:
    path = repo / name / "1" / "model.onnx"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"model")
    return path


# 1. The model repository


def test_a_model_file_linked_to_a_root_only_file_gets_no_digest(tmp_path: Path, caplog) -> None:
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:secret")
    secret.chmod(0o600)
    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / "model.onnx").symlink_to(secret)
    assert snapshot.digests_on_disk(repo) == {}
    assert "model.onnx is a symlink" in caplog.text
    assert hashlib.sha256(b"root:secret").hexdigest() not in caplog.text


def test_a_symlinked_model_folder_is_not_followed(tmp_path: Path) -> None:
    elsewhere = model(tmp_path / "elsewhere").parent.parent
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "m").symlink_to(elsewhere)
    with pytest.raises(OtaError, match="m is a symlink"):
        repofiles.digest(repo, repo / "m" / "1" / "model.onnx")


def test_a_sparse_model_file_past_the_cap_is_refused_without_reading_it(tmp_path: Path, caplog) -> None:
    path = model(tmp_path / "repo")
    os.truncate(path, repofiles.MAX_MODEL_BYTES + 1)  # sparse: costs no disk, would take hours to hash
    assert snapshot.digests_on_disk(tmp_path / "repo") == {}
    assert f"more than the {repofiles.MAX_MODEL_BYTES} bytes" in caplog.text


def test_a_fifo_is_refused_rather_than_blocking_open(tmp_path: Path) -> None:
    path = model(tmp_path / "repo")
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(OtaError, match="not a regular file"):
        repofiles.digest(tmp_path / "repo", path)


def test_a_regular_model_file_is_hashed(tmp_path: Path) -> None:
    model(tmp_path / "repo")
    assert snapshot.digests_on_disk(tmp_path / "repo")["m"].sha256 == hashlib.sha256(b"model").hexdigest()


def npy_claiming(shape: tuple[int, ...]) -> bytes:
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}".encode()
    header += b" " * (117 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header


def test_samples_whose_header_claims_terabytes_are_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "samples.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("input__x.npy", npy_claiming((1 << 40,)))
        archive.writestr("output__y.npy", npy_claiming((1,)))
    with pytest.raises(ValueError, match="arrays declare more than"):
        golden.read_samples(path)


def test_symlinked_samples_are_not_read(tmp_path: Path) -> None:
    real = tmp_path / "real.npz"
    np.savez(real, input__x=np.ones(2), output__y=np.ones(2))
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "samples.npz").symlink_to(real)
    with pytest.raises(ValueError, match="is a symlink"):
        golden.read_samples(repo / "samples.npz", repo)


def test_a_manifest_linked_to_a_root_only_file_is_not_read(tmp_path: Path, caplog) -> None:
    secret = tmp_path / "secret.toml"
    secret.write_text('version = "TOPSECRET"\n')  # a validation error would quote the value
    secret.chmod(0o600)
    repo = tmp_path / "repo"
    model(repo)
    (repo / "m" / "model.toml").symlink_to(secret)
    (repo / "m" / "config.pbtxt").symlink_to(secret)
    model(repo, "other")
    assert list(snapshot.digests_on_disk(repo)) == ["other"]
    assert "model.toml is a symlink" in caplog.text
    assert "TOPSECRET" not in caplog.text


def test_a_symlinked_version_folder_leaves_its_model_out_with_the_reason(tmp_path: Path, caplog) -> None:
    repo = tmp_path / "repo"
    model(repo)
    newer = model(tmp_path / "elsewhere").parent
    (repo / "m" / "2").symlink_to(newer)
    assert snapshot.digests_on_disk(repo) == {}
    assert "2 is a symlink" in caplog.text


def test_a_symlinked_model_folder_is_named_not_walked(tmp_path: Path, caplog) -> None:
    repo = tmp_path / "repo"
    model(repo)
    (repo / "linked").symlink_to(model(tmp_path / "elsewhere").parent.parent)
    assert list(snapshot.digests_on_disk(repo)) == ["m"]
    assert "model linked: no digest on disk" in caplog.text
    assert "linked is a symlink" in caplog.text


def test_root_reads_a_manifest_no_further_than_its_cap(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model(repo)
    manifest = repo / "m" / "model.toml"
    manifest.write_text("[batching]\nmax_batch_size = 4\n")
    files = repofiles.RootFiles(repo)
    assert files.read(manifest, 100) == manifest.read_bytes()
    os.truncate(manifest, 1 << 40)  # sparse; root reads none of it
    with pytest.raises(OtaError, match="more than the 100 bytes"):
        files.read(manifest, 100)
    os.unlink(manifest)
    os.mkfifo(manifest)  # swapped in after a check: open() must not block
    with pytest.raises(OtaError, match="not a regular file"):
        files.read(manifest, 100)
    assert not files.is_file(manifest)


# 2. The admin socket


@pytest.fixture
def serve_once(tmp_path: Path) -> Iterator[Callable[..., tuple[Path, list[bytes]]]]:
    """Start a one-connection server at `<folder>/admin.sock` that runs `answer(conn)`; yields the
    socket path and the requests it received. The server ends when the test does."""
    done = threading.Event()
    threads: list[threading.Thread] = []

    def start(answer: Callable[[socket.socket, threading.Event], None], folder: Path | None = None):
        folder = folder or tmp_path / "run"
        folder.mkdir(exist_ok=True)
        path = folder / "admin.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen()
        received: list[bytes] = []

        def loop() -> None:
            with listener:
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(5)
                    try:
                        received.append(conn.recv(4096))
                        if received[-1]:
                            answer(conn, done)
                    except OSError:  # the client refused to talk, or gave up: what the tests expect
                        return

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        threads.append(thread)
        return path, received

    yield start
    done.set()
    for thread in threads:
        thread.join(timeout=10)


def test_a_symlinked_admin_socket_is_not_followed(serve_once, tmp_path: Path) -> None:
    target, received = serve_once(lambda conn, done: conn.sendall(b'{"ok": true}\n'), tmp_path / "private")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "admin.sock").symlink_to(target)
    with pytest.raises(AdminError, match="is a symlink"):
        admin_request(tmp_path / "run" / "admin.sock", "status", timeout_s=5)
    with socket.socket(socket.AF_UNIX) as probe:  # let the server's accept() return
        probe.connect(str(target))
    assert received in ([], [b""])


def test_nothing_is_sent_to_a_listener_that_is_not_the_folders_owner(serve_once, tmp_path: Path) -> None:
    path, received = serve_once(lambda conn, done: conn.sendall(b'{"ok": true}\n'))
    os.chown(path.parent, SERVICE_UID, SERVICE_UID)  # the service user's folder, root's listener
    os.chown(path, SERVICE_UID, SERVICE_UID, follow_symlinks=False)
    with pytest.raises(AdminError, match=f"runs as uid 0, not uid {SERVICE_UID}"):
        admin_request(path, "status", timeout_s=5)
    assert received in ([], [b""])


def test_one_deadline_bounds_a_reply_dripped_a_byte_at_a_time(serve_once) -> None:
    def drip(conn: socket.socket, done: threading.Event) -> None:
        for _ in range(100):  # JSON whitespace, each byte well within any per-recv timeout
            if done.wait(0.05):
                return
            conn.sendall(b" ")
        conn.sendall(b'{"ok": true}\n')

    path, _ = serve_once(drip)
    with pytest.raises(AdminError, match=r"no answer to 'status' within 0\.5 s"):
        admin_request(path, "status", timeout_s=0.5)


def test_a_deeply_nested_reply_is_an_admin_error(serve_once) -> None:
    path, _ = serve_once(lambda conn, done: conn.sendall(b"[" * 200_000 + b"\n"))
    with pytest.raises(AdminError, match="is not JSON it can read"):
        admin_request(path, "status", timeout_s=5)


def test_the_service_users_own_socket_is_served(serve_once) -> None:
    path, received = serve_once(lambda conn, done: conn.sendall(b'{"ok": true, "pid": 7}\n'))
    assert admin_request(path, "status", timeout_s=5)["pid"] == 7
    assert received == [b'{"verb": "status", "args": {}}\n']


# 3. The API token from the credstore


def credential(path: Path, text: bytes = b"s3cret\n", mode: int = 0o600, uid: int = 0) -> Path:
    path.write_bytes(text)
    path.chmod(mode)
    os.chown(path, uid, 0)
    return path


def test_root_hooks_read_the_provisioned_token_without_credentials_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    monkeypatch.setattr(verifying, "CREDSTORE_TOKEN", credential(tmp_path / "appliance.server.api_token"))
    assert verifying.api_token(Settings()) == "s3cret"


def test_the_configured_token_wins_over_the_credstore(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(verifying, "CREDSTORE_TOKEN", credential(tmp_path / "appliance.server.api_token"))
    assert verifying.api_token(Settings(server={"api_token": "configured"})) == "configured"


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("service_user_owns_it", f"owned by uid {SERVICE_UID}"),
        ("others_may_read_it", "mode 0644"),
        ("symlink", "cannot be opened"),
        ("too_long", "longer than 4096 bytes"),
    ],
)
def test_a_credstore_token_root_should_not_trust_is_refused(tmp_path, how, message) -> None:
    path = tmp_path / "appliance.server.api_token"
    if how == "service_user_owns_it":
        credential(path, uid=SERVICE_UID)
    elif how == "others_may_read_it":
        credential(path, mode=0o644)
    elif how == "symlink":
        path.symlink_to(credential(tmp_path / "elsewhere"))
    else:
        credential(path, b"x" * 4097)
    with pytest.raises(OtaError, match=message):
        verifying.credstore_token(path)


def test_no_credstore_token_is_none(tmp_path) -> None:
    assert verifying.credstore_token(tmp_path / "missing") is None


# 4. The config file's mode and owner


def test_rollback_restores_the_mode_and_owner_the_snapshot_recorded(tmp_path: Path) -> None:
    config = tmp_path / "appliance.toml"
    config.write_bytes(b"[server]\n")
    os.chown(config, 0, SERVICE_UID)
    config.chmod(0o640)
    store = Store(tmp_path / "records")
    document, content = snapshot.build(status=None, golden={}, repository=tmp_path, config_path=config)
    store.save_snapshot(document, content)
    os.chown(config, 0, 0)  # the update left the same bytes, root's only
    config.chmod(0o600)
    assert restore.config_file(store, store.read_snapshot(), config) is True
    st = config.stat()
    assert (st.st_mode & 0o777, st.st_uid, st.st_gid) == (0o640, 0, SERVICE_UID)
    assert config.read_bytes() == b"[server]\n"
    assert restore.config_file(store, store.read_snapshot(), config) is False  # idempotent


# 5. Status strings in root's hook log


def test_a_newline_in_the_status_cannot_forge_a_log_line() -> None:
    status = {"pid": 1, "config_file": "/etc/a.toml\nappliance ota: INFO verify: healthy"}
    text = describe_instance(status, Path("/run/appliance/admin.sock"))
    assert "\n" not in text
    assert "/etc/a.toml\\nappliance ota" in text
