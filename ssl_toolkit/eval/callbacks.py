"""Online evaluation during pretraining, as Lightning callbacks."""

import json
import math
import os
import warnings

import pytorch_lightning as pl
import torch

from ssl_toolkit.distributed import all_reduce_mean
from ssl_toolkit.eval.features import evaluating, extract_features, own_rng
from ssl_toolkit.eval.knn import knn_accuracy
from ssl_toolkit.eval.linear_probe import bn_linear, topk_accuracy
from ssl_toolkit.progress import reporting_progress


def is_due(trainer: pl.Trainer, every_n_epochs: int) -> bool:
    """True at the end of every ``every_n_epochs``-th epoch and of the run's last one: ``max_epochs``, or an epoch
    that ``max_steps``, ``max_time`` or early stopping ends the run in (a run they ended before its next due epoch
    was never scored: no final kNN line, no ``knn.json``). A signal that stops a job to resume it later ends the run
    before the epoch-end hooks, and evaluates nothing."""
    epoch = trainer.current_epoch + 1
    if epoch % every_n_epochs == 0 or (trainer.max_epochs is not None and epoch >= trainer.max_epochs):
        return True
    steps = trainer.max_steps
    return bool(trainer.should_stop) or (steps is not None and steps >= 0 and trainer.global_step >= steps)


class PeriodicEvaluation(pl.Callback):
    """Evaluate before training (the random-init baseline), every ``every_n_epochs`` epochs and after the last.

    A subclass implements :meth:`evaluate` (a dict of numbers), :meth:`metrics` (their logged names) and
    :meth:`report` (printed lines). At the end both results are printed and written to ``json_name`` in
    the run folder (only when the trainer has a logger, which gives the run a folder).

    Under ``--trainer.fast_dev_run N`` an evaluation reads only the first N batches of each split, as Lightning
    limits its own loops: the smoke test of a recipe checks the evaluation's code, not its number. Otherwise the
    CIFAR-10 recipes' kNN extracted all 60,000 images before the first step and again after it (resnet18 on 2 CPU
    cores: still running after 11 minutes).

    Args:
        every_n_epochs: Evaluate every this many epochs (raise it if evaluation time matters).
        baseline: Also evaluate the model at random init before training.
        batch_size: Images per forward pass during extraction.
    """

    json_name = "eval.json"
    needs_labels = False  # scores against class labels: off, with one warning, on data that has none

    def __init__(self, every_n_epochs: int = 1, baseline: bool = True, batch_size: int = 512):
        if every_n_epochs < 1 or batch_size < 1:
            raise ValueError(f"{type(self).__name__} needs every_n_epochs >= 1 and batch_size >= 1; got "
                             f"{every_n_epochs}, {batch_size}.")
        self.every_n_epochs, self.baseline, self.batch_size = every_n_epochs, baseline, batch_size
        self.results: dict[str, dict] = {}
        self.off = False

    def switch_off_without_labels(self, trainer: pl.Trainer) -> bool:
        """True, after one warning, when this evaluation needs class labels and the run's data has none (unlabelled
        images, captions): a recipe's monitors must not stop pretraining on such data."""
        dm = trainer.datamodule
        self.off = self.needs_labels and getattr(dm, "num_classes", 1) < 1
        if self.off and trainer.is_global_zero:
            message = (f"{type(self).__name__} is off for this run: {dm.name} has no class labels (an image folder "
                       "without train/ and val/ class folders, or image-caption data). Score the checkpoint "
                       "afterwards with `ssl-toolkit knn --ckpt CKPT --data LABELLED_DATA` (or `probe`).")
            warnings.warn(message, stacklevel=1)
        return self.off

    def max_batches(self, trainer: pl.Trainer) -> int | None:
        """Batches of each split an evaluation reads: N under ``fast_dev_run=N``, otherwise all (None)."""
        return int(trainer.fast_dev_run) or None

    def evaluate(self, trainer: pl.Trainer, pl_module) -> dict:
        raise NotImplementedError(f"{type(self).__name__} must implement evaluate().")

    def quietly_evaluate(self, trainer: pl.Trainer, pl_module) -> dict:
        """:meth:`evaluate` without progress lines: they would break into the training's progress bar."""
        with reporting_progress(False):
            return self.evaluate(trainer, pl_module)

    def metrics(self, result: dict, suffix: str = "") -> dict[str, float]:
        """Logged names and values of one result; ``suffix`` is ``_init`` for the baseline."""
        raise NotImplementedError(f"{type(self).__name__} must implement metrics().")

    def report(self, trainer: pl.Trainer) -> list[str]:
        """Lines printed at the end of training, from ``self.results``."""
        raise NotImplementedError(f"{type(self).__name__} must implement report().")

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.switch_off_without_labels(trainer):
            return
        # A resumed run starts from trained weights: its baseline comes from the checkpoint (state_dict), or, from a
        # checkpoint written before the results were saved there, is left out rather than measured on them.
        if self.baseline and "init" not in self.results and trainer.ckpt_path is None:
            self.results["init"] = self.quietly_evaluate(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(self.metrics(self.results["init"], "_init"), step=0)

    def state_dict(self) -> dict:
        return {"results": self.results}

    def load_state_dict(self, state_dict: dict) -> None:
        self.results = {name: dict(r) for name, r in state_dict.get("results", {}).items()}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.off or not is_due(trainer, self.every_n_epochs):
            return
        self.results["trained"] = result = self.quietly_evaluate(trainer, pl_module)
        # Every rank scores the whole evaluation set (each encoded a share of it), so the mean over ranks is the
        # same number; syncing it (one all-reduce an evaluation) is what Lightning asks for epoch-level metrics.
        pl_module.log_dict(self.metrics(result), prog_bar=False, sync_dist=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        # trainer.log_dir is a broadcast under DDP: every rank reads it before rank 0 alone goes on
        log_dir = trainer.log_dir if trainer.logger is not None else None  # without a logger: no run folder
        if self.off or "trained" not in self.results or not trainer.is_global_zero:
            return
        lines = self.report(trainer)
        if self.max_batches(trainer):
            lines.append(f"  (fast_dev_run: scored on the first {self.max_batches(trainer)} batch(es) of "
                         f"{self.batch_size} images of each split, not a result)")
        print("\n".join(lines))
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            with open(os.path.join(log_dir, self.json_name), "w") as f:
                json.dump({"epochs": trainer.current_epoch, **self.config(),
                           **{name: {str(k): v for k, v in r.items()} for name, r in self.results.items()}}, f, indent=2)

    def config(self) -> dict:
        """Settings written next to the results."""
        return {}


class KNNCallback(PeriodicEvaluation):
    """Weighted kNN top-1 of the frozen encoder on the datamodule's test split, logged as ``val/knn_top1``.

    The random-init baseline is ``val/knn_top1_init``. Features are extracted once per evaluation and
    searched once with the largest k; results go to ``knn.json``. Under DDP each rank encodes 1/world of the
    images and all ranks search the gathered features (:func:`~ssl_toolkit.eval.features.extract_features`).

    Args:
        every_n_epochs: Evaluate every this many epochs.
        k: Neighbours; the first value is the one logged as ``val/knn_top1``.
        temperature: Vote weight ``exp(s / T)``.
        baseline: Also evaluate the encoder at random init before training.
        batch_size: Images per forward pass during extraction.
    """

    json_name = "knn.json"
    needs_labels = True

    def __init__(self, every_n_epochs: int = 1, k: list[int] = [20, 200], temperature: float = 0.07,  # noqa: B006
                 baseline: bool = True, batch_size: int = 512):
        super().__init__(every_n_epochs, baseline, batch_size)
        if not k or min(k) < 1 or not 0 < temperature < math.inf:  # 0: refused by the baseline's search, not here
            raise ValueError(f"KNNCallback needs k values >= 1 and a finite temperature > 0; got {k}, {temperature}. "
                             "The InstDisc protocol uses k 200, T 0.07.")
        self.ks, self.temperature = list(k), temperature

    def evaluate(self, trainer: pl.Trainer, pl_module) -> dict[int, float]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "iter_split"):
            raise TypeError("KNNCallback needs a toolkit DataModule (with iter_split); pass one as data in the config.")
        encoder = pl_module.encoder()
        n = self.max_batches(trainer)
        train = extract_features(encoder, dm, "train", pl_module.device, self.batch_size, n, across_ranks=True)
        test = extract_features(encoder, dm, "test", pl_module.device, self.batch_size, n, across_ranks=True)
        return knn_accuracy(train[0], train[1], test[0], test[1], dm.num_classes, tuple(self.ks), self.temperature)

    def metrics(self, result: dict[int, float], suffix: str = "") -> dict[str, float]:
        first = min(self.ks[0], max(result))
        return {f"val/knn_top1{suffix}": result[first], **{f"val/knn_top1{suffix}_k{k}": v for k, v in result.items()}}

    def report(self, trainer: pl.Trainer) -> list[str]:
        init = self.results.get("init", {})
        lines = [f"kNN top-1 (T={self.temperature}) on {trainer.datamodule.name} test:"]
        for k in sorted(self.results["trained"]):
            before = f"random init {init[k]:.2f}% -> " if k in init else ""
            lines.append(f"  k={k:<4d} {before}trained {self.results['trained'][k]:.2f}%")
        scored = max(self.results["trained"])
        over = sorted(k for k in self.ks if k > scored)
        if over:  # its line read k=60 for the recipe's k=200 without a word
            lines.append(f"  (k={', '.join(map(str, over))}: more than the {scored:,} training images scored, so "
                         f"k={scored:,}: all of them vote)")
        return lines

    def config(self) -> dict:
        return {"temperature": self.temperature}


class OnlineProbe(PeriodicEvaluation):
    """A linear classifier trained alongside pretraining on the frozen encoder's features of each training batch.

    Every step the encoder (eval mode, no gradient: the probe never changes the backbone) embeds the batch's
    images as the evaluators see them, and the probe, a ``BatchNorm1d`` without affine parameters and a linear
    layer, takes one SGD step with its own optimizer. Its test top-1 is logged as ``val/online_probe_top1``
    every ``every_n_epochs`` epochs (results in ``online_probe.json``); the training loss and accuracy as
    ``train/online_probe_loss`` and ``train/online_probe_acc`` on the steps Lightning writes
    (``log_every_n_steps``). In DDP the probe's gradients are averaged over ranks, so every rank holds the same
    probe. The probe and its optimizer are saved with the checkpoint.

    Costs one extra forward of the backbone per step (no backward). For published numbers use the offline
    ``ssl-toolkit probe`` on the final checkpoint.

    Args:
        lr: SGD learning rate (momentum 0.9).
        weight_decay: L2 penalty of the probe.
        every_n_epochs: Score the probe on the test split every this many epochs.
        batch_size: Images per forward pass when scoring.
    """

    json_name = "online_probe.json"
    needs_labels = True

    def __init__(self, lr: float = 0.1, weight_decay: float = 0.0, every_n_epochs: int = 1, batch_size: int = 512):
        super().__init__(every_n_epochs, baseline=False, batch_size=batch_size)
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"OnlineProbe needs lr > 0 and weight_decay >= 0; got {lr}, {weight_decay}.")
        self.lr, self.weight_decay = lr, weight_decay
        self.probe: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending_state: dict | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "num_classes"):
            raise TypeError("OnlineProbe needs a toolkit DataModule (with num_classes); pass one as data in the config.")
        if self.switch_off_without_labels(trainer):
            return
        if getattr(dm, "batch_size", 2) < 2:  # was "Expected more than 1 value per channel" in the first step
            raise ValueError("OnlineProbe needs data.batch_size >= 2: its probe's batch norm trains on each training "
                             "batch; got 1.")
        self.encoder = pl_module.encoder()  # wraps the live backbone: it sees every update
        images, _ = next(dm.iter_split("test", 2, pl_module.device))
        with torch.no_grad(), evaluating(self.encoder, pl_module.device):
            dim = self.encoder(images).shape[1]
        with own_rng(0, pl_module.device):  # the probe's init must not shift the run's random streams
            self.probe = bn_linear(dim, dm.num_classes).to(pl_module.device)
        self.optimizer = torch.optim.SGD(self.probe.parameters(), lr=self.lr, momentum=0.9,
                                         weight_decay=self.weight_decay)
        if self._pending_state is not None:  # resumed: the probe and its optimizer continue where they were
            self._restore(self._pending_state)
            self._pending_state = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.off:
            return
        images, labels = pl_module.batch_images, batch[1]
        with torch.no_grad(), evaluating(self.encoder, pl_module.device):
            feats = self.encoder(images).float()  # (B, D), no gradient to the backbone
        self.probe.train()
        with torch.enable_grad():
            logits = self.probe(feats)
            loss = torch.nn.functional.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        for p in self.probe.parameters():
            if p.grad is not None:
                p.grad.copy_(all_reduce_mean(p.grad))
        self.optimizer.step()
        if pl_module.logs_this_step():  # as the method's own metrics: each log call is Python time
            pl_module.log_dict({"train/online_probe_loss": loss.detach(),
                                "train/online_probe_acc": (logits.argmax(1) == labels).float().mean()},
                               on_step=True, on_epoch=False)

    def evaluate(self, trainer: pl.Trainer, pl_module) -> dict[str, float]:
        test = extract_features(self.encoder, trainer.datamodule, "test", pl_module.device, self.batch_size,
                                self.max_batches(trainer), across_ranks=True)
        self.probe.eval()
        with torch.no_grad():
            acc = topk_accuracy(self.probe(test[0]), test[1].to(test[0].device))
        return {"top1": acc[1], "top5": acc[5]}

    def metrics(self, result: dict, suffix: str = "") -> dict[str, float]:
        return {"val/online_probe_top1": result["top1"], "val/online_probe_top5": result["top5"]}

    def report(self, trainer: pl.Trainer) -> list[str]:
        r = self.results["trained"]
        return [f"online linear probe on {trainer.datamodule.name} test: top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%"]

    def config(self) -> dict:
        return {"lr": self.lr, "weight_decay": self.weight_decay}

    def state_dict(self) -> dict:
        if self.probe is None:
            return super().state_dict()
        return {**super().state_dict(), "probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "probe" not in state_dict:
            return
        if self.probe is None:
            self._pending_state = state_dict  # applied when the probe is built at fit start
        else:
            self._restore(state_dict)

    def _restore(self, state: dict) -> None:
        self.probe.load_state_dict(state["probe"])
        self.optimizer.load_state_dict(state["optimizer"])


COLLAPSE_HINTS = {
    "train/z_std": "the embeddings of different images are nearly the same point",
    "train/teacher_mi": "the DINO teacher gives every image the same distribution",
}


class CollapseMonitor(pl.Callback):
    """Warn (logged and printed) when a collapse diagnostic falls below its threshold at the end of an epoch.

    Reads the last logged value of each key: ``train/z_std`` (SimCLR, MoCo: about 1 when healthy, 0 when every
    image maps to one point) and ``train/teacher_mi`` (DINO: 0 when the teacher's output is the same for every
    image). Logs ``diagnostics/collapse`` (1 or 0) each epoch and warns once per key.

    Args:
        thresholds: Key -> lowest healthy value.
        after_epochs: Epochs to wait before checking (early epochs can look collapsed during warmup).
    """

    def __init__(self, thresholds: dict[str, float] | None = None, after_epochs: int = 1):
        self.thresholds = dict(thresholds) if thresholds is not None else {"train/z_std": 0.1, "train/teacher_mi": 0.01}
        if after_epochs < 0 or any(v <= 0 for v in self.thresholds.values()):
            raise ValueError(f"CollapseMonitor needs after_epochs >= 0 and thresholds > 0; got {after_epochs}, "
                             f"{self.thresholds}.")
        self.after_epochs = after_epochs
        self.warned: dict[str, str] = {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        if trainer.current_epoch + 1 <= self.after_epochs:
            return
        low = {k: float(trainer.callback_metrics[k]) for k, limit in self.thresholds.items()
               if k in trainer.callback_metrics and float(trainer.callback_metrics[k]) < limit}
        pl_module.log("diagnostics/collapse", float(bool(low)), on_step=False, on_epoch=True)
        for key, value in low.items():
            if key in self.warned:
                continue
            self.warned[key] = (f"Possible collapse at epoch {trainer.current_epoch}: {key} = {value:.4g} is below "
                                f"{self.thresholds[key]} ({COLLAPSE_HINTS.get(key, 'below its healthy range')}). "
                                "Check the learning rate, the temperature(s) and the augmentation strength; the "
                                "checkpoints before this epoch are the ones to resume from.")
            if trainer.is_global_zero:
                warnings.warn(self.warned[key], stacklevel=1)
                print(self.warned[key])


class RetrievalCallback(PeriodicEvaluation):
    """Image->text and text->image recall@K of a CLIP-style model on the held-out images of a caption dataset.

    Logs ``val/i2t_r{K}`` and ``val/t2i_r{K}`` (the random-init baseline with the suffix ``_init``) and
    writes ``retrieval.json``.

    Args:
        every_n_epochs: Evaluate every this many epochs.
        k: The K of recall@K.
        baseline: Also evaluate the model at random init before training.
        batch_size: Images or captions per forward pass.
    """

    json_name = "retrieval.json"

    def __init__(self, every_n_epochs: int = 1, k: list[int] = [1, 5, 10], baseline: bool = True,  # noqa: B006
                 batch_size: int = 512):
        super().__init__(every_n_epochs, baseline, batch_size)
        if not k or min(k) < 1:
            raise ValueError(f"RetrievalCallback needs k values >= 1; got {k}.")
        self.ks = list(k)

    def evaluate(self, trainer: pl.Trainer, pl_module) -> dict[str, float]:
        from ssl_toolkit.eval.retrieval import retrieval_recall

        dm = trainer.datamodule
        if not hasattr(dm, "captions") or not hasattr(pl_module, "embed_texts"):
            raise ValueError("RetrievalCallback needs a CLIP-style model (embed_images/embed_texts) and a "
                            "CaptionDataModule; use KNNCallback for image-only methods.")
        return retrieval_recall(pl_module, dm, "test", pl_module.device, self.ks, self.batch_size,
                                self.max_batches(trainer), across_ranks=True)

    def metrics(self, result: dict[str, float], suffix: str = "") -> dict[str, float]:
        return {f"val/{name}{suffix}": v for name, v in result.items()}

    def report(self, trainer: pl.Trainer) -> list[str]:
        init, trained = self.results.get("init", {}), self.results["trained"]
        lines = [f"Retrieval recall@K on {trainer.datamodule.name} held-out images:"]
        for name in trained:
            before = f"random init {init[name]:5.2f}% -> " if name in init else ""
            lines.append(f"  {name:<8s} {before}trained {trained[name]:5.2f}%")
        return lines
