"""Text from a less trusted party (the service user, a pool node) as a terminal or a log may show it."""

from __future__ import annotations


def printable(value: object) -> str:
    """`value` as text, with control characters (newlines included) escaped as repr() escapes them, so
    that it cannot move a terminal's cursor, rewrite its title or forge a log line."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
