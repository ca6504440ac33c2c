"""model.toml: the optional manifest beside a model's version folders (batching, SLO, providers, digest)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from appliance.engine.files import FOLLOW, Files, read_bounded
from appliance.errors import ConfigError

MANIFEST_NAME = "model.toml"
# A manifest runs to a few hundred bytes; this bounds what is read (root reads it too, in `appliance ota`:
# a sparse file of terabytes in the service user's repository must not hold an update).
MAX_MANIFEST_BYTES = 1024 * 1024
# Bounds that keep one model's typo (1e12 rows, microseconds written as milliseconds) a load error of
# that model rather than a MemoryError or a queue that never flushes. Each Field says why its bound.
MAX_BATCH_ROWS = 4096
MAX_PREFERRED_SIZES = 16
MAX_WAIT_MS = 600_000.0  # 10 minutes
MAX_INSTANCES = 64
_LONG_NUMBER = re.compile(rb"[0-9][0-9_]{40,}")  # far longer than any setting's value


class Batching(BaseModel):
    """Dynamic batching, named as PyTriton's DynamicBatcher and Triton's model_config.proto name it."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(
        None,
        ge=0,
        le=MAX_BATCH_ROWS,
        description=f"Row limit per batch; 0 disables batching; unset uses the default. At most "
        f"{MAX_BATCH_ROWS}: every worker keeps an input buffer of this many rows and warm-up runs every "
        "power of two up to it, so 4096 rows of one 224x224 RGB FP32 image each already take 2.5 GB.",
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list,
        max_length=MAX_PREFERRED_SIZES,
        description=f"Batch sizes to warm up and to prefer when forming batches; each 1 to max_batch_size, "
        f"at most {MAX_PREFERRED_SIZES} of them (each is warmed up before the service reports ready).",
    )
    max_queue_delay_ms: float | None = Field(
        None,
        ge=0,
        le=MAX_WAIT_MS,
        description="Longest a request waits for others to fill a batch. At most 600000 (10 minutes), "
        "the longest slo_p99_ms: the batcher never waits past a request's deadline anyway, and a larger "
        "value is usually microseconds written as milliseconds.",
    )

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sorted(cls, sizes: list[int]) -> list[int]:
        wrong = [size for size in sizes if not 1 <= size <= MAX_BATCH_ROWS]
        if wrong:
            raise ValueError(f"batch sizes must be 1 to {MAX_BATCH_ROWS}; got {wrong}")
        return sorted(set(sizes))

    @model_validator(mode="after")
    def _preferred_fit(self) -> Batching:
        limit = self.max_batch_size
        too_big = [size for size in self.preferred_batch_sizes if limit is not None and size > limit]
        if too_big:
            raise ValueError(
                f"preferred_batch_sizes {too_big} exceed max_batch_size {limit}"
                + (" (0 disables batching)" if limit == 0 else "")
            )
        return self


class InputOverride(BaseModel):
    """Narrows what the graph says of one input, e.g. fixing a dynamic image size."""

    model_config = ConfigDict(extra="forbid")

    shape: list[int] = Field(description="Shape with -1 for dynamic dims, e.g. [-1, 3, 224, 224].")


class Samples(BaseModel):
    """Tolerances for the golden samples in <version>/samples.npz."""

    model_config = ConfigDict(extra="forbid")

    atol: float = Field(1e-5, ge=0, description="Absolute tolerance.")
    rtol: float = Field(1e-4, ge=0, description="Relative tolerance.")


class Manifest(BaseModel):
    """Everything model.toml may say; every key is optional."""

    model_config = ConfigDict(extra="forbid")

    description: str = Field("", description="What the model does, for people.")
    labels: list[str] = Field(default_factory=list, description="Class labels, in output order.")
    precision: str | None = Field(None, description="fp32, fp16 or int8; read from the graph if unset.")
    sha256: str | None = Field(
        None, pattern=r"^[0-9a-f]{64}$", description="Expected digest of the served model.onnx."
    )
    version: int | None = Field(None, ge=1, description="Serve this version instead of the highest.")
    slo_p99_ms: float | None = Field(
        None,
        gt=0,
        le=MAX_WAIT_MS,
        description="Latency objective (p99) of a request. At most 600000 (10 minutes): it is the "
        "default deadline, and an objective longer than that is batch work or seconds written as ms.",
    )
    providers: list[str] | None = Field(None, description="Provider order for this model only.")
    instances: int | None = Field(
        None,
        ge=1,
        le=MAX_INSTANCES,
        description=f"Worker threads for this model. At most {MAX_INSTANCES}: they share one session and "
        "split the cores, so more threads than the largest edge CPU has cores only contend.",
    )
    batching: Batching = Field(default_factory=Batching)
    inputs: dict[str, InputOverride] = Field(default_factory=dict)
    samples: Samples = Field(default_factory=Samples)
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Free-form metadata shown in model metadata."
    )


def read_manifest(model_dir: Path, files: Files = FOLLOW) -> Manifest:
    """The manifest of a model folder (defaults when there is none); ConfigError names the key."""
    path = model_dir / MANIFEST_NAME
    if not files.is_file(path):
        return Manifest()
    return parse_manifest(read_manifest_bytes(path, files), path)


def read_manifest_bytes(path: Path, files: Files = FOLLOW) -> bytes:
    """The bytes of model.toml `path`, bounded; ConfigError if it cannot be read or is too large."""
    return read_bounded(files, path, MAX_MANIFEST_BYTES, "TOML", "a manifest of a few KiB")


def parse_manifest(raw: bytes, path: Path) -> Manifest:
    """The manifest that the bytes of model.toml `path` say; ConfigError names the key or line."""
    try:
        text = raw.decode("utf-8")
        data: dict[str, Any] = tomllib.loads(text)
    except ValueError as exc:  # UnicodeDecodeError, TOMLDecodeError, and int()'s refusal of 4300+ digits
        raise ConfigError(f"{path}: cannot be read as TOML ({_toml_problem(exc, raw)})") from exc
    if wide := _wide_integer(data):  # hex, octal and binary have no digit limit in int()
        key, value = wide
        raise ConfigError(
            f"{path}: {key!r}: an integer of {value.bit_length()} bits; expected at most 64 bits"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: " + "; ".join(problems(exc))) from exc


def _toml_problem(exc: ValueError, raw: bytes) -> str:
    """tomllib's reason; for an integer it cannot convert (it says neither line nor key), the line."""
    if isinstance(exc, UnicodeDecodeError | tomllib.TOMLDecodeError):
        return str(exc)
    if found := _LONG_NUMBER.search(raw):
        line = raw.count(b"\n", 0, found.start()) + 1
        start = raw.rfind(b"\n", 0, found.start()) + 1
        shown = raw[start : found.start() + 20].decode("utf-8", "replace").strip()
        digits = len(found.group())
        return f"line {line}: {shown}...: an integer of {digits} digits; expected at most 64 bits"
    return str(exc)


def _wide_integer(value: object, key: str = "") -> tuple[str, int] | None:
    """The first integer (and its key) that does not fit in 64 bits, anywhere in the TOML data."""
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
        return key, value
    if isinstance(value, dict):
        items = [(f"{key}.{k}" if key else str(k), v) for k, v in value.items()]
    elif isinstance(value, list):
        items = [(f"{key}[{i}]", v) for i, v in enumerate(value)]
    else:
        return None
    for item_key, item in items:
        if found := _wide_integer(item, item_key):
            return found
    return None


def _shown(value: object) -> str:
    """repr of a value given, shortened: repr() of an int of more than 4300 digits is a ValueError."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + f"... ({len(text)} characters)"


def problems(exc: ValidationError) -> list[str]:
    """One phrase per validation error: the key, what was wrong, and the value given."""
    found = []
    for error in exc.errors(include_url=False):
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            found.append(f"unknown key {key!r}")
        elif error["type"] == "value_error":  # our validators name the values themselves
            found.append(f"{key!r}: {error['msg'].removeprefix('Value error, ')}")
        else:
            found.append(f"{key!r}: {error['msg']}, got {_shown(error.get('input'))}")
    return found
