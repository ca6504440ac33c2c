"""The OTA folder: whole snapshots, idempotent discards, the drain marker, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from appliance.ota.store import SNAPSHOT_FORMAT, OtaError, Store, write_atomically


def document(**extra: object) -> dict:
    return {"format": SNAPSHOT_FORMAT, "taken_at": "2025-01-01T00:00:00+00:00", "models": {}, **extra}


def test_no_snapshot_reads_as_none(tmp_path: Path) -> None:
    assert Store(tmp_path / "state").read_snapshot() is None


def test_a_snapshot_round_trips_with_its_config_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.save_snapshot(document(), b"[server]\nport = 8001\n")
    assert store.read_snapshot() == document()
    assert store.read_config_copy() == b"[server]\nport = 8001\n"
    for path in (store.root, store.snapshot_path, store.config_copy_path):
        assert path.stat().st_mode & 0o077 == 0, f"{path} is readable by others"
    assert sorted(p.name for p in store.root.iterdir()) == ["config.toml", "snapshot.json"]  # no temp files


def test_a_snapshot_without_a_config_file_drops_an_old_copy(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    store.save_snapshot(document(), b"old")
    store.save_snapshot(document(), None)
    assert not store.config_copy_path.exists()


def test_discard_is_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
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
    store = Store(tmp_path / "state")
    store.root.mkdir(parents=True)
    store.snapshot_path.write_bytes(content)
    with pytest.raises(OtaError, match=message) as caught:
        store.read_snapshot()
    assert str(store.snapshot_path) in str(caught.value)


def test_the_drain_marker(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
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


def test_a_state_dir_that_cannot_hold_the_ota_folder(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("a file where the state folder should be")
    with pytest.raises(OtaError, match=r"cannot create .*state/ota \(Not a directory\)"):
        Store(tmp_path / "state").save_snapshot(document(), None)
