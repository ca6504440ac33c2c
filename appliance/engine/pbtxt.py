"""Protocol buffer text format (config.pbtxt), parsed strictly without a descriptor."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from appliance.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Identifier:
    """A bare identifier value: an enum (KIND_GPU, TYPE_FP32), true/false, inf or nan."""

    name: str


Scalar = str | int | float | Identifier


@dataclass(frozen=True, slots=True)
class Field:
    """One `name: value` or `name { ... }` occurrence; a list value gives one Field per element."""

    name: str
    value: Scalar | Message
    line: int


@dataclass(slots=True)
class Message:
    """The fields of one message in file order; without a descriptor, every field may repeat."""

    line: int
    fields: list[Field] = field(default_factory=list)

    def all(self, name: str) -> list[Field]:
        return [f for f in self.fields if f.name == name]

    def names(self) -> list[str]:
        """Field names in order of first appearance."""
        return list(dict.fromkeys(f.name for f in self.fields))


_TOKEN = re.compile(
    r"""
      (?P<space>[ \t\r\f\v]+)
    | (?P<newline>\n)
    | (?P<comment>\#[^\n]*)
    | (?P<number>0[xX][0-9A-Fa-f]+ | [0-9]+\.?[0-9]*(?:[eE][-+]?[0-9]+)?[fF]?
                 | \.[0-9]+(?:[eE][-+]?[0-9]+)?[fF]?)
    | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<string>"(?:[^"\\\n]|\\.)*" | '(?:[^'\\\n]|\\.)*')
    | (?P<punct>[{}\[\]<>:,;\-])
    """,
    re.VERBOSE,
)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
_CLOSE = {"{": "}", "<": ">"}
MAX_DEPTH = 32  # Triton's deepest config (ensemble steps, queue policies) nests 4; this stops runaway input
# Every integer field of a protobuf message is 64 bits at most (int64, uint64): a longer literal is an error
# of that field. Checked on the digits before int() sees them, which refuses over 4300 of them (ValueError).
MAX_INTEGER = 2**64 - 1


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str  # number, ident, string, punct, end
    text: str
    line: int


def parse(text: str, source: str) -> Message:
    """The top-level message of `text`; ConfigError names `source`, the line and what was expected."""
    return _Parser(text, source).document()


class _Parser:
    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.stream = self._tokenize(text)
        self.tokens: list[_Token] = []  # read lazily, so errors come in file order
        self.at = 0

    def _tokenize(self, text: str) -> Iterator[_Token]:
        line, position = 1, 0
        while position < len(text):
            match = _TOKEN.match(text, position)
            if match is None:
                if text[position] in "\"'":
                    raise self._error(line, "string not closed on the line it starts")
                raise self._error(line, f"unexpected character {text[position]!r}")
            kind = match.lastgroup or ""
            if kind == "newline":
                line += 1
            elif kind in ("number", "ident", "string", "punct"):
                following = text[match.end() : match.end() + 1]
                if kind in ("number", "ident") and following and (following.isalnum() or following in "_."):
                    raise self._error(line, f"unexpected {match.group() + following!r}")
                yield _Token(kind, match.group(), line)
            position = match.end()
        yield _Token("end", "", line)

    def _error(self, line: int, what: str) -> ConfigError:
        return ConfigError(f"{self.source}, line {line}: {what}")

    def _peek(self) -> _Token:
        while len(self.tokens) <= self.at:
            self.tokens.append(next(self.stream))
        return self.tokens[self.at]

    def _next(self) -> _Token:
        token = self._peek()
        self.at += 1
        return token

    def _expected(self, what: str) -> ConfigError:
        token = self._peek()
        got = "the end of the file" if token.kind == "end" else repr(token.text)
        return self._error(token.line, f"expected {what}, got {got}")

    def _accept(self, text: str) -> bool:
        if self._peek().kind == "punct" and self._peek().text == text:
            self.at += 1
            return True
        return False

    def document(self) -> Message:
        return self._fields(Message(1), close=None, depth=0)

    def _fields(self, message: Message, close: str | None, depth: int) -> Message:
        if depth > MAX_DEPTH:
            raise self._error(message.line, f"messages nest deeper than {MAX_DEPTH} levels")
        while True:
            token = self._peek()
            if close is None and token.kind == "end":
                return message
            if close is not None and token.kind == "punct" and token.text == close:
                self.at += 1
                return message
            if token.kind != "ident":
                closing = f" or {close!r}" if close else ""
                raise self._expected(f"a field name{closing}")
            self._field(message, depth)
            if not self._accept(","):
                self._accept(";")

    def _field(self, message: Message, depth: int) -> None:
        name = self._next()
        has_colon = self._accept(":")
        token = self._peek()
        if token.kind == "punct" and token.text in _CLOSE:
            self.at += 1
            value = self._fields(Message(token.line), _CLOSE[token.text], depth + 1)
            message.fields.append(Field(name.text, value, name.line))
        elif token.kind == "punct" and token.text == "[":
            self.at += 1
            for value, line in self._list(name.text, has_colon, depth):
                message.fields.append(Field(name.text, value, line))
        elif has_colon:
            message.fields.append(Field(name.text, self._scalar(name.text), name.line))
        else:
            raise self._expected(f"':' or '{{' after field {name.text!r}")

    def _list(self, name: str, has_colon: bool, depth: int) -> list[tuple[Scalar | Message, int]]:
        """The elements of `[...]` (the '[' read), each with the line it starts on."""
        values: list[tuple[Scalar | Message, int]] = []
        if self._accept("]"):
            return values
        while True:
            token = self._peek()
            if token.kind == "punct" and token.text in _CLOSE:
                self.at += 1
                values.append((self._fields(Message(token.line), _CLOSE[token.text], depth + 1), token.line))
            elif has_colon:
                values.append((self._scalar(name), token.line))
            else:  # only a list of messages may leave out the colon
                raise self._expected(f"'{{' (or ':' before the list of field {name!r})")
            if self._accept("]"):
                return values
            if not self._accept(","):
                raise self._expected(f"',' or ']' in the list of field {name!r}")

    def _scalar(self, name: str) -> Scalar:
        token = self._next()
        if token.kind == "string":
            text = self._string(token)
            while self._peek().kind == "string":  # adjacent strings concatenate, as in C
                text += self._string(self._next())
            return text
        if token.kind == "ident":
            return Identifier(token.text)
        negative = token.kind == "punct" and token.text == "-"
        if negative:
            token = self._next()
        if token.kind == "number":
            value = self._number(token, name)
            return -value if negative else value
        if negative and token.kind == "ident" and token.text.lower() in ("inf", "infinity", "nan"):
            return -float(token.text)
        self.at -= 1
        raise self._expected("a value (number, quoted string or identifier)")

    def _number(self, token: _Token, name: str) -> int | float:
        """The value of a number token; ConfigError naming the line and field for an integer over 64 bits."""
        text = token.text
        if text[:2] in ("0x", "0X"):
            digits, base = text[2:], 16
        elif re.fullmatch(r"0[0-7]+", text):
            digits, base = text[1:], 8
        elif re.fullmatch(r"[0-9]+", text):
            digits, base = text, 10
        else:
            return float(text.rstrip("fF"))  # float() has no digit limit: a long one is inf or 0.0
        digits = digits.lstrip("0") or "0"
        if len(digits) > 22 or int(digits, base) > MAX_INTEGER:  # 22: 2**64 - 1 in octal, the longest
            shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} characters)"
            raise self._error(
                token.line,
                f"{name}: integer {shown} is out of range; expected at most 64 bits ({MAX_INTEGER})",
            )
        return int(digits, base)

    def _string(self, token: _Token) -> str:
        body = token.text[1:-1]
        out, index = [], 0
        while index < len(body):
            ch = body[index]
            if ch != "\\":
                out.append(ch)
                index += 1
                continue
            escape = body[index + 1]
            if escape in _ESCAPES:
                out.append(_ESCAPES[escape])
                index += 2
            elif escape in "\\'\"?":
                out.append(escape)
                index += 2
            elif escape in "xX" and (digits := re.match(r"[0-9A-Fa-f]{1,2}", body[index + 2 :])):
                out.append(chr(int(digits.group(), 16)))
                index += 2 + len(digits.group())
            elif digits := re.match(r"[0-7]{1,3}", body[index + 1 :]):
                out.append(chr(int(digits.group(), 8)))
                index += 1 + len(digits.group())
            else:
                raise self._error(token.line, f"unknown escape '\\{escape}' in string {token.text}")
        return "".join(out)
