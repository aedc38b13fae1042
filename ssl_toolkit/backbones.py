"""Backbones: ``build_backbone(name, ...) -> (module, feature_dim)``, the only place stems are edited.

ResNets come from torchvision (He et al. 2016, https://arxiv.org/abs/1512.03385); the CIFAR
stem (3x3 stride-1 first convolution, no max-pool) follows SimCLR's CIFAR-10 setting
(Chen et al. 2020, https://arxiv.org/abs/2002.05709, App. B.9). Vision Transformers
(Dosovitskiy et al. 2020, https://arxiv.org/abs/2010.11929) are torchvision's
``VisionTransformer`` in the Tiny/Small sizes of DeiT (https://arxiv.org/abs/2012.12877), with
position embeddings interpolated for other input sizes, as DINO does for its local crops.
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

RESNETS = ("resnet18", "resnet34", "resnet50")
VITS = {"vit_tiny": (192, 3), "vit_small": (384, 6)}  # (width, heads); 12 layers, MLP ratio 4 (DeiT)
NAMES = RESNETS + tuple(VITS) + ("tiny_cnn",)


@dataclass(frozen=True)
class BackboneConfig:
    """Which encoder to train.

    Args:
        name: One of ``resnet18``, ``resnet34``, ``resnet50`` (torchvision, random init),
            ``vit_tiny``, ``vit_small`` or ``tiny_cnn`` (4 conv layers, for tests and the CPU quickstart).
        cifar_stem: 3x3 stride-1 first conv and no max-pool; use it for 32-64 px images,
            where the ImageNet stem throws away 3/4 of the resolution. ResNets only.
        width: Channels of the first ``tiny_cnn`` stage (doubled at each of its 4 stages).
        patch_size: ViT patch side: 4 for 32 px images, 16 for 224 px.
        image_size: ViT input side its position embeddings are made for (other sizes are interpolated).
        vit_layers: ViT depth (12 in ViT-Tiny/Small; fewer for quick tests).
        norm: ``batch`` or ``layer`` normalisation in ResNets and ``tiny_cnn`` (``layer`` is GroupNorm with
            one group; CPC v2 needs it because batch statistics leak between patches of one image).
    """

    name: str = "resnet18"
    cifar_stem: bool = False
    width: int = 32
    patch_size: int = 4
    image_size: int = 32
    vit_layers: int = 12
    norm: str = "batch"


def _norm_layer(norm: str):
    if norm == "batch":
        return nn.BatchNorm2d
    if norm == "layer":
        return lambda channels: nn.GroupNorm(1, channels)
    raise ValueError(f"Unknown backbone.norm {norm!r}; use 'batch' or 'layer'.")


class SplitBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics come from ``num_splits`` sub-batches, as if each were on its own
    GPU; sub-batch ``j`` holds images ``j, j + s, j + 2s, ...``. Running statistics are the mean of the
    sub-batches' updates, and evaluation is plain ``BatchNorm2d`` (same parameters, buffers and state-dict keys).

    MoCo's shuffle-BN on one GPU (the MoCo CIFAR-10 demo's ``SplitBatchNorm``, lightly's ``num_splits``):
    with the key batch shuffled, a query and its key are normalised with statistics of different images.

    Example:
        >>> bn = SplitBatchNorm2d(4, num_splits=2)
        >>> x = torch.randn(6, 4, 3, 3)
        >>> torch.allclose(bn(x)[0::2], nn.BatchNorm2d(4)(x[0::2]), atol=1e-6)
        True
    """

    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if num_splits < 1:
            raise ValueError(f"num_splits must be >= 1; got {num_splits}.")
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        n, c, h, w = x.shape
        if n % s:
            raise ValueError(f"A batch of {n} does not split into {s} equal batch-norm sub-batches; make the batch "
                             f"(data.batch_size) a multiple of bn_splits={s}.")
        track = self.track_running_stats
        mean, var = (self.running_mean.repeat(s), self.running_var.repeat(s)) if track else (None, None)
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        y = F.batch_norm(x.reshape(n // s, s * c, h, w), mean, var, weight, bias, True, self.momentum, self.eps)
        if track:
            self.running_mean.copy_(mean.view(s, c).mean(0))
            self.running_var.copy_(var.view(s, c).mean(0))
            self.num_batches_tracked.add_(1)
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return y.reshape(n, c, h, w).contiguous(memory_format=fmt)


def split_batch_norm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every ``BatchNorm2d`` in ``module`` by a :class:`SplitBatchNorm2d` holding the same parameters and
    buffers (in place; returns ``module``). ``num_splits=1`` leaves it as it is."""
    if num_splits == 1:
        return module
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            if child.momentum is None:
                raise ValueError(f"{name}: split batch norm needs a BatchNorm2d with a momentum (got None).")
            split = SplitBatchNorm2d(child.num_features, num_splits, eps=child.eps, momentum=child.momentum,
                                     affine=child.affine, track_running_stats=child.track_running_stats)
            if child.affine:  # the same tensors (as torch's convert_sync_batchnorm does): device and dtype kept
                split.weight, split.bias = child.weight, child.bias
            if child.track_running_stats:
                split.running_mean, split.running_var = child.running_mean, child.running_var
                split.num_batches_tracked = child.num_batches_tracked
            setattr(module, name, split.train(child.training))
        else:
            split_batch_norm(child, num_splits)
    return module


class ViT(nn.Module):
    """torchvision's ``VisionTransformer`` returning the class token, for any input size divisible by the patch.

    Example:
        >>> vit = ViT(image_size=32, patch_size=4, num_layers=1, num_heads=3, hidden_dim=192)
        >>> vit(torch.zeros(2, 3, 32, 32)).shape, vit(torch.zeros(2, 3, 16, 16)).shape
        (torch.Size([2, 192]), torch.Size([2, 192]))
    """

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int):
        super().__init__()
        if patch_size < 1 or num_layers < 1:  # 0: "integer modulo by zero", and a ViT of no layers
            raise ValueError(f"A ViT needs backbone.patch_size >= 1 and backbone.vit_layers >= 1; got {patch_size}, "
                             f"{num_layers}.")
        if image_size % patch_size:
            raise ValueError(f"ViT image_size {image_size} is not a multiple of patch_size {patch_size}.")
        import torchvision

        self.vit = torchvision.models.VisionTransformer(image_size, patch_size, num_layers, num_heads, hidden_dim,
                                                        mlp_dim=4 * hidden_dim)
        self.vit.heads = nn.Identity()
        self.patch_size = patch_size

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """``(1, 1 + gh*gw, D)`` embeddings, the patch part bicubically resized from the trained grid."""
        pos = self.vit.encoder.pos_embedding  # (1, 1 + G*G, D)
        cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
        g = self.vit.image_size // self.patch_size  # ints, not the tensor's shape: jit.trace makes that a tensor
        if (grid_h, grid_w) == (g, g):
            return pos
        grid = patch_pos.reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, D, G, G)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, 1 + gh*gw, D)`` output tokens: the class token, then the patch tokens in row-major order."""
        n, _, h, w = x.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT input {h}x{w} is not divisible by patch_size {self.patch_size}; "
                             "choose crop sizes that are multiples of it.")
        tokens = self.vit.conv_proj(x).flatten(2).transpose(1, 2)  # (N, gh*gw, D)
        tokens = torch.cat([self.vit.class_token.expand(n, -1, -1), tokens], dim=1)  # (N, 1 + gh*gw, D)
        enc = self.vit.encoder
        tokens = tokens + self.position_embedding(h // self.patch_size, w // self.patch_size)
        return enc.ln(enc.layers(enc.dropout(tokens)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tokens(x)[:, 0]  # (N, D) class token


def build_backbone(name: str = "resnet18", cifar_stem: bool = False, width: int = 32, patch_size: int = 4,
                   image_size: int = 32, vit_layers: int = 12, norm: str = "batch") -> tuple[nn.Module, int]:
    """Build an encoder that maps ``(B, 3, H, W)`` images to ``(B, feature_dim)`` features.

    Example:
        >>> net, dim = build_backbone("resnet18", cifar_stem=True)
        >>> dim, net(torch.zeros(2, 3, 32, 32)).shape
        (512, torch.Size([2, 512]))
    """
    if name in RESNETS:
        import torchvision  # here: tiny_cnn checkpoints embed and search without it (1.5 s of a command's start)

        net = getattr(torchvision.models, name)(weights=None, norm_layer=_norm_layer(norm))
        dim = net.fc.in_features
        net.fc = nn.Identity()
        if cifar_stem:
            net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        return net, dim
    if name in VITS:
        dim, heads = VITS[name]
        return ViT(image_size, patch_size, vit_layers, heads, dim), dim
    if name == "tiny_cnn":
        if width < 1:
            raise ValueError(f"tiny_cnn width must be >= 1; got {width}.")
        layers, c_in = [], 3
        for i in range(4):
            c_out = width * 2**i
            layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       _norm_layer(norm)(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        return nn.Sequential(*layers), c_in
    raise ValueError(f"Unknown backbone {name!r}. Set backbone.name to one of {', '.join(NAMES)}.")


def feature_map(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ``(B, D, h, w)`` features of a :func:`build_backbone` network before its global pooling.

    Dense pretext tasks (colorization) predict from it; ``net(x)`` is its spatial mean (the class token for ViTs).

    Example:
        >>> net, dim = build_backbone("tiny_cnn", width=4)
        >>> feature_map(net, torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 32, 4, 4])
    """
    tv = sys.modules.get("torchvision")  # a ResNet exists only once torchvision is imported
    if tv is not None and isinstance(net, tv.models.ResNet):
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))
    if isinstance(net, ViT):
        patches = net.tokens(x)[:, 1:]  # (B, gh*gw, D)
        return patches.transpose(1, 2).unflatten(2, (x.shape[-2] // net.patch_size, x.shape[-1] // net.patch_size))
    if isinstance(net, nn.Sequential) and isinstance(net[-2], nn.AdaptiveAvgPool2d):  # tiny_cnn
        return net[:-2](x)
    raise ValueError(f"No feature map for a {type(net).__name__}; dense tasks need a backbone from build_backbone "
                     f"({', '.join(NAMES)}).")


class Encoder(nn.Module):
    """A backbone with its input normalisation: uint8 images in, features out.

    Evaluators and exported models use this so they never need to know a method's views.

    Args:
        backbone: Module mapping normalised float images to ``(B, D)`` features.
        mean: Per-channel mean in [0, 1] used at training time.
        std: Per-channel std in [0, 1] used at training time.
        input_size: Images of another size are resized (bilinear) to this before the backbone;
            ``None`` keeps them as they are.
        patch: With a patch size, the image is cut into a grid of ``patch`` px patches ``stride`` apart, each
            is encoded and the features are averaged (the representation of patch-based methods like CPC).
        stride: Step between patches.
        lightness: The backbone was trained on lightness (colorization): images go to CIE Lab and the scaled L
            channel replaces the normalised RGB.
        tiles: ``(grid, tile, normalize)`` of a jigsaw tile encoder: the image (at ``input_size``) is cut into
            the centre tile of each of ``grid x grid`` cells, optionally normalised per tile, and the tile
            features are concatenated in position order (``grid^2 x D`` features: the solved puzzle).
    """

    def __init__(self, backbone: nn.Module, mean: tuple[float, float, float], std: tuple[float, float, float],
                 input_size: int | None = None, patch: int | None = None, stride: int | None = None,
                 lightness: bool = False, tiles: tuple[int, int, bool] | None = None):
        super().__init__()
        self.backbone = backbone
        self.input_size, self.patch, self.stride, self.lightness = input_size, patch, stride, lightness
        self.tiles = tiles
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        """uint8 (or [0, 1] float) images -> the ``(B, 3, s, s)`` input of the backbone, before any tiling.

        Anything else is refused with the fix: a float image in 0-255, or one already normalised, had given
        features far from the right ones, and channels-last images torch's broadcasting error. ``check_range``
        False skips the range check of float images, the one check that reads the values (a device sync), for
        callers whose images are in [0, 1] by construction."""
        shape = tuple(images.shape)
        if images.ndim != 4 or shape[1] not in (1, 3):
            hint = (" (channels last: pass images.permute(0, 3, 1, 2))" if images.ndim == 4 and shape[3] in (1, 3)
                    else " (one image: pass images[None])" if images.ndim == 3 and shape[0] in (1, 3) else "")
            raise ValueError(f"The encoder takes a batch of images (B, 3, H, W), or grey (B, 1, H, W); got shape "
                             f"{shape}{hint}.")
        if images.dtype == torch.uint8:
            x = images.float() / 255.0  # (B, C, H, W) in [0, 1]
        elif not images.is_floating_point():
            raise ValueError(f"The encoder takes uint8 images (0-255) or float ones in [0, 1]; got {images.dtype}. "
                             "Pass images.to(torch.uint8) for whole numbers in 0-255.")
        else:
            x = images.float()
            low, high = (float(v) for v in x.aminmax()) if check_range and x.numel() else (0.0, 1.0)
            if low < -1e-3 or high > 1 + 1e-3:
                raise ValueError(f"Float images must be RGB in [0, 1]; these range from {low:.3g} to {high:.3g}. "
                                 "Divide 0-255 values by 255 (or pass uint8), and do not normalise them: the encoder "
                                 "applies its training normalisation itself.")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)  # grey as RGB
        if self.input_size is not None and x.shape[-2:] != (self.input_size, self.input_size):
            x = nn.functional.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                                          antialias=True, align_corners=False)
        if self.lightness:
            from ssl_toolkit.views.colorization import lightness_input

            return lightness_input(x)
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor, check_range: bool = True) -> torch.Tensor:
        x = self.prepare(images, check_range)
        if self.tiles is not None:
            from ssl_toolkit.views.pretext import centre_tiles

            tiles = centre_tiles(x, *self.tiles)  # (B, n, 3, t, t) in position order
            f = self.backbone(tiles.flatten(0, 1))  # (B * n, D)
            return f.reshape(-1, tiles.shape[1] * f.shape[1])  # (B, n * D); -1 keeps traced exports batch-agnostic
        if self.patch is None:
            return self.backbone(x)  # (B, D)
        from ssl_toolkit.views.patches import patch_grid

        grid = patch_grid(x, self.patch, self.stride)  # (B, G, G, 3, p, p)
        g = grid.shape[1]
        f = self.backbone(grid.reshape(-1, *grid.shape[3:]))  # (B * G * G, D)
        return f.reshape(-1, g * g, f.shape[1]).mean(1)  # (B, D)

    @classmethod
    def from_hparams(cls, backbone: nn.Module, hparams: dict) -> "Encoder":
        """The encoder a method's saved hyper-parameters describe (normalisation, input size, patches, tiles)."""
        v = hparams["views"]
        if "patch" in hparams:  # patch-based methods train on patches of the whole image
            return cls(backbone, tuple(v["mean"]), tuple(v["std"]), None, hparams["patch"], hparams["stride"])
        tiles = None
        if hparams.get("input") == "tiles":  # jigsaw: the solved puzzle of centre tiles
            tiles = (hparams["grid"], hparams["tile"], hparams["normalize_tiles"])
        return cls(backbone, tuple(v["mean"]), tuple(v["std"]), v["crop_size"],
                   lightness=hparams.get("input") == "lightness", tiles=tiles)


@dataclass(frozen=True)
class TextConfig:
    """The text tower of CLIP-style models (Radford et al. 2021, https://arxiv.org/abs/2103.00020, Sec. 2.4).

    Args:
        vocab_size: Token embeddings; at least the tokenizer's vocabulary (CLIP's BPE: 49408).
        context_length: Positions, at least the data's ``context_length`` (CLIP: 77).
        width: Model width (CLIP ViT-B/32: 512).
        layers: Transformer blocks (CLIP: 12; 2-4 is enough for Flickr8k-sized data).
        heads: Attention heads (CLIP: 8, width / 64).
    """

    vocab_size: int = 4096
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8

    def __post_init__(self):
        if min(self.vocab_size, self.context_length, self.width, self.layers, self.heads) < 1:
            raise ValueError(f"text needs positive vocab_size, context_length, width, layers and heads; got {self}.")
        if self.width % self.heads:
            raise ValueError(f"text.width {self.width} must be a multiple of text.heads {self.heads}.")


class TextTransformer(nn.Module):
    """CLIP's text encoder: token + position embeddings, causal pre-norm Transformer, the end token's feature.

    Token rows are right-padded with -1 (see :mod:`ssl_toolkit.data.tokenizer`); the feature of each row
    is the final layer-normed activation at its last real token (the end token). The causal mask makes
    it independent of the padding. Built on ``torch.nn.TransformerEncoder``.

    Example:
        >>> net = TextTransformer(TextConfig(vocab_size=50, context_length=8, width=16, layers=1, heads=2))
        >>> tokens = torch.tensor([[1, 7, 2, -1, -1, -1, -1, -1], [1, 9, 9, 2, -1, -1, -1, -1]])
        >>> net(tokens).shape
        torch.Size([2, 16])
    """

    def __init__(self, config: TextConfig):
        super().__init__()
        c = config
        self.config = c
        self.token_embedding = nn.Embedding(c.vocab_size, c.width)
        self.positional_embedding = nn.Parameter(torch.randn(c.context_length, c.width) * 0.01)
        layer = nn.TransformerEncoderLayer(c.width, c.heads, 4 * c.width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.ln_final = nn.LayerNorm(c.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        mask = torch.full((c.context_length, c.context_length), float("-inf")).triu(1)  # (L, L) causal
        self.register_buffer("causal_mask", mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, length = tokens.shape
        c = self.config
        if length > c.context_length:
            raise ValueError(f"Captions have {length} tokens but text.context_length is {c.context_length}; set "
                             "model text.context_length to the data's context_length.")
        x = self.token_embedding(tokens.clamp_min(0)) + self.positional_embedding[:length]  # (B, L, W)
        x = self.transformer(x, mask=self.causal_mask[:length, :length], is_causal=True)
        x = self.ln_final(x)
        last = (tokens >= 0).sum(1).clamp_min(1) - 1  # (B,) position of the end token
        return x[torch.arange(b, device=x.device), last]  # (B, W)
