import math

import pytest
import torch

from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.losses.cpc import cpc_info_nce
from ssl_toolkit.methods import CPCV2
from ssl_toolkit.methods.cpc import ContextNetwork
from ssl_toolkit.views import ViewConfig, patch_grid
from ssl_toolkit.views.patches import PatchGridViews


def test_patch_grid_covers_the_image_as_specified():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    grid = patch_grid(x, patch=8, stride=4)
    assert grid.shape == (2, 7, 7, 3, 8, 8)
    for i in range(7):
        for j in range(7):
            assert torch.equal(grid[:, i, j], x[:, :, 4 * i:4 * i + 8, 4 * j:4 * j + 8])
    covered = torch.zeros(32, 32, dtype=torch.bool)
    for i in range(7):
        for j in range(7):
            covered[4 * i:4 * i + 8, 4 * j:4 * j + 8] = True
    assert covered.all()
    with pytest.raises(ValueError, match="divisible by stride"):
        patch_grid(torch.zeros(1, 3, 30, 30), 8, 4)


def test_each_patch_gets_its_own_augmentation():
    views = PatchGridViews(patch=8, stride=4, patch_views=ViewConfig(scale=(0.5, 1.0)))
    x = torch.full((1, 3, 32, 32), 128, dtype=torch.uint8)  # a flat image: only the augmentation varies
    patches = views(x).crops[0]
    assert patches.shape == (49, 3, 8, 8)
    means = patches.mean((1, 2, 3))
    assert len(set(means.round(decimals=4).tolist())) > 10


def test_context_is_causal_over_rows():
    net = ContextNetwork(dim=6, hidden=8, layers=3)
    z = torch.randn(2, 6, 5, 5, requires_grad=True)
    c = net(z)
    for t in range(5):
        grad, = torch.autograd.grad(c[:, :, t].sum(), z, retain_graph=True)
        assert grad[:, :, t + 1:].abs().sum() == 0  # rows below t do not reach the context of row t
        assert grad[:, :, :t + 1].abs().sum() > 0


def test_info_nce_equals_hand_computed_value():
    torch.manual_seed(0)
    b, d, g = 2, 4, 3
    z = torch.randn(b, d, g, g)
    pred = torch.randn(b, d, g - 1, g)  # one step: rows 0..g-2 predict rows 1..g-1
    bank = z.permute(0, 2, 3, 1).reshape(-1, d)
    total, n = 0.0, 0
    for i in range(b):
        for r in range(g - 1):
            for c in range(g):
                logits = bank @ pred[i, :, r, c]
                target = i * g * g + (r + 1) * g + c
                total += -(logits[target] - torch.logsumexp(logits, 0)).item()
                n += 1
    assert cpc_info_nce([pred], z)["cpc_loss"].item() == pytest.approx(total / n, rel=1e-5)


def test_step_trains_encoder_context_and_predictors():
    m = CPCV2(BackboneConfig("tiny_cnn", width=4, norm="layer"), views=ViewConfig(scale=(0.6, 1.0)), patch=8, stride=4,
              steps=2, context_dim=16, context_layers=1)
    out = m.step(m.view_policy(torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)))
    assert out["cpc_loss"].item() == pytest.approx(math.log(3 * 9), abs=1.0)  # near chance at init: 27 patches
    out["cpc_loss"].backward()
    for part in (m.backbone, m.context, m.predictors):
        assert all(p.grad is not None for p in part.parameters())
    with pytest.raises(ValueError, match="lower steps"):
        CPCV2(BackboneConfig("tiny_cnn", width=4), steps=3, context_dim=8).predict(torch.zeros(1, 32, 3, 3))


def test_encoder_pools_patch_features_for_evaluation():
    m = CPCV2(BackboneConfig("tiny_cnn", width=4, norm="layer"), patch=8, stride=4, context_dim=8, context_layers=1)
    enc = m.encoder().eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    grid = patch_grid((x.float() / 255 - enc.mean) / enc.std, 8, 4).view(2 * 9, 3, 8, 8)
    assert torch.allclose(enc(x), m.backbone.eval()(grid).view(2, 9, -1).mean(1), atol=1e-6)


def test_layer_norm_backbone_has_no_batch_statistics():
    m = CPCV2(BackboneConfig("tiny_cnn", width=4, norm="layer"), context_dim=8, context_layers=1)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.backbone.modules())
    with pytest.raises(ValueError, match="'batch' or 'layer'"):
        CPCV2(BackboneConfig("tiny_cnn", norm="instance"))


def test_cpc_beats_random_init_on_digits():
    import pytorch_lightning as pl

    from conftest import DIGITS_MEAN, DIGITS_STD, knn_before_and_after
    from ssl_toolkit.methods import OptimConfig

    pl.seed_everything(0)
    views = ViewConfig(scale=(0.3, 1.0), flip_p=0.0, hue=0.0, saturation=0.0, gray_p=0.0, mean=DIGITS_MEAN,
                       std=DIGITS_STD)
    m = CPCV2(BackboneConfig("tiny_cnn", width=16, norm="layer"), views=views, patch=8, stride=4, steps=1,
              context_dim=64, context_layers=2, optim=OptimConfig("adamw", lr=2e-3, weight_decay=1e-4, warmup_epochs=2))
    init, trained = knn_before_and_after(m, epochs=20, image_size=16)
    # Measured on 2 CPU cores, 16 px digits, 3x3 grid of 8 px patches, 20 epochs (16 s): seeds 0-3 90.37 -> 94.63,
    # 88.89 -> 95.37, 91.67 -> 94.26, 87.22 -> 91.67 (+2.6 to +6.5 points). 95.56% after 40 epochs (seed 0, earlier).
    assert trained - init >= 2.0 and trained >= 91.0, (init, trained)
