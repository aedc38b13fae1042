"""InfoNCE against a memory of negatives, as in MoCo.

He et al. 2020, https://arxiv.org/abs/1911.05722 (Eq. 1 and Algorithm 1); Oord et al. 2018,
https://arxiv.org/abs/1807.03748 for the InfoNCE objective.
"""

import torch
import torch.nn.functional as F

from ssl_toolkit.losses.ntxent import embedding_std, similarities


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Cross-entropy of the positive key against the negatives, the positive logit at index 0.

    Args:
        q: ``(B, D)`` queries, normalised here.
        k: ``(B, D)`` positive keys (no gradient expected), normalised here.
        negatives: ``(K, D)`` unit-norm negative keys (the queue).
        temperature: tau (0.2 in MoCo v2, 0.07 in MoCo v1).

    Returns:
        ``infonce_loss``, and ``pos_sim`` / ``neg_sim`` (mean cosine, no gradient) and ``z_std`` (collapse
        diagnostic of the queries, :func:`~ssl_toolkit.losses.ntxent.embedding_std`).

    Example:
        >>> q = torch.tensor([[1.0, 0.0]])
        >>> out = info_nce(q, q, torch.tensor([[0.0, 1.0]]), temperature=1.0)
        >>> round(out["infonce_loss"].item(), 4)  # -log(e^1 / (e^1 + e^0))
        0.3133
    """
    if temperature <= 0:
        raise ValueError(f"InfoNCE temperature must be > 0; got {temperature}. MoCo v2 uses 0.2.")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.float(), dim=1)
    pos = (q * k).sum(1, keepdim=True)  # (B, 1)
    neg = similarities(q, negatives)  # (B, K), fp32 under autocast too
    logits = torch.cat([pos, neg], dim=1) / temperature  # (B, 1+K), positive at index 0
    loss = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long, device=q.device))
    return {"infonce_loss": loss, "pos_sim": pos.detach().mean(), "neg_sim": neg.detach().mean(),
            "z_std": embedding_std(q)}
