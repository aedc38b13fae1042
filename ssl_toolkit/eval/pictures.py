"""Pictures of what a method sees and makes: its views, and the context encoder's and colorization's outputs.

``view_pictures`` turns a uint8 batch into named image grids in [0, 1]; ``PicturesCallback`` logs them
to TensorBoard during training and ``ssl-toolkit pictures`` writes them to PNG from a checkpoint.
"""

import os

import pytorch_lightning as pl
import torch

from ssl_toolkit.eval.callbacks import is_due
from ssl_toolkit.eval.features import evaluating
from ssl_toolkit.views.base import denormalize


def _stretch(x: torch.Tensor) -> torch.Tensor:
    """Per-image min-max scaling to [0, 1], for views without a global normalisation (per-tile normalised tiles)."""
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-6)


@torch.no_grad()
def view_pictures(model, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Named ``(N, 3, h, w)`` pictures in [0, 1] of ``model``'s views of uint8 ``images``.

    Jigsaw puzzles are shown as their shuffled 3x3 tiles side by side; rotations in view order. A method with a
    ``pictures(views)`` method (inpainting, colorization) shows what it makes instead.
    """
    with evaluating(model, model.device):
        views = model.view_policy(images.to(model.device))
        c = model.view_config
        if views.grid is not None and views.targets is not None:  # jigsaw: (B*n) tiles -> one picture per puzzle
            b, g = views.grid
            tiles = _stretch(views.crops[0]).view(b, g, g, 3, *views.crops[0].shape[-2:])  # (B, g, g, 3, t, t)
            return {"jigsaw_puzzles": tiles.permute(0, 3, 1, 4, 2, 5).reshape(b, 3, g * tiles.shape[-2],
                                                                             g * tiles.shape[-1])}
        if hasattr(model, "pictures"):  # methods that make images: inpainting, colorization
            return model.pictures(views)
        by_size: dict[tuple[int, int], list[torch.Tensor]] = {}  # multi-crop (DINO): a grid per crop size
        for crop in views.crops:
            by_size.setdefault(tuple(crop.shape[-2:]), []).append(crop)
        if len(by_size) == 1:
            return {"views": denormalize(torch.cat(views.crops), c.mean, c.std)}
        return {f"views_{h}x{w}": denormalize(torch.cat(crops), c.mean, c.std) for (h, w), crops in by_size.items()}


class PicturesCallback(pl.Callback):
    """Log :func:`view_pictures` of a fixed test batch to TensorBoard every ``every_n_epochs`` epochs.

    Args:
        every_n_epochs: Log every this many epochs (and after the last).
        num_images: Test images shown.
    """

    def __init__(self, every_n_epochs: int = 10, num_images: int = 16):
        if every_n_epochs < 1 or num_images < 1:
            raise ValueError(f"PicturesCallback needs every_n_epochs >= 1 and num_images >= 1; got "
                             f"{every_n_epochs}, {num_images}.")
        self.every_n_epochs, self.num_images = every_n_epochs, num_images

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        writer = getattr(trainer.logger, "experiment", None)
        if not is_due(trainer, self.every_n_epochs) or not hasattr(writer, "add_images") or not trainer.is_global_zero:
            return
        images, _ = next(trainer.datamodule.iter_split("test", self.num_images))
        for name, pictures in view_pictures(pl_module, images).items():
            writer.add_images(f"pictures/{name}", pictures.float().cpu(), global_step=trainer.global_step)


def save_pictures(pictures: dict[str, torch.Tensor], folder: str, nrow: int = 8) -> list[str]:
    """Write each named batch of pictures as one PNG grid in ``folder``; returns the paths."""
    from torchvision.utils import save_image

    os.makedirs(folder, exist_ok=True)
    paths = []
    for name, x in pictures.items():
        path = os.path.join(folder, f"{name}.png")
        save_image(x.float().cpu(), path, nrow=nrow, padding=1)
        paths.append(path)
    return paths
