"""model.toml: the optional manifest beside a model's version folders (batching, SLO, providers, digest)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from appliance.errors import ConfigError

MANIFEST_NAME = "model.toml"


class Batching(BaseModel):
    """Dynamic batching, named as PyTriton's DynamicBatcher and Triton's model_config.proto name it."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int | None = Field(
        None, ge=0, description="Row limit per batch; 0 disables batching; unset uses the default."
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list, description="Batch sizes to warm up and to prefer when forming batches."
    )
    max_queue_delay_ms: float | None = Field(
        None, ge=0, description="Longest a request waits for others to fill a batch."
    )

    @field_validator("preferred_batch_sizes")
    @classmethod
    def _positive_sorted(cls, sizes: list[int]) -> list[int]:
        if any(size < 1 for size in sizes):
            raise ValueError("batch sizes must be >= 1")
        return sorted(set(sizes))


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
    slo_p99_ms: float | None = Field(None, gt=0, description="Latency objective (p99) of a request.")
    providers: list[str] | None = Field(None, description="Provider order for this model only.")
    instances: int | None = Field(None, ge=1, description="Worker threads for this model.")
    batching: Batching = Field(default_factory=Batching)
    inputs: dict[str, InputOverride] = Field(default_factory=dict)
    samples: Samples = Field(default_factory=Samples)
    parameters: dict[str, str | int | float | bool] = Field(
        default_factory=dict, description="Free-form metadata shown in model metadata."
    )


def read_manifest(model_dir: Path) -> Manifest:
    """The manifest of a model folder (defaults when there is none); ConfigError names the key."""
    path = model_dir / MANIFEST_NAME
    if not path.is_file():
        return Manifest()
    try:
        data: dict[str, Any] = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as TOML ({exc})") from exc
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors(include_url=False):
            key = ".".join(str(p) for p in error["loc"])
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown key {key!r}")
            else:
                problems.append(f"{key!r}: {error['msg']}, got {error.get('input')!r}")
        raise ConfigError(f"{path}: " + "; ".join(problems)) from exc
