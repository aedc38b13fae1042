"""Optimizers and schedules: LARS, parameter groups, and step-indexed schedule tensors.

LARS: You et al. 2017, "Large Batch Training of Convolutional Networks",
https://arxiv.org/abs/1708.03888, as used by SimCLR (https://arxiv.org/abs/2002.05709):
biases and normalisation parameters get neither weight decay nor the trust ratio.
The warmup + cosine schedule follows DINO's ``cosine_scheduler`` (https://arxiv.org/abs/2104.14294):
one value per global step, so it can be plotted and is exact on resume.
"""

import math

import torch
from torch import nn


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> torch.Tensor:
    """Linear warmup from ``warmup_start`` to ``base``, then cosine decay to ``final``.

    Example:
        >>> cosine_schedule(1.0, 0.0, total_steps=5, warmup_steps=1)
        tensor([0.0000, 1.0000, 0.8536, 0.5000, 0.1464])
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"Schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps; "
                         f"got total_steps={total_steps}, warmup_steps={warmup_steps}. Lower warmup_epochs.")
    warm = torch.linspace(warmup_start, base, warmup_steps + 1)[:-1] if warmup_steps else torch.empty(0)
    n = total_steps - warmup_steps
    t = torch.arange(n, dtype=torch.float64) / max(n, 1)
    cos = final + 0.5 * (base - final) * (1 + torch.cos(math.pi * t))
    return torch.cat([warm.double(), cos]).float()


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool = False) -> list[dict]:
    """Two groups: parameters with ``ndim >= 2`` (weights), and biases and normalisation parameters.

    The second group never gets LARS adaptation, and gets weight decay only with ``decay_norm_and_bias``
    (lightly's and many CIFAR benchmarks decay every parameter; SimCLR and DINO exclude them).
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": weight_decay if decay_norm_and_bias else 0.0, "lars_exclude": True}]


FUSED_DEVICES = ("cuda", "cpu")  # where torch's fused SGD/AdamW kernels run


def make_optimizer(model: nn.Module, config, fused: bool | None = None) -> torch.optim.Optimizer:
    """The optimizer an ``OptimConfig`` names (``name``, ``lr``, ``momentum``, ``betas``, ``weight_decay``,
    ``decay_norm_and_bias``) over :func:`param_groups` of ``model``, whose parameters are already on their device.

    SGD and AdamW use torch's fused kernels (one launch for every parameter's update, instead of a few multi-tensor
    launches per group) when every parameter is on a device that has them; ``fused=False`` keeps the multi-tensor
    (foreach) implementation. LARS is this module's own multi-tensor step.
    """
    groups = param_groups(model, config.weight_decay, config.decay_norm_and_bias)
    if config.name == "lars":
        return LARS(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    params = [p for g in groups for p in g["params"]]
    if fused is None:
        fused = bool(params) and all(p.device.type in FUSED_DEVICES and p.is_floating_point() for p in params)
    extra = {"fused": True} if fused else {}
    if config.name == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
                               **extra)
    if config.name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay, **extra)
    raise ValueError(f"optim.name must be one of sgd, lars, adamw; got {config.name!r}.")


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You et al. 2017, https://arxiv.org/abs/1708.03888).

    ``update = grad + wd * w``; ``update *= eta * ||w|| / ||update||`` unless the group has
    ``lars_exclude``; then heavy-ball momentum and ``w -= lr * momentum_buffer``.

    Args:
        params: Parameters or groups (see :func:`param_groups`).
        lr: Learning rate (SimCLR: 0.3 x batch / 256).
        momentum: Heavy-ball momentum.
        weight_decay: L2 penalty added to the gradient before the trust ratio (SimCLR: 1e-6).
        eta: Trust coefficient (0.001 in the paper and SimCLR).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        if lr <= 0 or eta <= 0:
            raise ValueError(f"LARS needs lr > 0 and eta > 0; got lr={lr}, eta={eta}.")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta,
                                      lars_exclude=False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:  # each group in a few multi-tensor (foreach) kernels, no host sync
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            d = torch._foreach_add(grads, params, alpha=g["weight_decay"]) if g["weight_decay"] else \
                torch._foreach_mul(grads, 1.0)  # a copy: the update must not alias .grad
            if not g["lars_exclude"]:
                w_norm, d_norm = torch.stack(torch._foreach_norm(params)), torch.stack(torch._foreach_norm(d))  # (P,)
                trust = torch.where((w_norm > 0) & (d_norm > 0), g["eta"] * w_norm / d_norm, torch.ones_like(w_norm))
                torch._foreach_mul_(d, list(trust.unbind()))
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)  # heavy ball from zero: the first step is d
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, g["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-g["lr"])
        return loss


@torch.no_grad()
def ema_update(online: nn.Module, target: nn.Module, momentum: float) -> None:
    """``theta_target <- m * theta_target + (1 - m) * theta_online`` for every parameter (MoCo Eq. 2,
    https://arxiv.org/abs/1911.05722; DINO's teacher update, https://arxiv.org/abs/2104.14294)."""
    t = [p for p in target.parameters()]
    o = [p.detach() for p in online.parameters()]
    if len(t) != len(o):
        raise ValueError(f"EMA pair mismatch: target has {len(t)} parameters, online has {len(o)}.")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, o, alpha=1.0 - momentum)
