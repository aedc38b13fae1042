"""DINO's self-distillation loss, centering, and collapse diagnostics.

Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294 (Algorithm 1, Sec. 3.1 and Sec. 5.3 on collapse).
"""

import torch

from ssl_toolkit import distributed


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * p.clamp_min(1e-12).log()).sum(-1)


def dino_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, center: torch.Tensor, num_student_views: int,
              num_teacher_views: int, student_temp: float, teacher_temp: float) -> dict[str, torch.Tensor]:
    """Cross-entropy from centred, sharpened teacher outputs to student outputs, over pairs of different views.

    Args:
        student_out: ``(V * B, K)`` student logits, view-major (global crops first).
        teacher_out: ``(G * B, K)`` teacher logits of the G global crops, view-major.
        center: ``(K,)`` running mean of teacher outputs (subtracted before the softmax).
        num_student_views: V.
        num_teacher_views: G; student view i and teacher view i are the same crop for i < G.
        student_temp: Student softmax temperature (0.1).
        teacher_temp: Teacher softmax temperature at this step (scheduled, 0.04 -> 0.07).

    Returns:
        ``dino_loss`` and, without gradient: ``teacher_entropy`` (mean per-image entropy of the teacher),
        ``teacher_mi`` (entropy of the batch-mean teacher distribution minus the mean entropy: the
        information the output carries about the image; near 0 means collapse to a constant, whether
        uniform or one-hot), and ``kl`` (teacher-to-student KL over the same pairs as the loss).
    """
    s_log = (student_out.float() / student_temp).log_softmax(-1).chunk(num_student_views)  # V x (B, K)
    t = ((teacher_out.float() - center) / teacher_temp).softmax(-1).detach()  # (G*B, K)
    t_views = t.chunk(num_teacher_views)
    total, kl, pairs = 0.0, 0.0, 0
    for iq, q in enumerate(t_views):
        for v, s in enumerate(s_log):
            if v == iq:  # a crop never predicts itself
                continue
            ce = -(q * s).sum(-1).mean()
            total = total + ce
            kl = kl + (ce.detach() - _entropy(q).mean())
            pairs += 1
    if pairs == 0:
        raise ValueError("DINO needs at least 2 views so a student view differs from a teacher view; "
                         "set num_local_crops >= 1 or use 2 global crops.")
    with torch.no_grad():
        mean_entropy = _entropy(t).mean()
        mi = _entropy(t.mean(0)) - mean_entropy
    return {"dino_loss": total / pairs, "teacher_entropy": mean_entropy, "teacher_mi": mi, "kl": kl / pairs}


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_out: torch.Tensor, momentum: float) -> torch.Tensor:
    """``c <- m c + (1 - m) mean(teacher_out)``, the batch mean taken over all ranks (DINO Eq. 4)."""
    batch_center = distributed.all_reduce_mean(teacher_out.float().mean(0))  # (K,)
    return center * momentum + batch_center * (1 - momentum)
