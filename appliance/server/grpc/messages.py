"""The message classes of inference.proto, built from the file shipped beside this module."""

from __future__ import annotations

from pathlib import Path

from google.protobuf import message_factory

from appliance.server.grpc import proto

PROTO_FILE = Path(__file__).with_name("inference.proto")
SERVICE = "inference.GRPCInferenceService"
POOL = proto.load(PROTO_FILE)
METHODS = {m.name: m for m in POOL.FindServiceByName(SERVICE).methods}


def _message(name: str) -> type:
    return message_factory.GetMessageClass(POOL.FindMessageTypeByName(f"inference.{name}"))


ModelInferRequest = _message("ModelInferRequest")
ModelInferResponse = _message("ModelInferResponse")
ModelStreamInferResponse = _message("ModelStreamInferResponse")
InferParameter = _message("InferParameter")


def request_of(method: str) -> type:
    """The request message class of an RPC of the service."""
    return message_factory.GetMessageClass(METHODS[method].input_type)


def response_of(method: str) -> type:
    return message_factory.GetMessageClass(METHODS[method].output_type)
