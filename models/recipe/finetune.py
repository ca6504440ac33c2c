"""Fine-tune a reference model on a factory's own labelled images and export int8 and fp32 models.

    .venv/bin/python models/recipe/finetune.py --images DIR --labels labels.csv --out REPOSITORY

labels.csv has a header `file,label` and one row per image: a path relative to --images and 0 (ok) or 1
(defect). Images are PNG, JPEG, BMP or TIFF (whatever Pillow reads), of any size, grey or RGB: each is
converted to the model's channels and resized, whole, to its side (the aspect ratio is not kept, so no
defect is cropped away). Training starts from the shipped weights (recipe/weights/<architecture>.pt,
the checkpoint that `make models` trained), with the BatchNorm statistics held, image labels only (no
masks: defect_map is not trained further) and a low learning rate. A share of the images, stratified,
is kept aside to measure the base and the fine-tuned model at the decision threshold.

The result is a model repository folder the service serves as it is:
<out>/<name>/<version>/model.onnx (int8, calibrated on your images), <out>/<name>_fp32/<version>/model.onnx,
each with samples.npz (golden samples from your images) and model.toml (sha256, threshold), and
<out>/<name>/checkpoint.pt to fine-tune again from (--checkpoint).
Needs the train extra (torch and Pillow): .venv/bin/pip install -e '.[train]'.
"""

import argparse
import csv
import dataclasses
import json
import logging
import sys
from pathlib import Path

import build
import export
import golden
import metrics
import nets
import numpy as np
import torch
import train
from PIL import Image

log = logging.getLogger("finetune")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped fp32 checkpoints, one per architecture
MAX_CALIBRATION_IMAGES = 96


def checkpoint_path(architecture: str) -> Path:
    return WEIGHTS_DIR / f"{architecture}.pt"


def read_labels(path: Path) -> list[tuple[str, int]]:
    """Rows of `file,label` (label 0 or 1) after a header; a bad row is an error that names its line."""
    with path.open(newline="") as stream:
        rows = list(csv.reader(stream))
    if not rows or [cell.strip().lower() for cell in rows[0]] != ["file", "label"]:
        raise ValueError(f"{path}: the first line must be the header 'file,label'")
    labelled = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2 or row[1].strip() not in ("0", "1"):
            raise ValueError(
                f"{path}, line {line}: {','.join(row)!r}; expected 'file,label' with label 0 or 1"
            )
        labelled.append((row[0].strip(), int(row[1])))
    if not labelled:
        raise ValueError(f"{path}: no images listed")
    return labelled


def load_image(path: Path, size_px: int, channels: int) -> np.ndarray:
    """One image as float32 [channels, size_px, size_px] in [0, 1], resized whole (antialiased)."""
    with Image.open(path) as opened:
        if opened.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grey: scale, do not clip
            grey = np.asarray(opened, dtype=np.float32) / 65535.0
            picture = Image.fromarray(np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8), mode="L")
        else:
            picture = opened.convert("RGB" if channels == 3 else "L")
        picture = picture.convert("RGB" if channels == 3 else "L")
        resized = picture.resize((size_px, size_px), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) / 255
    return pixels[None] if channels == 1 else np.moveaxis(pixels, -1, 0).copy()


def split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices for training and validation: `share` of each class for validation, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    held = []
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        held.extend(members[: round(share * len(members))].tolist())
    held = np.array(sorted(held), dtype=int)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _measure(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    if len(images) == 0 or labels.min() == labels.max():
        return {}
    probabilities = train.predict(model, images)
    found = metrics.at_threshold(probabilities, labels, threshold)
    return {
        "auroc": round(metrics.auroc(probabilities, labels), 4),
        "false_positive_rate": round(found["false_positive_rate"], 4),
        "recall": round(1 - found["miss_rate"], 4),
    }


def _samples(images: np.ndarray, labels: np.ndarray, count: int = 6) -> np.ndarray:
    """Golden inputs: ok and defective images alternately, as far as there are both."""
    ok, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picked = [i for pair in zip(ok, bad, strict=False) for i in pair][:count]
    picked += [i for i in range(len(images)) if i not in picked][: max(count - len(picked), 0)]
    return images[sorted(picked)[:count]]


def finetune(args: argparse.Namespace) -> dict:
    spec = build.BUILDS[args.base]
    base = spec.recipe
    train.deterministic(args.seed, args.threads)
    rows = read_labels(args.labels)
    images = np.stack([load_image(args.images / name, base.size_px, base.channels) for name, _ in rows])
    labels = np.array([label for _, label in rows], np.int64)
    if labels.min() == labels.max():
        raise ValueError(f"{args.labels}: every image has label {labels[0]}; fine-tuning needs both 0 and 1")
    fit_at, held_at = split(labels, args.validation_share, args.seed)
    log.info(
        "%d images (%d defective): %d to train on, %d kept aside",
        len(labels),
        labels.sum(),
        len(fit_at),
        len(held_at),
    )

    model = nets.ARCHITECTURES[base.architecture]()
    start = args.checkpoint or checkpoint_path(base.architecture)
    model.load_state_dict(torch.load(start, weights_only=True))
    model.eval()
    threshold = args.threshold
    before = _measure(model, images[held_at], labels[held_at], threshold)
    recipe = dataclasses.replace(
        base,
        crop_px=base.size_px,
        train_images=len(fit_at),
        epochs=args.epochs,
        batch_size=min(args.batch_size, len(fit_at)),
        learning_rate=args.learning_rate,
        map_loss_weight=0.0,
        whole_image_steps=0,
        seed=args.seed,
    )
    pixels = torch.from_numpy(np.round(images[fit_at] * 255).astype(np.uint8))
    if args.epochs:
        validation = (images[held_at], labels[held_at]) if len(held_at) else (images[fit_at], labels[fit_at])
        model = train.fit(
            model, recipe, pixels, None, torch.from_numpy(labels[fit_at]), validation, freeze_batchnorm=True
        )
    after = _measure(model, images[held_at], labels[held_at], threshold)

    name = args.name or args.base
    int8 = args.out / name / str(args.version) / "model.onnx"
    fp32 = args.out / f"{name}_fp32" / str(args.version) / "model.onnx"
    export.export_onnx(model, base.channels, base.size_px, fp32)
    export.quantise(fp32, int8, images[fit_at][:MAX_CALIBRATION_IMAGES])
    samples = _samples(images, labels)
    description = (
        f"Fine-tuned from {args.base} by models/recipe/finetune.py on {len(fit_at)} labelled images "
        f"of {args.images.name} ({base.size_px}x{base.size_px}, {base.channels} channel(s), in [0, 1])."
    )
    parameters = {**spec.manifest.parameters, "decision_threshold": threshold}
    manifest = dataclasses.replace(spec.manifest, description=description, parameters=parameters)
    for path, precision in ((int8, "int8"), (fp32, "fp32")):
        tolerance = {} if precision == "int8" else build.FP32_TOLERANCE
        written = dataclasses.replace(manifest, precision=precision, **tolerance)
        golden.write_samples(path, samples)
        export.write_manifest(path.parent.parent, written, path, writer="models/recipe/finetune.py")
    torch.save(model.state_dict(), args.out / name / "checkpoint.pt")
    int8_decisions, fp32_decisions = (
        golden.run(path, images[held_at])["defect_prob"][:, 0] >= threshold if len(held_at) else np.array([])
        for path in (int8, fp32)
    )
    report = {
        "images": len(labels),
        "trained_on": len(fit_at),
        "kept_aside": len(held_at),
        "threshold": threshold,
        "before": before,
        "after": after,
        "int8_fp32_agreement": float((int8_decisions == fp32_decisions).mean()) if len(held_at) else None,
        "int8": str(int8),
        "fp32": str(fp32),
    }
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=Path, required=True, help="folder the CSV's paths are relative to")
    parser.add_argument("--labels", type=Path, required=True, help="CSV with the header file,label")
    parser.add_argument("--out", type=Path, default=Path("finetuned"), help="model repository to write into")
    parser.add_argument("--base", choices=sorted(build.BUILDS), default="surface_defect")
    parser.add_argument("--name", help="served model name (default: the base's name)")
    parser.add_argument("--version", type=int, default=1, help="version folder to write")
    parser.add_argument("--checkpoint", type=Path, help="start from this checkpoint, not the shipped one")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--validation-share", type=float, default=0.2, help="kept aside, per class")
    parser.add_argument("--threshold", type=float, default=build.THRESHOLD, help="decision threshold")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser


def run(argv: list[str]) -> dict:
    """Parse the command line, fine-tune, export; return the report that main() prints."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.version < 1:
        parser.error("--version must be a positive integer")
    if args.epochs < 0 or not 0 <= args.validation_share < 1:
        parser.error("--epochs must be 0 or more and --validation-share in [0, 1)")
    return finetune(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    print(json.dumps(run(sys.argv[1:] if argv is None else argv), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
