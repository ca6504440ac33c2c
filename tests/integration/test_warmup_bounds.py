"""What loading a model may cost (engine/bounds.py): warm-up feeds never larger than the largest request
the service accepts, and warm-up runs stopped past a deadline. Nothing here asserts how long anything took."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from tests_support import load_written

from appliance.engine.bounds import request_bytes_limit
from appliance.engine.model import LoadedModel
from appliance.errors import ModelLoadError
from appliance.settings import ServerSettings

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
WAIT_S = 120.0  # bounds a subprocess that would otherwise hang the suite; nothing is timed
SHORT_S = 5.0  # the warm-up deadline in these tests: a hanging run ends here; a real one is far shorter
ONLY_TWO = "[batching]\npreferred_batch_sizes = [2]\n"


def _model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "g", list(inputs), list(outputs), initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def wide_relu(width: int, batch: object = "N") -> onnx.ModelProto:
    """x: FP32 [batch, width] -> relu: tens of bytes on disk, `width` * 4 bytes per row in memory."""
    return _model(
        [helper.make_node("Relu", ["x"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, width])],
    )


def loop_by_rows(turns_per_row: int, free_rows: int) -> onnx.ModelProto:
    """x: FP32 [N, 4] -> y = x, after a Loop of (N - free_rows) * turns_per_row turns (10^12 turns: never
    ends). 323 bytes as the reviewer's model with free_rows 0; with 1, one row is instant."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["c_in"], ["c_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("c_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("c_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
        initializer=[numpy_helper.from_array(np.array(1.0, np.float32), "one")],
    )
    constants = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(free_rows, np.int64), "free"),
        numpy_helper.from_array(np.array(turns_per_row, np.int64), "turns"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(0.0, np.float32), "v0"),
    ]
    return _model(
        [
            helper.make_node("Shape", ["x"], ["shape"]),
            helper.make_node("Gather", ["shape", "zero"], ["rows"], axis=0),
            helper.make_node("Sub", ["rows", "free"], ["extra"]),
            helper.make_node("Mul", ["extra", "turns"], ["trips"]),
            helper.make_node("Loop", ["trips", "cond", "v0"], ["v"], body=body),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, []),
        ],
        constants,
    )


def load(tmp_path: Path, model: onnx.ModelProto, manifest: str = "", **kwargs) -> LoadedModel:
    directory = tmp_path / "repo" / "m" / "1"
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "model.onnx").write_bytes(model.SerializeToString())
    (tmp_path / "repo" / "m" / "model.toml").write_text(manifest)
    return load_written(tmp_path, **kwargs)


def test_the_request_bound_is_the_body_or_the_shared_memory_a_request_may_use() -> None:
    assert request_bytes_limit(ServerSettings()) == 1 << 30  # shared memory on: 1 GiB of regions
    assert request_bytes_limit(ServerSettings(max_shm_regions=0)) == 64 << 20  # off: the body limit
    assert request_bytes_limit(ServerSettings(max_body_bytes=2 << 30, max_shm_bytes=0)) == 2 << 30


def test_batches_are_cut_to_the_rows_a_request_could_carry_and_warm_up_stays_within(tmp_path: Path) -> None:
    width = 1 << 20  # 4 MiB per row; 10 MiB hold two rows
    model = load(tmp_path, wide_relu(width), max_request_bytes=10 << 20)
    assert (model.limits.max_batch_size, model.limits.preferred_batch_sizes) == (2, (1, 2))
    observed = model.warm_up(1)
    assert {rows for rows, _ in observed} == {1, 2}
    assert model.run({"x": np.ones((2, width), np.float32)})["y"].shape == (2, width)


def test_preferred_sizes_beyond_the_cut_are_dropped(tmp_path: Path) -> None:
    manifest = "[batching]\nmax_batch_size = 16\npreferred_batch_sizes = [2, 4, 16]\n"
    model = load(tmp_path, wide_relu(256), manifest, max_request_bytes=5 * 1024)  # 1 KiB per row: 5 rows
    assert (model.limits.max_batch_size, model.limits.preferred_batch_sizes) == (5, (2, 4))


PEAK = """
import resource, sys
from pathlib import Path
sys.path[:0] = [{here!r}, {tests!r}, {root!r}]
from test_warmup_bounds import load, wide_relu
from appliance.errors import ModelLoadError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load(Path({tmp!r}), wide_relu(1 << 26, {batch!r}), max_request_bytes=64 << 20)
    print("READY", end=" ")
except ModelLoadError as exc:
    print(str(exc).replace(" ", "_"), end=" ")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.parametrize("batch", ["N", 1], ids=["one-row", "one-request"])
def test_a_model_whose_one_row_is_larger_than_any_request_is_unavailable_and_allocates_nothing(
    tmp_path: Path, batch: object
) -> None:
    """77 bytes of Relu declaring 256 MiB per row: loading it took 7.5 GiB of warm-up buffers."""
    script = PEAK.format(
        here=str(Path(__file__).parent), tests=str(TESTS), root=str(ROOT), tmp=str(tmp_path), batch=batch
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr[-2000:]
    reason, grown = done.stdout.split()
    assert "cannot_serve" in reason and "268435456_bytes" in reason and "server.max_body_bytes" in reason
    assert int(grown) < 128 << 20, f"peak RSS grew by {int(grown) >> 20} MiB"  # one row is 256 MiB


@pytest.mark.parametrize("free_rows", [0, 1], ids=["first-run", "warm-up"])
def test_a_run_that_never_ends_makes_the_model_unavailable(tmp_path: Path, free_rows: int) -> None:
    """A Loop of 10^12 turns: the load used to wait for it for ever. At one row it is the first run
    that hangs (the provider's check); with one row free, the warm-up of the only preferred size."""
    stopped = rf"a run of \d row\(s\) did not finish in {SHORT_S:.0f} s and was stopped"
    with pytest.raises(ModelLoadError, match=stopped):
        model = load(tmp_path, loop_by_rows(10**12, free_rows), ONLY_TWO, run_limit_s=SHORT_S)
        model.warm_up(1)


def test_a_batch_size_whose_run_never_ends_stops_batches_below_it(tmp_path: Path) -> None:
    model = load(tmp_path, loop_by_rows(10**12, free_rows=1), run_limit_s=SHORT_S)
    assert model.limits.preferred_batch_sizes[0] == 1
    observed = model.warm_up(1)
    assert (model.limits.max_batch_size, model.limits.preferred_batch_sizes) == (1, (1,))
    assert {rows for rows, _ in observed} == {1}
    assert model.run({"x": np.ones((1, 4), np.float32)})["y"].shape == (1, 4)
