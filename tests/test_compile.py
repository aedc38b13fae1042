import inspect

import pytest
import pytorch_lightning as pl
import torch

from ssl_toolkit import Compile
from ssl_toolkit.backbones import BackboneConfig, TextConfig
from ssl_toolkit.data import DigitsDataModule
from ssl_toolkit.methods import CLIP, CPCV2, DINO, Colorization, Inpainting, Jigsaw, MoCoV2, Rotation, SimCLR
from ssl_toolkit.views import ViewConfig

METHODS = [SimCLR, MoCoV2, DINO, CPCV2, CLIP, Rotation, Jigsaw, Inpainting, Colorization]


@pytest.mark.parametrize("cls", METHODS, ids=lambda c: c.__name__)
def test_every_view_policy_traces_as_one_graph_without_host_syncs(cls):
    """A host read (``.item()``, ``bool(tensor)``, ``nonzero``) inside a policy breaks the graph; there is none."""
    views = inspect.signature(cls).parameters["views"].default
    extra = {"text": TextConfig(vocab_size=64, context_length=8, width=16, layers=1, heads=2)} if cls is CLIP else {}
    m = cls(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(**{**views.__dict__, "crop_size": 30 if cls is Jigsaw else 32}),
            **extra)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    torch._dynamo.reset()
    report = torch._dynamo.explain(m.view_policy)(images)
    assert report.graph_break_count == 0, report.break_reasons
    assert report.graph_count == 1


def _simclr():
    return SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=32, proj_out_dim=16)


def _train(callbacks, steps=3, model=_simclr):
    torch.manual_seed(0)
    m = model()
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", callbacks=callbacks)
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=32))
    return m


def test_compiled_training_equals_eager_and_keeps_checkpoint_keys():
    torch._dynamo.reset()
    eager = _train([])
    compiled = _train([Compile(["views", "backbone"], backend="eager", cpu=True)])  # traced by dynamo, run eagerly
    assert compiled.backbone._compiled_call_impl is not None and compiled.view_policy._compiled_call_impl is not None
    a, b = eager.state_dict(), compiled.state_dict()
    assert list(a) == list(b)  # compiled in place: a checkpoint loads into an uncompiled model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compiling_the_backbone_compiles_its_ema_copy_and_training_stays_exact():
    """MoCo's key encoder (split batch norm, its buffers updated in place) through AOTAutograd, Inductor's front end:
    the weights, running statistics and queue after 3 steps equal eager training's."""
    def moco():
        return MoCoV2(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), queue_size=64, bn_splits=4)

    torch._dynamo.reset()
    eager = _train([], model=moco)
    compiled = _train([Compile(["views", "backbone"], backend="aot_eager", cpu=True)], model=moco)
    assert compiled.key_backbone._compiled_call_impl is not None and compiled.backbone._compiled_call_impl is not None
    a, b = eager.state_dict(), compiled.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["key_backbone.1.running_mean"], torch.zeros_like(a["key_backbone.1.running_mean"]))


def test_compile_is_skipped_on_the_cpu_unless_asked_and_checks_its_parts():
    m = _train([Compile()], steps=1)
    assert m.backbone._compiled_call_impl is None and m.view_policy._compiled_call_impl is None
    with pytest.raises(ValueError, match="views, backbone"):
        Compile(["head"])


@pytest.mark.cuda
def test_compiled_views_match_eager_views_on_the_gpu():
    m = SimCLR(BackboneConfig("resnet18", cifar_stem=True)).cuda()
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device="cuda")
    policy = m.view_policy
    params = policy.sample(64, 32, 32, "cuda")
    eager = policy.render(images, params)
    compiled = torch.compile(policy.render)(images, params)
    assert torch.allclose(eager, compiled, atol=1e-4)


def test_evaluators_run_a_compiled_module_eagerly():
    """Evaluators' batch shapes and eval-mode BatchNorm would each cost a recompile; under ``evaluating`` a compiled
    module runs eagerly (``eager`` skips ``set_stance`` only while nothing has been compiled)."""
    from ssl_toolkit.eval.features import evaluating

    class Net(torch.nn.Module):  # its own forward: torch 2.11 does not trace an nn.Sequential of built-in layers
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(self.fc(x))

    def compiled(graphs):
        torch._dynamo.reset()
        net = Net()
        net.compile(backend=lambda gm, example_inputs: graphs.append(gm) or gm.forward)
        net(torch.randn(5, 4))  # training: traced once
        assert len(graphs) == 1
        return net

    graphs = []
    net = compiled(graphs)
    with evaluating(net, "cpu"):
        out = net(torch.randn(3, 4))  # eval mode, another batch size
    assert len(graphs) == 1 and out.shape == (3, 4) and net.training
    graphs = []
    net = compiled(graphs).eval()
    net(torch.randn(3, 4))  # the same call outside `evaluating`: a second graph
    assert len(graphs) == 2
