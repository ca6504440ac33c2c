"""Every `appliance ota` verb against a real running service, and with none running."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import modelzoo
import numpy as np
import pytest
from services import line_requests_waiting

from appliance.engine.repository import file_digest
from appliance.ota import command, verbs
from appliance.ota.link import ServiceLink
from appliance.ota.store import SNAPSHOT_FORMAT, Store, records_dir
from appliance.protocol import codec
from appliance.system.admin import AdminError

HOOKS = Path(__file__).resolve().parents[2] / "firmware-hooks"
# verify's latency check compares medians of a few requests, which a loaded box moves by more than 50 %
# + 2 ms: tests that are not about it give it all the slack it needs (the one that is sets a baseline
# no request can meet).
FAST = {"verify_wait_s": 5.0, "verify_timed_requests": 3, "verify_latency_slack_ms": 600000.0}


def golden_repository(tmp_path: Path) -> Path:
    """`batchable` with golden samples, `fixed` without."""
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 8\n")
    write_samples(repo, "batchable", 1)
    modelzoo.write(repo, "fixed", modelzoo.fixed_batch())
    return repo


def write_samples(repo: Path, name: str, version: int, *, offset: float = 0.0) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.savez(
        repo / name / str(version) / "samples.npz",
        input__x=x,
        output__y=x * 2 + 1 + offset,
        output__s=x.sum(axis=1, keepdims=True),
    )


def infer(url: str, model: str = "batchable") -> httpx.Response:
    body = codec.encode_request({"x": np.ones((2, 4), np.float32)}, binary=False, binary_output=False)
    return httpx.post(f"{url}/v2/models/{model}/infer", content=body.body(), timeout=30.0)


def status(settings) -> dict:
    found = ServiceLink.from_settings(settings).status()
    assert found is not None
    return found


def messages(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(record.getMessage() for record in caplog.records)


def store(settings) -> Store:
    return Store(records_dir(settings))


def test_the_verbs_find_the_socket_the_service_listens_on(serve, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "appliance")
    socket_path = tmp_path / "own" / "admin.sock"
    with serve(golden_repository(tmp_path), system={"admin_socket": str(socket_path)}) as running:
        settings = running.service.settings
        assert ServiceLink.from_settings(settings).socket_path == socket_path
        assert verbs.gate(settings) == verbs.EX_OK
    expected = f"talking to appliance pid {os.getpid()} (no config file, http://127.0.0.1:{running.port})"
    assert f"{expected} on admin socket {socket_path}" in messages(caplog)


def test_the_verbs_fail_when_the_admin_socket_is_turned_off(settings_factory, tmp_path) -> None:
    settings = settings_factory(golden_repository(tmp_path), system={"admin_socket": ""})
    with pytest.raises(AdminError, match=r'the admin socket is turned off \(system.admin_socket = ""\)'):
        verbs.gate(settings)


def test_gate_goes_while_quiet_and_defers_while_the_line_is_served(serve, tmp_path, caplog) -> None:
    with serve(golden_repository(tmp_path), ota={"gate_max_line_ips": 0.0}) as running:
        settings = running.service.settings
        assert verbs.gate(settings) == verbs.EX_OK
        assert infer(running.url).status_code == 200
        assert verbs.gate(settings) == verbs.EX_TEMPFAIL
        assert "line traffic runs at" in messages(caplog)
        lenient = settings.ota.model_copy(update={"gate_max_line_ips": 1e6})
        assert verbs.gate(settings.model_copy(update={"ota": lenient})) == verbs.EX_OK


def test_drain_is_idempotent_and_commit_admits_again(serve, tmp_path) -> None:
    with serve(golden_repository(tmp_path)) as running:
        settings = running.service.settings
        assert verbs.drain(settings) == verbs.EX_OK
        assert verbs.drain(settings) == verbs.EX_OK
        assert status(settings)["state"] == "draining"
        assert store(settings).drained_pid() == os.getpid()
        assert infer(running.url).status_code == 503
        assert verbs.commit(settings) == verbs.EX_OK
        assert status(settings)["state"] == "ready"
        assert infer(running.url).status_code == 200
        assert verbs.commit(settings) == verbs.EX_OK
        assert store(settings).drained_pid() is None


def test_drain_that_times_out_resumes_serving_and_answers_try_later(serve, tmp_path, batches) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest="slo_p99_ms = 600000.0\n")
    with serve(repo, ota={"drain_timeout_s": 0.5}) as running:
        settings = running.service.settings
        answers: list[httpx.Response] = []
        with batches.holding(lambda batch: batch.model == "batchable"):
            request = threading.Thread(target=lambda: answers.append(infer(running.url)))
            request.start()
            batches.wait_held()  # a request mid-compute for as long as the drain may wait, and longer
            assert verbs.drain(settings) == verbs.EX_TEMPFAIL
            assert status(settings)["state"] == "ready"
            assert store(settings).drained_pid() is None
        request.join(60)
    assert [a.status_code for a in answers] == [200]  # the drain gave up on it; it was still answered


def test_snapshot_verify_commit(serve, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "appliance")
    repo = golden_repository(tmp_path)
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nretry_after_s = 2.0\n")
    with serve(repo, ota=FAST) as running:
        settings = running.service.settings
        running.service.control.config_file = config
        assert verbs.take_snapshot(settings, config) == verbs.EX_OK
        records = store(settings)
        saved = records.read_snapshot()
        assert saved is not None
        batchable, fixed = saved["models"]["batchable"], saved["models"]["fixed"]
        assert batchable["sha256"] == file_digest(repo / "batchable" / "1" / "model.onnx")
        assert batchable["placement"]["provider"] == "cpu"
        assert batchable["golden_ms"] > 0 and fixed["golden_ms"] is None
        assert saved["providers"]["cpu"] is True
        assert saved["config"]["path"] == str(config) and records.read_config_copy() == config.read_bytes()
        assert verbs.take_snapshot(settings, config) == verbs.EX_OK  # again: replaced, still whole

        assert verbs.verify(settings) == verbs.EX_OK
        assert "batchable: golden samples reproduce" in messages(caplog)
        assert "fixed: no samples.npz" in messages(caplog)

        assert verbs.commit(settings) == verbs.EX_OK
        assert records.read_snapshot() is None and not records.config_copy_path.exists()
        assert verbs.commit(settings) == verbs.EX_OK
        assert verbs.verify(settings) == verbs.EX_OK  # with no snapshot: a plain boot health check


def test_verify_fails_when_golden_samples_do_not_reproduce(serve, tmp_path, caplog) -> None:
    repo = golden_repository(tmp_path)
    write_samples(repo, "batchable", 1, offset=0.5)
    with serve(repo, ota=FAST) as running:
        assert verbs.verify(running.service.settings) == verbs.EX_FAILED
    assert "output 'y': 8 of 8 values differ beyond atol 1e-05 + rtol 0.0001" in messages(caplog)


def test_verify_fails_when_golden_samples_got_slower(serve, tmp_path, caplog) -> None:
    with serve(golden_repository(tmp_path), ota={**FAST, "verify_latency_slack_ms": 0.0}) as running:
        settings = running.service.settings
        assert verbs.take_snapshot(settings) == verbs.EX_OK
        records = store(settings)
        saved = records.read_snapshot()
        saved["models"]["batchable"]["golden_ms"] = 1e-6  # a baseline no HTTP request can meet
        records.save_snapshot(saved, None)
        assert verbs.verify(settings) == verbs.EX_FAILED
    assert "batchable: golden samples take" in messages(caplog)
    assert "0.000 ms before the update + 50 % + 0 ms" in messages(caplog)


def test_verify_catches_a_silent_fall_back_to_another_provider(serve, tmp_path, caplog) -> None:
    repo = golden_repository(tmp_path)
    models = {"providers": ["fake", "cpu"]}
    with serve(repo, models=models, providers={"fake": {"fail_session": False}}, ota=FAST) as running:
        assert verbs.take_snapshot(running.service.settings) == verbs.EX_OK
        assert status(running.service.settings)["models"]["batchable"]["placement"]["provider"] == "fake"
    with serve(repo, models=models, providers={"fake": {"fail_session": True}}, ota=FAST) as running:
        assert verbs.verify(running.service.settings) == verbs.EX_FAILED
    assert "batchable: fell back from fake to cpu: fake failed it" in messages(caplog)


def test_verify_fails_while_the_service_serves_a_file_other_than_the_installed_one(
    serve, tmp_path, caplog
) -> None:
    repo = golden_repository(tmp_path)
    with serve(repo, ota=FAST) as running:
        settings = running.service.settings
        assert verbs.take_snapshot(settings) == verbs.EX_OK
        modelzoo.write(repo, "batchable", _changed(modelzoo.batchable()), version=2)
        assert verbs.verify(settings) == verbs.EX_FAILED
    assert "serves version 1" in messages(caplog)
    assert "but the repository holds version 2" in messages(caplog)


def test_rollback_reloads_models_the_framework_restored_and_is_idempotent(serve, tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, "appliance")
    repo = golden_repository(tmp_path)
    with serve(repo, ota=FAST) as running, httpx.Client(base_url=running.url) as client:
        settings = running.service.settings
        assert verbs.take_snapshot(settings) == verbs.EX_OK
        modelzoo.write(repo, "batchable", _changed(modelzoo.batchable()), version=2)  # the update
        assert client.post("/v2/repository/models/batchable/load").json()["version"] == "2"
        assert verbs.verify(settings) == verbs.EX_OK
        assert "batchable: model changed: version 1" in messages(caplog)
        for leftover in (repo / "batchable" / "2").iterdir():  # the framework puts version 1 back
            leftover.unlink()
        (repo / "batchable" / "2").rmdir()
        caplog.clear()
        assert verbs.rollback(settings) == verbs.EX_OK
        assert "reloading models whose files changed on disk: batchable" in messages(caplog)
        assert status(settings)["models"]["batchable"]["version"] == "1"
        caplog.clear()
        assert verbs.rollback(settings) == verbs.EX_OK
        assert "no snapshot; nothing to restore" in messages(caplog)
        assert "reloading" not in messages(caplog)


def test_rollback_names_once_a_model_file_root_would_not_read(serve, tmp_path, caplog) -> None:
    repo = golden_repository(tmp_path)
    with serve(repo, ota=FAST) as running:
        settings = running.service.settings
        assert verbs.take_snapshot(settings) == verbs.EX_OK
        path = repo / "batchable" / "1" / "model.onnx"
        path.rename(tmp_path / "elsewhere.onnx")
        path.symlink_to(tmp_path / "elsewhere.onnx")
        caplog.clear()
        assert verbs.rollback(settings) == verbs.EX_OK
    assert messages(caplog).count("model.onnx is a symlink") == 1


def test_rollback_restores_the_config_file_and_says_to_restart(serve, tmp_path, caplog) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nretry_after_s = 2.0\n")
    config.chmod(0o640)
    with serve(golden_repository(tmp_path), ota=FAST) as running:
        settings = running.service.settings
        running.service.control.config_file = config
        assert verbs.take_snapshot(settings, config) == verbs.EX_OK
        config.write_text("[server]\nretry_after_s = 9.0\n")  # what the update brought
        assert verbs.drain(settings) == verbs.EX_OK
        assert verbs.rollback(settings, config) == verbs.EX_OK
        assert status(settings)["state"] == "ready"
    assert config.read_text() == "[server]\nretry_after_s = 2.0\n"
    assert config.stat().st_mode & 0o777 == 0o640
    rejected = store(settings).root / "rejected-config.toml"
    assert rejected.read_text() == "[server]\nretry_after_s = 9.0\n"
    assert "restart appliance.service to apply the restored config" in messages(caplog)
    assert verbs.rollback(settings, config) == verbs.EX_OK
    assert config.read_text() == "[server]\nretry_after_s = 2.0\n"


SERVICE_UID = 4242  # stands for the unprivileged `appliance` user
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def victim(tmp_path: Path) -> tuple[Path, bytes, int]:
    """A root-only file the service user would like root to read, overwrite or delete."""
    path = tmp_path / "shadow"
    path.write_bytes(b"root:secret-hash:19000::::::\n")
    path.chmod(0o600)
    return path, path.read_bytes(), path.stat().st_mtime_ns


def assert_untouched(path: Path, content: bytes, mtime_ns: int, records: Store) -> None:
    assert path.read_bytes() == content and path.stat().st_mtime_ns == mtime_ns
    assert path.stat().st_mode & 0o777 == 0o600 and path.stat().st_uid == 0
    if records.root.exists():
        for record in records.root.iterdir():  # nothing of it was copied where anyone can read it
            assert content not in record.read_bytes(), record


def test_snapshot_copies_its_own_config_file_not_the_one_the_status_names(serve, tmp_path, caplog) -> None:
    secret, content, mtime_ns = victim(tmp_path)
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nretry_after_s = 2.0\n")
    with serve(golden_repository(tmp_path), ota=FAST) as running:
        settings = running.service.settings
        running.service.control.config_file = (
            secret  # a status reply naming a file the service should not see
        )
        assert status(settings)["config_file"] == str(secret)
        assert verbs.take_snapshot(settings, config) == verbs.EX_OK
        records = store(settings)
        assert records.read_config_copy() == config.read_bytes()
        assert records.read_snapshot()["config"]["path"] == str(config)
        assert f"the service reads config {secret}; saving {config}" in messages(caplog)
        assert verbs.take_snapshot(settings, None) == verbs.EX_OK
        assert not records.config_copy_path.exists()
        assert_untouched(secret, content, mtime_ns, records)
        assert verbs.rollback(settings, None) == verbs.EX_OK
    assert_untouched(secret, content, mtime_ns, records)


def test_rollback_writes_only_the_configured_config_file(settings_factory, tmp_path, caplog) -> None:
    secret, content, mtime_ns = victim(tmp_path)
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nport = 9\n")
    settings = settings_factory(golden_repository(tmp_path))
    records = store(settings)
    planted = {"path": str(secret), "exists": True, "mode": 0o666, "uid": SERVICE_UID, "gid": SERVICE_UID}
    records.save_snapshot({"format": SNAPSHOT_FORMAT, "config": planted, "models": {}}, b"pwned\n")
    assert verbs.rollback(settings, config) == verbs.EX_FAILED
    assert f"the snapshot holds config file '{secret}', but this rollback restores {config}" in messages(
        caplog
    )
    assert_untouched(secret, content, mtime_ns, records)
    assert config.read_text() == "[server]\nport = 9\n"
    assert records.read_snapshot() is not None  # kept for whoever fixes the hooks' --config
    planted["exists"] = False  # "the update added this file": old rollbacks deleted it
    records.save_snapshot({"format": SNAPSHOT_FORMAT, "config": planted, "models": {}}, None)
    assert verbs.rollback(settings, config) == verbs.EX_FAILED
    assert_untouched(secret, content, mtime_ns, records)


@needs_root
def test_root_ignores_what_the_service_user_wrote_in_its_state_dir(
    settings_factory, tmp_path, caplog
) -> None:
    caplog.set_level(logging.INFO, "appliance")
    secret, content, mtime_ns = victim(tmp_path)
    config = tmp_path / "appliance.toml"
    settings = settings_factory(golden_repository(tmp_path))
    old_place = settings.system.state_dir / "ota"  # where records lived, writable by the service user
    old_place.mkdir(parents=True)
    record = {"path": str(secret), "exists": False}
    (old_place / "snapshot.json").write_text(json.dumps({"format": SNAPSHOT_FORMAT, "config": record}))
    for path in (settings.system.state_dir, old_place, old_place / "snapshot.json"):
        os.chown(path, SERVICE_UID, SERVICE_UID)
    assert verbs.rollback(settings, config) == verbs.EX_OK
    assert "rollback: no snapshot; nothing to restore" in messages(caplog)
    assert_untouched(secret, content, mtime_ns, store(settings))


@needs_root
@pytest.mark.parametrize("how", ["file of the service user", "symlinked file", "folder of the service user"])
def test_root_refuses_records_it_did_not_write(settings_factory, tmp_path, capsys, how) -> None:
    secret, content, mtime_ns = victim(tmp_path)
    config = tmp_path / "appliance.toml"
    config.write_text("[server]\nport = 9\n")
    settings = settings_factory(golden_repository(tmp_path))
    records = store(settings)
    records.save_snapshot({"format": SNAPSHOT_FORMAT, "config": None, "models": {}}, None)
    forged = json.dumps({"format": SNAPSHOT_FORMAT, "config": {"path": str(secret), "exists": False}})
    if how == "symlinked file":
        elsewhere = tmp_path / "forged.json"
        elsewhere.write_text(forged)
        records.snapshot_path.unlink()
        records.snapshot_path.symlink_to(elsewhere)
        expected = f"{records.snapshot_path} is a symlink; refusing to follow it"
    else:
        records.snapshot_path.write_text(forged)
        owned = records.snapshot_path if how == "file of the service user" else records.root
        os.chown(owned, SERVICE_UID, SERVICE_UID)
        expected = f"{owned} is owned by uid {SERVICE_UID}"
    ota_config = tmp_path / "ota.toml"
    system = settings.system
    ota_config.write_text(
        f'[models]\nrepository = "{settings.models.repository}"\n'
        f'[system]\nruntime_dir = "{system.runtime_dir}"\nstate_dir = "{system.state_dir}"\n'
    )
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    for verb in ("rollback", "verify"):
        args = parser.parse_args([verb, "--config", str(ota_config)])
        assert args.func(args) == verbs.EX_FAILED
        assert expected in capsys.readouterr().err
    assert_untouched(secret, content, mtime_ns, Store(tmp_path / "nothing"))
    assert config.read_text() == "[server]\nport = 9\n"
    args = parser.parse_args(["snapshot", "--config", str(ota_config)])
    if how == "folder of the service user":
        assert args.func(args) == verbs.EX_FAILED
        assert expected in capsys.readouterr().err
    else:  # a new snapshot replaces the forged entry (never following it) with root's own file
        assert args.func(args) == verbs.EX_OK
        assert not records.snapshot_path.is_symlink() and records.snapshot_path.stat().st_uid == 0
        assert records.read_snapshot()["config"]["path"] == str(ota_config)
    assert_untouched(secret, content, mtime_ns, Store(tmp_path / "nothing"))


def test_verify_resumes_only_a_drain_that_ota_drain_left(serve, tmp_path) -> None:
    with serve(golden_repository(tmp_path), ota={**FAST, "verify_wait_s": 0.2}) as running:
        settings = running.service.settings
        assert verbs.drain(settings) == verbs.EX_OK
        assert verbs.verify(settings) == verbs.EX_OK  # an in-place update: verify serves again
        assert status(settings)["state"] == "ready"
        hub = running.service.hub
        assert running.call(lambda: hub.drain(5.0)) is True  # someone else's drain (e.g. the pool)
        assert verbs.verify(settings) == verbs.EX_TEMPFAIL
        assert status(settings)["state"] == "draining"


def test_every_verb_with_no_service_running(settings_factory, tmp_path, caplog) -> None:
    repo = golden_repository(tmp_path)
    config = tmp_path / "appliance.toml"
    settings = settings_factory(repo, ota={"verify_wait_s": 0.01, "verify_boot_grace_s": 1e9})
    assert verbs.gate(settings) == verbs.EX_OK
    assert verbs.drain(settings) == verbs.EX_OK
    assert verbs.take_snapshot(settings, config) == verbs.EX_OK
    saved = store(settings).read_snapshot()
    assert saved["service"] is None and saved["config"] == {"path": str(config), "exists": False}
    assert saved["models"]["batchable"]["sha256"] == file_digest(repo / "batchable" / "1" / "model.onnx")
    assert verbs.verify(settings) == verbs.EX_TEMPFAIL
    expired = settings.ota.model_copy(update={"verify_boot_grace_s": 0.0})
    assert verbs.verify(settings.model_copy(update={"ota": expired})) == verbs.EX_FAILED
    assert "verify: the service is not running after 0.01 s, past verify_boot_grace_s" in messages(caplog)
    config.write_text("[server]\nport = 9\n")  # the update added a config file
    assert verbs.rollback(settings, config) == verbs.EX_OK
    assert not config.exists()
    assert verbs.commit(settings) == verbs.EX_OK
    assert verbs.rollback(settings, config) == verbs.EX_OK


def test_the_command_logs_to_stderr_and_maps_failures_to_1(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    config = tmp_path / "appliance.toml"
    run_dir = tmp_path / "run"
    config.write_text(
        f'[models]\nrepository = "{tmp_path / "repo"}"\n'
        f'[system]\nruntime_dir = "{run_dir}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    args = parser.parse_args(["gate", "--config", str(config)])
    assert args.func(args) == 0
    assert "appliance ota: INFO gate: the service is not running" in capsys.readouterr().err
    (tmp_path / "state-ota").write_text("a file where the records folder should be")
    args = parser.parse_args(["snapshot", "--config", str(config)])
    assert args.func(args) == 1
    assert "appliance ota: ERROR ota snapshot failed: cannot create" in capsys.readouterr().err


@pytest.mark.parametrize(("traffic", "expected"), [(False, 0), (True, 21)], ids=["quiet", "busy"])
def test_the_mender_gate_shim_runs_the_real_command(serve, tmp_path, batches, traffic, expected) -> None:
    with serve(golden_repository(tmp_path)) as running, contextlib.ExitStack() as busy:
        if traffic:  # requests wait in the line queue for as long as the test runs
            busy.enter_context(line_requests_waiting(running, batches, "batchable"))
        settings = running.service.settings
        wrapper = tmp_path / "appliance"
        wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n')
        wrapper.chmod(0o755)
        env = {
            "PATH": os.environ["PATH"],
            "APPLIANCE_BIN": str(wrapper),
            "APPLIANCE_SYSTEM__RUNTIME_DIR": str(settings.system.runtime_dir),
            "APPLIANCE_SYSTEM__STATE_DIR": str(settings.system.state_dir),
            "APPLIANCE_OTA__GATE_MAX_LINE_IPS": "1e9",  # the queue decides, not a rate that decays with time
        }
        shim = HOOKS / "mender" / "Download_Enter_10_appliance-gate"
        result = subprocess.run(["/bin/sh", str(shim)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == expected, result.stderr
    assert ("gate: busy, try again later" in result.stderr) == traffic


def _changed(model):
    model.doc_string = "version 2"  # other bytes, other digest, same behaviour
    return model
