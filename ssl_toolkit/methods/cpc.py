"""CPC v2 (Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding",
https://arxiv.org/abs/1807.03748; Hénaff et al. 2019, "Data-Efficient Image Recognition with
Contrastive Predictive Coding", https://arxiv.org/abs/1905.09272).

Each image becomes a grid of overlapping patches (made and augmented per patch on the GPU);
the backbone encodes every patch, a row-causal context network summarises the rows above each
position, and one linear predictor per step k predicts the embedding of the patch k rows below,
scored by InfoNCE against every other patch of the batch.
"""

import torch
import torch.nn.functional as F
from torch import nn

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.losses.cpc import cpc_info_nce
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import ViewConfig, Views
from ssl_toolkit.views.patches import PatchGridViews

CPC_PATCH_VIEWS = ViewConfig(scale=(0.3, 1.0), gray_p=0.25)  # per-patch jitter, flips, colour (CPC v2 App. A.2);
# crop scale 0.3 rather than 0.6: on digits it lifted the kNN gain from +0.9 to +5.2 points (tests/test_cpc.py)


class RowCausalConv(nn.Module):
    """A 2-D convolution whose output at row t sees only rows <= t (and every column)."""

    def __init__(self, c_in: int, c_out: int, rows: int = 2):
        super().__init__()
        self.rows = rows
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=(rows, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (1, 1, self.rows - 1, 0)))  # pad above only: no row below leaks in


class ContextNetwork(nn.Module):
    """Residual stack of row-causal convolutions (the PixelCNN-style context of CPC v2, causal over rows).

    Args:
        dim: Patch-embedding width (input and output).
        hidden: Width inside the stack.
        layers: Number of residual blocks; the receptive field grows by one row per block.
    """

    def __init__(self, dim: int, hidden: int = 256, layers: int = 3):
        super().__init__()
        if hidden < 1 or layers < 0:
            raise ValueError(f"CPC's context network needs context_dim >= 1 and context_layers >= 0; got {hidden}, "
                             f"{layers}.")
        self.inp = nn.Conv2d(dim, hidden, 1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), RowCausalConv(hidden, hidden), nn.ReLU(),
                                                  nn.Conv2d(hidden, hidden, 1)) for _ in range(layers))
        self.out = nn.Conv2d(hidden, dim, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)  # (B, hidden, G, G)
        for block in self.blocks:
            h = h + block(h)
        return self.out(F.relu(h))  # (B, D, G, G): context of each position from its row and the rows above


class CPCV2(BaseSSLModule):
    """CPC v2: patch encoder + row-causal context network + per-step linear predictors + InfoNCE.

    Args:
        backbone: Patch encoder; use ``norm: layer`` (CPC v2 replaces batch norm by layer norm).
        optim: Optimizer and schedule (CPC v2: Adam, lr 4e-4 at batch 512 for ResNet-161).
        views: Augmentation of each patch (``crop_size`` is set to ``patch``; ``scale`` is the spatial jitter).
        patch: Patch side (8 px at 32 px, 64 px at 224 px in the paper).
        stride: Step between patches (half the patch: 50% overlap, a 7x7 grid at 32 px).
        steps: How many rows below are predicted (paper: up to 5 of 7).
        context_dim: Width of the context network.
        context_layers: Residual blocks in the context network.
        channels_last: NHWC memory layout for the convolutions.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(cifar_stem=True, norm="layer"),
                 optim: OptimConfig = OptimConfig("adamw", lr=1e-3, weight_decay=1e-4, warmup_epochs=5),
                 views: ViewConfig = CPC_PATCH_VIEWS, patch: int = 8, stride: int = 4, steps: int = 3,
                 context_dim: int = 256, context_layers: int = 3, channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        if steps < 1:
            raise ValueError(f"CPC needs steps >= 1 rows to predict; got {steps}. The paper predicts up to 5.")
        self.save_config(patch=patch, stride=stride, steps=steps, context_dim=context_dim,
                         context_layers=context_layers)
        self.view_policy = PatchGridViews(patch, stride, views)
        self.context = ContextNetwork(self.feature_dim, context_dim, context_layers)
        self.predictors = nn.ModuleList(nn.Conv2d(self.feature_dim, self.feature_dim, 1) for _ in range(steps))

    def predict(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Predictions ``W_k c`` for each step k, from the contexts of the rows that have a row k below."""
        c = self.context(z)  # (B, D, G, G)
        g = z.shape[2]
        if len(self.predictors) >= g:
            raise ValueError(f"CPC predicts {len(self.predictors)} rows ahead but the grid has only {g} rows; "
                             "lower steps or use larger images / a smaller stride.")
        return [w(c[:, :, : g - k]) for k, w in enumerate(self.predictors, start=1)]  # k: (B, D, G-k, G)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        b, g = views.grid
        feats = self.backbone(self.prepare_input(views.crops[0]))  # (B*G*G, D)
        z = feats.view(b, g, g, -1).permute(0, 3, 1, 2)  # (B, D, G, G)
        return cpc_info_nce(self.predict(z), z)
