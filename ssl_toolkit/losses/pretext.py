"""Classification losses of pretext tasks whose labels come from the view policy (rotation, jigsaw, colorization)."""

import torch
import torch.nn.functional as F


def pretext_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
    """Cross-entropy of ``(N, C)`` logits against the policy's ``(N,)`` labels, and the accuracy (no gradient).

    Example:
        >>> out = pretext_cross_entropy(torch.tensor([[2.0, 0.0], [0.0, 2.0]]), torch.tensor([0, 0]))
        >>> round(out["ce_loss"].item(), 4), out["acc"].item()
        (1.1269, 0.5)
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"Pretext loss needs (N, C) logits and (N,) labels; got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}.")
    loss = F.cross_entropy(logits.float(), targets)
    return {"ce_loss": loss, "acc": (logits.detach().argmax(1) == targets).float().mean()}


def rebalanced_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                             weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Colorization's per-pixel multinomial cross-entropy with class rebalancing (Zhang et al. 2016, Eq. 2).

    ``L = -mean_pixels v(Z) sum_q Z_q log softmax(logits)_q`` with soft targets ``Z`` and ``v(Z) = w[argmax_q Z]``.
    Also returns ``acc``: how often the most likely bin is the target's nearest bin (no gradient).

    Args:
        logits: ``(B, Q, h, w)`` bin logits.
        targets: ``(B, Q, h, w)`` soft-encoded targets (each pixel sums to 1).
        weights: ``(Q,)`` class weights (all ones for no rebalancing).

    Example:
        >>> z = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
        >>> out = rebalanced_cross_entropy(torch.zeros(1, 2, 1, 1), z, torch.tensor([2.0, 1.0]))
        >>> round(out["ce_loss"].item(), 4)
        1.3863
    """
    if logits.shape != targets.shape or logits.ndim != 4 or weights.shape != logits.shape[1:2]:
        raise ValueError(f"Colorization loss needs (B, Q, h, w) logits and targets and (Q,) weights; got "
                         f"{tuple(logits.shape)}, {tuple(targets.shape)} and {tuple(weights.shape)}.")
    nearest = targets.argmax(1)  # (B, h, w) the target's most likely bin
    ce = -(targets * F.log_softmax(logits.float(), dim=1)).sum(1)  # (B, h, w)
    return {"ce_loss": (weights[nearest] * ce).mean(),
            "acc": (logits.detach().argmax(1) == nearest).float().mean()}
