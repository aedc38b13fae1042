"""SimCLR-style view policy: random resized crop, flip, colour jitter, grayscale, blur, solarize.

Augmentations of SimCLR (Chen et al. 2020, https://arxiv.org/abs/2002.05709, App. A), with
optional solarization as in BYOL (Grill et al. 2020, https://arxiv.org/abs/2006.07733).
Every view of every image draws its own parameters; all views of a batch are made together.
"""

from dataclasses import dataclass

import torch
from torch import nn

from ssl_toolkit.views import functional as VF
from ssl_toolkit.views.base import Views

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@dataclass(frozen=True)
class ViewConfig:
    """Augmentation settings; defaults are SimCLR's CIFAR-10 setting (colour strength s = 0.5).

    Args:
        crop_size: Side of each view in pixels (32 for CIFAR, 224 for ImageNet).
        scale: Area range of the random crop; raise the lower end (e.g. 0.2) if training is unstable
            on small images, lower it for stronger augmentation.
        ratio: Aspect-ratio range of the random crop.
        flip_p: Probability of a horizontal flip; 0 for data where mirroring changes the class (digits).
        jitter_p: Probability of colour jitter (0.8 in SimCLR).
        brightness: Brightness strength b: factor in [1 - b, 1 + b] (0.8 s in SimCLR).
        contrast: Contrast strength, same form (0.8 s).
        saturation: Saturation strength, same form (0.8 s).
        hue: Hue shift range in turns, in [-hue, hue], at most 0.5 (0.2 s).
        gray_p: Probability of grayscale (0.2 in SimCLR).
        blur_p: Probability of Gaussian blur (0.5 on ImageNet, 0 on CIFAR in SimCLR).
        blur_sigma: Sigma range of the blur in pixels.
        blur_kernel: Odd kernel size; about 10% of crop_size (23 for 224).
        solarize_p: Probability of solarization (0 in SimCLR; BYOL uses 0.2 on its second view).
        mean: Per-channel normalisation mean (dataset statistics).
        std: Per-channel normalisation std.
    """

    crop_size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 3
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = CIFAR_MEAN
    std: tuple[float, float, float] = CIFAR_STD

    def __post_init__(self):
        probs = {"flip_p": self.flip_p, "jitter_p": self.jitter_p, "gray_p": self.gray_p, "blur_p": self.blur_p,
                 "solarize_p": self.solarize_p}
        for name, p in probs.items():
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"views.{name} is a probability in [0, 1]; got {p}.")
        if self.crop_size < 1:
            raise ValueError(f"views.crop_size must be >= 1; got {self.crop_size}.")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"views.scale must satisfy 0 < min <= max <= 1; got {self.scale}. SimCLR uses [0.08, 1.0].")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"views.ratio must satisfy 0 < min <= max; got {self.ratio}.")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"views.{name} must be >= 0; got {getattr(self, name)}.")
        if not 0 <= self.hue <= 0.5:
            raise ValueError(f"views.hue is a shift in turns in [0, 0.5]; got {self.hue}. SimCLR uses 0.1 on CIFAR.")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"views.blur_kernel must be a positive odd number; got {self.blur_kernel}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"views.mean and views.std need 3 values, std > 0; got {self.mean}, {self.std}.")


@dataclass
class ViewParams:
    """Parameters drawn for ``N = num_views * B`` views (view-major: rows ``v*B .. v*B+B-1`` are view v)."""

    boxes: torch.Tensor  # (N, 4) crop boxes x0, y0, w, h in pixels
    flip: torch.Tensor  # (N,) bool
    jitter: torch.Tensor  # (N, 4) brightness, contrast, saturation factors and hue shift (identity where not applied)
    order: torch.Tensor  # (N, 4) order of the jitter ops
    gray: torch.Tensor  # (N,) bool
    blur_sigma: torch.Tensor  # (N,) 0 where no blur
    solarize: torch.Tensor  # (N,) bool


class ContrastiveViews(nn.Module):
    """Makes ``num_views`` independently augmented views of each image, on the images' device.

    Args:
        config: Augmentation settings.
        num_views: Views per image (2 for SimCLR).

    Example:
        >>> policy = ContrastiveViews(ViewConfig(crop_size=16), num_views=2)
        >>> views = policy(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8))
        >>> len(views.crops), tuple(views.crops[0].shape)
        (2, (4, 3, 16, 16))
    """

    def __init__(self, config: ViewConfig = ViewConfig(), num_views: int = 2):
        super().__init__()
        if num_views < 1:
            raise ValueError(f"num_views must be >= 1; got {num_views}.")
        self.config = config
        self.num_views = num_views
        strengths = (config.brightness, config.contrast, config.saturation, config.hue)
        self.jitter_active = tuple(config.jitter_p > 0 and v > 0 for v in strengths)  # ops that can change an image
        self.register_buffer("mean", torch.tensor(config.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.std).view(1, 3, 1, 1), persistent=False)
        lo = torch.tensor([1 - config.brightness, 1 - config.contrast, 1 - config.saturation, -config.hue])
        hi = torch.tensor([1 + config.brightness, 1 + config.contrast, 1 + config.saturation, config.hue])
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0])
        # (3, 4): the jitter factors' lower and upper bounds, and the factors that change nothing. Made here, once:
        # ``torch.tensor(..., device=cuda)`` copies from pageable host memory and waits for all queued GPU work.
        self.register_buffer("jitter_bounds", torch.stack([lo.clamp_min(torch.tensor([0.0, 0.0, 0.0, -0.5])), hi,
                                                           identity]), persistent=False)

    def sample(self, batch: int, height: int, width: int, device: torch.device | str = "cpu") -> ViewParams:
        """Draw independent parameters for every view of every image."""
        c, n = self.config, batch * self.num_views
        u = torch.rand(n, 9, device=device)
        lo, hi, identity = self.jitter_bounds.to(device)  # (4,) each; a no-op once the policy moved with its model
        jitter = lo + (hi - lo) * torch.rand(n, 4, device=device)  # (N, 4)
        jitter = torch.where((u[:, 2] < c.jitter_p)[:, None], jitter, identity)
        sigma = c.blur_sigma[0] + (c.blur_sigma[1] - c.blur_sigma[0]) * u[:, 5]
        return ViewParams(
            boxes=VF.sample_crop_boxes(n, height, width, c.scale, c.ratio, device=device),
            flip=u[:, 1] < c.flip_p,
            jitter=jitter,
            order=torch.rand(n, 4, device=device).argsort(dim=1),
            gray=u[:, 3] < c.gray_p,
            blur_sigma=torch.where(u[:, 4] < c.blur_p, sigma, torch.zeros_like(sigma)),
            solarize=u[:, 6] < c.solarize_p,
        )

    def render(self, images: torch.Tensor, params: ViewParams, normalize: bool = True) -> torch.Tensor:
        """Apply ``params`` to uint8 ``(B, 3, H, W)`` images; returns ``(num_views * B, 3, s, s)`` normalised
        (or in [0, 1] without ``normalize``)."""
        c = self.config
        x = images.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
        x = x.repeat(self.num_views, 1, 1, 1)  # (V*B, 3, H, W) view-major
        x = VF.resized_crop(x, params.boxes, c.crop_size, params.flip)  # (V*B, 3, s, s)
        x = VF.color_jitter(x, params.jitter, params.order, active=self.jitter_active)
        if c.gray_p > 0:
            x = VF.random_grayscale(x, params.gray)
        if c.blur_p > 0:
            x = VF.random_blur(x, params.blur_sigma, c.blur_kernel)
        if c.solarize_p > 0:
            x = VF.random_solarize(x, params.solarize)
        return (x - self.mean) / self.std if normalize else x

    @torch.no_grad()
    def forward(self, images: torch.Tensor, normalize: bool = True) -> Views:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"View policies take uint8 (B, 3, H, W) batches; got {images.dtype} {tuple(images.shape)}. "
                             "Data modules yield uint8 RGB; check a custom dataset's output.")
        b, _, h, w = images.shape
        x = self.render(images, self.sample(b, h, w, images.device), normalize)
        return Views(crops=list(x.chunk(self.num_views)))
