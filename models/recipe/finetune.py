"""Fine-tune a reference model on a factory's own labelled images and export int8 and fp32 models.

    .venv/bin/python models/recipe/finetune.py --images DIR --labels labels.csv --out REPOSITORY

labels.csv (UTF-8) has a header `file,label` and one row per image: a path relative to --images ("/" or "\\"
between folders) and 0 (ok) or 1 (defect); each image once. Images are PNG, JPEG, BMP or TIFF (whatever
Pillow reads), of any size, grey or RGB, 8-bit, 16-bit grey (12-bit camera data in a 16-bit file is scaled
by its real depth) or float grey in 0..1: each is converted to the model's channels and resized, whole, to
its side (the aspect ratio is not kept, so no defect is cropped away). Training starts from the shipped
weights (recipe/weights/<architecture>.pt, the checkpoint that `make models` trained), with the BatchNorm
statistics held, image labels only (no masks: defect_map is not trained further) and a low learning rate.
A share of the images, stratified, is kept aside to measure the base and the fine-tuned model at the
decision threshold.

The result is a model repository folder the service serves as it is:
<out>/<name>/<version>/model.onnx (int8, calibrated on your images), <out>/<name>_fp32/<version>/model.onnx,
each with samples.npz (golden samples from your images) and model.toml (sha256, threshold), and
<out>/<name>/checkpoint.pt to fine-tune again from (--checkpoint). The version is one above any already
there; --out may be the repository a server is serving from, as each model changes over in one step.
A flag, row or image that cannot be used ends the run before training, with exit status 2 and every
problem found. Needs the train extra (torch and Pillow): .venv/bin/pip install -e '.[train]'.
"""

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path

import build
import export
import golden
import metrics
import nets
import numpy as np
import torch
import train
from photos import InputError, image_paths, load_images, read_labels
from publish import publish, version_to_write

from appliance.engine.repository import _NAME as MODEL_NAME

log = logging.getLogger("finetune")
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"  # shipped fp32 checkpoints, one per architecture
MAX_CALIBRATION_IMAGES = 96
MAX_TRAINING_CHECK_IMAGES = 256  # what train.fit scores each epoch when nothing usable was kept aside


def checkpoint_path(architecture: str) -> Path:
    return WEIGHTS_DIR / f"{architecture}.pt"


def _floats(pixels: np.ndarray) -> np.ndarray:
    """Images on the 0..255 scale as the float32 [0, 1] that the models take."""
    return pixels.astype(np.float32) / 255


def split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices for training and validation: `share` of each class for validation, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    held = []
    for value in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == value))
        held.extend(members[: round(share * len(members))].tolist())
    held = np.array(sorted(held), dtype=int)
    return np.setdiff1d(np.arange(len(labels)), held), held


def _class_counts(labels: np.ndarray) -> str:
    return f"{int((labels == 0).sum())} ok and {int((labels == 1).sum())} defective"


def _unmeasured_because(held_labels: np.ndarray) -> str | None:
    """Why the kept-aside images cannot measure a model (AUROC and recall need both classes), if so."""
    if len(held_labels) == 0:
        return "nothing was kept aside; add images or raise --validation-share"
    if held_labels.min() == held_labels.max():
        missing = "defect" if held_labels[0] == 0 else "ok image"
        return f"the kept-aside set has no {missing}; add more or raise --validation-share"
    return None


def _measure(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    if _unmeasured_because(labels):
        return {}
    probabilities = train.predict(model, images)
    found = metrics.at_threshold(probabilities, labels, threshold)
    return {
        "auroc": round(metrics.auroc(probabilities, labels), 4),
        "false_positive_rate": round(found["false_positive_rate"], 4),
        "recall": round(1 - found["miss_rate"], 4),
    }


def _alternating(labels: np.ndarray, count: int) -> np.ndarray:
    """Up to `count` indices, sorted: ok and defective alternately, as far as there are both."""
    ok, bad = np.flatnonzero(labels == 0), np.flatnonzero(labels == 1)
    picked = [i for pair in zip(ok, bad, strict=False) for i in pair][:count]
    picked += [i for i in range(len(labels)) if i not in picked][: max(count - len(picked), 0)]
    return np.array(sorted(picked)[:count], dtype=int)


@contextlib.contextmanager
def _scored_on_training_images():
    """train.fit logs its per-epoch score as "validation AUROC"; say where it comes from when nothing usable
    was kept aside and the training images stand in."""

    def relabel(record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = record.msg.replace("validation AUROC", "AUROC on training images (not a validation)")
        return True

    logger = logging.getLogger(train.__name__)
    logger.addFilter(relabel)
    try:
        yield
    finally:
        logger.removeFilter(relabel)


def _split_checked(labels: np.ndarray, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """split(), refused where the images left to train on lack a class."""
    if labels.min() == labels.max():
        raise InputError(f"{args.labels}: every image has label {labels[0]}; fine-tuning needs both 0 and 1")
    fit_at, held_at = split(labels, args.validation_share, args.seed)
    if len(np.unique(labels[fit_at])) < 2:
        raise InputError(
            f"{args.labels}: with --validation-share {args.validation_share}, the {len(fit_at)} images left "
            f"to train on are {_class_counts(labels[fit_at])}; training needs both: lower "
            "--validation-share or add images"
        )
    return fit_at, held_at


def finetune(args: argparse.Namespace) -> dict:
    spec = build.BUILDS[args.base]
    base = spec.recipe
    name = args.name or args.base
    names = (name, f"{name}_fp32")
    version = version_to_write(args.out, names, args.version)
    train.deterministic(args.seed, args.threads)
    rows = read_labels(args.labels)
    paths = image_paths(args.images, rows, args.labels)
    labels = np.array([row.label for row in rows], np.int64)
    fit_at, held_at = _split_checked(labels, args)
    order = np.concatenate([fit_at, held_at])  # the training images first, so that they are a view
    pixels = load_images(paths, rows, base.size_px, base.channels, args.labels, order)
    fitting, kept_aside = pixels[: len(fit_at)], pixels[len(fit_at) :]
    log.info(
        "%d images (%d defective): %d to train on, %d kept aside",
        len(labels),
        labels.sum(),
        len(fit_at),
        len(held_at),
    )
    unmeasured = _unmeasured_because(labels[held_at])
    if unmeasured:
        log.warning("no before and after figures: %s", unmeasured)

    model = nets.ARCHITECTURES[base.architecture]()
    start = args.checkpoint or checkpoint_path(base.architecture)
    model.load_state_dict(torch.load(start, weights_only=True))
    model.eval()
    threshold = args.threshold
    held = _floats(kept_aside)
    before = _measure(model, held, labels[held_at], threshold)
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
    if args.epochs:
        if unmeasured:
            checked = _alternating(labels[fit_at], MAX_TRAINING_CHECK_IMAGES)
            validation = (_floats(fitting[checked]), labels[fit_at][checked])
            scored = _scored_on_training_images()
        else:
            validation, scored = (held, labels[held_at]), contextlib.nullcontext()
        with scored:
            model = train.fit(
                model,
                recipe,
                torch.from_numpy(fitting),
                None,
                torch.from_numpy(labels[fit_at]),
                validation,
                freeze_batchnorm=True,
            )
    after = _measure(model, held, labels[held_at], threshold)

    args.out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".finetune-", dir=args.out))  # the engine skips dot-folders
    try:
        int8, fp32 = (staging / served / str(version) / "model.onnx" for served in names)
        export.export_onnx(model, base.channels, base.size_px, fp32)
        export.quantise(fp32, int8, _floats(fitting[:MAX_CALIBRATION_IMAGES]))
        samples = _floats(pixels[np.argsort(order)[_alternating(labels, 6)]])
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
        torch.save(model.state_dict(), staging / name / "checkpoint.pt")
        int8_decisions, fp32_decisions = (
            golden.run(path, held)["defect_prob"][:, 0] >= threshold if len(held_at) else np.array([])
            for path in (int8, fp32)
        )
        publish(staging, args.out, names, version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report = {
        "images": len(labels),
        "trained_on": len(fit_at),
        "kept_aside": len(held_at),
        "threshold": threshold,
        "before": before,
        "after": after,
        "int8_fp32_agreement": float((int8_decisions == fp32_decisions).mean()) if len(held_at) else None,
        "int8": str(args.out / name / str(version) / "model.onnx"),
        "fp32": str(args.out / f"{name}_fp32" / str(version) / "model.onnx"),
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
    parser.add_argument("--version", type=int, help="version folder to write (default: the next one)")
    parser.add_argument("--checkpoint", type=Path, help="start from this checkpoint, not the shipped one")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--validation-share", type=float, default=0.2, help="kept aside, per class")
    parser.add_argument("--threshold", type=float, default=build.THRESHOLD, help="decision threshold")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    return parser


def _flag_problems(args: argparse.Namespace) -> list[str]:
    """What is wrong with the flags, each naming the flag, the value and what it takes."""
    problems = []
    name = args.name or args.base
    for served in (name, f"{name}_fp32"):
        if not MODEL_NAME.match(served):
            problems.append(
                f"--name {name!r}: {served!r} is not a model name the engine serves: a letter or digit, "
                "then letters, digits, '_', '.' or '-', 128 characters at most"
            )
            break
    if args.version is not None and args.version < 1:
        problems.append(f"--version {args.version}: must be 1 or more")
    if args.epochs < 0:
        problems.append(f"--epochs {args.epochs}: must be 0 or more")
    if args.batch_size < 1:
        problems.append(f"--batch-size {args.batch_size}: must be 1 or more")
    if args.threads < 1:
        problems.append(f"--threads {args.threads}: must be 1 or more")
    if not 0 <= args.validation_share < 1:
        problems.append(f"--validation-share {args.validation_share}: must be at least 0 and below 1")
    if not (math.isfinite(args.learning_rate) and args.learning_rate > 0):
        problems.append(f"--learning-rate {args.learning_rate}: must be above 0")
    if not 0 < args.threshold < 1:
        problems.append(f"--threshold {args.threshold}: must lie between 0 and 1, both excluded")
    if not args.images.is_dir():
        problems.append(f"--images {args.images}: not a folder")
    if args.checkpoint is not None and not args.checkpoint.is_file():
        problems.append(f"--checkpoint {args.checkpoint}: no such file")
    return problems


def run(argv: list[str]) -> dict:
    """Parse the command line, fine-tune, export; return the report that main() prints. A wrong flag exits 2
    (argparse's way); InputError for labels, images or an --out that cannot be used."""
    parser = _parser()
    args = parser.parse_args(argv)
    if problems := _flag_problems(args):
        parser.error("\n  ".join(problems))
    return finetune(args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    try:
        report = run(sys.argv[1:] if argv is None else argv)
    except InputError as exc:
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a full disk, an --out that may not be written: the one line says which
        print(f"finetune.py: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
