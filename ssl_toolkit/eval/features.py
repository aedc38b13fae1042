"""Frozen-feature extraction shared by the evaluators."""

import itertools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING

import torch
from torch import nn

from ssl_toolkit.distributed import broadcast_buffers, gather_uneven, rank, world_size
from ssl_toolkit.progress import Progress

if TYPE_CHECKING:  # only an annotation here; the module imports Lightning, which an evaluation's --help need not
    from ssl_toolkit.data.base import InMemoryDataModule


EVAL_PRECISIONS = ("auto", "bf16", "fp32")
_precision: ContextVar[str] = ContextVar("ssl_toolkit_eval_precision", default="auto")


def set_eval_precision(precision: str) -> Token:
    """Make ``precision`` the evaluators' forward-pass precision in the current context (see :func:`eval_precision`);
    returns the token that ``ContextVar.reset`` takes."""
    if precision not in EVAL_PRECISIONS:
        raise ValueError(f"Unknown evaluation precision {precision!r}; use one of {', '.join(EVAL_PRECISIONS)}.")
    return _precision.set(precision)


@contextmanager
def eval_precision(precision: str) -> Iterator[None]:
    """Inside the block every evaluator (feature extraction, probes, retrieval, search) runs the model in
    ``precision``: ``auto`` (the default: bf16 autocast on CUDA, fp32 elsewhere), ``bf16`` (autocast on any device)
    or ``fp32`` (no autocast, e.g. to report numbers as fp32 evaluators do).

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> with eval_precision("bf16"), evaluating(lin, "cpu"):
        ...     lin(torch.randn(1, 4)).dtype
        torch.bfloat16
    """
    token = set_eval_precision(precision)
    try:
        yield
    finally:
        _precision.reset(token)


@contextmanager
def eager() -> Iterator[None]:
    """Run compiled modules eagerly inside this block (``torch.compiler.set_stance("force_eager")``).

    Until something is compiled (``torch.compile``, ``nn.Module.compile``), TorchDynamo is not imported and there
    is nothing to run eagerly: the block then leaves it unimported (2.2 s of ``search``'s 6.4 s on 2 CPU cores)."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6
    if set_stance is None or "torch._dynamo" not in sys.modules:
        yield
        return
    with set_stance("force_eager"):
        yield


@contextmanager
def evaluating(model: nn.Module, device: torch.device | str) -> Iterator[None]:
    """Eval mode (restored afterwards), the :func:`eval_precision` in force (by default bf16 autocast on CUDA), and
    compiled modules run eagerly (:func:`eager`): how every evaluator runs a model."""
    was_training = model.training
    model.eval()
    try:
        with in_eval_precision(device):
            yield
    finally:
        model.train(was_training)


@contextmanager
def in_eval_precision(device: torch.device | str) -> Iterator[None]:
    """The :func:`eval_precision` in force (by default bf16 autocast on CUDA) and compiled modules run eagerly, in
    the model's own mode: :func:`evaluating` without eval mode, for an evaluator that trains the backbone
    (fine-tuning)."""
    device = torch.device(device)
    precision = _precision.get()
    bf16 = device.type == "cuda" if precision == "auto" else precision == "bf16"
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16), eager():
        yield


@contextmanager
def own_rng(seed: int, device: torch.device | str) -> Iterator[None]:
    """Inside the block, random draws on the CPU and on ``device`` come from generators seeded with ``seed``; after
    it, the caller's streams continue where they were.

    ``torch.manual_seed`` would also reseed every GPU's generator, which ``fork_rng(devices=[])`` does not restore:
    an evaluator that used it during training would reset the stream the GPU view policy draws from (every
    ``seed_everything`` value would then make the same views, and a resumed run would not continue its own).
    """
    device = torch.device(device)
    gpus = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):
        torch.default_generator.manual_seed(seed)
        for index in gpus:
            with torch.cuda.device(index):
                torch.cuda.manual_seed(seed)
        yield


@torch.no_grad()
def extract_features(encoder: nn.Module, datamodule: "InMemoryDataModule", split: str,
                     device: torch.device | str = "cpu", batch_size: int = 512,
                     max_batches: int | None = None, across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` (in eval mode, no augmentation) over a split: ``(N, D)`` float32 features and labels.

    The encoder is moved to ``device`` (its normalisation buffers too) and its train/eval mode is restored
    afterwards. On CUDA the forward runs in bf16 autocast, unless :func:`eval_precision` says otherwise.
    ``max_batches`` and ``across_ranks``: as in :func:`encode_split`.
    """
    encoder = encoder.to(device)
    return encode_split(encoder, encoder, datamodule, split, device, batch_size, max_batches, across_ranks)


@torch.no_grad()
def encode_split(embed: Callable[[torch.Tensor], torch.Tensor], model: nn.Module, datamodule: "InMemoryDataModule",
                 split: str, device: torch.device | str = "cpu", batch_size: int = 512, max_batches: int | None = None,
                 across_ranks: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``embed`` (``model`` or one of its methods, ``model`` on ``device``) over a split's images as
    :func:`evaluating` runs it: ``(N, D)`` float32 outputs and the labels, in ``iter_split`` order.

    ``max_batches``: only the split's first this many batches (None: all of it).

    ``across_ranks`` (the callbacks, under DDP): every rank must call it, since it runs collectives. Each rank
    encodes a contiguous share of the batches and gets the whole split's outputs back, in order, for 1/world of
    the work. Rank 0's buffers (batch-norm statistics) go to every rank first, so all shares come from one model.
    With fewer batches than ranks each rank encodes them all.
    """
    batches = itertools.islice(datamodule.iter_split(split, batch_size, device), max_batches)
    share = None
    if across_ranks and world_size() > 1:
        broadcast_buffers(model)
        n = -(-datamodule.split_size(split) // batch_size)  # batches of the split
        n = n if max_batches is None else min(n, max_batches)
        if n >= world_size():
            share = slice(rank() * n // world_size(), (rank() + 1) * n // world_size())
            batches = datamodule.iter_split(split, batch_size, device, batches=share)
    out, labels, done = [], [], 0
    report = Progress(lambda: _images_in(datamodule, split, batch_size, max_batches, share), "images encoded", split)
    with evaluating(model, device):
        for x, y in batches:
            out.append(embed(x).float())
            labels.append(y)
            done += len(y)
            report(done)
    out, labels = torch.cat(out), torch.cat(labels)
    if share is not None:
        out, labels = gather_uneven(out), gather_uneven(labels)
    return out, labels


def _images_in(datamodule, split: str, batch_size: int, max_batches: int | None, share: slice | None) -> int:
    """How many images :func:`encode_split` encodes on this rank (its total for :class:`Progress`)."""
    size = datamodule.split_size(split)
    first, end = (0, max_batches) if share is None else (share.start, share.stop)
    return min(size, end * batch_size if end is not None else size) - first * batch_size
