"""Losses: pure ``nn.Module`` objects with no learnable parameters and no dataset knowledge."""

from ssl_toolkit.losses.ntxent import NTXentLoss, nt_xent

__all__ = ["NTXentLoss", "nt_xent"]
