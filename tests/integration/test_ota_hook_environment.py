"""`appliance ota` run by an update agent's unit: the service's folders never come from the agent's
systemd variables, and a verb that cannot reach a service systemd says is up never says "go"."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import modelzoo
import pytest
from subprocesses import environment

from appliance.ota import command, verbs

HOOKS = Path(__file__).resolve().parents[2] / "firmware-hooks"

# Runs in a private mount namespace: /run and /var/lib are fresh tmpfs, so /run/appliance and
# /var/lib/appliance are the service's as on a provisioned box (systemd's RuntimeDirectory= and
# StateDirectory=), and /run/mender, /var/lib/mender are the update agent's, handed to its hooks.
BOX = textwrap.dedent(
    """
    import json, os, subprocess, sys, threading
    from pathlib import Path
    from appliance.system.admin import admin_request

    service_env, hook_env, repository, hooks = json.loads(sys.argv[1])
    for mountpoint in ("/run", "/var/lib"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", mountpoint], check=True)
    for folder in ("/run/appliance", "/var/lib/appliance", "/run/mender", "/var/lib/mender"):
        os.mkdir(folder, 0o700)
    service_env.update(RUNTIME_DIRECTORY="/run/appliance", STATE_DIRECTORY="/var/lib/appliance")
    hook_env.update(RUNTIME_DIRECTORY="/run/mender", STATE_DIRECTORY="/var/lib/mender")
    argv = [sys.executable, "-m", "appliance", "serve", "--model-repository", repository, "--port", "0"]
    output = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    service = subprocess.Popen(argv, env=service_env, **output)
    for line in service.stdout:
        if "ready on http://" in line:
            break
    else:
        raise SystemExit("the service ended before it was ready")
    threading.Thread(target=service.stdout.read, daemon=True).start()

    def hook(name):
        done = subprocess.run(["sh", f"{hooks}/mender/{name}"], env=hook_env, capture_output=True, text=True)
        state = admin_request(Path("/run/appliance/admin.sock"), "status")["state"]
        lib = sorted(os.listdir("/var/lib"))
        return {"exit": done.returncode, "stderr": done.stderr, "state": state, "lib": lib}

    try:
        drain = hook("ArtifactInstall_Enter_20_appliance-drain")
        commit = hook("ArtifactCommit_Leave_10_appliance-commit")
    finally:
        service.terminate()
        service.wait(60)
    print(json.dumps({"drain": drain, "commit": commit}))
    """
)


def _can_unshare() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "-m", "--propagation", "private", "mount", "-t", "tmpfs", "tmpfs", "/run"]
    return subprocess.run(probe, capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs root and `unshare -m` (a private mount namespace)")
def test_a_hook_run_from_an_agents_unit_drains_the_service_not_the_agents_folder(tmp_path) -> None:
    repo = tmp_path / "repo"
    modelzoo.write(repo, "batchable", modelzoo.batchable())
    wrapper = tmp_path / "bin" / "appliance"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n')
    wrapper.chmod(0o755)
    service_env = {**environment(tmp_path), "APPLIANCE_SERVER__GRPC_PORT": "-1"}
    hook_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "APPLIANCE_BIN": str(wrapper)}
    box = [sys.executable, "-c", BOX, json.dumps([service_env, hook_env, str(repo), str(HOOKS)])]
    result = subprocess.run(
        ["unshare", "-m", "--propagation", "private", *box], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    drain, commit = seen["drain"], seen["commit"]
    assert drain["exit"] == 0, drain["stderr"]
    assert "admin socket /run/appliance/admin.sock" in drain["stderr"]
    assert "not running" not in drain["stderr"]
    assert drain["state"] == "draining"
    assert drain["lib"] == ["appliance", "appliance-ota", "mender"]  # the records beside the service's state
    assert (commit["exit"], commit["state"]) == (0, "ready"), commit["stderr"]


def _systemctl(folder: Path, state: str) -> Path:
    """A `systemctl` that answers `is-active` as systemd would for a unit in `state`."""
    folder.mkdir(exist_ok=True)
    script = folder / "systemctl"
    code = 0 if state in ("active", "reloading") else 3
    script.write_text(
        f'#!/bin/sh\n[ "$1 $2" = "is-active appliance.service" ] || exit 64\necho {state}\nexit {code}\n'
    )
    script.chmod(0o755)
    return folder


# What each verb says when nothing answers and systemd does not say the unit is up.
STOPPED = {
    "gate": "the service is not running",
    "drain": "the service is not running",
    "snapshot": "the service is not running",
    "commit": "commit: no snapshot; nothing to discard",
    "rollback": "rollback: no snapshot; nothing to restore",
}


@pytest.mark.parametrize("verb", list(STOPPED))
@pytest.mark.parametrize(
    ("unit", "booted", "expected"),
    [
        ("active", True, 1),
        ("reloading", True, 1),
        ("activating", True, 0),
        ("inactive", True, 0),
        ("failed", True, 0),
        ("active", False, 0),  # systemd does not run this box: no one to ask
    ],
)
def test_a_silent_socket_of_a_unit_systemd_says_is_up_is_no_go(
    tmp_path, monkeypatch, capsys, verb, unit, booted, expected
) -> None:
    config = tmp_path / "appliance.toml"
    config.write_text(
        f'[models]\nrepository = "{tmp_path / "repo"}"\n'
        f'[system]\nruntime_dir = "{tmp_path / "run"}"\nstate_dir = "{tmp_path / "state"}"\n'
    )
    monkeypatch.setenv("PATH", f"{_systemctl(tmp_path / 'bin', unit)}:{os.environ['PATH']}")
    booted_marker = tmp_path / "run-systemd-system"
    if booted:
        booted_marker.mkdir()
    monkeypatch.setattr(verbs, "SYSTEMD_RUNTIME", booted_marker)
    parser = argparse.ArgumentParser()
    command.add_arguments(parser)
    args = parser.parse_args([verb, "--config", str(config)])
    assert args.func(args) == expected
    err = capsys.readouterr().err
    if expected == 1:
        assert err.strip() == (
            f"appliance ota: ERROR ota {verb} failed: systemd says appliance.service is {unit}, but nothing "
            f"answers on admin socket {tmp_path / 'run' / 'admin.sock'}: the verb cannot tell what the "
            "service is doing. It finds the socket from the config file (--config, else "
            "/etc/appliance/appliance.toml) and APPLIANCE_ variables, never from the unit's environment: "
            "set [system] runtime_dir or admin_socket there as appliance.service has it"
        )
        assert not (tmp_path / "state-ota" / "drained.json").exists()
        assert not (tmp_path / "state-ota" / "snapshot.json").exists()
    else:
        assert STOPPED[verb] in err
