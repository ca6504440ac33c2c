"""What every provider is: a key, a config model, a probe and the ORT options it builds."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field

from appliance.providers.checks import ep_missing
from appliance.providers.host import Host, SystemHost

CPU_EP = "CPUExecutionProvider"
ConfigT = TypeVar("ConfigT", bound=BaseModel)


@dataclass(frozen=True, slots=True)
class Probe:
    """Whether this box can run a provider, and if not, exactly why."""

    available: bool
    reason: str = ""
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SessionContext:
    """What a provider may need to build options for one model load."""

    model_name: str
    model_digest: str  # sha256 hex of model.onnx and its external data (engine/modelfiles.py)
    # Given to open_session: the cache root. A provider sees `<root>/<its key>`; it keys entries under
    # that by model digest and runtime versions (see caches.keyed_dir).
    cache_dir: Path


class NoOptions(BaseModel):
    """Config of a provider that takes no options."""

    model_config = ConfigDict(extra="forbid")


class AcceleratorConfig(BaseModel):
    """Options every accelerator shares; a provider's config model extends it."""

    model_config = ConfigDict(extra="forbid")

    allow_cpu_fallback: bool = Field(
        True,
        description="Run the nodes this provider cannot take (an op or a precision it lacks) on the CPU EP; "
        "false makes such a model fall back to the next provider instead.",
    )


@runtime_checkable
class Provider(Protocol):
    """One execution provider (Frigate-style: its key, its config and its code in one module).

    `probe()` is called once per process (the registry caches it); it must not raise.
    `ort_options()` is called once per model load and returns ONNX Runtime provider options, every value a
    string; it raises (ProviderUnavailable, OSError, ...) when this load cannot use the provider, and the
    chain records the message and moves on.
    `library_path()` names an ORT plugin EP library that the registry registers before the first probe
    (sessions then use ORT's EP-device API), or None for an EP compiled into the installed ORT.

    Optional, looked up with getattr so plugins need not define them:
    `session_config(config, context) -> dict[str, str]`: session config entries the EP needs.
    `extra_eps(config, context) -> list[tuple[str, dict[str, str]]]`: EPs registered after this one and
    before the CPU EP, for the nodes it cannot take (TensorRT hands them to CUDA).
    A config model with a boolean `allow_cpu_fallback` field controls whether the CPU EP may take nodes.
    `uses_host_cores: ClassVar[bool]`: whether the EP computes on the host's CPU cores (the CPU EP, oneDNN,
    XNNPACK, ACL, ArmNN) rather than on a device of its own; default False. It decides where pool work
    runs (scheduler/placement.py) and whether compute counts against the CPU budget.
    """

    name: ClassVar[str]  # the key users write in appliance.toml
    ep_name: ClassVar[str]  # what ONNX Runtime calls it
    config_model: ClassVar[type[BaseModel]]
    is_default: ClassVar[bool]  # part of the automatic order when none is configured

    def probe(self) -> Probe: ...

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]: ...

    def library_path(self) -> Path | None: ...


class Builtin:
    """Plumbing the built-in providers share: the host seam and the compiled-into-ORT check."""

    name: ClassVar[str]
    ep_name: ClassVar[str]
    config_model: ClassVar[type[BaseModel]] = AcceleratorConfig
    is_default: ClassVar[bool] = True
    uses_host_cores: ClassVar[bool] = False  # compute on the host's CPU cores, not on a device
    install_hint: ClassVar[str] = ""  # how to get an ONNX Runtime with this EP, for the probe's reason

    def __init__(self, host: Host | None = None) -> None:
        self.host = host or SystemHost()

    def probe(self) -> Probe:
        missing = ep_missing(self.host, self.ep_name, self.install_hint)
        if missing is not None:
            return Probe(False, missing)
        return self.probe_device()

    def probe_device(self) -> Probe:
        """Checks beyond "ORT has the EP": device nodes, drivers, libraries. Default: none."""
        return Probe(True)

    def ort_options(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {}

    def session_config(self, config: BaseModel, context: SessionContext) -> dict[str, str]:
        return {}

    def extra_eps(self, config: BaseModel, context: SessionContext) -> list[tuple[str, dict[str, str]]]:
        return []

    def library_path(self) -> Path | None:
        return None


def uses_host_cores(provider: object) -> bool:
    """Whether a provider computes on the host's cores (plugins that do not say are devices)."""
    return bool(getattr(provider, "uses_host_cores", False))


def flag(value: bool, true: str = "1", false: str = "0") -> str:
    """A boolean as the string an EP parses; EPs disagree on the spelling, so each says which."""
    return true if value else false


def put(options: dict[str, str], key: str, value: object) -> None:
    """Set an ORT option only when configured; None keeps the EP's own default."""
    if value is not None:
        options[key] = str(value)


def expect(config: BaseModel, model: type[ConfigT]) -> ConfigT:
    """The config as the provider's own model; anything else is a wiring bug worth a clear message."""
    if not isinstance(config, model):
        raise TypeError(f"expected a {model.__name__} config, got {type(config).__name__}")
    return config
