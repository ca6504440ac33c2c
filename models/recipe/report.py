"""Held-out metrics, sizes and ONNX Runtime CPU latency of the bundled models (models/README.md figures).

In-distribution: new images (seed 1000) of every texture family the shipped models were trained on, as a
whole and per family. For surfaces no shipped model has seen, see lofo.py. With --baseline DIR (a models
repository of other files, e.g. an older commit's), the latency of both is measured in the same run,
alternating, so that the comparison shares the machine's state.
"""

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


def latency_ms(paths: list[Path], image: np.ndarray, batch: int, threads: int, runs: int) -> list[float]:
    """Median wall time of one session.run on `batch` copies of `image` for each file, after 5 warm-up
    runs each; the files take turns run by run, so that they share whatever else the machine is doing."""
    sessions = [_session(path, threads) for path in paths]
    feed = {"image": np.repeat(image[None], batch, axis=0)}
    for served in sessions:
        for _ in range(5):
            served.run(None, feed)
    times_ms = [[] for _ in sessions]
    for _ in range(runs):
        for served, times in zip(sessions, times_ms, strict=True):
            started = time.perf_counter()
            served.run(None, feed)
            times.append((time.perf_counter() - started) * 1e3)
    return [statistics.median(times) for times in times_ms]


def _line(label: str, probabilities: np.ndarray, labels: np.ndarray) -> str:
    found = metrics.at_threshold(probabilities, labels, THRESHOLD)
    return (
        f"| {label} | {metrics.auroc(probabilities, labels):.3f} | {found['accuracy']:.3f} "
        f"| {found['false_positive_rate']:.3f} | {1 - found['miss_rate']:.3f} |"
    )


def report(name: str, count: int, threads: int, runs: int, baseline: Path | None) -> None:
    size_px, channels, reference = MODELS[name]
    int8, fp32 = MODELS_DIR / name / "1" / "model.onnx", MODELS_DIR / reference
    made = [
        surfaces.surface(HELD_OUT_SEED, i, size=size_px, channels=channels, defect=bool(i % 2))
        for i in range(count)
    ]
    images = np.stack([s.image for s in made])
    labels = np.array([s.label for s in made])
    families = np.array([s.texture for s in made])
    p8 = _probabilities(int8, images, threads)
    print(f"## {name} ({count} held-out images, seed {HELD_OUT_SEED}, threshold {THRESHOLD})")
    print("| images | AUROC | accuracy | false-positive rate | recall |")
    print("| --- | --- | --- | --- | --- |")
    print(_line("int8, all families", p8, labels))
    paths = {"int8": int8}
    if fp32.exists():
        p32 = _probabilities(fp32, images, threads)
        print(_line("fp32, all families", p32, labels))
        paths["fp32"] = fp32
    for family in surfaces.TEXTURES:
        chosen = families == family
        print(_line(f"int8, {family} ({chosen.sum()})", p8[chosen], labels[chosen]))
    if "fp32" in paths:
        agreement = ((p8 >= THRESHOLD) == (p32 >= THRESHOLD)).mean()
        largest = np.abs(p8 - p32).max()
        print(f"\nint8/fp32 decision agreement {agreement:.4f}, max |prob difference| {largest:.4f}")
    else:
        print(f"\nfp32: {fp32} absent (run models/recipe/build.py --only {name})")
    if baseline:
        paths |= {f"baseline {key}": baseline / path.relative_to(MODELS_DIR) for key, path in paths.items()}
        paths = {key: path for key, path in paths.items() if path.exists()}
    print(f"\nlatency: ORT {ort.__version__} CPU, intra_op threads {threads}, median of {runs} runs")
    print("| file | bytes | batch 1 ms | batch 8 ms | batch 8 ms/image |")
    print("| --- | --- | --- | --- | --- |")
    ones, eights = (latency_ms(list(paths.values()), images[0], batch, threads, runs) for batch in (1, 8))
    for (label, path), one, eight in zip(paths.items(), ones, eights, strict=True):
        print(f"| {label} | {path.stat().st_size} | {one:.3f} | {eight:.3f} | {eight / 8:.3f} |")
    print()


def _against(ok: np.ndarray, defective: np.ndarray) -> float:
    """AUROC of ok images' probabilities against defective ones'."""
    return metrics.auroc(np.concatenate([ok, defective]), np.r_[np.zeros(len(ok)), np.ones(len(defective))])


def by_defect(name: str, count: int, threads: int) -> None:
    """Per family and kind of defect: `count` ok images of the family against `count` with that defect
    (AUROC, recall at the threshold); what bounds a family's figures (models/README.md)."""
    size_px, channels, _ = MODELS[name]
    int8 = MODELS_DIR / name / "1" / "model.onnx"

    def scored(family: str, kind: str | None) -> np.ndarray:
        made = [
            surfaces.surface(
                HELD_OUT_SEED,
                i,
                size=size_px,
                channels=channels,
                defect=kind is not None,
                defect_kind=kind,
                families=(family,),
            ).image
            for i in range(int(kind is not None), 2 * count, 2)  # ok: even indices, defective: odd ones
        ]
        return _probabilities(int8, np.stack(made), threads)

    print(f"## {name} int8: ok against each defect ({count} images each, seed {HELD_OUT_SEED})")
    print("| family | all: AUROC, FP rate | " + " | ".join(surfaces.DEFECTS) + " |")
    print("| --- | --- |" + " --- |" * len(surfaces.DEFECTS))
    for family in surfaces.TEXTURES:
        ok = scored(family, None)
        flawed = {kind: scored(family, kind) for kind in surfaces.DEFECTS}

        cells = [f"{_against(ok, p):.3f} ({(p >= THRESHOLD).mean():.2f})" for p in flawed.values()]
        whole = _against(ok, np.concatenate(list(flawed.values())))
        print(f"| {family} | {whole:.3f}, FP {(ok >= THRESHOLD).mean():.3f} | " + " | ".join(cells) + " |")
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=sorted(MODELS), action="append")
    parser.add_argument("--images", type=int, default=1200, help="held-out images per model (half defective)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--runs", type=int, default=50, help="timed runs per latency figure")
    parser.add_argument("--baseline", type=Path, help="another models repository to time alongside")
    parser.add_argument(
        "--by-defect", type=int, metavar="N", help="instead: per family and kind of defect, N images each"
    )
    args = parser.parse_args(argv)
    for name in args.only or MODELS:
        if args.by_defect:
            by_defect(name, args.by_defect, args.threads)
        else:
            report(name, args.images, args.threads, args.runs, args.baseline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
