"""A model's files (engine/modelfiles.py): external weights are read into memory once, digested with
model.onnx, never mapped from the repository while serving; model.onnx over 2 GiB is refused unread."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import modelzoo
import numpy as np
import onnx
import pytest
from external_weights import external_model, set_weights, sha256sum_of_sha256sum
from onnx import TensorProto, helper, numpy_helper
from tests_support import load_model

from appliance.engine.modelfiles import MAX_MODEL_BYTES, read_model
from appliance.errors import ModelLoadError
from appliance.providers.caches import keyed_dir

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
WAIT_S = 120.0  # bounds a subprocess that would otherwise hang the suite; nothing is timed


def test_the_digest_covers_the_external_weights_as_sha256sum_prints_them(tmp_path: Path) -> None:
    version = tmp_path / "repo" / "m" / "1"
    external_model(version)
    pinned = sha256sum_of_sha256sum(version, ["model.onnx", "weights.bin"])
    served = load_model_from(tmp_path, f'sha256 = "{pinned}"\n')
    assert served.digest == pinned
    np.testing.assert_array_equal(served.run({"x": np.ones((1, 4), np.float32)})["y"], np.full((1, 4), 2.0))

    set_weights(version, 1000.0)  # model.onnx as it was
    expects = r"model\.onnx with weights\.bin has sha256 .*model\.toml expects"
    with pytest.raises(ModelLoadError, match=expects):
        load_model_from(tmp_path, f'sha256 = "{pinned}"\n')
    tampered = load_model_from(tmp_path)
    assert tampered.digest != pinned  # so compile caches (keyed by it) miss, and the pool child refuses
    root = tmp_path / "cache"
    assert keyed_dir(root, tampered.digest, {}) != keyed_dir(root, pinned, {})


def test_root_s_ota_digest_of_a_model_with_external_data_is_the_served_one(tmp_path: Path) -> None:
    from appliance.ota.snapshot import digests_on_disk

    version = tmp_path / "repo" / "m" / "1"
    external_model(version)
    served = load_model_from(tmp_path)
    assert digests_on_disk(tmp_path / "repo")["m"].sha256 == served.digest
    set_weights(version, 1000.0)  # an update that replaced the weights only: root sees it
    assert digests_on_disk(tmp_path / "repo")["m"].sha256 != served.digest
    (version / "weights.bin").unlink()
    (version / "weights.bin").symlink_to(tmp_path / "elsewhere.bin")
    assert digests_on_disk(tmp_path / "repo") == {}  # root follows no link, as for model.onnx


def test_a_model_without_external_data_keeps_the_sha256_of_model_onnx(tmp_path: Path) -> None:
    served = load_model(tmp_path, modelzoo.batchable())
    assert served.digest == hashlib.sha256(served.source.path.read_bytes()).hexdigest()


def load_model_from(tmp_path: Path, manifest: str = ""):
    """load_model on the model already written under <tmp_path>/repo/m (with this model.toml)."""
    from tests_support import load_written

    (tmp_path / "repo" / "m" / "model.toml").write_text(manifest)
    return load_written(tmp_path)


SERVE_THEN_CHANGE = """
import os, sys
from pathlib import Path
sys.path[:0] = [{here!r}, {tests!r}, {root!r}]
import numpy as np
from test_model_files import load_model_from
version = Path({version!r})
model = load_model_from(Path({tmp!r}))
x = {{"x": np.ones((1, 1 << 20), np.float32)}}
before = model.run(x)["y"][0, :3].tolist()
mapped = any("weights.bin" in line for line in open("/proc/self/maps"))
(version / "weights.bin").write_bytes(np.full((1 << 20,), 7.0, np.float32).tobytes())  # cp: same inode
rewritten = model.run(x)["y"][0, :3].tolist()
os.truncate(version / "weights.bin", 0)
truncated = model.run(x)["y"][0, :3].tolist()
print(before, rewritten, truncated, mapped, flush=True)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_rewriting_or_truncating_served_weights_changes_nothing_and_kills_nothing(tmp_path: Path) -> None:
    """ORT would map weights.bin and keep reading it: `cp` over it changed answers; truncating it
    killed the service (SIGBUS) on the next request. In its own process, as that is what it kills."""
    version = tmp_path / "repo" / "m" / "1"
    external_model(version, width=1 << 20)  # 4 MiB of weights, as a real model's: ORT maps those
    script = SERVE_THEN_CHANGE.format(
        here=str(Path(__file__).parent),
        tests=str(TESTS),
        root=str(ROOT),
        version=str(version),
        tmp=str(tmp_path),
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["[2.0,", "2.0,", "2.0]"] * 3 + ["False"], done.stdout


def test_external_data_is_read_only_from_regular_files_inside_the_version_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full((4,), 5.0, np.float32).tobytes())
    version = tmp_path / "repo" / "m" / "1"
    path = external_model(version)
    proto = onnx.load(str(path), load_external_data=False)
    entries = proto.graph.initializer[0].external_data

    def pointing_at(location: str) -> None:
        next(e for e in entries if e.key == "location").value = location
        path.write_bytes(proto.SerializeToString())

    for location in ("../../../secret.bin", str(secret), "./weights.bin", "a/../weights.bin"):
        pointing_at(location)
        with pytest.raises(ModelLoadError, match="plain relative path inside the version folder"):
            read_model(path)
    os.symlink(secret, version / "link.bin")
    pointing_at("link.bin")
    with pytest.raises(ModelLoadError, match="symbolic link"):
        read_model(path)
    (version / "sub").symlink_to(tmp_path)  # a folder inside that leads outside
    pointing_at("sub/secret.bin")
    with pytest.raises(ModelLoadError, match="leads outside"):
        read_model(path)
    os.mkfifo(version / "pipe.bin")  # would block a reader for ever
    pointing_at("pipe.bin")
    with pytest.raises(ModelLoadError, match="not a regular file"):
        read_model(path)


def test_external_tensors_in_subgraphs_are_served_from_memory_too(tmp_path: Path, monkeypatch) -> None:
    """ORT 1.32 takes only top-level initializers from memory; given bytes, it looked for a subgraph's
    external file relative to the working directory. Those are inlined; ORT may look nowhere else."""
    version = tmp_path / "repo" / "m" / "1"
    version.mkdir(parents=True)
    then_w = numpy_helper.from_array(np.full((4,), 3.0, np.float32), "then_w")
    top_w = numpy_helper.from_array(np.full((4,), 2.0, np.float32), "top_w")
    then_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "then_w"], ["a"])],
        "then",
        [],
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [4])],
        initializer=[then_w],
    )
    else_branch = helper.make_graph(
        [helper.make_node("Mul", ["x", "top_w"], ["b"])],
        "else",
        [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [4])],
    )
    graph = helper.make_graph(
        [helper.make_node("If", ["c"], ["y"], then_branch=then_branch, else_branch=else_branch)],
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]),
            helper.make_tensor_value_info("c", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        initializer=[top_w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = version / "model.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=0)
    decoy = tmp_path / "cwd"
    decoy.mkdir()
    (decoy / "weights.bin").write_bytes(np.full((8,), -1.0, np.float32).tobytes())
    monkeypatch.chdir(decoy)

    served = load_model_from(tmp_path)
    x = np.ones(4, np.float32)
    np.testing.assert_array_equal(served.run({"x": x, "c": np.array(True)})["y"], np.full(4, 3.0))
    np.testing.assert_array_equal(served.run({"x": x, "c": np.array(False)})["y"], np.full(4, 2.0))
    assert served.digest == sha256sum_of_sha256sum(version, ["model.onnx", "weights.bin"])


def test_a_model_onnx_over_2_gib_is_refused_before_it_is_read(tmp_path: Path) -> None:
    """Protobuf cannot parse it anyway; a sparse file of 32 GiB took 92 s of hashing to find out."""
    path = modelzoo.write(tmp_path / "repo", "m", b"")
    with open(path, "wb") as stream:
        stream.truncate(MAX_MODEL_BYTES + 1)  # sparse: nothing on disk
    with pytest.raises(ModelLoadError, match=rf"at most {MAX_MODEL_BYTES} .*external data"):
        load_model_from(tmp_path)
