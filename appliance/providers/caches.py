"""On-disk compile caches: one directory per model digest and runtime fingerprint, never a stale engine."""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Mapping
from pathlib import Path

from pydantic import BaseModel

log = logging.getLogger(__name__)

DIGEST_CHARS = 16  # 64 bits of the model's sha256 name its cache directory


def compile_cache(
    root: Path, model_digest: str, config: BaseModel, platform: Mapping[str, str | None]
) -> Path | None:
    """The compile cache folder for this model, this runtime (`platform`: versions, driver, device)
    and this option set, created; None (and a warning) when it cannot be, so the load goes on uncached.
    What every provider with a compile cache calls (TensorRT, OpenVINO, MIGraphX, CoreML)."""
    return prepared(keyed_dir(root, model_digest, {**platform, "cfg": options_digest(config)}))


def keyed_dir(root: Path, model_digest: str, fingerprint: Mapping[str, str | None]) -> Path:
    """`<root>/<digest prefix>/<key-value_...>`: a new driver, runtime, device or option set gets a new one.

    Compiled engines (TensorRT plans, OpenVINO blobs, MIGraphX programs) are only valid for the exact
    driver, runtime and build options that produced them; keying the directory by all of them means an
    update makes a fresh build instead of loading an engine the new stack may reject or misrun.
    """
    if not re.fullmatch(r"[0-9a-fA-F]{16,}", model_digest):
        raise ValueError(f"model digest {model_digest!r} is not a sha256 hex string")
    return root / model_digest[:DIGEST_CHARS].lower() / fingerprint_name(fingerprint)


def fingerprint_name(fingerprint: Mapping[str, str | None]) -> str:
    """`ort-1.32.0_driver-550.54.14_...`: readable, path-safe, unknown values spelled out."""
    return "_".join(f"{key}-{_slug(value or 'unknown')}" for key, value in fingerprint.items())


def options_digest(config: BaseModel) -> str:
    """A short digest of a provider config, so that changing a build option misses the old cache."""
    return hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:8]


def prepared(path: Path) -> Path | None:
    """Create `path` if needed; None (and a warning) when it cannot be, so the load goes on uncached."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("compile cache %s unusable, building without it: %s", path, exc.strerror or exc)
        return None
    return path


def _slug(value: str) -> str:
    return re.sub(r"[^a-z0-9.+]+", "-", value.lower()).strip("-")[:48] or "unknown"
