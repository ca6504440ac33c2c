"""Synthetic textured surfaces with defects and pixel masks, made the way DAGM 2007 was (numpy only)."""

import argparse
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEXTURES = ("woven", "brushed", "granular", "wood")
DEFECTS = ("scratch", "crack", "spot", "patch")
BASE_SIZE_PX = 128  # texture and defect sizes below are in pixels of a 128 px image, scaled with size
_TINTS = {
    "woven": (0.95, 1.0, 1.1),
    "brushed": (0.97, 1.0, 1.06),
    "granular": (1.04, 1.0, 0.92),
    "wood": (1.3, 0.98, 0.66),
}
_PERIOD_PX = {"woven": (6.0, 12.0), "brushed": (3.0, 8.0), "granular": (3.0, 8.0), "wood": (10.0, 24.0)}


@dataclass(frozen=True)
class Surface:
    """One image: float32 [C, H, W] on 8-bit levels in [0, 1], its bool [H, W] defect mask, what made it."""

    image: np.ndarray
    mask: np.ndarray
    texture: str
    defect: str | None

    @property
    def label(self) -> int:
        return int(self.defect is not None)


def _standardise(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-9)


def _rotate(grid: np.ndarray, angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = grid
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return x * c + y * s, -x * s + y * c


def _spectral(rng: np.random.Generator, size: int, weight) -> np.ndarray:
    """White noise shaped in the frequency domain by weight(fy, fx) (cycles per pixel), standardised."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * weight(fy, fx)
    return _standardise(np.fft.irfft2(spectrum, s=(size, size)))


def _lowpass(cutoff: float):
    return lambda fy, fx: np.exp(-(fy**2 + fx**2) / (2 * cutoff**2))


def _streaks(angle_rad: float, period_px: float):
    """Spectral weight of streaks running along angle_rad: long along, period_px across."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)

    def weight(fy, fx):
        along, across = fx * c + fy * s, -fx * s + fy * c
        return np.exp(-((along * period_px * 10) ** 2) - (across * period_px) ** 2)

    return weight


def _texture(family: str, tex_seed: int, size: int, angle_rad: float, period_px: float) -> np.ndarray:
    """A standardised [size, size] texture; the same tex_seed gives the same noise, so a patch of the same
    surface with another angle or period reads as a local distortion of it."""
    rng = np.random.default_rng(tex_seed)
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    u, v = _rotate(grid, angle_rad)
    if family == "woven":
        wander = 0.25 * period_px * _spectral(rng, size, _lowpass(1 / (6 * period_px)))
        weft, warp = np.cos(np.pi * (u + wander) / period_px), np.cos(np.pi * (v - wander) / period_px)
        over = 0.5 + 0.5 * np.tanh(4 * weft * warp)
        field = over * warp**2 + (1 - over) * weft**2
        field = _standardise(field) + 0.35 * _spectral(rng, size, _lowpass(0.3))
    elif family == "brushed":
        field = _spectral(rng, size, _streaks(angle_rad, period_px))
        field = field + 0.3 * _spectral(rng, size, _lowpass(1 / (2 * size)))
    elif family == "granular":
        f0 = 1 / period_px
        field = _spectral(rng, size, lambda fy, fx: np.exp(-(((np.hypot(fy, fx) - f0) / (0.5 * f0)) ** 2)))
        field = field + 0.6 * np.maximum(_spectral(rng, size, _lowpass(0.25)) - 2.2, 0)
    elif family == "wood":
        warp = 0.45 * period_px * _spectral(rng, size, _lowpass(1 / (5 * period_px)))
        rings = np.sin(2 * np.pi * (v + warp) / period_px)
        field = np.sign(rings) * np.abs(rings) ** 0.8 + 0.5 * _spectral(rng, size, _streaks(angle_rad, 2.0))
    else:
        raise ValueError(f"texture {family!r} is unknown; expected one of {TEXTURES}")
    return _standardise(field)


def _stroke(size: int, points_px: np.ndarray, half_width_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage and mask of a stroke through points spaced under a pixel apart, in their bounding box."""
    alpha = np.zeros((size, size))
    pad = int(np.ceil(4 * half_width_px)) + 2
    (y0, x0), (y1, x1) = points_px.min(0).astype(int) - pad, points_px.max(0).astype(int) + pad + 1
    y0, x0, y1, x1 = max(y0, 0), max(x0, 0), min(y1, size), min(x1, size)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    d2 = ((yy[None] - points_px[:, 0, None, None]) ** 2 + (xx[None] - points_px[:, 1, None, None]) ** 2).min(
        0
    )
    alpha[y0:y1, x0:x1] = np.exp(-0.5 * d2 / half_width_px**2)
    mask = np.zeros((size, size), bool)
    mask[y0:y1, x0:x1] = d2 <= (half_width_px + 0.5) ** 2
    return alpha, mask


def _inside(points_px: np.ndarray, size: int) -> np.ndarray:
    """The points that fall inside the image; a stroke leaves the frame rather than running along its edge."""
    return points_px[((points_px >= 0) & (points_px <= size - 1)).all(1)]


def _blob(
    rng: np.random.Generator, size: int, radius_px: float, wobble: float, edge: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage and mask of an ellipse with a wobbly rim, centred inside the image."""
    margin = min(radius_px, size / 3)
    cy, cx = rng.uniform(margin, size - margin, 2)
    aspect, angle = rng.uniform(0.5, 1.0), rng.uniform(0, np.pi)
    u, v = _rotate(np.mgrid[0:size, 0:size] - np.array([cy, cx])[:, None, None], angle)
    theta = np.arctan2(v, u)
    rim = 1 + wobble * sum(
        rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    r = np.hypot(u / radius_px, v / (radius_px * aspect)) / rim
    r[int(cy), int(cx)] = 0.0  # the centre pixel always belongs to the defect
    return 1 / (1 + np.exp(np.clip((r - 1) * edge, -50, 50))), r <= 1


def _defect(
    kind: str,
    rng: np.random.Generator,
    lum: np.ndarray,
    scale: float,
    contrast: float,
    period_px: float,
    redo_texture,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect to the luminance image; returns the new image and the mask. redo_texture(rng) renders
    the same surface with its grain turned or made finer, for patches."""
    size = lum.shape[0]
    sign = rng.choice([-1.0, 1.0], p=[0.7, 0.3])
    if kind == "scratch":
        start = rng.uniform(0.1 * size, 0.9 * size, 2)
        heading = np.arctan2(*(size / 2 - start)) + rng.uniform(-1.0, 1.0)  # roughly inwards: stays in frame
        length = rng.uniform(0.2, 0.6) * size
        ahead, aside = (
            np.array([np.sin(heading), np.cos(heading)]),
            np.array([np.cos(heading), -np.sin(heading)]),
        )
        bend = start + ahead * length / 2 + aside * rng.uniform(-0.3, 0.3) * length
        t = np.linspace(0, 1, int(2 * length) + 2)[:, None]
        points = (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * (start + ahead * length)
        alpha, mask = _stroke(size, _inside(points, size), rng.uniform(0.5, 1.1) * scale)
        return lum + sign * rng.uniform(2.0, 4.5) * contrast * alpha, mask
    if kind == "crack":
        steps = int(rng.uniform(25, 70) * scale * 2)
        heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, 0.12, steps))
        start = rng.uniform(size * 0.2, size * 0.8, 2)
        path = start + 0.5 * np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1), 0)
        alpha, mask = _stroke(size, _inside(path, size), rng.uniform(0.45, 0.9) * scale)
        return lum - rng.uniform(2.5, 5.0) * contrast * alpha, mask
    if kind == "spot":
        alpha, mask = _blob(rng, size, rng.uniform(5.0, 11.0) * scale, wobble=0.1)
        if rng.random() < 0.5:  # stain: darker or lighter than the surface
            return lum + sign * rng.uniform(2.0, 3.5) * contrast * alpha, mask
        flattened = lum.mean() + sign * rng.uniform(1.5, 2.5) * contrast  # smudge: texture rubbed out
        return lum * (1 - alpha) + flattened * alpha, mask
    if kind == "patch":
        radius_px = max(
            rng.uniform(8.0, 20.0) * scale, rng.uniform(1.0, 1.6) * period_px
        )  # a patch spans its grain
        alpha, mask = _blob(rng, size, radius_px, wobble=0.2, edge=20.0)
        return lum * (1 - alpha) + redo_texture(rng) * alpha, mask
    raise ValueError(f"defect {kind!r} is unknown; expected one of {DEFECTS}")


def surface(
    seed: int,
    index: int = 0,
    *,
    size: int = 128,
    channels: int = 1,
    defect: bool | None = None,
    texture: str | None = None,
    defect_kind: str | None = None,
) -> Surface:
    """Image `index` of the stream `seed`. The texture, lighting and noise come from their own streams, so
    the same (seed, index) with defect=False and defect=True differ only around the defect."""
    if channels not in (1, 3):
        raise ValueError(f"channels is {channels}; expected 1 (grayscale) or 3 (RGB)")
    r_texture, r_defect, r_light = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)
    )
    is_defect = bool(r_defect.random() < 0.5) if defect is None else defect
    kind = defect_kind or str(r_defect.choice(DEFECTS))
    family = texture or str(r_texture.choice(TEXTURES))
    scale = size / BASE_SIZE_PX
    angle, period = r_texture.uniform(0, np.pi), r_texture.uniform(*_PERIOD_PX[family]) * scale
    tex_seed = int(r_texture.integers(2**63))
    base, contrast = r_texture.uniform(0.3, 0.65), r_texture.uniform(0.05, 0.12)
    tint = np.array(_TINTS[family]) * r_texture.uniform(0.85, 1.15, 3)

    def redo_texture(rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.5:  # finer grain (or, for isotropic grain, either way)
            coarser = family == "granular" and rng.random() < 0.5
            twist_angle, twist_period = (
                angle,
                period * (rng.uniform(2.0, 2.6) if coarser else rng.uniform(0.35, 0.5)),
            )
        else:  # grain turned across
            twist_angle, twist_period = angle + rng.choice([-1, 1]) * rng.uniform(1.0, 2.1), period
        return base + contrast * _texture(family, tex_seed, size, twist_angle, twist_period)

    lum = base + contrast * _texture(family, tex_seed, size, angle, period)
    mask = np.zeros((size, size), bool)
    if is_defect:
        lum, mask = _defect(kind, r_defect, lum, scale, contrast, period, redo_texture)
    y, x = np.mgrid[0:size, 0:size] / size - 0.5
    tilt = r_light.uniform(-0.35, 0.35, 2)
    vignette = r_light.uniform(0.0, 0.4) * (x**2 + y**2)
    lum = lum * (1 + tilt[0] * y + tilt[1] * x - vignette) * r_light.uniform(0.85, 1.15)
    image = lum[None] if channels == 1 else lum[None] * (tint / tint.mean())[:, None, None]
    image = image + r_light.normal(0, r_light.uniform(0.004, 0.025), image.shape)
    image = np.round(np.clip(image, 0, 1) * 255) / 255
    return Surface(image.astype(np.float32), mask, family, kind if is_defect else None)


def dataset(
    seed: int, count: int, *, size: int = 128, channels: int = 1
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` images [N, C, H, W] float32, masks [N, H, W] bool, labels [N] int64; odd ones defective."""
    items = [surface(seed, i, size=size, channels=channels, defect=bool(i % 2)) for i in range(count)]
    return (
        np.stack([s.image for s in items]),
        np.stack([s.mask for s in items]),
        np.array([s.label for s in items], np.int64),
    )


def cell_targets(masks: np.ndarray, cells: int) -> np.ndarray:
    """Per-cell ground truth [N, 1, cells, cells] float32: 1 where any pixel of the cell is defective."""
    n, size, _ = masks.shape
    step = size // cells
    return masks.reshape(n, cells, step, cells, step).any(axis=(2, 4))[:, None].astype(np.float32)


def _png_bytes(image: np.ndarray) -> bytes:
    """A minimal 8-bit grayscale or RGB PNG of a [C, H, W] image in [0, 1]."""
    pixels = np.round(np.moveaxis(image, 0, -1) * 255).astype(np.uint8)
    height, width, channels = pixels.shape
    rows = b"".join(b"\x00" + pixels[r].tobytes() for r in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def request_body(image: np.ndarray, input_name: str = "image") -> dict:
    """A KServe v2 JSON inference request for one [C, H, W] image, as a batch of one."""
    return {
        "inputs": [
            {
                "name": input_name,
                "shape": [1, *image.shape],
                "datatype": "FP32",
                "data": np.round(image.astype(np.float64), 5).ravel().tolist(),
            }
        ]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Make one synthetic surface image (see models/README.md).")
    parser.add_argument("--seed", type=int, default=0, help="stream seed; same seed, same image")
    parser.add_argument("--index", type=int, default=0, help="image index within the stream")
    parser.add_argument("--size", type=int, default=128, help="side in pixels (128 for surface_defect)")
    parser.add_argument(
        "--rgb", action="store_true", help="3 channels (use --size 224 for surface_defect_224)"
    )
    parser.add_argument(
        "--defect",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="force a defect (or --no-defect for none); default: drawn from the seed",
    )
    parser.add_argument("--texture", choices=TEXTURES)
    parser.add_argument("--defect-kind", choices=DEFECTS)
    parser.add_argument("--out", type=Path, help="write the image as .npy float32 [1, C, H, W]")
    parser.add_argument("--mask-out", type=Path, help="write the mask as .npy bool [H, W]")
    parser.add_argument("--png", type=Path, help="write the image as PNG, to look at")
    parser.add_argument("--json", action="store_true", help="print a KServe v2 JSON inference request body")
    args = parser.parse_args(argv)
    made = surface(
        args.seed,
        args.index,
        size=args.size,
        channels=3 if args.rgb else 1,
        defect=args.defect,
        texture=args.texture,
        defect_kind=args.defect_kind,
    )
    if args.out:
        np.save(args.out, made.image[None])
    if args.mask_out:
        np.save(args.mask_out, made.mask)
    if args.png:
        args.png.write_bytes(_png_bytes(made.image))
    if args.json:
        json.dump(request_body(made.image), sys.stdout, separators=(",", ":"))
        sys.stdout.write("\n")
    else:
        print(
            f"texture={made.texture} defect={made.defect} label={made.label} "
            f"defect_px={int(made.mask.sum())}",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
