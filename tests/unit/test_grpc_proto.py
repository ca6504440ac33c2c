"""inference.proto, read at run time, speaks Triton's wire format: every field, enum value and RPC is
the one tritonclient.grpc's generated descriptors have; and the reader refuses what it does not take."""

from __future__ import annotations

import re

import pytest
from google.protobuf import descriptor
from tritonclient.grpc import service_pb2

from appliance.server.grpc import messages, proto

TRITON = service_pb2.DESCRIPTOR.pool


def _ours() -> list[descriptor.Descriptor]:
    found = []
    pending = list(messages.POOL.FindFileByName("inference.proto").message_types_by_name.values())
    while pending:
        message = pending.pop()
        found.append(message)
        pending.extend(message.nested_types)
    return found


@pytest.mark.parametrize("ours", _ours(), ids=lambda m: m.full_name)
def test_every_field_is_tritons(ours: descriptor.Descriptor) -> None:
    theirs = TRITON.FindMessageTypeByName(ours.full_name)
    assert ours.GetOptions().map_entry == theirs.GetOptions().map_entry
    for field in ours.fields:
        twin = theirs.fields_by_name[field.name]
        assert (field.number, field.type, field.is_repeated) == (twin.number, twin.type, twin.is_repeated)
        for kind in ("message_type", "enum_type", "containing_oneof"):
            mine, triton = getattr(field, kind), getattr(twin, kind)
            assert (mine.full_name if mine else None) == (triton.full_name if triton else None), kind
        if field.enum_type is not None:
            values = {v.name: v.number for v in twin.enum_type.values}
            assert {v.name: v.number for v in field.enum_type.values}.items() <= values.items()


def test_every_rpc_is_tritons() -> None:
    theirs = TRITON.FindServiceByName(messages.SERVICE)
    for method in messages.POOL.FindServiceByName(messages.SERVICE).methods:
        twin = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == twin.input_type.full_name
        assert method.output_type.full_name == twin.output_type.full_name
        assert (method.client_streaming, method.server_streaming) == (
            twin.client_streaming,
            twin.server_streaming,
        )
    ours = {m.name for m in messages.POOL.FindServiceByName(messages.SERVICE).methods}
    assert ours == {m.name for m in theirs.methods} - {"TraceSetting", "LogSettings"}


def test_a_request_round_trips_through_tritons_classes() -> None:
    request = messages.ModelInferRequest(model_name="m", id="7")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "in"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    request.raw_input_contents.append(b"\x00" * 16)
    theirs = service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.inputs[0].parameters["shared_memory_byte_size"].int64_param == 16
    assert list(theirs.inputs[0].shape) == [1, 4] and theirs.raw_input_contents[0] == b"\x00" * 16
    assert messages.ModelInferRequest.FromString(theirs.SerializeToString()) == request


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('syntax = "proto2"; package p;', "expected '\"proto3\"'"),
        ('syntax = "proto3";\npackage p;\nimport "x.proto";', "line 3: expected 'message' or 'enum'"),
        ('syntax = "proto3"; package p;\nmessage M {\n  option deprecated = true;\n}', "line 3"),
        ('syntax = "proto3"; package p; message M { Nope n = 1; }', "unknown type 'Nope'"),
        ('syntax = "proto3"; package p; message M { int32 n = x; }', "expected a number"),
        ('syntax = "proto3"; package p; message M { map<float, int32> m = 1; }', "map key"),
        ('syntax = "proto3"; package p; /* block */', "unexpected character '/'"),
        ('syntax = "proto3"; package p; message M { int32 n = 1;', "got the end of the file"),
    ],
)
def test_the_reader_refuses_what_it_does_not_take(text: str, error: str) -> None:
    with pytest.raises(proto.ProtoError, match=re.escape(error)):
        proto.parse(text, "x.proto")


def test_nested_names_resolve_from_the_innermost_scope() -> None:
    text = """syntax = "proto3"; package p;
    message A { message B { int32 n = 1; } B b = 1; }
    message B { string s = 1; }
    message C { B b = 1; A.B ab = 2; map<string, A.B> m = 3; }"""
    file = proto.parse(text, "x.proto")
    a, _, c = file.message_type
    assert a.field[0].type_name == ".p.A.B"
    assert [f.type_name for f in c.field] == [".p.B", ".p.A.B", ".p.C.MEntry"]
    assert c.nested_type[0].field[1].type_name == ".p.A.B"
