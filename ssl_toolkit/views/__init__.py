"""GPU view policies: ``nn.Module`` objects that turn a uint8 batch into training views."""

from ssl_toolkit.views.base import Views, denormalize
from ssl_toolkit.views.colorization import ColorizationViews, ab_bins
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig, ViewParams
from ssl_toolkit.views.multicrop import MultiCropViews
from ssl_toolkit.views.patches import PatchGridViews, patch_grid
from ssl_toolkit.views.pretext import (InpaintingViews, JigsawViews, RotationViews, hamming_permutations,
                                       inpainting_masks)

__all__ = ["Views", "ViewConfig", "ViewParams", "ContrastiveViews", "MultiCropViews", "PatchGridViews", "denormalize", "patch_grid",
           "InpaintingViews", "JigsawViews", "RotationViews", "hamming_permutations", "inpainting_masks",
           "ColorizationViews", "ab_bins"]
