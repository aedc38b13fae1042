"""GPU view policies: ``nn.Module`` objects that turn a uint8 batch into training views."""

from ssl_toolkit.views.base import Views, denormalize
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig, ViewParams
from ssl_toolkit.views.multicrop import MultiCropViews
from ssl_toolkit.views.patches import PatchGridViews, patch_grid
from ssl_toolkit.views.pretext import JigsawViews, RotationViews, hamming_permutations

__all__ = ["Views", "ViewConfig", "ViewParams", "ContrastiveViews", "MultiCropViews", "PatchGridViews", "denormalize", "patch_grid",
           "JigsawViews", "RotationViews", "hamming_permutations"]
