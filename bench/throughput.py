"""Served throughput vs raw ONNX Runtime, measured in the same run (closed loop, binary and JSON).

    .venv/bin/python bench/throughput.py [--model surface_defect_224_u8] [--clients 32] [--duration 10]

Reports served rows/s at N concurrent clients as a ratio of the best raw ORT rows/s on the
same box (issue 3 target: binary >= 0.85; JSON >= 0.5 of binary). Raw ORT is measured before and
after the served runs and the better figure is used, so a box whose speed drifts (shared cloud cores
do) does not flatter the ratio.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench_parser, raw_ort_throughput, report, serve
from loadgen import Prepared, closed_loop


def sample_input(model_dir: Path) -> dict[str, np.ndarray]:
    """One row of the model's golden samples, or zeros shaped like its declared input."""
    samples = sorted(model_dir.glob("*/samples.npz"))
    if samples:
        with np.load(samples[-1]) as data:
            return {k.removeprefix("input__"): data[k][:1] for k in data.files if k.startswith("input__")}
    import onnxruntime as ort

    session = ort.InferenceSession(str(sorted(model_dir.glob("*/model.onnx"))[-1]))
    return {
        i.name: np.zeros([1 if not isinstance(d, int) else d for d in i.shape], np.float32)
        for i in session.get_inputs()
    }


def main() -> None:
    parser = bench_parser(__doc__, duration_s=10.0)
    parser.add_argument("--clients", type=int, default=32)
    args = parser.parse_args()

    model_dir = args.repository / args.model
    model_path = sorted(model_dir.glob("*/model.onnx"))[-1]
    inputs = sample_input(model_dir)
    before = raw_ort_throughput(model_path, inputs, duration_s=args.duration / 2)
    figures: dict[str, object] = {"model": args.model, "clients": args.clients}
    with serve(args.repository) as server:
        for binary in (True, False):
            # A 2 s deadline (parameters.timeout, us): this measures throughput; the SLO has its own bench.
            request = Prepared.infer(
                server.host, args.model, inputs, binary=binary, parameters={"timeout": 2_000_000}
            )
            result = asyncio.run(
                closed_loop(server.host, server.port, request, clients=args.clients, duration_s=args.duration)
            )
            figures["binary" if binary else "json"] = result.summary()
    after = raw_ort_throughput(model_path, inputs, duration_s=args.duration / 2)
    figures["raw_ort"] = max(before, after, key=lambda best: best["rows_per_s"])
    figures["raw_ort_before_after"] = [round(before["rows_per_s"], 1), round(after["rows_per_s"], 1)]
    raw = float(figures["raw_ort"]["rows_per_s"])  # type: ignore[index]
    binary_rate = figures["binary"]["ok_per_s"]  # type: ignore[index]
    json_rate = figures["json"]["ok_per_s"]  # type: ignore[index]
    figures["binary_vs_raw_ort"] = round(binary_rate / raw, 3)
    figures["json_vs_binary"] = round(json_rate / binary_rate, 3) if binary_rate else 0.0
    report("throughput", figures)


if __name__ == "__main__":
    main()
