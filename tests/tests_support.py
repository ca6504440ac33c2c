"""Small helpers shared by tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Any JSON value, nested a little: what a client might put where a tensor's data belongs.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1]
