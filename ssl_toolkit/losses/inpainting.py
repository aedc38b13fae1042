"""Losses of the context encoder (Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting",
https://arxiv.org/abs/1604.07379, Sec. 3.2): masked L2 reconstruction and the adversarial term."""

import torch
import torch.nn.functional as F


def masked_l2(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden pixels only: ``||M * (x - F((1 - M) * x))||^2 / |M|``.

    Args:
        pred: ``(B, C, H, W)`` reconstruction.
        target: ``(B, C, H, W)`` original (normalised) crop.
        mask: ``(B, 1, H, W)`` with 1 on the hidden region.

    Example:
        >>> m = torch.zeros(1, 1, 2, 2); m[..., 0, 0] = 1
        >>> masked_l2(torch.ones(1, 3, 2, 2), torch.zeros(1, 3, 2, 2), m).item()  # outside the mask ignored
        1.0
    """
    if pred.shape != target.shape or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"masked_l2 needs pred and target of one shape and a mask of the same size; got "
                         f"{tuple(pred.shape)}, {tuple(target.shape)}, {tuple(mask.shape)}.")
    sq = (pred.float() - target.float()).pow(2) * mask  # (B, C, H, W), zero outside the mask
    return sq.sum() / (mask.sum() * pred.shape[1]).clamp_min(1.0)


def adversarial_losses(d_real: torch.Tensor, d_fake_detached: torch.Tensor,
                       d_fake_for_generator: torch.Tensor) -> dict[str, torch.Tensor]:
    """GAN terms of the joint loss: the discriminator's (real -> 1, fake -> 0) and the generator's (fake -> 1).

    ``d_fake_detached`` must come from a reconstruction without gradient (it trains only the discriminator);
    ``d_fake_for_generator`` from the discriminator with frozen parameters (it trains only the generator).
    """
    ones, zeros = torch.ones_like(d_real), torch.zeros_like(d_fake_detached)
    disc = F.binary_cross_entropy_with_logits(d_real.float(), ones) + \
        F.binary_cross_entropy_with_logits(d_fake_detached.float(), zeros)
    gen = F.binary_cross_entropy_with_logits(d_fake_for_generator.float(), torch.ones_like(d_fake_for_generator))
    return {"disc": disc, "gen": gen}
