"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual
Representations", https://arxiv.org/abs/2002.05709).

Two augmented views per image, a shared encoder f and projection MLP g, NT-Xent on
z = g(f(x)) with negatives from the whole global batch.
"""

import torch

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.heads import projection_head
from ssl_toolkit.losses import NTXentLoss
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import ContrastiveViews, ViewConfig, Views


class SimCLR(BaseSSLModule):
    """SimCLR: backbone + 2-layer projection head + NT-Xent + two SimCLR views.

    Args:
        backbone: Encoder f (resnet18 with the CIFAR stem for CIFAR-10).
        optim: Optimizer and schedule.
        views: Augmentations of the two views.
        temperature: NT-Xent temperature (0.5 for CIFAR-10 in the paper, App. B.9).
        proj_hidden_dim: Hidden width of g (2048 in SimCLR v2 and most CIFAR ports).
        proj_out_dim: Output width of g (128 in the paper).
        proj_batch_norm: Batch norm in g's hidden layer, as in SimCLR v2 and most CIFAR ports; ``False`` gives
            the v1 paper's ``W2 relu(W1 h)`` with biases (lightly's CIFAR-10 benchmark head).
        channels_last: NHWC memory layout for the convolutions.
        per_view_batch_norm: Encode each view as its own batch, so batch norm normalises each view with that
            view's statistics, as lightly's CIFAR-10 benchmark (``forward(x0)``, ``forward(x1)``) and many PyTorch
            ports do. Off by default: all views in one ``2B`` batch, like SimCLR's global batch norm, where the
            statistics cannot tell the two views of a batch apart. Costs some speed (two smaller passes).

    Example:
        >>> m = SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16))
        >>> views = m.view_policy(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
        >>> sorted(m.step(views))
        ['neg_sim', 'ntxent_loss', 'pos_sim', 'z_std']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(),
                 views: ViewConfig = ViewConfig(), temperature: float = 0.5, proj_hidden_dim: int = 2048,
                 proj_out_dim: int = 128, channels_last: bool = False, proj_batch_norm: bool = True,
                 per_view_batch_norm: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        self.save_config(temperature=temperature, proj_hidden_dim=proj_hidden_dim, proj_out_dim=proj_out_dim,
                         proj_batch_norm=proj_batch_norm, per_view_batch_norm=per_view_batch_norm)
        self.per_view_batch_norm = per_view_batch_norm
        self.projector = projection_head(self.feature_dim, proj_hidden_dim, proj_out_dim, batch_norm=proj_batch_norm)
        self.criterion = NTXentLoss(temperature)
        self.view_policy = ContrastiveViews(views, num_views=2)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """z = g(f(x)) of a batch of crops: ``(N, out_dim)`` projections."""
        return self.projector(self.backbone(self.prepare_input(x)))  # (N, out_dim)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        if self.per_view_batch_norm:
            z1, z2 = (self.project(crops) for crops in views.crops)  # (B, out_dim) each, batch statistics per view
        else:
            z1, z2 = self.project(torch.cat(views.crops)).chunk(2)  # one (2B, 3, h, w) batch -> (B, out_dim) each
        return self.criterion(z1, z2)
