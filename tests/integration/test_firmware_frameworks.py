"""The RAUC, SWUpdate and greenboot shims (firmware-hooks/) running the real `appliance ota` against a
running service, and, where the framework can be installed, run by the framework itself.

- RAUC 1.8 (Debian's `rauc`): a real `rauc install` of a signed bundle, by a `rauc service` on a
  private D-Bus session bus, into file-backed slots, with `bootloader=noop`; it runs the pre-install
  handler and the bundle's install-check hook. Needs root (it loop-mounts the bundle).
- SWUpdate 2022.12 (Debian's `swupdate`): a real `swupdate -i` of a signed .swu whose only content is
  the shim; it calls the shim with `preinst` and `postinst` (and, with `data = "inplace"`, passes
  that on). This SWUpdate has no `postfailure` stage (newer ones do): that stage is checked by
  calling the shim as a newer SWUpdate would.
- greenboot is not packaged for Debian: its shims run under bash, as greenboot runs them, against
  the real command. That part is what greenboot's runner would do, not greenboot itself.
The frameworks' binaries are skipped where absent (`apt-get install rauc swupdate squashfs-tools`),
never replaced by a fake. `tests/unit/test_firmware_hooks.py` checks each shim's exit-code mapping
against a fake `appliance`; here everything but the framework missing is real.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from hashlib import sha256
from pathlib import Path
from typing import Any

import modelzoo
import numpy as np
import pytest
from services import line_requests_waiting

from appliance.ota.link import ServiceLink
from appliance.ota.store import Store, records_dir

HOOKS = Path(__file__).resolve().parents[2] / "firmware-hooks"
BUSY_REASON = "appliance: line traffic is busy; install this bundle later"
# Verify compares outputs, not timings (bench/ does those); the gate defers to queued line requests
# only, which a test holds for as long as it needs, not to a rate that decays with time.
OTA = {
    "verify_wait_s": 30.0,
    "verify_timed_requests": 1,
    "verify_latency_slack_ms": 600000.0,
    "gate_max_line_ips": 1e9,
}


def _repository(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    # One worker, one request per batch: a request queued behind a held one stays in the line queue.
    manifest = "slo_p99_ms = 600000.0\ninstances = 1\n[batching]\nmax_batch_size = 1\n"
    modelzoo.write(repo, "batchable", modelzoo.batchable(), manifest=manifest)
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.savez(
        repo / "batchable" / "1" / "samples.npz",
        input__x=x,
        output__y=x * 2 + 1,
        output__s=x.sum(1, keepdims=True),
    )
    return repo


@pytest.fixture
def box(serve, tmp_path) -> Iterator[Any]:
    with serve(_repository(tmp_path), ota=OTA) as running:
        yield running


def _environment(running: Any, tmp_path: Path) -> dict[str, str]:
    """What a framework's hook environment needs to reach this service: `appliance` (APPLIANCE_BIN, as
    the shims allow) and the settings the service runs with (the verbs read their own, never the
    paths the service reports)."""
    wrapper = tmp_path / "bin" / "appliance"
    wrapper.parent.mkdir(exist_ok=True)
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n')
    wrapper.chmod(0o755)
    system = running.service.settings.system
    return {
        "PATH": os.environ["PATH"],
        "APPLIANCE_BIN": str(wrapper),
        "APPLIANCE_SYSTEM__RUNTIME_DIR": str(system.runtime_dir),
        "APPLIANCE_SYSTEM__STATE_DIR": str(system.state_dir),
        "APPLIANCE_MODELS__REPOSITORY": str(running.service.settings.models.repository),
        "APPLIANCE_SCHEDULER__INSTANCES": "1",
        **{f"APPLIANCE_OTA__{key.upper()}": str(value) for key, value in OTA.items()},
    }


def _shim(
    path: str, env: dict[str, str], *args: str, shell: str = "/bin/sh"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shell, str(HOOKS / path), *args], env=env, capture_output=True, text=True, timeout=300
    )


def _snapshot(running: Any) -> dict[str, Any] | None:
    return Store(records_dir(running.service.settings)).read_snapshot()


def _state(running: Any) -> str:
    status = ServiceLink.from_settings(running.service.settings).status()
    assert status is not None
    return status["state"]


# RAUC


def test_rauc_pre_install_gates_then_snapshots_against_the_real_command(box, tmp_path, batches) -> None:
    env = _environment(box, tmp_path)
    with line_requests_waiting(box, batches, "batchable"):
        busy = _shim("rauc/pre-install", env)
    assert busy.returncode == 1 and BUSY_REASON in busy.stderr
    assert "gate: busy, try again later" in busy.stderr
    assert _snapshot(box) is None  # nothing saved for an update that did not start

    quiet = _shim("rauc/pre-install", env)
    assert quiet.returncode == 0, quiet.stderr
    saved = _snapshot(box)
    assert saved is not None and saved["models"]["batchable"]["golden_ms"] > 0
    assert _state(box) == "ready"  # RAUC writes the other slot while the line keeps running


def test_rauc_bundle_hook_rejects_while_busy_against_the_real_command(box, tmp_path, batches) -> None:
    env = {**_environment(box, tmp_path), "RAUC_MF_COMPATIBLE": "box-v1", "RAUC_SYSTEM_COMPATIBLE": "box-v1"}
    quiet = _shim("rauc/bundle-hook", env, "install-check")
    assert quiet.returncode == 0, quiet.stderr
    with line_requests_waiting(box, batches, "batchable"):
        busy = _shim("rauc/bundle-hook", env, "install-check")
    assert busy.returncode == 10
    assert busy.stderr.strip().splitlines()[-1] == BUSY_REASON  # the line RAUC shows as the reason


def _rauc_missing() -> str | None:
    for tool in ("rauc", "dbus-run-session", "mksquashfs", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install rauc dbus squashfs-tools openssl)"
    if os.geteuid() != 0:
        return "rauc install loop-mounts the bundle: needs root"
    return None


def _signing_pair(tmp_path: Path) -> tuple[Path, Path]:
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "2", "-subj", "/CN=appliance-test", "-addext", "keyUsage=digitalSignature",
         "-addext", "extendedKeyUsage=emailProtection"],
        check=True, capture_output=True,
    )  # fmt: skip
    return key, cert


class Rauc:
    """A RAUC system in a folder: two file-backed raw slots (A booted, B the target), a keyring, the
    repository's pre-install handler (unless told not to), and bundles carrying its install-check hook."""

    def __init__(self, root: Path, *, with_handler: bool = True) -> None:
        self.root = root
        root.mkdir()
        self.key, self.cert = _signing_pair(root)
        self.slots = [root / "slot-a.img", root / "slot-b.img"]
        for slot in self.slots:
            slot.write_bytes(b"\0" * 65536)
        handler = root / "pre-install"  # installed executable, as system.conf.snippet says
        shutil.copy(HOOKS / "rauc" / "pre-install", handler)
        handler.chmod(0o755)
        (root / "data").mkdir()
        handlers = (HOOKS / "rauc" / "system.conf.snippet").read_text()
        (root / "system.conf").write_text(
            f"[system]\ncompatible=appliance-test\nbootloader=noop\ndata-directory={root / 'data'}\n\n"
            f"[keyring]\npath={self.cert}\n\n"
            + (handlers.replace("/usr/lib/rauc/appliance-pre-install", str(handler)) if with_handler else "")
            + f"\n[slot.rootfs.0]\ndevice={self.slots[0]}\ntype=raw\nbootname=A\n\n"
            f"[slot.rootfs.1]\ndevice={self.slots[1]}\ntype=raw\nbootname=B\n"
        )

    def bundle(self, image: bytes) -> Path:
        content = self.root / "bundle"
        shutil.rmtree(content, ignore_errors=True)
        content.mkdir()
        shutil.copy(HOOKS / "rauc" / "bundle-hook", content / "bundle-hook")
        (content / "bundle-hook").chmod(0o755)
        (content / "rootfs.img").write_bytes(image)
        (content / "manifest.raucm").write_text(
            "[update]\ncompatible=appliance-test\nversion=2\n\n[bundle]\nformat=plain\n\n"
            + (HOOKS / "rauc" / "manifest.raucm.snippet").read_text()
            + "\n[image.rootfs]\nfilename=rootfs.img\n"
        )
        bundle = self.root / "update.raucb"
        bundle.unlink(missing_ok=True)
        subprocess.run(
            ["rauc", "bundle", f"--cert={self.cert}", f"--key={self.key}", str(content), str(bundle)],
            check=True, capture_output=True,
        )  # fmt: skip
        return bundle

    def install(self, bundle: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """`rauc install` through a `rauc service` of its own on a private session bus."""
        script = self.root / "install.sh"
        script.write_text(
            "#!/bin/sh\nexport DBUS_STARTER_BUS_TYPE=session\n"
            f'rauc service --conf="{self.root / "system.conf"}" --override-boot-slot=A '
            f'> "{self.root / "service.log"}" 2>&1 &\n'
            "service=$!\n"
            "until rauc status >/dev/null 2>&1; do kill -0 $service || exit 99; sleep 0.1; done\n"
            f'rauc install "{bundle}"\nresult=$?\nkill $service\nwait $service\nexit $result\n'
        )
        return subprocess.run(
            ["dbus-run-session", "--", "/bin/sh", str(script)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )


needs_rauc = pytest.mark.skipif(_rauc_missing() is not None, reason=str(_rauc_missing()))


@needs_rauc
def test_a_real_rauc_install_snapshots_and_is_refused_while_the_line_is_busy(box, tmp_path, batches) -> None:
    env = _environment(box, tmp_path)
    rauc = Rauc(tmp_path / "rauc")
    image = os.urandom(65536)
    bundle = rauc.bundle(image)

    with line_requests_waiting(box, batches, "batchable"):
        refused = rauc.install(bundle, env)
    # RAUC 1.8 runs the pre-install handler before the bundle's install-check hook: the handler's gate
    # refuses first, and RAUC shows its exit status, not its words.
    assert refused.returncode != 0, refused.stdout
    assert "LastError: Pre-install handler error: Child process exited with code 1" in refused.stdout
    assert rauc.slots[1].read_bytes() == b"\0" * 65536  # nothing was written
    assert _snapshot(box) is None

    installed = rauc.install(bundle, env)
    assert installed.returncode == 0, installed.stdout + (rauc.root / "service.log").read_text()
    assert rauc.slots[1].read_bytes()[: len(image)] == image  # slot B holds the update
    assert rauc.slots[0].read_bytes() == b"\0" * 65536  # the booted slot was left alone
    saved = _snapshot(box)  # the pre-install handler's: the health check after the reboot compares with it
    scheduler = box.service.hub.entry("batchable").scheduler
    assert saved is not None and saved["models"]["batchable"]["sha256"] == scheduler.model.digest
    assert _state(box) == "ready"  # RAUC writes the other slot while the line keeps running


@needs_rauc
def test_a_real_rauc_install_check_hook_rejects_a_bundle_with_its_reason(box, tmp_path, batches) -> None:
    """A system.conf without the handler: the bundle's own hook refuses, and RAUC shows why."""
    env = _environment(box, tmp_path)
    rauc = Rauc(tmp_path / "rauc", with_handler=False)
    bundle = rauc.bundle(os.urandom(4096))
    with line_requests_waiting(box, batches, "batchable"):
        refused = rauc.install(bundle, env)
    assert refused.returncode != 0
    assert f"LastError: Installation error: Bundle rejected: Hook returned: {BUSY_REASON}" in refused.stdout
    assert rauc.slots[1].read_bytes() == b"\0" * 65536
    assert rauc.install(bundle, env).returncode == 0


# SWUpdate


def _swupdate_missing() -> str | None:
    for tool in ("swupdate", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install swupdate openssl)"
    if os.environ.get("TEST_REAL_SWUPDATE") != "1":
        # SWUpdate 2022.12 (Debian 12), in `-i` and in daemon mode alike, ends its own process now and
        # then while a script of a few seconds runs (about 1 run in 3 here, with this shim or a shell
        # script that only sleeps): a failure of the framework that would make these tests flaky.
        return "set TEST_REAL_SWUPDATE=1 to run SWUpdate itself (it is unreliable with scripts of seconds)"
    return None


def _newc(members: list[tuple[str, bytes]]) -> bytes:
    """A cpio archive in the "new ASCII" format SWUpdate reads (.swu), members in the order given."""
    out = b""
    for index, (name, data) in enumerate([*members, ("TRAILER!!!", b"")], start=1):
        fields = (index, 0o100644, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0)
        entry = b"070701" + "".join(f"{value:08X}" for value in fields).encode() + name.encode() + b"\0"
        entry += b"\0" * (-len(entry) % 4) + data
        out += entry + b"\0" * (-len(entry) % 4)
    return out + b"\0" * (-len(out) % 512)  # whole 512-byte blocks, as cpio writes (SWUpdate reads them)


def _swu(tmp_path: Path, *, inplace: bool) -> tuple[Path, Path]:
    """A signed .swu holding only the shim, as firmware-hooks/README.md lists it; and the signer's cert."""
    key, cert = _signing_pair(tmp_path)
    script = (HOOKS / "swupdate" / "appliance-ota.sh").read_bytes()
    data = '            data = "inplace";\n' if inplace else ""
    description = (
        'software =\n{\n    version = "2.0.0";\n    hardware-compatibility: [ "1.0" ];\n'
        '    scripts: (\n        {\n            filename = "appliance-ota.sh";\n'
        f'            type = "shellscript";\n{data}'
        f'            sha256 = "{sha256(script).hexdigest()}";\n        }}\n    );\n}}\n'
    ).encode()
    (tmp_path / "sw-description").write_bytes(description)
    signature = tmp_path / "sw-description.sig"
    subprocess.run(
        ["openssl", "cms", "-sign", "-in", str(tmp_path / "sw-description"), "-out", str(signature),
         "-signer", str(cert), "-inkey", str(key), "-outform", "DER", "-nosmimecap", "-binary"],
        check=True, capture_output=True,
    )  # fmt: skip
    swu = tmp_path / "update.swu"
    members = [("sw-description", description), ("sw-description.sig", signature.read_bytes())]
    swu.write_bytes(_newc([*members, ("appliance-ota.sh", script)]))
    return swu, cert


def _swupdate(swu: Path, cert: Path, env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    work = tmp_path / "swupdate-tmp"  # its scripts folder and sockets: one per test
    work.mkdir(exist_ok=True)
    return subprocess.run(
        ["swupdate", "-v", "-H", "appliance-test:1.0", "-k", str(cert), "-i", str(swu)],
        env={**env, "TMPDIR": str(work)}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.mark.skipif(_swupdate_missing() is not None, reason=str(_swupdate_missing()))
def test_a_real_swupdate_in_place_update_drains_verifies_and_commits(box, tmp_path) -> None:
    swu, cert = _swu(tmp_path, inplace=True)
    result = _swupdate(swu, cert, _environment(box, tmp_path), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    # SWUpdate passes the script's `data` on: the shim saw "inplace" and drained, verified, committed.
    assert re.search(r"appliance-ota.sh preinst inplace +command returned 0", output), output
    assert re.search(r"appliance-ota.sh postinst inplace +command returned 0", output), output
    for verb in (
        "gate: line quiet",
        "snapshot: saved",
        "drain: done",
        "verify: healthy",
        "commit: snapshot discarded",
    ):
        assert verb in output
    assert _snapshot(box) is None  # taken in preinst, dropped by the commit in postinst
    assert _state(box) == "ready"  # drained in preinst, admitting again after the commit


@pytest.mark.skipif(_swupdate_missing() is not None, reason=str(_swupdate_missing()))
def test_a_real_swupdate_for_a_reboot_snapshots_and_leaves_the_rest_to_the_next_boot(box, tmp_path) -> None:
    swu, cert = _swu(tmp_path, inplace=False)
    result = _swupdate(swu, cert, _environment(box, tmp_path), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert _snapshot(box) is not None  # for the health check after the reboot
    assert _state(box) == "ready"  # no drain: the reboot stops the service gracefully


@pytest.mark.skipif(_swupdate_missing() is not None, reason=str(_swupdate_missing()))
def test_a_real_swupdate_fails_the_update_while_the_line_is_busy(box, tmp_path, batches) -> None:
    swu, cert = _swu(tmp_path, inplace=True)
    with line_requests_waiting(box, batches, "batchable"):
        result = _swupdate(swu, cert, _environment(box, tmp_path), tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "appliance: line traffic is busy; install this update later" in output, output
    assert "execute preinstall scripts failed" in output, output
    assert _snapshot(box) is None and _state(box) == "ready"


def test_the_swupdate_stages_in_place_against_the_real_command(box, tmp_path) -> None:
    """The calls a real SWUpdate makes (`preinst inplace`, then `postinst inplace`), made here directly."""
    env = _environment(box, tmp_path)
    before = _shim("swupdate/appliance-ota.sh", env, "preinst", "inplace")
    assert before.returncode == 0, before.stderr
    assert _snapshot(box) is not None and _state(box) == "draining"  # nothing runs while files change
    after = _shim("swupdate/appliance-ota.sh", env, "postinst", "inplace")
    assert after.returncode == 0, after.stderr
    assert "verify: healthy" in after.stderr and "commit: snapshot discarded" in after.stderr
    assert _snapshot(box) is None and _state(box) == "ready"


def test_the_swupdate_postfailure_stage_rolls_back_against_the_real_command(box, tmp_path) -> None:
    """SWUpdate 2022.12 never calls postfailure; newer ones do, after a failed install."""
    env = _environment(box, tmp_path)
    assert _shim("swupdate/appliance-ota.sh", env, "preinst", "inplace").returncode == 0
    assert _snapshot(box) is not None and _state(box) == "draining"
    result = _shim("swupdate/appliance-ota.sh", env, "postfailure", "inplace")
    assert result.returncode == 0, result.stderr
    assert "rollback: done" in result.stderr
    assert _snapshot(box) is None and _state(box) == "ready"


# greenboot


def test_greenboot_checks_then_green_against_the_real_command(box, tmp_path) -> None:
    env = _environment(box, tmp_path)
    assert _shim("rauc/pre-install", env).returncode == 0  # the snapshot an update left
    check = _shim("greenboot/check/required.d/50_appliance_verify.sh", env, shell="bash")
    assert check.returncode == 0, check.stderr
    assert "verify: healthy" in check.stderr
    green = _shim("greenboot/green.d/50_appliance_commit.sh", env, shell="bash")
    assert green.returncode == 0 and "commit: snapshot discarded" in green.stderr
    assert _snapshot(box) is None


def test_greenboot_fails_a_boot_whose_models_do_not_reproduce_and_red_rolls_back(box, tmp_path) -> None:
    env = _environment(box, tmp_path)
    assert _shim("rauc/pre-install", env).returncode == 0
    samples = Path(box.service.settings.models.repository) / "batchable" / "1" / "samples.npz"
    x = np.arange(4, dtype=np.float32).reshape(1, 4)
    np.savez(samples, input__x=x, output__y=x * 2 + 2, output__s=x.sum(1, keepdims=True))  # now wrong
    check = _shim("greenboot/check/required.d/50_appliance_verify.sh", env, shell="bash")
    assert check.returncode == 1
    assert "verify: 1 problem(s)" in check.stderr
    red = _shim("greenboot/red.d/50_appliance_rollback.sh", env, shell="bash")
    assert red.returncode == 0, red.stderr
    assert _snapshot(box) is None and _state(box) == "ready"
