"""BaseSSLModule: plumbing shared by every method, and nothing method-specific.

Optimizer and scheduler from the config, weight decay only on ``p.ndim >= 2``, the view hook
(views are made on the device in ``on_after_batch_transfer``, training only), summing and
logging of the loss dict, EMA updates of declared (online, target) pairs with a cosine momentum
schedule, channels_last, and the checkpoint metadata evaluators read.
"""

import math
import os
import sys
import warnings
from dataclasses import asdict, dataclass

import pytorch_lightning as pl
import torch
from torch import nn

from ssl_toolkit import distributed
from ssl_toolkit.backbones import BackboneConfig, Encoder, build_backbone
from ssl_toolkit.errors import ConfigError, NonFiniteLossError
from ssl_toolkit.optim import cosine_schedule, ema_update, make_optimizer
from ssl_toolkit.views import ViewConfig, Views

warnings.filterwarnings("ignore", message=r".*overridden `on_after_batch_transfer` in `LightningModule`.*")
CHECKPOINT_FORMAT = 1


def schedule_steps(trainer) -> tuple[int, int]:
    """The optimizer steps a run's schedules span, and the steps of one epoch.

    An epoch's steps are its batches over the gradient accumulation, not the run's steps over ``max_epochs``: that
    ratio made a run that ``max_steps`` ends (``max_epochs`` -1, or ``max_steps`` short of ``max_epochs``) warm up
    for ``warmup_epochs`` times its whole length, or for a step. A run with no set length is refused: the
    schedules need one.
    """
    if trainer.accumulate_grad_batches < 1:  # Lightning takes 0; the epoch's steps were a ZeroDivisionError
        raise ConfigError(f"trainer.accumulate_grad_batches must be >= 1; got {trainer.accumulate_grad_batches}.")
    total = trainer.estimated_stepping_batches  # loads the training data when needed
    if total == 0 and trainer.max_steps == 0:  # the message below said max_steps "is not set"
        raise ConfigError("trainer.max_steps 0 leaves this run no step to train. Set --trainer.max_steps N (or -1, "
                          "and --trainer.max_epochs N).")
    if not 1 <= total < math.inf:
        raise ConfigError(
            "A method's schedules (the learning rate's warmup and cosine decay, the EMA momentum, DINO's teacher "
            "temperature) span the run's optimizer steps, and this run has no set length: trainer.max_epochs is -1 "
            "(or null with trainer.max_time set) and trainer.max_steps is not set. Set --trainer.max_epochs N or "
            "--trainer.max_steps N; trainer.max_time can stay, as a limit.")
    if trainer.train_dataloader is None:  # as estimated_stepping_batches does, which skips it for max_epochs -1
        trainer.fit_loop.setup_data()
    batches = trainer.num_training_batches
    per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if 0 < batches < math.inf else total
    return int(total), max(1, int(per_epoch))


@dataclass(frozen=True)
class OptimConfig:
    """Optimizer and learning-rate schedule.

    Args:
        name: ``sgd``, ``lars`` (large batches, SimCLR's choice) or ``adamw``.
        lr: Peak learning rate after warmup (SimCLR with LARS: 0.3 x batch / 256; SGD on CIFAR at
            batch 512: 0.06 x 512 / 256 = 0.12 is a common choice). Lower it if the loss diverges.
        weight_decay: L2 penalty of the weights, ndim >= 2 (SimCLR: 1e-6 with LARS; 5e-4 with SGD on CIFAR).
        momentum: SGD/LARS momentum.
        betas: AdamW betas.
        warmup_epochs: Linear warmup length (10 in SimCLR); fractional values are allowed.
        min_lr: Learning rate at the end of the cosine decay.
        decay_norm_and_bias: Also decay biases and normalisation parameters (ndim < 2), as lightly's CIFAR-10
            benchmarks do; off by default, as in SimCLR and DINO. LARS never adapts them either way.
    """

    name: str = "sgd"
    lr: float = 0.06
    weight_decay: float = 5e-4
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    decay_norm_and_bias: bool = False

    def __post_init__(self):
        if self.name not in ("sgd", "lars", "adamw"):
            raise ValueError(f"optim.name must be one of sgd, lars, adamw; got {self.name!r}.")
        wrong = [f"optim.{name} {value} (needs {need})" for name, value, ok, need in (
            ("lr", self.lr, self.lr > 0, "> 0"),
            ("weight_decay", self.weight_decay, self.weight_decay >= 0, ">= 0"),
            ("warmup_epochs", self.warmup_epochs, self.warmup_epochs >= 0, ">= 0"),
            # above lr the cosine "decay" rose all run; momentum or betas >= 1 diverge
            ("min_lr", self.min_lr, 0 <= self.min_lr and (self.lr <= 0 or self.min_lr <= self.lr),
             f">= 0 and <= optim.lr {self.lr}"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("betas", list(self.betas), len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
             "two values in [0, 1)")) if not ok]
        if wrong:
            raise ValueError(f"Set {', '.join(wrong)}.")


def rng_states() -> dict:
    """Every random generator a run draws from (torch CPU and CUDA, numpy, Python), as plain values that load
    with ``weights_only=True``."""
    import random

    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "python": random.getstate()}


def set_rng_states(state: dict) -> None:
    """Restore what :func:`rng_states` saved."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state["python"])


def upsampling_note(crop_size: int, image_size: tuple[int, int]) -> str | None:
    """The line that says views are made larger than the training images: each view is upsampled, at more pixels
    for the backbone and no detail added. An image folder decoded at its default 32 px under 96 px views trained
    on blurred 32 px photos without a word. None when the crops fit.

    Example:
        >>> upsampling_note(32, (32, 32)) is None
        True
    """
    side = min(image_size)
    if crop_size <= side:
        return None
    return (f"views.crop_size {crop_size} is larger than the training images ({image_size[0]}x{image_size[1]} px): "
            f"each view is upsampled, {(crop_size / side) ** 2:.1f}x the pixels for the backbone with no detail added. "
            f"Decode the images at the crop size where the data takes data.image_size (image folders, captions, "
            f"digits: --data.image_size {crop_size}), or lower views.crop_size to {side}.")


class HostFlag:
    """A one-element bool tensor on its way to the host, read later without waiting for the work queued since.

    Reading a CUDA tensor (``bool(t)``, ``t.item()``) queues a copy at the end of the stream and waits for the whole
    stream, so reading the previous step's flag after this step's forward was queued waited for that forward too.
    Here the copy into pinned host memory is queued right behind the kernels that made the flag, with an event;
    reading waits for that event only. On other devices the tensor is read directly.

    Example:
        >>> bool(HostFlag(torch.isfinite(torch.tensor(float("nan")))))
        False
    """

    def __init__(self, flag: torch.Tensor):
        self.event = None
        if flag.is_cuda:
            self.value = torch.empty((), dtype=torch.bool, pin_memory=True)  # cached by torch's pinned allocator
            self.value.copy_(flag, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.value = flag

    def __bool__(self) -> bool:
        if self.event is not None:
            self.event.synchronize()
        return bool(self.value)


class BaseSSLModule(pl.LightningModule):
    """Base class of every method: a subclass builds its modules and implements :meth:`step`.

    Args:
        backbone: The encoder to train; its weights are ``self.backbone``.
        optim: Optimizer and schedule.
        views: Augmentation settings (also give the normalisation evaluators use).
        channels_last: Run convolutions in NHWC memory layout (faster with bf16 on recent GPUs).
    """

    def __init__(self, backbone: BackboneConfig, optim: OptimConfig, views: ViewConfig, channels_last: bool = False):
        super().__init__()
        self.backbone_config, self.optim_config, self.view_config = backbone, optim, views
        self.backbone, self.feature_dim = build_backbone(**asdict(backbone))
        self.channels_last = channels_last
        self.view_policy: nn.Module | None = None  # set by the subclass
        self.ema_momentum: tuple[float, float] = (1.0, 1.0)  # (start, end) of the cosine momentum schedule
        self.momentum_schedule: torch.Tensor | None = None  # one momentum per global step, built with the optimizer
        self.schedule_steps: int | None = None  # the optimizer steps the schedules span, set with them
        self.steps_per_epoch: int | None = None  # their steps of one epoch
        self.schedule_offset = 0  # the global step at the schedules' step 0: see _resumed_offset
        # the checkpoint a run resumes from (None when it did not): its global step, and its schedules' steps,
        # steps an epoch, offset and learning rate (a share of the peak), each None when it has none
        self._resumed: dict | None = None
        self._configured_groups: list[dict] = []  # this run's optimizer settings, per param group
        self.batch_images: torch.Tensor | None = None  # the current training batch before the view policy
        self._unchecked: tuple[int, HostFlag, dict[str, torch.Tensor]] | None = None  # (step, finite?, terms)

    def save_config(self, **method_args) -> None:
        """Store the whole configuration as plain values (checkpoints load with ``weights_only=True``)."""
        self.save_hyperparameters({
            "backbone": asdict(self.backbone_config), "optim": asdict(self.optim_config),
            "views": asdict(self.view_config), "channels_last": self.channels_last, **method_args})

    def step(self, views: Views) -> dict[str, torch.Tensor]:
        """Compute the method's outputs; keys ending in ``_loss`` are summed into the training loss."""
        raise NotImplementedError(f"{type(self).__name__} must implement step(views).")

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(online, target) pairs updated as ``target <- m target + (1 - m) online`` after each optimizer step."""
        return []

    def make_schedules(self, total_steps: int, steps_per_epoch: int) -> None:
        """Build the per-step schedule tensors (EMA momentum here; methods add theirs)."""
        self.momentum_schedule = cosine_schedule(*self.ema_momentum, total_steps=total_steps)  # (total,)

    def scheduled(self, schedule: torch.Tensor, step: int | None = None) -> float:
        """A per-step schedule's value at ``step`` (default: the current global step), clamped to its range.

        Schedules are CPU tensors, so reading one causes no device sync.
        """
        step = (self.global_step if step is None else step) - self.schedule_offset
        return float(schedule[min(max(step, 0), len(schedule) - 1)])

    @property
    def attached_datamodule(self):
        """The trainer's DataModule, or None when the module is not attached to a trainer (or has no DataModule)."""
        return self._trainer.datamodule if self._trainer is not None else None

    def encoder(self) -> Encoder:
        """The backbone with its input normalisation, on the module's device, for evaluators."""
        return Encoder.from_hparams(self.backbone, self.hparams).to(self.device)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def setup(self, stage: str) -> None:
        if self.channels_last:
            self.to(memory_format=torch.channels_last)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training and self.view_policy is not None:
            images, labels = batch
            self.batch_images = images  # the uint8 batch the views come from, for online evaluators (OnlineProbe)
            return self.view_policy(images), labels
        return batch

    def sum_losses(self, out: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss: the sum of the terms whose key ends in ``_loss``."""
        losses = [v for k, v in out.items() if k.endswith("_loss")]
        if not losses:
            raise RuntimeError(f"{type(self).__name__}.step returned no key ending in '_loss': {list(out)}.")
        return torch.stack(losses).sum() if len(losses) > 1 else losses[0]

    def update_targets(self, momentum: float) -> None:
        """Apply the EMA update with ``momentum`` to every pair of :meth:`ema_pairs`."""
        for online, target in self.ema_pairs():
            ema_update(online, target, momentum)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        out = self.step(views)
        loss = self.sum_losses(out)
        self.check_finite()  # the previous step's loss, read one step late: waits for that step's loss, not this one's
        finite = torch.isfinite(loss.detach())
        if distributed.is_distributed():  # every rank's: a rank that stopped alone left the others waiting for it
            finite = distributed.all_reduce_mean(finite.float()) == 1  # in their next collective (NCCL: 30 min)
        finite = HostFlag(finite)
        self._unchecked = (self.global_step, finite, {k: v.detach() for k, v in out.items()})
        if self.logs_this_step():
            self.log_dict({f"train/{k}": v.detach() for k, v in out.items()}, on_step=True, on_epoch=False)
            self.log("train/loss", loss.detach(), prog_bar=True, on_step=True, on_epoch=False)
        return loss

    def logs_this_step(self) -> bool:
        """Whether this step's metrics reach anyone, so the other steps skip ``self.log``.

        Lightning writes step metrics every ``trainer.log_every_n_steps``, and epoch-end callbacks (the collapse
        monitor) read the last batch's. Each ``self.log`` call costs Python time: logging every step made a
        Lightning step whose model costs next to nothing 10.2 ms instead of 8.2 ms (``benchmarks/loop_overhead.py``,
        CPU).
        """
        t = self._trainer
        if t is None or t.fast_dev_run or t.should_stop or t.is_last_batch:
            return True
        return t.log_every_n_steps > 0 and (self.global_step + 1) % t.log_every_n_steps == 0

    def check_finite(self) -> None:
        """Raise :class:`NonFiniteLossError` if the last unchecked training loss was NaN or infinite.

        Called each step for the step before, and before every checkpoint is written and at the end of each
        epoch, so weights updated by a non-finite loss are never saved over a good checkpoint.
        """
        if self._unchecked is None:
            return
        step, finite, terms = self._unchecked
        self._unchecked = None
        if bool(finite):
            return
        here = {k: v.float().item() for k, v in terms.items()}
        values = ", ".join(f"{k}={v:.4g}" for k, v in here.items())
        if distributed.is_distributed() and all(map(math.isfinite, here.values())):  # every rank stops here
            values = f"on another rank (here {values})"
        ckpt = getattr(self._trainer, "checkpoint_callback", None) if self._trainer is not None else None
        last = (ckpt.last_model_path or ckpt.best_model_path) if ckpt is not None else ""
        where = (f"The last good checkpoint is {last} (nothing saved was overwritten); resume from it with "
                 f"--ckpt_path {last}" if last else "No checkpoint had been saved yet")
        raise NonFiniteLossError(
            f"{type(self).__name__}: the training loss is not finite at step {step} (epoch {self.current_epoch}): "
            f"{values}. Training stopped. {where}. Lower optim.lr or raise optim.warmup_epochs; with bf16, "
            "--trainer.precision 32 shows whether precision is the cause.")

    def on_train_epoch_end(self) -> None:
        self.check_finite()

    def _resumed_offset(self) -> int:
        """The global step at the schedules' step 0: 0, except in a run resumed at other steps an epoch than its
        checkpoint's (another batch size, number of devices or gradient accumulation) whose schedules span its
        epochs (``trainer.max_epochs``, not ``max_steps``). They go on from the checkpoint's place in its epochs:
        they started at the checkpoint's global step, counted at the old size, so a run resumed at twice the batch
        size after half its epochs was already at their end (the learning rate at its minimum for all the rest)."""
        if self._resumed is None:
            return 0
        step, per_epoch, offset = (self._resumed[k] for k in ("step", "steps_per_epoch", "schedule_offset"))
        epochs = self.trainer.max_epochs
        if per_epoch is None or not epochs or epochs < 0 or self.schedule_steps != self.steps_per_epoch * epochs:
            return 0  # a checkpoint from before the steps an epoch were saved, or schedules that span max_steps
        return step - round((step - offset) * self.steps_per_epoch / per_epoch)

    def configure_optimizers(self):
        c = self.optim_config
        # Fused SGD/AdamW kernels where the parameters' device has them, except with gradient clipping: Lightning
        # refuses to clip for a fused optimizer under mixed precision (a fused step unscales fp16 gradients itself,
        # so they would be clipped while still scaled), and the DINO recipe clips in bf16-mixed.
        opt = make_optimizer(self, c, fused=False if self.trainer.gradient_clip_val else None)
        total, steps_per_epoch = schedule_steps(self.trainer)
        warmup = min(total, round(c.warmup_epochs * steps_per_epoch))
        sched = cosine_schedule(1.0, c.min_lr / c.lr, total, warmup)  # multiplier of lr, one value per step
        self.make_schedules(total, steps_per_epoch)
        self.schedule_steps, self.steps_per_epoch = total, steps_per_epoch
        self.schedule_offset = offset = self._resumed_offset()
        lam = lambda step: float(sched[min(max(step - offset, 0), len(sched) - 1)])  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lam)
        # this run's settings of each group (lr, weight decay, momentum, betas), which restoring a checkpoint's
        # optimizer and scheduler replaces with the checkpoint's: see on_train_start
        self._configured_groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _apply_configured_optimizer(self) -> None:
        """Give a resumed run's optimizer this run's settings, where restoring the checkpoint put back its own.

        Lightning restores the optimizer's param groups (lr, weight_decay, momentum, betas) and the scheduler's
        base rates from the checkpoint, so a resumed run given another ``optim.lr`` or ``weight_decay`` trained
        on with the checkpoint's, silently: a run resumed from the last good checkpoint with a lower lr, as a
        non-finite loss advises, diverged again at the same rate. The moments and step counts stay the
        checkpoint's; the rate of the step about to be taken is this run's schedule's (a scheduler whose schedule
        changed still held the old schedule's for one step). With unchanged settings every value is the same.
        """
        configs = self.trainer.lr_scheduler_configs
        if not configs or not self.trainer.optimizers:
            return
        opt, scheduler = self.trainer.optimizers[0], configs[0].scheduler
        for group, configured in zip(opt.param_groups, self._configured_groups):
            group.update(configured)
        scheduler.base_lrs = [group["initial_lr"] for group in opt.param_groups]
        for group, base, lam in zip(opt.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * lam(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in opt.param_groups]

    def optimizer_step(self, *args, **kwargs) -> None:
        """The optimizer step, then the EMA update of the targets with the same step's momentum.

        Here rather than in ``on_train_batch_end``, which Lightning calls after the callbacks' (a checkpoint
        written there would miss the step's EMA update), and which also runs on accumulating batches.
        """
        super().optimizer_step(*args, **kwargs)
        if self.ema_pairs():
            m = self.scheduled(self.momentum_schedule)  # the step just taken (global_step counts it afterwards)
            self.update_targets(m)
            if self.logs_this_step():
                self.log("train/ema_momentum", m, on_step=True, on_epoch=False)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        from ssl_toolkit.saving import keep_stopped_epoch_open

        self.check_finite()  # never write weights a non-finite loss has touched
        if self._trainer is not None:
            keep_stopped_epoch_open(checkpoint, self._trainer)
        dm = self.attached_datamodule
        logger = self._trainer.logger if self._trainer is not None and self._trainer.is_global_zero else None
        checkpoint["ssl_toolkit"] = {
            "format": CHECKPOINT_FORMAT,
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}" if dm is not None else None,
            "rng": rng_states(),
            # where the run logs: a checkpoint saved elsewhere (SLURM's requeue one) resumes logging there. Rank 0's
            # is the one written; the logger's own, not trainer.log_dir, which is a collective (a signal handler)
            "run_folder": os.path.abspath(log_dir) if (log_dir := getattr(logger, "log_dir", None)) else None,
            "schedule_steps": self.schedule_steps,  # what a resumed run's schedules are compared with
            "steps_per_epoch": self.steps_per_epoch,
            "schedule_offset": self.schedule_offset,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("ssl_toolkit", {}).get("rng")
        if rng is not None and self._trainer is not None:  # resuming a run: views and data order continue exactly
            set_rng_states(rng)
        from ssl_toolkit.checkpoint import refuse_other_optimizer

        refuse_other_optimizer(checkpoint, self.hparams)
        if self._trainer is None or self.trainer.state.fn != "fit":
            return  # loaded to use, or to train afresh (load_from_checkpoint): not resumed
        if self.trainer.datamodule is not None:
            from ssl_toolkit.data.base import move_epoch_position

            note = move_epoch_position(checkpoint, self.trainer.datamodule, self.trainer.world_size,
                                       self.trainer.accumulate_grad_batches)
            if note and self.trainer.is_global_zero:
                print(note, file=sys.stderr, flush=True)
        saved = checkpoint.get("lr_schedulers") or [{}]
        rates = saved[0].get("_last_lr"), saved[0].get("base_lrs")
        ours = checkpoint.get("ssl_toolkit", {})
        self._resumed = {"step": checkpoint.get("global_step", 0), "schedule_steps": ours.get("schedule_steps"),
                         "steps_per_epoch": ours.get("steps_per_epoch"),
                         "schedule_offset": ours.get("schedule_offset", 0),
                         "share": rates[0][0] / rates[1][0] if all(rates) else None}

    def on_fit_start(self) -> None:
        """Say, before training, when the views are larger than the training images (:func:`upsampling_note`), and
        under DDP how many images a step takes: ``data.batch_size`` is per process, so a single-GPU command given
        ``--trainer.devices 8`` trained at 8x the batch its learning rate was set for, without a word."""
        if not self.trainer.is_global_zero:
            return
        splits = getattr(self.trainer.datamodule, "splits", None)
        if splits is not None and len(splits.x_train):
            note = upsampling_note(self.view_config.crop_size, tuple(splits.x_train.shape[-2:]))
            if note:
                print(note, file=sys.stderr, flush=True)
        world, batch = self.trainer.world_size, getattr(self.trainer.datamodule, "batch_size", None)
        if world > 1 and batch:
            accumulate = self.trainer.accumulate_grad_batches
            times = f" x {accumulate} accumulated" if accumulate > 1 else ""
            print(f"{world} processes x data.batch_size {batch}{times} = {world * batch * accumulate:,} images a step; "
                  f"optim.lr {self.optim_config.lr:g} and the schedules are the config's, for that batch "
                  "(recipes/multi-gpu divide data.batch_size by the processes to keep a recipe's).",
                  file=sys.stderr, flush=True)

    def on_train_start(self) -> None:
        """Say when a resumed run's schedules span another length than the checkpoint's run did: ``max_epochs``,
        ``max_steps``, the batch size, the data or the accumulation changed. They are rebuilt for this run, so the
        learning rate jumps at the resumed step (a finished 6-epoch quickstart resumed with ``max_epochs`` 12
        went from 0% to 65% of its peak) and the decays follow the new length: often meant (training a finished
        run on), and not otherwise visible."""
        resumed, self._resumed = self._resumed, None
        if resumed is None:
            return
        self._apply_configured_optimizer()
        if not self.trainer.is_global_zero:
            return
        saved, share = resumed["schedule_steps"], resumed["share"]
        step = self.trainer.global_step
        configs = self.trainer.lr_scheduler_configs
        lambdas = getattr(configs[0].scheduler, "lr_lambdas", None) if configs else None
        if self.schedule_offset != resumed["schedule_offset"]:  # other steps an epoch: see _resumed_offset
            was = f" (the checkpoint's: {share:.0%})" if share is not None else ""
            at = f", with the learning rate at {lambdas[0](step):.0%} of its peak{was}" if lambdas else ""
            print(f"Resumed at step {step} with {self.steps_per_epoch} steps an epoch, where the checkpoint's run had "
                  f"{resumed['steps_per_epoch']} (data.batch_size, the number of devices or "
                  f"trainer.accumulate_grad_batches differ): its schedules, {self.schedule_steps} steps over "
                  f"trainer.max_epochs {self.trainer.max_epochs}, go on from the checkpoint's place in its epochs, "
                  f"their step {step - self.schedule_offset}{at}.",
                  file=sys.stderr, flush=True)
            return
        if saved is None or saved == self.schedule_steps:
            return
        now = f" to {lambdas[0](step):.0%}" if lambdas else ""
        jump = f": the learning rate goes from {share:.0%} of its peak{now} at this step" if share is not None else ""
        print(f"Resumed at step {step} with schedules of {self.schedule_steps} steps, where the checkpoint's run had "
              f"{saved} (trainer.max_epochs, max_steps or accumulate_grad_batches, or the data or its "
              f"batch size, differ){jump}, and the decays follow the new length.", file=sys.stderr, flush=True)
