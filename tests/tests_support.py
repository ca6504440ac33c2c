"""Small helpers shared by tests."""

from __future__ import annotations

from pathlib import Path

import modelzoo
import numpy as np
import onnx
from hypothesis import strategies as st

from appliance.engine.model import LoadedModel
from appliance.engine.repository import Repository
from appliance.providers.registry import Registry
from appliance.scheduler.runner import ModelScheduler, SchedulerConfig
from appliance.settings import ModelSettings

# Any JSON value, nested a little: what a client might put where a tensor's data belongs.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=20,
)


def buyers_file(tmp_path: Path, **entries: str) -> Path:
    """<tmp_path>/buyers.toml with one buyer per entry, its token `<name>-secret`, and the entry's extra
    TOML lines."""
    from appliance.platform.buyers import token_digest

    path = tmp_path / "buyers.toml"
    path.write_text(
        "".join(
            f'[buyers.{name}]\ntoken_sha256 = "{token_digest(name + "-secret")}"\n{extra}\n'
            for name, extra in entries.items()
        )
    )
    return path


def strip_scheme(url: str) -> str:
    return url.split("://", 1)[1]


def load_model(tmp_path: Path, model: onnx.ModelProto, manifest: str = "", name: str = "m") -> LoadedModel:
    """A LoadedModel on the CPU provider, one thread per call, warmed up, from <tmp_path>/repo/<name>."""
    modelzoo.write(tmp_path / "repo", name, model, manifest=manifest)
    loaded = load_written(tmp_path, name)
    loaded.warm_up(2)
    return loaded


def load_written(
    tmp_path: Path, name: str = "m", settings: ModelSettings | None = None, **options: object
) -> LoadedModel:
    """The model already in <tmp_path>/repo/<name>, loaded on the CPU provider, one thread per call, not
    warmed up; `options` go to LoadedModel.load."""
    registry = Registry.discover()
    return LoadedModel.load(
        Repository(tmp_path / "repo").source(name),
        registry=registry,
        settings=settings or ModelSettings(),
        provider_configs=registry.configs({}),
        cache_dir=tmp_path / "cache",
        threads_per_call=1,
        **options,  # type: ignore[arg-type]
    )


class FakeClock:
    """A scheduler's clock that moves only when a test sets `now`."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def started(model: LoadedModel, clock=None, **config) -> ModelScheduler:
    """A started ModelScheduler of `model` with SchedulerConfig(**config), on `clock` where given."""
    scheduler = ModelScheduler(model, SchedulerConfig(**config), **({"clock": clock} if clock else {}))
    scheduler.start()
    return scheduler


def x(rows: int = 1, value: float = 1.0) -> dict[str, np.ndarray]:
    """Inputs of the `batchable` test model: `rows` rows of four `value`s."""
    return {"x": np.full((rows, 4), value, np.float32)}
