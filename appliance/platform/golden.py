"""Canary material: golden inputs drawn afresh and lightly perturbed, references from a trusted run.

Golden samples are in the OTA verify step's format (`<version>/samples.npz`: arrays `input__<name>` and
`output__<name>`, no pickles). A canary takes rows of the golden inputs at random (with repeats when it
needs more than there are), shuffled, and adds noise to every element: Gaussian with a standard
deviation of `perturbation` times the input's own spread, clipped to the range the golden inputs
span (integers move by at most 1). So no two canaries are alike and none equals a golden sample, and a
node cannot recognise one by its bytes. Its expected outputs come from running the catalogue's copy of
the very file the node serves, with ONNX Runtime on the gateway's CPU: the platform never uses the
box's engine or scheduler (tests/unit/test_layers.py), only onnxruntime itself.

That holds only while the golden inputs are secret. Noise does not hide a canary from a node that holds
them: a canary minus its nearest golden row is white noise, whatever the perturbation, and a buyer's
image minus it is not (surface_defect: lag-1 autocorrelation of that difference under 0.03 for
canaries at perturbation 0.01 to 1.0, at least 0.23 for 300 fresh surfaces). So such a node answers
canaries honestly and cheats on the rest. The gateway cannot see what nodes hold, but it can tell a
samples file that every box has: `exposure` names the signs, and the gateway warns at start.
"""

from __future__ import annotations

import hashlib
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from appliance.errors import ConfigError
from appliance.settings import BUNDLED_MODELS

INPUT_PREFIX, OUTPUT_PREFIX = "input__", "output__"


class Golden:
    """One catalogue model's golden inputs, and how spread out each is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inputs = read_inputs(path)
        self.count = min(len(array) for array in self.inputs.values())
        self._low = {name: array.min() for name, array in self.inputs.items()}
        self._high = {name: array.max() for name, array in self.inputs.items()}
        self._spread = {
            name: float(np.std(array)) if array.dtype.kind == "f" else 0.0
            for name, array in self.inputs.items()
        }

    def draw(self, rows: int, rng: np.random.Generator, perturbation: float) -> dict[str, np.ndarray]:
        """`rows` rows drawn afresh from the golden inputs (the same rows of each input), perturbed."""
        picked = rng.choice(self.count, size=rows, replace=rows > self.count)
        drawn = {}
        for name, array in self.inputs.items():
            chosen = array[picked]
            if chosen.dtype.kind == "f":
                noise = rng.normal(0.0, perturbation * self._spread[name] or 1e-6, chosen.shape)
                chosen = np.clip(chosen + noise.astype(chosen.dtype), self._low[name], self._high[name])
            elif chosen.dtype.kind in "iu":
                step = rng.integers(-1, 2, chosen.shape)
                chosen = np.clip(chosen.astype(np.int64) + step, self._low[name], self._high[name])
            drawn[name] = np.ascontiguousarray(chosen.astype(array.dtype))
        return drawn


def read_inputs(path: Path) -> dict[str, np.ndarray]:
    """The golden inputs by input name; ConfigError naming what is wrong with the file."""
    try:
        if not zipfile.is_zipfile(path):
            raise ConfigError(f"golden samples {path}: not an .npz archive (np.savez writes one)")
        with np.load(path, allow_pickle=False) as archive:
            inputs = {
                k.removeprefix(INPUT_PREFIX): archive[k] for k in archive.files if k.startswith(INPUT_PREFIX)
            }
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"golden samples {path}: cannot be read ({exc})") from exc
    if not inputs or any(array.ndim == 0 or len(array) == 0 for array in inputs.values()):
        raise ConfigError(f"golden samples {path}: expected non-empty arrays named {INPUT_PREFIX}<input>")
    return inputs


def exposure(samples: Path, files: Iterable[str], bundled: Path = BUNDLED_MODELS) -> str | None:
    """Why nodes may hold these golden samples, so that canaries drawn from them can be told apart (None
    when the gateway sees no sign of it): they are a reference model's `samples.npz`, which every box
    installed from the package has, or they lie beside a `model.onnx` of one of `files` (the sha256 the
    catalogue lists), which is the repository layout boxes are given with the OTA verify samples."""
    digest = _sha256(samples)
    if digest is None:
        return None
    for shipped in sorted(bundled.glob("*/*/samples.npz")):
        if _sha256(shipped) == digest:
            return f"they are the bundled {shipped}, which every box installed from the package holds"
    beside = samples.parent / "model.onnx"
    if beside.is_file() and _sha256(beside) in set(files):
        return (
            f"they lie beside {beside}, a file of the model the nodes serve: the layout of a box's model "
            "repository, where `appliance ota verify` reads the samples every box holding that version has"
        )
    return None


def _sha256(path: Path) -> str | None:
    try:
        with path.open("rb") as file:
            return hashlib.file_digest(file, "sha256").hexdigest()
    except OSError:
        return None


class References:
    """Trusted runs of catalogue files: one ONNX Runtime session per file, one thread per call, made on
    first use. Calls block: the gateway runs them in a worker thread."""

    def __init__(self, threads: int = 1) -> None:
        self.threads = threads
        self._sessions: dict[Path, object] = {}
        self._lock = threading.Lock()

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session(path)
        names = [output.name for output in session.get_outputs()]  # type: ignore[attr-defined]
        values = session.run(names, inputs)  # type: ignore[attr-defined]
        return dict(zip(names, values, strict=True))

    def _session(self, path: Path) -> object:
        with self._lock:
            found = self._sessions.get(path)
            if found is None:
                import onnxruntime  # loaded only by a gateway that runs canaries

                options = onnxruntime.SessionOptions()
                options.intra_op_num_threads = self.threads  # the gateway's own work comes first
                options.inter_op_num_threads = 1
                found = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                self._sessions[path] = found
            return found
