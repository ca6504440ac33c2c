"""The reference architectures: a plain CNN for 128 px grayscale, a MobileNetV2-style net for 224 px RGB."""

import math

import torch
from torch import nn
from torch.nn import functional as F

WHITEN_SMOOTH = 5  # frequency bins (a square) over which the image's own power spectrum is averaged
WHITEN_FLOOR = 1e-3  # of the mean power: bins with almost nothing in them are not blown up to noise
# Power added to every bin, so that a flat image (no power at all) whitens to zeros, not NaN. Below the last
# bit of any bin a texture has, so it changes nothing else (not even how the shipped weights trained).
WHITEN_EMPTY = 1e-30


def _conv(c_in: int, c_out: int, stride: int = 1, dilation: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


def _standardise(image: torch.Tensor) -> torch.Tensor:
    """Per-image, per-channel zero mean and unit spread, so brightness and contrast do not matter."""
    mean = image.mean(dim=(2, 3), keepdim=True)
    spread = (image - mean).square().mean(dim=(2, 3), keepdim=True).add(1e-4).sqrt()
    return (image - mean) / spread


class _Heads(nn.Module):
    """defect_map from the map features, defect_prob from pooled deep features and the map's peak; training
    asks for logits (numerically stable loss), export gets probabilities."""

    def __init__(self, map_channels: int, deep_channels: int) -> None:
        super().__init__()
        self.map_logit = nn.Conv2d(map_channels, 1, 1)
        self.prob_logit = nn.Linear(2 * deep_channels + 1, 1)

    def forward(
        self, map_features: torch.Tensor, deep: torch.Tensor, logits: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        map_logit = self.map_logit(map_features)
        pooled = torch.cat([deep.mean(dim=(2, 3)), deep.amax(dim=(2, 3)), map_logit.amax(dim=(2, 3))], dim=1)
        prob_logit = self.prob_logit(pooled)
        return (prob_logit, map_logit) if logits else (torch.sigmoid(prob_logit), torch.sigmoid(map_logit))


class _Contrast(nn.Module):
    """Features joined with their deviation from the image's own average: a defect is what differs from the
    rest of the surface, so each cell sees how far it stands out (doubles the channels). No division by the
    spread: a mostly-zero channel would blow up to ranges that int8 calibration cannot hold."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([features, features - features.mean(dim=(2, 3), keepdim=True)], dim=1)


class Whiten(nn.Module):
    """Spectral whitening: each image divided, frequency by frequency, by its own smoothed amplitude spectrum.

    A texture is mostly what its power spectrum says (grain size, orientation, spectral slope); a defect is
    small and local, so it barely moves the spectrum of the whole image. Dividing by that spectrum turns any
    stationary texture into something close to white noise, whatever its family, and leaves what does not
    repeat across the surface (a scratch, a crack, a spot) standing out of it: the textbook detector for a
    signal in coloured noise, with the noise's spectrum estimated from the image itself. It is what lets the
    net hold on surfaces it never saw (models/README.md, leave-one-family-out).

    The transforms are matrix products with fixed DFT matrices (orthonormal, real arithmetic), not torch.fft,
    so that the TorchScript exporter writes plain MatMul nodes that any ONNX runtime runs; they stay fp32
    (export.quantise). Whitening does not care about scale, so it only takes the image's mean away: it then
    reads the model's fp32 input itself, never an 8-bit copy of the standardised image, should the first
    convolution be quantised (whitening would lift that copy's rounding noise wherever the texture has
    little power). Square `side_px` images in, averaged over `pool` x `pool` pixels; out, standardised,
    side_px / pool pixels a side."""

    def __init__(self, side_px: int, pool: int = 1, smooth: int = WHITEN_SMOOTH) -> None:
        super().__init__()
        n = side_px // pool
        bins = n // 2 + 1
        self.pool, self.bins, self.smooth = pool, bins, smooth
        pixel = torch.arange(n, dtype=torch.float64)
        across = 2 * math.pi * torch.outer(pixel, pixel[:bins]) / n  # [pixel, bin]: the one-sided axis
        down = 2 * math.pi * torch.outer(pixel, pixel) / n
        unit = 1 / math.sqrt(n)
        twice = torch.full((bins,), 2.0, dtype=torch.float64)  # a one-sided bin stands for two, but 0 and n/2
        twice[0] = 1.0
        if n % 2 == 0:
            twice[-1] = 1.0
        constants = {
            "to_bins": torch.cat([across.cos(), -across.sin()], dim=1) * unit,
            "cos_down": down.cos() * unit,
            "sin_down": down.sin() * unit,
            "from_bins": torch.cat([across.cos().T, -across.sin().T]) * twice.repeat(2)[:, None] * unit,
        }
        for name, value in constants.items():
            self.register_buffer(name, value.float(), persistent=False)  # built here, never in a checkpoint

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        image = image - image.mean(dim=(2, 3), keepdim=True)  # the DC bin would set the floor
        if self.pool > 1:
            image = F.avg_pool2d(image, self.pool)
        spectrum = image @ self.to_bins  # real-to-complex along rows: [..., n, 2 * bins], real then imaginary
        real, imag = spectrum[..., : self.bins], spectrum[..., self.bins :]
        real, imag = self.cos_down @ real + self.sin_down @ imag, self.cos_down @ imag - self.sin_down @ real
        power = real.square() + imag.square()
        envelope = F.avg_pool2d(power, self.smooth, 1, self.smooth // 2, count_include_pad=False)
        gain = (envelope + WHITEN_FLOOR * envelope.mean(dim=(2, 3), keepdim=True) + WHITEN_EMPTY).rsqrt()
        real, imag = real * gain, imag * gain
        real, imag = self.cos_down @ real - self.sin_down @ imag, self.cos_down @ imag + self.sin_down @ real
        return _standardise(torch.cat([real, imag], dim=-1) @ self.from_bins)


class SurfaceNet(nn.Module):
    """[N, 1, 128, 128] in [0, 1] -> defect_prob [N, 1], defect_map [N, 1, 16, 16] (8 px cells).
    The first convolution's 16 channels at 64x64 are joined by the image whitened at that resolution (Whiten;
    at 128 px it would cost about 60% more per image, at 64 px about 6%). Dilated convolutions at 16x16 give
    each cell about 120 px of context, enough to see a texture change."""

    map_cells = 16
    side_px = 128

    def __init__(self) -> None:
        super().__init__()
        self.stem = _conv(1, 16, 2)
        self.whiten = Whiten(self.side_px, pool=2)
        self.body = nn.Sequential(
            _conv(17, 24, 2),
            _conv(24, 32),
            _conv(32, 48, 2),
            _conv(48, 48),
            _Contrast(),
            _conv(96, 64, dilation=2),
            _conv(64, 64, dilation=4),
            _Contrast(),
            _conv(128, 64, dilation=2),
        )
        self.heads = _Heads(64, 64)

    def forward(self, image: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(torch.cat([self.stem(_standardise(image)), self.whiten(image)], dim=1))
        return self.heads(features, features, logits)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand, 3x3 depthwise, 1x1 linear project, residual when shapes match."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        layers = (
            []
            if expand == 1
            else [nn.Conv2d(c_in, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(True)]
        )
        self.block = nn.Sequential(
            *layers,
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU6(True),
            nn.Conv2d(hidden, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.has_residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x) if self.has_residual else self.block(x)


def _stage(c_in: int, c_out: int, stride: int, repeats: int, expand: int = 4) -> nn.Sequential:
    blocks = [_InvertedResidual(c_in, c_out, stride, expand)]
    blocks += [_InvertedResidual(c_out, c_out, 1, expand) for _ in range(repeats - 1)]
    return nn.Sequential(*blocks)


class MobileSurfaceNet(nn.Module):
    """[N, 3, 224, 224] in [0, 1] -> defect_prob [N, 1], defect_map [N, 1, 28, 28] (8 px cells).
    MobileNetV2-style body to stride 16; the map reads stride-8 features joined with upsampled stride-16 ones
    and with their deviation from the image's average."""

    map_cells = 28

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(True))
        self.to_stride8 = nn.Sequential(
            _stage(16, 16, 1, 1, expand=1), _stage(16, 24, 2, 2), _stage(24, 32, 2, 3)
        )
        self.to_stride16 = nn.Sequential(_stage(32, 64, 2, 3), _stage(64, 96, 1, 2))
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        self.map_features = nn.Sequential(
            _Contrast(),
            nn.Conv2d(256, 48, 1, bias=False),
            nn.BatchNorm2d(48),
            nn.ReLU6(True),
            _conv(48, 48, groups=48),
        )
        self.heads = _Heads(48, 96)

    def forward(self, image: torch.Tensor, logits: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        fine = self.to_stride8(self.stem(_standardise(image)))
        deep = self.to_stride16(fine)
        joined = torch.cat([fine, self.upsample(deep)], dim=1)
        return self.heads(self.map_features(joined), deep, logits)


ARCHITECTURES = {"surface_net": SurfaceNet, "mobile_surface_net": MobileSurfaceNet}
