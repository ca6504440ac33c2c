"""What the camera adds to a surface (surfaces.py): optics, lighting and sensor, drawn per image: blur and
sharpening, illumination gradient, vignetting, a highlight, gamma, read, shot and fixed-pattern noise,
JPEG-like block compression, and for RGB a tint of the surface and of its grain."""

import numpy as np
import textures


def _blur(image: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of the last two axes, edges reflected (no wrap-around)."""
    if sigma_px < 0.2:
        return image
    reach = int(np.ceil(3 * sigma_px))
    taps = np.exp(-0.5 * (np.arange(-reach, reach + 1) / sigma_px) ** 2)
    taps /= taps.sum()
    for axis in (-2, -1):
        pad = [(0, 0)] * image.ndim
        pad[axis] = (reach, reach)
        padded = np.pad(image, pad, mode="reflect")
        n = image.shape[axis]
        image = sum(w * np.take(padded, np.arange(k, k + n), axis=axis) for k, w in enumerate(taps))
    return image


def _dct_matrix() -> np.ndarray:
    k, n = np.mgrid[0:8, 0:8]
    matrix = np.sqrt(2 / 8) * np.cos(np.pi * (2 * n + 1) * k / 16)
    matrix[0] /= np.sqrt(2)
    return matrix


_DCT = _dct_matrix()
_JPEG_LUMA = np.array(  # ITU T.81 Annex K luminance table
    [
        [16, 11, 10, 16, 24, 40, 51, 61],
        [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56],
        [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77],
        [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101],
        [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=np.float64,
)


def _compress(image: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-like artefacts: 8x8 block DCT, coefficients rounded to the quality-scaled table (no chroma
    subsampling, no entropy coding: the loss is all in the rounding)."""
    c, h, w = image.shape
    h8, w8 = h - h % 8, w - w % 8
    step = np.maximum(
        np.floor((_JPEG_LUMA * (5000 / quality if quality < 50 else 200 - 2 * quality) + 50) / 100), 1
    )
    blocks = image[:, :h8, :w8].reshape(c, h8 // 8, 8, w8 // 8, 8) * 255 - 128
    coefficients = np.einsum("ki,cyixj,lj->cykxl", _DCT, blocks, _DCT)
    coefficients = np.round(coefficients / step[:, None, :]) * step[:, None, :]
    restored = np.einsum("ki,cykxl,lj->cyixj", _DCT, coefficients, _DCT)
    out = image.copy()
    out[:, :h8, :w8] = (restored.reshape(c, h8, w8) + 128) / 255
    return out


def _tint(rng: np.random.Generator, saturation: float) -> np.ndarray:
    """An RGB gain of mean 1: a random hue at a random saturation up to `saturation`."""
    hue, amount = rng.uniform(0, 2 * np.pi), rng.uniform(0, saturation)
    return 1 + amount * np.cos(hue - np.array([0, 2, 4]) * np.pi / 3)


def photograph(
    lum: np.ndarray, r_light: np.random.Generator, channels: int, contrast: float, base: float
) -> np.ndarray:
    """Optics, lighting and sensor, all drawn from the image's own light stream (never from the defect's,
    so the same surface with and without its defect is photographed the same way)."""
    size = lum.shape[0]
    scale = size / textures.BASE_SIZE_PX
    blur_px = r_light.uniform(0.0, 1.2) * scale if r_light.random() < 0.6 else 0.0
    sharpen = r_light.uniform(0.3, 1.5) if r_light.random() < 0.25 else 0.0
    tilt, gain = r_light.uniform(-0.4, 0.4, 2), r_light.uniform(0.8, 1.2)
    vignette = r_light.uniform(0.0, 0.5)
    highlight = r_light.uniform(0.0, 0.3) if r_light.random() < 0.3 else 0.0
    highlight_at, highlight_px = r_light.uniform(0, size, 2), r_light.uniform(0.3, 0.8) * size
    gamma = textures.log_uniform(r_light, 0.7, 1.4)
    read_noise = min(r_light.uniform(0.002, 0.025), 0.6 * contrast)
    shot_noise = r_light.uniform(0.0, 0.03)
    pattern = r_light.uniform(0.0, 0.2) * contrast if r_light.random() < 0.3 else 0.0
    quality = int(r_light.integers(35, 96)) if r_light.random() < 0.35 else 0
    surface_tint, grain_tint = _tint(r_light, 0.35), _tint(r_light, 0.25)

    lum = _blur(lum, blur_px)
    if sharpen:
        lum = lum + sharpen * (lum - _blur(lum, 1.0 * scale))
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    light = gain * (1 + tilt[0] * y + tilt[1] * x - vignette * (x**2 + y**2))
    hy, hx = np.mgrid[0:size, 0:size] - highlight_at[:, None, None]
    light = light + highlight * np.exp(-0.5 * (hy**2 + hx**2) / highlight_px**2)
    if channels == 1:
        image = (lum * light)[None]
    else:
        image = (base * surface_tint[:, None, None] + (lum - base) * grain_tint[:, None, None]) * light
    image = np.clip(image, 1e-6, 1) ** gamma
    noise = r_light.standard_normal(image.shape)
    image = image + noise * np.sqrt(read_noise**2 + shot_noise**2 * image * 0.1)
    columns = r_light.standard_normal(size)
    image = image + pattern * columns[None, None, :]  # a line camera's column gains (fixed pattern)
    image = np.clip(image, 0, 1)
    if quality:
        image = np.clip(_compress(image, quality), 0, 1)
    return np.round(image * 255) / 255
