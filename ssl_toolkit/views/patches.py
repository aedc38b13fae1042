"""CPC patch-grid views: each image cut into a grid of overlapping patches, each patch augmented on its own.

Hénaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding"
(CPC v2), https://arxiv.org/abs/1905.09272, Sec. 3 and App. A.2: a 7x7 grid of patches with 50%
overlap, each patch augmented independently (spatial jitter, flips, colour) so predictions
cannot rely on low-level cues shared by neighbouring patches.
"""

from dataclasses import replace

import torch
from torch import nn

from ssl_toolkit.views.base import Views
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig


def patch_grid(images: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """Cut ``(B, C, H, W)`` images into ``(B, G, G, C, patch, patch)`` patches, row-major, ``G = (H - patch) / stride + 1``.

    Example:
        >>> patch_grid(torch.arange(16.0).view(1, 1, 4, 4), patch=2, stride=2)[0, 1, 0, 0].tolist()
        [[8.0, 9.0], [12.0, 13.0]]
    """
    b, c, h, w = images.shape
    if patch > min(h, w):  # was torch's "maximum size for tensor at dimension 2 is 32 but size is 40"
        raise ValueError(f"CPC's patch of {patch} px is larger than the {h}x{w} images; set model patch below it (8 px "
                         "at 32 px, with stride 4: a 7x7 grid).")
    if h != w or (h - patch) % stride:
        raise ValueError(f"A patch grid needs square images with (size - patch) divisible by stride; got {h}x{w}, "
                         f"patch {patch}, stride {stride}. Resize images to (G - 1) * stride + patch.")
    p = images.unfold(2, patch, stride).unfold(3, patch, stride)  # (B, C, G, G, patch, patch)
    return p.permute(0, 2, 3, 1, 4, 5).contiguous()


class PatchGridViews(nn.Module):
    """Overlapping patches of each image, every patch with its own random augmentation.

    Args:
        patch: Patch side in pixels (64 at 224 px in CPC v2; 8 at 32 px).
        stride: Step between patches (half the patch: 50% overlap).
        patch_views: Augmentation of each patch; ``crop_size`` is forced to ``patch`` and the crop
            ``scale`` acts as spatial jitter.

    Example:
        >>> views = PatchGridViews(patch=8, stride=4)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        >>> tuple(views.crops[0].shape)  # 2 images x 7 x 7 patches
        (98, 3, 8, 8)
    """

    def __init__(self, patch: int = 8, stride: int = 4, patch_views: ViewConfig = ViewConfig(scale=(0.6, 1.0))):
        super().__init__()
        if not 0 < stride <= patch:
            raise ValueError(f"CPC needs 0 < stride <= patch; got stride={stride}, patch={patch}.")
        self.patch, self.stride = patch, stride
        self.policy = ContrastiveViews(replace(patch_views, crop_size=patch), num_views=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        grid = patch_grid(images, self.patch, self.stride)  # (B, G, G, 3, p, p) uint8
        b, g = grid.shape[:2]
        patches = self.policy(grid.view(b * g * g, *grid.shape[3:])).crops[0]  # (B*G*G, 3, p, p) independent params
        return Views(crops=[patches], grid=(b, g))
