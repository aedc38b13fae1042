"""Pretext-task view policies: the labels come from the policy, made on the images' device.

Rotation: Gidaris et al. 2018, "Unsupervised Representation Learning by Predicting Image Rotations",
https://arxiv.org/abs/1803.07728. Jigsaw: Noroozi & Favaro 2016, "Unsupervised Learning of Visual
Representations by Solving Jigsaw Puzzles", https://arxiv.org/abs/1603.09246.
"""

import functools
import itertools

import torch
from torch import nn

from ssl_toolkit.views.base import Views
from ssl_toolkit.views.contrastive import ContrastiveViews, ViewConfig
from ssl_toolkit.views.patches import patch_grid


def rotate(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Rotate each square image ``x[i]`` by ``k[i]`` x 90 degrees counter-clockwise (``torch.rot90``), batched.

    Example:
        >>> x = torch.arange(4.0).view(1, 1, 2, 2)
        >>> rotate(x, torch.tensor([1]))[0, 0].tolist()
        [[1.0, 3.0], [0.0, 2.0]]
    """
    if x.shape[-1] != x.shape[-2]:
        raise ValueError(f"Rotation needs square images; got {tuple(x.shape[-2:])}. Set views.crop_size.")
    k = (k % 4).view(-1, 1, 1, 1)
    out = x
    for r in range(1, 4):  # every rotation of the batch, selected per image: no data-dependent shapes, no host sync
        out = torch.where(k == r, torch.rot90(x, r, dims=(-2, -1)), out)
    return out


class RotationViews(nn.Module):
    """Views rotated by 0/90/180/270 degrees; the target is the rotation index.

    Args:
        config: Crop/flip/colour augmentation applied before rotating (Gidaris et al. use none besides
            the dataset's usual crop and flip; keep colour jitter off).
        all_rotations: Every image in all four rotations in the same batch (the paper: "more effective"),
            targets ``0, 1, 2, 3`` per image; otherwise one rotation drawn per image.

    Example:
        >>> views = RotationViews(ViewConfig(crop_size=16))(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
        >>> tuple(views.crops[0].shape), views.targets.tolist()
        ((8, 3, 16, 16), [0, 0, 1, 1, 2, 2, 3, 3])
    """

    def __init__(self, config: ViewConfig = ViewConfig(), all_rotations: bool = True):
        super().__init__()
        self.all_rotations = all_rotations
        self.policy = ContrastiveViews(config, num_views=4 if all_rotations else 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        x = torch.cat(self.policy(images).crops)  # (V*B, 3, s, s), view-major, each with its own crop/flip
        b = images.shape[0]
        if self.all_rotations:
            k = torch.arange(4, device=x.device).repeat_interleave(b)  # (4B,) view v rotated by v x 90 degrees
            x = torch.cat([torch.rot90(v, r, dims=(-2, -1)) for r, v in enumerate(x.chunk(4))])
            return Views(crops=[x], targets=k)
        k = torch.randint(0, 4, (b,), device=x.device)  # (B,) per-image rotation
        return Views(crops=[rotate(x, k)], targets=k)


def hamming_permutations(num: int, n: int = 9, min_distance: int | None = None, seed: int = 0) -> torch.Tensor:
    """``num`` permutations of ``n`` tiles, chosen greedily to maximise their minimum pairwise Hamming distance.

    Noroozi & Favaro's Algorithm 1 starts from a random permutation and repeatedly adds the permutation
    farthest from the chosen set; the paper's version ranks candidates by their summed distance, this one by
    their minimum distance (farthest-point selection), which is what guarantees a minimum distance between
    any two classes. The seed fixes the first permutation, so the set is the same on every run and rank.

    Args:
        num: Size P of the set (100 in the paper's best ImageNet model; 1000 maximises transfer there).
        n: Tiles per puzzle (9 for a 3x3 grid).
        min_distance: Stop with an error if the set cannot keep every pair at least this far apart.
        seed: Seed of the first permutation.

    Example:
        >>> perms = hamming_permutations(10, n=4)
        >>> len(perms), len({tuple(p) for p in perms.tolist()})
        (10, 10)
    """
    return _hamming_permutations(num, n, min_distance, seed).clone()


@functools.lru_cache(maxsize=8)
def _hamming_permutations(num: int, n: int, min_distance: int | None, seed: int) -> torch.Tensor:
    """The selection of :func:`hamming_permutations`, cached: P = 1000 of 9! candidates takes seconds."""
    all_perms = torch.tensor(list(itertools.permutations(range(n))), dtype=torch.int8)  # (n!, n)
    if not 2 <= num <= len(all_perms):  # one is a task with one answer: nothing to learn
        raise ValueError(f"jigsaw num_permutations must be in [2, {len(all_perms)}] for {n} tiles; got {num}. The "
                         "paper uses 1000, 100 on CIFAR.")
    first = int(torch.randint(len(all_perms), (1,), generator=torch.Generator().manual_seed(seed)))
    chosen = [first]
    dist = (all_perms != all_perms[first]).sum(1)  # (n!,) distance of every candidate to the chosen set
    for _ in range(num - 1):
        nxt = int(dist.argmax())
        if min_distance is not None and int(dist[nxt]) < min_distance:
            break
        chosen.append(nxt)
        dist = torch.minimum(dist, (all_perms != all_perms[nxt]).sum(1))
    perms = all_perms[chosen].long()
    if min_distance is not None and (len(perms) < num or min_pairwise_hamming(perms) < min_distance):
        raise ValueError(f"Only {len(perms)} permutations of {n} tiles keep a Hamming distance >= {min_distance} "
                         f"from each other with this greedy selection; lower num_permutations to {len(perms)} or "
                         f"min_distance.")
    return perms


def min_pairwise_hamming(perms: torch.Tensor) -> int:
    """Smallest Hamming distance between two rows of ``perms``."""
    d = (perms[:, None, :] != perms[None, :, :]).sum(-1)  # (P, P)
    d.fill_diagonal_(perms.shape[1] + 1)
    return int(d.min())


def cut_tiles(x: torch.Tensor, grid: int, tile: int, offsets: torch.Tensor) -> torch.Tensor:
    """``(B, grid*grid, C, tile, tile)`` tiles: cell ``(r, c)`` of side ``S / grid`` cut at its ``offsets`` (row-major).

    Args:
        x: ``(B, C, S, S)`` images with ``S`` divisible by ``grid``.
        grid: Cells per side.
        tile: Tile side, at most the cell side; the difference is the random gap between tiles.
        offsets: ``(B, grid*grid, 2)`` integer (dy, dx) of each tile inside its cell, in ``[0, cell - tile]``.
    """
    b, c, s, _ = x.shape
    cell = s // grid
    n = grid * grid
    rows = torch.arange(n, device=x.device) // grid * cell  # (n,) top of each cell
    cols = torch.arange(n, device=x.device) % grid * cell
    ar = torch.arange(tile, device=x.device)
    ys = (rows[None, :] + offsets[..., 0])[..., None] + ar  # (B, n, tile)
    xs = (cols[None, :] + offsets[..., 1])[..., None] + ar  # (B, n, tile)
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    out = x.permute(0, 2, 3, 1)[bi, ys[..., :, None], xs[..., None, :]]  # (B, n, tile, tile, C)
    return out.permute(0, 1, 4, 2, 3)


def normalize_tiles(tiles: torch.Tensor) -> torch.Tensor:
    """Each ``(..., C, t, t)`` tile minus its own mean, over its own std, per channel (Noroozi & Favaro, Sec. 3.2)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True).clamp_min(1e-3)
    return (tiles - mean) / std


def centre_tiles(x: torch.Tensor, grid: int, tile: int, normalize: bool = True) -> torch.Tensor:
    """``(B, grid*grid, C, tile, tile)``: the tile at the centre of every cell, in position order (no shuffling).

    How a jigsaw-trained tile encoder sees a whole image at evaluation: the puzzle in its solved order.
    """
    cell = x.shape[-1] // grid
    off, span = (cell - tile) // 2, (grid - 1) * cell + tile
    tiles = patch_grid(x[..., off:off + span, off:off + span], tile, cell).flatten(1, 2)  # same slices for any batch
    return normalize_tiles(tiles) if normalize else tiles


class JigsawViews(nn.Module):
    """A 3x3 jigsaw puzzle per image: tiles cut with a random gap, shuffled by one of P fixed permutations.

    The crop (with flip and colour augmentation of ``config``) is cut into ``grid x grid`` cells; each tile is a
    ``tile`` px square at a random offset inside its cell (the gap stops edge continuity from solving the puzzle),
    and every tile is normalised by its own mean and std per channel (against chromatic aberration and
    brightness cues, Sec. 3.2). ``crops[0]`` holds the tiles in shuffled order, ``(B * n, 3, tile, tile)``;
    position ``j`` of puzzle ``i`` shows cell ``perms[targets[i], j]``.

    Args:
        config: Augmentation of the whole crop; ``crop_size`` must be a multiple of ``grid``.
        grid: Cells per side (3 in the paper).
        tile: Tile side (64 of 75 px cells at 225 px; 8 of 10 px at 30 px).
        num_permutations: P, the number of classes (100 in the paper).
        min_distance: Refuse a permutation set whose closest pair is nearer than this (None: no check).
        normalize_tiles: Per-tile normalisation (True in the paper).

    Example:
        >>> policy = JigsawViews(ViewConfig(crop_size=30), grid=3, tile=8, num_permutations=10)
        >>> views = policy(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
        >>> tuple(views.crops[0].shape), tuple(views.targets.shape)
        ((18, 3, 8, 8), (2,))
    """

    def __init__(self, config: ViewConfig = ViewConfig(crop_size=30), grid: int = 3, tile: int = 8,
                 num_permutations: int = 100, min_distance: int | None = None, normalize_tiles: bool = True):
        super().__init__()
        if grid < 2:  # 1 was "not a multiple of 1", 0 a ZeroDivisionError
            raise ValueError(f"A jigsaw grid needs at least 2x2 tiles; got grid {grid}. The paper uses 3.")
        if config.crop_size % grid:
            raise ValueError(f"A {grid}x{grid} jigsaw grid must divide the crop: views.crop_size {config.crop_size} is "
                             f"not a multiple of {grid}. Use crop_size {max(grid, config.crop_size // grid * grid)} "
                             f"or {(config.crop_size // grid + 1) * grid}.")
        cell = config.crop_size // grid
        if not 1 <= tile <= cell:
            raise ValueError(f"jigsaw tile {tile} must be between 1 and the cell side {cell} "
                             f"(crop_size {config.crop_size} / grid {grid}); the paper uses 64 of 75.")
        self.grid, self.tile, self.cell, self.normalize_tiles = grid, tile, cell, normalize_tiles
        self.policy = ContrastiveViews(config, num_views=1)
        self.register_buffer("perms", hamming_permutations(num_permutations, grid * grid, min_distance))  # (P, n)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        x = self.policy(images).crops[0]  # (B, 3, S, S) augmented, normalised crops
        b, n = x.shape[0], self.grid * self.grid
        offsets = torch.randint(0, self.cell - self.tile + 1, (b, n, 2), device=x.device)  # per-tile gap/jitter
        tiles = cut_tiles(x, self.grid, self.tile, offsets)  # (B, n, 3, t, t) in cell order
        target = torch.randint(0, len(self.perms), (b,), device=x.device)  # (B,) permutation index per image
        order = self.perms[target]  # (B, n): position j shows cell order[j]
        tiles = tiles[torch.arange(b, device=x.device)[:, None], order]  # (B, n, 3, t, t) shuffled
        if self.normalize_tiles:
            tiles = normalize_tiles(tiles)
        return Views(crops=[tiles.flatten(0, 1)], targets=target, grid=(b, self.grid))


MASKS = ("central", "random_block", "random_region")


def inpainting_masks(batch: int, size: int, kind: str, fraction: float = 0.5, device: torch.device | str = "cpu",
                     region_area: float = 0.25) -> torch.Tensor:
    """``(B, 1, size, size)`` float masks, 1 where the image is hidden (Pathak et al. 2016, Sec. 3.3).

    Args:
        batch: Number of masks.
        size: Side of the (square) crops.
        kind: ``central`` (a centred square), ``random_block`` (a square at a random position per image) or
            ``random_region`` (a random blob per image: smooth noise thresholded at its ``region_area`` quantile).
        fraction: Side of the block as a fraction of ``size`` (the paper: 64 of 128 = 0.5).
        device: Device of the masks.
        region_area: Hidden area fraction of ``random_region`` masks (the paper: up to 1/4).

    Example:
        >>> inpainting_masks(1, 4, "central")[0, 0].tolist()
        [[0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    """
    if kind not in MASKS:
        raise ValueError(f"Unknown inpainting mask {kind!r}; use one of {', '.join(MASKS)}.")
    if not 0 < fraction < 1 or not 0 < region_area < 1:
        raise ValueError(f"Inpainting needs 0 < fraction < 1 and 0 < region_area < 1; got {fraction}, {region_area}.")
    if kind == "random_region":
        noise = torch.rand(batch, 1, max(2, size // 8), max(2, size // 8), device=device)
        noise = nn.functional.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)  # smooth blobs
        cut = noise.flatten(1).quantile(1 - region_area, dim=1).view(batch, 1, 1, 1)  # per image
        return (noise > cut).float()
    side = max(1, round(fraction * size))
    if kind == "central":
        top = torch.full((batch,), (size - side) // 2, device=device)
        left = top
    else:
        top = torch.randint(0, size - side + 1, (batch,), device=device)
        left = torch.randint(0, size - side + 1, (batch,), device=device)
    ar = torch.arange(size, device=device)
    rows = (ar[None, :] >= top[:, None]) & (ar[None, :] < top[:, None] + side)  # (B, S)
    cols = (ar[None, :] >= left[:, None]) & (ar[None, :] < left[:, None] + side)
    return (rows[:, :, None] & cols[:, None, :]).float()[:, None]  # (B, 1, S, S)


class InpaintingViews(nn.Module):
    """Crops with a hidden region, for a context encoder (Pathak et al. 2016, https://arxiv.org/abs/1604.07379).

    ``crops[0]`` is the crop with the masked pixels set to 0 (the dataset mean after normalisation),
    ``targets`` the whole normalised crop and ``masks`` the ``(B, 1, s, s)`` mask, all made after cropping,
    so they are aligned pixel for pixel.

    Args:
        config: Crop/flip/colour augmentation of the crop.
        mask: ``central``, ``random_block`` or ``random_region``.
        fraction: Block side as a fraction of the crop.

    Example:
        >>> v = InpaintingViews(ViewConfig(crop_size=16))(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
        >>> tuple(v.crops[0].shape), tuple(v.masks.shape), v.masks[0].sum().item()
        ((2, 3, 16, 16), (2, 1, 16, 16), 64.0)
    """

    def __init__(self, config: ViewConfig = ViewConfig(), mask: str = "random_block", fraction: float = 0.5):
        super().__init__()
        inpainting_masks(1, config.crop_size, mask, fraction)  # validate now, with the fix in the message
        self.mask, self.fraction = mask, fraction
        self.policy = ContrastiveViews(config, num_views=1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> Views:
        target = self.policy(images).crops[0]  # (B, 3, s, s) normalised crops
        masks = inpainting_masks(len(target), target.shape[-1], self.mask, self.fraction, target.device)
        return Views(crops=[target * (1 - masks)], targets=target, masks=masks)
