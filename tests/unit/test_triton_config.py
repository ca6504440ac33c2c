"""config.pbtxt mapped onto a Manifest: what is honoured, what is named as not, and precise errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.engine.triton_config import MAX_CONFIG_BYTES, TritonConfig, read_triton_config
from appliance.errors import ConfigError


def read(tmp_path: Path, text: str, model: str = "detector") -> TritonConfig:
    path = tmp_path / "config.pbtxt"
    path.write_text(text)
    return read_triton_config(path, model)


def test_batching_and_instances_are_honoured(tmp_path: Path) -> None:
    config = read(
        tmp_path,
        """
        name: "detector"
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        dynamic_batching {
          preferred_batch_size: [ 4, 8 ]
          preferred_batch_size: 16
          max_queue_delay_microseconds: 2500
        }
        instance_group [ { count: 2, kind: KIND_CPU }, { count: 1, kind: KIND_AUTO, name: "extra" } ]
        """,
    )
    batching = config.manifest.batching
    assert batching.max_batch_size == 16
    assert batching.preferred_batch_sizes == [4, 8, 16]
    assert batching.max_queue_delay_ms == 2.5
    assert config.manifest.instances == 3  # Triton sums its groups
    assert config.ignored == ()


def test_without_a_dynamic_batcher_no_request_waits_for_others(tmp_path: Path) -> None:
    config = read(tmp_path, "max_batch_size: 8\n")
    assert config.manifest.batching.max_batch_size == 8
    assert config.manifest.batching.max_queue_delay_ms == 0.0  # Triton's default scheduler never holds one
    assert read(tmp_path, "dynamic_batching { }").manifest.batching.max_queue_delay_ms == 0.0


def test_what_is_not_said_keeps_appliance_defaults(tmp_path: Path) -> None:
    config = read(tmp_path, 'backend: "onnxruntime"\ninstance_group [ { kind: KIND_CPU } ]\n')
    assert config.manifest.batching.max_batch_size is None  # the settings' default, or none for fixed shapes
    assert config.manifest.instances is None  # measured at start-up
    assert config.manifest.version is None


def test_max_batch_size_zero_turns_batching_off(tmp_path: Path) -> None:
    assert read(tmp_path, "max_batch_size: 0").manifest.batching.max_batch_size == 0


@pytest.mark.parametrize(
    ("policy", "version", "ignored"),
    [
        ("specific { versions: [ 2 ] }", 2, False),
        ("latest { num_versions: 1 }", None, False),
        ("latest { num_versions: 2 }", None, True),
        ("all { }", None, True),
        ("specific { versions: [ 1, 2 ] }", None, True),
    ],
)
def test_version_policy(tmp_path: Path, policy: str, version: int | None, ignored: bool) -> None:
    config = read(tmp_path, f"version_policy: {{ {policy} }}\n")
    assert config.manifest.version == version
    expected = "version_policy (line 1: appliance serves one version: the highest, or model.toml version)"
    assert config.ignored == ((expected,) if ignored else ())


def test_each_field_it_cannot_honour_is_named_with_its_line_and_what_to_do(tmp_path: Path) -> None:
    config = read(
        tmp_path,
        """name: "other"
platform: "tensorrt_plan"
default_model_filename: "model.plan"
input [ { name: "x", data_type: TYPE_FP32, dims: [ 3, 224, 224 ] } ]
output [ { name: "y", data_type: TYPE_FP32, dims: [ 10 ] } ]
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
dynamic_batching { priority_levels: 2, default_queue_policy { max_queue_size: 4 } }
instance_group [ { count: 1, kind: KIND_GPU, gpus: [ 0, 1 ] } ]
parameters { key: "intra_op_thread_count" value: { string_value: "1" } }
model_warmup [ { name: "w", batch_size: 1 } ]
""",
    )
    assert config.ignored == (
        "input (line 4: inputs come from the graph; "
        "narrow a dimension with model.toml [inputs.<name>] shape)",
        "output (line 5: outputs come from the graph)",
        "optimization (line 6: choose providers with model.toml providers and set their options in "
        "appliance.toml [providers.<name>])",
        "parameters (line 9: ONNX Runtime options go in appliance.toml [providers.<name>])",
        "model_warmup (line 10: appliance warms up every model.toml [batching] preferred_batch_sizes "
        "with zeros)",
        "name 'other' (line 1: the folder name 'detector' is served)",
        "platform 'tensorrt_plan' (line 2: appliance serves <version>/model.onnx on ONNX Runtime "
        "(platform 'onnxruntime_onnx'))",
        "default_model_filename 'model.plan' (line 3: appliance serves <version>/model.onnx on ONNX Runtime "
        "(default_model_filename 'model.onnx'))",
        "dynamic_batching.priority_levels (line 7: appliance has two priority classes, line and pool "
        "(parameters.priority))",
        "dynamic_batching.default_queue_policy (line 7: queues are bounded by appliance.toml [scheduler] "
        "line_queue_max_requests; deadlines come from model.toml slo_p99_ms or parameters.timeout)",
        "instance_group.gpus (line 8: the device is the provider's: "
        "appliance.toml [providers.<name>] device_id)",
        "instance_group.kind KIND_GPU (line 8: the provider order picks the device: model.toml providers = "
        '["cuda", "cpu"])',
    )
    assert config.manifest.instances == 1


def test_schedulers_it_does_not_have_are_named(tmp_path: Path) -> None:
    sequence = read(tmp_path, "sequence_batching { max_sequence_idle_microseconds: 5000000 }")
    assert sequence.ignored == ("sequence_batching (line 1: no equivalent: every request stands alone)",)
    ensemble = read(tmp_path, 'platform: "ensemble"\nensemble_scheduling { step [ { model_name: "a" } ] }')
    expected = "ensemble_scheduling (line 2: no equivalent: each model is served on its own)"
    assert ensemble.ignored[0] == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_batch_sise: 8", "line 1: max_batch_sise: unknown field in Triton's ModelConfig; did you mean"),
        ("rate: 8", "line 1: rate: unknown field in Triton's ModelConfig; expected one of backend, batch_"),
        ('max_batch_size: "8"', "line 1: max_batch_size: expected an integer, got '8'"),
        ("max_batch_size: 8.5", "line 1: max_batch_size: expected an integer, got 8.5"),
        ("max_batch_size: 8\nmax_batch_size: 4", "line 2: max_batch_size: given again (first on line 1)"),
        ("max_batch_size: -1", "line 1: max_batch_size: Input should be greater than or equal to 0, got -1"),
        (
            "max_batch_size: 1000000000000",
            "line 1: max_batch_size: Input should be less than or equal to 4096, got 1000000000000",
        ),
        (
            "max_batch_size: 8\ndynamic_batching { preferred_batch_size: [ 4, 16 ] }",
            "line 2: dynamic_batching: preferred_batch_sizes [16] exceed max_batch_size 8",
        ),
        (
            "dynamic_batching {\n preferred_batch_size: 0 }",
            "line 2: dynamic_batching.preferred_batch_size: batch sizes must be 1 to 4096; got [0]",
        ),
        (
            "dynamic_batching {\n\n max_queue_delay_microseconds: 1000000000000 }",
            "line 3: dynamic_batching.max_queue_delay_microseconds: Input should be less than or equal to "
            "600000, got 1000000000.0",
        ),
        (
            "dynamic_batching { max_queue_delay_microseconds: -5 }",
            "line 1: max_queue_delay_microseconds: expected microseconds >= 0, got -5",
        ),
        ("dynamic_batching { max_delay: 5 }", "line 1: max_delay: unknown field in dynamic_batching"),
        ("dynamic_batching: 5", "line 1: dynamic_batching: expected a message { ... }, got 5"),
        ("instance_group [ { kind: KIND_TPU } ]", "line 1: kind: expected one of KIND_AUTO, KIND_GPU"),
        ('instance_group [ { kind: "KIND_CPU" } ]', "line 1: kind: expected one of KIND_AUTO"),
        ("instance_group [ { count: 0 } ]", "line 1: instance_group.count: Input should be greater than"),
        ("instance_group [ { count: 65 } ]", "line 1: instance_group.count: Input should be less than or"),
        ("platform: onnxruntime_onnx", "line 1: platform: expected a quoted string, got onnxruntime_onnx"),
        ("version_policy { specific { versions: [0] } }", "line 1: version_policy.specific.versions: Input"),
        ("version_policy { newest { } }", "line 1: newest: unknown field in version_policy"),
        ("max_batch_size 8", "line 1: expected ':' or '{' after field 'max_batch_size', got '8'"),
    ],
)
def test_malformed_configs_name_the_file_the_line_and_what_was_expected(
    tmp_path: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError) as raised:
        read(tmp_path, text)
    assert str(raised.value).startswith(f"{tmp_path / 'config.pbtxt'}, {message}")


def test_unreadable_configs_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "config.pbtxt"
    path.write_bytes(b'name: "\xff"')
    with pytest.raises(ConfigError, match="cannot be read as UTF-8 text"):
        read_triton_config(path, "detector")
    path.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match=f"larger than {MAX_CONFIG_BYTES} bytes"):
        read_triton_config(path, "detector")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "max_batch_size: " + "9" * 5000,
            "line 1: max_batch_size: integer " + "9" * 20 + "... (5000 characters)",
        ),
        (
            "\ndynamic_batching { preferred_batch_size: [ 1, 0x" + "f" * 17 + " ] }",
            "line 2: preferred_batch_size: integer 0x" + "f" * 17,
        ),
        (
            "instance_group [ { count: 18446744073709551616 } ]",
            "line 1: count: integer 18446744073709551616",
        ),
        (
            "max_batch_size: -0" + "7" * 30,
            "line 1: max_batch_size: integer 0" + "7" * 19 + "... (31 characters)",
        ),
    ],
)
def test_an_integer_past_64_bits_names_the_file_line_and_field(tmp_path: Path, text: str, where: str) -> None:
    """int() refuses more than 4300 decimal digits with a ValueError, which escaped as a 500 of
    /v2/repository/index: every protobuf integer is 64 bits at most, and a longer one is this error."""
    with pytest.raises(ConfigError) as caught:
        read(tmp_path, text)
    expected = f"{tmp_path / 'config.pbtxt'}, {where} is out of range; expected at most 64 bits "
    assert str(caught.value) == expected + "(18446744073709551615)"
    leading_zeros = "max_batch_size: 0x" + "0" * 5000 + "8"
    assert read(tmp_path, leading_zeros).manifest.batching.max_batch_size == 8
