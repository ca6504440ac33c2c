"""The `[ota]` section of the settings: what `appliance ota` (the update hooks) goes by."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field

from appliance.config_sources import section


class OtaSettings(BaseModel):
    model_config = section("OTA hooks (appliance ota)")

    records_dir: Path | None = Field(
        None,
        description="Where `appliance ota` keeps the snapshot, the config copy and the drain marker. "
        "Unset: beside the state dir, <state_dir>-ota (/var/lib/appliance-ota when installed). Root "
        "restores the config from these records, so they must not be writable by the service user: "
        "the folder and those above it must belong to root (or whoever runs the verb), else refused.",
    )
    gate_max_line_requests: int = Field(
        0, ge=0, description="`ota gate` defers an update (exit 75) while more line requests than this wait."
    )
    gate_max_line_ips: float = Field(
        1.0,
        ge=0,
        description="`ota gate` defers an update while line traffic over the last 10 s exceeds this many "
        "inferences/s.",
    )
    drain_timeout_s: float | None = Field(
        None,
        gt=0,
        description="How long `ota drain` waits for admitted requests before it resumes serving and exits "
        "75; unset uses server.drain_timeout_s.",
    )
    verify_wait_s: float = Field(
        120.0, gt=0, description="How long `ota verify` waits for the service to answer and be ready."
    )
    verify_boot_grace_s: float = Field(
        900.0,
        ge=0,
        description="A service not ready after verify_wait_s makes `ota verify` exit 75 (try later) while "
        "it (or, if it does not answer, the box) has been up less than this, 1 (failed) after; "
        "appliance.service's TimeoutStartSec=.",
    )
    verify_timed_requests: int = Field(
        5, ge=1, description="Timed requests of each model's golden samples; their median is compared."
    )
    verify_latency_growth_pct: float = Field(
        50.0,
        ge=0,
        description="`ota verify` fails a model whose golden-sample median grew by more than this since "
        "the snapshot (plus verify_latency_slack_ms).",
    )
    verify_latency_slack_ms: float = Field(
        2.0,
        ge=0,
        description="Added to the allowed golden-sample latency, so timer noise on fast models passes.",
    )
