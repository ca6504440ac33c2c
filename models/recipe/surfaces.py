"""Synthetic textured surfaces with defects and pixel masks, made the way DAGM 2007 was (numpy only).

Domain randomisation: every texture family draws its own shape parameters (grain size, spectral slope,
density, orientation, anisotropy...) per image, and every image gets its own optics and camera (contrast,
gamma, blur, sharpening, illumination gradient, vignetting, highlight, sensor and fixed-pattern noise,
block-DCT compression). A model trained on some families should meet the others as new surfaces.
"""

import argparse
import json
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optics
import textures
from textures import BASE_SIZE_PX, TEXTURES

DEFECTS = ("scratch", "crack", "spot", "patch")
_MIN_PATCH_CHANGE = 0.35  # a patch changes its grain at least this much (_grain_change): it shows


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


def _stroke(size: int, points_px: np.ndarray, half_width_px: np.ndarray, strength: np.ndarray):
    """Soft coverage (peak `strength` per point) and mask of a stroke through points spaced under a pixel
    apart, each with its own half width; only points with strength above a third mark the mask."""
    alpha = np.zeros((size, size))
    mask = np.zeros((size, size), bool)
    reach = int(np.ceil(3 * half_width_px.max())) + 1
    for (py, px), width, peak in zip(points_px, half_width_px, strength, strict=True):
        y0, x0 = max(int(py) - reach, 0), max(int(px) - reach, 0)
        y1, x1 = min(int(py) + reach + 2, size), min(int(px) + reach + 2, size)
        yy, xx = np.mgrid[y0:y1, x0:x1]
        d2 = (yy - py) ** 2 + (xx - px) ** 2
        np.maximum(alpha[y0:y1, x0:x1], peak * np.exp(-0.5 * d2 / width**2), out=alpha[y0:y1, x0:x1])
        if peak > 1 / 3:
            mask[y0:y1, x0:x1] |= d2 <= (width + 0.5) ** 2
    return alpha, mask


def _inside(points_px: np.ndarray, size: int) -> np.ndarray:
    """Which points fall inside the image; a stroke leaves the frame rather than running along its edge."""
    return ((points_px >= 0) & (points_px <= size - 1)).all(1)


def _profile(rng: np.random.Generator, count: int) -> np.ndarray:
    """Strength along a stroke: even, tapered at both ends, or broken into dashes."""
    t = np.linspace(0, 1, count)
    style = rng.choice(["even", "tapered", "dashed"], p=[0.5, 0.3, 0.2])
    if style == "tapered":
        return np.clip(np.minimum(t, 1 - t) / rng.uniform(0.1, 0.35), 0.35, 1.0)
    if style == "dashed":
        cycles = rng.uniform(3, 8)
        return np.where(np.sin(2 * np.pi * cycles * t + rng.uniform(0, 2 * np.pi)) > -0.4, 1.0, 0.0)
    return np.ones(count)


def _blob(
    rng: np.random.Generator, size: int, radius_px: float, wobble: float, edge: float = 10.0
) -> tuple[np.ndarray, np.ndarray]:
    """Soft coverage and mask of an ellipse with a wobbly rim, centred inside the image."""
    margin = min(radius_px, size / 3)
    cy, cx = rng.uniform(margin, size - margin, 2)
    aspect, angle = rng.uniform(0.35, 1.0), rng.uniform(0, np.pi)
    u, v = textures.rotate(np.mgrid[0:size, 0:size] - np.array([cy, cx])[:, None, None], angle)
    theta = np.arctan2(v, u)
    rim = 1 + wobble * sum(
        rng.uniform(-1, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 5)
    )
    r = np.hypot(u / radius_px, v / (radius_px * aspect)) / rim
    r[int(cy), int(cx)] = 0.0  # the centre pixel always belongs to the defect
    return 1 / (1 + np.exp(np.clip((r - 1) * edge, -50, 50))), r <= 1


def _curve(rng: np.random.Generator, size: int, length_px: float) -> np.ndarray:
    """A quadratic curve of about length_px from a point inside, heading roughly inwards."""
    start = rng.uniform(0.1 * size, 0.9 * size, 2)
    heading = np.arctan2(*(size / 2 - start)) + rng.uniform(-1.0, 1.0)  # roughly inwards: stays in frame
    ahead = np.array([np.sin(heading), np.cos(heading)])
    aside = np.array([np.cos(heading), -np.sin(heading)])
    bend = start + ahead * length_px / 2 + aside * rng.uniform(-0.35, 0.35) * length_px
    t = np.linspace(0, 1, int(2 * length_px) + 2)[:, None]
    return (1 - t) ** 2 * start + 2 * t * (1 - t) * bend + t**2 * (start + ahead * length_px)


def _walk(rng: np.random.Generator, start: np.ndarray, steps: int, jag: float) -> np.ndarray:
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0, jag, steps))
    return start + 0.5 * np.cumsum(np.stack([np.sin(heading), np.cos(heading)], 1), 0)


def _line_defect(rng, size, points, half_width, peak, sharpness) -> tuple[np.ndarray, np.ndarray]:
    keep = _inside(points, size)
    alpha, mask = _stroke(size, points[keep], half_width[keep], peak[keep])
    if not mask.any():  # the stroke left the frame at once: mark where it entered
        y, x = np.clip(points[0], 0, size - 1).astype(int)
        mask[y, x] = True
        alpha[y, x] = 1.0
    return alpha * sharpness, mask


def _defect(
    kind: str,
    rng: np.random.Generator,
    lum: np.ndarray,
    scale: float,
    contrast: float,
    redo_texture,
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one defect to the luminance image; returns the new image and the mask. redo_texture(rng)
    renders the same surface with its grain turned, finer or coarser, for patches. Strengths are in units
    of the texture's own spread (`contrast`), so a defect is as visible on a faint texture as on a strong one.
    """
    size = lum.shape[0]
    sign = rng.choice([-1.0, 1.0])
    if kind == "scratch":
        points = _curve(rng, size, rng.uniform(0.08, 0.7) * size)
        width = textures.log_uniform(rng, 0.4, 2.0) * scale
        peak = _profile(rng, len(points))
        amplitude = rng.uniform(2.0, 4.5) * contrast * min(1.0, 1.3 / np.sqrt(width / scale))
        alpha, mask = _line_defect(rng, size, points, np.full(len(points), width), peak, 1.0)
        return lum + sign * amplitude * alpha, mask
    if kind == "crack":
        steps = int(rng.uniform(20, 80) * scale * 2)
        main = _walk(rng, rng.uniform(size * 0.2, size * 0.8, 2), steps, rng.uniform(0.08, 0.35))
        paths = [main]
        if rng.random() < 0.4:  # a branch from somewhere along it
            paths.append(_walk(rng, main[rng.integers(len(main))], steps // 2, rng.uniform(0.08, 0.35)))
        points = np.concatenate(paths)
        width = rng.uniform(0.4, 1.3) * scale
        widths = width * np.clip(1 + 0.3 * np.cumsum(rng.normal(0, 0.1, len(points))), 0.5, 1.5)
        alpha, mask = _line_defect(rng, size, points, widths, np.ones(len(points)), 1.0)
        polarity = -1.0 if rng.random() < 0.8 else 1.0  # mostly dark; bright under dark-field lighting
        return lum + polarity * rng.uniform(2.2, 5.0) * contrast * alpha, mask
    if kind == "spot":
        radius = textures.log_uniform(rng, 4.0, 14.0) * scale
        alpha, mask = _blob(rng, size, radius, wobble=rng.uniform(0.0, 0.3), edge=rng.uniform(6.0, 20.0))
        if rng.random() < 0.5:  # stain: darker or lighter than the surface
            return lum + sign * rng.uniform(2.0, 3.5) * contrast * alpha, mask
        flattened = lum.mean() + sign * rng.uniform(1.5, 2.5) * contrast  # smudge: texture rubbed out
        return lum * (1 - alpha) + flattened * alpha, mask
    if kind == "patch":
        best = None
        for _ in range(6):  # a distortion that does not show is no defect: draw again, keep the clearest
            radius_px = max(rng.uniform(8.0, 22.0) * scale, rng.uniform(1.0, 1.6) * redo_texture.period)
            alpha, mask = _blob(rng, size, radius_px, wobble=0.2, edge=20.0)
            patched = lum * (1 - alpha) + redo_texture(rng) * alpha
            change = textures.grain_change(lum, patched, mask)
            if best is None or change > best[0]:
                best = (change, patched, mask)
            if change >= _MIN_PATCH_CHANGE:
                break
        return best[1], best[2]
    raise ValueError(f"defect {kind!r} is unknown; expected one of {DEFECTS}")


class _Patches:
    """The same surface re-rendered with its grain turned (oriented families) or made finer or coarser."""

    def __init__(self, family: str, params: dict, tex_seed: int, size: int, base: float, contrast: float):
        self.family, self.params, self.tex_seed, self.size = family, params, tex_seed, size
        self.base, self.contrast, self.period = base, contrast, params["period"]

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        params = dict(self.params)
        if self.family in textures.ISOTROPIC or rng.random() < 0.5:
            finer = rng.random() < 0.5 and self.period * 0.5 >= 2.0 * self.size / BASE_SIZE_PX  # resolvable
            params["period"] *= rng.uniform(0.35, 0.55) if finer else rng.uniform(1.8, 2.6)
            if self.family == "mottled":  # self-similar: a new grain size alone barely shows
                params["slope"] += rng.uniform(0.8, 1.5) * (-1 if finer else 1)
        else:
            params["angle"] += rng.choice([-1, 1]) * rng.uniform(0.8, np.pi / 2)
        return self.base + self.contrast * textures.render(self.family, params, self.tex_seed, self.size)


def surface(
    seed: int,
    index: int = 0,
    *,
    size: int = 128,
    channels: int = 1,
    defect: bool | None = None,
    texture: str | None = None,
    defect_kind: str | None = None,
    families: tuple[str, ...] = TEXTURES,
) -> Surface:
    """Image `index` of the stream `seed`. The texture, lighting and noise come from their own streams, so
    the same (seed, index) with defect=False and defect=True differ only around the defect. `families`
    are the texture families drawn from when `texture` is not given."""
    if channels not in (1, 3):
        raise ValueError(f"channels is {channels}; expected 1 (grayscale) or 3 (RGB)")
    unknown = set(families) - set(TEXTURES)
    if unknown or not families:
        raise ValueError(f"families {families!r}: expected some of {TEXTURES}")
    r_texture, r_defect, r_light = (
        np.random.default_rng(s) for s in np.random.SeedSequence([seed, index]).spawn(3)
    )
    is_defect = bool(r_defect.random() < 0.5) if defect is None else defect
    kind = defect_kind or str(r_defect.choice(DEFECTS))
    family = texture or str(r_texture.choice(families))
    scale = size / BASE_SIZE_PX
    params = textures.draw_params(family, r_texture, scale)
    tex_seed = int(r_texture.integers(2**63))
    base, contrast = r_texture.uniform(0.25, 0.7), textures.log_uniform(r_texture, 0.03, 0.14)

    lum = base + contrast * textures.render(family, params, tex_seed, size)
    mask = np.zeros((size, size), bool)
    if is_defect:
        patches = _Patches(family, params, tex_seed, size, base, contrast)
        lum, mask = _defect(kind, r_defect, lum, scale, contrast, patches)
    image = optics.photograph(lum, r_light, channels, contrast, base)
    return Surface(image.astype(np.float32), mask, family, kind if is_defect else None)


def dataset(
    seed: int, count: int, *, size: int = 128, channels: int = 1, families: tuple[str, ...] = TEXTURES
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` images [N, C, H, W] float32, masks [N, H, W] bool, labels [N] int64; odd ones defective."""
    items = [
        surface(seed, i, size=size, channels=channels, defect=bool(i % 2), families=families)
        for i in range(count)
    ]
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
