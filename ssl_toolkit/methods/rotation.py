"""RotNet (Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image Rotations",
https://arxiv.org/abs/1803.07728).

Each image is shown at 0, 90, 180 and 270 degrees; the network classifies which rotation it sees.
Recognising the rotation requires recognising the object's canonical orientation, hence its parts.
"""

import torch

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.heads import mlp
from ssl_toolkit.losses import pretext_cross_entropy
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import RotationViews, ViewConfig, Views

# Crop and flip as in the paper's CIFAR code; no colour change (it does not help rotation prediction).
ROTATION_VIEWS = ViewConfig(scale=(0.6, 1.0), jitter_p=0.0, gray_p=0.0)


class Rotation(BaseSSLModule):
    """Rotation prediction: backbone + MLP classifier over 4 rotations, cross-entropy.

    Args:
        backbone: The encoder.
        optim: Optimizer and schedule (paper, CIFAR: SGD lr 0.1, momentum 0.9, wd 5e-4, batch 128).
        views: Crop/flip before rotating (the crop must be square).
        all_rotations: All four rotations of every image in each batch (the paper's choice), else one at random.
        hidden_dim: Hidden width of the classifier (0 for a linear classifier).
        channels_last: NHWC memory layout for the convolutions.

    Example:
        >>> m = Rotation(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16))
        >>> sorted(m.step(m.view_policy(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))))
        ['acc', 'ce_loss']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=0.1),
                 views: ViewConfig = ROTATION_VIEWS, all_rotations: bool = True, hidden_dim: int = 512,
                 channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        self.save_config(all_rotations=all_rotations, hidden_dim=hidden_dim)
        self.classifier = mlp(self.feature_dim, hidden_dim, 4, num_layers=2 if hidden_dim else 1)
        self.view_policy = RotationViews(views, all_rotations)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        logits = self.classifier(self.backbone(self.prepare_input(views.crops[0])))  # (V*B, 4)
        return pretext_cross_entropy(logits, views.targets)
