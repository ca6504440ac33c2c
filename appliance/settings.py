"""Settings: defaults < TOML file < $CREDENTIALS_DIRECTORY secrets < APPLIANCE_ env < CLI flags."""

from __future__ import annotations

import contextvars
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from appliance.config_sources import (
    broker_url,
    deep_copy,
    describe,
    node_level,
    read_credentials,
    read_environ,
    read_toml,
    runtime_dir,
    section,
    systemd_dir,
    topic_prefix,
)
from appliance.errors import ConfigError
from appliance.ota_settings import OtaSettings

SYSTEM_CONFIG_FILE = Path("/etc/appliance/appliance.toml")
INSTALLED_MODELS = Path("/var/lib/appliance/models")  # what `appliance provision` configures by default


def _bundled_models() -> Path:
    """The reference models: package data in a wheel, the top-level models/ in a source checkout."""
    packaged = Path(__file__).resolve().parent / "bundled_models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "models"


BUNDLED_MODELS = _bundled_models()


class ServerSettings(BaseModel):
    model_config = section("HTTP and gRPC server")

    host: str = Field("127.0.0.1", description="Address the HTTP API listens on; 0.0.0.0 exposes it.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the HTTP API (0 picks a free one).")
    max_body_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest request body accepted; larger ones get 413."
    )
    max_inflating_bytes: int = Field(
        64 * 1024 * 1024,
        gt=0,
        description="What compressed bodies being read (Content-Encoding) may inflate to, all together; "
        "beyond it 503 + Retry-After. A few KB of gzip can become max_body_bytes.",
    )
    api_token: SecretStr | None = Field(
        None,
        description="If set, every route but health and metrics requires 'Authorization: Bearer <token>'.",
    )

    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long accepted requests may take to finish."
    )
    retry_after_s: float = Field(
        1.0, gt=0, description="Retry-After sent with 503 when not ready or draining."
    )
    strict_readiness: bool = Field(
        True,
        description="As Triton's --strict-readiness: /v2/health/ready is 200 only while every model is "
        "READY. false: 200 while at least one model is READY. Never 200 while no model serves.",
    )
    access_log: bool = Field(
        False, description="Log one line per HTTP request: client, method, path, HTTP version, status."
    )
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest HTTP request line plus headers; beyond it 431 and the connection closes.",
    )
    header_timeout_s: float = Field(
        10.0, gt=0, description="Time a client has to send a whole request line and headers; then 408."
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time a client has to send a whole request body once its headers are in; then 408. "
        "64 MiB at 10 Mbit/s takes 54 s.",
    )
    idle_timeout_s: float = Field(
        30.0, gt=0, description="An idle keep-alive connection is closed after this long."
    )
    max_connections: int = Field(
        1024, ge=1, description="Open HTTP connections in all; beyond it 503 and the connection closes."
    )
    max_connections_per_peer: int = Field(
        256,
        ge=1,
        description="Open HTTP connections from one client address, so one client cannot lock out the "
        "others (the camera); beyond it 503 and the connection closes. A quarter of max_connections by "
        "default: room for a client's connection pool (the benches open 64 to 100) and for three more.",
    )
    max_tensor_rank: int = Field(
        16, ge=1, le=32, description="Most dimensions a request tensor may have (vision models use 4 or 5)."
    )
    max_tensor_elements: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="Most elements a request tensor may have, counting a zero dimension as 1 so that "
        "no shape can ask for a huge buffer; checked before anything is allocated. The default holds "
        "any tensor a 64 MiB body can carry.",
    )
    max_bytes_elements: int = Field(
        1024 * 1024,
        ge=1,
        description="Most elements a BYTES (string) request tensor may have; beyond it 413. Each element "
        "is a Python object of 33 bytes or more for the request's life, so a body of short strings takes "
        "ten times its size in memory; the default keeps one tensor's strings near 64 MiB.",
    )
    grpc_port: int = Field(
        8001,
        ge=-1,
        le=65535,
        description="TCP port of KServe v2 over gRPC (inference.GRPCInferenceService, as Triton's) on "
        "server.host: 8001 as Triton; 0 picks a free one; -1 turns gRPC off. Its messages are bounded by "
        "max_body_bytes, as HTTP bodies are.",
    )
    max_shm_regions: int = Field(
        64,
        ge=0,
        description="System shared-memory regions (Triton's extension, for local trusted clients) that "
        "may be registered at once; one more is refused with 413. 0 turns shared memory off.",
    )
    max_shm_bytes: int = Field(
        1024 * 1024 * 1024,
        ge=0,
        description="Bytes all registered shared-memory regions may map together; a registration past "
        "it is refused with 413. The memory is the client's; the service maps it, never allocates it.",
    )

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty: no client could send it; leave it unset for no token")
        return value


class ModelSettings(BaseModel):
    model_config = section("Models")

    repository: Path = Field(
        BUNDLED_MODELS,
        description="Model repository: <repo>/<model>/<version>/model.onnx; it must exist at start-up.",
    )
    providers: list[str] | None = Field(
        None,
        description='Execution provider preference, e.g. ["cuda", "openvino", "cpu"]; '
        "unset picks every available accelerator in the registry's order, then cpu.",
    )
    # The bounds are model.toml's (engine/manifest.py says why), so a typo here fails at start-up.
    default_slo_p99_ms: float = Field(
        100.0, gt=0, le=600_000, description="Latency objective for models whose model.toml sets none."
    )
    default_max_batch_size: int = Field(
        8,
        ge=1,
        le=4096,
        description="Row limit per batch for batchable models whose model.toml sets none (at most 4096).",
    )
    default_max_queue_delay_ms: float = Field(
        2.0, ge=0, le=600_000, description="Longest a request waits for others to fill a batch, by default."
    )
    warmup_runs: int = Field(
        3, ge=1, description="Timed runs per warm-up batch size; they seed the latency profile."
    )
    load_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Longest one model may take to load, warm up and be measured; past it the model is "
        "UNAVAILABLE and the next loads (the stuck load cannot be stopped: that model loads again only "
        "after a restart). A first TensorRT engine build takes minutes.",
    )
    run_memory_bytes: Annotated[int, Field(ge=1 << 20)] | Literal["auto", "off"] = Field(
        "off",
        description="Bytes of CPU memory ONNX Runtime's runs may hold at once, all models of a process "
        "together (the pool process of each model has its own): a buffer a request's values make larger "
        "is refused (413 over this bound, 503 while other runs hold the memory) before the system is "
        "asked for it. Bounded sessions prepack no weights (ORT reserves those without a check); what runs "
        "hold counts twice while a model reloads: set it well above what the models' runs need. "
        "auto: 3/4 of the memory available when the first model loads (fixed then); off (the default): "
        "no bound (the OOM killer's).",
    )


class SchedulerSettings(BaseModel):
    model_config = section("Scheduler")

    instances: int = Field(
        0, ge=0, description="Worker threads per model sharing one session; 0 measures at start-up."
    )
    cpu_threads: int = Field(
        0, ge=0, description="CPU threads ORT may use per model, split across instances; 0 = all cores."
    )
    line_queue_max_requests: int = Field(
        512, ge=1, description="Bound of the line (local) queue per model; beyond it 503."
    )
    pool_queue_max_requests: int = Field(
        256, ge=1, description="Bound of the pool (MQTT job) queue per model; beyond it refused."
    )
    profile_window_batches: int = Field(
        256, ge=8, description="Batches kept per model for the online latency fit."
    )
    pool_process: bool = Field(
        True,
        description="With a pool link, run pool work on CPU providers in one child process per model "
        "at idle CPU priority: no GIL shared with line work, and a crash or OOM on a pool job ends only "
        "that child. Costs a second copy of each model in memory.",
    )
    pool_cpu_priority: Literal["idle", "normal"] = Field(
        "idle",
        description="CPU priority of pool compute: idle (SCHED_IDLE, else nice 19) takes only CPU "
        "nothing else on the box wants; normal competes at the service's own priority, for a box that "
        "sells all of its time to the pool (or a test box that something else keeps busy). Line work "
        "goes first in the queues either way.",
    )
    solo_session: bool = Field(
        True,
        description="Where K > 1 workers split the cores (each call gets cores / K threads), a request "
        "that runs alone runs on a second session with every core the model may use: low latency at "
        "low load, K's throughput under load. Host-core providers only; costs a second copy of the "
        "model in memory (logged, and in the model's config).",
    )


class PoolSettings(BaseModel):
    model_config = section("Pool link (MQTT)")

    broker: str | None = Field(
        None, description="mqtt://host:port or mqtts://host:port; unset runs without a pool link."
    )
    site: str = Field("default", description="Site name in the topic root ecp/v1/<site>/<node>/.")
    node_id: str = Field(
        default_factory=socket.gethostname, description="Node name in the topic root (default: hostname)."
    )
    topic_root: str = Field("ecp/v1", description="First topic levels before <site>/<node>/.")
    report_interval_s: float = Field(30.0, gt=0, description="Capacity report period, jittered by +-10%.")
    capacity_change_pct: float = Field(
        20.0, gt=0, description="A report goes out at once when a model's spare capacity moves by more."
    )
    keepalive_s: int = Field(30, ge=5, description="MQTT keep-alive interval.")
    mqtt_version: Literal["auto", "5", "3.1.1"] = Field(
        "auto",
        description="auto tries MQTT 5, then 3.1.1 if the broker refuses it; pin 3.1.1 for a broker "
        "that only hangs up on MQTT 5 after a timeout.",
    )
    will_delay_s: int = Field(5, ge=0, description="MQTT 5 Will Delay before 'offline' is published.")
    session_expiry_s: int = Field(
        60,
        ge=0,
        description="MQTT 5 session the broker keeps after a lost connection: jobs sent meanwhile wait "
        "there until their own expiry (0: none; MQTT 3.1.1 always starts clean).",
    )
    reconnect_min_s: float = Field(1.0, gt=0, description="First reconnect delay; doubles, jittered.")
    reconnect_max_s: float = Field(60.0, gt=0, description="Longest reconnect delay.")
    stop_timeout_s: float = Field(
        5.0, gt=0, description="On stop, how long the last messages may take to be acknowledged."
    )
    username: str | None = Field(None, description="MQTT user name.")
    password: SecretStr | None = Field(
        None, description="MQTT password; also read from $CREDENTIALS_DIRECTORY/pool.password."
    )
    ca_file: Path | None = Field(None, description="CA bundle to verify an mqtts:// broker.")
    cert_file: Path | None = Field(None, description="Client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="Client private key for mutual TLS.")
    reserved_pct: float = Field(
        20.0, ge=0, le=100, description="Share of measured capacity kept for line traffic."
    )
    accept_jobs: bool = Field(True, description="Take inference jobs from the pool on spare capacity.")
    max_interference_ms: float = Field(
        10.0, gt=0, description="Longest predicted duration of one batch of pool work."
    )
    max_pending_responses: int = Field(
        1000, ge=0, description="Job responses and events kept while the broker is unreachable."
    )
    remote_control: bool = Field(
        False,
        description="Answer cmd/drain, cmd/resume, cmd/rebirth (and later control verbs) from the pool. "
        "Off: only cmd/infer is accepted; the others are refused with 403.",
    )
    reply_topic_prefix: str | None = Field(
        None,
        description='If set, a job\'s reply topic must start with it (e.g. "_reply/"); others are '
        "refused and reported on evt.",
    )
    max_packet_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest MQTT packet the node takes (MQTT 5 Maximum Packet Size; larger jobs are "
        "refused on 3.1.1).",
    )
    max_jobs_per_sender_per_s: float = Field(
        200.0,
        gt=0,
        description="Jobs per second one sender (its reply topic without the last level) may start; "
        "beyond it 429-style refusals.",
    )

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        return broker_url(value)

    @field_validator("site", "node_id")
    @classmethod
    def _node_level(cls, value: str) -> str:
        return node_level(value)

    @field_validator("topic_root")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        return topic_prefix(value)


class SystemSettings(BaseModel):
    model_config = section("System")

    state_dir: Path = Field(
        default_factory=lambda: systemd_dir(
            "STATE_DIRECTORY", "/var/lib/appliance", "~/.local/state/appliance"
        ),
        description="Persistent state (pool session counter, OTA snapshots); $STATE_DIRECTORY wins in the "
        "service (not in `appliance ota`).",
    )
    cache_dir: Path = Field(
        default_factory=lambda: systemd_dir("CACHE_DIRECTORY", "/var/cache/appliance", "~/.cache/appliance"),
        description="Caches (compiled engines); $CACHE_DIRECTORY wins in the service (not in "
        "`appliance ota`).",
    )
    runtime_dir: Path = Field(
        default_factory=runtime_dir,
        description="Runtime files (admin socket): $RUNTIME_DIRECTORY (in the service, not in `appliance "
        "ota`), else /run/appliance where this "
        "user may use it, else $XDG_RUNTIME_DIR/appliance, else ~/.local/state/appliance/run. Never a "
        "predictable folder in /tmp.",
    )
    admin_socket: str | None = Field(
        None,
        description="Admin socket path (status, drain, resume, reload; `appliance ota` uses it). Unset: "
        "<runtime_dir>/admin.sock. Empty: no admin socket.",
    )
    watchdog_hang_s: float = Field(
        30.0, gt=0, description="A line worker busy on one batch longer than this counts as hung."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="Least severe log level written (--log-level)."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one human line per record; json: one JSON object per line (time, level, "
        "logger, message, and fields) for journald and log shippers.",
    )

    @property
    def admin_socket_path(self) -> Path | None:
        """Where the admin socket is, or None when it is turned off (system.admin_socket = \"\")."""
        if self.admin_socket is None:
            return self.runtime_dir / "admin.sock"
        return Path(self.admin_socket) if self.admin_socket else None


class Settings(BaseSettings):
    """Everything a box is configured with; see `appliance config-schema` for the JSON Schema."""

    model_config = SettingsConfigDict(extra="forbid", title="appliance", validate_default=True)

    server: ServerSettings = Field(default_factory=ServerSettings, description="HTTP API.")
    models: ModelSettings = Field(default_factory=ModelSettings, description="Model repository.")
    scheduler: SchedulerSettings = Field(
        default_factory=SchedulerSettings, description="Batching and workers."
    )
    pool: PoolSettings = Field(default_factory=PoolSettings, description="Pool link over MQTT.")
    system: SystemSettings = Field(default_factory=SystemSettings, description="Paths and process.")
    ota: OtaSettings = Field(default_factory=OtaSettings, description="`appliance ota` (update hooks).")
    providers: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description='Per-provider options, e.g. [providers.openvino] device = "GPU".',
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        **_: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        layers = _layers.get(())
        return (init_settings, *(_Layer(settings_cls, data) for _, data in layers))

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Settings:
        """Build settings from every source; raise ConfigError naming the key and where it came from.

        `environ` defaults to os.environ; tests pass a dict. `config_file` None means
        /etc/appliance/appliance.toml if it exists.
        """
        environ = os.environ if environ is None else environ
        if config_file is None and SYSTEM_CONFIG_FILE.is_file():
            config_file = SYSTEM_CONFIG_FILE
        layers = [("environment", read_environ(environ))]  # highest priority first
        if "CREDENTIALS_DIRECTORY" in environ:
            credentials = Path(environ["CREDENTIALS_DIRECTORY"])
            layers.append(("$CREDENTIALS_DIRECTORY", read_credentials(credentials)))
        if config_file is not None:
            layers.append((str(config_file), read_toml(config_file)))
        init = deep_copy(overrides or {})
        token = _layers.set(tuple(layers))
        try:
            return cls(**init)
        except ValidationError as exc:
            raise ConfigError(describe(exc, [("command line", init), *layers])) from exc
        finally:
            _layers.reset(token)


_layers: contextvars.ContextVar[tuple[tuple[str, dict[str, Any]], ...]] = contextvars.ContextVar(
    "appliance_settings_layers"
)


class _Layer(PydanticBaseSettingsSource):
    """One already-parsed source (TOML, environment, credentials) handed to pydantic-settings."""

    def __init__(self, settings_cls: type[BaseSettings], data: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._data = data

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return deep_copy(self._data)


def config_schema() -> dict[str, Any]:
    """JSON Schema of the settings, for `appliance config-schema` and the docs."""
    return Settings.model_json_schema()
