"""The bundled reference models: held-out quality, golden samples, manifests, I/O contract, generator."""

import hashlib
import importlib.util
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from recipe_path import recipe_first

MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
SHIPPED = ("surface_defect", "surface_defect_fp32", "surface_defect_224", "surface_defect_224_u8")
# name -> (side px, channels, map cells, held-out images); seeds here are used nowhere in models/recipe
SHAPES = {
    "surface_defect": (128, 1, 16, 240),
    "surface_defect_fp32": (128, 1, 16, 240),
    "surface_defect_224": (224, 3, 28, 96),
    "surface_defect_224_u8": (224, 3, 28, 96),
}
UINT8_TWINS = {"surface_defect_224_u8": "surface_defect_224"}  # twin -> parent (models/recipe/camera.py)
TEST_SEED = 2024
MANIFEST_KEYS = {
    "description",
    "labels",
    "precision",
    "sha256",
    "slo_p99_ms",
    "batching",
    "samples",
    "parameters",
}


def _auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    positive, negative = scores[labels == 1], scores[labels == 0]
    wins = (positive[:, None] > negative[None, :]).sum() + 0.5 * (
        positive[:, None] == negative[None, :]
    ).sum()
    return float(wins / (len(positive) * len(negative)))


@pytest.fixture(scope="module")
def surfaces():
    """models/recipe/surfaces.py, imported by path: models/ is a model repository, not a package (its
    siblings textures.py and optics.py are found on sys.path)."""
    recipe_first()
    spec = importlib.util.spec_from_file_location("recipe_surfaces", MODELS_DIR / "recipe" / "surfaces.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _session(name: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(
        str(MODELS_DIR / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )


@pytest.fixture(scope="module", params=SHIPPED)
def shipped(request):
    manifest = tomllib.loads((MODELS_DIR / request.param / "model.toml").read_text())
    return request.param, _session(request.param), manifest


@pytest.fixture(scope="module")
def held_out(surfaces):
    """Seeded held-out images per side, generated once for the module."""
    cache = {}

    def make(name: str):
        size_px, channels, _, count = SHAPES[name]
        if (size_px, channels) not in cache:
            cache[size_px, channels] = surfaces.dataset(TEST_SEED, count, size=size_px, channels=channels)
        return cache[size_px, channels]

    return make


def image_dtype(name: str) -> type[np.generic]:
    return np.uint8 if name in UINT8_TWINS else np.float32


def _camera():
    """models/recipe/camera.py, imported by path like surfaces.py (with its sibling golden.py)."""
    recipe_first()
    spec = importlib.util.spec_from_file_location("recipe_camera", MODELS_DIR / "recipe" / "camera.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _probabilities(name: str, images: np.ndarray) -> np.ndarray:
    session = _session(name)
    return np.concatenate(
        [
            session.run(["defect_prob"], {"image": images[i : i + 16]})[0][:, 0]
            for i in range(0, len(images), 16)
        ]
    )


def test_manifest_sha256_matches_the_served_file(shipped):
    name, _, manifest = shipped
    assert (
        manifest["sha256"]
        == hashlib.sha256((MODELS_DIR / name / "1" / "model.onnx").read_bytes()).hexdigest()
    )


def test_manifest_has_only_the_engine_keys(shipped):
    name, _, manifest = shipped
    assert set(manifest) <= MANIFEST_KEYS
    assert manifest["labels"] == ["ok", "defect"]
    assert manifest["precision"] == ("fp32" if name.endswith("_fp32") else "int8")
    batching = manifest["batching"]
    assert max(batching["preferred_batch_sizes"]) <= batching["max_batch_size"]
    assert 0 < manifest["parameters"]["decision_threshold"] < 1
    assert manifest["samples"]["atol"] >= 0 and manifest["samples"]["rtol"] >= 0


def test_io_contract_with_a_dynamic_batch(shipped):
    name, session, _ = shipped
    size_px, channels, cells, _ = SHAPES[name]
    (image,) = session.get_inputs()
    pixels = name in UINT8_TWINS
    assert (image.name, image.type) == ("image", "tensor(uint8)" if pixels else "tensor(float)")
    assert isinstance(image.shape[0], str) and image.shape[1:] == [channels, size_px, size_px]
    outputs = {o.name: o for o in session.get_outputs()}
    assert set(outputs) == {"defect_prob", "defect_map"}
    assert all(o.type == "tensor(float)" and isinstance(o.shape[0], str) for o in outputs.values())
    assert outputs["defect_prob"].shape[1:] == [1]
    assert outputs["defect_map"].shape[1:] == [1, cells, cells]
    prob, cell_map = session.run(
        ["defect_prob", "defect_map"],
        {"image": np.full((3, channels, size_px, size_px), 128 if pixels else 0.5, image_dtype(name))},
    )
    assert prob.shape == (3, 1) and cell_map.shape == (3, 1, cells, cells)
    assert ((prob >= 0) & (prob <= 1)).all() and ((cell_map >= 0) & (cell_map <= 1)).all()


def test_golden_samples_reproduce_within_the_manifest_tolerance(shipped):
    name, session, manifest = shipped
    with np.load(MODELS_DIR / name / "1" / "samples.npz") as samples:
        arrays = dict(samples)
    assert set(arrays) == {"input__image", "output__defect_prob", "output__defect_map"}
    assert 4 <= len(arrays["input__image"]) <= 16
    produced = dict(
        zip(
            ["defect_prob", "defect_map"],
            session.run(["defect_prob", "defect_map"], {"image": arrays["input__image"]}),
            strict=True,
        )
    )
    for output, value in produced.items():
        np.testing.assert_allclose(
            value,
            arrays[f"output__{output}"],
            atol=manifest["samples"]["atol"],
            rtol=manifest["samples"]["rtol"],
            err_msg=f"{name} {output}",
        )


# Floors against a broken build, a little under what the shipped files measure on these images (0.91 and
# 0.70), not issue 18's held-out targets (models/README.md has the figures). surface_defect_224 was trained
# on the earlier, narrower generator and not retrained since.
@pytest.mark.parametrize(("name", "min_auroc"), [("surface_defect", 0.88), ("surface_defect_224", 0.65)])
def test_int8_model_separates_defects_on_held_out_surfaces(name, min_auroc, held_out):
    images, _, labels = held_out(name)
    assert _auroc(_probabilities(name, images), labels) >= min_auroc


def test_int8_model_agrees_with_fp32_at_the_threshold(held_out):
    images, _, _ = held_out("surface_defect")
    threshold = tomllib.loads((MODELS_DIR / "surface_defect" / "model.toml").read_text())["parameters"][
        "decision_threshold"
    ]
    int8, fp32 = (
        _probabilities(name, images) >= threshold for name in ("surface_defect", "surface_defect_fp32")
    )
    assert (int8 == fp32).mean() >= 0.97


@pytest.mark.parametrize(("twin", "parent"), sorted(UINT8_TWINS.items()))
def test_uint8_twin_decides_as_its_parent_on_8_bit_images(twin, parent, held_out):
    images, _, labels = held_out(parent)
    pixels = _camera().to_pixels(images)
    from_pixels = _probabilities(twin, pixels)
    from_floats = _probabilities(parent, pixels.astype(np.float32) / 255)
    np.testing.assert_allclose(from_pixels, from_floats, atol=0.05)
    assert ((from_pixels >= 0.5) == (from_floats >= 0.5)).mean() >= 0.98
    assert _auroc(from_pixels, labels) >= 0.65  # the parent's floor above


@pytest.mark.parametrize(("twin", "parent"), sorted(UINT8_TWINS.items()))
def test_camera_recipe_rebuilds_the_shipped_uint8_twin(twin, parent, tmp_path):
    shutil.copytree(MODELS_DIR / parent, tmp_path / parent)
    written = _camera().derive(parent, twin, tmp_path)
    shipped = tomllib.loads((MODELS_DIR / twin / "model.toml").read_text())
    assert hashlib.sha256(written.read_bytes()).hexdigest() == shipped["sha256"]
    assert (tmp_path / twin / "model.toml").read_text() == (MODELS_DIR / twin / "model.toml").read_text()


def test_int8_model_is_quantised_and_fp32_twin_is_not():
    onnx = pytest.importorskip("onnx")
    ops = {
        name: {node.op_type for node in onnx.load(str(MODELS_DIR / name / "1" / "model.onnx")).graph.node}
        for name in SHIPPED
    }
    assert "QuantizeLinear" in ops["surface_defect"] and "QuantizeLinear" in ops["surface_defect_224"]
    assert "QuantizeLinear" not in ops["surface_defect_fp32"]


def test_the_int8_models_keep_their_first_convolution_in_fp32():
    """It reads the image, few channels, where ONNX Runtime's int8 kernels do worst (recipe/export.py):
    in fp32 the 128 px model's ran 7 times faster, and the 224 px files are 5% faster per image."""
    onnx = pytest.importorskip("onnx")
    for name in ("surface_defect", "surface_defect_224", *UINT8_TWINS):
        graph = onnx.load(str(MODELS_DIR / name / "1" / "model.onnx")).graph
        made_by = {output: node.op_type for node in graph.node for output in node.output}
        convs = [node for node in graph.node if node.op_type == "Conv"]
        dequantised = [[made_by.get(i) == "DequantizeLinear" for i in conv.input[:2]] for conv in convs]
        assert dequantised[0] == [False, False], (name, convs[0].name)  # image and weight in fp32
        assert [True, True] in dequantised[1:], name  # and the others int8


def test_int8_weights_are_stored_unsigned_so_no_x86_kernel_saturates():
    onnx = pytest.importorskip("onnx")
    for name in ("surface_defect", "surface_defect_224", *UINT8_TWINS):
        graph = onnx.load(str(MODELS_DIR / name / "1" / "model.onnx")).graph
        initializers = {tensor.name: tensor.data_type for tensor in graph.initializer}
        weights = [
            n.input[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in initializers
        ]
        assert any(initializers[w] == onnx.TensorProto.UINT8 for w in weights), name
        signed = [w for w in weights if initializers[w] == onnx.TensorProto.INT8]  # biases stay int32
        assert not signed, (
            f"{name}: int8 weights {signed[:3]} saturate on x86 without VNNI (recipe/unsigned.py)"
        )


@pytest.mark.parametrize("name", ["surface_defect", "surface_defect_224"])
def test_fused_int8_kernels_agree_with_the_float_emulation_of_the_graph(name, held_out):
    images, _, _ = held_out(name)
    path = str(MODELS_DIR / name / "1" / "model.onnx")
    outputs = {}
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        outputs[level] = session.run(["defect_prob", "defect_map"], {"image": images[:32]})
    emulated, fused = outputs.values()
    tolerance = tomllib.loads((MODELS_DIR / name / "model.toml").read_text())["samples"]["atol"]
    for expected, actual in zip(emulated, fused, strict=True):
        np.testing.assert_allclose(actual, expected, atol=tolerance, rtol=0)


def test_generator_is_deterministic_per_seed(surfaces):
    first, again, other = (surfaces.surface(seed, 3, defect=True) for seed in (7, 7, 8))
    np.testing.assert_array_equal(first.image, again.image)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not np.array_equal(first.image, other.image)


@pytest.mark.parametrize(("size_px", "channels"), [(128, 1), (224, 3)])
def test_generator_masks_agree_with_labels(surfaces, size_px, channels):
    images, masks, labels = surfaces.dataset(TEST_SEED + 1, 24, size=size_px, channels=channels)
    assert images.shape == (24, channels, size_px, size_px) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    np.testing.assert_array_equal(np.round(images * 255) / 255, images)  # 8-bit levels, like a camera
    np.testing.assert_array_equal(masks.any(axis=(1, 2)), labels == 1)
    assert labels.mean() == 0.5


@pytest.mark.parametrize("texture", ["woven", "brushed", "granular", "wood", "cellular", "mottled"])
def test_every_defect_shows_on_every_family_and_only_around_its_mask(surfaces, texture):
    """Every kind of defect changes its own pixels far more than the rest (blur, noise and block
    compression spread it a little), so no label stands for an invisible defect."""
    for index, kind in enumerate(surfaces.DEFECTS * 2):
        clean = surfaces.surface(11, index, texture=texture, defect=False)
        flawed = surfaces.surface(11, index, texture=texture, defect=True, defect_kind=kind)
        difference = np.abs(flawed.image[0] - clean.image[0])
        assert clean.texture == flawed.texture == texture and not clean.mask.any()
        assert flawed.mask.any(), kind
        assert difference[flawed.mask].mean() > 5 * difference[~flawed.mask].mean(), kind
        assert difference[flawed.mask].mean() > 0.25 * clean.image[0].std(), kind


def test_families_restrict_the_textures_drawn(surfaces):
    """What leave-one-family-out training rests on: a family left out never appears."""
    assert set(surfaces.TEXTURES) == {"woven", "brushed", "granular", "wood", "cellular", "mottled"}
    drawn = {surfaces.surface(5, i, families=("wood", "mottled")).texture for i in range(24)}
    assert drawn == {"wood", "mottled"}
    _, _, labels = surfaces.dataset(5, 6, families=("granular",))
    assert labels.tolist() == [0, 1, 0, 1, 0, 1]
    with pytest.raises(ValueError, match="families"):
        surfaces.surface(5, 0, families=("marble",))


def test_the_same_family_varies_widely(surfaces):
    """Domain randomisation: one family's images differ in brightness, contrast and grain from one to the
    next (a narrow family would teach a model one texture, not what a defect is)."""
    images = np.stack([surfaces.surface(9, i, texture="brushed", defect=False).image[0] for i in range(24)])
    means, spreads = images.mean(axis=(1, 2)), images.std(axis=(1, 2))
    fine = np.abs(np.diff(images, axis=2)).mean(axis=(1, 2)) / spreads  # grain: high-frequency share
    assert means.max() - means.min() > 0.25
    assert spreads.max() / spreads.min() > 3
    assert fine.max() / fine.min() > 2


def test_cell_targets_mark_cells_holding_defect_pixels(surfaces):
    masks = np.zeros((1, 128, 128), bool)
    masks[0, 9, 17] = True
    cells = surfaces.cell_targets(masks, 16)
    assert cells.shape == (1, 1, 16, 16) and cells.sum() == 1 and cells[0, 0, 1, 2] == 1


def test_cli_prints_a_kserve_v2_request(surfaces, capsys):
    assert surfaces.main(["--defect", "--seed", "7", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    (tensor,) = body["inputs"]
    assert (tensor["name"], tensor["datatype"], tensor["shape"]) == ("image", "FP32", [1, 1, 128, 128])
    np.testing.assert_allclose(tensor["data"], surfaces.surface(7, defect=True).image.ravel(), atol=1e-5)


def test_cli_writes_a_batch_of_one(surfaces, tmp_path):
    assert (
        surfaces.main(
            [
                "--seed",
                "7",
                "--size",
                "224",
                "--rgb",
                "--out",
                str(tmp_path / "img.npy"),
                "--png",
                str(tmp_path / "img.png"),
            ]
        )
        == 0
    )
    assert np.load(tmp_path / "img.npy").shape == (1, 3, 224, 224)
    assert (tmp_path / "img.png").read_bytes().startswith(b"\x89PNG")


def test_report_scores_every_family_against_every_kind_of_defect(capsys):
    """report.py --by-defect: the table behind "What bounds the held-out figures" in models/README.md."""
    recipe_first()
    import report

    assert report.main(["--only", "surface_defect", "--by-defect", "12"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    header, body = [c.strip() for c in rows[0]], rows[2:]
    assert header[2:] == ["scratch", "crack", "spot", "patch"]
    assert [r[0].strip() for r in body] == ["woven", "brushed", "granular", "wood", "cellular", "mottled"]
    aurocs = {
        (r[0].strip(), kind): float(c.split()[0])
        for r in body
        for kind, c in zip(header[2:], r[2:], strict=True)
    }
    assert all(0.0 <= value <= 1.0 for value in aurocs.values())
    assert aurocs["brushed", "crack"] > 0.9  # a dark crack on brushed metal: the easiest there is
