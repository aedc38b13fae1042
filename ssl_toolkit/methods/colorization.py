"""Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization", https://arxiv.org/abs/1603.08511).

The backbone sees only the lightness of each crop and predicts, for every pixel of a 1/4-resolution map,
a distribution over quantised ab colours. Targets are soft-encoded; rare (saturated) colours are weighted
up by the inverse of their smoothed frequency in the training data, so the network does not settle on
the desaturated average; rendering uses the annealed mean of the predicted distribution.
"""

import torch
import torch.nn.functional as F
from kornia.color import rgb_to_lab

from ssl_toolkit.backbones import BackboneConfig, feature_map
from ssl_toolkit.heads import ColorizationHead
from ssl_toolkit.losses import rebalanced_cross_entropy
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import ColorizationViews, ViewConfig, Views, ab_bins
from ssl_toolkit.views.colorization import (annealed_mean, input_lightness, lab_image, nearest_bin,
                                            rebalancing_weights, soft_encode)

COLORIZATION_VIEWS = ViewConfig(scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0)
MIN_COLOURFUL = 0.01  # fraction of training pixels with chroma > 5 below which the data counts as grayscale


class Colorization(BaseSSLModule):
    """Colorization as classification: backbone on lightness + conv head over ab bins, rebalanced cross-entropy.

    Args:
        backbone: The encoder; it gets the scaled L channel on all three input channels, so evaluators feed it
            the lightness of whole images (the checkpoint records this).
        optim: Optimizer and schedule (paper: Adam, lr 3e-5, betas 0.9/0.99, wd 1e-3, on ImageNet).
        views: Crop and flip (colour jitter and grayscale must stay off).
        grid: Side of the ab bins in Lab units (paper: 10, giving its 313 in-gamut bins; 261 here, see
            :func:`~ssl_toolkit.views.colorization.ab_bins`).
        output_stride: The colour map is predicted at ``crop_size / output_stride`` (paper: 4).
        neighbours: Bins each target is soft-encoded over (paper: 5).
        sigma: Gaussian width of the soft encoding and of the histogram smoothing (paper: 5).
        rebalance_mix: lambda of the class rebalancing (paper: 0.5); 1 turns rebalancing off.
        rebalance_images: Training images (evenly spaced through the set) whose colours give the bin frequencies.
        temperature: Annealed-mean temperature for rendering (paper: 0.38).
        head_width: Channels of the head's hidden convolutions.
        channels_last: NHWC memory layout for the convolutions.

    Example:
        >>> m = Colorization(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16, jitter_p=0, gray_p=0),
        ...                  head_width=8)
        >>> sorted(m.step(m.view_policy(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))))
        ['acc', 'ce_loss']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(
                 "adamw", lr=1e-3, weight_decay=1e-3, betas=(0.9, 0.99), warmup_epochs=0),
                 views: ViewConfig = COLORIZATION_VIEWS, grid: int = 10, output_stride: int = 4, neighbours: int = 5,
                 sigma: float = 5.0, rebalance_mix: float = 0.5, rebalance_images: int = 10000,
                 temperature: float = 0.38, head_width: int = 256, channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        if output_stride < 1 or views.crop_size % output_stride:
            raise ValueError(f"views.crop_size {views.crop_size} is not a multiple of output_stride {output_stride}; "
                             "the paper predicts colour at 1/4 of the input (output_stride=4).")
        if not 0 <= rebalance_mix <= 1 or rebalance_images < 1 or temperature <= 0 or neighbours < 1 or sigma <= 0:
            raise ValueError("Colorization needs 0 <= rebalance_mix <= 1, rebalance_images >= 1, temperature > 0, "
                             f"neighbours >= 1 and sigma > 0; got {rebalance_mix}, {rebalance_images}, {temperature}, "
                             f"{neighbours}, {sigma} (paper: 0.5, -, 0.38, 5, 5).")
        self.save_config(input="lightness", grid=grid, output_stride=output_stride, neighbours=neighbours,
                         sigma=sigma, rebalance_mix=rebalance_mix, rebalance_images=rebalance_images,
                         temperature=temperature, head_width=head_width)
        self.view_policy = ColorizationViews(views)
        self.register_buffer("bins", ab_bins(grid), persistent=False)  # (Q, 2)
        if neighbours > len(self.bins):
            raise ValueError(f"neighbours={neighbours} exceeds the {len(self.bins)} ab bins of grid={grid}.")
        self.register_buffer("class_weights", torch.ones(len(self.bins)))  # (Q,) set from the data at fit start
        with torch.no_grad():
            dim = feature_map(self.backbone, torch.zeros(1, 3, views.crop_size, views.crop_size)).shape[1]
        self.head = ColorizationHead(dim, len(self.bins), head_width)
        self.out_size = views.crop_size // output_stride
        self.output_stride, self.neighbours, self.sigma = output_stride, neighbours, sigma
        self.rebalance_mix, self.rebalance_images, self.temperature = rebalance_mix, rebalance_images, temperature

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.rebalance_mix < 1:
            dm = self.attached_datamodule
            if dm is None or not hasattr(dm, "iter_split"):
                raise ValueError("Colorization rebalances its classes from the training images: train with a toolkit "
                                 "DataModule (data: in the config), or set rebalance_mix=1 to turn rebalancing off.")
            self.class_weights.copy_(rebalancing_weights(self.bin_counts(dm), self.bins, self.rebalance_mix,
                                                         self.sigma))

    @torch.no_grad()
    def bin_counts(self, datamodule) -> torch.Tensor:
        """Pixel counts ``(Q,)`` of the nearest ab bins over ``rebalance_images`` evenly spaced training images,
        at the resolution the loss sees."""
        datamodule.setup()
        n = len(datamodule.splits.y_train)
        every = max(1, -(-n // self.rebalance_images))  # ceil: at most rebalance_images images
        counts, colourful, pixels, start = torch.zeros(len(self.bins)), 0, 0, 0
        for images, _ in datamodule.iter_split("train", batch_size=256 * every):
            take = images[(-start) % every::every]  # evenly spaced indices of the whole set
            start += len(images)
            ab = rgb_to_lab(take.float() / 255.0)[:, 1:]  # (b, 2, H, W)
            ab = F.adaptive_avg_pool2d(ab, self.out_size)  # (b, 2, h, w) at the loss's resolution
            counts += torch.bincount(nearest_bin(ab, self.bins.cpu()).flatten(), minlength=len(self.bins)).float()
            colourful += int((ab.norm(dim=1) > 5).sum())
            pixels += ab[:, 0].numel()
        if colourful < MIN_COLOURFUL * pixels:
            raise ValueError(f"The training images of {type(datamodule).__name__} have no colour: {colourful} of "
                             f"{pixels} pixels have chroma above 5. Colorization predicts colour from lightness, so "
                             "grayscale (1-channel) data has nothing to learn; use a colour dataset.")
        return counts

    def logits(self, views: Views) -> torch.Tensor:
        """``(B, Q, h, w)`` ab-bin logits from the lightness crops."""
        return self.head(feature_map(self.backbone, self.prepare_input(views.crops[0])), self.out_size)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        with torch.no_grad(), torch.autocast(views.targets.device.type, enabled=False):
            ab = F.avg_pool2d(views.targets.float(), self.output_stride)  # (B, 2, h, w) at the output resolution
            z = soft_encode(ab, self.bins, self.neighbours, self.sigma)  # (B, Q, h, w)
        return rebalanced_cross_entropy(self.logits(views), z, self.class_weights)

    @torch.no_grad()
    def colorize(self, views: Views) -> torch.Tensor:
        """``(B, 3, s, s)`` RGB in [0, 1]: the crops' lightness with the annealed-mean colours."""
        lightness = input_lightness(views.crops[0].float())
        return lab_image(lightness, annealed_mean(self.logits(views), self.bins, self.temperature))

    def pictures(self, views: Views) -> dict[str, torch.Tensor]:
        """Named pictures in [0, 1]: the lightness the network sees, its colours, the original crops."""
        lightness = input_lightness(views.crops[0].float())
        return {"lightness_input": (lightness / 100).expand(-1, 3, -1, -1), "colorized": self.colorize(views),
                "original": lab_image(lightness, views.targets.float())}
