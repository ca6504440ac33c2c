"""How `appliance pool submit` prints outputs: whole, or with what was left out and where the whole is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appliance.platform.cli import PRINTED_ELEMENTS, printed_output


def test_a_short_output_is_printed_whole() -> None:
    array = np.arange(PRINTED_ELEMENTS, dtype=np.float32).reshape(4, 4)
    assert printed_output(array, is_full=False, saved_to=None) == {
        "datatype": "float32",
        "shape": [4, 4],
        "data": array.reshape(-1).tolist(),
    }


def test_a_long_output_says_what_was_left_out_and_where_the_whole_is() -> None:
    array = np.arange(1000, dtype=np.int64).reshape(10, 100)
    printed = printed_output(array, is_full=False, saved_to=None)
    assert printed["data"] == list(range(PRINTED_ELEMENTS))
    assert printed["elided"] == (
        "984 of 1000 elements not shown (data holds the first 16, row-major); "
        "pass --output FILE.npz to save it whole, or --full to print it"
    )
    saved = printed_output(array, is_full=False, saved_to=Path("out.npz"))
    assert saved["elided"].endswith("the whole output is in out.npz")
    full = printed_output(array, is_full=True, saved_to=None)
    assert full["data"] == list(range(1000)) and "elided" not in full


def test_bytes_outputs_print_as_text() -> None:
    array = np.array([b"ok", b"\xff\x00"], dtype=object)
    printed = printed_output(array, is_full=False, saved_to=None)
    assert printed["data"] == ["ok", "\\xff\x00"]
    json.dumps(printed)  # printable as JSON, which bytes are not
