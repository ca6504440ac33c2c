"""Held-out metrics, sizes and ONNX Runtime CPU latency of the bundled models (models/README.md figures)."""

import argparse
import statistics
import time
from pathlib import Path

import metrics
import numpy as np
import onnxruntime as ort
import surfaces

MODELS_DIR = Path(__file__).resolve().parent.parent
HELD_OUT_SEED = 1000  # never used for training, calibration, samples or tests
THRESHOLD = 0.5
# served name -> (side px, channels, fp32 reference: a shipped twin or the build's scratch export)
MODELS = {
    "surface_defect": (128, 1, "surface_defect_fp32/1/model.onnx"),
    "surface_defect_224": (224, 3, ".cache/surface_defect_224.fp32.onnx"),
}


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _probabilities(path: Path, images: np.ndarray, threads: int) -> np.ndarray:
    served = _session(path, threads)
    return np.concatenate(
        [
            served.run(["defect_prob"], {"image": images[i : i + 16]})[0][:, 0]
            for i in range(0, len(images), 16)
        ]
    )


def latency_ms(path: Path, image: np.ndarray, batch: int, threads: int, runs: int) -> float:
    """Median wall time of one session.run on `batch` copies of `image`, after 5 warm-up runs."""
    served = _session(path, threads)
    feed = {"image": np.repeat(image[None], batch, axis=0)}
    for _ in range(5):
        served.run(None, feed)
    times_ms = []
    for _ in range(runs):
        started = time.perf_counter()
        served.run(None, feed)
        times_ms.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times_ms)


def report(name: str, count: int, threads: int, runs: int) -> None:
    size_px, channels, reference = MODELS[name]
    int8, fp32 = MODELS_DIR / name / "1" / "model.onnx", MODELS_DIR / reference
    images, _, labels = surfaces.dataset(HELD_OUT_SEED, count, size=size_px, channels=channels)
    p8 = _probabilities(int8, images, threads)
    found = metrics.at_threshold(p8, labels, THRESHOLD)
    print(f"## {name} ({count} held-out images, seed {HELD_OUT_SEED}, threshold {THRESHOLD})")
    print(
        f"int8: AUROC {metrics.auroc(p8, labels):.4f}, accuracy {found['accuracy']:.4f}, "
        f"false-positive rate {found['false_positive_rate']:.4f}, miss rate {found['miss_rate']:.4f}"
    )
    paths = {"int8": int8}
    if fp32.exists():
        p32 = _probabilities(fp32, images, threads)
        ref = metrics.at_threshold(p32, labels, THRESHOLD)
        agreement = ((p8 >= THRESHOLD) == (p32 >= THRESHOLD)).mean()
        print(
            f"fp32: AUROC {metrics.auroc(p32, labels):.4f}, accuracy {ref['accuracy']:.4f}, "
            f"false-positive rate {ref['false_positive_rate']:.4f}, miss rate {ref['miss_rate']:.4f}"
        )
        print(
            f"int8/fp32 decision agreement {agreement:.4f}, "
            f"max |prob difference| {np.abs(p8 - p32).max():.4f}"
        )
        paths["fp32"] = fp32
    else:
        print(f"fp32: {fp32} absent (run models/recipe/build.py --only {name})")
    print(f"latency: ORT {ort.__version__} CPU, intra_op threads {threads}, median of {runs} runs")
    print("| precision | file bytes | batch 1 ms | batch 8 ms | batch 8 ms/image |")
    print("| --- | --- | --- | --- | --- |")
    for precision, path in paths.items():
        one, eight = (latency_ms(path, images[0], batch, threads, runs) for batch in (1, 8))
        print(f"| {precision} | {path.stat().st_size} | {one:.2f} | {eight:.2f} | {eight / 8:.2f} |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--images", type=int, default=1000, help="held-out images per model (half defective)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency figure")
    args = parser.parse_args(argv)
    for name in args.only or MODELS:
        report(name, args.images, args.threads, args.runs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
