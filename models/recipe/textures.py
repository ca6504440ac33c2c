"""Texture families for the surface generator (surfaces.py): six procedural families, each drawing its own
shape parameters per image (grain size, spectral slope, density, orientation, anisotropy...), wide on
purpose, so that a model trained on some families meets the others as new surfaces."""

import numpy as np

TEXTURES = ("woven", "brushed", "granular", "wood", "cellular", "mottled")
BASE_SIZE_PX = 128  # texture and defect sizes below are in pixels of a 128 px image, scaled with size
ISOTROPIC = ("granular", "cellular", "mottled")  # their patches change grain size; the others may turn


def _standardise(field: np.ndarray) -> np.ndarray:
    return (field - field.mean()) / (field.std() + 1e-9)


def rotate(grid: np.ndarray, angle_rad: float) -> tuple[np.ndarray, np.ndarray]:
    y, x = grid
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    return x * c + y * s, -x * s + y * c


def log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _frequencies(size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]


def _spectral(rng: np.random.Generator, size: int, weight) -> np.ndarray:
    """White noise shaped in the frequency domain by weight(fy, fx) (cycles per pixel), standardised."""
    fy, fx = _frequencies(size)
    spectrum = np.fft.rfft2(rng.standard_normal((size, size))) * weight(fy, fx)
    return _standardise(np.fft.irfft2(spectrum, s=(size, size)))


def _lowpass(cutoff: float):
    return lambda fy, fx: np.exp(-(fy**2 + fx**2) / (2 * cutoff**2))


def _bandpass(centre: float, width: float):
    return lambda fy, fx: np.exp(-(((np.hypot(fy, fx) - centre) / width) ** 2))


def _streaks(angle_rad: float, period_px: float, length: float = 10.0):
    """Spectral weight of streaks running along angle_rad: `length` periods long, period_px across."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)

    def weight(fy, fx):
        along, across = fx * c + fy * s, -fx * s + fy * c
        return np.exp(-((along * period_px * length) ** 2) - (across * period_px) ** 2)

    return weight


def _power_law(slope: float, angle_rad: float, stretch: float, grain_px: float, size: int):
    """1/f^slope power (amplitude f^(-slope/2)), stretched along angle_rad, rolled off at grain_px."""
    c, s = np.cos(angle_rad), np.sin(angle_rad)

    def weight(fy, fx):
        along, across = fx * c + fy * s, -fx * s + fy * c
        f = np.hypot(along * stretch, across)
        return (f + 1 / size) ** (-slope / 2) * np.exp(-0.5 * (f * grain_px) ** 2)

    return weight


def _worley(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cell_px: float):
    """Cells around jittered grid points in (u, v): distance to the nearest and second-nearest point, and a
    random level per nearest point."""
    iu, iv = np.floor(u / cell_px).astype(int), np.floor(v / cell_px).astype(int)
    u0, v0 = iu.min() - 1, iv.min() - 1
    shape = (iu.max() - u0 + 2, iv.max() - v0 + 2)
    points = rng.uniform(0.1, 0.9, (2, *shape))
    levels = rng.standard_normal(shape)
    nearest = np.full(u.shape, np.inf)
    second = np.full(u.shape, np.inf)
    level = np.zeros(u.shape)
    for du in (-1, 0, 1):
        for dv in (-1, 0, 1):
            cu, cv = iu - u0 + du, iv - v0 + dv
            d = np.hypot(
                u / cell_px - (cu + u0 + points[0, cu, cv]), v / cell_px - (cv + v0 + points[1, cu, cv])
            )
            closer = d < nearest
            second = np.where(closer, nearest, np.minimum(second, d))
            level = np.where(closer, levels[cu, cv], level)
            nearest = np.minimum(nearest, d)
    return nearest, second, level


def draw_params(family: str, rng: np.random.Generator, scale: float) -> dict:
    """Everything that shapes one surface of `family` but its noise: drawn per image, wide on purpose."""
    params = {
        "angle": rng.uniform(0, np.pi),
        "tilt": rng.uniform(-0.5, 0.5) if rng.random() < 0.5 else 0.0,  # spectral slope of the whole field
    }
    if family == "woven":
        params |= {
            "period": rng.uniform(4.0, 16.0) * scale,
            "aspect": rng.uniform(0.7, 1.4),
            "wander": rng.uniform(0.0, 0.35),
            "gain": log_uniform(rng, 1.5, 8.0),
            "fibre": rng.uniform(0.1, 0.6),
        }
    elif family == "brushed":
        params |= {
            "period": log_uniform(rng, 2.0, 10.0) * scale,
            "length": log_uniform(rng, 5.0, 16.0),
            "mottle": rng.uniform(0.0, 0.5),
        }
    elif family == "granular":
        params |= {
            "period": log_uniform(rng, 2.5, 12.0) * scale,
            "bandwidth": rng.uniform(0.3, 1.2),
            "grain_threshold": rng.uniform(1.8, 3.2),
            "grain_amount": rng.uniform(0.0, 0.8),
            "grain_cutoff": rng.uniform(0.12, 0.35) / scale,
            "grain_sign": 1.0 if rng.random() < 0.7 else -1.0,
        }
    elif family == "wood":
        params |= {
            "period": log_uniform(rng, 6.0, 30.0) * scale,
            "warp": rng.uniform(0.2, 0.7),
            "profile": rng.uniform(0.5, 1.4),
            "fibre": rng.uniform(0.2, 0.6),
            "centre_px": rng.uniform(0.8, 5.0) * BASE_SIZE_PX * scale if rng.random() < 0.6 else 0.0,
        }
    elif family == "cellular":
        params |= {
            "period": log_uniform(rng, 5.0, 22.0) * scale,
            "stretch": rng.uniform(1.0, 2.0),
            "level": rng.uniform(0.0, 1.0),
            "edge": rng.uniform(0.0, 1.0),
            "edge_width": rng.uniform(0.05, 0.2),
            "edge_sign": rng.choice([-1.0, 1.0]),
            "noise": rng.uniform(0.1, 0.5),
        }
    elif family == "mottled":
        params |= {
            "period": log_uniform(rng, 1.5, 8.0) * scale,
            "slope": rng.uniform(1.0, 2.8),
            "stretch": log_uniform(rng, 1.0, 3.0),
            "speckle": rng.uniform(0.0, 0.4),
        }
    else:
        raise ValueError(f"texture {family!r} is unknown; expected one of {TEXTURES}")
    return params


def render(family: str, params: dict, tex_seed: int, size: int) -> np.ndarray:
    """A standardised [size, size] texture; the same tex_seed gives the same noise, so a patch of the same
    surface with another angle or grain size reads as a local distortion of it."""
    rng = np.random.default_rng(tex_seed)
    grid = np.mgrid[0:size, 0:size].astype(np.float64)
    angle, period = params["angle"], params["period"]
    u, v = rotate(grid, angle)
    if family == "woven":
        wander = params["wander"] * period * _spectral(rng, size, _lowpass(1 / (6 * period)))
        weft = np.cos(np.pi * (u + wander) / period)
        warp = np.cos(np.pi * (v - wander) / (period * params["aspect"]))
        over = 0.5 + 0.5 * np.tanh(params["gain"] * weft * warp)
        field = over * warp**2 + (1 - over) * weft**2
        field = _standardise(field) + params["fibre"] * _spectral(rng, size, _lowpass(0.3))
    elif family == "brushed":
        field = _spectral(rng, size, _streaks(angle, period, params["length"]))
        field = field + params["mottle"] * _spectral(rng, size, _lowpass(1 / (2 * size)))
    elif family == "granular":
        f0 = 1 / period
        field = _spectral(rng, size, _bandpass(f0, params["bandwidth"] * f0))
        grains = _spectral(rng, size, _lowpass(params["grain_cutoff"]))
        field = (
            field
            + params["grain_sign"]
            * params["grain_amount"]
            * np.maximum(grains - params["grain_threshold"], 0)
            * 2
        )
    elif family == "wood":
        warp = params["warp"] * period * _spectral(rng, size, _lowpass(1 / (5 * period)))
        centre = params["centre_px"]
        across = v if centre == 0 else np.hypot(u - size / 2, v + centre) - centre
        rings = np.sin(2 * np.pi * (across + warp) / period)
        fibres = _spectral(rng, size, _streaks(angle, 2.0 * size / BASE_SIZE_PX))
        field = np.sign(rings) * np.abs(rings) ** params["profile"] + params["fibre"] * fibres
    elif family == "cellular":
        nearest, second, level = _worley(rng, u / params["stretch"], v, period / params["stretch"])
        edges = np.exp(-(((second - nearest) / params["edge_width"]) ** 2))
        field = params["level"] * level + params["edge_sign"] * params["edge"] * 2 * edges
        field = field + params["noise"] * _spectral(rng, size, _lowpass(0.25))
    elif family == "mottled":
        field = _spectral(rng, size, _power_law(params["slope"], angle, params["stretch"], period, size))
        field = field + params["speckle"] * _spectral(rng, size, _lowpass(0.35))
    else:
        raise ValueError(f"texture {family!r} is unknown; expected one of {TEXTURES}")
    if params["tilt"]:
        fy, fx = _frequencies(size)
        f = np.hypot(fy, fx)
        field = np.fft.irfft2(np.fft.rfft2(field) * ((f + 1 / 32) * 8) ** params["tilt"], s=(size, size))
    return _standardise(field)


def grain_change(before: np.ndarray, after: np.ndarray, mask: np.ndarray) -> float:
    """How much a region's grain changed, 0 for none: the larger of its decorrelation (1 - correlation)
    and the relative change of its mean structure tensor (gradient energy and orientation). Either one
    about 0.3 or more reads as another grain (a turned, finer or coarser texture)."""

    def tensor(image: np.ndarray) -> np.ndarray:
        gy, gx = np.gradient(image)
        gy, gx = gy[mask], gx[mask]
        return np.array([(gx * gx).mean(), (gx * gy).mean(), (gy * gy).mean()])

    old, new = tensor(before), tensor(after)
    structure = np.linalg.norm(new - old) / (np.linalg.norm(old) + 1e-12)
    decorrelation = 1 - np.corrcoef(before[mask], after[mask])[0, 1]
    return float(max(structure, decorrelation))
