"""MoCo v2 (He et al. 2020, "Momentum Contrast for Unsupervised Visual Representation Learning",
https://arxiv.org/abs/1911.05722; Chen et al. 2020, "Improved Baselines with Momentum Contrastive
Learning", https://arxiv.org/abs/2003.04297).

A query encoder trained by InfoNCE against the key of the same image from a momentum (EMA)
key encoder and K negatives from a FIFO queue of past keys.

Batch-norm leakage: the key encoder runs in train mode on a batch that is shuffled across
ranks before its forward pass and unshuffled after (shuffle-BN, MoCo Sec. 3.3), so a query and
its key never share batch statistics. One process computes statistics over its whole batch
whatever the order; there ``bn_splits`` gives both encoders batch norm over sub-batches, as if on
that many GPUs, and shuffles the keys within the process (the MoCo CIFAR-10 demo's SplitBatchNorm,
8 splits; lightly's CIFAR-10 benchmark does the same). ``trainer.sync_batchnorm`` gives SyncBN for
multi-GPU runs that prefer it.
"""

import copy

import torch
import torch.nn.functional as F

from ssl_toolkit import distributed
from ssl_toolkit.backbones import BackboneConfig, split_batch_norm
from ssl_toolkit.heads import projection_head
from ssl_toolkit.losses import info_nce
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.queue import FeatureQueue
from ssl_toolkit.views import ContrastiveViews, ViewConfig, Views

MOCO_V2_VIEWS = ViewConfig(scale=(0.2, 1.0), blur_p=0.5, blur_kernel=3)  # v2 augmentations; 3 px kernel ~10% of 32 px


class MoCoV2(BaseSSLModule):
    """MoCo v2: query encoder + EMA key encoder + MLP head + queue of negatives + InfoNCE.

    Args:
        backbone: Query encoder; the key encoder is its copy, updated by EMA only.
        optim: Optimizer and schedule (paper: SGD lr 0.03 x batch/256, momentum 0.9, wd 1e-4, cosine).
        views: v2 augmentations: crop scale (0.2, 1), jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2,
            blur p=0.5, flip.
        temperature: InfoNCE temperature (0.2 in MoCo v2).
        queue_size: Number of negatives K (4096 for CIFAR, 65536 for ImageNet): a multiple of the keys queued per
            step (the global batch, twice it when ``symmetric``), as in the paper's code, so every key stays
            exactly K / batch steps and the queue is rewritten in whole batches; checked when training starts.
        proj_hidden_dim: Hidden width of the MLP head (2048 in MoCo v2).
        proj_out_dim: Output width (128).
        momentum: Key-encoder momentum at the start (0.999 on ImageNet at batch 256; 0.99 on CIFAR).
        final_momentum: Momentum at the end of the cosine schedule; equal to ``momentum`` keeps it constant
            as in the paper, 1.0 anneals like BYOL/DINO.
        symmetric: Also use the second view as query (loss averaged, both keys queued): more signal per
            step; the paper's MoCo v2 is asymmetric.
        bn_splits: Batch-norm sub-batches per process (1: the whole local batch). Above 1 the backbones' batch
            norm computes training statistics over that many sub-batches and the key batch is shuffled first,
            so a query and its key see different statistics on one GPU (8 in the CIFAR-10 recipe). The batch
            must divide by it; evaluation is unchanged.
        channels_last: NHWC memory layout for the convolutions.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig(lr=0.06),
                 views: ViewConfig = MOCO_V2_VIEWS, temperature: float = 0.2, queue_size: int = 4096,
                 proj_hidden_dim: int = 2048, proj_out_dim: int = 128, momentum: float = 0.99,
                 final_momentum: float | None = None, symmetric: bool = False, bn_splits: int = 1,
                 channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        final_momentum = momentum if final_momentum is None else final_momentum
        if not (0.0 <= momentum <= 1.0 and 0.0 <= final_momentum <= 1.0):
            raise ValueError(f"MoCo momentum values lie in [0, 1]; got momentum={momentum}, "
                             f"final_momentum={final_momentum}. Use 0.99 on CIFAR, 0.999 on ImageNet.")
        if temperature <= 0:
            raise ValueError(f"MoCo temperature must be > 0; got {temperature}. MoCo v2 uses 0.2.")
        if bn_splits < 1:
            raise ValueError(f"MoCo bn_splits must be >= 1; got {bn_splits}. Use 8 on one GPU, 1 to turn it off.")
        self.save_config(temperature=temperature, queue_size=queue_size, proj_hidden_dim=proj_hidden_dim,
                         proj_out_dim=proj_out_dim, momentum=momentum, final_momentum=final_momentum,
                         symmetric=symmetric, bn_splits=bn_splits)
        split_batch_norm(self.backbone, bn_splits)  # before the copy: the key encoder splits the same way
        self.projector = projection_head(self.feature_dim, proj_hidden_dim, proj_out_dim, batch_norm=False)
        self.key_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.key_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.queue = FeatureQueue(queue_size, proj_out_dim)
        self.view_policy = ContrastiveViews(views, num_views=2)
        self.temperature, self.symmetric, self.bn_splits = temperature, symmetric, bn_splits
        self.ema_momentum = (momentum, final_momentum)

    def ema_pairs(self):
        return [(self.backbone, self.key_backbone), (self.projector, self.key_projector)]

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.attached_datamodule
        if dm is None or not hasattr(dm, "batch_size"):
            return
        per_step = dm.batch_size * self._trainer.world_size * (2 if self.symmetric else 1)  # keys queued per step
        if dm.batch_size % self.bn_splits:
            raise ValueError(f"MoCo's bn_splits {self.bn_splits} does not divide data.batch_size {dm.batch_size}; "
                             f"set data.batch_size to a multiple of it (or model bn_splits to a divisor).")
        size = self.queue.features.shape[0]
        if size % per_step:
            fix = max(per_step, round(size / per_step) * per_step)
            raise ValueError(f"MoCo's queue_size {size} is not a multiple of the {per_step} keys queued per step "
                             f"(data.batch_size {dm.batch_size} x {self._trainer.world_size} device(s)"
                             f"{' x 2 views, symmetric' if self.symmetric else ''}). Set model queue_size to "
                             f"{fix}, or change data.batch_size.")

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """Unit-norm keys of the key encoder, with the batch shuffled (across ranks, or within the process when
        batch norm is split) for its batch norm."""
        shuffled, undo = distributed.shuffle_across_ranks(x, in_process=self.bn_splits > 1)
        k = self.key_projector(self.key_backbone(self.prepare_input(shuffled)))
        return F.normalize(distributed.unshuffle_across_ranks(k, undo).float(), dim=1)  # (B, D)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        x1, x2 = views.crops
        xq, xk = (torch.cat([x1, x2]), torch.cat([x2, x1])) if self.symmetric else (x1, x2)
        q = self.projector(self.backbone(self.prepare_input(xq)))  # (B or 2B, D)
        k = self.keys(xk)
        out = info_nce(q, k, self.queue.features.clone(), self.temperature)  # the queue is updated in place below
        self.queue.push(distributed.gather(k))  # keys of every rank, oldest replaced first
        return out
