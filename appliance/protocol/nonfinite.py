"""NaN, Infinity and -Infinity in JSON tensor data, written and read as Triton does.

JSON has no token for a number that is not finite. Triton writes NaN, Infinity and -Infinity
(rapidjson's kWriteNanAndInfFlag) and reads them (kParseNanAndInfFlag); Python's json, and the
python-rapidjson that tritonclient decodes answers with, read and write the same three. orjson writes
null for them and refuses the tokens. So `fragment` writes an array that holds a non-finite value with
the tokens, and `loads` reads a document that orjson refused if the tokens can be why. Both stay off
the common path: an all-finite array is written by orjson alone, and a document orjson takes is read
by it alone.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import numpy as np
import orjson

_TOKENS = re.compile(rb"NaN|Inf")  # Infinity and -Infinity hold "Inf"
# A \uD800-\uDFFF escape: Python's json makes a str of a lone one, which orjson refuses in and out.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
# orjson reads an integer outside these bounds as a float.
_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1
# Python's json reads about 3.6 times slower than orjson (22 ms a MB here), on the event loop that serves
# the line: a larger document with the tokens is refused, with a pointer to binary tensors.
FALLBACK_LIMIT_BYTES = 1024 * 1024


def fragment(flat: np.ndarray) -> orjson.Fragment:
    """A flat float array that holds a non-finite value, as a JSON list (`written`)."""
    return orjson.Fragment(written(flat))


def written(flat: np.ndarray) -> bytes:
    """A flat float array, as a JSON list: orjson's own text, with the tokens where orjson writes null
    (no finite number is written with an 'n' in it). An array that holds none is written as orjson
    writes it (tensor_data writes a large one a slice at a time, some slices without one)."""
    pieces = orjson.dumps(flat, option=orjson.OPT_SERIALIZE_NUMPY).split(b"null")
    odd = flat[~np.isfinite(flat)]
    tokens = np.where(np.isnan(odd), b"NaN", np.where(odd > 0, b"Infinity", b"-Infinity"))
    assert len(pieces) == len(tokens) + 1, "orjson wrote null for a finite number"
    parts = np.empty(2 * len(tokens) + 1, dtype=object)
    parts[0::2] = pieces
    parts[1::2] = tokens.tolist()
    return b"".join(parts.tolist())


def loads(text: bytes | bytearray | memoryview, parse: Callable[[Any], Any] = orjson.loads) -> Any:
    """A KServe v2 JSON document: `parse` (orjson, or bulk_json for a request) reads it; only where
    that refuses it, `with_tokens` tries. Raises orjson.JSONDecodeError, with `parse`'s message (the
    same as for any other invalid body), when both refuse it."""
    try:
        return parse(text)
    except orjson.JSONDecodeError as refusal:
        if len(text) > FALLBACK_LIMIT_BYTES and _TOKENS.search(text):
            raise orjson.JSONDecodeError(
                f"{refusal.msg} (NaN and Infinity are read in JSON documents of up to "
                f"{FALLBACK_LIMIT_BYTES} bytes; send larger tensors as binary data)",
                refusal.doc,
                refusal.pos,
            ) from None
        try:
            return with_tokens(text)
        except ValueError:
            raise refusal from None


def with_tokens(text: bytes | bytearray | memoryview) -> Any:
    """A document orjson refused, read as Python's json reads it (NaN, Infinity and -Infinity as
    floats), keeping what orjson guarantees: valid UTF-8, no lone surrogate, no integer beyond 64 bits
    (it becomes a float, as orjson makes it). A number too large for a double reads as an infinity
    here, where orjson refuses it. Raises ValueError unless the document holds one of the tokens and is
    otherwise valid JSON.

    `text` was read under the caller's size limit, and what is built from it is what orjson builds
    from a body of that size: Python objects the codec's shape and element checks then bound.
    """
    if not _TOKENS.search(text):
        raise ValueError("no NaN or Infinity token")
    decoded = str(text, "utf-8")  # strict, as orjson: invalid UTF-8 stays refused
    try:
        document = json.loads(decoded, parse_int=_int)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(text):
        try:
            orjson.dumps(document)  # orjson refuses a str holding a lone surrogate
        except orjson.JSONEncodeError as exc:
            raise ValueError(str(exc)) from None
    return document


def _int(text: str) -> int | float:
    if len(text) <= 20:  # shorter than int()'s digit limit, whatever sys.set_int_max_str_digits says
        value = int(text)
        if _INT_MIN <= value <= _INT_MAX:
            return value
    return float(text)
