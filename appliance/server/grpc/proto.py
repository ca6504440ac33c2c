"""Build protobuf descriptors from a .proto file at run time: no generated code, no compile step.

Reads the part of proto3 that inference.proto uses (messages, nested messages and enums, `repeated`,
`map<,>`, `oneof`, services with streaming RPCs) and nothing else: an option, an import or any other
construct is an error naming its line. The descriptors go into a pool of their own, so that they never
clash with a client's generated `inference` package in the same process (tests load tritonclient's).
tests/unit/test_grpc_proto.py checks every field against tritonclient's own descriptors.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2, descriptor_pool

F = descriptor_pb2.FieldDescriptorProto
SCALARS = {
    "double": F.TYPE_DOUBLE, "float": F.TYPE_FLOAT, "int64": F.TYPE_INT64, "uint64": F.TYPE_UINT64,
    "int32": F.TYPE_INT32, "uint32": F.TYPE_UINT32, "bool": F.TYPE_BOOL, "string": F.TYPE_STRING,
    "bytes": F.TYPE_BYTES,
}  # fmt: skip
_TOKEN = re.compile(r"\s+|//[^\n]*|(?P<token>[A-Za-z_][A-Za-z0-9_.]*|\d+|\"[^\"\n]*\"|[{}()<>;=,])")


class ProtoError(ValueError):
    """The .proto file uses something this reader does not take, or is malformed."""


@dataclass
class _Tokens:
    items: list[tuple[str, int]]
    at: int = 0

    def peek(self) -> str:
        return self.items[self.at][0] if self.at < len(self.items) else ""

    def next(self, *expected: str) -> str:
        if self.at >= len(self.items):
            wanted = " or ".join(map(repr, expected)) if expected else "more"
            raise ProtoError(f"expected {wanted}, got the end of the file")
        token, line = self.items[self.at]
        if expected and token not in expected:
            raise ProtoError(f"line {line}: expected {' or '.join(map(repr, expected))}, got {token!r}")
        self.at += 1
        return token

    def name(self) -> str:
        token = self.next()
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]*", token):
            raise ProtoError(f"line {self.line()}: expected a name, got {token!r}")
        return token

    def number(self) -> int:
        token = self.next()
        if not token.isdigit():
            raise ProtoError(f"line {self.line()}: expected a number, got {token!r}")
        return int(token)

    def line(self) -> int:
        return self.items[self.at - 1][1]


def _tokens(text: str) -> _Tokens:
    items, position, line = [], 0, 1
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None:
            raise ProtoError(f"line {line}: unexpected character {text[position]!r}")
        if match.group("token"):
            items.append((match.group("token"), line))
        line += match.group(0).count("\n")
        position = match.end()
    return _Tokens(items)


def parse(text: str, file_name: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto of a proto3 file in the subset above."""
    tokens = _tokens(text)
    for expected in ("syntax", "=", '"proto3"', ";"):
        tokens.next(expected)
    tokens.next("package")
    package = tokens.name()
    tokens.next(";")
    file = descriptor_pb2.FileDescriptorProto(name=file_name, package=package, syntax="proto3")
    while tokens.peek():
        kind = tokens.next("message", "enum", "service")
        if kind == "message":
            _message(tokens, file.message_type.add())
        elif kind == "enum":
            _enum(tokens, file.enum_type.add())
        else:
            _service(tokens, file.service.add())
    _resolve(file)
    return file


def _message(tokens: _Tokens, message: descriptor_pb2.DescriptorProto) -> None:
    message.name = tokens.name()
    tokens.next("{")
    while (token := tokens.next()) != "}":
        if token == "message":
            _message(tokens, message.nested_type.add())
        elif token == "enum":
            _enum(tokens, message.enum_type.add())
        elif token == "oneof":
            index = len(message.oneof_decl)
            message.oneof_decl.add(name=tokens.name())
            tokens.next("{")
            while tokens.peek() != "}":
                _field(tokens, message, tokens.name(), F.LABEL_OPTIONAL).oneof_index = index
            tokens.next("}")
        elif token == "map":
            _map_field(tokens, message)
        elif token == "repeated":
            _field(tokens, message, tokens.name(), F.LABEL_REPEATED)
        else:
            tokens.at -= 1
            _field(tokens, message, tokens.name(), F.LABEL_OPTIONAL)


def _field(
    tokens: _Tokens, message: descriptor_pb2.DescriptorProto, type_name: str, label: int
) -> descriptor_pb2.FieldDescriptorProto:
    field = message.field.add(name=tokens.name(), label=label)
    tokens.next("=")
    field.number = tokens.number()
    tokens.next(";")
    if type_name in SCALARS:
        field.type = SCALARS[type_name]
    else:
        field.type_name = type_name  # resolved once every type is known
    return field


def _map_field(tokens: _Tokens, message: descriptor_pb2.DescriptorProto) -> None:
    tokens.next("<")
    key_type = tokens.name()
    tokens.next(",")
    value_type = tokens.name()
    tokens.next(">")
    field = _field(tokens, message, "", F.LABEL_REPEATED)
    if key_type not in SCALARS or key_type in ("double", "float", "bytes"):
        raise ProtoError(f"line {tokens.line()}: a map key must be an integer, bool or string type")
    camel = "".join(part[:1].upper() + part[1:] for part in field.name.split("_"))
    entry = message.nested_type.add(name=f"{camel}Entry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, label=F.LABEL_OPTIONAL, type=SCALARS[key_type])
    value = entry.field.add(name="value", number=2, label=F.LABEL_OPTIONAL)
    if value_type in SCALARS:
        value.type = SCALARS[value_type]
    else:
        value.type_name = value_type
    field.type_name = entry.name


def _enum(tokens: _Tokens, enum: descriptor_pb2.EnumDescriptorProto) -> None:
    enum.name = tokens.name()
    tokens.next("{")
    while tokens.peek() != "}":
        value = enum.value.add(name=tokens.name())
        tokens.next("=")
        value.number = tokens.number()
        tokens.next(";")
    tokens.next("}")


def _service(tokens: _Tokens, service: descriptor_pb2.ServiceDescriptorProto) -> None:
    service.name = tokens.name()
    tokens.next("{")
    while tokens.next("rpc", "}") == "rpc":
        method = service.method.add(name=tokens.name())
        for direction in ("input", "output"):
            if direction == "output":
                tokens.next("returns")
            tokens.next("(")
            is_stream = tokens.peek() == "stream"
            if is_stream:
                tokens.next()
            setattr(method, f"{direction}_type", tokens.name())
            setattr(method, "client_streaming" if direction == "input" else "server_streaming", is_stream)
            tokens.next(")")
        if tokens.next("{", ";") == "{":
            tokens.next("}")


def _resolve(file: descriptor_pb2.FileDescriptorProto) -> None:
    """Turn every type reference into its full name, searching from the innermost scope out (C++'s
    rule, as protoc does), and tell messages from enums."""
    root = f".{file.package}"
    kinds: dict[str, int] = {}
    for scope, message in _messages(root, file.message_type):
        kinds[f"{scope}.{message.name}"] = F.TYPE_MESSAGE
        for enum in message.enum_type:
            kinds[f"{scope}.{message.name}.{enum.name}"] = F.TYPE_ENUM
    for enum in file.enum_type:
        kinds[f"{root}.{enum.name}"] = F.TYPE_ENUM

    def find(scope: str, name: str) -> str:
        head, _, rest = name.partition(".")
        while True:
            candidate = f"{scope}.{head}"
            if candidate in kinds:
                full = f"{candidate}.{rest}" if rest else candidate
                if full in kinds:
                    return full
            if not scope:
                raise ProtoError(f"unknown type {name!r}")
            scope = scope.rpartition(".")[0]

    for scope, message in _messages(root, file.message_type):
        for field in message.field:
            if field.type_name:
                field.type_name = find(f"{scope}.{message.name}", field.type_name)
                field.type = kinds[field.type_name]
    for service in file.service:
        for method in service.method:
            method.input_type = find(root, method.input_type)
            method.output_type = find(root, method.output_type)


def _messages(
    scope: str, messages: list[descriptor_pb2.DescriptorProto]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto]]:
    for message in messages:
        yield scope, message
        yield from _messages(f"{scope}.{message.name}", message.nested_type)


def load(path: Path) -> descriptor_pool.DescriptorPool:
    """A descriptor pool of its own holding the file at `path`."""
    pool = descriptor_pool.DescriptorPool()
    pool.Add(parse(path.read_text(), path.name))
    return pool
