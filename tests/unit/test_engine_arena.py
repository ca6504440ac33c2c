"""engine/arena.py's pieces that need no model: which arena shrink lists a session's reset tries (a device
provider's arena first: a CUDA box cannot be had here) and the zeros its reset runs."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from appliance.engine.arena import reset_feed, shrink_lists
from appliance.engine.signature import Signature
from appliance.tensors import DYNAMIC, TensorSpec


class Session:
    def __init__(self, providers: list[str], options: dict[str, dict[str, str]]) -> None:
        self.providers, self.options = providers, options

    def get_providers(self) -> list[str]:
        return self.providers

    def get_provider_options(self) -> dict[str, dict[str, str]]:
        return self.options


def test_a_device_providers_arena_is_shrunk_with_the_hosts() -> None:
    cpu = Session(["CPUExecutionProvider"], {"CPUExecutionProvider": {}})
    cuda = Session(
        ["CUDAExecutionProvider", "CPUExecutionProvider"], {"CUDAExecutionProvider": {"device_id": "1"}}
    )
    other = Session(["OpenVINOExecutionProvider", "CPUExecutionProvider"], {})
    assert shrink_lists(cpu) == ("cpu:0",)  # type: ignore[arg-type]
    assert shrink_lists(cuda) == ("cpu:0;gpu:1", "cpu:0")  # type: ignore[arg-type]
    assert shrink_lists(other) == ("cpu:0;gpu:0", "cpu:0")  # type: ignore[arg-type]  # ORT refuses, then cpu


def test_the_reset_runs_one_row_of_zeros_with_every_open_dimension_1() -> None:
    signature = Signature(
        inputs=(
            TensorSpec("x", "FP32", (DYNAMIC, 3, DYNAMIC)),
            TensorSpec("n", "INT64", (1,)),
            TensorSpec("text", "BYTES", (DYNAMIC,)),
        ),
        outputs=(),
        is_batchable=True,
    )
    feed = reset_feed(SimpleNamespace(signature=signature))  # type: ignore[arg-type]
    assert {name: (array.shape, array.dtype) for name, array in feed.items()} == {
        "x": ((1, 3, 1), np.dtype(np.float32)),
        "n": ((1,), np.dtype(np.int64)),
        "text": ((1,), np.dtype(object)),
    }
    assert not feed["x"].any() and not feed["n"].any() and feed["text"].tolist() == [""]
