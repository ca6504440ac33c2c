"""models/recipe/finetune.py end to end: generated PNG files and a labels CSV in, a served repository out.

Needs the `train` extra (torch and Pillow), which `make test` does not install; elsewhere these tests skip.
On the build machine: .venv/bin/pip install -e '.[train]' and then
.venv/bin/python -m pytest -q -p no:cacheprovider tests/models/test_finetune.py (models/README.md).
"""

import hashlib
import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from recipe_path import recipe_first

pytest.importorskip("torch", reason="finetune.py needs torch: the train extra, not installed by make test")
pytest.importorskip("PIL", reason="finetune.py reads images with Pillow: the train extra")

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
FACTORY_SEED = 2026  # used nowhere else


@pytest.fixture(scope="module")
def recipe():
    """The recipe modules, imported the way the scripts import one another (their folder on sys.path)."""
    recipe_first()
    return {name: importlib.import_module(name) for name in ("finetune", "surfaces", "golden", "metrics")}


def _with_seam(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A factory's benign feature: a straight dark seam across every part, which the shipped model has never
    been told is fine (a long line reads as a scratch)."""
    size = image.shape[-1]
    y, x = np.mgrid[0:size, 0:size]
    angle, offset = rng.uniform(0, np.pi), rng.uniform(0.3, 0.7) * size
    distance = np.abs((x - size / 2) * np.sin(angle) - (y - size / 2) * np.cos(angle) + offset - size / 2)
    return np.clip(image - 0.1 * np.exp(-0.5 * (distance / 1.0) ** 2), 0, 1)


def factory_parts(surfaces, count: int, first: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` grey 128 px parts of one line (seamed, half defective) as float [N, 1, 128, 128], labels."""
    rng = np.random.default_rng([FACTORY_SEED, first])
    parts = [surfaces.surface(FACTORY_SEED, i, defect=bool(i % 2)) for i in range(first, first + count)]
    images = np.stack([_with_seam(part.image, rng) for part in parts]).astype(np.float32)
    return np.round(images * 255) / 255, np.array([part.label for part in parts])


@pytest.fixture(scope="module")
def factory(recipe, tmp_path_factory):
    """A folder of PNG files as cameras write them (grey, RGB, other sides, a subfolder) and its CSV."""
    surfaces = recipe["surfaces"]
    folder = tmp_path_factory.mktemp("factory")
    images, labels = factory_parts(surfaces, 64, 0)
    rows = ["file,label"]
    for index, (image, label) in enumerate(zip(images, labels, strict=True)):
        if index % 3 == 1:  # RGB at 160 px: the model wants grey 128 px
            picture = np.repeat(image, 3, axis=0).repeat(5, axis=1).repeat(5, axis=2)[:, ::4, ::4]
            name = f"rgb/part{index:03d}.png"
        elif index % 3 == 2:  # a wider grey frame (the aspect ratio is not kept)
            picture = image.repeat(2, axis=2)[:, :, ::2].repeat(3, axis=2)[:, :, ::2]
            name = f"part{index:03d}.png"
        else:
            picture, name = image, f"part{index:03d}.png"
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_bytes(surfaces._png_bytes(picture))
        rows.append(f"{name},{label}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def _run(recipe, factory: Path, out: Path, *extra: str) -> dict:
    finetune = recipe["finetune"]
    args = ["--images", str(factory), "--labels", str(factory / "labels.csv"), "--out", str(out), *extra]
    return finetune.run(args)


@pytest.fixture(scope="module")
def tuned(recipe, factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("repository")
    return out, _run(recipe, factory, out, "--epochs", "8", "--learning-rate", "1e-3")


def _probabilities(path: Path, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["defect_prob"], {"image": images})[0][:, 0]


def test_zero_epochs_reproduce_the_shipped_model(recipe, factory, tmp_path):
    """The shipped checkpoint is the shipped model: fine-tuning starts from what the line runs today."""
    _run(recipe, factory, tmp_path, "--epochs", "0")
    with np.load(MODELS_DIR / "surface_defect_fp32" / "1" / "samples.npz") as samples:
        images, expected = samples["input__image"], samples["output__defect_prob"][:, 0]
    exported = _probabilities(tmp_path / "surface_defect_fp32" / "1" / "model.onnx", images)
    np.testing.assert_allclose(exported, expected, atol=1e-4)


def test_the_repository_is_served_as_written(tuned):
    out, _ = tuned
    for name, precision in (("surface_defect", "int8"), ("surface_defect_fp32", "fp32")):
        path = out / name / "1" / "model.onnx"
        manifest = tomllib.loads((out / name / "model.toml").read_text())
        assert manifest["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert manifest["precision"] == precision
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        shipped = ort.InferenceSession(
            str(MODELS_DIR / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"]
        )
        for mine, theirs in (
            (session.get_inputs, shipped.get_inputs),
            (session.get_outputs, shipped.get_outputs),
        ):
            assert [(t.name, t.type, t.shape) for t in mine()] == [
                (t.name, t.type, t.shape) for t in theirs()
            ]
        with np.load(path.parent / "samples.npz") as samples:
            arrays = dict(samples)
        produced = session.run(["defect_prob", "defect_map"], {"image": arrays["input__image"]})
        for output, value in zip(("defect_prob", "defect_map"), produced, strict=True):
            np.testing.assert_allclose(
                value,
                arrays[f"output__{output}"],
                atol=manifest["samples"]["atol"],
                rtol=manifest["samples"]["rtol"],
            )
    checked = subprocess.run(
        [sys.executable, "-m", "appliance", "models", "check", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_int8_weights_are_stored_unsigned(tuned):
    onnx = pytest.importorskip("onnx")
    out, _ = tuned
    graph = onnx.load(str(out / "surface_defect" / "1" / "model.onnx")).graph
    kinds = {t.name: t.data_type for t in graph.initializer}
    weights = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in kinds]
    assert weights and all(kinds[w] != onnx.TensorProto.INT8 for w in weights)


def test_fine_tuning_learns_the_factory_s_benign_seam(recipe, tuned):
    """On new parts of the same line, the fine-tuned int8 model rejects fewer good parts than the shipped one:
    the seam that made the shipped model reject them is partly learnt as benign, and defects are still found.
    With 51 training images the gain is modest (models/README.md has the measured figures), so the bars are
    a direction, not a target."""
    out, report = tuned
    metrics = recipe["metrics"]
    images, labels = factory_parts(recipe["surfaces"], 96, 1000)
    shipped = _probabilities(MODELS_DIR / "surface_defect" / "1" / "model.onnx", images)
    tuned_int8 = _probabilities(out / "surface_defect" / "1" / "model.onnx", images)
    tuned_fp32 = _probabilities(out / "surface_defect_fp32" / "1" / "model.onnx", images)
    before, after = (metrics.at_threshold(p, labels, 0.5) for p in (shipped, tuned_int8))
    assert before["false_positive_rate"] >= 0.3, "the seam no longer fools the shipped model: pick another"
    assert after["false_positive_rate"] <= 0.8 * before["false_positive_rate"]
    assert after["miss_rate"] <= 0.5
    assert ((tuned_int8 >= 0.5) == (tuned_fp32 >= 0.5)).mean() >= 0.95
    assert report["trained_on"] + report["kept_aside"] == 64 and report["kept_aside"] > 0


def test_a_bad_labels_file_is_refused_with_its_line(recipe, factory, tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("file,label\npart000.png,0\npart001.png,yes\n")
    with pytest.raises(ValueError, match="line 3"):
        recipe["finetune"].run(["--images", str(factory), "--labels", str(bad), "--out", str(tmp_path / "o")])


def test_the_224_model_s_shipped_checkpoint_is_the_shipped_model(recipe, factory, tmp_path):
    """recipe/weights/mobile_surface_net.pt ships with surface_defect_224: zero epochs from it export the
    shipped model's fp32 twin, whose answers to the shipped golden samples (int8 outputs) differ by
    no more than the int8 model itself does from fp32 (models/README.md: at most 0.08 on 800 images)."""
    _run(recipe, factory, tmp_path, "--base", "surface_defect_224", "--epochs", "0")
    written = sorted(path.parent.parent.name for path in tmp_path.glob("*/1/model.onnx"))
    fp32 = next(name for name in written if name.endswith("fp32"))
    with np.load(MODELS_DIR / "surface_defect_224" / "1" / "samples.npz") as samples:
        images, expected = samples["input__image"], samples["output__defect_prob"][:, 0]
    exported = _probabilities(tmp_path / fp32 / "1" / "model.onnx", images)
    np.testing.assert_allclose(exported, expected, atol=0.08)
