"""Writing checkpoints while training: atomic writes, ``last.ckpt`` at the end of a run, and Ctrl-C, SIGTERM or
SLURM's requeue signal ending a run after the current step with a checkpoint it resumes from exactly.

Reading checkpoints (``ssl_toolkit.checkpoint``) does not need Lightning; this does. ``ssl_toolkit.checkpoint``
still answers for these names."""

import contextlib
import os
import signal
import sys
import tempfile
import threading

import torch
from pytorch_lightning.callbacks import Callback, Timer
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ssl_toolkit.distributed import Vote
from ssl_toolkit.errors import RunStopped


def keep_stopped_epoch_open(checkpoint: dict, trainer) -> None:
    """Record an epoch that ``trainer.should_stop`` cut short (``max_time``, early stopping) as unfinished.

    Lightning runs the epoch-end hooks of such an epoch, and a checkpoint written there or after says the epoch
    ended, so a resumed run would start the next epoch while the data order (saved by the DataModule) still
    holds the rest of this one: the run came out an epoch short. Marking the epoch as not yet processed makes
    Lightning resume in the middle of it, as from a checkpoint saved between two steps, with the batches left.
    A checkpoint written when training ends (``last.ckpt`` of a recipe that saves every N steps) comes after
    Lightning has counted the epoch completed as well, which it takes as it is when ``max_steps`` is set: the
    resumed run counted one epoch more than it had trained, each time (a chain of such jobs was stopped by
    ``max_epochs`` early), so that count goes back too.
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
            counts["completed"] = min(counts["completed"], counts["processed"])  # nor the epoch counted done
        checkpoint["epoch"] = saved["current"]["completed"]  # the epoch it is in, as trainer.current_epoch resumes


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
    # set before the save, as ModelCheckpoint does, so the checkpoint's own ModelCheckpoint state names it: a run
    # resumed from it then writes its last.ckpt over this one, where it wrote last-v1.ckpt beside it and left this
    # one, older, for `--ckpt_path last` and the next job of a chain to resume from
    previous, ckpt.last_model_path = ckpt.last_model_path, path
    try:
        trainer.save_checkpoint(path, weights_only=False)  # optimizer and loops too: a resumable checkpoint
    except BaseException:
        ckpt.last_model_path = previous
        raise
    return path


def save_final_checkpoint(trainer) -> None:
    """Write ``last.ckpt`` with the final state when the run ended between two scheduled saves.

    Recipes save every few epochs (a save of resnet18 with its optimizer is ~90 MB; every epoch it cost a tenth
    of a CIFAR-10 run on an H100); this makes ``last.ckpt`` of a finished run its end state all the same. Call
    it on every rank after ``fit``; an interrupted run keeps its last scheduled checkpoint.
    """
    if not trainer.interrupted:
        save_last(trainer)


def max_time_timer(trainer) -> Timer | None:
    """The Timer that ``trainer.max_time`` set up, or None when the run has no time limit."""
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    return timer if timer is not None and timer._duration is not None else None


def _as_max_time(seconds: float) -> str:
    """A time as ``--trainer.max_time`` takes it: ``DD:HH:MM:SS``."""
    m, s = divmod(max(0, round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h // 24:02d}:{h % 24:02d}:{m:02d}:{s:02d}"


class TimeOutrunsSchedules(Callback):
    """Says when ``trainer.max_time`` ends a run before its schedules end.

    The schedules (the learning rate's warmup and cosine decay, the EMA momentum, DINO's teacher temperature) span
    ``max_epochs`` or ``max_steps``; ``max_time`` stops the run wherever they are: a 5-second run given
    ``max_epochs`` 1000 stopped inside its warmup, with nothing said. Once this process has trained two epochs
    (the first holds the start: compiling, the random-init evaluation), rank 0 projects from the second's pace where
    the time left ends the run and, when that is short of the schedules' end, says so once, with the
    ``max_epochs`` that fits the time and the ``max_time`` the whole run needs. A run the time then ends says at
    which of the schedules' steps it stopped. ``ssl-toolkit pretrain`` adds it to every run.
    """

    def __init__(self):
        self._marks: list[tuple[float, int]] = []  # (train time, global step) at the ends of this process's epochs
        self.said: list[str] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self._marks = []

    def _say(self, trainer, line: str) -> None:
        self.said.append(line)
        if not trainer.is_global_zero:
            return
        bar = getattr(trainer.progress_bar_callback, "_train_progress_bar", None)  # Lightning's tqdm bar, while open
        if bar is not None and not bar.disable:
            bar.write(line, file=sys.stderr)  # on a line of its own, not into the bar's
        else:
            print(line, file=sys.stderr, flush=True)

    @staticmethod
    def _rate_at(trainer, step: int) -> str:
        """The learning rate at ``step`` as a share of its peak (``optim.lr``), when the schedule is a LambdaLR's."""
        configs = trainer.lr_scheduler_configs
        lambdas = getattr(configs[0].scheduler, "lr_lambdas", None) if configs else None
        return f", with the learning rate at {lambdas[0](step):.0%} of its peak" if lambdas else ""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        timer = max_time_timer(trainer)
        if timer is None or self.said:
            return
        self._marks.append((timer.time_elapsed("train"), trainer.global_step))
        if len(self._marks) < 2:
            return
        (t0, s0), (t1, s1) = self._marks[-2:]
        total, offset = trainer.estimated_stepping_batches, getattr(pl_module, "schedule_offset", 0)
        if s1 <= s0 or t1 <= t0 or s1 >= offset + total:
            return
        per_step = (t1 - t0) / (s1 - s0)
        reach = s1 + int(timer.time_remaining("train") / per_step)  # a global step; the schedules' is reach - offset
        if reach >= offset + total:
            return
        per_epoch = max(1, s1 - s0) if trainer.max_epochs and trainer.max_epochs > 0 else None
        where = f" (epoch {(reach - offset) // per_epoch} of {trainer.max_epochs})" if per_epoch else ""
        fits = (f"set --trainer.max_epochs {max(1, (reach - offset) // per_epoch)}" if per_epoch else
                f"set --trainer.max_steps {max(1, reach)}")
        self._say(trainer, f"trainer.max_time: at {per_step:.3g} s a step, the time left ends this run near step "
                           f"{reach - offset} of the {total} its schedules span{where}{self._rate_at(trainer, reach)}. "
                           f"For schedules that end in the time, {fits}; the whole run needs about "
                           f"--trainer.max_time {_as_max_time(t1 + (offset + total - s1) * per_step)}.")

    def on_train_end(self, trainer, pl_module) -> None:
        timer = max_time_timer(trainer)
        total, offset = trainer.estimated_stepping_batches, getattr(pl_module, "schedule_offset", 0)
        step = trainer.global_step - offset  # the schedules' step
        if timer is None or step >= total or timer.time_remaining("train") > 1.0:
            return
        self._say(trainer, f"trainer.max_time ended the run at step {step} of the {total} its schedules span"
                           f"{self._rate_at(trainer, trainer.global_step)}. Resume it with a larger "
                           "--trainer.max_time to finish them.")


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

    Under DDP every rank stops after the same step and they save together, whichever ranks got the signal (all of
    them for Ctrl-C in a terminal or SLURM's signals, rank 0 alone for ``kill`` of the process Lightning started the
    others from): the ranks vote after each step (see Vote), without waiting for the GPU, and stop one step after
    the signal. Lightning alone ended every rank on SIGTERM at the next step without a checkpoint and with exit
    code 0, as if the run had finished, saved its requeue checkpoint from inside the signal handler, in the middle
    of a step, and broadcast its SIGTERM flag from rank 0 every step and read it back, which waits for the GPU to
    finish all the work queued so far; the vote replaces that broadcast, and the Timer's (``trainer.max_time``), which
    sent rank 0's decision as a pickled object after every step: a run whose time is up on any rank ends after the
    same step on all, as a finished run.
    """

    SIGNALS = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}
        self._names = dict(self.SIGNALS)
        self._requeue = None
        self._step_at_start = 0
        self._vote: Vote | None = None
        self._timer = self._loop = None  # under DDP: the Timer and the epoch loop whose per-step checks the vote does
        self._rank = 0

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning has set its own signal handlers
        from lightning_fabric.plugins.environments import SLURMEnvironment

        self.signum, self._rank = None, trainer.global_rank
        if threading.current_thread() is not threading.main_thread():
            return
        env = trainer._accelerator_connector.cluster_environment  # where Lightning's signal connector looks
        self._requeue = (env.requeue_signal if isinstance(env, SLURMEnvironment) and env.auto_requeue
                         and callable(signal.getsignal(env.requeue_signal)) else None)  # Lightning's handler is set
        self._names = {**self.SIGNALS, **({self._requeue: "SLURM's requeue signal"} if self._requeue else {})}
        # a signal the process was started ignoring stays ignored (`nohup ... &` runs with Ctrl-C ignored)
        self._previous = {s: signal.signal(s, self._on_signal) for s in self._names
                          if signal.getsignal(s) != signal.SIG_IGN}
        if trainer.world_size > 1:
            self._vote = Vote()
            self._loop = trainer.fit_loop.epoch_loop
            if hasattr(self._loop, "_broadcast_sigterm_tensor"):  # Lightning's per-step broadcast of its SIGTERM
                self._loop._broadcast_sigterm_tensor = lambda: None  # flag, which only its handler (replaced) sets
            # trainer.max_time: Lightning's Timer broadcasts rank 0's decision after every step (a pickled object,
            # whose size the host reads: a wait for the GPU); the vote carries it instead
            timer = max_time_timer(trainer)
            if timer is not None and timer._interval == "step":
                self._timer, timer.on_train_batch_end = timer, lambda *args, **kwargs: None

    def _on_signal(self, signum, frame) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:  # the second Ctrl-C: stop now, as without this callback
                self._restore()
                raise KeyboardInterrupt
            return
        self.signum = signum
        if self._rank != 0:  # under DDP rank 0 speaks for all; it says so when they stop
            return
        again = " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT else ""
        what = "requeueing the job" if signum == self._requeue else "saving a checkpoint to resume from"
        step = "the next step, on every rank," if self._vote is not None else "this step"
        print(f"\n{self._names[signum]}: stopping after {step} and {what}{again}.", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    TIME_UP = "max_time"  # under DDP, what the vote also carries: a rank's Timer found trainer.max_time spent

    def _agreed_signal(self, wait: bool) -> int | str | None:
        """The signal that stops the run now: this process's, or under DDP the one the ranks' vote agreed on (a
        requeue before SIGTERM before Ctrl-C when ranks got different ones), or TIME_UP when a rank's time is up."""
        if self._vote is None:
            return self.signum
        order = [self.TIME_UP, signal.SIGINT, signal.SIGTERM, self._requeue]
        timer = self._timer
        mine = self.signum if self.signum is not None else (
            self.TIME_UP if timer is not None and timer.time_elapsed() >= timer._duration else None)
        code = self._vote.poll(order.index(mine) + 1 if mine is not None else 0, wait)
        return order[code - 1] if code else None

    def _stop_if_asked(self, trainer, wait: bool = False) -> None:
        signum = self._agreed_signal(wait)
        if signum is None:
            return
        if signum == self.TIME_UP:  # as the Timer would have: the run ends after this step, as a finished one
            if not trainer.should_stop and trainer.is_global_zero:
                print("Time limit reached (trainer.max_time). Signaling Trainer to stop.", file=sys.stderr)
            trainer.should_stop = True
            return
        lightning = self._previous.get(signum)
        self._restore()
        self._close_vote()
        quiet = not trainer.is_global_zero  # every rank stops; rank 0 says so
        at = f"{self._names[signum]}: stopped at epoch {trainer.current_epoch}, step {trainer.global_step}."
        if signum == self._requeue:  # Lightning's, on every rank: default_root_dir/hpc_ckpt_N.ckpt (rank 0 writes
            lightning(signum, None)  # it), then rank 0 runs `scontrol requeue`
            raise RunStopped(f"{at} Saved a checkpoint in {trainer.default_root_dir} and requeued the job, which "
                             "resumes from it.", signum, quiet)
        path = save_last(trainer, always=True)  # on every rank: rank 0 writes it
        where = (f"Saved {path}; resume with the same recipe and overrides and --ckpt_path {path}" if path else
                 "Nothing was saved: fast_dev_run writes no checkpoints" if trainer.fast_dev_run else
                 "The run has no ModelCheckpoint, so nothing was saved")
        raise RunStopped(f"{at} {where}.", signum, quiet)

    def _close_vote(self, wait: bool = True) -> None:
        if self._vote is not None:
            if wait:  # every rank gets here at the same point: the last vote's collective is done on all
                self._vote.poll(None, wait=False)
            self._vote = None
        for patched, name in ((self._timer, "on_train_batch_end"), (self._loop, "_broadcast_sigterm_tensor")):
            if patched is not None:
                patched.__dict__.pop(name, None)  # Lightning's own again
        self._timer = self._loop = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > self._step_at_start:  # not in the middle of accumulating gradients
            self._stop_if_asked(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop_if_asked(trainer, wait=True)  # a signal during the epoch-end evaluations

    # Put the handlers back before Lightning restores its own, which it does after these hooks.
    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()
        self._close_vote()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()
        self._close_vote(wait=False)  # a rank that failed may never vote again

