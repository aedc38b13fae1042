import warnings

import pytest
import pytorch_lightning as pl
import torch

from conftest import sigint
from ssl_toolkit.backbones import BackboneConfig
from ssl_toolkit.data import DigitsDataModule
from ssl_toolkit.methods import OptimConfig, SimCLR
from ssl_toolkit.views import ViewConfig, Views


def tiny(**kw):
    return SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=32,
                  proj_out_dim=16, **kw)


def test_step_returns_named_terms_and_backprops_into_the_backbone():
    m = tiny()
    out = m.step(m.view_policy(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)))
    out["ntxent_loss"].backward()
    assert all(p.grad is not None for p in m.backbone.parameters())
    assert not out["pos_sim"].requires_grad


def test_views_are_made_only_while_training():
    m = tiny()
    batch = (torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.zeros(4, dtype=torch.long))

    class T:
        training = True

    m.trainer = T()  # stand-in for the trainer's state flag
    views, labels = m.on_after_batch_transfer(batch, 0)
    assert isinstance(views, Views) and len(views.crops) == 2
    T.training = False
    assert m.on_after_batch_transfer(batch, 0) is batch


@pytest.mark.parametrize("name", ["sgd", "lars", "adamw"])
def test_each_optimizer_trains_with_warmup_cosine_schedule(name):
    m = tiny(optim=OptimConfig(name=name, lr=0.05 if name != "adamw" else 1e-3, warmup_epochs=1))
    dm = DigitsDataModule(image_size=16, batch_size=64)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, dm)
    lrs = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    assert trainer.global_step == 6 and 0 < lrs[0] < m.optim_config.lr
    assert type(trainer.optimizers[0]).__name__ == {"sgd": "SGD", "lars": "LARS", "adamw": "AdamW"}[name]


@pytest.mark.parametrize("max_epochs,max_steps,accumulate", [(-1, 8, 1), (10, 8, 1), (3, -1, 2)])
def test_warmup_lasts_warmup_epochs_however_the_run_ends(max_epochs, max_steps, accumulate):
    """An epoch is its batches over the accumulation (3 batches here): the run's steps over max_epochs made a run
    that max_steps ends warm up for all of its 8 steps (max_epochs -1) or for one (8 // 10, at least 1)."""
    from ssl_toolkit.optim import cosine_schedule

    seen = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append(optimizer.param_groups[0]["lr"])  # the rate of this optimizer step

    m = tiny(optim=OptimConfig(name="sgd", lr=0.05, warmup_epochs=1, min_lr=0.001))
    trainer = pl.Trainer(max_epochs=max_epochs, max_steps=max_steps, accumulate_grad_batches=accumulate,
                         limit_train_batches=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[Rates()])
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=32))
    per_epoch = -(-3 // accumulate)
    total = max_steps if max_steps > 0 else per_epoch * max_epochs
    expected = cosine_schedule(0.05, 0.001, total_steps=total, warmup_steps=per_epoch)
    assert trainer.global_step == total and torch.allclose(torch.tensor(seen), expected.float(), atol=1e-7)


def test_a_run_without_a_length_is_refused_with_what_to_set():
    trainer = pl.Trainer(max_epochs=-1, max_time="00:00:00:10", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    with pytest.raises(ValueError, match=r"this run has no set length.*Set --trainer.max_epochs N or "
                                         r"--trainer.max_steps N"):
        trainer.fit(tiny(), DigitsDataModule(image_size=16, batch_size=32))
    assert trainer.global_step == 0


@pytest.mark.parametrize("max_time,said", [(20, 2), (100, 0)])
def test_max_time_short_of_the_schedules_is_said_early_with_what_fits(max_time, said, monkeypatch, capsys):
    """The schedules span max_epochs; max_time stops the run wherever they are (a 5-second run of max_epochs 1000
    stopped inside its warmup, with nothing said). On a clock of 1 s a step: 3 steps an epoch, 20 epochs."""
    import types

    import pytorch_lightning.callbacks.timer as timer_module

    from ssl_toolkit.saving import TimeOutrunsSchedules

    clock = [0.0]
    monkeypatch.setattr(timer_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    class Tick(pl.Callback):
        def on_train_batch_end(self, *args):
            clock[0] += 1.0

    notice = TimeOutrunsSchedules()
    trainer = pl.Trainer(max_epochs=20, max_time={"seconds": max_time}, limit_train_batches=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", callbacks=[Tick(), notice])  # Tick first: the Timer's check sees it
    trainer.fit(tiny(optim=OptimConfig(name="sgd", lr=0.05, warmup_epochs=2)), DigitsDataModule(image_size=16))
    assert len(notice.said) == said, notice.said
    if said:
        assert trainer.global_step == 20
        early, end = notice.said
        assert early == ("trainer.max_time: at 1 s a step, the time left ends this run near step 20 of the 60 its "
                         "schedules span (epoch 6 of 20), with the learning rate at 84% of its peak. For schedules "
                         "that end in the time, set --trainer.max_epochs 6; the whole run needs about "
                         "--trainer.max_time 00:00:01:00.")
        assert end.startswith("trainer.max_time ended the run at step 20 of the 60 its schedules span, with the "
                              "learning rate at 84% of its peak.")
        assert [line for line in capsys.readouterr().err.splitlines() if line.startswith("trainer.max")] == notice.said


def test_a_resumed_run_trains_with_its_own_optimizer_settings_and_says_when_its_schedules_changed(tmp_path, capsys):
    """Restoring a checkpoint put back its optimizer's lr and weight decay: a run resumed with a lower optim.lr (as
    a non-finite loss advises) trained on at the checkpoint's. Another optimizer's state is refused."""
    from ssl_toolkit.checkpoint import CheckpointError, load_checkpoint, method_from_checkpoint
    from ssl_toolkit.optim import cosine_schedule

    seen = []

    class Rates(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append([(g["lr"], g["weight_decay"]) for g in optimizer.param_groups])

    def fit(max_steps, ckpt_path=None, **optim):
        trainer = pl.Trainer(max_epochs=4, max_steps=max_steps, limit_train_batches=3, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             accelerator="cpu", callbacks=[Rates()])
        trainer.fit(tiny(optim=OptimConfig(warmup_epochs=0, **optim)), DigitsDataModule(image_size=16, batch_size=32),
                    ckpt_path=ckpt_path)
        return trainer

    fit(6, name="sgd", lr=0.05, weight_decay=1e-3).save_checkpoint(tmp_path / "s6.ckpt")
    assert seen[-1][0][1] == 1e-3 and "Resumed" not in capsys.readouterr().err
    seen.clear()
    fit(8, tmp_path / "s6.ckpt", name="sgd", lr=0.005, weight_decay=1e-5)
    rates = (0.005 * cosine_schedule(1.0, 0.0, total_steps=8))[6:].tolist()
    assert [step[0][0] for step in seen] == pytest.approx(rates)  # was the checkpoint's: 0.05 x the schedule
    assert [step[0][1] for step in seen] == [1e-5, 1e-5]  # was 1e-3
    assert [step[1][1] for step in seen] == [0.0, 0.0]  # biases and norms: still no decay
    assert ("Resumed at step 6 with schedules of 8 steps, where the checkpoint's run had 6 (trainer.max_epochs, "
            "max_steps or accumulate_grad_batches, or the data or its batch size, differ): the learning rate goes "
            "from 7% of its peak to 15% at this step") in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="was trained with optim.name sgd, and this run's is adamw"):
        fit(8, tmp_path / "s6.ckpt", name="adamw", lr=0.005)  # was "KeyError: 'step'"
    # a method loaded from the checkpoint and trained afresh is not resumed: it said "Resumed at step 0 ..."
    loaded = method_from_checkpoint(load_checkpoint(str(tmp_path / "s6.ckpt"))).train()
    capsys.readouterr()
    pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
               enable_model_summary=False, accelerator="cpu").fit(loaded, DigitsDataModule(image_size=16, batch_size=32))
    assert "Resumed" not in capsys.readouterr().err


def test_a_run_resumed_at_another_batch_size_goes_on_from_its_place_in_the_schedules(tmp_path, capsys):
    """The schedules span trainer.max_epochs at this run's steps an epoch, and a resumed run's began at step 0 while
    its global step went on from the checkpoint's, counted at the old size: after 2 of 4 epochs at batch 64 (38
    steps), resumed at 128 (9 steps an epoch), they spanned 36 steps, so all the rest trained at their end (the
    learning rate at its minimum, the EMA momentum at 1). They now go on from the checkpoint's place in its epochs."""
    from ssl_toolkit.methods import MoCoV2
    from ssl_toolkit.optim import cosine_schedule

    seen = []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append((optimizer.param_groups[0]["lr"], pl_module.scheduled(pl_module.momentum_schedule)))

        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = trainer.should_stop or stop_after == trainer.current_epoch + 1

    def fit(batch_size, ckpt_path=None):
        pl.seed_everything(0)
        model = MoCoV2(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), queue_size=256,
                       proj_hidden_dim=16, proj_out_dim=8, optim=OptimConfig("sgd", lr=0.05, warmup_epochs=0.5))
        trainer = pl.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, accelerator="cpu", callbacks=[Record()])
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=batch_size), ckpt_path=ckpt_path)
        return trainer, model

    stop_after = 2
    trainer, model = fit(64)
    assert trainer.global_step == 38  # 19 steps an epoch
    trainer.save_checkpoint(tmp_path / "half.ckpt")
    last = seen[-1]
    seen.clear()
    stop_after = None
    trainer, model = fit(128, tmp_path / "half.ckpt")
    assert trainer.global_step == 38 + 18 and len(seen) == 18  # 2 epochs of 9 steps at 128
    lr = 0.05 * cosine_schedule(1.0, 0.0, total_steps=36, warmup_steps=4)[18:]  # 4: warmup_epochs 0.5 of 9 steps
    momentum = cosine_schedule(*model.ema_momentum, total_steps=36)[18:]
    assert [r for r, _ in seen] == pytest.approx(lr.tolist())  # was 0.05 x the schedule's last value (0.0)
    assert [m for _, m in seen] == pytest.approx(momentum.tolist())  # was its last value, 1.0
    assert abs(seen[0][0] - last[0]) < 0.05 * 0.05 and abs(seen[0][1] - last[1]) < 0.001  # no jump
    assert ("Resumed at step 38 with 9 steps an epoch, where the checkpoint's run had 19 (data.batch_size, the number "
            "of devices or trainer.accumulate_grad_batches differ): its schedules, 36 steps over trainer.max_epochs "
            "4, go on from the checkpoint's place in its epochs, their step 18, with the learning rate at 60% of its "
            "peak (the checkpoint's: 62%)") in capsys.readouterr().err


def test_bf16_autocast_and_channels_last_step():
    m = tiny(channels_last=True)
    m.setup("fit")
    assert m.backbone[0].weight.is_contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m.step(m.view_policy(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)))
    assert out["ntxent_loss"].dtype == torch.float32 and torch.isfinite(out["ntxent_loss"])


def test_checkpoint_carries_config_and_rebuilds_the_encoder(tmp_path):
    from ssl_toolkit.checkpoint import datamodule_from_checkpoint, encoder_from_checkpoint, load_checkpoint

    m = tiny()
    dm = DigitsDataModule(image_size=16, batch_size=64)
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, dm)
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = load_checkpoint(str(tmp_path / "m.ckpt"))
    assert ckpt["ssl_toolkit"]["method"] == "ssl_toolkit.methods.simclr.SimCLR"
    assert ckpt["hyper_parameters"]["views"]["crop_size"] == 16
    enc = encoder_from_checkpoint(ckpt).eval()
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    assert torch.allclose(enc(x), m.encoder().eval()(x), atol=1e-6)
    assert isinstance(datamodule_from_checkpoint(ckpt), DigitsDataModule)


def test_v1_head_without_batch_norm_trains_and_comes_back_from_its_checkpoint(tmp_path):
    from ssl_toolkit.checkpoint import load_checkpoint, method_from_checkpoint

    m = tiny(proj_batch_norm=False)
    assert [type(x).__name__ for x in m.projector] == ["Linear", "ReLU", "Linear"]
    assert m.projector[0].bias is not None and m.projector[2].bias is not None  # W2 relu(W1 h + b1) + b2
    assert [type(x).__name__ for x in tiny().projector] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    trainer = pl.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=64))
    trainer.save_checkpoint(tmp_path / "v1.ckpt")
    back = method_from_checkpoint(load_checkpoint(str(tmp_path / "v1.ckpt")), SimCLR)
    assert [type(x).__name__ for x in back.projector] == ["Linear", "ReLU", "Linear"]
    assert torch.equal(back.projector[2].bias, m.projector[2].bias)


def test_per_view_batch_norm_encodes_each_view_as_its_own_batch():
    from ssl_toolkit.losses.ntxent import nt_xent

    torch.manual_seed(0)
    joint, split = tiny(), tiny(per_view_batch_norm=True)
    split.load_state_dict(joint.state_dict())
    views = joint.view_policy(torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8))
    a, b = views.crops
    expected = nt_xent(joint.project(a), joint.project(b), 0.5)["ntxent_loss"]  # each view normalised on its own
    together = joint.step(views)["ntxent_loss"]  # one 2B batch
    assert torch.allclose(split.step(views)["ntxent_loss"], expected, atol=1e-6)
    assert not torch.allclose(together, expected, atol=1e-3)  # batch statistics of both views differ
    assert split.hparams["per_view_batch_norm"] and not joint.hparams["per_view_batch_norm"]


def test_bad_checkpoints_are_refused_with_a_reason(tmp_path):
    from ssl_toolkit.checkpoint import CheckpointError, load_checkpoint

    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an ssl-toolkit"):
        load_checkpoint(str(tmp_path / "other.ckpt"))
    (tmp_path / "trunc.ckpt").write_bytes((tmp_path / "other.ckpt").read_bytes()[:40])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(str(tmp_path / "trunc.ckpt"))


def test_knn_callback_writes_no_file_without_a_run_folder(tmp_path, monkeypatch):
    from ssl_toolkit.eval import KNNCallback

    monkeypatch.chdir(tmp_path)
    knn = KNNCallback(k=[5])
    trainer = pl.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", callbacks=[knn])
    trainer.fit(tiny(), DigitsDataModule(image_size=16, batch_size=64))
    assert set(knn.results) == {"init", "trained"} and not list(tmp_path.iterdir())


def test_non_finite_loss_stops_the_run_without_overwriting_a_good_checkpoint(tmp_path):
    import os

    from pytorch_lightning.callbacks import ModelCheckpoint

    from ssl_toolkit.checkpoint import load_checkpoint
    from ssl_toolkit.data import DigitsDataModule
    from ssl_toolkit.methods import NonFiniteLossError

    class Diverging(SimCLR):
        def step(self, views):
            out = super().step(views)
            if self.global_step >= 5:  # the loss becomes NaN at step 5, as a diverging run would
                out["ntxent_loss"] = out["ntxent_loss"] * float("nan")
            return out

    model = Diverging(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                      proj_out_dim=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=2, save_last=True, save_top_k=-1)
    trainer = pl.Trainer(max_epochs=3, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[ckpt])
    with pytest.raises(NonFiniteLossError, match="not finite at step 5") as err:
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=128))
    message = str(err.value)
    assert "ntxent_loss=nan" in message and "last.ckpt" in message and "--ckpt_path" in message
    last = load_checkpoint(str(tmp_path / "last.ckpt"))
    assert last["global_step"] <= 5  # saved before the bad step, never after it
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values() if t.is_floating_point())
    assert not any(f.startswith("epoch=0-step=6") for f in os.listdir(tmp_path))


@pytest.mark.cuda
def test_reading_the_last_steps_finite_flag_does_not_wait_for_work_queued_after_it():
    from ssl_toolkit.methods.base import HostFlag

    loss = torch.tensor(float("inf"), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any stream or device sync raises
    try:
        flag = HostFlag(torch.isfinite(loss))
        torch.cuda._sleep(2_000_000_000)  # about a second of GPU work queued behind the flag: the next step
        finite = bool(flag)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    still_busy = not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
    assert not finite and still_busy  # read while the later work still ran (bool(tensor) would wait for it)


def test_a_checkpoint_write_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    from ssl_toolkit.checkpoint import load_checkpoint
    from ssl_toolkit.saving import AtomicCheckpointIO

    model = SimCLR(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                   proj_out_dim=8)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    good = path.read_bytes()
    save = torch.save

    def killed(obj, f):  # the process dies after half of the bytes reached the disk
        save(obj, f)
        f.seek(len(good) // 2)
        f.truncate()
        raise KeyboardInterrupt("killed during the write")

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == good  # the half-written bytes went to a temporary file, never over the checkpoint
    assert load_checkpoint(str(path))["global_step"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # and the temporary file is gone


def test_collapse_monitor_warns_for_a_collapsed_run_and_stays_quiet_otherwise(capsys):
    from ssl_toolkit.eval import CollapseMonitor
    from ssl_toolkit.losses import nt_xent

    assert nt_xent(torch.ones(8, 16), torch.ones(8, 16), 0.5)["z_std"].item() == 0.0  # one point
    assert nt_xent(torch.randn(256, 16), torch.randn(256, 16), 0.5)["z_std"].item() > 0.9  # spread out

    class Collapsed(SimCLR):
        def step(self, views):
            z = self.projector(self.backbone(views.crops[0])) * 0 + 1  # every image maps to the same point
            return nt_xent(z, z, 0.5)

    def run(cls):
        monitor = CollapseMonitor(after_epochs=0)
        model = cls(BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16), proj_hidden_dim=16,
                    proj_out_dim=8)
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=2, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[monitor])
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=64))
        return monitor, trainer

    with pytest.warns(UserWarning, match="Possible collapse at epoch 0: train/z_std = 0 is below 0.1"):
        monitor, trainer = run(Collapsed)
    assert "train/z_std" in monitor.warned and trainer.callback_metrics["diagnostics/collapse"] == 1.0
    assert "Possible collapse" in capsys.readouterr().out
    monitor, trainer = run(SimCLR)
    assert not monitor.warned and trainer.callback_metrics["diagnostics/collapse"] == 0.0


KILLS = {  # where the process dies -> (checkpoint schedule, step of the checkpoint it resumes from)
    "after an epoch": ("every epoch", 9),
    "mid-epoch": ("every 3 steps", 12),  # epoch 1, batch 3 of 9
    "after an epoch's last batch": ("every 3 steps", 9),  # saved in on_train_batch_end, before the epoch ends
}


@pytest.mark.parametrize("kill", list(KILLS))
@pytest.mark.parametrize("method", ["simclr", "moco", "dino"])
def test_resuming_from_the_last_checkpoint_gives_the_uninterrupted_weights(method, kill, tmp_path):
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from ssl_toolkit.methods import DINO, MoCoV2

    schedule, resume_step = KILLS[kill]

    class Killed(Exception):
        pass

    class KillAfterCheckpoint(Callback):  # the process dies after the checkpoint, during the next step
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == resume_step:
                raise Killed

    def fit(folder, callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        args = dict(backbone=BackboneConfig("tiny_cnn", width=4), views=ViewConfig(crop_size=16),
                    optim=OptimConfig("sgd", lr=0.05, warmup_epochs=0.5))
        if method == "dino":  # teacher EMA, center, teacher-temperature and last-layer-freeze schedules
            model = DINO(args["backbone"], optim=OptimConfig("adamw", lr=1e-3, warmup_epochs=0.5),
                         views=ViewConfig(crop_size=16), num_local_crops=2, local_crop_size=8, out_dim=32,
                         hidden_dim=16, bottleneck_dim=8, warmup_teacher_temp_epochs=1.5)
        else:
            model = (MoCoV2(**args, queue_size=512, proj_hidden_dim=16, proj_out_dim=8) if method == "moco"
                     else SimCLR(**args, proj_hidden_dim=16, proj_out_dim=8))
        every = {"every_n_epochs": 1} if schedule == "every epoch" else {"every_n_train_steps": 3}
        trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False,
                             callbacks=[ModelCheckpoint(dirpath=folder, save_last=True, **every), *callbacks])
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=128), ckpt_path=ckpt_path)
        return model, trainer

    straight, _ = fit(tmp_path / "a")
    with pytest.raises(Killed):
        fit(tmp_path / "b", [KillAfterCheckpoint()])
    last = str(tmp_path / "b" / "last.ckpt")
    assert torch.load(last, weights_only=True)["global_step"] == resume_step  # 9 steps per epoch
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*dataloader is not resumable.*")  # Lightning's warning
        resumed, trainer = fit(tmp_path / "c", ckpt_path=last)
    assert trainer.global_step == 18
    for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k  # weights, EMA teacher/key encoder, MoCo queue and pointer, DINO center


@pytest.mark.parametrize("sizes", [(64, 128, 6), (48, 128, 3), (128, 48, 3)])
def test_a_mid_epoch_resume_at_another_batch_size_goes_on_after_the_images_trained_on(sizes, tmp_path, capsys):
    """The place in the epoch was saved as a count of batches: resumed at another batch size (or number of devices)
    it skipped that many batches of the new size, so images went untrained (64 -> 128 after 6 steps: 384 of the
    epoch's 1152) or were trained twice (128 -> 48 after 3: 240)."""
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    before, after, stop = sizes

    class Killed(Exception):
        pass

    class Indices(DigitsDataModule):  # each batch's labels are its images' indices (SimCLR does not use labels)
        def train_batch(self, idx, device):
            return super().train_batch(idx, device)[0], idx.to(device)

    class Record(Callback):
        def __init__(self, kill=False):
            self.seen, self.kill = [], kill

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.kill and trainer.global_step == stop:
                raise Killed

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seen += batch[1].tolist()

    def fit(batch_size, record, ckpt_path=None):
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, callbacks=[
                                 ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=stop), record])
        trainer.fit(tiny(), Indices(image_size=16, batch_size=batch_size), ckpt_path=ckpt_path)
        return trainer

    first, rest = Record(kill=True), Record()
    with pytest.raises(Killed):
        fit(before, first)
    trainer = fit(after, rest, ckpt_path=str(tmp_path / "last.ckpt"))
    trained = stop * before  # images of the epoch the checkpoint had trained on
    again = trained % after  # those after the last whole batch of the new size are trained on again
    steps = trained // after + len(rest.seen) // after
    assert len(first.seen) == trained and steps == 1257 // after
    assert trainer.global_step == stop + len(rest.seen) // after
    order = first.seen[:trained - again] + rest.seen  # the epoch's order, the same whatever the batch size
    assert len(set(order)) == len(order) == steps * after, (len(set(order)), len(order))
    assert set(first.seen[trained - again:]) <= set(rest.seen)
    err = capsys.readouterr().err
    assert (f"The checkpoint stopped {trained} images into its epoch, at {before} a batch (data.batch_size "
            f"{before} on 1 device); at {after} a batch this run goes on from batch {trained // after} of the "
            f"epoch") in err, err
    assert (f"training the {again} images after those again" in err) == (again > 0), err


def test_a_mid_epoch_resume_under_gradient_accumulation_starts_on_a_whole_step(tmp_path, capsys):
    """Lightning counts accumulated batches from the epoch's first: a resume moved to a batch between two steps
    (3 batches of 64 are 1.5 of 128) made its first step of one batch where the others sum two."""
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    class Killed(Exception):
        pass

    class Record(Callback):
        def __init__(self, kill=False):
            self.steps, self.kill = [], kill  # (batch index, optimizer steps after it)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if self.kill and trainer.global_step == 3:
                raise Killed

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.steps.append((batch_idx, trainer.global_step))

    def fit(batch_size, accumulate, record, ckpt_path=None):
        pl.seed_everything(0)
        trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, accumulate_grad_batches=accumulate, callbacks=[
                                 ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=3), record])
        trainer.fit(tiny(), DigitsDataModule(image_size=16, batch_size=batch_size), ckpt_path=ckpt_path)

    with pytest.raises(Killed):
        fit(64, 1, Record(kill=True))
    rest = Record()
    fit(128, 2, rest, ckpt_path=str(tmp_path / "last.ckpt"))  # 192 images trained: 1.5 batches of 128
    assert rest.steps[:4] == [(0, 3), (1, 4), (2, 4), (3, 5)], rest.steps  # from the epoch's start: 2 a step
    assert "goes on from batch 0 of the epoch (the first of 2 summed into a step), training the 192 images after " \
        "those again." in capsys.readouterr().err


def test_a_mid_epoch_place_moves_with_the_number_of_devices():
    """Devices take turns through the epoch's order, so images a batch is data.batch_size times the devices."""
    from ssl_toolkit.data.base import move_epoch_position

    def checkpoint(done=False):  # 6 batches of 64 on each of 2 devices into the second epoch
        def counts(n):
            return dict(ready=n, started=n, processed=n, completed=n)

        order = {"seed": None, "taken": 6, "epoch_done": done, "batch_size": 64, "world_size": 2}
        progress = {"current": counts(6), "total": counts(15), "is_last_batch": False}
        loops = {"fit_loop": {"epoch_loop.batch_progress": progress}}
        return {"DigitsDataModule": {"epoch_order": order}, "loops": loops}

    def moved(batch_size, devices, done=False):
        c = checkpoint(done)
        note = move_epoch_position(c, DigitsDataModule(image_size=16, batch_size=batch_size), devices)
        progress = c["loops"]["fit_loop"]["epoch_loop.batch_progress"]
        assert progress["current"]["completed"] == c["DigitsDataModule"]["epoch_order"]["taken"]
        return c["DigitsDataModule"]["epoch_order"]["taken"], progress["total"]["ready"], note

    other = " (the epoch's order on one device is not that on several: which images were trained on is not kept"
    assert moved(64, 4) == (3, 12, "The checkpoint stopped 768 images into its epoch, at 128 a batch (data.batch_size "
                                   "64 on 2 devices); at 256 a batch this run goes on from batch 3 of the epoch.")
    taken, total, note = moved(48, 3)
    assert (taken, total) == (5, 14) and "at 144 a batch this run goes on from batch 5 of the epoch, training the 48 " \
        "images after those again." in note
    taken, total, note = moved(128, 1)  # as many images a batch, in another order
    assert (taken, total) == (6, 15) and other in note and "data.batch_size 64 on 2 devices); at 128 a batch" in note
    assert moved(64, 2) == (6, 15, None) and moved(32, 4) == (6, 15, None) and moved(64, 4, done=True) == (6, 15, None)
    c = checkpoint()  # accumulated 4 batches a step: from batch 4, the first of a step, and 2 batches again
    note = move_epoch_position(c, DigitsDataModule(image_size=16, batch_size=64), 2, accumulate=4)
    assert c["DigitsDataModule"]["epoch_order"]["taken"] == 4 and note.endswith(
        "at 128 a batch this run goes on from batch 4 of the epoch (the first of 4 summed into a step), training the "
        "256 images after those again.")
    assert move_epoch_position(checkpoint(), DigitsDataModule(image_size=16, batch_size=64), 2, accumulate=3) is None


@pytest.mark.parametrize("signals", ["SIGTERM", "SIGTERM while accumulating", "Ctrl-C twice"])
def test_sigterm_ends_the_run_after_the_step_with_a_checkpoint_and_a_second_ctrl_c_at_once(signals, tmp_path,
                                                                                            python_ctrl_c):
    """The first Ctrl-C is in the CLI's resume test; Lightning alone would run on to the epoch's end on SIGTERM."""
    import os
    import signal

    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from ssl_toolkit.errors import RunStopped
    from ssl_toolkit.saving import StopAndSave

    accumulate = 2 if "accumulating" in signals else 1

    class Send(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2 and trainer.current_epoch == 0:  # the third batch: step 3, or step 2's first half
                for s in [signal.SIGTERM] if "SIGTERM" in signals else [signal.SIGINT, signal.SIGINT]:
                    os.kill(os.getpid(), s)

    def fit(folder, callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        model = tiny()
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=6, accumulate_grad_batches=accumulate,
                             accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*callbacks, StopAndSave(), ModelCheckpoint(dirpath=folder, save_last=True)])
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32), ckpt_path=ckpt_path)
        return model

    last = tmp_path / "b" / "last.ckpt"
    if signals == "Ctrl-C twice":
        with pytest.raises(SystemExit):  # Lightning's KeyboardInterrupt exit, in the middle of the step
            fit(tmp_path / "b", [Send()])
        assert not last.exists()  # nothing saved: the first epoch's save was three steps away
    else:
        step = 3 if accumulate == 1 else 2  # after the step in progress (both halves of it when accumulating)
        with pytest.raises(RunStopped, match=f"SIGTERM: stopped at epoch 0, step {step}. Saved {last}") as stop:
            fit(tmp_path / "b", [Send()])
        assert stop.value.exit_code == 143 and torch.load(last, weights_only=True)["global_step"] == step
        straight, resumed = fit(tmp_path / "a"), fit(tmp_path / "b", ckpt_path=str(last))
        for (k, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), k
        # the resumed run's last.ckpt replaces the one it resumed from (it wrote last-v1.ckpt beside it, and a
        # chain of jobs resumed from the older one)
        assert sorted(p.name for p in last.parent.glob("last*")) == ["last.ckpt"]
        assert torch.load(last, weights_only=True)["global_step"] == 12 // accumulate
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # both handlers as they were
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_ctrl_c_ignored_when_training_starts_stays_ignored_and_sigterm_still_saves(tmp_path):
    """`nohup ssl-toolkit pretrain ... &` in a script starts the run with Ctrl-C ignored: it must not stop it."""
    import os
    import signal

    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    from ssl_toolkit.errors import RunStopped
    from ssl_toolkit.saving import StopAndSave

    class Send(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 2:  # Ctrl-C in the first epoch, SIGTERM in the second
                os.kill(os.getpid(), signal.SIGINT if trainer.current_epoch == 0 else signal.SIGTERM)

    with sigint(signal.SIG_IGN):
        trainer = pl.Trainer(max_epochs=2, limit_train_batches=6, accelerator="cpu", logger=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[Send(), StopAndSave(), ModelCheckpoint(dirpath=tmp_path, save_last=True)])
        with pytest.raises(RunStopped, match="SIGTERM: stopped at epoch 1, step 9. Saved"):
            trainer.fit(tiny(), DigitsDataModule(image_size=16, batch_size=32))
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


@pytest.mark.parametrize("saves", [{}, {"every_n_train_steps": 500}], ids=["every-epoch", "every-500-steps"])
@pytest.mark.parametrize("max_steps", [-1, 15], ids=["max-epochs", "max-steps"])
def test_a_run_stopped_mid_epoch_by_max_time_resumes_with_the_rest_of_the_epoch(saves, max_steps, tmp_path):
    """trainer.should_stop mid-epoch (max_time, early stopping, max_steps): Lightning's epoch-end save used to mark
    the epoch done while the data order still held its remaining batches, so the resumed run trained an epoch short.
    With the CIFAR-10 recipes' saves (every 500 steps) last.ckpt is written when training ends, after Lightning has
    counted the epoch completed too, and with max_steps set Lightning takes that count as it is: each resume began
    the next epoch at the stopped one's place (its last batches untrained, the epochs counted one ahead)."""
    from pytorch_lightning.callbacks import Callback, ModelCheckpoint

    class OutOfTime(Callback):  # what Timer does when max_time is up
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2:
                trainer.should_stop = True

    def fit(folder, callbacks=(), ckpt_path=None):
        pl.seed_everything(0)
        model = tiny()
        trainer = pl.Trainer(max_epochs=3, max_steps=max_steps, limit_train_batches=5, accelerator="cpu",
                             logger=False, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[*callbacks, ModelCheckpoint(dirpath=folder, save_last=True, **saves)])
        trainer.fit(model, DigitsDataModule(image_size=16, batch_size=32), ckpt_path=ckpt_path)
        return model, trainer

    fit(tmp_path / "b", [OutOfTime()])
    last = str(tmp_path / "b" / "last.ckpt")
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 8 and saved["epoch"] == 1  # 5 + 3 of epoch 1's 5 batches
    (straight, a), (resumed, b) = fit(tmp_path / "a"), fit(tmp_path / "c", ckpt_path=last)
    assert b.global_step == a.global_step == 15 and b.current_epoch == a.current_epoch == 3
    for (k, x), y in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k


def test_views_larger_than_the_training_images_are_said_before_training(capsys):
    """An image folder decoded at its default 32 px under 96 px views trained on upsampled images without a word."""
    said = []
    for image_size in (8, 16):  # 16 px views of 8 px images, then of 16 px ones
        trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, accelerator="cpu", logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(tiny(), DigitsDataModule(image_size=image_size, batch_size=16))
        said.append(capsys.readouterr().err)
    assert ("views.crop_size 16 is larger than the training images (8x8 px): each view is upsampled, 4.0x the pixels "
            "for the backbone with no detail added. Decode the images at the crop size where the data takes "
            "data.image_size (image folders, captions, digits: --data.image_size 16), or lower views.crop_size to 8."
            ) in said[0], said[0]
    assert "views.crop_size" not in said[1]


def test_last_checkpoint_holds_the_end_state_when_saves_are_every_n_epochs(tmp_path):
    from pytorch_lightning.callbacks import ModelCheckpoint

    from ssl_toolkit.checkpoint import load_checkpoint
    from ssl_toolkit.saving import save_final_checkpoint

    m = tiny()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_epochs=2)
    trainer = pl.Trainer(max_epochs=3, limit_train_batches=2, logger=False, callbacks=[ckpt], enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu")
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=32))
    assert load_checkpoint(str(tmp_path / "last.ckpt"))["global_step"] == 4  # the scheduled save: epoch 2 of 3
    save_final_checkpoint(trainer)
    final = load_checkpoint(str(tmp_path / "last.ckpt"))
    assert final["global_step"] == 6 and ckpt.last_model_path == str(tmp_path / "last.ckpt")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in final["state_dict"].items())


def test_metrics_are_logged_only_on_the_steps_lightning_writes_and_an_epochs_last_batch(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import CSVLogger

    m = tiny()
    logged_at = []
    log_dict = m.log_dict
    monkeypatch.setattr(m, "log_dict", lambda *a, **k: (logged_at.append(m.global_step), log_dict(*a, **k)))
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=7, log_every_n_steps=3, accelerator="cpu",
                         logger=CSVLogger(tmp_path), enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(m, DigitsDataModule(image_size=16, batch_size=32))
    assert logged_at == [2, 5, 6]  # steps 3 and 6 of 7 (written), and the last batch (for epoch-end callbacks)
    rows = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    steps = [int(r.split(",")[rows[0].split(",").index("step")]) for r in rows[1:] if "," in r]
    assert steps == [2, 5] and "train/ntxent_loss" in rows[0] and "train/loss" in trainer.callback_metrics
