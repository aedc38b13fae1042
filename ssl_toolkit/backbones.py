"""Backbones: ``build_backbone(name, ...) -> (module, feature_dim)``, the only place stems are edited.

ResNets come from torchvision (He et al. 2016, https://arxiv.org/abs/1512.03385); the CIFAR
stem (3x3 stride-1 first convolution, no max-pool) follows SimCLR's CIFAR-10 setting
(Chen et al. 2020, https://arxiv.org/abs/2002.05709, App. B.9).
"""

from dataclasses import dataclass

import torch
import torchvision
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50")
NAMES = RESNETS + ("tiny_cnn",)


@dataclass(frozen=True)
class BackboneConfig:
    """Which encoder to train.

    Args:
        name: One of ``resnet18``, ``resnet34``, ``resnet50`` (torchvision, random init) or
            ``tiny_cnn`` (4 conv layers, for tests and the CPU quickstart).
        cifar_stem: 3x3 stride-1 first conv and no max-pool; use it for 32-64 px images,
            where the ImageNet stem throws away 3/4 of the resolution. Ignored by ``tiny_cnn``.
        width: Channels of the first ``tiny_cnn`` stage (doubled at each of its 4 stages).
    """

    name: str = "resnet18"
    cifar_stem: bool = False
    width: int = 32


def build_backbone(name: str = "resnet18", cifar_stem: bool = False, width: int = 32) -> tuple[nn.Module, int]:
    """Build an encoder that maps ``(B, 3, H, W)`` images to ``(B, feature_dim)`` features.

    Example:
        >>> net, dim = build_backbone("resnet18", cifar_stem=True)
        >>> dim, net(torch.zeros(2, 3, 32, 32)).shape
        (512, torch.Size([2, 512]))
    """
    if name in RESNETS:
        net = getattr(torchvision.models, name)(weights=None)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net, dim
    if name == "tiny_cnn":
        if width < 1:
            raise ValueError(f"tiny_cnn width must be >= 1; got {width}.")
        layers, c_in = [], 3
        for i in range(4):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), c_in
    raise ValueError(f"Unknown backbone {name!r}. Set backbone.name to one of {', '.join(NAMES)}.")


class Encoder(nn.Module):
    """A backbone with its input normalisation: uint8 images in, features out.

    Evaluators and exported models use this so they never need to know a method's views.

    Args:
        backbone: Module mapping normalised float images to ``(B, D)`` features.
        mean: Per-channel mean in [0, 1] used at training time.
        std: Per-channel std in [0, 1] used at training time.
        input_size: Images of another size are resized (bilinear) to this before the backbone;
            ``None`` keeps them as they are.
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float],
                 input_size: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()  # (B, 3, H, W) in [0, 1]
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        return self.backbone((x - self.mean) / self.std)  # (B, D)
