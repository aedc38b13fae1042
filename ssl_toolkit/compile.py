"""``torch.compile`` for training: the view policy's small kernels fused, the backbone optionally too.

A view policy is a few hundred small elementwise kernels over the batch (crop sampling, four colour-jitter
slots with a hue shift each, grayscale, normalisation); eagerly each is a launch and a round trip through
memory. Compiled, Inductor fuses them into a handful of kernels. Measured on an H100 (resnet18, CIFAR
stem, batch 512, bf16, channels_last; benchmarks/results/throughput-simclr-cuda*.json): SimCLR's views went
from 11.8 ms to 0.6 ms per step and the full step from 0.67x to 0.97x of the backbone-only ceiling;
compiling the backbone as well raised the full step from 16.8k to 29.6k images/s.

Evaluators (kNN, probes, pictures) run the same modules eagerly (``ssl_toolkit.eval.features.eager``): their
batch shapes and eval-mode BatchNorm would otherwise each cost a recompile for a pass that runs once.
"""

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

PARTS = ("views", "backbone")


def check_parts(parts: list[str]) -> None:
    """Raise unless ``parts`` is a non-empty list of :data:`PARTS`, saying which ones there are."""
    if not parts or any(p not in PARTS for p in parts):
        raise ValueError(f"Compile parts must be a non-empty list of {', '.join(PARTS)}; got {parts}.")


def compile_parts(pl_module, parts: list[str], mode: str | None = None, backend: str = "inductor") -> list[str]:
    """Compile a method's ``views`` (view policy) and/or ``backbone`` in place; returns the attributes compiled.

    ``backbone`` includes the backbone's EMA copies (MoCo's key encoder, DINO's teacher: the targets of
    ``ema_pairs`` whose online module is the backbone). Their forward pass runs every step as well, and left eager
    it keeps the launch-bound kernels (and, with MoCo's ``bn_splits`` on channels_last input, two layout copies per
    batch norm) that compiling the backbone removes.

    Example:
        >>> from ssl_toolkit.backbones import BackboneConfig
        >>> from ssl_toolkit.methods import MoCoV2
        >>> compile_parts(MoCoV2(BackboneConfig("tiny_cnn", width=4)), ["views", "backbone"], backend="eager")
        ['view_policy', 'backbone', 'key_backbone']
    """
    check_parts(parts)
    names = []
    for part in parts:
        if part == "views":
            modules = [("view_policy", pl_module.view_policy)]
        else:
            targets = [target for online, target in pl_module.ema_pairs() if online is pl_module.backbone]
            modules = [("backbone", pl_module.backbone)] + [
                (name, child) for name, child in pl_module.named_children() if any(child is t for t in targets)]
        for name, module in modules:
            if module is None:
                raise ValueError(f"Compile: {type(pl_module).__name__} has no {part} to compile.")
            module.compile(mode=mode, backend=backend)
            names.append(name)
    return names


class Compile(pl.Callback):
    """Compile parts of the method with ``torch.compile`` when training starts.

    The modules are compiled in place (``nn.Module.compile``), so checkpoints and state-dict keys are unchanged
    and a checkpoint loads into an uncompiled model. The first steps take the compile time (about 30-60 s for
    resnet18 and a view policy on an H100); later steps run the fused kernels.

    Args:
        parts: ``views`` (the GPU view policy) and/or ``backbone`` (with its EMA copies: see :func:`compile_parts`).
        mode: ``torch.compile`` mode: ``None`` (default), ``max-autotune-no-cudagraphs`` (longer compile, tuned
            kernels) or ``reduce-overhead`` (CUDA graphs).
        backend: ``torch.compile`` backend; ``eager`` only traces (a quick check that a policy compiles).
        cpu: Also compile when training on the CPU. Off by default: Inductor's CPU compile takes minutes, longer
            than the short runs the CPU is used for.
    """

    def __init__(self, parts: list[str] = list(PARTS), mode: str | None = None, backend: str = "inductor",  # noqa: B006
                 cpu: bool = False):
        check_parts(parts)  # at construction: a config error shows before training starts
        self.parts, self.mode, self.backend, self.cpu = list(parts), mode, backend, cpu

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if pl_module.device.type == "cpu" and not self.cpu:
            rank_zero_info("Compile: training on the CPU, running eagerly (pass cpu: true to compile anyway).")
            return
        names = compile_parts(pl_module, self.parts, self.mode, self.backend)
        rank_zero_info(f"Compile: {', '.join(names)} compiled ({self.backend}); the first steps include the "
                       "compile time.")
