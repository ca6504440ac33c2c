"""config.pbtxt: a Triton model configuration mapped onto a Manifest, naming what it cannot honour.

The fields follow Triton's ModelConfig message:
https://github.com/triton-inference-server/common/blob/main/protobuf/model_config.proto
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from appliance.engine import pbtxt
from appliance.engine.files import FOLLOW, Files, read_bounded
from appliance.engine.manifest import Manifest, problems
from appliance.errors import ConfigError

CONFIG_NAME = "config.pbtxt"
# Triton's configs run to a few KiB (labels live in their own file); the largest ensembles to tens of KiB.
# The parser is pure Python (about 1 s per MiB), so the bound is also what one parse may cost: a worker
# thread's quarter-second at most, and once per change of the file (engine/repository.py caches it).
MAX_CONFIG_BYTES = 256 * 1024

_NO_EQUIVALENT = "no equivalent"
# Top-level ModelConfig fields read elsewhere in this module are absent; every other one is named here
# with what the user can do instead.
_NOT_HONOURED = {
    "runtime": "appliance runs model.onnx on ONNX Runtime",
    "input": "inputs come from the graph; narrow a dimension with model.toml [inputs.<name>] shape",
    "output": "outputs come from the graph",
    "batch_input": _NO_EQUIVALENT,
    "batch_output": _NO_EQUIVALENT,
    "optimization": "choose providers with model.toml providers and set their options in appliance.toml "
    "[providers.<name>]",
    "sequence_batching": "no equivalent: every request stands alone",
    "ensemble_scheduling": "no equivalent: each model is served on its own",
    "parameters": "ONNX Runtime options go in appliance.toml [providers.<name>]",
    "model_warmup": "appliance warms up every model.toml [batching] preferred_batch_sizes with zeros",
    "cc_model_filenames": _NO_EQUIVALENT,
    "metric_tags": _NO_EQUIVALENT,
    "model_operations": "custom-op libraries are not loaded",
    "model_transaction_policy": "no equivalent: one response per request",
    "model_repository_agents": _NO_EQUIVALENT,
    "response_cache": _NO_EQUIVALENT,
    "model_metrics": _NO_EQUIVALENT,
}
_READ = ("name", "platform", "backend", "default_model_filename", "version_policy", "max_batch_size")
_READ += ("dynamic_batching", "instance_group")
_BATCHING_NOT_HONOURED = {
    "preserve_ordering": "no equivalent: each request gets its own response",
    "priority_levels": "appliance has two priority classes, line and pool (parameters.priority)",
    "default_priority_level": "appliance has two priority classes, line and pool (parameters.priority)",
    "default_queue_policy": "queues are bounded by appliance.toml [scheduler] line_queue_max_requests; "
    "deadlines come from model.toml slo_p99_ms or parameters.timeout",
    "priority_queue_policy": "queues are bounded by appliance.toml [scheduler] line_queue_max_requests",
}
_GROUP_NOT_HONOURED = {
    "gpus": "the device is the provider's: appliance.toml [providers.<name>] device_id",
    "rate_limiter": _NO_EQUIVALENT,
    "secondary_devices": _NO_EQUIVALENT,
    "profile": _NO_EQUIVALENT,
    "passive": _NO_EQUIVALENT,
    "host_policy": _NO_EQUIVALENT,
}
_KINDS = ("KIND_AUTO", "KIND_GPU", "KIND_CPU", "KIND_MODEL")


@dataclass(frozen=True, slots=True)
class TritonConfig:
    """What config.pbtxt means here, and each field it says that appliance does not honour."""

    manifest: Manifest
    ignored: tuple[str, ...]  # 'platform "tensorrt_plan" (line 2: ...)'


def read_triton_config(path: Path, model: str, files: Files = FOLLOW) -> TritonConfig:
    """Read `path`, the config.pbtxt of model folder `model`; ConfigError names file, line and expectation."""
    return parse_triton_config(read_config_bytes(path, files), path, model)


def read_config_bytes(path: Path, files: Files = FOLLOW) -> bytes:
    """The bytes of config.pbtxt `path`, bounded; ConfigError if it cannot be read or is too large."""
    return read_bounded(files, path, MAX_CONFIG_BYTES, "UTF-8 text", "a config of a few KiB")


def parse_triton_config(data: bytes, path: Path, model: str) -> TritonConfig:
    """What the bytes of config.pbtxt `path` of model folder `model` mean here; ConfigError as above."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot be read as UTF-8 text ({exc})") from exc
    return _Mapper(path, model).map(pbtxt.parse(text, str(path)))


class _Mapper:
    def __init__(self, path: Path, model: str) -> None:
        self.path = path
        self.model = model
        self.ignored: list[str] = []
        self.lines: dict[tuple[str, ...], tuple[str, int]] = {}  # manifest key -> (pbtxt field, line)

    def map(self, config: pbtxt.Message) -> TritonConfig:
        self._known(config, (*_READ, *_NOT_HONOURED), "Triton's ModelConfig")
        data: dict[str, Any] = {}
        batching: dict[str, Any] = {}
        for name, reason in _NOT_HONOURED.items():
            if fields := config.all(name):
                self._ignore(name, fields[0].line, reason)
        self._identity(config)
        if (version := self._version(config)) is not None:
            data["version"] = version
        if (field := self._one(config, "max_batch_size")) is not None:
            batching["max_batch_size"] = self._integer(field)
            self.lines[("batching", "max_batch_size")] = ("max_batch_size", field.line)
        dynamic = self._one(config, "dynamic_batching")
        if dynamic is None:
            batching["max_queue_delay_ms"] = 0.0  # Triton without a dynamic batcher never holds a request
        else:
            batching.update(self._dynamic_batching(self._message(dynamic)))
            self.lines[("batching",)] = ("dynamic_batching", dynamic.line)
        if (instances := self._instances(config.all("instance_group"))) is not None:
            data["instances"] = instances
        data["batching"] = batching
        try:
            manifest = Manifest.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{self.path}, " + "; ".join(self._located(exc))) from exc
        return TritonConfig(manifest, tuple(self.ignored))

    def _identity(self, config: pbtxt.Message) -> None:
        if (field := self._one(config, "name")) is not None and self._text(field) != self.model:
            self._ignore(
                f"name {self._text(field)!r}", field.line, f"the folder name {self.model!r} is served"
            )
        accepted = {
            "platform": "onnxruntime_onnx",
            "backend": "onnxruntime",
            "default_model_filename": "model.onnx",
        }
        for name, expected in accepted.items():
            if (field := self._one(config, name)) is not None and self._text(field) != expected:
                reason = f"appliance serves <version>/model.onnx on ONNX Runtime ({name} {expected!r})"
                self._ignore(f"{name} {self._text(field)!r}", field.line, reason)

    def _version(self, config: pbtxt.Message) -> int | None:
        field = self._one(config, "version_policy")
        if field is None:
            return None
        policy = self._message(field)
        self._known(policy, ("latest", "all", "specific"), "version_policy")
        latest, specific = self._one(policy, "latest"), self._one(policy, "specific")
        if specific is not None:
            chosen = self._message(specific)
            self._known(chosen, ("versions",), "version_policy.specific")
            versions = [self._integer(f) for f in chosen.all("versions")]
            if len(versions) == 1:
                self.lines[("version",)] = ("version_policy.specific.versions", specific.line)
                return versions[0]
        elif latest is not None:
            count = self._message(latest)
            self._known(count, ("num_versions",), "version_policy.latest")
            if all(self._integer(f) == 1 for f in count.all("num_versions")):
                return None
        self._ignore(
            "version_policy", field.line, "appliance serves one version: the highest, or model.toml version"
        )
        return None

    def _dynamic_batching(self, dynamic: pbtxt.Message) -> dict[str, Any]:
        self._known(
            dynamic,
            ("preferred_batch_size", "max_queue_delay_microseconds", *_BATCHING_NOT_HONOURED),
            "dynamic_batching",
        )
        for name, reason in _BATCHING_NOT_HONOURED.items():
            if fields := dynamic.all(name):
                self._ignore(f"dynamic_batching.{name}", fields[0].line, reason)
        found: dict[str, Any] = {"max_queue_delay_ms": 0.0}  # Triton's default delay
        if sizes := dynamic.all("preferred_batch_size"):
            found["preferred_batch_sizes"] = [self._integer(f) for f in sizes]
            self.lines[("batching", "preferred_batch_sizes")] = (
                "dynamic_batching.preferred_batch_size",
                sizes[0].line,
            )
        if (delay := self._one(dynamic, "max_queue_delay_microseconds")) is not None:
            microseconds = self._integer(delay)
            if microseconds < 0:
                raise self._error(delay, f"expected microseconds >= 0, got {microseconds}")
            found["max_queue_delay_ms"] = microseconds / 1000
            self.lines[("batching", "max_queue_delay_ms")] = (
                "dynamic_batching.max_queue_delay_microseconds",
                delay.line,
            )
        return found

    def _instances(self, groups: list[pbtxt.Field]) -> int | None:
        """The sum of the groups' explicit counts; None (measured at start-up) when none gives one."""
        counts = []
        for group_field in groups:
            group = self._message(group_field)
            self._known(group, ("name", "kind", "count", *_GROUP_NOT_HONOURED), "instance_group")
            for name, reason in _GROUP_NOT_HONOURED.items():
                if fields := group.all(name):
                    self._ignore(f"instance_group.{name}", fields[0].line, reason)
            if (kind := self._one(group, "kind")) is not None:
                value = self._enum(kind, _KINDS)
                if value in ("KIND_GPU", "KIND_MODEL"):
                    reason = 'the provider order picks the device: model.toml providers = ["cuda", "cpu"]'
                    self._ignore(f"instance_group.kind {value}", kind.line, reason)
            if (count := self._one(group, "count")) is not None:
                counts.append(self._integer(count))
                self.lines.setdefault(("instances",), ("instance_group.count", count.line))
        return sum(counts) if counts else None

    # Reading values: each error names the file, the line, the field and what was expected.

    def _known(self, message: pbtxt.Message, names: tuple[str, ...], where: str) -> None:
        for field in message.fields:
            if field.name not in names:
                close = difflib.get_close_matches(field.name, names, n=1)
                known = ", ".join(sorted(names))
                hint = f"did you mean {close[0]!r}?" if close else f"expected one of {known}"
                raise self._error(field, f"unknown field in {where}; {hint}")

    def _one(self, message: pbtxt.Message, name: str) -> pbtxt.Field | None:
        fields = message.all(name)
        if len(fields) > 1:
            raise self._error(fields[1], f"given again (first on line {fields[0].line}); expected it once")
        return fields[0] if fields else None

    def _integer(self, field: pbtxt.Field) -> int:
        if not isinstance(field.value, int):
            raise self._error(field, f"expected an integer, got {_shown(field.value)}")
        return field.value

    def _text(self, field: pbtxt.Field) -> str:
        if not isinstance(field.value, str):
            raise self._error(field, f"expected a quoted string, got {_shown(field.value)}")
        return field.value

    def _enum(self, field: pbtxt.Field, allowed: tuple[str, ...]) -> str:
        if not isinstance(field.value, pbtxt.Identifier) or field.value.name not in allowed:
            raise self._error(field, f"expected one of {', '.join(allowed)}, got {_shown(field.value)}")
        return field.value.name

    def _message(self, field: pbtxt.Field) -> pbtxt.Message:
        if not isinstance(field.value, pbtxt.Message):
            raise self._error(field, f"expected a message {{ ... }}, got {_shown(field.value)}")
        return field.value

    def _error(self, field: pbtxt.Field, what: str) -> ConfigError:
        return ConfigError(f"{self.path}, line {field.line}: {field.name}: {what}")

    def _ignore(self, what: str, line: int, reason: str) -> None:
        self.ignored.append(f"{what} (line {line}: {reason})")

    def _located(self, exc: ValidationError) -> list[str]:
        """Pydantic's complaints about the manifest, named by the config.pbtxt field and line."""
        found = []
        for error, phrase in zip(exc.errors(include_url=False), problems(exc), strict=True):
            loc = tuple(str(p) for p in error["loc"])
            while loc and loc not in self.lines:
                loc = loc[:-1]
            if loc:
                name, line = self.lines[loc]
                phrase = f"line {line}: {name}: " + phrase.split(": ", 1)[1]
            found.append(phrase)
        return found


def _shown(value: pbtxt.Scalar | pbtxt.Message) -> str:
    if isinstance(value, pbtxt.Message):
        return "a message { ... }"
    if isinstance(value, pbtxt.Identifier):
        return value.name
    return repr(value)
