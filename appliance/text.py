"""Text from a less trusted party (the service user, a pool node, a client) as a terminal, a log or a
refusal may show it."""

from __future__ import annotations


def printable(value: object) -> str:
    """`value` as text, with control characters (newlines included) escaped as repr() escapes them, so
    that it cannot move a terminal's cursor, rewrite its title or forge a log line."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_JSON_KINDS = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}


def json_kind(value: object) -> str:
    """A parsed JSON value's kind as a refusal names it ("a string", "an array", "null", ...); a value
    JSON does not have by its Python type's name."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    return _JSON_KINDS.get(type(value), type(value).__name__)
