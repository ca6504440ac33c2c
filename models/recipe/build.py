"""Rebuild the bundled reference models: train, export, quantise, write samples and model.toml."""

import argparse
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import camera
import export
import golden
import metrics
import nets
import numpy as np
import surfaces
import torch
import train

log = logging.getLogger("build")
MODELS_DIR = Path(__file__).resolve().parent.parent
CACHE_DIR = MODELS_DIR / ".cache"  # fp32 exports not shipped, LOFO folds; ignored by git
WEIGHTS_DIR = (
    Path(__file__).resolve().parent / "weights"
)  # shipped fp32 checkpoints (finetune.py starts there)
CALIBRATION_SEED, SAMPLES_SEED, CHECK_SEED = 3, 4, 6  # training uses 1 and 5 (train.Recipe)
THRESHOLD = 0.5

_LIMITS = (
    "Synthetic data only: it shows the serving path end to end and gives benchmarks a realistic "
    "workload; it is not a substitute for a model trained on the factory's own images "
    "(see models/README.md to retrain or fine-tune)."
)


@dataclass(frozen=True)
class Build:
    """One architecture: how it is trained and the models shipped from it."""

    name: str  # the int8 model
    fp32_name: str | None  # an fp32 twin from the same weights, or None
    recipe: train.Recipe
    calibration_images: int
    manifest: export.Manifest  # for the int8 model; the fp32 twin changes precision and tolerances
    uint8_name: str | None = None  # a twin of the int8 model taking 8-bit pixels (camera.py), or None


BUILDS = {
    "surface_defect": Build(
        "surface_defect",
        "surface_defect_fp32",
        train.Recipe(
            "surface_net",
            size_px=128,
            channels=1,
            crop_px=128,
            train_images=24576,
            epochs=20,
            learning_rate=5e-3,
            threads=1,
        ),
        calibration_images=96,
        manifest=export.Manifest(
            description=(
                "Surface defect detector for 128x128 grayscale images of textured surfaces (woven, "
                "brushed metal, granular, wood, cellular, mottled): scratches, cracks, spots and texture "
                "patches. "
                "defect_prob is P(defect) for the image; defect_map is P(defect) per 8x8 pixel cell. "
                "Trained on DAGM-2007-style generated images (models/recipe). " + _LIMITS
            ),
            precision="int8",
            slo_p99_ms=50.0,
            max_batch_size=16,
            preferred_batch_sizes=(1, 4, 8, 16),
            max_queue_delay_ms=2.0,
            atol=0.05,  # int8: fused kernels vs QDQ emulation differ by up to 0.04 (models/README.md)
            rtol=0.0,
            parameters={
                "decision_threshold": THRESHOLD,
                "input_range": "[0, 1]",
                "map_cell_px": 8,
                "architecture": "surface_net",
            },
        ),
    ),
    "surface_defect_224": Build(
        "surface_defect_224",
        None,
        train.Recipe(
            "mobile_surface_net",
            size_px=224,
            channels=3,
            crop_px=112,
            train_images=16384,
            epochs=20,
            learning_rate=5e-3,
            whole_image_steps=96,
            validation_images=100,
        ),
        calibration_images=48,
        uint8_name="surface_defect_224_u8",
        manifest=export.Manifest(
            description=(
                "Surface defect detector for 224x224 RGB images of textured surfaces, MobileNetV2-style "
                "(depthwise-separable inverted residual blocks, about 120 MMAC per image); the "
                "batching workload for benchmarks. defect_prob is P(defect) for the image; defect_map "
                "is P(defect) per 8x8 pixel cell (28x28). Trained on DAGM-2007-style generated images "
                "(models/recipe). " + _LIMITS
            ),
            precision="int8",
            slo_p99_ms=100.0,
            max_batch_size=32,
            preferred_batch_sizes=(1, 4, 8, 16, 32),
            max_queue_delay_ms=5.0,
            atol=0.05,  # int8: fused kernels vs QDQ emulation differ by up to 0.04 (models/README.md)
            rtol=0.0,
            parameters={
                "decision_threshold": THRESHOLD,
                "input_range": "[0, 1]",
                "map_cell_px": 8,
                "architecture": "mobile_surface_net",
            },
        ),
    ),
}
FP32_TOLERANCE = {"atol": 1e-4, "rtol": 1e-3}


def _model_path(name: str, models_dir: Path) -> Path:
    return models_dir / name / "1" / "model.onnx"


def _trained(build: Build, threads: int, reuse: bool) -> torch.nn.Module:
    checkpoint = WEIGHTS_DIR / f"{build.recipe.architecture}.pt"
    if reuse and checkpoint.exists():
        log.info("%s: reusing %s", build.name, checkpoint)
        train.deterministic(build.recipe.seed, threads)
        model = nets.ARCHITECTURES[build.recipe.architecture]()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        return model.eval()
    model = train.train(build.recipe, threads)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), checkpoint)
    return model


def _ship(name: str, manifest: export.Manifest, source: Path, samples: np.ndarray, models_dir: Path) -> None:
    target = _model_path(name, models_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    golden.write_samples(target, samples)
    export.write_manifest(target.parent.parent, manifest, target)
    log.info("%s: wrote %s (%d bytes), samples.npz and model.toml", name, target, target.stat().st_size)


def build(spec: Build, threads: int, reuse: bool, models_dir: Path = MODELS_DIR) -> None:
    recipe = spec.recipe
    model = _trained(spec, threads, reuse)
    fp32 = CACHE_DIR / f"{spec.name}.fp32.onnx"
    int8 = CACHE_DIR / f"{spec.name}.int8.onnx"
    export.export_onnx(model, recipe.channels, recipe.size_px, fp32)
    calibration, _, _ = surfaces.dataset(
        CALIBRATION_SEED, spec.calibration_images, size=recipe.size_px, channels=recipe.channels
    )
    export.quantise(fp32, int8, calibration)
    samples = export.sample_images(SAMPLES_SEED, recipe.size_px, recipe.channels)
    _ship(spec.name, spec.manifest, int8, samples, models_dir)
    if spec.fp32_name:
        twin = export.Manifest(**{**spec.manifest.__dict__, "precision": "fp32", **FP32_TOLERANCE})
        _ship(spec.fp32_name, twin, fp32, samples, models_dir)
    if spec.uint8_name:
        log.info("%s: wrote %s", spec.uint8_name, camera.derive(spec.name, spec.uint8_name, models_dir))
    _check(spec, fp32, int8)


def _check(spec: Build, fp32: Path, int8: Path) -> None:
    """A quick look at the files just written on a seed of their own (the README's figures use report.py)."""
    images, _, labels = surfaces.dataset(
        CHECK_SEED, 128, size=spec.recipe.size_px, channels=spec.recipe.channels
    )
    p32, p8 = (golden.run(path, images)["defect_prob"][:, 0] for path in (fp32, int8))
    agreement = float(((p32 >= THRESHOLD) == (p8 >= THRESHOLD)).mean())
    auroc32, auroc8 = metrics.auroc(p32, labels), metrics.auroc(p8, labels)
    log.info(
        "%s: check AUROC fp32 %.4f int8 %.4f, int8/fp32 agreement %.3f, int8 %s",
        spec.name,
        auroc32,
        auroc8,
        agreement,
        metrics.at_threshold(p8, labels, THRESHOLD),
    )
    if agreement < 0.95 or auroc8 < auroc32 - 0.03:
        raise SystemExit(
            f"{spec.name}: int8 model departs from fp32 (AUROC {auroc8:.3f} vs {auroc32:.3f}, "
            f"agreement {agreement:.3f}); expected within 0.03 and at least 0.95"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--only", choices=sorted(BUILDS), action="append", help="build only this (repeatable)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: the recipe's); the same count on the same kind of CPU rebuilds "
        "identical files, so another count gives other (equally good) bits",
    )
    parser.add_argument(
        "--reuse-checkpoints",
        action="store_true",
        help="skip training where recipe/weights holds a checkpoint (re-export and re-quantise)",
    )
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=MODELS_DIR,
        help="model repository to write the shipped models into (default: models/, the bundled one)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for name in args.only or BUILDS:
        started_s = time.perf_counter()
        spec = BUILDS[name]
        build(spec, args.threads or spec.recipe.threads, args.reuse_checkpoints, args.models_dir)
        log.info("%s: built in %.0f s", name, time.perf_counter() - started_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
