"""Projection heads as small presets over one MLP builder.

The SimCLR projection head is the 2-layer MLP of Chen et al. 2020,
https://arxiv.org/abs/2002.05709 (Sec. 2.1); batch norm in the hidden layers follows
SimCLR v2 (https://arxiv.org/abs/2006.10029) and common CIFAR practice. MoCo v2's head
(Chen et al. 2020, https://arxiv.org/abs/2003.04297) is the same MLP without batch norm.
"""

import torch
import torch.nn.functional as F
from torch import nn


def mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, batch_norm: bool = True,
        last_batch_norm: bool = False, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear layers with BN + ReLU between them; ``num_layers`` counts the linear layers.

    Example:
        >>> [type(m).__name__ for m in mlp(512, 2048, 128)]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Linear']
        >>> [type(m).__name__ for m in mlp(512, 2048, 256, num_layers=3, batch_norm=False, activation=nn.GELU)]
        ['Linear', 'GELU', 'Linear', 'GELU', 'Linear']
    """
    if num_layers < 1:
        raise ValueError(f"An MLP head needs at least 1 layer; got num_layers={num_layers}.")
    if out_dim < 1 or (num_layers > 1 and hidden_dim < 1):  # 0 was an IndexError in the first step, or no output
        raise ValueError(f"A head's widths must be >= 1; got hidden {hidden_dim}, output {out_dim}. Set the method's "
                         "head widths (as it names them: proj_hidden_dim and proj_out_dim, hidden_dim, bottleneck_dim).")
    layers, d = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(d, hidden_dim, bias=not batch_norm)]
        if batch_norm:
            layers += [nn.BatchNorm1d(hidden_dim)]
        layers += [activation()]
        d = hidden_dim
    layers += [nn.Linear(d, out_dim, bias=not last_batch_norm)]
    if last_batch_norm:
        layers += [nn.BatchNorm1d(out_dim, affine=False)]
    return nn.Sequential(*layers)


def projection_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2,
                    batch_norm: bool = True) -> nn.Sequential:
    """Projection head g(.): MLP with BN in hidden layers (SimCLR) or without (MoCo v2), no BN on the output."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers=num_layers, batch_norm=batch_norm, last_batch_norm=False)


class DINOHead(nn.Module):
    """DINO projection head (Caron et al. 2021, https://arxiv.org/abs/2104.14294, Sec. 3.1 and App. A).

    A 3-layer MLP (GELU, hidden 2048) to a bottleneck, L2 normalisation, then a weight-normalised
    linear layer to ``out_dim`` prototypes without bias. With ``norm_last_layer`` its weight norm
    is fixed at 1 (the paper's default, more stable for ViT-S).

    Args:
        in_dim: Backbone feature dimension.
        out_dim: Number of output dimensions K (65536 on ImageNet; 4096 is common on CIFAR).
        hidden_dim: MLP width.
        bottleneck_dim: Width before normalisation.
        num_layers: Linear layers of the MLP.
        batch_norm: BN in the MLP (off for ViT, on helps ResNets in the paper's App. D).
        norm_last_layer: Freeze the weight norm g of the last layer at 1.
    """

    def __init__(self, in_dim: int, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, batch_norm: bool = False, norm_last_layer: bool = True):
        super().__init__()
        if out_dim < 1:  # was "cannot reshape tensor of 0 elements" in the first step
            raise ValueError(f"DINO's out_dim (prototypes) must be >= 1; got {out_dim}. It uses 65536 on ImageNet, "
                             "4096 is common on CIFAR.")
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, num_layers, batch_norm, activation=nn.GELU)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))  # (B, out_dim)


class ConvDecoder(nn.Module):
    """Feature vector -> image: a linear layer to a 4x4 map, then stride-2 transposed convolutions up to ``size``.

    The decoder of a context encoder (Pathak et al. 2016, https://arxiv.org/abs/1604.07379, Fig. 2), fed by
    the pooled backbone features (the paper's channel-wise fully connected bottleneck plays the same role).

    Args:
        in_dim: Feature dimension.
        size: Output side; 4 x a power of 2 (16, 32, 64, 128).
        width: Channels of the 4x4 map, halved at every upsampling (at least 16).
        out_channels: Output channels (3 for RGB).

    Example:
        >>> ConvDecoder(64, 32, width=32)(torch.zeros(2, 64)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_dim: int, size: int, width: int = 256, out_channels: int = 3):
        super().__init__()
        steps = (size // 4).bit_length() - 1
        if size < 8 or size != 4 * 2**steps:
            raise ValueError(f"The inpainting decoder needs a crop_size of 4 x a power of 2 (8, 16, 32, 64, 128); "
                             f"got {size}. Set views.crop_size.")
        if width < 1:  # was a torch error on a weight of size [0, ...] in the first step
            raise ValueError(f"The inpainting decoder's decoder_width must be >= 1; got {width}.")
        self.width = width
        self.fc = nn.Linear(in_dim, width * 16)
        layers, c = [], width
        for _ in range(steps):
            layers += [nn.ConvTranspose2d(c, max(16, c // 2), 4, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(max(16, c // 2)), nn.ReLU(inplace=True)]
            c = max(16, c // 2)
        layers += [nn.Conv2d(c, out_channels, 3, padding=1)]
        self.up = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(F.relu(self.fc(x)).view(len(x), self.width, 4, 4))  # (B, out, size, size)


class ColorizationHead(nn.Module):
    """Backbone feature map -> per-pixel ab-bin logits at ``size`` x ``size``.

    Zhang et al. 2016 (https://arxiv.org/abs/1603.08511, Fig. 2) predict the colour distribution at 1/4 of the
    input resolution with convolutions on the encoder's maps; here a 3x3 conv on the backbone's last map, a
    bilinear upsampling to the output size, a second 3x3 conv and a 1x1 conv to the bins.

    Args:
        in_dim: Channels of the backbone's feature map.
        num_bins: Q, the number of ab bins.
        width: Channels of the two hidden convolutions.

    Example:
        >>> ColorizationHead(32, 261, width=16)(torch.zeros(2, 32, 4, 4), 8).shape
        torch.Size([2, 261, 8, 8])
    """

    def __init__(self, in_dim: int, num_bins: int, width: int = 256):
        super().__init__()
        if width < 1:
            raise ValueError(f"The colorization head's head_width must be >= 1; got {width}.")
        self.inner = nn.Sequential(nn.Conv2d(in_dim, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True))
        self.outer = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                   nn.ReLU(inplace=True), nn.Conv2d(width, num_bins, 1))

    def forward(self, x: torch.Tensor, size: int) -> torch.Tensor:
        x = F.interpolate(self.inner(x), size=(size, size), mode="bilinear", align_corners=False)  # (B, W, size, size)
        return self.outer(x)  # (B, Q, size, size)
