"""The reference architectures: a plain CNN for 128 px grayscale, a MobileNetV2-style net for 224 px RGB."""

import torch
from torch import nn


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


class SurfaceNet(nn.Module):
    """[N, 1, 128, 128] in [0, 1] -> defect_prob [N, 1], defect_map [N, 1, 16, 16] (8 px cells).
    Dilated convolutions at 16x16 give each cell about 120 px of context, enough to see a texture change."""

    map_cells = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(1, 16, 2),
            _conv(16, 24, 2),
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
        features = self.body(_standardise(image))
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
