"""CPC's InfoNCE over a patch grid: predictions of rows below against every other patch.

Oord et al. 2018, "Representation Learning with Contrastive Predictive Coding",
https://arxiv.org/abs/1807.03748 (Eq. 4); Hénaff et al. 2019, https://arxiv.org/abs/1905.09272.
"""

import torch
import torch.nn.functional as F


def cpc_info_nce(predictions: list[torch.Tensor], z: torch.Tensor) -> dict[str, torch.Tensor]:
    """InfoNCE of each prediction against the true patch embedding k rows below, negatives all other patches.

    Args:
        predictions: For step k = 1..K, ``(B, D, G - k, G)``: the prediction made from the context
            at rows ``0 .. G-k-1`` for the patch k rows below.
        z: ``(B, D, G, G)`` patch embeddings (the targets).

    Returns:
        ``cpc_loss`` (mean over steps) and ``cpc_acc`` (how often the true patch scores highest).

    Example:
        >>> z = torch.eye(4).view(1, 4, 2, 2)  # 4 orthogonal patches
        >>> out = cpc_info_nce([10 * z[:, :, 1:]], z)  # perfect predictions of the row below
        >>> round(out["cpc_loss"].item(), 4), out["cpc_acc"].item()  # -log(e^10 / (e^10 + 3))
        (0.0001, 1.0)
    """
    b, d, g, _ = z.shape
    bank = z.permute(0, 2, 3, 1).reshape(b * g * g, d)  # (B*G*G, D) every patch: positives and negatives
    flat = torch.arange(b * g * g, device=z.device).view(b, g, g)
    losses, accs = [], []
    for k, pred in enumerate(predictions, start=1):
        q = pred.permute(0, 2, 3, 1).reshape(-1, d)  # (B*(G-k)*G, D) queries
        # (Nq, B*G*G). Under autocast this product runs in bf16 / fp16 on purpose, unlike the small ones of the
        # other contrastive losses (losses.ntxent.similarities): at the recipe's batch 512 it is 53,760 x 25,088 x 512,
        # ~4 TFLOP a step with its backward, which fp32 would make the slowest part of the step.
        logits = q.float() @ bank.float().T
        target = flat[:, k:, :].reshape(-1)  # index of the true patch k rows below
        losses.append(F.cross_entropy(logits, target))
        accs.append((logits.argmax(1) == target).float().mean().detach())
    return {"cpc_loss": torch.stack(losses).mean(), "cpc_acc": torch.stack(accs).mean()}
