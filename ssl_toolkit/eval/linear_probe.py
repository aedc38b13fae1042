"""Linear probe on frozen features, trained on cached features.

The linear evaluation protocol (Zhang et al. 2016, https://arxiv.org/abs/1603.08511; SimCLR,
https://arxiv.org/abs/2002.05709, Sec. 4): the backbone is frozen and a linear classifier is
trained on its features. Here features are extracted once (no augmentation) and cached, then
standardised with the training statistics (as MAE's BN-without-affine probe,
https://arxiv.org/abs/2111.06377), so the backbone never runs again during the probe's epochs.
"""

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_toolkit.backbones import Encoder

def train_linear(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, epochs: int = 100,
                 lr: float = 0.1, weight_decay: float = 0.0, batch_size: int = 1024, seed: int = 0,
                 standardize_with: torch.Tensor | None = None) -> nn.Module:
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
        standardize_with: ``(N', D)`` features whose mean and std standardise the inputs (default: ``train_x``).
            With few labels, all the training images' features (their labels unused): a few images' statistics are
            noisy (1 labelled digit per class: 69.30% with its own, 71.85% with all of train's), and a dimension
            constant on them (a ReLU channel off on every one) would scale test features by up to 1e6.
    """
    if epochs < 1 or not 0 < lr < math.inf:  # nan passed "<= 0" and trained a chance-level probe
        raise ValueError(f"Linear probe needs epochs >= 1 and a finite lr > 0; got epochs={epochs}, lr={lr}.")
    gen = torch.Generator().manual_seed(seed)
    x, y = train_x.float(), train_y.long()
    stats = x if standardize_with is None else standardize_with.float().to(x.device)
    mean, std = stats.mean(0), stats.std(0).clamp_min(1e-6)
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


def split_validation(n: int, fraction: float = 0.1, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, val)`` of a random split of ``n`` training rows; the test split is never used to choose."""
    if not 0 < fraction < 1 or round(n * fraction) < 1 or round(n * fraction) >= n:
        raise ValueError(f"The validation split needs 0 < val_fraction < 1 leaving rows on both sides; got "
                         f"{fraction} of {n} training rows.")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * fraction)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def train_linear_grid(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int, lrs: torch.Tensor,
                      weight_decays: torch.Tensor, epochs: int = 100, batch_size: int = 1024,
                      seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train H linear heads at once, head ``h`` with ``lrs[h]`` and ``weight_decays[h]``, on the same batches.

    Each head is exactly what :func:`train_linear` trains with that learning rate and weight decay (same
    standardisation, initialisation, batches, SGD with momentum 0.9 and weight decay on all parameters, cosine
    schedule): one ``(H, B, C)`` batched product per step instead of H runs.

    Returns:
        ``(W, b, mean, std)``: weights ``(H, D, C)``, biases ``(H, C)`` and the standardisation.
    """
    finite = lrs.isfinite().all() and weight_decays.isfinite().all()  # nan passed the range checks below
    if epochs < 1 or not finite or (lrs <= 0).any() or (weight_decays < 0).any() or lrs.shape != weight_decays.shape:
        raise ValueError(f"The probe grid needs epochs >= 1, finite lrs > 0 and weight decays >= 0 of one shape; got "
                         f"{epochs}, {lrs.tolist()}, {weight_decays.tolist()}.")
    gen = torch.Generator().manual_seed(seed)
    x, y = train_x.float(), train_y.long()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mean) / std
    h = len(lrs)
    w0 = torch.randn(num_classes, x.shape[1], generator=gen).mul_(0.01)  # train_linear's init, for every head
    w = w0.T.to(x.device).repeat(h, 1, 1).requires_grad_()  # (H, D, C)
    b = torch.zeros(h, num_classes, device=x.device, requires_grad=True)  # (H, C)
    vw, vb = torch.zeros_like(w), torch.zeros_like(b)
    lr, wd = lrs.to(x.device).float(), weight_decays.to(x.device).float()
    total, step = epochs * math.ceil(len(x) / batch_size), 0
    for _ in range(epochs):
        perm = torch.randperm(len(xs), generator=gen).to(xs.device)
        for i in range(0, len(xs), batch_size):
            idx = perm[i:i + batch_size]
            logits = torch.einsum("bd,hdc->hbc", xs[idx], w) + b[:, None]  # (H, B, C)
            loss = F.cross_entropy(logits.flatten(0, 1), y[idx].repeat(h), reduction="none").view(h, -1).mean(1).sum()
            gw, gb = torch.autograd.grad(loss, (w, b))  # each head's own gradient (the loss is a sum over heads)
            scale = lr * 0.5 * (1 + math.cos(math.pi * step / total))  # (H,) cosine, as CosineAnnealingLR
            with torch.no_grad():
                vw.mul_(0.9).add_(gw + wd[:, None, None] * w)
                vb.mul_(0.9).add_(gb + wd[:, None] * b)
                w.sub_(scale[:, None, None] * vw)
                b.sub_(scale[:, None] * vb)
            step += 1
    return w.detach(), b.detach(), mean, std


def linear_probe_sweep(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                       num_classes: int, lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0),
                       weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3), val_fraction: float = 0.1,
                       epochs: int = 100, batch_size: int = 1024, seed: int = 0) -> dict:
    """The fast linear protocol: every (lr, weight decay) head trained at once on cached features, the best chosen
    on a validation split carved from train, then retrained on all of train and scored once on test.

    Returns:
        ``top1``, ``top5`` (test, chosen setting), ``lr``, ``weight_decay``, ``val_top1`` of the choice and
        ``grid``: ``{lr: {weight_decay: val_top1}}``.
    """
    tr, va = split_validation(len(train_x), val_fraction, seed)
    grid_lr = torch.tensor(lrs).repeat_interleave(len(weight_decays))  # (H,) lr-major
    grid_wd = torch.tensor(weight_decays).repeat(len(lrs))
    w, b, mean, std = train_linear_grid(train_x[tr], train_y[tr], num_classes, grid_lr, grid_wd, epochs, batch_size,
                                        seed)
    xv = (train_x[va].float() - mean) / std
    logits = torch.einsum("bd,hdc->hbc", xv, w) + b[:, None]  # (H, V, C)
    val = 100.0 * (logits.argmax(-1) == train_y[va].to(logits.device)).float().mean(1)  # (H,)
    best = int(val.argmax())  # ties: the first in lr-major order
    lr, wd = lrs[best // len(weight_decays)], weight_decays[best % len(weight_decays)]
    final = linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=epochs, lr=lr, weight_decay=wd,
                         batch_size=batch_size, seed=seed)
    grid = {l_: {w_: float(val[i * len(weight_decays) + j]) for j, w_ in enumerate(weight_decays)}
            for i, l_ in enumerate(lrs)}
    return {**final, "lr": lr, "weight_decay": wd, "val_top1": float(val[best]), "val_size": len(va), "grid": grid}


def bn_linear(dim: int, num_classes: int) -> nn.Sequential:
    """The probe of the augmented and online protocols: ``BatchNorm1d`` without affine parameters (features
    standardised with running statistics, as MAE's probe) and a linear layer."""
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))


def augmented_linear_probe(encoder: Encoder, datamodule, epochs: int = 100, lr: float = 0.1,
                           weight_decay: float = 0.0, batch_size: int = 256, device: torch.device | str = "cpu",
                           scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5, seed: int = 0,
                           train_index: torch.Tensor | None = None,
                           test_features: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """The standard linear protocol, for comparison with published numbers: augmentation, a frozen backbone.

    Every epoch each training image is cropped (torchvision's RandomResizedCrop rule, ``scale``) and flipped
    (``flip_p``; 0 for data where mirroring changes the class, like digits) on the device; the frozen encoder
    (eval mode, no gradient) embeds the crops and a :func:`bn_linear` classifier takes SGD steps (momentum 0.9,
    cosine schedule). Test images are embedded
    as they are (no augmentation). The backbone runs every epoch, so this costs ``epochs`` passes of it; the
    fast protocol (:func:`linear_probe_sweep`) runs it once.

    ``train_index`` trains on those training images alone (few labels); ``test_features`` (features and labels of
    the test split, from :func:`~ssl_toolkit.eval.features.extract_features`) spares extracting them again.
    """
    return _train_on_crops(encoder, datamodule, epochs, lr, weight_decay, batch_size, device, scale, flip_p, seed,
                           train_index, test_features, backbone_lr=None)


def finetune(encoder: Encoder, datamodule, epochs: int = 100, lr: float = 0.1, backbone_lr: float = 0.1,
             weight_decay: float = 0.0, batch_size: int = 256, device: torch.device | str = "cpu",
             scale: tuple[float, float] = (0.08, 1.0), flip_p: float = 0.5, seed: int = 0,
             train_index: torch.Tensor | None = None) -> dict[str, float]:
    """Fine-tuning: :func:`augmented_linear_probe`'s protocol with the backbone trained too, at ``backbone_lr``
    times ``lr`` (the classifier's), in train mode (its batch norm uses and updates batch statistics) and in the
    evaluation precision (bf16 autocast on CUDA by default). With few labels (``train_index``) this is the
    semi-supervised protocol of SimCLR (https://arxiv.org/abs/2002.05709, Sec. 6, fine-tuned on 1% and 10% of
    ImageNet's labels). ``encoder`` itself is left as it was: a copy is trained, so every draw of few labels starts
    from the pretrained weights. The test split is embedded by the fine-tuned copy, without augmentation.

    Returns:
        ``top1`` and ``top5`` (%) on the test split.
    """
    if not 0 < backbone_lr < math.inf:
        raise ValueError(f"Fine-tuning needs a finite backbone_lr > 0 (the backbone's lr as a share of the "
                         f"classifier's); got {backbone_lr}.")
    return _train_on_crops(encoder, datamodule, epochs, lr, weight_decay, batch_size, device, scale, flip_p, seed,
                           train_index, None, backbone_lr)


def _train_on_crops(encoder: Encoder, datamodule, epochs: int, lr: float, weight_decay: float, batch_size: int,
                    device: torch.device | str, scale: tuple[float, float], flip_p: float, seed: int,
                    train_index: torch.Tensor | None, test_features: tuple[torch.Tensor, torch.Tensor] | None,
                    backbone_lr: float | None) -> dict[str, float]:
    """What the augmented probe and fine-tuning share: a :func:`bn_linear` classifier trained on random resized
    crops and flips of the training images, then scored on the test split; ``backbone_lr`` None: the backbone
    frozen, else a copy of it trained at ``backbone_lr * lr``."""
    from ssl_toolkit.eval.features import evaluating, extract_features, in_eval_precision, own_rng
    from ssl_toolkit.progress import Progress
    from ssl_toolkit.views import functional as VF

    tuned = backbone_lr is not None
    what = "Fine-tuning" if tuned else "The augmented probe"
    if (epochs < 1 or not 0 < lr < math.inf or not 0 <= weight_decay < math.inf or not 0 < scale[0] <= scale[1] <= 1
            or not 0 <= flip_p <= 1):
        raise ValueError(f"{what} needs epochs >= 1, a finite lr > 0 and weight_decay >= 0, "
                         f"0 < scale <= 1 and a flip probability in [0, 1]; got {epochs}, {lr}, {weight_decay}, {scale}, "
                         f"{flip_p}.")
    datamodule.setup()
    x_all, y_all = datamodule.splits.x_train, datamodule.splits.y_train
    if train_index is not None:
        x_all, y_all = x_all[train_index], y_all[train_index]
    if len(y_all) < 2:  # batch norm trains on two or more
        raise ValueError(f"{what} needs two or more training images; {datamodule.name} has {len(y_all)}.")
    size = getattr(encoder, "input_size", None) or x_all.shape[-1]
    encoder = (copy.deepcopy(encoder) if tuned else encoder).to(device)
    with torch.no_grad(), evaluating(encoder, device):
        dim = encoder(x_all[:2].to(device)).shape[1]
    with own_rng(seed, device):  # the probe's init and crops do not move the caller's random streams
        clf = bn_linear(dim, datamodule.num_classes).to(device)
        groups = [{"params": list(clf.parameters())}]
        if tuned:
            groups.append({"params": [q for q in encoder.parameters() if q.requires_grad], "lr": lr * backbone_lr})
        opt = torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=weight_decay)
        # a last batch of one image is left out (another each epoch): batch norm cannot train on one, and it stopped
        # the probe at the end of its first epoch with "Expected more than 1 value per channel when training"
        per_epoch = len(y_all) // batch_size + (len(y_all) % batch_size > 1)
        steps = epochs * per_epoch
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        report, step = Progress(steps, "steps", "fine-tuning" if tuned else "augmented probe"), 0
        for epoch in range(epochs):
            for idx in torch.randperm(len(y_all)).split(batch_size)[:per_epoch]:
                x = x_all[idx].to(device).float() / 255.0  # (b, 3, H, W) in [0, 1]
                boxes = VF.sample_crop_boxes(len(x), x.shape[-2], x.shape[-1], scale, (3 / 4, 4 / 3), device=device)
                x = VF.resized_crop(x, boxes, size, torch.rand(len(x), device=device) < flip_p)  # (b, 3, s, s)
                if tuned:
                    encoder.train()
                    with in_eval_precision(device):
                        feats = encoder(x, check_range=False).float()  # crops of uint8 images: in [0, 1], no sync
                else:
                    with torch.no_grad(), evaluating(encoder, device):
                        feats = encoder(x, check_range=False).float()
                clf.train()
                loss = F.cross_entropy(clf(feats), y_all[idx].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                report(step, f" (epoch {epoch + 1} of {epochs})")
    test_x, test_y = test_features or extract_features(encoder, datamodule, "test", device, batch_size)
    clf.eval()
    with torch.no_grad():
        acc = topk_accuracy(clf(test_x), test_y.to(test_x.device))
    return {"top1": acc[1], "top5": acc[5]}
