"""Colorization labels (Zhang, Isola & Efros 2016, "Colorful Image Colorization", https://arxiv.org/abs/1603.08511).

Images go to CIE Lab on their device (kornia, sRGB with D65 white). The network sees the lightness L and
classifies each output pixel's colour (a, b) over quantised in-gamut ab bins (Sec. 2.1): targets are
soft-encoded over the nearest bins, classes are rebalanced by the inverse of the smoothed empirical bin
distribution of the training data (Sec. 2.2), and colours are rendered with the annealed mean (Sec. 2.3).
"""

import functools

import torch
from kornia.color import lab_to_rgb, rgb_to_lab
from torch import nn

from ssl_toolkit.views.base import Views
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig

# Lightness L in [0, 100] enters the network as L / 50 - 1 (the paper centres it: L - 50), copied to 3 channels
# so any toolkit backbone takes it unchanged.
L_CENTRE, L_SCALE = 50.0, 50.0


@functools.lru_cache(maxsize=None)
def _gamut_bins(grid: int, steps: int) -> torch.Tensor:
    levels = torch.linspace(0, 1, steps)
    rgb = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, -1, 1)  # every sRGB colour
    ab = rgb_to_lab(rgb)[0, 1:, :, 0]  # (2, steps^3)
    return torch.unique(torch.round(ab / grid).T, dim=0) * grid  # (Q, 2) sorted bin centres


def ab_bins(grid: int = 10) -> torch.Tensor:
    """``(Q, 2)`` centres of the ab bins of side ``grid`` that some sRGB colour falls in (the in-gamut bins).

    The bins are the squares around multiples of ``grid``; a bin is kept when a colour of a 64^3 sRGB grid
    (any lightness) quantises to it. ``grid=10`` gives 261 bins; the paper reports 313 with its own gamut
    test, which counts some bins at the gamut's edge that no sRGB colour reaches.

    Example:
        >>> ab_bins().shape
        torch.Size([261, 2])
    """
    if grid <= 0:
        raise ValueError(f"The ab bin size must be > 0; got {grid}. The paper uses 10.")
    return _gamut_bins(grid, 64).clone()


def scale_lightness(lightness: torch.Tensor) -> torch.Tensor:
    """The network input of lightness ``(B, 1, H, W)`` in [0, 100]: scaled to [-1, 1], on all 3 channels."""
    return ((lightness - L_CENTRE) / L_SCALE).expand(-1, 3, -1, -1)


def lightness_input(rgb: torch.Tensor) -> torch.Tensor:
    """The network input of ``(B, 3, H, W)`` RGB in [0, 1] (evaluators use this on whole images)."""
    return scale_lightness(rgb_to_lab(rgb)[:, :1])


def input_lightness(x: torch.Tensor) -> torch.Tensor:
    """The ``(B, 1, H, W)`` lightness in [0, 100] back from a :func:`lightness_input`."""
    return x[:, :1] * L_SCALE + L_CENTRE


def lab_image(lightness: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` RGB in [0, 1] from lightness ``(B, 1, H, W)`` and ab ``(B, 2, h, w)`` (upsampled to H x W)."""
    if ab.shape[-2:] != lightness.shape[-2:]:
        ab = nn.functional.interpolate(ab, size=lightness.shape[-2:], mode="bilinear", align_corners=False)
    return lab_to_rgb(torch.cat([lightness, ab], dim=1), clip=True)


def nearest_bin(ab: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Index of the nearest bin centre for ``(B, 2, h, w)`` ab values: ``(B, h, w)``."""
    return torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins).argmin(1).view(ab.shape[0], *ab.shape[2:])


def soft_encode(ab: torch.Tensor, bins: torch.Tensor, neighbours: int = 5, sigma: float = 5.0) -> torch.Tensor:
    """Soft-encoded targets ``(B, Q, h, w)`` of ab ``(B, 2, h, w)``: Gaussian weights on the nearest bins (Sec. 2.1).

    Each pixel's ``neighbours`` nearest bin centres get ``exp(-d^2 / 2 sigma^2)``, normalised to sum to 1
    (the paper: 5 neighbours, sigma 5); all other bins get 0.

    Example:
        >>> z = soft_encode(torch.tensor([[[[12.0]], [[-3.0]]]]), ab_bins())
        >>> round(float(z.sum()), 6), int((z > 0).sum())
        (1.0, 5)
    """
    b, _, h, w = ab.shape
    d = torch.cdist(ab.permute(0, 2, 3, 1).reshape(-1, 2), bins)  # (B*h*w, Q) distances to every bin
    dist, idx = d.topk(neighbours, dim=1, largest=False)  # (N, k)
    weights = torch.softmax(-dist.square() / (2 * sigma**2), dim=1)  # normalised Gaussian weights
    z = torch.zeros_like(d).scatter_(1, idx, weights)  # (N, Q)
    return z.view(b, h, w, -1).permute(0, 3, 1, 2)


def rebalancing_weights(counts: torch.Tensor, bins: torch.Tensor, mix: float = 0.5, sigma: float = 5.0) -> torch.Tensor:
    """Class weights ``(Q,)`` from pixel counts per bin (Zhang et al., Eq. 4).

    ``w ∝ ((1 - mix) p~ + mix / Q)^-1`` with ``p~`` the empirical distribution smoothed by a Gaussian of ``sigma``
    in ab space, scaled so that ``E_p~[w] = 1``. ``mix`` is the paper's lambda (0.5); 1 gives equal weights.

    Example:
        >>> w = rebalancing_weights(torch.tensor([90.0, 10.0]), torch.tensor([[0.0, 0.0], [50.0, 0.0]]))
        >>> [round(v, 3) for v in w.tolist()]
        [0.882, 2.059]
    """
    if not 0 <= mix <= 1:
        raise ValueError(f"The rebalancing mix (lambda) is in [0, 1]; got {mix}. The paper uses 0.5; 1 turns it off.")
    if counts.sum() <= 0:
        raise ValueError("Class rebalancing needs at least one pixel of training data; got none.")
    p = counts.double() / counts.sum()
    kernel = torch.exp(-torch.cdist(bins.double(), bins.double()).square() / (2 * sigma**2))  # (Q, Q)
    smooth = kernel @ p
    smooth = smooth / smooth.sum()
    w = 1.0 / ((1 - mix) * smooth + mix / len(bins))
    return (w / (smooth * w).sum()).float()


def annealed_mean(logits: torch.Tensor, bins: torch.Tensor, temperature: float = 0.38) -> torch.Tensor:
    """ab ``(B, 2, h, w)`` from bin logits ``(B, Q, h, w)``: the mean of the distribution sharpened by ``temperature``.

    ``f_T(z) ∝ exp(log z / T)``, i.e. a softmax of ``logits / T`` (Sec. 2.3: T = 0.38 between the mean, T = 1,
    and the mode, T -> 0).
    """
    if temperature <= 0:
        raise ValueError(f"The annealed-mean temperature must be > 0; got {temperature}. The paper uses 0.38.")
    probs = torch.softmax(logits.float() / temperature, dim=1)  # (B, Q, h, w)
    return torch.einsum("bqhw,qc->bchw", probs, bins.to(probs))


class ColorizationViews(nn.Module):
    """Crops as lightness, with their colour as the label.

    ``crops[0]`` is the crop's scaled lightness (3 equal channels) and ``targets`` its ab channels
    ``(B, 2, s, s)`` in Lab units; the method pools them to its output resolution and quantises them.

    Args:
        config: Crop and flip of the crop; keep colour jitter and grayscale off, they change the colours to predict.

    Example:
        >>> v = ColorizationViews(ViewConfig(crop_size=16, jitter_p=0, gray_p=0))
        >>> out = v(torch.full((2, 3, 16, 16), 255, dtype=torch.uint8))
        >>> tuple(out.crops[0].shape), tuple(out.targets.shape), round(float(out.crops[0].max()), 3)
        ((2, 3, 16, 16), (2, 2, 16, 16), 1.0)
    """

    def __init__(self, config: ViewConfig = ViewConfig()):
        super().__init__()
        if config.jitter_p > 0 or config.gray_p > 0:
            raise ValueError("Colorization predicts the image's own colours: set views.jitter_p=0 and views.gray_p=0 "
                             f"(got {config.jitter_p} and {config.gray_p}).")
        self.policy = ContrastiveViews(config, num_views=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        if images.ndim == 4 and images.shape[1] != 3:
            raise ValueError(f"Colorization needs RGB images (B, 3, H, W); got {images.shape[1]} channel(s). It learns "
                             "to predict colour from lightness, so use a colour dataset.")
        lab = rgb_to_lab(self.policy(images, normalize=False).crops[0])  # (B, 3, s, s)
        return Views(crops=[scale_lightness(lab[:, :1])], targets=lab[:, 1:])
