"""Batched augmentation functions with one parameter per image.

Each function takes explicit per-image parameters, so a policy samples them once (and a
test can inspect them) and applies them to a whole batch of views in a few kernel calls.
Semantics follow torchvision's ``RandomResizedCrop`` and ``ColorJitter`` (checked in the tests).
"""

import math

import kornia
import torch
import torch.nn.functional as F


def sample_crop_boxes(n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
                      device: torch.device | str = "cpu", attempts: int = 10) -> torch.Tensor:
    """Sample ``RandomResizedCrop`` boxes ``(x0, y0, w, h)`` in pixels, torchvision's rule, batched.

    Up to ``attempts`` draws of area in ``scale * H * W`` and log-uniform aspect ratio; the first
    draw that fits is kept; images with none fall back to the central crop clamped to ``ratio``.

    Returns:
        ``(n, 4)`` float tensor of integer-valued boxes.
    """
    area = height * width
    target = area * torch.empty(n, attempts, device=device).uniform_(*scale)  # (n, A)
    log_r = torch.empty(n, attempts, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    ar = torch.exp(log_r)
    w = torch.sqrt(target * ar).round()
    h = torch.sqrt(target / ar).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)  # (n, A)
    first = ok.float().argmax(dim=1)  # index of the first fitting draw
    any_ok = ok.any(dim=1)
    w = w.gather(1, first[:, None]).squeeze(1)
    h = h.gather(1, first[:, None]).squeeze(1)
    in_ratio = width / height  # torchvision's fallback: the central crop with the ratio clamped
    if in_ratio < min(ratio):
        fw, fh = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fw, fh = round(height * max(ratio)), height
    else:
        fw, fh = width, height
    w = torch.where(any_ok, w, torch.full_like(w, fw))
    h = torch.where(any_ok, h, torch.full_like(h, fh))
    u = torch.rand(n, 2, device=device)
    x0 = torch.where(any_ok, torch.floor(u[:, 0] * (width - w + 1)), torch.floor((width - w) / 2))
    y0 = torch.where(any_ok, torch.floor(u[:, 1] * (height - h + 1)), torch.floor((height - h) / 2))
    return torch.stack([x0, y0, w, h], dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int, flip: torch.Tensor | None = None) -> torch.Tensor:
    """Crop each box, resize it to ``size x size`` (bilinear) and mirror it where ``flip``: one sampling op.

    Args:
        images: ``(N, C, H, W)`` float images.
        boxes: ``(N, 4)`` boxes ``(x0, y0, w, h)`` in pixels.
        size: Output side length.
        flip: ``(N,)`` bool, horizontal flip per image.

    Returns:
        ``(N, C, size, size)``; pixel centres map exactly as in a crop followed by a bilinear
        resize with ``align_corners=False``. Border pixels interpolate with the real pixels just
        outside the box (a crop-then-resize replicates the box's edge instead); inside, the two agree.
    """
    n, c, height, width = images.shape
    x0, y0, w, h = boxes.to(images.dtype).unbind(1)
    sx = w / width
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    theta = torch.zeros(n, 2, 3, device=images.device, dtype=images.dtype)  # (N, 2, 3) output -> input coords
    theta[:, 0, 0] = sx
    theta[:, 0, 2] = (2 * x0 + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * y0 + h) / height - 1
    grid = F.affine_grid(theta, [n, c, size, size], align_corners=False)  # (N, size, size, 2)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor,
                 active: tuple[bool, bool, bool, bool] | None = None) -> torch.Tensor:
    """torchvision ``ColorJitter`` with per-image factors and a per-image random order.

    Brightness, contrast and saturation are each torchvision's blend ``clamp(f x + (1 - f) g)`` with
    ``g`` = 0, the image's mean gray, or the per-pixel gray; so each of the four slots runs one blend
    with per-image ``f`` and ``g`` (the op an image runs in that slot picks them), plus the hue shift
    (rgb -> hsv -> rgb) where some image may run it. No op reads values back to the host.

    Args:
        x: ``(N, 3, H, W)`` RGB in [0, 1].
        factors: ``(N, 4)`` brightness, contrast, saturation factors (1 = unchanged) and hue
            shift in turns (0 = unchanged, in [-0.5, 0.5]).
        order: ``(N, 4)`` a permutation of ``0..3`` per image: the order the four ops run in.
        active: Which of the four ops any image may run (a policy passes its strengths > 0); ``None``
            reads it from ``factors``, which waits for the device.

    Returns:
        The jittered batch, equal per image to torchvision's ``adjust_*`` calls in that order.
    """
    if active is None:
        identity = torch.tensor([1.0, 1.0, 1.0, 0.0], device=x.device, dtype=x.dtype)
        active = tuple(bool(a) for a in (factors != identity).any(dim=0).tolist())
    if not any(active):
        return x
    factors = factors.to(x.dtype)
    for slot in range(4):
        op = order[:, slot]  # (N,) the op each image runs in this slot
        if any(active[:3]):
            f = torch.where(op < 3, factors.gather(1, op.clamp(max=2)[:, None]).squeeze(1), 1.0).view(-1, 1, 1, 1)
            g = 0.0  # brightness blends with black
            if active[1] or active[2]:
                gray = kornia.color.rgb_to_grayscale(x)  # (N, 1, H, W)
                g = torch.where((op == 2).view(-1, 1, 1, 1), gray, gray.mean(dim=(2, 3), keepdim=True))
                g = torch.where((op == 0).view(-1, 1, 1, 1), 0.0, g)
            y = (f * x + (1 - f) * g).clamp_(0.0, 1.0)
        else:
            y = x
        if active[3]:
            is_hue = op == 3
            shift = torch.where(is_hue, factors[:, 3], 0.0)  # a zero shift elsewhere
            y = torch.where(is_hue.view(-1, 1, 1, 1), kornia.enhance.adjust_hue(x, shift * 2 * math.pi), y)
        x = y
    return x


def random_grayscale(x: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """Replace images where ``apply`` by their 3-channel grayscale (ITU-R 601 weights, as torchvision)."""
    gray = kornia.color.rgb_to_grayscale(x).expand_as(x)  # (N, 3, H, W)
    return torch.where(apply.view(-1, 1, 1, 1), gray, x)


def random_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Gaussian blur with a per-image sigma; images with ``sigma == 0`` are left as they are.

    Kornia's kernels and separable filter, which is what ``kornia.filters.gaussian_blur2d`` runs, without its
    check that every sigma is positive: outside ``torch.compile`` that check reads ``sigma`` on the host, so with a
    sigma drawn on the GPU every eager step waited there for all the work queued before it. Here sigma is clamped
    positive instead.
    """
    apply = sigma > 0
    s = sigma.clamp_min(1e-3)[:, None]  # (N, 1): the same sigma along both axes
    kernel = kornia.filters.get_gaussian_kernel1d(kernel_size, s)  # (N, kernel_size)
    blurred = kornia.filters.filter2d_separable(x, kernel, kernel, border_type="reflect")
    return torch.where(apply.view(-1, 1, 1, 1), blurred, x)


def random_solarize(x: torch.Tensor, apply: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Invert pixels above ``threshold`` in images where ``apply`` (BYOL's solarization)."""
    # The threshold as a tensor filled on x's device: kornia copies a float one there from the host (a blocking copy).
    t = torch.full((), threshold, device=x.device, dtype=x.dtype)
    return torch.where(apply.view(-1, 1, 1, 1), kornia.enhance.solarize(x, t), x)
