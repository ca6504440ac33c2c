"""The OTA records: whole snapshots, idempotent discards, the drain marker, atomic replacement, and
records nobody but root (or the verb's own user) could have written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from appliance.ota.store import SNAPSHOT_FORMAT, OtaError, Store, records_dir, write_atomically
from appliance.settings import Settings

SERVICE_UID = 4242  # stands for the unprivileged `appliance` user


def document(**extra: object) -> dict:
    return {"format": SNAPSHOT_FORMAT, "taken_at": "2025-01-01T00:00:00+00:00", "models": {}, **extra}


def test_no_snapshot_reads_as_none(tmp_path: Path) -> None:
    assert Store(tmp_path / "records").read_snapshot() is None


def test_a_snapshot_round_trips_with_its_config_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"[server]\nport = 8001\n")
    assert store.read_snapshot() == document()
    assert store.read_config_copy() == b"[server]\nport = 8001\n"
    assert store.config_copy_path.stat().st_mode & 0o777 == 0o600  # it may hold secrets
    assert store.root.stat().st_mode & 0o777 == 0o755  # the health check reads as the service user
    assert store.snapshot_path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in store.root.iterdir()) == ["config.toml", "snapshot.json"]  # no temp files


def test_a_snapshot_without_a_config_file_drops_an_old_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"old")
    store.save_snapshot(document(), None)
    assert not store.config_copy_path.exists()


def test_discard_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"x")
    assert store.discard() is True
    assert store.discard() is False
    assert store.read_snapshot() is None and not store.config_copy_path.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", "not valid JSON"),
        (json.dumps({"format": 99}).encode(), "has format 99; expected 1"),
        (b"[]", "has format 'list'; expected 1"),
    ],
)
def test_an_unusable_snapshot_names_its_path(tmp_path: Path, content: bytes, message: str) -> None:
    store = Store(tmp_path / "records")
    store.root.mkdir(parents=True)
    store.snapshot_path.write_bytes(content)
    with pytest.raises(OtaError, match=message) as caught:
        store.read_snapshot()
    assert str(store.snapshot_path) in str(caught.value)


def test_the_drain_marker(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    assert store.drained_pid() is None
    store.mark_drained(4242)
    assert store.drained_pid() == 4242
    store.clear_drained()
    store.clear_drained()
    assert store.drained_pid() is None
    store.root.joinpath("drained.json").write_text("garbage")
    assert store.drained_pid() is None


def test_write_atomically_replaces_and_sets_the_mode(tmp_path: Path) -> None:
    target = tmp_path / "appliance.toml"
    target.write_text("old")
    write_atomically(target, b"new", mode=0o640)
    assert target.read_bytes() == b"new"
    assert target.stat().st_mode & 0o777 == 0o640
    assert [p.name for p in tmp_path.iterdir()] == ["appliance.toml"]


def test_write_atomically_names_the_path_it_could_not_write(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a folder")
    with pytest.raises(OtaError, match=r"cannot write .*file/appliance.toml \(Not a directory\)"):
        write_atomically(tmp_path / "file" / "appliance.toml", b"x", mode=0o600)


def test_a_records_folder_that_cannot_be_created(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where a folder should be")
    with pytest.raises(OtaError, match=r"cannot create records folder .*state/ota \(Not a directory\)"):
        Store(tmp_path / "state" / "ota").save_snapshot(document(), None)


def test_records_live_beside_the_state_dir_not_in_it(tmp_path: Path) -> None:
    settings = Settings(system={"state_dir": tmp_path / "appliance", "runtime_dir": tmp_path / "run"})
    assert records_dir(settings) == tmp_path / "appliance-ota"
    installed = Settings(system={"state_dir": Path("/var/lib/appliance"), "runtime_dir": tmp_path})
    assert records_dir(installed) == Path("/var/lib/appliance-ota")
    chosen = Settings(system={"runtime_dir": tmp_path}, ota={"records_dir": tmp_path / "mine"})
    assert records_dir(chosen) == tmp_path / "mine"


# Root trusts only what root wrote. These tests run as root (the sandbox does; CI containers do),
# so a file chowned to SERVICE_UID stands for one the service user wrote or replaced.
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


@needs_root
def test_a_records_folder_the_service_user_owns_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"x")
    os.chown(store.root, SERVICE_UID, SERVICE_UID)
    expected = rf"records folder {store.root}: {store.root} is owned by uid {SERVICE_UID}; .* trusts only"
    for action in (store.read_snapshot, store.read_config_copy, store.discard, store.clear_drained):
        with pytest.raises(OtaError, match=expected):
            action()
    with pytest.raises(OtaError, match=expected):
        store.save_snapshot(document(), b"y")
    assert store.drained_pid() is None  # a marker that cannot be trusted is ignored, with a warning
    assert store.snapshot_path.exists() and store.config_copy_path.read_bytes() == b"x"  # not touched


@needs_root
def test_records_inside_a_folder_the_service_user_owns_are_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"  # e.g. records_dir set to /var/lib/appliance/ota
    state.mkdir()
    os.chown(state, SERVICE_UID, SERVICE_UID)
    store = Store(state / "ota")
    with pytest.raises(OtaError, match=rf"{state} is owned by uid {SERVICE_UID}"):
        store.save_snapshot(document(), b"x")


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_a_records_folder_others_may_write_is_refused(tmp_path: Path, mode: int) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), None)
    store.root.chmod(mode)
    with pytest.raises(OtaError, match=f"has mode {mode:04o}, writable by group or others"):
        store.read_snapshot()


def test_a_symlinked_records_folder_is_refused(tmp_path: Path) -> None:
    real = Store(tmp_path / "elsewhere")
    real.save_snapshot(document(), None)
    (tmp_path / "records").symlink_to(real.root)
    with pytest.raises(OtaError, match="records is a symlink; expected a real folder"):
        Store(tmp_path / "records").read_snapshot()


@pytest.mark.parametrize("name", ["snapshot.json", "config.toml"])
def test_a_symlinked_record_is_refused(tmp_path: Path, name: str) -> None:
    secret = tmp_path / "secret"  # a root-only file the service user would like to read or overwrite
    secret.write_text(json.dumps(document()))
    secret.chmod(0o600)
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"x")
    (store.root / name).unlink()
    (store.root / name).symlink_to(secret)
    read = store.read_snapshot if name == "snapshot.json" else store.read_config_copy
    with pytest.raises(OtaError, match=f"{store.root / name} is a symlink; refusing to follow it"):
        read()


@needs_root
@pytest.mark.parametrize("name", ["snapshot.json", "config.toml", "drained.json"])
def test_a_record_the_service_user_owns_is_refused(tmp_path: Path, name: str) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"x")
    store.mark_drained(7)
    os.chown(store.root / name, SERVICE_UID, SERVICE_UID)
    expected = rf"{store.root / name} is owned by uid {SERVICE_UID}; .* trusts only files owned by uid 0"
    if name == "drained.json":
        assert store.drained_pid() is None
        return
    read = store.read_snapshot if name == "snapshot.json" else store.read_config_copy
    with pytest.raises(OtaError, match=expected):
        read()


def test_a_record_others_may_write_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "records")
    store.save_snapshot(document(), b"x")
    store.snapshot_path.chmod(0o666)
    with pytest.raises(OtaError, match=r"snapshot.json has mode 0666, writable by group or others"):
        store.read_snapshot()
