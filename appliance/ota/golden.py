"""Golden samples (`<version>/samples.npz`) sent over HTTP: do the outputs reproduce, and how fast."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from appliance.engine.repository import SAMPLES_FILE, ModelSource, Repository
from appliance.errors import ApplianceError
from appliance.ota import repofiles
from appliance.protocol import codec

INPUT_PREFIX = "input__"
OUTPUT_PREFIX = "output__"
REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class GoldenRun:
    """One model's golden samples: the median request time, and what did not reproduce."""

    model: str
    median_ms: float | None = None  # None when no timed request succeeded
    problems: tuple[str, ...] = ()

    @property
    def is_reproduced(self) -> bool:
        return self.median_ms is not None and not self.problems


def base_url(http: dict[str, Any]) -> str:
    """The service's URL from its status `http` {host, port}; a wildcard address means loopback."""
    host = str(http.get("host") or "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(http['port'])}"


def read_samples(
    path: Path, repository: Path | None = None
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(inputs, expected outputs) by tensor name; ValueError naming what is wrong with the file.

    `path` lies in the service user's `repository` (default: its own folder) and root reads it: it
    is opened without following links and its arrays are bounded before they are allocated (see
    repofiles.load_npz).
    """
    arrays = repofiles.load_npz(path.parent if repository is None else repository, path)
    inputs = {k.removeprefix(INPUT_PREFIX): v for k, v in arrays.items() if k.startswith(INPUT_PREFIX)}
    outputs = {k.removeprefix(OUTPUT_PREFIX): v for k, v in arrays.items() if k.startswith(OUTPUT_PREFIX)}
    if not inputs or not outputs:
        raise ValueError(
            f"{path} holds {sorted(arrays)}; expected arrays named {INPUT_PREFIX}<input> and "
            f"{OUTPUT_PREFIX}<output>"
        )
    return inputs, outputs


def compare(
    expected: dict[str, np.ndarray], got: dict[str, np.ndarray], atol: float, rtol: float
) -> list[str]:
    """What differs between the golden outputs and a response, one message per output."""
    problems = []
    for name, want in expected.items():
        if name not in got:
            problems.append(f"output {name!r} is missing from the response, which has {sorted(got)}")
            continue
        have = got[name]
        if have.shape != want.shape:
            problems.append(
                f"output {name!r} has shape {list(have.shape)}; the samples have {list(want.shape)}"
            )
        elif want.dtype.kind in "OSU" or have.dtype.kind in "OSU":
            wrong = sum(_as_bytes(a) != _as_bytes(b) for a, b in zip(have.flat, want.flat, strict=True))
            if wrong:
                problems.append(f"output {name!r}: {wrong} of {want.size} strings differ from the samples")
        elif want.dtype.kind in "fc" or have.dtype.kind in "fc":
            close = np.isclose(have, want, atol=atol, rtol=rtol, equal_nan=True)
            if not close.all():
                diff = np.abs(have.astype(np.float64) - want.astype(np.float64))
                worst = np.unravel_index(int(np.nanargmax(np.where(close, 0.0, diff))), want.shape)
                problems.append(
                    f"output {name!r}: {int((~close).sum())} of {want.size} values differ beyond "
                    f"atol {atol:g} + rtol {rtol:g}; the largest, {float(diff[worst]):.3g}, at "
                    f"index {list(map(int, worst))}"
                )
        elif not np.array_equal(have, want):
            problems.append(f"output {name!r}: {int((have != want).sum())} of {want.size} values differ")
    return problems


def run(
    client: httpx.Client,
    model: str,
    samples: Path,
    *,
    atol: float,
    rtol: float,
    timed_requests: int,
    repository: Path | None = None,
) -> GoldenRun:
    """Send the samples once to check the outputs, then `timed_requests` times to time them."""
    try:
        inputs, expected = read_samples(samples, repository)
    except ValueError as exc:
        return GoldenRun(model, problems=(str(exc),))
    encoded = codec.encode_request(inputs, outputs=sorted(expected))
    body = encoded.body()
    headers = {} if encoded.header_length is None else {codec.HEADER_LENGTH: str(encoded.header_length)}
    path = f"/v2/models/{model}/infer"
    problems: list[str] = []
    timings_s: list[float] = []
    for attempt in range(timed_requests + 1):  # the first is untimed: it checks the outputs
        started = time.perf_counter()
        try:
            response = client.post(path, content=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPError as exc:
            return GoldenRun(
                model, problems=(*problems, f"golden request to {client.base_url}{path} failed: {exc}")
            )
        elapsed_s = time.perf_counter() - started
        if response.status_code != 200:
            return GoldenRun(model, problems=(*problems, _refusal(response)))
        if attempt == 0:
            problems = _check(response, expected, atol, rtol)
        else:
            timings_s.append(elapsed_s)
    return GoldenRun(model, round(statistics.median(timings_s) * 1e3, 4), tuple(problems))


def run_all(
    status: dict[str, Any],
    repository: Path,
    *,
    host: str,
    api_token: str | None,
    timed_requests: int,
) -> dict[str, GoldenRun]:
    """Golden runs of every READY model with samples in `repository`, over HTTP at `host`.

    Only the port number and the served versions come from the service's status: the samples are
    read from the verb's own repository, never from a path the status names.
    """
    port = http_port(status)
    if port is None:
        return {}
    source_of = Repository(repository, repofiles.RootFiles(repository))
    headers = {"Authorization": f"Bearer {api_token}"} if api_token else {}
    runs: dict[str, GoldenRun] = {}
    with httpx.Client(base_url=base_url({"host": host, "port": port}), headers=headers) as client:
        for name, model in status.get("models", {}).items():
            if model.get("state") != "READY":
                continue
            try:
                source = source_of.source(name)
            except ApplianceError as exc:
                runs[name] = GoldenRun(name, problems=(f"tolerances unknown: {exc}",))
                continue
            samples = _samples(source, model.get("version"))
            if not source_of.files.is_file(samples):
                continue
            tolerance = source.manifest.samples
            runs[name] = run(
                client,
                name,
                samples,
                atol=tolerance.atol,
                rtol=tolerance.rtol,
                timed_requests=timed_requests,
                repository=repository,
            )
    return runs


def http_port(status: dict[str, Any]) -> int | None:
    """The TCP port the status names, if it is one (1 to 65535)."""
    http = status.get("http")
    port = http.get("port") if isinstance(http, dict) else None
    if isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536:
        return port
    return None


def _samples(source: ModelSource, served: object) -> Path:
    """samples.npz of the version the service serves, if that version is on disk, else the newest."""
    text = str(served)
    if text.isascii() and text.isdigit() and int(text) in source.versions:
        return source.directory / str(int(text)) / SAMPLES_FILE
    return source.samples_path


def _check(response: httpx.Response, expected: dict[str, np.ndarray], atol: float, rtol: float) -> list[str]:
    length = response.headers.get(codec.HEADER_LENGTH)
    try:
        got = codec.decode_response(response.content, int(length) if length else None)
    except (ApplianceError, ValueError) as exc:
        return [f"the golden response cannot be decoded: {exc}"]
    return compare(expected, got, atol, rtol)


def _refusal(response: httpx.Response) -> str:
    try:
        reason = response.json().get("error", response.text)
    except ValueError:
        reason = response.text[:200]
    return f"golden request answered HTTP {response.status_code}: {reason}"


def _as_bytes(value: Any) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)
