"""Leave-one-family-out evaluation: for each texture family, train without it and test on it.

A family is one texture generator of textures.py with all of its parameters randomised. Each fold trains
the build's recipe on the other families (optionally on a shorter schedule: --epochs, --train-images),
exports fp32, quantises int8 with calibration images of the training families only, and measures both
on the held-out family and, for comparison, on new images of the training families. Folds are cached
in models/.cache/lofo/ (checkpoint and JSON), so an interrupted study resumes where it stopped.

    .venv/bin/python models/recipe/lofo.py --model surface_defect            # all folds, then the table
    .venv/bin/python models/recipe/lofo.py --model surface_defect --table    # the table from the cache
"""

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import build
import export
import golden
import metrics
import nets
import numpy as np
import surfaces
import torch
import train

log = logging.getLogger("lofo")
LOFO_DIR = build.CACHE_DIR / "lofo"
TEST_SEED = 1000  # the held-out seed of report.py; never used for training, calibration or samples


def _fold_name(model: str, family: str, recipe: train.Recipe) -> str:
    return f"{model}-without-{family}-{recipe.train_images}x{recipe.epochs}"


def _fold_recipe(spec: build.Build, family: str, epochs: int | None, images: int | None) -> train.Recipe:
    recipe = spec.recipe
    return dataclasses.replace(
        recipe,
        families=tuple(f for f in surfaces.TEXTURES if f != family),
        epochs=epochs or recipe.epochs,
        train_images=images or recipe.train_images,
    )


def scores(probabilities: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    found = metrics.at_threshold(probabilities, labels, threshold)
    return {
        "auroc": metrics.auroc(probabilities, labels),
        "false_positive_rate": found["false_positive_rate"],
        "recall": 1 - found["miss_rate"],
    }


def evaluate(
    int8: Path, fp32: Path, recipe: train.Recipe, families: tuple[str, ...], count: int
) -> dict[str, object]:
    """int8 and fp32 figures on `count` new images of `families` (half defective), per defect kind too."""
    items = [
        surfaces.surface(
            TEST_SEED, i, size=recipe.size_px, channels=recipe.channels, defect=bool(i % 2), families=families
        )
        for i in range(count)
    ]
    images = np.stack([s.image for s in items])
    labels = np.array([s.label for s in items])
    kinds = np.array([s.defect or "" for s in items])
    p8, p32 = (golden.run(path, images)["defect_prob"][:, 0] for path in (int8, fp32))
    threshold = build.THRESHOLD
    return {
        "images": count,
        "int8": scores(p8, labels, threshold),
        "fp32": scores(p32, labels, threshold),
        "agreement": float(((p8 >= threshold) == (p32 >= threshold)).mean()),
        "recall_by_defect": {k: float((p8[kinds == k] >= threshold).mean()) for k in surfaces.DEFECTS},
    }


def fold(spec: build.Build, family: str, args: argparse.Namespace) -> dict:
    recipe = _fold_recipe(spec, family, args.epochs, args.train_images)
    name = _fold_name(spec.name, family, recipe)
    result_path = LOFO_DIR / f"{name}.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    started_s = time.perf_counter()
    checkpoint = LOFO_DIR / f"{name}.pt"
    if checkpoint.exists():
        train.deterministic(recipe.seed, args.threads)
        model = nets.ARCHITECTURES[recipe.architecture]()
        model.load_state_dict(torch.load(checkpoint, weights_only=True))
        model.eval()
    else:
        model = train.train(recipe, args.threads)
        LOFO_DIR.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), checkpoint)
    trained_s = time.perf_counter() - started_s
    fp32, int8 = LOFO_DIR / f"{name}.fp32.onnx", LOFO_DIR / f"{name}.int8.onnx"
    export.export_onnx(model, recipe.channels, recipe.size_px, fp32)
    calibration, _, _ = surfaces.dataset(
        build.CALIBRATION_SEED,
        spec.calibration_images,
        size=recipe.size_px,
        channels=recipe.channels,
        families=recipe.families,
    )
    export.quantise(fp32, int8, calibration)
    result = {
        "model": spec.name,
        "held_out": family,
        "train_images": recipe.train_images,
        "epochs": recipe.epochs,
        "train_s": round(trained_s),
        "held_out_family": evaluate(int8, fp32, recipe, (family,), args.test_images),
        "training_families": evaluate(int8, fp32, recipe, recipe.families, args.test_images),
    }
    result_path.write_text(json.dumps(result, indent=1) + "\n")
    log.info("%s: %s", name, json.dumps(result))
    return result


def table(results: list[dict]) -> str:
    """Markdown: one row per held-out family, held-out and in-distribution figures side by side."""
    lines = [
        "| held-out family | AUROC | FP rate | recall | int8/fp32 agree | recall scratch/crack/spot/patch "
        "| other families: AUROC | FP rate | recall |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        held, seen = r["held_out_family"], r["training_families"]
        kinds = "/".join(f"{held['recall_by_defect'][k]:.2f}" for k in surfaces.DEFECTS)
        lines.append(
            f"| {r['held_out']} | {held['int8']['auroc']:.3f} | {held['int8']['false_positive_rate']:.3f} "
            f"| {held['int8']['recall']:.3f} | {held['agreement']:.3f} | {kinds} "
            f"| {seen['int8']['auroc']:.3f} | {seen['int8']['false_positive_rate']:.3f} "
            f"| {seen['int8']['recall']:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=sorted(build.BUILDS), default="surface_defect")
    parser.add_argument("--only", choices=surfaces.TEXTURES, action="append", help="this fold only")
    parser.add_argument("--epochs", type=int, help="shorter schedule than the build's, for the study")
    parser.add_argument("--train-images", type=int, help="fewer training images than the build's")
    parser.add_argument("--test-images", type=int, default=600, help="per test set, half defective")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--table", action="store_true", help="print the table of the cached folds only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    spec = build.BUILDS[args.model]
    results = []
    for family in args.only or surfaces.TEXTURES:
        if args.table:
            recipe = _fold_recipe(spec, family, args.epochs, args.train_images)
            path = LOFO_DIR / f"{_fold_name(spec.name, family, recipe)}.json"
            if path.exists():
                results.append(json.loads(path.read_text()))
        else:
            results.append(fold(spec, family, args))
    print(table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
