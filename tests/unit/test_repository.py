"""The repository on disk: bare model.onnx, model.toml over config.pbtxt, bounds, a missing root."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import modelzoo
import pytest

from appliance.engine.repository import Repository, file_digest
from appliance.errors import ConfigError, ModelLoadError
from appliance.ota.snapshot import digests_on_disk

TRITON_CONFIG = """
name: "detector"
platform: "onnxruntime_onnx"
max_batch_size: 4
input [ { name: "x", data_type: TYPE_FP32, dims: [ 4 ] } ]
dynamic_batching { preferred_batch_size: [ 2, 4 ], max_queue_delay_microseconds: 500 }
instance_group [ { count: 1, kind: KIND_GPU } ]
"""


def bare(repo: Path, name: str) -> Path:
    """<repo>/<name>/model.onnx with no version folder."""
    (repo / name).mkdir(parents=True)
    path = repo / name / "model.onnx"
    path.write_bytes(modelzoo.batchable().SerializeToString())
    return path


def test_a_bare_model_onnx_is_version_1_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = bare(tmp_path, "plain")
    repository = Repository(tmp_path)
    assert repository.names() == ["plain"] and repository.has("plain")
    with caplog.at_level(logging.WARNING):
        source = repository.source("plain")
    assert (source.version, source.versions, source.is_bare) == (1, (1,), True)
    assert source.path == path
    assert source.samples_path == tmp_path / "plain" / "samples.npz"
    assert f"model plain: {path} has no version folder; serving it as version 1 (move it to " in caplog.text
    assert digests_on_disk(tmp_path)["plain"].sha256 == file_digest(path)  # ota finds the same file


def test_version_folders_win_over_a_bare_model_onnx(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = bare(tmp_path, "both")
    served = modelzoo.write(tmp_path, "both", modelzoo.batchable(), version=3)
    with caplog.at_level(logging.WARNING):
        source = Repository(tmp_path).source("both")
    assert (source.version, source.path, source.is_bare) == (3, served, False)
    assert f"model both: {path} is ignored; version folders [3] are served" in caplog.text


def test_a_pinned_version_a_bare_model_lacks_is_a_load_error(tmp_path: Path) -> None:
    bare(tmp_path, "plain")
    (tmp_path / "plain" / "model.toml").write_text("version = 2\n")
    with pytest.raises(ModelLoadError, match=r"model 'plain': version 2 is pinned; available: \[1\]"):
        Repository(tmp_path).source("plain")


def test_config_pbtxt_is_read_and_what_it_cannot_honour_is_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    modelzoo.write(tmp_path, "detector", modelzoo.batchable())
    config = tmp_path / "detector" / "config.pbtxt"
    config.write_text(TRITON_CONFIG)
    with caplog.at_level(logging.WARNING):
        manifest = Repository(tmp_path).source("detector").manifest
    assert manifest.batching.max_batch_size == 4
    assert manifest.batching.preferred_batch_sizes == [2, 4]
    assert manifest.batching.max_queue_delay_ms == 0.5
    assert manifest.instances == 1
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"model detector: {config} fields not honoured: "
        "input (line 5: inputs come from the graph; "
        "narrow a dimension with model.toml [inputs.<name>] shape); "
        "instance_group.kind KIND_GPU (line 7: the provider order picks the device: model.toml providers = "
        '["cuda", "cpu"])'
    ]


def test_a_folder_with_only_config_pbtxt_is_listed_and_says_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.pbtxt").write_text("max_batch_size: 8\n")
    repository = Repository(tmp_path)
    assert repository.names() == ["empty"]
    with pytest.raises(ModelLoadError, match=r"model 'empty' has no <version>/model\.onnx under"):
        repository.source("empty")


def test_model_toml_wins_over_config_pbtxt_and_the_log_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    modelzoo.write(tmp_path, "detector", modelzoo.batchable(), manifest="[batching]\nmax_batch_size = 2\n")
    (tmp_path / "detector" / "config.pbtxt").write_text("this is { not valid")
    with caplog.at_level(logging.WARNING):
        manifest = Repository(tmp_path).source("detector").manifest
    assert manifest.batching.max_batch_size == 2
    config = tmp_path / "detector" / "config.pbtxt"
    assert (
        f"model detector: model.toml and {config} both present; model.toml wins, config.pbtxt is ignored"
        in (caplog.text)
    )


def test_a_malformed_config_pbtxt_makes_only_that_model_fail(tmp_path: Path) -> None:
    modelzoo.write(tmp_path, "good", modelzoo.batchable())
    modelzoo.write(tmp_path, "bad", modelzoo.batchable())
    (tmp_path / "bad" / "config.pbtxt").write_text('name: "bad"\nmax_batch_size 8\n')
    index = Repository(tmp_path).index()
    assert index["good"].name == "good"  # type: ignore[union-attr]
    assert isinstance(index["bad"], ConfigError)
    assert str(index["bad"]) == (
        f"{tmp_path / 'bad' / 'config.pbtxt'}, line 2: "
        "expected ':' or '{' after field 'max_batch_size', got '8'"
    )


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (
            "[batching]\nmax_batch_size = 1e12\n",
            "'batching.max_batch_size': Input should be less than or equal to 4096",
        ),
        ("[batching]\nmax_batch_size = 8\npreferred_batch_sizes = [4, 16]\n", "[16] exceed max_batch_size 8"),
        (
            "[batching]\nmax_batch_size = 0\npreferred_batch_sizes = [1]\n",
            "[1] exceed max_batch_size 0 (0 disables",
        ),
        ("[batching]\npreferred_batch_sizes = [0, 8192]\n", "batch sizes must be 1 to 4096; got [0, 8192]"),
        ("[batching]\npreferred_batch_sizes = " + str(list(range(1, 18))) + "\n", "at most 16 items"),
        (
            "[batching]\nmax_queue_delay_ms = 1e9\n",
            "'batching.max_queue_delay_ms': Input should be less than",
        ),
        ("slo_p99_ms = 3.6e6\n", "'slo_p99_ms': Input should be less than or equal to 600000"),
        ("instances = 1000\n", "'instances': Input should be less than or equal to 64, got 1000"),
    ],
)
def test_batching_values_are_bounded(tmp_path: Path, manifest: str, message: str) -> None:
    modelzoo.write(tmp_path, "m", modelzoo.batchable(), manifest=manifest)
    with pytest.raises(ConfigError) as raised:
        Repository(tmp_path).source("m")
    assert str(raised.value).startswith(f"{tmp_path / 'm' / 'model.toml'}: ")
    assert message in str(raised.value)


def test_a_model_toml_larger_than_any_manifest_is_refused_unread(tmp_path: Path) -> None:
    """Regression: model.toml was read whole; root reads it too (`appliance ota snapshot`), and a sparse
    file of terabytes in the service user's repository would have held the update."""
    modelzoo.write(tmp_path, "m", modelzoo.batchable())
    with (tmp_path / "m" / "model.toml").open("wb") as stream:
        stream.truncate(1 << 40)  # sparse: no disk used
    with pytest.raises(ConfigError, match="larger than 1048576 bytes; expected a manifest of a few KiB"):
        Repository(tmp_path).source("m")


def test_open_refuses_a_repository_that_is_not_there(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError, match=f"^{re.escape(f'model repository {tmp_path}/nowhere does not exist')}$"
    ):
        Repository.open(tmp_path / "nowhere")
    (tmp_path / "file").write_text("")
    with pytest.raises(
        ConfigError, match=f"^{re.escape(f'model repository {tmp_path}/file is not a directory')}$"
    ):
        Repository.open(tmp_path / "file")
    assert Repository.open(tmp_path).names() == []  # an empty folder is a repository with no models yet


@contextlib.contextmanager
def unprivileged() -> Iterator[None]:
    """Root reads any folder: checks of file modes run with the effective uid of nobody."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_model_folder_is_that_models_error_not_the_repositorys() -> None:
    repo = Path(tempfile.mkdtemp(prefix="appliance-repo-"))  # tmp_path is root's own 0700 folder
    try:
        repo.chmod(0o755)
        bare(repo, "good").parent.chmod(0o755)
        (repo / "bad").mkdir(mode=0o000)
        with unprivileged():
            repository = Repository(repo)
            assert repository.names() == ["bad", "good"]
            assert repository.has("bad")
            index = repository.index()
        assert index["good"].version == 1
        assert isinstance(index["bad"], ModelLoadError)
        assert "cannot be read (Permission denied)" in str(index["bad"])
    finally:
        (repo / "bad").chmod(0o700)
        for path in sorted(repo.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        repo.rmdir()


def version_folder(repo: Path, name: str, folder: str) -> Path:
    (repo / name / folder).mkdir(parents=True)
    path = repo / name / folder / "model.onnx"
    path.write_bytes(modelzoo.batchable().SerializeToString())
    return path


def test_version_folders_are_canonical_numbers_and_others_are_named_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`007/` is not version 7 (the load would read `7/`), nor `01/` a second version 1: as in Triton,
    a folder name with leading zeros, `0` or a number past int64 is ignored, with one warning naming it."""
    served = version_folder(tmp_path, "both", "1")
    version_folder(tmp_path, "both", "01")
    version_folder(tmp_path, "padded", "007")
    version_folder(tmp_path, "padded", "0")
    version_folder(tmp_path, "huge", "9" * 20)
    repository = Repository(tmp_path)
    assert repository.names() == ["both", "huge", "padded"]  # listed, so the reason shows in the index
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            source = repository.source("both")
            assert (source.versions, source.path) == ((1,), served)
    assert caplog.text.count("model both: version folders ['01'] under") == 1
    assert "are ignored: a version is a positive integer without leading zeros" in caplog.text
    with pytest.raises(ModelLoadError, match=r"has no <version>/model.onnx under .*padded \(ignored: 0, 007"):
        repository.source("padded")
    with pytest.raises(ModelLoadError, match=r"\(ignored: 9{20}: not a version number as written\)"):
        repository.source("huge")


@pytest.mark.parametrize(
    ("manifest", "message"),
    [
        (
            "version = " + "9" * 5000,
            "line 1: version = 9{20}...: an integer of 5000 digits; expected at most 64",
        ),
        ('description = "x"\nversion = 1_' + "0" * 5000, "line 2: version = 1_0{18}...: an integer of 5002"),
        ("version = 0x" + "f" * 5000, "'version': an integer of 20000 bits; expected at most 64 bits"),
        ("[inputs.x]\nshape = [-1, 0o" + "7" * 30 + "]", "'inputs.x.shape\\[1\\]': an integer of 90 bits"),
    ],
)
def test_an_integer_too_long_in_model_toml_is_that_models_config_error(
    tmp_path: Path, manifest: str, message: str
) -> None:
    """int() refuses more than 4300 digits with a ValueError, which tomllib lets through: it escaped
    Repository.index() and made /v2/repository/index a 500."""
    modelzoo.write(tmp_path, "long", modelzoo.batchable(), manifest=manifest)
    modelzoo.write(tmp_path, "good", modelzoo.batchable())
    index = Repository(tmp_path).index()
    assert isinstance(index["long"], ConfigError)
    assert re.search(message, str(index["long"])), str(index["long"])
    assert str(index["long"]).startswith(f"{tmp_path / 'long' / 'model.toml'}: ")
    assert index["good"].version == 1


@contextlib.contextmanager
def counted_parses() -> Iterator[list[str]]:
    """The sources config.pbtxt's parser is given while the block runs."""
    from appliance.engine import pbtxt

    parsed: list[str] = []
    original = pbtxt.parse

    def parse(text: str, source: str) -> pbtxt.Message:
        parsed.append(Path(source).parent.name)
        return original(text, source)

    pbtxt.parse = parse  # type: ignore[assignment]
    try:
        yield parsed
    finally:
        pbtxt.parse = original  # type: ignore[assignment]


def test_index_parses_a_config_again_only_when_its_bytes_change(tmp_path: Path) -> None:
    """/v2/repository/index reads every model's config on each call, and the parser takes about a second
    per MiB: what did not change is not parsed again, a broken config included, and a change is seen
    even where size and mtime stay the same."""
    for name in ("a", "b"):
        modelzoo.write(tmp_path, name, modelzoo.batchable())
    config = tmp_path / "a" / "config.pbtxt"
    config.write_text("max_batch_size: 4\n")
    (tmp_path / "b" / "config.pbtxt").write_text("max_batch_size: [\n")
    repository = Repository(tmp_path)
    with counted_parses() as parsed:
        for _ in range(3):
            index = repository.index()
            assert index["a"].manifest.batching.max_batch_size == 4
            assert "line 2: expected a value" in str(index["b"])
        assert sorted(parsed) == ["a", "b"]
        before = config.stat()
        config.write_text("max_batch_size: 2\n")  # same size; same mtime below
        os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))
        assert repository.index()["a"].manifest.batching.max_batch_size == 2
        assert sorted(parsed) == ["a", "a", "b"]


def test_the_parse_cache_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.engine import repository as repository_module

    monkeypatch.setattr(repository_module, "CACHE_ENTRIES", 2)
    for name in ("a", "b", "c"):
        modelzoo.write(tmp_path, name, modelzoo.batchable())
        (tmp_path / name / "config.pbtxt").write_text("max_batch_size: 4\n")
    repository = Repository(tmp_path)
    with counted_parses() as parsed:
        repository.index()
        repository.index()  # three configs through two places, least recently used first out: all again
    assert parsed == ["a", "b", "c"] * 2
    monkeypatch.setattr(repository_module, "CACHE_BYTES", 10)
    with counted_parses() as parsed:
        repository.index()
        repository.index()
    assert parsed == ["a", "b", "c"] * 2  # 18 bytes each: nothing is kept


@pytest.mark.parametrize(
    ("onnx_type", "says"),
    [
        ("tensor(bfloat16)", "tensor 'x' is BF16, which this server does not serve (no numpy bf16)"),
        ("tensor(float8e4m3fn)", "tensor 'x' has type tensor(float8e4m3fn), which the protocol cannot carry"),
    ],
)
def test_a_tensor_type_not_served_names_why(onnx_type: str, says: str) -> None:
    """The protocol has BF16 (Triton carries it): refusing it is this server's limit, and says so."""
    from types import SimpleNamespace

    from appliance.engine.signature import _spec

    with pytest.raises(ModelLoadError) as refused:
        _spec(SimpleNamespace(name="x", type=onnx_type, shape=[1, 4]))
    assert str(refused.value) == says
