"""Classification losses of pretext tasks whose labels come from the view policy (rotation, jigsaw)."""

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
