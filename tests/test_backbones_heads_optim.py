import pytest
import torch
from torch import nn

from ssl_toolkit.backbones import BackboneConfig, Encoder, build_backbone
from ssl_toolkit.eval import KNNCallback
from ssl_toolkit.heads import ColorizationHead, ConvDecoder, DINOHead, mlp, projection_head
from ssl_toolkit.methods import CLIP, DINO, Jigsaw, OptimConfig
from ssl_toolkit.methods.cpc import ContextNetwork
from ssl_toolkit.optim import LARS, cosine_schedule, param_groups
from ssl_toolkit.views import PatchGridViews
from ssl_toolkit.views.pretext import JigsawViews, hamming_permutations


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048), ("tiny_cnn", 64)])
def test_backbone_dims(name, dim):
    net, d = build_backbone(name, cifar_stem=True, width=8)
    assert d == dim
    assert net(torch.zeros(2, 3, 32, 32)).shape == (2, dim)


def test_cifar_stem_is_3x3_without_maxpool():
    net, _ = build_backbone("resnet18", cifar_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.maxpool, nn.Identity)
    plain, _ = build_backbone("resnet18")
    assert plain.conv1.kernel_size == (7, 7) and isinstance(plain.maxpool, nn.MaxPool2d)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, vit_tiny, vit_small, tiny_cnn"):
        build_backbone("vgg")


def test_encoder_normalises_uint8_like_training():
    net, _ = build_backbone("tiny_cnn", width=4)
    enc = Encoder(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(enc(x), net.eval()((x.float() / 255 - 0.5) / 0.25))


def test_encoder_refuses_images_it_would_misread_with_the_fix():
    """The Python API takes uint8 images or float ones in [0, 1]. A float image in 0-255 (``read_image(f).float()``)
    or one normalised already gave features far from the right ones without a word, and channels-last images
    (numpy's layout) torch's "The size of tensor a (32) must match the size of tensor b (3)"."""
    net, _ = build_backbone("tiny_cnn", width=4)
    enc = Encoder(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)).eval()
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(enc(x.float() / 255), enc(x))
    for bad in (x.float(), (x.float() / 255 - 0.5) / 0.25):
        with pytest.raises(ValueError, match=r"Float images must be RGB in \[0, 1\]; these range from .* Divide 0-255 "
                                             "values by 255 .*do not normalise them"):
            enc(bad)
    assert enc(x.float(), check_range=False).shape == (2, 32)  # the augmented probe's crops: no device sync
    with pytest.raises(ValueError, match=r"got shape \(2, 16, 16, 3\) \(channels last: pass images.permute\(0, 3, 1, "
                                         r"2\)\)"):
        enc(x.permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match=r"got shape \(3, 16, 16\) \(one image: pass images\[None\]\)"):
        enc(x[0])
    with pytest.raises(ValueError, match="got torch.int64. Pass images.to"):
        enc(x.long())
    grey = x[:, :1]
    assert torch.allclose(enc(grey), enc(grey.expand(-1, 3, -1, -1)))  # grey as RGB


def test_heads_from_one_builder():
    head = projection_head(512, 1024, 128)
    assert [type(m) for m in head] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert head(torch.randn(4, 512)).shape == (4, 128)
    assert len([m for m in mlp(8, 16, 4, num_layers=3) if isinstance(m, nn.Linear)]) == 3


def test_cosine_schedule_values():
    s = cosine_schedule(1.0, 0.1, total_steps=12, warmup_steps=2)
    assert len(s) == 12
    assert s[0] == 0 and s[1] == pytest.approx(0.5) and s[2] == pytest.approx(1.0)
    assert s[-1] == pytest.approx(0.1 + 0.45 * (1 + torch.cos(torch.tensor(torch.pi * 9 / 10)).item()), rel=1e-5)
    assert torch.all(s[2:-1] >= s[3:])


def test_weight_decay_only_on_matrices():
    groups = param_groups(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), weight_decay=0.1)
    assert [p.ndim for p in groups[0]["params"]] == [2]
    assert sorted(p.ndim for p in groups[1]["params"]) == [1, 1, 1] and groups[1]["weight_decay"] == 0
    every = param_groups(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), weight_decay=0.1, decay_norm_and_bias=True)
    assert [g["weight_decay"] for g in every] == [0.1, 0.1] and every[1]["lars_exclude"]


def test_optim_config_can_decay_norm_and_bias_as_lightly_does():
    from types import SimpleNamespace

    from ssl_toolkit.methods import SimCLR
    from ssl_toolkit.methods.base import OptimConfig

    def groups(**optim):
        m = SimCLR(BackboneConfig("tiny_cnn", width=4), optim=OptimConfig("lars", lr=0.1, weight_decay=1e-4, **optim))
        # what configure_optimizers reads from its trainer
        m._trainer = SimpleNamespace(estimated_stepping_batches=10, train_dataloader=[], num_training_batches=5,
                                     accumulate_grad_batches=1, gradient_clip_val=None)
        return [(g["weight_decay"], g["lars_exclude"]) for g in m.configure_optimizers()["optimizer"].param_groups]

    assert groups() == [(1e-4, False), (0.0, True)]
    assert groups(decay_norm_and_bias=True) == [(1e-4, False), (1e-4, True)]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_takes_the_same_steps_as_the_multi_tensor_one(name):
    from ssl_toolkit.methods.base import OptimConfig
    from ssl_toolkit.optim import make_optimizer

    config = OptimConfig(name, lr=0.05, weight_decay=1e-3)

    def train(fused):
        torch.manual_seed(0)
        # no bias before the BN: its true gradient is 0, and Adam would amplify the two kernels' rounding of it
        net = nn.Sequential(nn.Linear(6, 8, bias=False), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        opt = make_optimizer(net, config, fused=fused)
        for _ in range(5):
            loss = net(torch.randn(16, 6)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return opt, [p.detach() for p in net.parameters()]

    fused_opt, fused_params = train(None)  # the default on the CPU: fused
    loop_opt, loop_params = train(False)
    assert fused_opt.defaults["fused"] and not loop_opt.defaults["fused"]
    assert [g["weight_decay"] for g in fused_opt.param_groups] == [1e-3, 0.0]  # the same two groups
    for a, b in zip(fused_params, loop_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_lars_step_matches_formula():
    w = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    b = nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([0.5])
    opt = LARS([{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars_exclude": True}],
               lr=0.5, eta=0.01)
    d = torch.tensor([[0.6, 0.8]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * (0.01 * 5.0 / d.norm()) * d
    opt.step()
    assert torch.allclose(w, expected_w) and torch.allclose(b, torch.tensor([0.75]))


def _lars_reference(params, grads, bufs, lr, momentum, wd, eta, exclude):
    """LARS written per tensor, as in the paper: the multi-tensor step must equal it."""
    for p, g, buf in zip(params, grads, bufs):
        d = g + wd * p
        if not exclude and p.norm() > 0 and d.norm() > 0:
            d = d * (eta * p.norm() / d.norm())
        buf.mul_(momentum).add_(d)
        p.sub_(lr * buf)


def test_lars_multi_tensor_step_equals_the_per_tensor_rule_over_steps():
    torch.manual_seed(0)
    shapes = [(8, 4, 3, 3), (16, 8), (5,), (3, 3)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    with torch.no_grad():
        params[3].zero_()  # zero weights: the trust ratio falls back to 1
    ref = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in ref]
    opt = LARS([{"params": params[:2] + params[3:], "weight_decay": 1e-2},
                {"params": [params[2]], "weight_decay": 0.0, "lars_exclude": True}], lr=0.3, momentum=0.9, eta=0.02)
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        if step == 2:
            params[1].grad = None  # a parameter without a gradient this step is left alone
        opt.step()
        live = [i for i in range(4) if params[i].grad is not None]
        for exclude, wd, idx in ((False, 1e-2, [i for i in live if i != 2]), (True, 0.0, [i for i in live if i == 2])):
            _lars_reference([ref[i] for i in idx], [grads[i] for i in idx], [bufs[i] for i in idx],
                            0.3, 0.9, wd, 0.02, exclude)
        for p, r in zip(params, ref):
            assert torch.allclose(p.detach(), r, atol=1e-6), step


@pytest.mark.parametrize("make,message", [
    # a cosine "decay" that rose all run, and momentum or betas that diverge, were accepted
    (lambda: OptimConfig("adamw", lr=0.003, min_lr=1.0), "Set optim.min_lr 1.0 (needs >= 0 and <= optim.lr 0.003)."),
    (lambda: OptimConfig("sgd", momentum=2.0), "Set optim.momentum 2.0 (needs in [0, 1))."),
    (lambda: OptimConfig("adamw", betas=(1.5, 0.9)), "Set optim.betas [1.5, 0.9] (needs two values in [0, 1))."),
    (lambda: OptimConfig("sgd", lr=0.0, weight_decay=-1.0), "Set optim.lr 0.0 (needs > 0), optim.weight_decay -1.0"),
    # an IndexError in the first step (hidden 0), or a head with no output that trained on nothing (output 0)
    (lambda: mlp(8, 0, 4), "A head's widths must be >= 1; got hidden 0, output 4."),
    (lambda: projection_head(8, 16, 0), "A head's widths must be >= 1; got hidden 16, output 0."),
    (lambda: DINOHead(8, out_dim=0), "DINO's out_dim (prototypes) must be >= 1; got 0."),  # "cannot reshape"
    (lambda: ColorizationHead(8, 10, width=0), "head_width must be >= 1; got 0."),  # conv weight of size [0, ...]
    (lambda: ContextNetwork(8, hidden=0), "context_dim >= 1 and context_layers >= 0; got 0, 3."),
    (lambda: PatchGridViews(patch=40, stride=4)(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)),
     "CPC's patch of 40 px is larger than the 32x32 images"),  # "maximum size for tensor at dimension 2 is 32"
    (lambda: hamming_permutations(1, n=4), "num_permutations must be in [2, 24]"),  # one class: nothing to learn
])
def test_settings_that_cannot_train_are_refused_with_the_setting_named(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value), str(e.value)


@pytest.mark.parametrize("make,message", [
    (lambda: JigsawViews(grid=0), "A jigsaw grid needs at least 2x2 tiles; got grid 0."),  # ZeroDivisionError
    (lambda: JigsawViews(grid=1), "A jigsaw grid needs at least 2x2 tiles; got grid 1."),  # "not a multiple of 1"
    (lambda: Jigsaw(BackboneConfig("tiny_cnn", width=4), tile_dim=0), "jigsaw tile_dim must be >= 1; got 0."),
    (lambda: ConvDecoder(8, 32, width=0), "decoder_width must be >= 1; got 0."),
    (lambda: CLIP(BackboneConfig("tiny_cnn", width=4), embed_dim=0), "CLIP's embed_dim (the joint space) must be >= 1"),
    (lambda: KNNCallback(temperature=0.0), "KNNCallback needs k values >= 1 and a finite temperature > 0; got [20, 200], 0.0."),
    (lambda: DINO(BackboneConfig("tiny_cnn", width=4), warmup_teacher_temp_epochs=-1),  # torch: "number of steps
     "DINO got warmup_teacher_temp_epochs -1: epochs must be >= 0"),  # must be non-negative" in the first step
    (lambda: DINO(BackboneConfig("tiny_cnn", width=4), local_scale=(0.5, 0.1), local_blur_p=2.0),  # was views.scale
     "DINO got local_scale [0.5, 0.1], local_blur_p 2.0:"),
])
def test_method_settings_that_cannot_train_are_refused_with_the_setting_named(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value), str(e.value)
