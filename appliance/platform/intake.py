"""What the gateway takes of a node's birth and capacity report: the shape of every field it reads,
checked once at ingest, so that one node's malformed or absurd message is ignored rather than breaking
a model for every buyer on every request.

Only what the gateway reads is checked, and only as far as it reads it (the schemas in
appliance/pool/schemas/ say the rest). A birth's `models` is a table of tables, each with a `sha256` of
64 hex digits, `inputs` and `outputs` as lists of {name, datatype, shape} and a positive `slo_p99_ms`,
where present. A report's `valid_for_s` is a positive integer and its `models` a table of tables whose
figures are finite numbers from 0 to MAX_FIGURE and whose `accepts_pool_jobs` is a boolean. A model
entry that fails is dropped and the rest of the message kept; a message whose `models` (or
`valid_for_s`) fails is ignored whole. Each function returns what to keep (None: nothing) and what was
wrong, one line per problem, for the log.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from typing import Any

from appliance.tensors import ONNX_TO_OIP

# Inferences/s or milliseconds: orders of magnitude above any box, and small enough that credit
# (spare x SLO, summed over a fleet) can never overflow a float.
MAX_FIGURE = 1e9
DATATYPES = frozenset(ONNX_TO_OIP.values())  # every datatype a node can put in its birth
FIGURES = ("spare_ips_at_slo", "max_ips_at_slo", "served_ips")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KNOWN = ", ".join(sorted(DATATYPES))

Checked = tuple[dict[str, Any] | None, list[str]]


def birth(document: dict[str, Any]) -> Checked:
    """The birth with only the model entries the gateway can use."""
    return _models(document, _model_birth)


def capacity(document: dict[str, Any]) -> Checked:
    """The report with only the model entries whose figures the gateway can use."""
    valid_for_s = document.get("valid_for_s")
    if not _is_int(valid_for_s) or valid_for_s < 1:
        return None, [f"valid_for_s is {_shown(valid_for_s)}; expected a whole number of seconds >= 1"]
    return _models(document, _model_report)


def _models(document: dict[str, Any], check: Callable[[dict[str, Any]], str | None]) -> Checked:
    models = document.get("models")
    if not isinstance(models, dict):
        return None, [f"models is {_shown(models)}; expected a table of models"]
    problems = []
    kept = {}
    for name, entry in models.items():
        problem = check(entry) if isinstance(entry, dict) else f"is {_shown(entry)}; expected a table"
        if problem is None:
            kept[name] = entry
        else:
            problems.append(f"model {_shown(name)} dropped: {problem}")
    return (document if not problems else {**document, "models": kept}), problems


def _model_birth(entry: dict[str, Any]) -> str | None:
    digest = entry.get("sha256")
    if digest is not None and not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
        return f"sha256 is {_shown(digest)}; expected 64 lowercase hex digits"
    for field in ("inputs", "outputs"):
        if field in entry:
            problem = _tensors(entry[field])
            if problem is not None:
                return f"{field}: {problem}"
    return _slo(entry)


def _tensors(value: Any) -> str | None:
    if not isinstance(value, list):
        return f"is {_shown(value)}; expected a list of {{name, datatype, shape}}"
    for index, spec in enumerate(value):
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return f"[{index}] has no name"
        datatype = spec.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            return f"{_shown(spec['name'])} has datatype {_shown(datatype)}; expected one of {_KNOWN}"
        shape = spec.get("shape")
        if not isinstance(shape, list) or not all(_is_int(dim) and dim >= -1 for dim in shape):
            return f"{_shown(spec['name'])} has shape {_shown(shape)}; expected a list of integers >= -1"
    return None


def _model_report(entry: dict[str, Any]) -> str | None:
    for field in FIGURES:
        if field in entry and not _is_figure(entry[field]):
            return f"{field} is {_shown(entry[field])}; expected a number from 0 to {MAX_FIGURE:g}"
    if "accepts_pool_jobs" in entry and not isinstance(entry["accepts_pool_jobs"], bool):
        return f"accepts_pool_jobs is {_shown(entry['accepts_pool_jobs'])}; expected true or false"
    return _slo(entry)


def _slo(entry: dict[str, Any]) -> str | None:
    slo_ms = entry.get("slo_p99_ms")
    if slo_ms is None or _is_figure(slo_ms, positive=True):
        return None
    return f"slo_p99_ms is {_shown(slo_ms)}; expected a number above 0, at most {MAX_FIGURE:g}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_figure(value: Any, *, positive: bool = False) -> bool:
    """A number within bounds (NaN and infinity compare false with both, so are never one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (value > 0 if positive else value >= 0) and value <= MAX_FIGURE


def _shown(value: Any) -> str:
    """A value as a log line may show it: short, however big what a node sent (reprlib stops early)."""
    text = reprlib.repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
