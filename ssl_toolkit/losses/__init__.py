"""Losses: pure ``nn.Module`` objects or functions with no learnable parameters and no dataset knowledge."""

from ssl_toolkit.losses.clip import clip_loss
from ssl_toolkit.losses.dino import dino_loss, update_center
from ssl_toolkit.losses.infonce import info_nce
from ssl_toolkit.losses.inpainting import adversarial_losses, masked_l2
from ssl_toolkit.losses.ntxent import NTXentLoss, nt_xent
from ssl_toolkit.losses.pretext import pretext_cross_entropy, rebalanced_cross_entropy

__all__ = ["NTXentLoss", "adversarial_losses", "masked_l2", "clip_loss", "dino_loss", "info_nce", "nt_xent", "pretext_cross_entropy",
           "rebalanced_cross_entropy", "update_center"]
