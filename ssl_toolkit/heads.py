"""Projection heads as small presets over one MLP builder.

The SimCLR projection head is the 2-layer MLP of Chen et al. 2020,
https://arxiv.org/abs/2002.05709 (Sec. 2.1); batch norm in the hidden layers follows
SimCLR v2 (https://arxiv.org/abs/2006.10029) and common CIFAR practice. MoCo v2's head
(Chen et al. 2020, https://arxiv.org/abs/2003.04297) is the same MLP without batch norm.
"""

from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True,
        last_batch_norm: bool = False) -> nn.Sequential:
    """Linear layers with BN + ReLU between them; ``num_layers`` counts the linear layers.

    Example:
        >>> [type(m).__name__ for m in mlp(512, 2048, 128)]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
    """
    if num_layers < 1:
        raise ValueError(f"An MLP head needs at least 1 layer; got num_layers={num_layers}.")
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers += [nn.BatchNorm1d(hidden_dim)]
        layers += [nn.ReLU(inplace=True)]
        d = hidden_dim
    layers += [nn.Linear(d, out_dim, bias=not last_batch_norm)]
    if last_batch_norm:
        layers += [nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def projection_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                    batch_norm: bool = True) -> nn.Sequential:
    """Projection head g(.): MLP with BN in hidden layers (SimCLR) or without (MoCo v2), no BN on the output."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers=num_layers, batch_norm=batch_norm, last_batch_norm=False)
