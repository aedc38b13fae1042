"""Multi-crop views: global crops for teacher and student, smaller local crops for the student only.

Caron et al. 2020, SwAV (https://arxiv.org/abs/2006.09882, Sec. 3.2) and DINO
(https://arxiv.org/abs/2104.14294, Sec. 3.1 and App. B): each global crop has its own
augmentation settings (DINO: blur always on the first, rarely on the second, which is also
solarized), local crops are small and many.
"""

import torch
from torch import nn

from ssl_toolkit.views.base import Views
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig


class MultiCropViews(nn.Module):
    """One policy per global crop plus one for all local crops; views come global first.

    Args:
        global_views: Settings of each global crop (at least 2 for DINO).
        local_view: Settings shared by the local crops (their ``crop_size`` is the local size).
        num_local: Number of local crops (DINO: 8-10 on ImageNet; 4-6 is common on CIFAR).

    Example:
        >>> mc = MultiCropViews([ViewConfig(crop_size=32)] * 2, ViewConfig(crop_size=16), num_local=3)
        >>> [tuple(c.shape[-2:]) for c in mc(torch.zeros(2, 3, 32, 32, dtype=torch.uint8)).crops]
        [(32, 32), (32, 32), (16, 16), (16, 16), (16, 16)]
    """

    def __init__(self, global_views: list[ViewConfig], local_view: ViewConfig, num_local: int):
        super().__init__()
        if len(global_views) < 1 or num_local < 0:
            raise ValueError(f"Multi-crop needs >= 1 global view and num_local >= 0; got {len(global_views)}, {num_local}.")
        self.globals = nn.ModuleList(ContrastiveViews(c, num_views=1) for c in global_views)
        self.local = ContrastiveViews(local_view, num_views=num_local) if num_local else None
        self.num_global, self.num_local = len(global_views), num_local

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        crops = [policy(images).crops[0] for policy in self.globals]
        if self.local is not None:
            crops += self.local(images).crops
        return Views(crops=crops)
