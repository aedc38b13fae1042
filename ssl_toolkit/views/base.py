"""The one interface between view policies and methods."""

from dataclasses import dataclass

import torch


@dataclass
class Views:
    """What a view policy returns for one batch.

    Attributes:
        crops: One normalised float tensor ``(B, 3, h, w)`` per view.
        targets: Pretext labels made by the policy (rotation index, permutation index, ...).
        masks: Masked regions, where the task has them.
        tokens: Text tokens, where the task has them.
        grid: ``(batch, rows)`` of a square patch grid when ``crops`` holds patches (CPC).
    """

    crops: list[torch.Tensor]
    targets: torch.Tensor | None = None
    masks: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    grid: tuple[int, int] | None = None


def denormalize(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Undo normalisation for display: ``(B, 3, h, w)`` float in [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)
