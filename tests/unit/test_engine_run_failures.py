"""engine/failures.py on the texts ORT 1.32 gives for sizes a request's values make absurd: a 413, and
which failures may have spoiled the session's memory arena (LoadedModel.run then replaces it)."""

from __future__ import annotations

import pytest

from appliance.dataplane.outcomes import outcome_of
from appliance.engine import failures
from appliance.errors import InferenceFailed, Overloaded, RequestTooLarge


class Fail(Exception):  # the name ORT's pybind layer gives its FAIL status
    pass


HEAD = "[ONNXRuntimeError] : 1 : FAIL : Non-zero status code returned while running ConstantOfShape node. "
SAFEINT = Fail(
    HEAD + "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/common/safeint.h:17 static void "
    "SafeIntExceptionHandler<onnxruntime::OnnxRuntimeException>::SafeIntOnOverflow() Integer overflow\n"
)
STORAGE = Fail(
    HEAD + "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/framework/op_kernel.cc:87 virtual "
    "OrtValue* onnxruntime::OpKernelContext::OutputMLValue(int, const onnxruntime::TensorShape&) "
    "[ONNXRuntimeError] : 1 : FAIL : Calculation for Tensor storage size overflowed\n"
)


def arena(size: int) -> Fail:
    return Fail(
        HEAD + "Name:'' Status Message: /onnxruntime_src/onnxruntime/core/framework/bfc_arena.cc:360 void* "
        "onnxruntime::BFCArena::AllocateRawInternal(size_t, bool, onnxruntime::Stream*) Failed to allocate "
        f"memory for requested buffer of size {size}\n"
    )


@pytest.mark.parametrize("failure", [SAFEINT, STORAGE], ids=["safeint", "storage"])
def test_a_size_past_64_bits_is_a_413(failure: Fail) -> None:
    refusal = failures.translate("m", failure)
    assert type(refusal) is RequestTooLarge and outcome_of(refusal).http_status == 413
    assert "a size computed from its values does not fit in 64 bits" in str(refusal)


def test_which_failures_may_spoil_the_arena(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(failures, "total_memory_bytes", lambda: 16 << 30)
    assert failures.spoils_session(SAFEINT) and failures.is_overflow(SAFEINT)
    assert failures.spoils_session(arena(2**63)) and not failures.is_overflow(arena(2**63))
    assert failures.spoils_session(arena(17 << 30))  # more than all of memory: the next region's size
    assert not failures.spoils_session(arena(8 << 30))  # memory the box lacks now: ORT's own growth
    assert not failures.spoils_session(STORAGE)  # refused before the arena was asked
    assert not failures.spoils_session(Fail("[ONNXRuntimeError] : 1 : FAIL : MatMul dimension mismatch"))
    assert type(failures.translate("m", arena(8 << 30))) is Overloaded
    monkeypatch.setattr(failures, "total_memory_bytes", lambda: None)
    assert failures.spoils_session(arena(2**63)) and not failures.spoils_session(arena(8 << 30))


def test_other_failures_keep_their_answers() -> None:
    other = failures.translate("m", Fail("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : x"))
    assert type(other) is InferenceFailed and not failures.spoils_session(Fail("x"))
