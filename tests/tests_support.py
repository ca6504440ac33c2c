"""Small helpers shared by tests."""

from __future__ import annotations


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1]
