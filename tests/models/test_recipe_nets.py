"""models/recipe/nets.py's spectral whitening: what it computes, what it does to a texture, and that the
int8 export keeps it in fp32.

Needs the `train` extra (torch), which `make test` does not install; elsewhere these tests skip (see
tests/models/test_finetune.py for how to run them).
"""

import importlib
import itertools

import numpy as np
import pytest
from recipe_path import recipe_first

torch = pytest.importorskip("torch", reason="the recipe's nets need torch: the train extra")
F = torch.nn.functional


@pytest.fixture(scope="module")
def recipe():
    recipe_first()
    return {name: importlib.import_module(name) for name in ("nets", "surfaces", "export")}


def _reference(image: torch.Tensor, smooth: int, floor: float) -> torch.Tensor:
    """The same whitening written with torch.fft, from its definition."""
    centred = image - image.mean(dim=(2, 3), keepdim=True)
    spectrum = torch.fft.rfft2(centred, norm="ortho")
    power = spectrum.abs().square()
    envelope = F.avg_pool2d(power, smooth, 1, smooth // 2, count_include_pad=False)
    envelope = envelope + floor * envelope.mean(dim=(2, 3), keepdim=True)
    white = torch.fft.irfft2(spectrum / envelope.sqrt(), s=image.shape[-2:], norm="ortho")
    return (white - white.mean(dim=(2, 3), keepdim=True)) / white.std(dim=(2, 3), correction=0, keepdim=True)


def _texture(recipe, family: str, index: int = 0, defect: bool = False):
    return recipe["surfaces"].surface(77, index, size=64, channels=1, defect=defect, families=(family,))


def test_whitening_is_the_fft_definition_in_matrix_products(recipe):
    nets = recipe["nets"]
    pictures = [_texture(recipe, family, i).image for i, family in enumerate(("wood", "woven"))]
    images = torch.from_numpy(np.stack(pictures))
    images = images * 0.2 + 0.4  # scale and offset do not matter to it
    got = nets.Whiten(64)(images)
    expected = _reference(images.double(), nets.WHITEN_SMOOTH, nets.WHITEN_FLOOR).float()
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # of a unit spread: float32 rounding


def test_pooling_first_is_whitening_the_smaller_image(recipe):
    nets = recipe["nets"]
    image = torch.from_numpy(_texture(recipe, "granular").image[None]).repeat_interleave(2, -1)
    image = image.repeat_interleave(2, -2)  # 128 px
    torch.testing.assert_close(nets.Whiten(128, pool=2)(image), nets.Whiten(64)(F.avg_pool2d(image, 2)))


def test_a_texture_comes_out_flat_and_a_scratch_stands_out(recipe):
    """Brushed metal's spectrum spans decades (long streaks in one direction); whitened, its power is about
    the same in every band, and a faint scratch that hides in the streaks is what stands out."""
    nets = recipe["nets"]
    ok, scratched = (_texture(recipe, "brushed", 1, defect) for defect in (False, True))
    assert scratched.mask.any()

    def band_powers(image: torch.Tensor) -> np.ndarray:
        power = torch.fft.fft2(image - image.mean()).abs().square()[0, 0].numpy()
        fy, fx = np.meshgrid(np.fft.fftfreq(64), np.fft.fftfreq(64), indexing="ij")
        radius = np.hypot(fy, fx)
        edges = np.linspace(0.02, 0.5, 7)
        return np.array([power[(radius >= a) & (radius < b)].mean() for a, b in itertools.pairwise(edges)])

    raw = torch.from_numpy(ok.image[None])
    before, after = band_powers(raw), band_powers(nets.Whiten(64)(raw))
    assert before.max() / before.min() > 30
    assert after.max() / after.min() < 3

    def contrast(image: np.ndarray) -> float:
        deviation = np.abs(image - image.mean())
        return float(deviation[scratched.mask].mean() / deviation[~scratched.mask].mean())

    picture = scratched.image[None]
    assert contrast(nets.Whiten(64)(torch.from_numpy(picture))[0, 0].numpy()) > 1.5 * contrast(picture[0, 0])


def test_a_flat_image_whitens_to_zeros_not_nan(recipe):
    """No texture at all (a blank frame, a saturated one): no power in any bin, nothing to divide by."""
    nets = recipe["nets"]
    flat = torch.full((2, 1, 128, 128), 0.5)
    assert torch.equal(nets.Whiten(128, pool=2)(flat), torch.zeros(2, 1, 64, 64))
    prob, cell_map = nets.SurfaceNet().eval()(flat)
    assert torch.isfinite(prob).all() and torch.isfinite(cell_map).all()


def test_the_int8_export_keeps_the_whitening_in_fp32(recipe, tmp_path):
    """Quantised, the spectrum's bins (decades apart) would round away; the whitening must also read the
    fp32 input, never an 8-bit copy of it."""
    onnx = pytest.importorskip("onnx")
    nets, export, surfaces = recipe["nets"], recipe["export"], recipe["surfaces"]
    torch.manual_seed(0)
    model = nets.SurfaceNet().eval()
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    export.export_onnx(model, 1, 128, fp32)
    calibration, _, _ = surfaces.dataset(78, 8, size=128, channels=1)
    export.quantise(fp32, int8, calibration)
    graph = onnx.load(str(int8)).graph
    made_by = {output: node for node in graph.node for output in node.output}
    whitening = [n for n in graph.node if "/whiten/" in n.name and n.op_type != "DequantizeLinear"]
    assert any(node.op_type == "MatMul" for node in whitening)
    for node in whitening:
        for name in node.input:
            assert name not in made_by or made_by[name].op_type != "DequantizeLinear", node.name
