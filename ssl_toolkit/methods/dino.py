"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers",
https://arxiv.org/abs/2104.14294).

Self-distillation without labels: a student sees global and local crops and matches the output
distribution of an EMA teacher that sees only the global crops. The teacher's outputs are
centred (running mean, momentum 0.9) and sharpened (a low temperature warmed up from 0.04),
which together avoid collapse.
"""

import copy
from dataclasses import replace

import torch

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.heads import DINOHead
from ssl_toolkit.losses import dino_loss, update_center
from ssl_toolkit.methods.base import BaseSSLModule, OptimConfig
from ssl_toolkit.views import MultiCropViews, ViewConfig, Views

DINO_VIEWS = ViewConfig(scale=(0.4, 1.0), brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)


class DINO(BaseSSLModule):
    """DINO: student and EMA teacher (backbone + DINO head), multi-crop views, centering, sharpening.

    Args:
        backbone: Student encoder (ResNets or ``vit_tiny``/``vit_small``); the teacher is its copy.
        optim: Optimizer and schedule (paper: AdamW, lr 5e-4 x batch/256, wd 0.04 -> 0.4; LARS for ResNet-50).
        views: Settings of the global crops (size, scale, colour); the per-crop blur/solarize
            probabilities come from ``global_blur_p``/``global_solarize_p``.
        num_local_crops: Local crops per image, seen by the student only (paper: 10 for ViT-S/16 at 224 px).
        local_crop_size: Side of the local crops (96 at 224 px; 16 at 32 px). A multiple of the ViT patch size.
        local_scale: Area range of the local crops (paper: 0.05-0.4).
        global_blur_p: Blur probability of each global crop (paper: 1.0 and 0.1; 0 on CIFAR is common).
        global_solarize_p: Solarize probability of each global crop (paper: 0 and 0.2).
        local_blur_p: Blur probability of the local crops (paper: 0.5).
        out_dim: Output dimension K of the DINO head (65536 on ImageNet, 4096 on CIFAR).
        hidden_dim: Head MLP width.
        bottleneck_dim: Head bottleneck before the weight-normalised layer.
        head_batch_norm: BN inside the head MLP (helps ResNets, off for ViTs).
        norm_last_layer: Fix the last layer's weight norm (True is more stable; False can learn faster).
        student_temp: Student temperature (0.1).
        teacher_temp: Teacher temperature after warmup (0.04-0.07; lower it if the loss does not fall).
        warmup_teacher_temp: Teacher temperature at the start (0.04).
        warmup_teacher_temp_epochs: Epochs of linear teacher-temperature warmup (30 in the paper).
        center_momentum: Momentum of the centre's running mean (0.9).
        momentum: Teacher EMA momentum at the start (0.996), cosine-annealed to ``final_momentum`` (1.0).
        final_momentum: Teacher momentum at the end.
        freeze_last_layer_epochs: Epochs during which the head's last layer gets no update (1).
        channels_last: NHWC memory layout for convolutional backbones.
    """

    def __init__(self, backbone: BackboneConfig = BackboneConfig(), optim: OptimConfig = OptimConfig("adamw", lr=1e-3,
                 weight_decay=0.04), views: ViewConfig = DINO_VIEWS, num_local_crops: int = 6,
                 local_crop_size: int = 16, local_scale: tuple[float, float] = (0.05, 0.4),
                 global_blur_p: tuple[float, float] = (1.0, 0.1), global_solarize_p: tuple[float, float] = (0.0, 0.2),
                 local_blur_p: float = 0.5, out_dim: int = 4096, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 head_batch_norm: bool = False, norm_last_layer: bool = True, student_temp: float = 0.1,
                 teacher_temp: float = 0.04, warmup_teacher_temp: float = 0.04, warmup_teacher_temp_epochs: float = 30,
                 center_momentum: float = 0.9, momentum: float = 0.996, final_momentum: float = 1.0,
                 freeze_last_layer_epochs: int = 1, channels_last: bool = False):
        super().__init__(backbone, optim, views, channels_last)
        if len(global_blur_p) != len(global_solarize_p) or len(global_blur_p) < 2:
            raise ValueError(f"DINO needs at least 2 global crops, with one blur and one solarize probability each; "
                             f"got global_blur_p={global_blur_p}, global_solarize_p={global_solarize_p}. "
                             "Set both to 2 values, e.g. [1.0, 0.1] and [0.0, 0.2].")
        if min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise ValueError("DINO temperatures must be > 0 (student 0.1, teacher 0.04-0.07).")
        # named here: the view config's own checks would name views.scale and views.blur_p
        wrong = [f"{name} {value}" for name, value, ok in (
            ("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs, warmup_teacher_temp_epochs >= 0),  # a traceback
            ("freeze_last_layer_epochs", freeze_last_layer_epochs, freeze_last_layer_epochs >= 0),
            ("local_scale", list(local_scale), len(local_scale) == 2 and 0 < local_scale[0] <= local_scale[1] <= 1),
            ("global_blur_p", list(global_blur_p), all(0 <= p <= 1 for p in global_blur_p)),
            ("global_solarize_p", list(global_solarize_p), all(0 <= p <= 1 for p in global_solarize_p)),
            ("local_blur_p", local_blur_p, 0 <= local_blur_p <= 1)) if not ok]
        if wrong:
            raise ValueError(f"DINO got {', '.join(wrong)}: epochs must be >= 0, local_scale 0 < min <= max <= 1 (the "
                             "paper: [0.05, 0.4]) and probabilities in [0, 1].")
        if not 0 <= center_momentum < 1 or not 0 <= momentum <= final_momentum <= 1:
            raise ValueError(f"DINO needs 0 <= center_momentum < 1 and 0 <= momentum <= final_momentum <= 1; got "
                             f"{center_momentum}, {momentum}, {final_momentum}. Paper: 0.9, 0.996, 1.0.")
        self.save_config(num_local_crops=num_local_crops, local_crop_size=local_crop_size, local_scale=local_scale,
                         global_blur_p=global_blur_p, global_solarize_p=global_solarize_p, local_blur_p=local_blur_p,
                         out_dim=out_dim, hidden_dim=hidden_dim, bottleneck_dim=bottleneck_dim,
                         head_batch_norm=head_batch_norm, norm_last_layer=norm_last_layer, student_temp=student_temp,
                         teacher_temp=teacher_temp, warmup_teacher_temp=warmup_teacher_temp,
                         warmup_teacher_temp_epochs=warmup_teacher_temp_epochs, center_momentum=center_momentum,
                         momentum=momentum, final_momentum=final_momentum,
                         freeze_last_layer_epochs=freeze_last_layer_epochs)
        self.head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, batch_norm=head_batch_norm,
                             norm_last_layer=norm_last_layer)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center", torch.zeros(out_dim))
        globals_ = [replace(views, blur_p=b, solarize_p=s) for b, s in zip(global_blur_p, global_solarize_p)]
        local = replace(views, crop_size=local_crop_size, scale=tuple(local_scale), blur_p=local_blur_p, solarize_p=0.0)
        self.view_policy = MultiCropViews(globals_, local, num_local_crops)
        self.num_global, self.num_views = len(globals_), len(globals_) + num_local_crops
        self.student_temp, self.center_momentum = student_temp, center_momentum
        self.teacher_temps = (warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs)
        self.freeze_last_layer_epochs = freeze_last_layer_epochs
        self.ema_momentum = (momentum, final_momentum)
        self.teacher_temp_schedule = torch.full((1,), float(teacher_temp))

    def ema_pairs(self):
        return [(self.backbone, self.teacher_backbone), (self.head, self.teacher_head)]

    def make_schedules(self, total_steps: int, steps_per_epoch: int) -> None:
        super().make_schedules(total_steps, steps_per_epoch)
        start, end, epochs = self.teacher_temps
        warm = min(total_steps, round(epochs * steps_per_epoch))
        self.teacher_temp_schedule = torch.cat([torch.linspace(start, end, warm) if warm else torch.empty(0),
                                                torch.full((total_steps - warm,), float(end))])  # (total,)

    def embed(self, backbone, crops: list[torch.Tensor]) -> torch.Tensor:
        """Backbone features of all crops, one forward pass per crop size (global, local), in view order."""
        feats, i = [], 0
        while i < len(crops):
            j = i
            while j < len(crops) and crops[j].shape == crops[i].shape:
                j += 1
            feats.append(backbone(self.prepare_input(torch.cat(crops[i:j]))))  # (n_same * B, D)
            i = j
        return torch.cat(feats)

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        student = self.head(self.embed(self.backbone, views.crops))  # (V*B, K)
        with torch.no_grad():
            teacher = self.teacher_head(self.embed(self.teacher_backbone, views.crops[:self.num_global]))  # (G*B, K)
        out = dino_loss(student, teacher, self.center, self.num_views, self.num_global, self.student_temp,
                        self.scheduled(self.teacher_temp_schedule))
        self.center.copy_(update_center(self.center, teacher, self.center_momentum))
        return out

    def on_after_backward(self) -> None:
        if self.current_epoch < self.freeze_last_layer_epochs:  # DINO: keep the prototypes fixed at first
            for p in self.head.last_layer.parameters():
                p.grad = None
