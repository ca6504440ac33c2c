"""The contracts other people rely on (DESIGN.md): CLI verbs, HTTP routes, the provider API."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastapi import FastAPI

from appliance.cli import build_parser
from appliance.dataplane.plane import DataPlane
from appliance.engine.repository import Repository
from appliance.providers.base import Probe, Provider, SessionContext
from appliance.providers.registry import Registry
from appliance.scheduler.hub import ModelHub
from appliance.server.app import create_app
from appliance.server.grpc import messages
from appliance.server.inference import ROUTE
from appliance.settings import Settings


def _verbs(parser: argparse.ArgumentParser, prefix: str = "") -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.add(f"{prefix}{name}")
                found |= _verbs(sub, f"{prefix}{name} ")
    return found


def test_cli_verbs() -> None:
    assert _verbs(build_parser()) >= {
        "serve",
        "providers",
        "models",
        "models check",
        "config-schema",
        "provision",
        "ota",
        "pool",
        "pool watch",
        "pool submit",
        "status",
        "reload",
        "drain",
        "resume",
        "bench",
    }
    ota = build_parser().parse_args(["ota", "gate"])
    assert ota.verb == "ota"
    for verb in ("gate", "drain", "snapshot", "verify", "commit", "rollback"):
        build_parser().parse_args(["ota", verb])


def test_http_routes(tmp_path: Path) -> None:
    settings = Settings(models={"repository": tmp_path}, system={"runtime_dir": tmp_path})
    app = create_app(
        DataPlane(ModelHub(settings, Registry.discover(), Repository(tmp_path)), settings), settings
    )
    fastapi_app = app.app
    assert isinstance(fastapi_app, FastAPI)
    paths = fastapi_app.openapi()["paths"]
    routes = {(method.upper(), path) for path, methods in paths.items() for method in methods}
    assert routes >= {
        ("GET", "/v2"),
        ("GET", "/v2/health/live"),
        ("GET", "/v2/health/ready"),
        ("GET", "/v2/models/{name}"),
        ("GET", "/v2/models/{name}/versions/{version}"),
        ("GET", "/v2/models/{name}/ready"),
        ("GET", "/v2/models/{name}/versions/{version}/ready"),
        ("GET", "/v2/models/{name}/config"),
        ("GET", "/v2/models/{name}/stats"),
        ("GET", "/v2/models/stats"),
        ("POST", "/v2/repository/index"),
        ("POST", "/v2/repository/models/{name}/load"),
        ("POST", "/v2/repository/models/{name}/unload"),
        ("GET", "/metrics"),
        ("GET", "/capacity"),
        ("GET", "/v2/systemsharedmemory/status"),
        ("GET", "/v2/systemsharedmemory/region/{name}/status"),
        ("POST", "/v2/systemsharedmemory/region/{name}/register"),
        ("POST", "/v2/systemsharedmemory/unregister"),
        ("POST", "/v2/systemsharedmemory/region/{name}/unregister"),
        ("GET", "/v2/cudasharedmemory/status"),
        ("GET", "/v2/cudasharedmemory/region/{name}/status"),
        ("POST", "/v2/cudasharedmemory/region/{name}/register"),
        ("POST", "/v2/cudasharedmemory/unregister"),
        ("POST", "/v2/cudasharedmemory/region/{name}/unregister"),
    }
    assert ROUTE.match("/v2/models/m/infer") and ROUTE.match("/v2/models/m/versions/3/infer")


def test_grpc_methods() -> None:
    """inference.GRPCInferenceService as Triton's, less TraceSetting and LogSettings."""
    service = messages.POOL.FindServiceByName(messages.SERVICE)
    assert {m.name for m in service.methods} == {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer",
        "ModelStreamInfer", "ModelConfig", "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad",
        "RepositoryModelUnload", "SystemSharedMemoryStatus", "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister", "CudaSharedMemoryStatus", "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
    }  # fmt: skip
    assert build_parser().parse_args(["serve", "--grpc-port", "-1"]).grpc_port == -1


def test_provider_api() -> None:
    assert {"name", "ep_name", "config_model", "is_default"} <= set(Provider.__annotations__)
    assert {"probe", "ort_options", "library_path"} <= {n for n in dir(Provider) if not n.startswith("_")}
    assert Probe(False, "why").reason == "why"
    assert set(SessionContext.__dataclass_fields__) == {"model_name", "model_digest", "cache_dir"}
