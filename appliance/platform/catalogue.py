"""What buyers may call: a catalogue file pinning model names to files by sha256 (with golden samples,
trusted copies and tolerances), or, with none, every name the nodes offer under one sha256.

With no catalogue, what buyers are told of a name (its file, its inputs and outputs) is what most nodes
in good standing say: trusted (their key is the pinned one) and not quarantined. The others get no jobs
and decide nothing buyers see, while one in good standing serves the name.

One name may stand for several files (an int8 and an fp32 build of the same model): the operator says
so by listing them, and states how far their answers may differ in `tolerances`, keyed by pairs of
"precision/provider class" (`int8/cpu~fp32/cpu`; class cpu, gpu or npu, see `provider_class`).

An entry may also name its classes (`labels`, in output order): the gateway appends them to the classes
it ranks for Triton's classification extension. Labels come from here only, never from nodes.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config_sources import read_toml
from appliance.errors import ConfigError
from appliance.platform.view import NodeView, PoolView

Tolerance = tuple[float, float]  # (atol, rtol)
Files = frozenset[str]  # the sha256 of every file a name may run on
DEFAULT_TOLERANCE: Tolerance = (1e-4, 1e-3)
RECOUNT_S = 1.0
# Names whose vote is kept between recounts. Only names some node in good standing serves are kept (a
# buyer's made-up name never is), so this bounds only what a node could add by naming models.
MAX_KEPT = 4096
GPU = ("cuda", "tensorrt", "rocm", "migraphx", "directml", "coreml")
NPU = ("openvino", "qnn", "cann", "rknpu", "vitisai", "nnapi")
# An entry's labels: ImageNet-21k's 21,843 classes fit; each is a short printable name ("" for none).
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256

log = logging.getLogger(__name__)


def provider_class(provider: str) -> str:
    """cpu, gpu or npu: what a provider's arithmetic is like (its name as the birth gives it)."""
    name = provider.lower()
    return "gpu" if name.startswith(GPU) else ("npu" if name.startswith(NPU) else "cpu")


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogue model: the name buyers call, its files' sha256, its golden samples, trusted copies."""

    name: str
    files: Files
    samples: Path | None = None
    model_files: dict[str, Path] = field(default_factory=dict)  # sha256 -> the trusted copy of that file
    tolerances: dict[str, Tolerance] = field(default_factory=dict)  # "fp32/cpu~int8/cpu" -> (atol, rtol)
    labels: tuple[str, ...] = ()  # the label of each class index, "" for none (classification)

    def tolerance(self, first: str, second: str) -> Tolerance:
        """Tolerance between two answers by their "precision/provider class" (order does not matter)."""
        for key in (f"{first}~{second}", f"{second}~{first}"):
            if key in self.tolerances:
                return self.tolerances[key]
        return self.tolerances.get("default", DEFAULT_TOLERANCE)


@dataclass(frozen=True, slots=True)
class _Described:
    """What buyers are told of a name: the birth entry most nodes serving `files` agree on."""

    files: Files
    signature: bytes  # the inputs and outputs voted on, canonical: what a later count compares
    born: dict[str, Any]


class Catalogue:
    """Pinned entries, or (with no file) whatever the pool offers, one sha256 per name."""

    def __init__(
        self, entries: dict[str, Entry] | None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.entries = entries
        self.clock = clock
        # name -> (until, {sha256}), unpinned; and name -> (until, what buyers see): the least recently
        # counted first (_keep)
        self._chosen: OrderedDict[str, tuple[float, Files]] = OrderedDict()
        self._described: OrderedDict[str, tuple[float, _Described]] = OrderedDict()

    @property
    def is_pinned(self) -> bool:
        return self.entries is not None

    @classmethod
    def load(cls, path: Path | None) -> Catalogue:
        if path is None:
            return cls(None)
        models = read_toml(path).get("models")
        if not isinstance(models, dict):
            raise ConfigError(f"catalogue {path}: expected [models.NAME] tables with sha256")
        return cls({name: _entry(path, name, raw) for name, raw in models.items()})

    def labels(self, name: str) -> tuple[str, ...]:
        """The labels the catalogue gives `name`'s classes; none without a catalogue or an entry's list."""
        entry = (self.entries or {}).get(name)
        return entry.labels if entry is not None else ()

    def names(self, view: PoolView) -> list[str]:
        """Every model name buyers may call now (pinned ones even while no node offers them)."""
        return sorted(self.entries) if self.entries is not None else view.models()

    def files(self, name: str, view: PoolView) -> Files | None:
        """The files (sha256) jobs for `name` may run on; None when the name is not served."""
        if self.entries is not None:
            entry = self.entries.get(name)
            return entry.files if entry else None
        now_s = self.clock()
        kept = self._chosen.get(name)
        if kept is not None and kept[0] > now_s:
            return kept[1]
        # A vote over the nodes reporting it, recounted once a second rather than per job; a name no
        # node serves is counted each time it is asked for (in O(1): no node reports it), never kept.
        majority = majority_sha256(view.offering(name), name)
        if majority is None:
            self._chosen.pop(name, None)
            return None
        chosen = frozenset((majority,))  # one set per recount, not one per job
        _keep(self._chosen, name, now_s + RECOUNT_S, chosen)
        return chosen

    def described(self, name: str, files: Files, view: PoolView) -> dict[str, Any] | None:
        """The birth entry that tells buyers what `name` takes and gives (inputs, outputs, version), or
        None when no node in good standing serves one of `files`.

        It is the one most nodes serving those files agree on, counting only trusted, unquarantined
        nodes, and of those only the ones with a usable offer when any has one. On a tie what buyers
        were told before stands, else the node heard of first decides: a newcomer alone never changes
        the signature buyers' requests are checked against. Recounted once a second, not per job."""
        now_s = self.clock()
        until_s, kept = self._described.get(name, (0.0, None))
        if kept is not None and until_s > now_s and kept.files == files:
            return kept.born
        incumbent = kept.signature if kept is not None else None
        found = majority_birth(view.offering(name), name, files, now_s, incumbent)
        if found is None:
            self._described.pop(name, None)
            return None
        signature, born = found
        if incumbent is not None and signature != incumbent:
            log.warning(
                "model %r: most nodes in good standing now describe it as %s; buyers are told so",
                name,
                signature.decode()[:300],
            )
        _keep(self._described, name, now_s + RECOUNT_S, _Described(files, signature, born))
        return born


def in_good_standing(node: NodeView) -> bool:
    """A node whose word counts: its key is the pinned one and it is not quarantined."""
    return node.is_trusted and node.quarantine is None


def majority_sha256(nodes: list[NodeView], name: str) -> str | None:
    """With no catalogue, the sha256 most nodes in good standing serve `name` with (ties: the smallest
    digest), so that one name never mixes two different files. A name that only nodes out of good
    standing serve (a changed key, a failed canary) stays known by their count: none of them gets a
    job, so its buyers hear 503 (not 404) until one is back."""
    served = set(_digests(nodes, name))
    if len(served) <= 1:  # one file (the common case), or none: whose nodes they are changes nothing
        return next(iter(served), None)
    counts = Counter(_digests((node for node in nodes if in_good_standing(node)), name))
    if not counts:
        counts = Counter(_digests(nodes, name))
    return min(counts, key=lambda digest: (-counts[digest], digest))


def _digests(nodes: Iterable[NodeView], name: str) -> Iterator[str]:
    for node in nodes:
        digest = node.model_birth(name).get("sha256")
        if digest:
            yield digest


def majority_birth(
    nodes: list[NodeView], name: str, files: Files, now_s: float, incumbent: bytes | None = None
) -> tuple[bytes, dict[str, Any]] | None:
    """(signature, birth entry) of `name` as most nodes in good standing serving one of `files` describe
    it (see `Catalogue.described`); `nodes` in the order they were heard of."""
    standing = []  # (node, its birth entry, the entry's signature), each made once per birth
    for node in nodes:
        born = node.model_birth(name)
        if in_good_standing(node) and born.get("sha256") in files and (sig := node.signature(name)):
            standing.append((node, born, sig))
    if len({signature for _, _, signature in standing}) == 1:  # all agree (the common case): only
        # the entry told changes, the first offering node's: found without asking every node for its offer
        born = next((born for node, born, _ in standing if node.refusal(name, now_s) is None), standing[0][1])
        return standing[0][2], dict(born)
    offering = [entry for entry in standing if entry[0].refusal(name, now_s) is None]
    counts: Counter[bytes] = Counter()
    first: dict[bytes, Mapping[str, Any]] = {}
    for _, born, signature in offering or standing:
        counts[signature] += 1
        first.setdefault(signature, born)
    if not counts:
        return None
    most = max(counts.values())
    tied = [signature for signature, count in counts.items() if count == most]  # in the order first heard
    chosen = incumbent if incumbent in tied else tied[0]
    return chosen, dict(first[chosen])  # a copy: what buyers are told stays as it was counted


def _keep(kept: OrderedDict[str, tuple[float, Any]], name: str, until_s: float, value: Any) -> None:
    """Keep a name's vote until `until_s`, at most MAX_KEPT names, in O(1). Every vote is kept for
    RECOUNT_S, so the one counted least recently is also the first to expire: a recounted name moves to
    the end, and a full table forgets its first. Expired votes wait there, unread (callers check
    `until`), until they are recounted or pushed out; a scan for them made every new name O(MAX_KEPT)."""
    kept[name] = (until_s, value)
    kept.move_to_end(name)
    while len(kept) > MAX_KEPT:
        kept.popitem(last=False)


def _entry(path: Path, name: str, raw: Any) -> Entry:
    where = f"catalogue {path}: models.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = set(raw) - {"sha256", "samples", "model_files", "tolerances", "labels"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    digests = raw.get("sha256")
    digests = [digests] if isinstance(digests, str) else digests
    if not isinstance(digests, list) or not digests or not all(_is_digest(d) for d in digests):
        raise ConfigError(f"{where}.sha256 must be 64 lowercase hex digits, or a list of them")
    model_files: dict[str, Path] = {}
    for value in raw.get("model_files") or []:
        found = _path(path, value)
        assert found is not None
        try:
            digest = hashlib.sha256(found.read_bytes()).hexdigest()
        except OSError as exc:
            raise ConfigError(f"{where}.model_files: {found}: {exc.strerror}") from exc
        if digest not in digests:
            raise ConfigError(
                f"{where}.model_files: {found} has sha256 {digest}, which is not listed in sha256"
            )
        model_files[digest] = found
    tolerances: dict[str, Tolerance] = {}
    for pair, value in (raw.get("tolerances") or {}).items():
        if not (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) for v in value)
        ):
            raise ConfigError(f"{where}.tolerances.{pair} must be [atol, rtol]")
        tolerances[pair] = (float(value[0]), float(value[1]))
    return Entry(
        name,
        frozenset(digests),
        samples=_path(path, raw.get("samples")),
        model_files=model_files,
        tolerances=tolerances,
        labels=_labels(where, raw.get("labels", [])),
    )


def _labels(where: str, value: Any) -> tuple[str, ...]:
    """An entry's labels: a list of at most MAX_LABELS printable strings of up to MAX_LABEL_CHARS each."""
    if not isinstance(value, list) or len(value) > MAX_LABELS:
        raise ConfigError(f"{where}.labels must be a list of at most {MAX_LABELS} strings, one per class")
    for index, label in enumerate(value):
        if not (isinstance(label, str) and len(label) <= MAX_LABEL_CHARS and label.isprintable()):
            raise ConfigError(
                f"{where}.labels[{index}] is {label!r:.60}; expected a printable string of up to "
                f'{MAX_LABEL_CHARS} characters ("" for a class without one)'
            )
    return tuple(value)


def _is_digest(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _path(base: Path, value: Any) -> Path | None:
    if value is None:
        return None
    found = Path(value)
    return found if found.is_absolute() else base.parent / found
