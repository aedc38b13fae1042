import math

import kornia
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from ssl_toolkit.views import ContrastiveViews, ViewConfig
from ssl_toolkit.views import functional as VF


def batch(b=8, size=32):
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8)


def test_each_image_and_each_view_gets_its_own_parameters():
    policy = ContrastiveViews(ViewConfig(blur_p=0.5, solarize_p=0.5), num_views=2)
    p = policy.sample(batch=8, height=32, width=32)
    boxes, jitter = p.boxes.view(2, 8, 4), p.jitter.view(2, 8, 4)
    assert not torch.equal(boxes[0, 0], boxes[0, 1])  # two images of one batch
    assert not torch.equal(boxes[0, 0], boxes[1, 0])  # two views of one image
    active = (jitter[0] != torch.tensor([1.0, 1, 1, 0])).all(1)  # images with jitter applied in view 0
    assert active.sum() >= 2 and len(set(jitter[0][active][:, 0].tolist())) == int(active.sum())
    assert len({tuple(o.tolist()) for o in p.order}) > 1  # jitter order is drawn per image
    x = batch()
    x[1] = x[0]  # same pixels: only the parameters can make the outputs differ
    v = policy(x)
    assert not torch.allclose(v.crops[0][0], v.crops[0][1]) and not torch.allclose(v.crops[0][0], v.crops[1][0])


def test_crop_boxes_follow_torchvision_rule():
    boxes = VF.sample_crop_boxes(20000, 32, 32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    x0, y0, w, h = boxes.unbind(1)
    assert torch.all(x0 >= 0) and torch.all(y0 >= 0) and torch.all(x0 + w <= 32) and torch.all(y0 + h <= 32)
    assert torch.equal(boxes, boxes.round())
    area = w * h / 1024
    assert area.min() >= 0.06 and area.max() <= 1.0
    assert 0.45 < area.mean() < 0.6  # rounding and rejection move the mean of U(0.08, 1) slightly


def test_crop_falls_back_to_center_when_nothing_fits():
    boxes = VF.sample_crop_boxes(4, 10, 40, scale=(0.9, 1.0), ratio=(1.0, 1.0))  # a square of 90% area never fits
    assert torch.equal(boxes, torch.tensor([[15.0, 0.0, 10.0, 10.0]] * 4))


def test_resized_crop_matches_torchvision_and_flips():
    x = torch.rand(2, 3, 32, 32)
    boxes = torch.tensor([[4.0, 6.0, 16.0, 20.0], [0.0, 0.0, 32.0, 32.0]])
    out = VF.resized_crop(x, boxes, 24)
    for i, (x0, y0, w, h) in enumerate(boxes.int().tolist()):
        ref = TF.resized_crop(x[i], y0, x0, h, w, [24, 24], antialias=False)
        assert torch.allclose(out[i][:, 1:-1, 1:-1], ref[:, 1:-1, 1:-1], atol=1e-5)  # borders see real neighbours
        if w == 32:
            assert torch.allclose(out[i], ref, atol=1e-5)
    flipped = VF.resized_crop(x, boxes, 24, flip=torch.tensor([True, False]))
    assert torch.allclose(flipped[0], out[0].flip(-1), atol=1e-5) and torch.allclose(flipped[1], out[1])


def test_identity_box_returns_the_image():
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(VF.resized_crop(x, torch.tensor([[0.0, 0, 16, 16]] * 3), 16), x, atol=1e-6)


def test_color_jitter_matches_torchvision_in_each_images_order():
    x = torch.rand(4, 3, 8, 8)
    f = torch.tensor([[0.6, 1.3, 0.7, 0.1], [1.2, 0.8, 1.4, -0.2], [1.0, 1.0, 1.0, 0.0], [0.9, 1.1, 0.5, 0.45]])
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 0, 3, 2], [2, 3, 0, 1]])
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for active in (None, (True,) * 4):  # read from the factors, or given by the policy (no device sync)
        out = VF.color_jitter(x, f, order, active=active)
        for i in range(4):
            ref = x[i]
            for op in order[i].tolist():
                ref = ops[op](ref, float(f[i, op]))
            assert torch.allclose(out[i], ref, atol=1e-4), (active, i)
    for only in range(4):  # one op with strength, the others at identity: the other branches are skipped
        g = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(4, 1)
        g[:, only] = f[:, only]
        active = tuple(op == only for op in range(4))
        ref = torch.stack([ops[only](x[i], float(g[i, only])) for i in range(4)])
        assert torch.allclose(VF.color_jitter(x, g, order, active=active), ref, atol=1e-4), only


def test_grayscale_blur_solarize_apply_only_where_drawn():
    x = torch.rand(2, 3, 8, 8)
    g = VF.random_grayscale(x, torch.tensor([True, False]))
    assert torch.allclose(g[0, 0], g[0, 1]) and torch.equal(g[1], x[1])
    b = VF.random_blur(x, torch.tensor([0.0, 1.5]), 3)
    assert torch.equal(b[0], x[0]) and not torch.allclose(b[1], x[1])
    ref = kornia.filters.gaussian_blur2d(x[1:], (3, 3), (1.5, 1.5), border_type="reflect")  # what it replaces
    assert torch.allclose(b[1:], ref, atol=1e-6)
    s = VF.random_solarize(x, torch.tensor([True, False]))
    assert torch.allclose(s[0], torch.where(x[0] >= 0.5, 1 - x[0], x[0])) and torch.equal(s[1], x[1])


def test_views_are_normalised_with_the_config_stats():
    cfg = ViewConfig(crop_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0, jitter_p=0, gray_p=0,
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = batch(2, 16)
    v = ContrastiveViews(cfg)(x)
    assert torch.allclose(v.crops[0], (x.float() / 255 - 0.5) / 0.5, atol=1e-5)


def test_bad_view_settings_say_the_fix():
    with pytest.raises(ValueError, match=r"views.flip_p is a probability"):
        ViewConfig(flip_p=1.5)
    with pytest.raises(ValueError, match=r"views.scale"):
        ViewConfig(scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="uint8"):
        ContrastiveViews()(torch.rand(2, 3, 32, 32))


@pytest.mark.cuda
def test_views_run_on_the_gpu():
    v = ContrastiveViews()(batch().cuda())
    assert v.crops[0].is_cuda and not math.isnan(v.crops[0].sum().item())


@pytest.mark.cuda
def test_views_on_the_gpu_never_wait_for_it():
    """Every op of the policies with every augmentation on (blur and solarization too), eager, on a GPU: no host sync
    (``set_sync_debug_mode("error")`` raises on any). The CPU counterpart, step_audit's ``HostReads`` over each
    recipe's whole step, is in test_benchmarks."""
    from ssl_toolkit.views.multicrop import MultiCropViews

    every = ViewConfig(blur_p=0.5, solarize_p=0.2)
    policies = [ContrastiveViews(every, num_views=2).cuda(),
                MultiCropViews([every] * 2, ViewConfig(crop_size=16, blur_p=0.5), num_local=4).cuda()]
    x = batch(64).cuda()
    for policy in policies:
        policy(x)  # first call outside the check: kernels load, the allocator fills its cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = [policy(x) for policy in policies]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [len(v.crops) for v in out] == [2, 6]
