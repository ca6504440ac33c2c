"""Protocol buffer text format: what Triton's config.pbtxt files hold parses; anything else is named."""

from __future__ import annotations

import pytest

from appliance.engine.pbtxt import Field, Identifier, Message, parse
from appliance.errors import ConfigError

TRITON_EXAMPLE = """
# From Triton's model configuration guide, with every shape of field it uses.
name: "detector"
platform: "onnxruntime_onnx"
max_batch_size: 8
input [
  {
    name: "images"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ 3, 224, 224 ]
  }
]
output [ { name: "scores", data_type: TYPE_FP32, dims: [ -1 ] } ]
dynamic_batching {
  preferred_batch_size: [ 4, 8 ]
  max_queue_delay_microseconds: 100
}
instance_group [ { count: 2, kind: KIND_CPU } ]
"""


def values(message: Message, name: str) -> list[object]:
    return [f.value for f in message.all(name)]


def test_a_triton_config_parses_with_lines() -> None:
    config = parse(TRITON_EXAMPLE, "config.pbtxt")
    assert config.names() == [
        "name",
        "platform",
        "max_batch_size",
        "input",
        "output",
        "dynamic_batching",
        "instance_group",
    ]
    assert config.all("name") == [Field("name", "detector", 3)]
    assert config.all("max_batch_size") == [Field("max_batch_size", 8, 5)]
    (image,) = values(config, "input")
    assert isinstance(image, Message) and image.line == 7
    assert values(image, "data_type") == [Identifier("TYPE_FP32")]
    assert values(image, "dims") == [3, 224, 224]
    (scores,) = values(config, "output")
    assert isinstance(scores, Message) and values(scores, "dims") == [-1]
    (batching,) = values(config, "dynamic_batching")
    assert isinstance(batching, Message)
    assert values(batching, "preferred_batch_size") == [4, 8]
    assert batching.all("max_queue_delay_microseconds")[0].line == 17


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: 1 a: 2\na: [3]", [1, 2, 3]),  # a repeated field, written out and as a list
        ("a: 1, a: 2; a: 3", [1, 2, 3]),  # separators
        ("a: []", []),
        ("a: 0x1F a: 010 a: -7 a: 1.5 a: .5 a: 2e3 a: 1.0f", [31, 8, -7, 1.5, 0.5, 2000.0, 1.0]),
        ("a: 'it''s' a: \"x\" \"y\"", ["its", "xy"]),  # adjacent strings concatenate
        (r'a: "tab\there\n\"q\" \x41\101\\"', ['tab\there\n"q" AA\\']),
        ("a: KIND_GPU a: true", [Identifier("KIND_GPU"), Identifier("true")]),
    ],
)
def test_scalars(text: str, expected: list[object]) -> None:
    assert values(parse(text, "t"), "a") == expected


def test_infinities_and_nan() -> None:
    parsed = values(parse("a: -inf a: inf a: nan", "t"), "a")
    assert parsed[0] == float("-inf")
    assert parsed[1:] == [Identifier("inf"), Identifier("nan")]


def test_messages_take_braces_or_angles_with_or_without_a_colon() -> None:
    config = parse("m { x: 1 } m: { x: 2 } m < x: 3 > m: [ { x: 4 }, < x: 5 > ] m [ { x: 6 } ]", "t")
    inner = [m for m in values(config, "m") if isinstance(m, Message)]
    assert [values(m, "x") for m in inner] == [[1], [2], [3], [4], [5], [6]]


def test_list_elements_carry_their_own_lines() -> None:
    config = parse("group [\n  { count: 1 },\n  { count: 2 }\n]\n", "t")
    assert [f.line for f in config.all("group")] == [2, 3]


def test_comments_and_blank_input() -> None:
    assert parse("", "t").fields == []
    assert parse("# only a comment\n\n   \n", "t").fields == []
    assert values(parse("a: 1 # trailing\n# a: 2\n", "t"), "a") == [1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_size 8", "line 1: expected ':' or '{' after field 'max_batch_size', got '8'"),
        ("name:", "line 1: expected a value (number, quoted string or identifier), got the end of the file"),
        ("a {\n  b: 1\n", "line 3: expected a field name or '}', got the end of the file"),
        ("a: [1, 2", "line 1: expected ',' or ']' in the list of field 'a', got the end of the file"),
        ("a: [1 2]", "line 1: expected ',' or ']' in the list of field 'a', got '2'"),
        ("dims [1, 2]", "line 1: expected '{' (or ':' before the list of field 'dims'), got '1'"),
        ('\n\nname: "detector', "line 3: string not closed on the line it starts"),
        ('a: "x\ny"', "line 1: string not closed on the line it starts"),
        (r'a: "\q"', "line 1: unknown escape '\\q' in string \"\\q\""),
        ("}", "line 1: expected a field name, got '}'"),
        ("a { b: 1 ]", "line 1: expected a field name or '}', got ']'"),
        ("a: -b", "line 1: expected a value (number, quoted string or identifier), got 'b'"),
        ("a: 8x", "line 1: unexpected '8x'"),
        ("a: 1.2.3", "line 1: unexpected '1.2.'"),
        ("[ext.field]: 1", "line 1: expected a field name, got '['"),
        ("a: @", "line 1: unexpected character '@'"),
        ("a { " * 40, "line 1: messages nest deeper than 32 levels"),
        ("# ok\n# ok\nname: { x: 1 }}", "line 3: expected a field name, got '}'"),
    ],
)
def test_malformed_input_names_the_source_the_line_and_what_was_expected(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        parse(text, "/repo/m/config.pbtxt")
    assert str(raised.value) == f"/repo/m/config.pbtxt, {message}"
