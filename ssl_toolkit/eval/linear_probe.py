"""Linear probe on frozen features, trained on cached features.

The linear evaluation protocol (Zhang et al. 2016, https://arxiv.org/abs/1603.08511; SimCLR,
https://arxiv.org/abs/2002.05709, Sec. 4): the backbone is frozen and a linear classifier is
trained on its features. Here features are extracted once (no augmentation) and cached, then
standardised with the training statistics (as MAE's BN-without-affine probe,
https://arxiv.org/abs/2111.06377), so the backbone never runs again during the probe's epochs.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.1, weight_decay: float = 0.0, batch_size: int = 1024, seed: int = 0) -> nn.Module:
    """Train ``Standardize + Linear`` on cached features with SGD (momentum 0.9) and a cosine schedule.

    Args:
        train_x: ``(N, D)`` features.
        train_y: ``(N,)`` labels.
        num_classes: Output classes.
        epochs: Passes over the cached features (cheap: no backbone).
        lr: Peak SGD learning rate on standardised features.
        weight_decay: L2 penalty on the linear weights.
        batch_size: Features per step.
        seed: Seed of the initialisation and the shuffling.
    """
    if epochs < 1 or lr <= 0:
        raise ValueError(f"Linear probe needs epochs >= 1 and lr > 0; got epochs={epochs}, lr={lr}.")
    gen = torch.Generator().manual_seed(seed)
    x, y = train_x.float(), train_y.long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    linear = nn.Linear(x.shape[1], num_classes).to(x.device)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(linear.weight.shape, generator=gen).mul_(0.01))
        linear.bias.zero_()
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(x) / batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    xs = (x - mean) / std  # (N, D) standardised once
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=gen).to(xs.device)
        for i in range(0, len(xs), batch_size):
            b = perm[i:i + batch_size]
            loss = F.cross_entropy(linear(xs[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return Standardized(linear, mean, std)


class Standardized(nn.Module):
    """A linear classifier preceded by the fixed standardisation it was trained with."""

    def __init__(self, linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.linear = linear
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x.float() - self.mean) / self.std)


@torch.no_grad()
def topk_accuracy(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, float]:
    """Top-k accuracies in % (a k above the number of classes counts as the number of classes)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (M, kmax)
    hit = top == labels.view(-1, 1)
    return {k: 100.0 * hit[:, :k].any(1).float().mean().item() for k in ks}


def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, **kwargs) -> dict[str, float]:
    """Train on cached train features, report ``top1`` and ``top5`` (%) on the test features."""
    clf = train_linear(train_x, train_y, num_classes, **kwargs)
    acc = topk_accuracy(clf(test_x.to(train_x.device)), test_y.to(train_x.device))
    return {"top1": acc[1], "top5": acc[5]}
