"""What the gateway takes of a node's messages: the topic levels it believes, and of each birth, state
and capacity report only the fields it reads, each checked once at ingest, so that one node's malformed,
absurd or huge message is ignored rather than breaking a model for every buyer on every request.

A topic's site and node are ids a box's settings would take (config_sources.node_level_problem): one
printable level of at most MAX_LEVEL_CHARS characters, without + # $, never starting with `_`:
`<root>/_reply/`, `_gateways/` and `_sync/` are the platform's, and a node allowed to write answers
under `_reply/#` must not pass for a node of site `_reply`. A payload that
names another node (or site) than its topic is not that node's.

What is kept is built anew from checked fields; everything else a node sends is dropped, so what the
gateway holds per node is small and always serialisable (orjson reads JSON nested 1024 deep but writes
only 254 levels). A birth keeps `public_key` and, per model, `sha256` (64 hex digits), `version`,
`precision`, `provider` (short printable strings), `slo_p99_ms` (a number above 0) and `inputs` and
`outputs` as lists of {name, datatype, shape}. A report keeps `valid_for_s` (a whole number >= 1) and,
per model, its figures (finite numbers from 0 to MAX_FIGURE), `accepts_pool_jobs` (a boolean),
`slo_p99_ms`, `precision` and `provider`. A state keeps `state` (one the box publishes) and `reason`
(control characters removed, at most MAX_REASON_CHARS). A model entry that fails is dropped and the rest
of the message kept; a message whose `models`, `valid_for_s` or `state` fails, or that is larger than
MAX_BYTES of its kind, is ignored whole. Each function returns what to keep (None: nothing) and what
was wrong, one line per problem, for the log.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Callable
from typing import Any

from appliance.config_sources import MAX_NODE_LEVEL_CHARS, node_level_problem
from appliance.tensors import ONNX_TO_OIP

# Inferences/s or milliseconds: orders of magnitude above any box, and small enough that credit
# (spare x SLO, summed over a fleet) can never overflow a float.
MAX_FIGURE = 1e9
MAX_BATCH_SIZE = 2**31 - 1  # an ONNX dimension's (int32 in most runtimes) largest value
DATATYPES = frozenset(ONNX_TO_OIP.values())  # every datatype a node can put in its birth
FIGURES = ("spare_ips_at_slo", "max_ips_at_slo", "served_ips")
STATES = frozenset(("online", "draining", "offline"))  # what a box publishes (pool/messages.py)
# The largest message of each kind read at all, before it is parsed. A box's birth is about 1 KiB per
# model plus its inputs and outputs, its report about 0.5 KiB per model: MAX_MODELS models fit with
# room to spare. A state is a word and a reason, an event a job's outcome (only `watch --json` reads them).
MAX_BYTES = {"birth": 1024 * 1024, "capacity": 512 * 1024, "state": 16 * 1024, "evt": 64 * 1024}
# Models per node. A box loads, warms and keeps in memory every model it serves, on a few cores: a few
# dozen is a large repository. The bound keeps one node's share of the model index, of the catalogue's
# votes and of the fleet view small, whatever it claims.
MAX_MODELS = 256
MAX_LEVEL_CHARS = MAX_NODE_LEVEL_CHARS  # a site or node id, as a box's settings allow (config_sources)
MAX_TENSORS = 256  # inputs or outputs of one model; an 80-layer decoder with its KV cache has 160
MAX_RANK = 32  # the box takes at most 32 dimensions (server.max_tensor_rank)
MAX_TENSOR_NAME_CHARS = 255
MAX_TEXT_CHARS = 64  # version (an int64 as text), precision, provider
MAX_KEY_CHARS = 128  # a public key: "ed25519:" and 44 base64 digits; trust.py parses it
MAX_REASON_CHARS = 200  # the box's own bound on a reason it is given (pool/commands.py)
# A model name as the box's repository accepts one (engine/repository.py): a folder name.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_KNOWN = ", ".join(sorted(DATATYPES))

Checked = tuple[dict[str, Any] | None, list[str]]


def topic_problem(site: str, node: str) -> str | None:
    """Why a topic's site or node level is not one the gateway takes from nodes (None: it is)."""
    for what, level in (("site", site), ("node", node)):
        problem = node_level_problem(level)  # the rule a box's settings hold its own ids to
        if problem is not None:
            return f"{what} {_shown(level)} {problem}"
    return None


def size_problem(kind: str, payload: bytes) -> str | None:
    limit = MAX_BYTES.get(kind)
    if limit is None or len(payload) <= limit:
        return None
    return f"{len(payload)} bytes; at most {limit} are read"


def identity_problem(document: dict[str, Any], site: str, node: str) -> str | None:
    """Why a payload is not the topic's node's own: it names another node or site (None: it does not)."""
    for what, level in (("node", node), ("site", site)):
        if what in document and document[what] != level:
            return f"names {what} {_shown(document[what])}, not its topic's {_shown(level)}"
    return None


def birth(document: dict[str, Any]) -> Checked:
    """The birth's public key and the model entries the gateway can use."""
    kept, problems = _models(document, _model_birth)
    if kept is None:
        return None, problems
    key = document.get("public_key")
    if key is not None:
        if isinstance(key, str) and 0 < len(key) <= MAX_KEY_CHARS and key.isprintable():
            kept["public_key"] = key
        else:
            problems.append(f"public_key {_shown(key)} dropped; expected up to {MAX_KEY_CHARS} characters")
    return kept, problems


def capacity(document: dict[str, Any]) -> Checked:
    """The report's lifetime and the model entries whose figures the gateway can use."""
    valid_for_s = document.get("valid_for_s")
    if not _is_int(valid_for_s) or valid_for_s < 1:
        return None, [f"valid_for_s is {_shown(valid_for_s)}; expected a whole number of seconds >= 1"]
    kept, problems = _models(document, _model_report)
    if kept is not None:
        kept["valid_for_s"] = valid_for_s
    return kept, problems


def state(document: dict[str, Any]) -> Checked:
    """The node's state, one of STATES, and its reason as a terminal or a metric label may show it."""
    value = document.get("state")
    if not isinstance(value, str) or value not in STATES:
        return None, [f"state is {_shown(value)}; expected one of {', '.join(sorted(STATES))}"]
    reason = document.get("reason", "")
    problems = []
    if not isinstance(reason, str):
        problems.append(f"reason {_shown(reason)} dropped; expected text")
        reason = ""
    if len(reason) > MAX_REASON_CHARS:
        problems.append(f"reason of {len(reason)} characters cut to {MAX_REASON_CHARS}")
        reason = reason[:MAX_REASON_CHARS]
    if not reason.isprintable():
        problems.append("control characters removed from the reason")
        reason = "".join(char for char in reason if char.isprintable())
    return {"state": value, "reason": reason}, problems


def _models(
    document: dict[str, Any], check: Callable[[dict[str, Any]], tuple[dict[str, Any] | None, str | None]]
) -> Checked:
    models = document.get("models")
    if not isinstance(models, dict):
        return None, [f"models is {_shown(models)}; expected a table of models"]
    problems = []
    kept = {}
    for index, (name, entry) in enumerate(models.items()):
        if index == MAX_MODELS:
            problems.append(f"{len(models) - MAX_MODELS} models beyond the first {MAX_MODELS} ignored")
            break
        if not MODEL_NAME.fullmatch(name):
            problems.append(f"model {_shown(name)} dropped: not a model name ({MODEL_NAME.pattern})")
            continue
        if not isinstance(entry, dict):
            problems.append(f"model {name} dropped: is {_shown(entry)}; expected a table")
            continue
        found, problem = check(entry)
        if found is None:
            problems.append(f"model {name} dropped: {problem}")
        else:
            kept[name] = found
    return {"models": kept}, problems


def _model_birth(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    kept: dict[str, Any] = {}
    digest = entry.get("sha256")
    if digest is not None:
        if not (isinstance(digest, str) and _DIGEST.fullmatch(digest)):
            return None, f"sha256 is {_shown(digest)}; expected 64 lowercase hex digits"
        kept["sha256"] = digest
    batch = entry.get("max_batch_size")
    if batch is not None:
        if not (_is_int(batch) and 0 <= batch <= MAX_BATCH_SIZE):
            return (
                None,
                f"max_batch_size is {_shown(batch)}; expected a whole number from 0 to {MAX_BATCH_SIZE}",
            )
        kept["max_batch_size"] = batch  # classification ranks row by row where it is above 0, as the box
    for field in ("inputs", "outputs"):
        if field in entry:
            specs, problem = _tensors(entry[field])
            if specs is None:
                return None, f"{field}: {problem}"
            kept[field] = specs
    return _common(entry, kept, ("version", "precision", "provider"))


def _model_report(entry: dict[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    kept: dict[str, Any] = {}
    for field in FIGURES:
        if field in entry:
            if not _is_figure(entry[field]):
                return None, f"{field} is {_shown(entry[field])}; expected a number from 0 to {MAX_FIGURE:g}"
            kept[field] = entry[field]
    if "accepts_pool_jobs" in entry:
        if not isinstance(entry["accepts_pool_jobs"], bool):
            return None, f"accepts_pool_jobs is {_shown(entry['accepts_pool_jobs'])}; expected true or false"
        kept["accepts_pool_jobs"] = entry["accepts_pool_jobs"]
    return _common(entry, kept, ("precision", "provider"))


def _common(
    entry: dict[str, Any], kept: dict[str, Any], texts: tuple[str, ...]
) -> tuple[dict[str, Any] | None, str | None]:
    """`kept` with the entry's SLO and short texts, or why the entry is dropped."""
    slo_ms = entry.get("slo_p99_ms")
    if slo_ms is not None:
        if not _is_figure(slo_ms, positive=True):
            return None, f"slo_p99_ms is {_shown(slo_ms)}; expected a number above 0, at most {MAX_FIGURE:g}"
        kept["slo_p99_ms"] = slo_ms
    for field in texts:
        value = entry.get(field)
        if value is None:
            continue
        if field == "version" and _is_int(value):
            value = str(value)  # a repository's version folder; the box sends it as text
        if not _is_text(value, MAX_TEXT_CHARS):
            return None, f"{field} is {_shown(value)}; expected up to {MAX_TEXT_CHARS} printable characters"
        kept[field] = value
    return kept, None


def _tensors(value: Any) -> tuple[list[dict[str, Any]] | None, str | None]:
    if not isinstance(value, list):
        return None, f"is {_shown(value)}; expected a list of {{name, datatype, shape}}"
    if len(value) > MAX_TENSORS:
        return None, f"has {len(value)} tensors; at most {MAX_TENSORS}"
    specs = []
    for index, spec in enumerate(value):
        if not isinstance(spec, dict) or not _is_text(spec.get("name"), MAX_TENSOR_NAME_CHARS):
            return None, f"[{index}] has no name of up to {MAX_TENSOR_NAME_CHARS} printable characters"
        name = spec["name"]
        datatype = spec.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            return None, f"{_shown(name)} has datatype {_shown(datatype)}; expected one of {_KNOWN}"
        shape = spec.get("shape")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_RANK
            or not all(_is_int(dim) and dim >= -1 for dim in shape)
        ):
            return None, (
                f"{_shown(name)} has shape {_shown(shape)}; expected up to {MAX_RANK} integers >= -1"
            )
        specs.append({"name": name, "datatype": datatype, "shape": list(shape)})
    return specs, None


def _is_text(value: Any, max_chars: int) -> bool:
    return isinstance(value, str) and 0 < len(value) <= max_chars and value.isprintable()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_figure(value: Any, *, positive: bool = False) -> bool:
    """A number within bounds (NaN and infinity compare false with both, so are never one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return (value > 0 if positive else value >= 0) and value <= MAX_FIGURE


def _shown(value: Any) -> str:
    """A value as a log line may show it: short, printable, however big what a node sent (reprlib
    stops early)."""
    text = reprlib.repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."
