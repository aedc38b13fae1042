"""Reading toolkit checkpoints: the encoder and the data they were trained on, from the file alone."""

import contextlib
import importlib
import os
import pickle
import signal
import sys
import tempfile
import threading
import zipfile

import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssl_toolkit.backbones import Encoder, build_backbone
from ssl_toolkit.errors import CheckpointError, RunStopped


def load_checkpoint(path: str) -> dict:
    """Load a checkpoint with ``weights_only=True`` and check it is one of this toolkit's."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No checkpoint at {os.path.abspath(path)!r}. Pass the .ckpt file pretraining wrote "
                                "(it prints the path when it ends; look under runs/*/version_*/checkpoints/).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{path} could not be read ({type(e).__name__}: {first}); the file is truncated or not a "
                              "PyTorch checkpoint. Use another checkpoint of the run (e.g. last.ckpt).") from None
    if not isinstance(ckpt, dict) or "ssl_toolkit" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not an ssl-toolkit pretraining checkpoint (no 'ssl_toolkit' metadata). "
                              "Pass a checkpoint written by `ssl-toolkit pretrain`.")
    return ckpt


def check_resume(path: str, model) -> dict:
    """Raise a CheckpointError unless the checkpoint at ``path`` is one that training ``model`` can resume from:
    written by the same method, with every weight of the same name and shape (the same backbone and heads).
    Returns the checkpoint."""
    ckpt = load_checkpoint(path)
    method = ckpt["ssl_toolkit"]["method"]
    here = f"{type(model).__module__}.{type(model).__qualname__}"
    if method != here:
        raise CheckpointError(f"{path} is a checkpoint of a {method.rpartition('.')[2]} run; this run trains "
                              f"{type(model).__name__}. Resume with the recipe that wrote it, or leave out "
                              "--ckpt_path to start afresh.")
    saved = {k: tuple(t.shape) for k, t in ckpt["state_dict"].items()}
    ours = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    differ = sorted(k for k in saved.keys() | ours.keys() if saved.get(k) != ours.get(k))
    if differ:
        shown = ", ".join(f"{k} {saved.get(k, 'absent')} here {ours.get(k, 'absent')}" for k in differ[:3])
        raise CheckpointError(f"{path} does not fit this run's {type(model).__name__}: {len(differ)} weights differ "
                              f"in name or shape ({shown}). The checkpoint's backbone is "
                              f"{ckpt['hyper_parameters'].get('backbone')}; resume with the settings that wrote it.")
    return ckpt


def load_backbone(ckpt: dict):
    """Rebuild the checkpoint's backbone and load its trained weights: ``(module, feature_dim)``."""
    backbone, dim = build_backbone(**ckpt["hyper_parameters"]["backbone"])
    return load_backbone_weights(ckpt, backbone), dim


def load_backbone_weights(ckpt: dict, backbone):
    """Load the checkpoint's backbone weights into ``backbone`` (built from the same config); returns it."""
    b = ckpt["hyper_parameters"]["backbone"]
    prefix = "backbone."
    state = {k[len(prefix):]: t for k, t in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = backbone.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"Checkpoint weights do not fit backbone {b['name']!r}: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}. The checkpoint was written by another version or method.")
    return backbone


def encoder_from_checkpoint(ckpt: dict) -> Encoder:
    """Rebuild the backbone with its input normalisation and load its trained weights."""
    return Encoder.from_hparams(load_backbone(ckpt)[0], ckpt["hyper_parameters"])


def method_from_checkpoint(ckpt: dict, expected: type | None = None):
    """Rebuild the whole method module (heads, text tower, ...) from its saved config and load every weight.

    Args:
        ckpt: A checkpoint from :func:`load_checkpoint`.
        expected: The method class the caller needs; another method's checkpoint gets a CheckpointError.
    """
    import dataclasses
    import inspect
    import typing

    path = ckpt["ssl_toolkit"]["method"]
    cls = import_class(path)
    if expected is not None and not issubclass(cls, expected):
        raise CheckpointError(f"This is a {cls.__name__} checkpoint ({path}); this command needs a "
                              f"{expected.__name__} checkpoint. Pass the checkpoint of a {expected.__name__} run.")
    hints = typing.get_type_hints(cls.__init__)
    kwargs = {}
    for name, param in inspect.signature(cls).parameters.items():
        if name not in ckpt["hyper_parameters"]:
            continue
        value, hint = ckpt["hyper_parameters"][name], hints.get(name)
        kwargs[name] = hint(**value) if dataclasses.is_dataclass(hint) and isinstance(value, dict) else value
    module = cls(**kwargs)
    module.load_state_dict(ckpt["state_dict"])
    module.on_load_checkpoint(ckpt)
    return module.eval()


def import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def datamodule_from_checkpoint(ckpt: dict):
    """Rebuild the DataModule the checkpoint was trained on, from its saved hyper-parameters."""
    cls_path = ckpt["ssl_toolkit"].get("datamodule")
    if not cls_path or "datamodule_hyper_parameters" not in ckpt:
        raise CheckpointError("This checkpoint does not record its dataset; pass --data.")
    kwargs = {k: v for k, v in ckpt["datamodule_hyper_parameters"].items() if not k.startswith("_")}  # no CLI keys
    return import_class(cls_path)(**kwargs)


def keep_stopped_epoch_open(checkpoint: dict, trainer) -> None:
    """Record an epoch that ``trainer.should_stop`` cut short (``max_time``, early stopping) as unfinished.

    Lightning runs the epoch-end hooks of such an epoch, and a checkpoint written there or after says the epoch
    ended, so a resumed run would start the next epoch while the data order (saved by the DataModule) still
    holds the rest of this one: the run came out an epoch short. Marking the epoch as not yet processed makes
    Lightning resume in the middle of it, as from a checkpoint saved between two steps, with the batches left.
    """
    loop = trainer.fit_loop
    batches = loop.epoch_loop.batch_progress.current.ready
    if not (loop.epoch_loop.done and loop.epoch_progress.current.processed == loop.epoch_progress.current.ready
            and batches < trainer.num_training_batches):
        return  # between two steps, or after an epoch that ran to its end
    saved = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
    if saved is not None:
        for counts in (saved["total"], saved["current"]):
            counts["processed"] -= 1  # epoch-end hooks not yet run: a resume continues the epoch


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a killed process cannot leave half-done, on any local file system.

    The bytes go to a temporary file in the checkpoint's own folder, are flushed to disk, and the file is
    renamed over the old one (``os.replace`` is atomic within a folder, also on network file systems, where a
    temporary file in ``/tmp`` would be copied across devices). Remote URLs go through Lightning's own writer.
    ``ssl-toolkit pretrain`` uses it by default.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = path.removeprefix("file://")
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".writing-", suffix=".ckpt", dir=folder)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def save_last(trainer, always: bool = False) -> str | None:
    """Write the current state to ``last.ckpt`` in the folder of the run's ModelCheckpoint and return its path.

    Nothing is written when the last save already holds this step. Without ``always`` only a ModelCheckpoint
    with ``save_last`` gets one. Returns None when the run has no ModelCheckpoint folder to write to, and under
    ``fast_dev_run``, which writes no checkpoints (its folder may hold a real run's ``last.ckpt``).
    """
    ckpt = trainer.checkpoint_callback
    if (ckpt is None or getattr(ckpt, "dirpath", None) is None or not (always or ckpt.save_last)
            or trainer.fast_dev_run):
        return None
    if getattr(ckpt, "_last_global_step_saved", None) == trainer.global_step and ckpt.last_model_path:
        return ckpt.last_model_path
    path = os.path.join(ckpt.dirpath, ckpt.CHECKPOINT_NAME_LAST + ckpt.FILE_EXTENSION)
    trainer.save_checkpoint(path, weights_only=False)  # optimizer and loops too: a resumable checkpoint
    ckpt.last_model_path = path
    return path


def save_final_checkpoint(trainer) -> None:
    """Write ``last.ckpt`` with the final state when the run ended between two scheduled saves.

    Recipes save every few epochs (a save of resnet18 with its optimizer is ~90 MB; every epoch it cost a tenth
    of a CIFAR-10 run on an H100); this makes ``last.ckpt`` of a finished run its end state all the same. Call
    it on every rank after ``fit``; an interrupted run keeps its last scheduled checkpoint.
    """
    if not trainer.interrupted:
        save_last(trainer)


class StopAndSave(Callback):
    """Ctrl-C, SIGTERM or SLURM's requeue signal ends a run after the current step, with a checkpoint it resumes
    from exactly.

    Left to itself, Lightning stops on Ctrl-C at once, possibly mid-step, and on SIGTERM after the batch in
    progress (in the middle of accumulating gradients too), and neither writes a checkpoint: a recipe that saves
    every 500 steps loses up to 500. On SLURM's requeue signal (``#SBATCH --signal=SIGUSR1@90``) it saves at
    whatever point the signal arrives, mid-step included, and trains on until SLURM kills the job: the requeued
    job resumed a step short. With this callback the optimizer step in progress finishes, then ``last.ckpt`` gets
    the state after it (weights, optimizer, random states, the position in the epoch), or, for the requeue
    signal, Lightning's own handler saves its ``hpc_ckpt_N.ckpt`` and requeues the job; the run ends with
    :class:`RunStopped`, whose message says how it resumes. A second Ctrl-C stops at once, without saving.
    ``ssl-toolkit pretrain`` adds it to every run.

    A signal that the process ignores when training starts stays ignored, as Python leaves Ctrl-C ignored in a
    job started in the background by a script or under ``nohup``.

    One process only: under DDP the ranks would see a signal at different steps, so Lightning's own handling
    applies there.
    """

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._names = dict(self.SIGNALS)
        self._requeue = None
        self._step_at_start = 0

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning has set its own signal handlers
        from lightning_fabric.plugins.environments import SLURMEnvironment

        self.signum = None
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment  # where Lightning's signal connector looks
        self._requeue = (env.requeue_signal if isinstance(env, SLURMEnvironment) and env.auto_requeue
                         and callable(signal.getsignal(env.requeue_signal)) else None)  # Lightning's handler is set
        self._names = {**self.SIGNALS, **({self._requeue: "SLURM's requeue signal"} if self._requeue else {})}
        # a signal the process was started ignoring stays ignored (`nohup ... &` runs with Ctrl-C ignored)
        self._previous = {s: signal.signal(s, self._on_signal) for s in self._names
                          if signal.getsignal(s) != signal.SIG_IGN}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # the second Ctrl-C: stop now, as without this callback
                self._restore()
                raise KeyboardInterrupt
            return
        self.signum = signum
        again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
        what = "requeueing the job" if signum == self._requeue else "saving a checkpoint to resume from"
        print(f"\n{self._names[signum]}: stopping after this step and {what}{again}.", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _stop_if_asked(self, trainer) -> None:
        if self.signum is None:
            return
        lightning = self._previous.get(self.signum)
        self._restore()
        at = f"{self._names[self.signum]}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}."
        if self.signum == self._requeue:
            lightning(self.signum, None)  # Lightning's: default_root_dir/hpc_ckpt_N.ckpt, then `scontrol requeue`
            raise RunStopped(f"{at} Saved a checkpoint in {trainer.default_root_dir} and requeued the job, which "
                             "resumes from it.", self.signum)
        path = save_last(trainer, always=True)
        where = (f"Saved {path}; resume with the same recipe and overrides and --ckpt_path {path}" if path else
                 "Nothing was saved: fast_dev_run writes no checkpoints" if trainer.fast_dev_run else
                 "The run has no ModelCheckpoint, so nothing was saved")
        raise RunStopped(f"{at} {where}.", self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._step_at_start:  # not in the middle of accumulating gradients
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_asked(trainer)  # a signal during the epoch-end evaluations

    # Put the handlers back before Lightning restores its own, which it does after these hooks.
    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
