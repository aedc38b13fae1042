"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving
Jigsaw Puzzles", https://arxiv.org/abs/1603.09246).

Nine tiles of an image are shuffled by one of P fixed permutations; a shared tile encoder (the
"context-free network": the toolkit backbone, one tile at a time) embeds each tile, and a classifier
over the concatenated embeddings names the permutation.
"""

import torch
from torch import nn

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.heads import mlp
from ssl_toolkit.losses import pretext_cross_entropy
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import JigsawViews, ViewConfig, Views

# A 30 px crop cut into 3x3 cells of 10 px; colour jitter and grayscale as in the paper's colour handling.
JIGSAW_VIEWS = ViewConfig(crop_size=30, scale=(0.6, 1.0), jitter_p=0.8, gray_p=0.3)


class Jigsaw(BaseSSLModule):
    """Jigsaw: shared tile encoder (backbone + per-tile layer), concatenation in position order, P-way classifier.

    Args:
        backbone: The tile encoder. Evaluators give it the solved puzzle of a whole image (resized to
            ``views.crop_size``): the centre tile of each cell, normalised per tile, features concatenated in
            position order, as the classifier sees them (``grid^2 x D`` features; the checkpoint records this).
        optim: Optimizer and schedule (paper: SGD lr 0.01, batch 256, 350k steps).
        views: Augmentation of the crop that is cut into tiles; ``crop_size`` a multiple of ``grid``.
        grid: Cells per side (3).
        tile: Tile side inside each cell (the rest is the random gap).
        num_permutations: P, the number of permutation classes (100 in the paper's best model).
        min_distance: Refuse a permutation set whose closest pair is nearer than this.
        normalize_tiles: Normalise each tile by its own mean and std (the paper's guard against colour cues).
        tile_dim: Width of each tile's embedding (fc6, 1024 in the paper).
        hidden_dim: Width of the layer over the concatenated tiles (fc7, 4096 in the paper).
        channels_last: NHWC memory layout for the convolutions.

    Example:
        >>> m = Jigsaw(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=12), tile=3, num_permutations=10)
        >>> sorted(m.step(m.view_policy(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))))
        ['acc', 'ce_loss']
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=0.05),
                 views: ViewConfig = JIGSAW_VIEWS, grid: int = 3, tile: int = 8, num_permutations: int = 100,
                 min_distance: int | None = None, normalize_tiles: bool = True, tile_dim: int = 256,
                 hidden_dim: int = 1024, channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        if tile_dim < 1:  # was "cannot reshape tensor of 0 elements" in the first step
            raise ValueError(f"jigsaw tile_dim must be >= 1; got {tile_dim}. The paper's fc6 has 512 per tile.")
        self.save_config(input="tiles", grid=grid, tile=tile, num_permutations=num_permutations, min_distance=min_distance,
                         normalize_tiles=normalize_tiles, tile_dim=tile_dim, hidden_dim=hidden_dim)
        self.view_policy = JigsawViews(views, grid, tile, num_permutations, min_distance, normalize_tiles)
        self.tile_head = nn.Sequential(nn.Linear(self.feature_dim, tile_dim), nn.ReLU(inplace=True))
        self.classifier = mlp(grid * grid * tile_dim, hidden_dim, num_permutations)
        self.num_tiles = grid * grid

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.attached_datamodule
        if stage == "fit" and getattr(dm, "batch_size", 2) < 2:  # was "Expected more than 1 value per channel"
            raise ValueError("Jigsaw needs data.batch_size >= 2: the batch norm of its permutation classifier trains "
                             "on a batch's puzzles, one per image; got 1.")

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        tiles = self.tile_head(self.backbone(self.prepare_input(views.crops[0])))  # (B*n, tile_dim)
        logits = self.classifier(tiles.view(-1, self.num_tiles * tiles.shape[1]))  # (B, P) tiles in position order
        return pretext_cross_entropy(logits, views.targets)
