"""The provider registry: built-ins plus the `appliance.providers` entry points, probed once."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import BaseModel, ValidationError

from appliance.errors import ConfigError, ProviderUnavailable
from appliance.providers.acl import ACL
from appliance.providers.armnn import ArmNN
from appliance.providers.base import Probe, Provider
from appliance.providers.cann import CANN
from appliance.providers.coreml import CoreML
from appliance.providers.cpu import CPU
from appliance.providers.cuda import CUDA
from appliance.providers.directml import DirectML
from appliance.providers.dnnl import DNNL
from appliance.providers.host import Host, SystemHost
from appliance.providers.migraphx import MIGraphX
from appliance.providers.openvino import OpenVINO
from appliance.providers.qnn import QNN
from appliance.providers.rknpu import RKNPU
from appliance.providers.rocm import ROCm
from appliance.providers.tensorrt import TensorRT
from appliance.providers.xnnpack import XNNPACK

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "appliance.providers"
BUILTIN_SOURCE = "builtin"

# This order is the default order. NVIDIA first: CUDA covers nearly every op at GPU speed (TensorRT is
# faster still but opt-in, is_default=False). Then AMD GPUs, Intel GPU/NPU, then the NPUs of Huawei and
# Qualcomm and Apple's ANE, whose op coverage is narrower, then DirectML's generic GPU path. Last come
# the CPU-side EPs (oneDNN, Arm's ACL/ArmNN, the preview RKNPU, XNNPACK), which beat the plain CPU EP
# only by a margin, and the CPU EP itself. Plugins come after the built-ins; list one to prefer it.
BUILTINS: tuple[type[Any], ...] = (
    TensorRT, CUDA, MIGraphX, ROCm, OpenVINO, CANN, QNN, CoreML, DirectML,
    DNNL, ACL, ArmNN, RKNPU, XNNPACK, CPU,
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Broken:
    """A plugin that could not even be imported; listed as unavailable with its reason."""

    name: str
    reason: str
    source: str = "plugin"


class Registry:
    """Known providers by key; probes are cached for the life of the registry."""

    def __init__(
        self,
        providers: Iterable[Provider],
        broken: Iterable[Broken] = (),
        *,
        sources: Mapping[str, str] | None = None,
        host: Host | None = None,
    ) -> None:
        self._providers: dict[str, Provider] = {}
        for provider in providers:
            if provider.name in self._providers:
                log.warning("provider %r defined twice; keeping the first", provider.name)
                continue
            self._providers[provider.name] = provider
        self._broken = {b.name: b for b in broken if b.name not in self._providers}
        self._sources = dict(sources or {})
        self._host = host or SystemHost()
        self._probes: dict[str, Probe] = {}

    @classmethod
    def discover(cls, host: Host | None = None) -> Registry:
        """Built-ins first, then third-party providers; a plugin that fails to load is Broken."""
        host = host or SystemHost()
        providers: list[Provider] = [builtin(host) for builtin in BUILTINS]
        sources = {p.name: BUILTIN_SOURCE for p in providers}
        broken: list[Broken] = []
        for entry in entry_points(group=ENTRY_POINT_GROUP):
            source = f"plugin:{entry.dist.name if entry.dist else entry.value.split(':')[0]}"
            if entry.name in sources:
                log.warning("provider plugin %s from %s ignored: the name is taken", entry.name, source)
                continue
            try:
                provider = _load(entry)
            except Exception as exc:  # noqa: BLE001 - one bad plugin must not take the box down
                reason = f"plugin {entry.value} failed to load: {type(exc).__name__}: {exc}"
                log.warning("provider %s unavailable: %s", entry.name, reason)
                broken.append(Broken(entry.name, reason, source))
                continue
            providers.append(provider)
            sources[provider.name] = source
        return cls(providers, broken, sources=sources, host=host)

    @property
    def names(self) -> list[str]:
        return [*self._providers, *self._broken]

    def source(self, name: str) -> str:
        """Where a provider came from: "builtin" or "plugin:<distribution>"."""
        if name in self._broken:
            return self._broken[name].source
        self.get(name)
        return self._sources.get(name, "plugin")

    def get(self, name: str) -> Provider:
        if name in self._broken:
            raise ProviderUnavailable(f"provider {name!r}: {self._broken[name].reason}")
        try:
            return self._providers[name]
        except KeyError:
            raise ProviderUnavailable(f"unknown provider {name!r}; known: {', '.join(self.names)}") from None

    def probe(self, name: str) -> Probe:
        """Available or exactly why not; a plugin EP library is registered with ORT first."""
        if name in self._broken:
            return Probe(False, self._broken[name].reason)
        if name not in self._probes:
            self._probes[name] = self._probe(self.get(name))
        return self._probes[name]

    def _probe(self, provider: Provider) -> Probe:
        try:
            library = provider.library_path()
            if library is not None:
                problem = self._host.register_ep_library(provider.name, library)
                if problem:
                    return Probe(False, problem)
                if not self._host.ep_device_types(provider.ep_name):
                    return Probe(False, f"EP library {library} offers no device for {provider.ep_name}")
            return provider.probe()
        except Exception as exc:  # noqa: BLE001 - a probe that crashes means "not available"
            return Probe(False, f"probe failed: {type(exc).__name__}: {exc}")

    def default_order(self) -> list[str]:
        """Every available default provider in registry order, accelerators first, cpu last."""
        names = [n for n, p in self._providers.items() if p.is_default and n != "cpu"]
        return [n for n in names if self.probe(n).available] + ["cpu"]

    def chain(self, preference: Sequence[str] | None) -> list[str]:
        """The provider keys to try, in order: `preference`, or the default order when it is None."""
        if preference is None:
            return self.default_order()
        names = list(preference)
        if not names:
            raise ConfigError('provider preference is empty; list at least one provider, e.g. ["cpu"]')
        for name in names:
            if name not in self._providers and name not in self._broken:
                raise ConfigError(f"unknown provider {name!r}; known: {', '.join(self.names)}")
            if names.count(name) > 1:
                raise ConfigError(f"provider {name!r} is listed {names.count(name)} times in {names}")
        return names

    def configs(self, raw: Mapping[str, Mapping[str, Any]]) -> dict[str, BaseModel]:
        """Validate [providers.<key>] settings against each provider's config model."""
        for name in raw:
            if name not in self._providers and name not in self._broken:
                raise ConfigError(
                    f"setting 'providers.{name}': unknown provider; known: {', '.join(self.names)}"
                )
        configs: dict[str, BaseModel] = {}
        for name, provider in self._providers.items():
            try:
                configs[name] = provider.config_model.model_validate(dict(raw.get(name, {})))
            except ValidationError as exc:
                raise ConfigError(_describe(name, provider.config_model, exc)) from exc
        return configs


def _load(entry: EntryPoint) -> Provider:
    loaded = entry.load()
    provider = loaded() if isinstance(loaded, type) else loaded
    if not isinstance(provider, Provider):
        raise TypeError(f"{entry.value} does not implement the Provider protocol")
    if provider.name != entry.name:
        raise TypeError(f"entry point {entry.name!r} names a provider called {provider.name!r}")
    return provider


def _describe(name: str, model: type[BaseModel], exc: ValidationError) -> str:
    problems = []
    for error in exc.errors(include_url=False):
        key = ".".join(["providers", name, *map(str, error["loc"])])
        if error["type"] == "extra_forbidden":
            problems.append(f"unknown setting {key!r}; {name} takes: {', '.join(model.model_fields)}")
        else:
            problems.append(f"setting {key!r}: {error['msg']}, got {error.get('input')!r}")
    return "; ".join(problems)
