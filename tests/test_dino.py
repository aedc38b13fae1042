import math

import pytest
import pytorch_lightning as pl
import torch

from conftest import DIGITS_MEAN, DIGITS_STD, knn_before_and_after
from ssl_toolkit.backbones import BackboneConfig, build_backbone
from ssl_toolkit.data import DigitsDataModule
from ssl_toolkit.heads import DINOHead
from ssl_toolkit.losses import dino_loss, update_center
from ssl_toolkit.methods import DINO, OptimConfig
from ssl_toolkit.views import ViewConfig


def tiny(**kw):
    args = dict(views=ViewConfig(crop_size=16), local_crop_size=8, num_local_crops=2, out_dim=32, hidden_dim=16,
                bottleneck_dim=8)
    args.update(kw)
    return DINO(args.pop("backbone", BackboneConfig("tiny_cnn", width=4)), **args)


def test_center_update_formula():
    c = torch.tensor([1.0, 0.0, -1.0])
    t = torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 2.0]])
    assert torch.allclose(update_center(c, t, 0.9), 0.9 * c + 0.1 * torch.tensor([1.0, 1.0, 3.0]))


def test_loss_skips_same_view_pairs_and_matches_the_formula():
    torch.manual_seed(0)
    b, k, v, g, ts, tt = 3, 5, 4, 2, 0.1, 0.04
    s, t, c = torch.randn(v * b, k), torch.randn(g * b, k), torch.randn(k)
    p_t = ((t - c) / tt).softmax(-1).chunk(g)
    log_s = (s / ts).log_softmax(-1).chunk(v)
    pairs = [(iq, iv) for iq in range(g) for iv in range(v) if iq != iv]
    assert len(pairs) == g * v - g
    expected = sum(-(p_t[iq] * log_s[iv]).sum(-1).mean() for iq, iv in pairs) / len(pairs)
    got = dino_loss(s, t, c, v, g, ts, tt)["dino_loss"]
    assert torch.allclose(got, expected)
    with_same = sum(-(p_t[iq] * log_s[iv]).sum(-1).mean() for iq in range(g) for iv in range(v)) / (g * v)
    assert not torch.allclose(got, with_same)


def test_teacher_gets_no_gradient_and_follows_the_student_by_ema():
    m = tiny()
    views = m.view_policy(torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8))
    assert len(views.crops) == 4 and views.crops[2].shape[-1] == 8
    m.step(views)["dino_loss"].backward()
    assert all(p.grad is None for p in m.teacher_backbone.parameters())
    assert all(p.grad is None for p in m.teacher_head.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


def test_collapse_to_a_constant_output_is_visible_in_the_logged_entropy():
    k, b = 16, 8
    healthy = dino_loss(torch.randn(2 * b, k), 5 * torch.randn(2 * b, k), torch.zeros(k), 2, 2, 0.1, 0.04)
    const = torch.randn(1, k).expand(2 * b, k)
    collapsed = dino_loss(const, const, torch.zeros(k), 2, 2, 0.1, 0.04)  # one output for every image
    uniform = dino_loss(const, const, const[0], 2, 2, 0.1, 0.04)  # centred away: uniform teacher
    assert healthy["teacher_mi"] > 1.0
    assert collapsed["teacher_mi"].abs() < 1e-5 and uniform["teacher_mi"].abs() < 1e-5
    assert uniform["teacher_entropy"] == pytest.approx(math.log(k), rel=1e-5)


def test_head_last_layer_norm_is_fixed():
    head = DINOHead(8, out_dim=10, hidden_dim=16, bottleneck_dim=4)
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(10))
    assert not head.last_layer.parametrizations.weight.original0.requires_grad


def test_vit_backbones_take_global_and_local_crop_sizes():
    for name, dim in (("vit_tiny", 192), ("vit_small", 384)):
        vit, d = build_backbone(name, patch_size=4, image_size=32, vit_layers=1)
        assert d == dim and vit(torch.zeros(2, 3, 32, 32)).shape == (2, dim) and vit(torch.zeros(2, 3, 16, 16)).shape == (2, dim)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        vit(torch.zeros(1, 3, 18, 18))
    m = tiny(backbone=BackboneConfig("vit_tiny", patch_size=4, image_size=16, vit_layers=1))
    assert torch.isfinite(m.step(m.view_policy(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)))["dino_loss"])


def test_pictures_of_multi_crop_views_show_each_crop_size():
    """DINO's global and local crops differ in size; `pictures` (and PicturesCallback) stacked them into one batch
    and died with a size mismatch."""
    from ssl_toolkit.eval import view_pictures

    pics = view_pictures(tiny(), torch.randint(0, 256, (3, 3, 20, 20), dtype=torch.uint8))
    assert {k: tuple(v.shape) for k, v in pics.items()} == {"views_16x16": (6, 3, 16, 16), "views_8x8": (6, 3, 8, 8)}
    assert all(v.min() >= 0 and v.max() <= 1 for v in pics.values())


def test_schedules_and_frozen_last_layer_in_training():
    m = tiny(warmup_teacher_temp=0.02, teacher_temp=0.06, warmup_teacher_temp_epochs=1, momentum=0.9,
             freeze_last_layer_epochs=1, optim=OptimConfig("adamw", lr=1e-3, warmup_epochs=0))
    last = m.head.last_layer.parametrizations.weight.original1.detach().clone()
    after_epoch = []

    class Record(pl.Callback):
        def on_train_epoch_end(self, trainer, module):
            after_epoch.append(module.head.last_layer.parametrizations.weight.original1.detach().clone())

    trainer = pl.Trainer(max_epochs=2, limit_train_batches=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=[Record()])
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=32))
    assert torch.equal(last, after_epoch[0])  # frozen during the first epoch
    assert torch.allclose(m.teacher_temp_schedule[:4], torch.linspace(0.02, 0.06, 4))
    assert torch.allclose(m.teacher_temp_schedule[4:], torch.full((4,), 0.06))
    assert m.momentum_schedule[0] == pytest.approx(0.9) and m.momentum_schedule[-1] < 1.0
    assert not torch.equal(last, m.head.last_layer.parametrizations.weight.original1)  # updated in epoch 2 only
    assert m.center.abs().sum() > 0


def optimizer_after_two_steps(precision: str, accelerator: str, **clipping):
    """Two training steps of a tiny DINO under ``precision``; the optimizer they ran with, and whether every weight
    and the loss stayed finite."""
    model = tiny(optim=OptimConfig("sgd", lr=0.05))
    before = [p.detach().clone() for p in model.parameters()]
    trainer = pl.Trainer(max_steps=2, precision=precision, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator=accelerator, devices=1,
                         **clipping)
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32))
    assert trainer.global_step == 2
    assert all(p.isfinite().all() for p in model.parameters())
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.parameters()))  # a step was taken
    return trainer.optimizers[0]


def test_gradient_clipping_in_mixed_precision_trains_with_the_multi_tensor_optimizer():
    """The DINO recipe clips gradients (norm 3) in bf16-mixed. Lightning refuses to clip for a fused optimizer under
    mixed precision, so with clipping on the optimizer is the multi-tensor one; without clipping, the fused one."""
    assert not optimizer_after_two_steps("bf16-mixed", "cpu", gradient_clip_val=3.0).defaults["fused"]
    assert optimizer_after_two_steps("bf16-mixed", "cpu").defaults["fused"]


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_clipping_and_the_fused_optimizer_on_the_gpu(precision):
    """As above on a GPU, in bf16 and in fp16 with Lightning's gradient scaler (the recipes' setting for GPUs without
    bf16): Lightning runs 16-mixed as bf16 on the CPU, so only here does the scaler meet the fused kernels."""
    assert not optimizer_after_two_steps(precision, "cuda", gradient_clip_val=3.0).defaults["fused"]
    assert optimizer_after_two_steps(precision, "cuda").defaults["fused"]


def test_bad_settings_say_the_fix():
    with pytest.raises(ValueError, match="at least 2 global crops"):
        tiny(global_blur_p=(1.0,), global_solarize_p=(0.0,))
    with pytest.raises(ValueError, match="Paper: 0.9, 0.996, 1.0"):
        tiny(momentum=1.2)


def test_dino_beats_random_init_on_digits():
    pl.seed_everything(0)
    views = ViewConfig(crop_size=32, scale=(0.4, 1.0), flip_p=0.0, hue=0.0, saturation=0.0, mean=DIGITS_MEAN,
                       std=DIGITS_STD)
    m = DINO(BackboneConfig("tiny_cnn", width=16), views=views, num_local_crops=2, local_crop_size=16,
             local_scale=(0.2, 0.4), global_blur_p=(0.0, 0.0), global_solarize_p=(0.0, 0.0), local_blur_p=0.0,
             out_dim=1024, hidden_dim=256, bottleneck_dim=64, head_batch_norm=True, teacher_temp=0.04,
             warmup_teacher_temp_epochs=0, momentum=0.99,
             optim=OptimConfig("adamw", lr=3e-3, weight_decay=1e-4, warmup_epochs=2))
    init, trained = knn_before_and_after(m, epochs=10)
    # Measured on 2 CPU cores, 10 epochs with 2 local crops (26 s): seed 0 83.52% at random init -> 91.48%; seeds
    # 1-3: 83.70 -> 92.22, 87.22 -> 90.37, 82.59 -> 89.44 (gains +3.1 to +8.5 points). With 4 local crops: 94.26%
    # after 15 epochs (44 s), 94.44% after 30 (72 s).
    assert trained - init >= 5.0 and trained >= 90.0, (init, trained)
