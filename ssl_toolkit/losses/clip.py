"""The symmetric image-text InfoNCE of CLIP.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision",
https://arxiv.org/abs/2103.00020 (Fig. 3): cross-entropy over the scaled cosine similarities of
the batch's image and text embeddings, once per row (image -> text) and once per column
(text -> image), averaged. Negatives are gathered from every rank with their gradient, so DDP
computes the loss of the global batch; each rank keeps only its own rows (open_clip's local loss).
"""

import torch
import torch.nn.functional as F

from ssl_toolkit import distributed
from ssl_toolkit.losses.ntxent import similarities


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor,
              gather: bool = True) -> dict[str, torch.Tensor]:
    """Symmetric InfoNCE of aligned ``(B, D)`` image and text embeddings (row i of each is one pair).

    Args:
        image_emb: Image embeddings, normalised here.
        text_emb: Text embeddings of the matching captions, normalised here.
        logit_scale: The multiplier of the cosine similarities (``exp`` of the learnable log-scale, at most 100).
        gather: Use the other ranks' pairs as negatives (no effect in a single process).

    Returns:
        ``clip_loss`` (mean of the image->text and text->image cross-entropies), and without gradient
        ``i2t_acc`` / ``t2i_acc`` (in-batch top-1 of the matching pair) and ``pos_sim`` / ``neg_sim``.

    Example:
        >>> e = torch.eye(3)  # matching pairs identical, the others orthogonal
        >>> out = clip_loss(e, e, torch.tensor(1.0))
        >>> import math  # each row: e^1 against 2 negatives of e^0
        >>> round(out["clip_loss"].item(), 6) == round(-math.log(math.e / (math.e + 2)), 6)
        True
    """
    if image_emb.shape != text_emb.shape or image_emb.ndim != 2:
        raise ValueError(f"CLIP loss needs (B, D) image and text embeddings of one shape; got {tuple(image_emb.shape)} "
                         f"and {tuple(text_emb.shape)}.")
    img = F.normalize(image_emb.float(), dim=1)  # (B, D), fp32 under autocast
    txt = F.normalize(text_emb.float(), dim=1)  # (B, D)
    b = img.shape[0]
    if gather and distributed.is_distributed():
        img_all, txt_all = distributed.gather_with_grad(img), distributed.gather_with_grad(txt)  # (N, D)
        offset = distributed.rank() * b
    else:
        img_all, txt_all, offset = img, txt, 0
    scale = logit_scale.float()
    sim = similarities(img, txt_all)  # (B, N) cosines of local images against every caption, fp32 under autocast
    logits_i2t = scale * sim
    logits_t2i = scale * similarities(txt, img_all)  # (B, N) local captions against every image
    target = torch.arange(b, device=img.device) + offset  # global column of each local pair
    loss = 0.5 * (F.cross_entropy(logits_i2t, target) + F.cross_entropy(logits_t2i, target))
    with torch.no_grad():
        pos = sim[torch.arange(b), target]
        n = sim.shape[1]
        neg = (sim.sum(1) - pos) / max(n - 1, 1)
        out = {"i2t_acc": (logits_i2t.argmax(1) == target).float().mean(),
               "t2i_acc": (logits_t2i.argmax(1) == target).float().mean(),
               "pos_sim": pos.mean(), "neg_sim": neg.mean()}
    return {"clip_loss": loss, **out}
