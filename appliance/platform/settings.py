"""Platform settings: defaults < TOML file < $CREDENTIALS_DIRECTORY < APPLIANCE_GATEWAY__ env < CLI flags."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from appliance.config_sources import (
    NOT_SETTINGS,
    broker_url,
    credential_text,
    deep_copy,
    describe,
    read_environ,
    read_toml,
    topic_level,
    topic_prefix,
)
from appliance.errors import ConfigError
from appliance.settings import Settings  # the box's sections, only to tell them from typos

SECTIONS = ("gateway", "ledger", "canary")  # the only APPLIANCE_<SECTION>__ variables the platform reads
SECRETS = {"gateway.password": ("gateway", "password")}  # credential file name -> setting
KEY_CREDENTIAL = "gateway.key"  # $CREDENTIALS_DIRECTORY/gateway.key: the Ed25519 key receipts are signed with
HEX = "0123456789abcdef"  # the digits of a sha256 digest as buyers files and catalogues write it


def _section(title: str) -> ConfigDict:
    return ConfigDict(extra="forbid", title=title, validate_default=True)


def _state_dir() -> Path:
    found = os.environ.get("STATE_DIRECTORY")  # systemd StateDirectory=
    return Path(found.split(":")[0]) if found else Path("/var/lib/appliance-gateway")


def _default_id() -> str:
    return f"{socket.gethostname().split('.')[0]}-{uuid.uuid4().hex[:6]}"


class GatewaySettings(BaseModel):
    model_config = _section("Pool gateway")

    broker: str | None = Field(None, description="mqtt://host:port or mqtts://host:port (MQTT 5 needed).")
    topic_root: str = Field("ecp/v1", description="Topic levels before <site>/<node>/.")
    site: str = Field("+", description="Only nodes of this site (default: every site).")
    gateway_id: str = Field(
        default_factory=_default_id, description="This instance's name in presence and reply topics."
    )
    username: str | None = Field(None, description="MQTT user name.")
    password: SecretStr | None = Field(
        None, description="MQTT password; also from $CREDENTIALS_DIRECTORY/gateway.password."
    )
    ca_file: Path | None = Field(None, description="CA bundle to verify an mqtts:// broker.")
    cert_file: Path | None = Field(None, description="MQTT client certificate for mutual TLS.")
    key_file: Path | None = Field(None, description="MQTT client private key for mutual TLS.")
    host: str = Field("127.0.0.1", description="Address the buyer API listens on.")
    port: int = Field(8100, ge=0, le=65535, description="TCP port of the buyer API (0 picks a free one).")
    tls_cert_file: Path | None = Field(None, description="HTTPS certificate chain; unset serves plain HTTP.")
    tls_key_file: Path | None = Field(None, description="HTTPS private key (with tls_cert_file).")
    catalogue: Path | None = Field(
        None, description="TOML catalogue pinning the models buyers may call (name, sha256, samples)."
    )
    buyers_file: Path | None = Field(
        None,
        description="TOML of buyers: [buyers.NAME] token_sha256, rate_per_s, max_body_bytes. Unset: "
        "no token needed, every caller is buyer 'anonymous' with the default quota.",
    )
    default_rate_per_s: float = Field(50.0, gt=0, description="Jobs/s of a buyer whose entry sets none.")
    default_max_body_bytes: int = Field(
        4 * 1024 * 1024, gt=0, description="Largest request body of a buyer whose entry sets none."
    )
    default_max_requests_in_progress: int = Field(
        64,
        ge=1,
        description="Inference requests of one buyer in progress at once (from its headers to its "
        "answer), for a buyer whose entry sets none; beyond it 429 + Retry-After.",
    )
    body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Time a buyer has to send a whole request body once its headers are in; then 408 "
        "and the connection closes (as the box's server.body_timeout_s).",
    )
    # The buyer API's connections, held to the box's [server] bounds of the same names
    # (server/connections.py, server/gate.py).
    max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        le=1024 * 1024,
        description="Largest HTTP request line plus headers; beyond it 431 and the connection closes.",
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Time a client has to send a whole request line and headers, from its connection "
        "opening (after the TLS handshake) or from the end of its previous request; then 408 and the "
        "connection closes, however the bytes trickle.",
    )
    idle_timeout_s: float = Field(
        30.0,
        gt=0,
        description="An idle keep-alive connection is closed after this long; a client that takes none "
        "of its unsent answer for this long is reset.",
    )
    max_connections: int = Field(
        1024,
        ge=1,
        description="Open HTTP connections in all; beyond it 503 + Retry-After and the connection "
        "closes. Each takes a file descriptor, and a refused one another while it lingers: keep the "
        "process's open-files limit above twice this.",
    )
    max_connections_per_peer: int = Field(
        256,
        ge=1,
        description="Open HTTP connections from one client address, so one buyer (or anyone) cannot "
        "take every place; beyond it 503 + Retry-After and the connection closes. Buyers behind one "
        "NAT or proxy share it.",
    )
    drain_timeout_s: float = Field(
        10.0,
        gt=0,
        description="On SIGTERM, how long requests in progress may take to finish; a request still "
        "incomplete then gets 503 and its connection closes.",
    )
    max_reading_bytes: int = Field(
        512 * 1024 * 1024,
        gt=0,
        description="Request body bytes all buyers together may have on their way in at once (a body's "
        "Content-Length counts from its headers, a chunked body as it comes); beyond it 503 + "
        "Retry-After.",
    )
    operator_token_sha256: list[str] = Field(
        default_factory=list,
        description="sha256 digests (hex) of the bearer tokens that may read the fleet view (GET "
        "/v2/pool/nodes); buyers get 403 there. Empty: only a gateway without buyers_file shows it, "
        "to every caller.",
    )
    job_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="A node must answer a job within it (also the job's MQTT expiry)."
    )
    max_jobs_in_flight: int = Field(
        4096, ge=1, description="Buyer requests in progress at once; beyond it 503 at once (no queue)."
    )
    max_refusal_moves: int = Field(
        3, ge=0, description="How many refusing nodes a job moves past before the buyer gets the 503."
    )
    timeout_withhold_s: float = Field(
        10.0, ge=0, description="A node that missed a job's timeout gets no job of that model for this long."
    )
    retry_after_s: float = Field(
        1.0,
        gt=0,
        description="Retry-After of the gateway's own 503s and 429s (no node has credit, too many "
        "jobs, connections or body bytes, a buyer's places all taken, stopping).",
    )
    sample_nodes: int = Field(
        4, ge=1, description="Nodes drawn at random per job; the one with most free credit wins."
    )
    learning_s: float = Field(
        5.0,
        ge=0,
        description="After each broker connection, without a catalogue, a model no node has been heard "
        "offering yet is answered 503 (its retained birth may still be on its way), not 404.",
    )
    sweep_interval_s: float = Field(
        0.25, gt=0, description="How often nodes holding jobs are checked for silence (failover)."
    )
    # What the pool may make the gateway hold (view.py, intake.py): every pool message is hostile.
    max_nodes: int = Field(
        20_000,
        ge=1,
        description="Nodes the gateway's view holds at once; a new node beyond them is ignored (counted "
        'as appliance_gateway_reports_rejected{kind="node_limit"}) until one is forgotten. Each costs a '
        "few kB of memory and a few hundred bytes of the fleet view per model it offers.",
    )
    forget_after_s: float = Field(
        3600.0,
        ge=60,
        description="A node heard nothing from for this long (offline, or its reports stopped) is dropped "
        "from the view, not from the ledger; heard again, it is back. Keep it well above the nodes' "
        "pool.report_interval_s.",
    )
    max_packet_bytes: int = Field(
        64 * 1024 * 1024,
        ge=64 * 1024,
        le=268_435_455,
        description="Largest MQTT packet the gateway takes (MQTT 5 Maximum Packet Size, sent in its "
        "CONNECT): the broker drops a larger one instead of sending it. Job answers come on the same "
        "connection, so keep it above the largest answer a model the pool sells gives (a dropped answer "
        "is a job lost at job_timeout_s); the default is the largest request body the gateway reads. "
        "Births, states and reports are bounded far lower besides.",
    )
    # What other gateways and /metrics may hold (presence.py, metrics.py).
    max_gateways: int = Field(
        64,
        ge=1,
        description="Gateways counted when sharing each node's offer, this one included: each takes "
        "1/N of every offer, N never above this. Only gateways whose presence is signed with a key the "
        "shared ledger lists for them are counted.",
    )
    presence_refresh_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="How often the gateway announces its presence again; a gateway not heard from for "
        "3 times this is no longer counted (its share goes back to the others).",
    )
    presence_max_clock_skew_s: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="A gateway's new run (a start or restart) is counted only if its clock is within this "
        "of this gateway's: an announcement replayed from longer ago is not. A peer whose clock is further "
        "off is not counted, so both book its share: the log says so once. Liveness itself goes by when "
        "announcements arrive, not by the clocks.",
    )
    max_metric_models: int = Field(
        256,
        ge=1,
        description="Model names /metrics labels: catalogue names, or with no catalogue names a node in "
        'good standing offers. Any other name is counted under model="_other".',
    )
    state_dir: Path = Field(
        default_factory=_state_dir,
        description="The gateway's own files: its key (gateway-key.pem, mode 0600, unless the credential "
        "gateway.key is given) and the default SQLite ledger; $STATE_DIRECTORY wins.",
    )

    @field_validator("gateway_id")
    @classmethod
    def _topic_level(cls, value: str) -> str:
        return topic_level(value)

    @field_validator("site")
    @classmethod
    def _site(cls, value: str) -> str:
        if value.startswith("_"):  # <root>/_reply/, _gateways/, _sync/: the platform's, no site's
            raise ValueError(f"a site starting with _ is reserved for the platform's topics, got {value!r}")
        return value if value == "+" else topic_level(value)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str | None) -> str | None:
        return broker_url(value)

    @field_validator("topic_root")
    @classmethod
    def _topic_prefix(cls, value: str) -> str:
        return topic_prefix(value)

    @field_validator("operator_token_sha256", mode="before")
    @classmethod
    def _digests(cls, value: Any) -> Any:
        found = [value] if isinstance(value, str) else value
        if isinstance(found, list):
            for digest in found:
                if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= set(HEX)):
                    raise ValueError(f"{str(digest)[:80]!r} is not a sha256 digest (64 lowercase hex digits)")
        return found


class LedgerSettings(BaseModel):
    model_config = _section("Receipts ledger")

    url: str | None = Field(
        None,
        description="A SQLite file path (or sqlite:///PATH), or postgresql://user@host/db to share one "
        "ledger between gateways. Unset: <gateway.state_dir>/ledger.sqlite3.",
    )
    refresh_s: float = Field(
        2.0, gt=0, description="How often key pins and quarantines written by other gateways are read."
    )


class CanarySettings(BaseModel):
    model_config = _section("Canary checks")

    probability: float = Field(0.02, ge=0, le=1, description="Share of buyer jobs followed by a canary.")
    second_opinion_probability: float = Field(
        0.01, ge=0, le=1, description="Share of buyer jobs also run on a second node and compared."
    )
    perturbation: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Noise added to canary inputs: its standard deviation as a share of the golden input's.",
    )
    recheck_interval_s: float = Field(
        30.0, gt=0, description="How often a quarantined node is sent a canary (its way back)."
    )


class PlatformSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", title="appliance platform")

    gateway: GatewaySettings = Field(default_factory=GatewaySettings, description="Gateway.")
    ledger: LedgerSettings = Field(default_factory=LedgerSettings, description="Receipts ledger.")
    canary: CanarySettings = Field(default_factory=CanarySettings, description="Canary checks.")

    @classmethod
    def load(
        cls,
        config_file: Path | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> PlatformSettings:
        """Every source merged; ConfigError naming the key and where it came from."""
        environ = os.environ if environ is None else environ
        layers: list[tuple[str, dict[str, Any]]] = []
        if config_file is not None:
            layers.append((f"config file {config_file}", read_toml(config_file)))
        credentials = environ.get("CREDENTIALS_DIRECTORY")
        if credentials:
            layers.append(("credentials", _credentials(Path(credentials))))
        own = {
            k: v
            for k, v in environ.items()
            if k.startswith(tuple(f"APPLIANCE_{s.upper()}__" for s in SECTIONS))
        }
        _no_strays(environ)
        layers.append(("environment", read_environ(own)))
        layers.append(("command line", deep_copy(overrides or {})))
        merged: dict[str, Any] = {}
        for _, data in layers:
            _merge(merged, data)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(describe(exc, list(reversed(layers)))) from None


def _credentials(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name, (section, key) in SECRETS.items():
        path = directory / name
        if path.exists():
            data.setdefault(section, {})[key] = credential_text(directory, path)
    return data


def _no_strays(environ: Mapping[str, str]) -> None:
    """An APPLIANCE_ variable that is neither the platform's nor the box's (which may share the host's
    environment) is a misspelling: APPLIANCE_GATWAY__PORT would otherwise be ignored without a word."""
    known = {*SECTIONS, *Settings.model_fields}
    for name in environ:
        if not name.startswith("APPLIANCE_") or name in NOT_SETTINGS:
            continue
        section = name[len("APPLIANCE_") :].split("__")[0].lower()
        if section not in known or "__" not in name:
            raise ConfigError(
                f"environment variable {name}: not a setting (expected APPLIANCE_<SECTION>__<KEY> with a "
                f"section of {', '.join(sorted(SECTIONS))} or the box's)"
            )


def _merge(into: dict[str, Any], data: Mapping[str, Any]) -> None:
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = deep_copy(value) if isinstance(value, Mapping) else value
