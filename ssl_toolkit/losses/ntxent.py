"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR.

Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations",
https://arxiv.org/abs/2002.05709 (Eq. 1).
"""

import torch
import torch.nn.functional as F
from torch import nn

from ssl_toolkit import distributed


def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Collapse diagnostic: the per-dimension std over the batch of the L2-normalised embeddings, times sqrt(D).

    About 1 for embeddings spread over the sphere, 0 when every image maps to the same point (SimSiam, Chen &
    He 2021, https://arxiv.org/abs/2011.10566, Sec. 4.1 uses the unscaled std, 1/sqrt(D) when healthy).

    Example:
        >>> round(embedding_std(torch.ones(8, 16)).item(), 6), bool(embedding_std(torch.randn(4096, 16)) > 0.9)
        (0.0, True)
    """
    with torch.no_grad():
        z = F.normalize(z.detach().float(), dim=1)
        return z.std(0, correction=0).mean() * z.shape[1] ** 0.5


def similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` in fp32, also inside an autocast region.

    Autocast runs every matmul in bf16 / fp16 whatever the dtype of its inputs, so ``a.float() @ b.float().T``
    alone still rounds each similarity to bf16's 8 significant bits (steps of 0.004 near cosine 1; 0.25 for CLIP
    logits near 50). For the small (batch x batch or batch x queue) products of the contrastive losses the fp32
    matmul costs well under 1% of a training step.

    Args:
        a: ``(Na, D)``.
        b: ``(Nb, D)``.

    Returns:
        ``(Na, Nb)`` in fp32 (fp64 for fp64 inputs).

    Example:
        >>> a = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
        >>> with torch.autocast("cpu", dtype=torch.bfloat16):
        ...     s = similarities(a, a)
        >>> s.dtype, round(s[0, 1].item(), 6)
        (torch.float32, 0.6)
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)  # fp64 stays fp64
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype).T


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather: bool = True) -> dict[str, torch.Tensor]:
    """NT-Xent over the 2N views of a batch, negatives from every rank.

    Each local view is the anchor of one row; its positive is the other view of the same
    image and its negatives are the other ``2N - 2`` views of the global batch
    (``N = world_size * B``). The loss is the mean over the ``2B`` local rows.

    Args:
        z1: Projections of the first views, one row per image, not yet normalised.
        z2: Projections of the second views, rows aligned with ``z1``.
        temperature: Softmax temperature tau (0.5 in the paper for CIFAR-10, 0.1-0.2 for
            large batches on ImageNet).
        gather: Gather negatives from all ranks (no effect in a single process).

    Returns:
        ``ntxent_loss`` plus diagnostics without gradient: ``pos_sim`` (mean cosine of
        positive pairs), ``neg_sim`` (mean cosine to negatives) and ``z_std`` (:func:`embedding_std`).

    Example:
        >>> z = torch.eye(4)  # identical pairs, orthogonal negatives
        >>> out = nt_xent(z, z, temperature=1.0)
        >>> import math  # positive e^(1/T) against 2N-2 = 6 negatives of e^0
        >>> round(out["ntxent_loss"].item(), 6) == round(-math.log(math.e / (math.e + 6)), 6)
        True
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"NT-Xent needs two (B, D) tensors of one shape; got {tuple(z1.shape)} and {tuple(z2.shape)}.")
    if temperature <= 0:
        raise ValueError(f"NT-Xent temperature must be > 0; got {temperature}. SimCLR uses 0.5 on CIFAR-10.")
    b = z1.shape[0]
    z_local = torch.cat([z1, z2])  # (2B, D)
    if z_local.dtype in (torch.float16, torch.bfloat16):
        z_local = z_local.float()  # under autocast too: normalised, compared and softmaxed in fp32
    z_local = F.normalize(z_local, dim=1)
    if gather and distributed.is_distributed():
        z1_all = distributed.gather_with_grad(z_local[:b])  # (N, D)
        z2_all = distributed.gather_with_grad(z_local[b:])  # (N, D)
        offset = distributed.rank() * b
    else:
        z1_all, z2_all, offset = z_local[:b], z_local[b:], 0
    n = z1_all.shape[0]
    z_all = torch.cat([z1_all, z2_all])  # (2N, D)
    sim = similarities(z_local, z_all)  # (2B, 2N) cosine similarities
    local = torch.arange(b, device=z1.device) + offset  # global index of each local image
    self_idx = torch.cat([local, local + n])  # (2B,) column of each row's own view
    pos_idx = torch.cat([local + n, local])  # (2B,) column of each row's positive
    rows = torch.arange(2 * b, device=z1.device)
    logits = sim / temperature
    logits[rows, self_idx] = float("-inf")  # a view is never its own negative
    loss = F.cross_entropy(logits, pos_idx)
    with torch.no_grad():
        pos = sim[rows, pos_idx]
        neg_sum = sim.sum(1) - pos - sim[rows, self_idx]
        out_pos, out_neg = pos.mean(), (neg_sum / (2 * n - 2)).mean()
    return {"ntxent_loss": loss, "pos_sim": out_pos, "neg_sim": out_neg, "z_std": embedding_std(z_local)}


class NTXentLoss(nn.Module):
    """Module form of :func:`nt_xent` (SimCLR, https://arxiv.org/abs/2002.05709).

    Args:
        temperature: Softmax temperature; 0.5 for CIFAR-10 at batch 512 (paper, App. B.9).
        gather: Use negatives from all ranks; keep True so DDP matches one large batch.
    """

    def __init__(self, temperature: float = 0.5, gather: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"NT-Xent temperature must be > 0; got {temperature}. SimCLR uses 0.5 on CIFAR-10.")
        self.temperature = temperature
        self.gather = gather

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> dict[str, torch.Tensor]:
        return nt_xent(z1, z2, self.temperature, self.gather)
