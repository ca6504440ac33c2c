"""Frames between the service and its pool process: an 8-byte length, then that many bytes.

A message is a JSON header naming each tensor's dtype and shape, then one frame per tensor: the array's
bytes as they lie in memory (BYTES tensors, numpy object arrays, pickled). Numeric tensors go to the
socket without a copy and come back as writable views of the received buffer.
"""

from __future__ import annotations

import pickle
import socket
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import orjson

_LENGTH = struct.Struct("<Q")
_PICKLED = "pickle"


def send_message(sock: socket.socket, header: Mapping[str, Any], arrays: Sequence[np.ndarray] = ()) -> None:
    """One header and its tensors; a numeric tensor's bytes go to the socket without a copy."""
    metas: list[list[Any]] = []
    payloads: list[Any] = []
    for array in arrays:
        if array.dtype == object:
            metas.append([_PICKLED, list(array.shape)])
            payloads.append(pickle.dumps(array, protocol=pickle.HIGHEST_PROTOCOL))
        else:
            contiguous = array if array.flags.c_contiguous else array.copy(order="C")  # keeps 0-d
            metas.append([contiguous.dtype.str, list(contiguous.shape)])
            payloads.append(contiguous.reshape(-1).view(np.uint8))
    head = orjson.dumps({**header, "tensors": metas})
    sock.sendall(frame(head))
    for payload in payloads:
        sock.sendall(_LENGTH.pack(len(payload)))
        if len(payload):
            sock.sendall(payload)


def receive_message(sock: socket.socket) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The header and its tensors; EOFError when the other side has gone."""
    header = orjson.loads(receive_frame(sock))
    arrays: list[np.ndarray] = []
    for dtype, shape in header.pop("tensors"):
        data = receive_frame(sock)
        if dtype == _PICKLED:
            arrays.append(pickle.loads(data))
        else:
            arrays.append(np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape))
    return header, arrays


def _receive_exactly(sock: socket.socket, length: int) -> bytearray:
    buffer = bytearray(length)  # writable: ONNX Runtime and numpy take views of it as they are
    view = memoryview(buffer)
    while view:
        count = sock.recv_into(view)
        if count == 0:
            raise EOFError("the other end closed the socket")
        view = view[count:]
    return buffer


def send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(frame(data))


def receive_frame(sock: socket.socket) -> bytearray:
    """One frame's bytes; EOFError when the other side has gone."""
    (length,) = _LENGTH.unpack(_receive_exactly(sock, _LENGTH.size))
    return _receive_exactly(sock, length)


def frame(data: bytes) -> bytes:
    return _LENGTH.pack(len(data)) + data
