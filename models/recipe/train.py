"""Deterministic CPU training of a reference net on generated surfaces (torch; the `train` extra only)."""

import logging
import time
from dataclasses import dataclass

import nets
import numpy as np
import surfaces
import torch
from metrics import auroc
from torch.nn import functional as F

log = logging.getLogger(__name__)
CELL_PX = 8  # both nets map 8x8 pixel cells


@dataclass(frozen=True)
class Recipe:
    """How one net is trained; the seeds of every data set are fixed here so a rebuild is reproducible."""

    architecture: str
    size_px: int
    channels: int
    crop_px: (
        int  # train on random crops of this side (== size_px: whole images); a net is fully convolutional
    )
    train_images: int
    epochs: int
    batch_size: int = 32
    learning_rate: float = 3e-3
    map_loss_weight: float = 1.0
    map_positive_weight: float = 4.0  # defective cells are a few percent of all cells
    whole_image_steps: int = 0  # after crop training, this many low-rate steps on whole images
    whole_image_batch_size: int = 16
    seed: int = 1
    validation_seed: int = 5
    validation_images: int = 200
    families: tuple[str, ...] = surfaces.TEXTURES  # texture families to train on (lofo.py leaves one out)
    threads: int = 2  # torch threads: part of the recipe, since the count changes the last bits


def deterministic(seed: int, threads: int) -> None:
    """Same seed, same thread count, same CPU kind: bit-identical weights."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(threads)


def _augment(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator):
    """Per-image flips and transposes (the 8 symmetries of the square), the same on image and mask."""
    n = images.shape[0]
    for dims, flip in (((3,), True), ((2,), True), ((2, 3), False)):
        chosen = torch.rand(n, generator=generator) < 0.5
        if not chosen.any():
            continue
        if flip:
            images[chosen], masks[chosen] = (
                images[chosen].flip(dims),
                masks[chosen].flip(tuple(d - 1 for d in dims)),
            )
        else:
            images[chosen], masks[chosen] = images[chosen].transpose(2, 3), masks[chosen].transpose(1, 2)
    return images, masks


def _crop(images: torch.Tensor, masks: torch.Tensor, crop_px: int, generator: torch.Generator):
    size = images.shape[-1]
    if crop_px == size:
        return images, masks
    y, x = (CELL_PX * torch.randint(0, (size - crop_px) // CELL_PX + 1, (2,), generator=generator)).tolist()
    return images[..., y : y + crop_px, x : x + crop_px], masks[:, y : y + crop_px, x : x + crop_px]


def _targets(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cells = F.max_pool2d(masks[:, None].float(), CELL_PX)
    return cells.amax(dim=(2, 3)), cells


@torch.no_grad()
def predict(model: torch.nn.Module, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    model.eval()
    return np.concatenate(
        [
            model(torch.from_numpy(images[i : i + batch_size]))[0][:, 0].numpy()
            for i in range(0, len(images), batch_size)
        ]
    )


def generate(seed: int, count: int, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` generated images as uint8 pixels [N, C, H, W] (a quarter of float32's memory) and their
    bool masks [N, H, W]; odd ones defective, textures from recipe.families."""
    size, channels = recipe.size_px, recipe.channels
    pixels = np.empty((count, channels, size, size), np.uint8)
    masks = np.empty((count, size, size), bool)
    for index in range(count):
        made = surfaces.surface(
            seed,
            index,
            size=size,
            channels=channels,
            defect=bool(index % 2),
            families=recipe.families,
        )
        pixels[index] = np.round(made.image * 255)
        masks[index] = made.mask
    return torch.from_numpy(pixels), torch.from_numpy(masks)


def train(recipe: Recipe, threads: int) -> torch.nn.Module:
    """Train `recipe` from scratch and return the net in eval mode."""
    deterministic(recipe.seed, threads)
    started_s = time.perf_counter()
    pixels, masks = generate(recipe.seed, recipe.train_images, recipe)
    held_images, _, held_labels = surfaces.dataset(
        recipe.validation_seed,
        recipe.validation_images,
        size=recipe.size_px,
        channels=recipe.channels,
        families=recipe.families,
    )
    log.info(
        "%s: generated %d training images of %s in %.0f s",
        recipe.architecture,
        recipe.train_images,
        ", ".join(recipe.families),
        time.perf_counter() - started_s,
    )
    model = nets.ARCHITECTURES[recipe.architecture]()
    return fit(model, recipe, pixels, masks, None, (held_images, held_labels))


def _freeze_batchnorm(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.eval()


def fit(
    model: torch.nn.Module,
    recipe: Recipe,
    pixels: torch.Tensor,
    masks: torch.Tensor | None,
    labels: torch.Tensor | None,
    validation: tuple[np.ndarray, np.ndarray],
    *,
    freeze_batchnorm: bool = False,
) -> torch.nn.Module:
    """Train `model` on uint8 `pixels` [N, C, H, W] and bool `masks` [N, H, W] by `recipe`'s schedule and
    return it in eval mode. Without masks (labels [N] only) the map loss is off and crops must be whole
    images. `freeze_batchnorm` keeps the BatchNorm statistics the model came with (small fine-tuning sets).
    Logs AUROC on `validation` (float images, labels) after each epoch."""
    if masks is None and (labels is None or recipe.crop_px != recipe.size_px or recipe.whole_image_steps):
        raise ValueError("without masks: give labels, train on whole images and no whole-image steps")
    started_s = time.perf_counter()
    count = len(pixels)
    held_images, held_labels = validation
    model = model.to(memory_format=torch.channels_last)  # faster on CPU
    optimiser = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=1e-4)
    steps_per_epoch = max(count // recipe.batch_size, 1)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, recipe.learning_rate, total_steps=recipe.epochs * steps_per_epoch, pct_start=0.15
    )
    order = torch.Generator().manual_seed(recipe.seed)
    map_weight = torch.tensor(recipe.map_positive_weight)
    no_masks = torch.zeros(1, recipe.size_px, recipe.size_px, dtype=torch.bool)

    def train_mode() -> None:
        model.train()
        if freeze_batchnorm:
            _freeze_batchnorm(model)

    def step(chosen: torch.Tensor, crop_px: int) -> float:
        batch = pixels[chosen].float() / 255
        batch_masks = masks[chosen] if masks is not None else no_masks.expand(len(chosen), -1, -1).clone()
        batch, batch_masks = _augment(*_crop(batch, batch_masks, crop_px, order), order)
        label, cells = _targets(batch_masks)
        if masks is None:
            label = labels[chosen].float()[:, None]
        prob_logit, map_logit = model(batch.contiguous(memory_format=torch.channels_last), logits=True)
        loss = F.binary_cross_entropy_with_logits(prob_logit, label)
        if recipe.map_loss_weight:
            map_loss = F.binary_cross_entropy_with_logits(map_logit, cells, pos_weight=map_weight)
            loss = loss + recipe.map_loss_weight * map_loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        return loss.item()

    def report(stage: str, loss: float) -> None:
        score = auroc(predict(model, held_images), held_labels)
        log.info(
            "%s: %s loss %.4f validation AUROC %.4f (%.0f s)",
            recipe.architecture,
            stage,
            loss,
            score,
            time.perf_counter() - started_s,
        )

    for epoch in range(recipe.epochs):
        train_mode()
        permutation = torch.randperm(count, generator=order)
        total_loss = 0.0
        for index in range(steps_per_epoch):
            total_loss += step(
                permutation[index * recipe.batch_size : (index + 1) * recipe.batch_size], recipe.crop_px
            )
            schedule.step()
        report(f"epoch {epoch + 1}/{recipe.epochs}", total_loss / steps_per_epoch)
    if recipe.whole_image_steps:
        # Trained on crops, served on whole images: a short low-rate pass on whole images settles what
        # depends on the whole picture (per-image standardisation, pooling, BatchNorm statistics).
        train_mode()
        for group in optimiser.param_groups:
            group["lr"] = recipe.learning_rate / 20
        permutation = torch.randperm(count, generator=order)
        size = recipe.whole_image_batch_size
        total_loss = sum(
            step(permutation[i * size : (i + 1) * size], recipe.size_px)
            for i in range(recipe.whole_image_steps)
        )
        report(f"{recipe.whole_image_steps} whole-image steps", total_loss / recipe.whole_image_steps)
    return model.to(memory_format=torch.contiguous_format).eval()
