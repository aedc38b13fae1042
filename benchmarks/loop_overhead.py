"""Lightning's per-step cost around a training step: the same SimCLR step in a plain loop and in Lightning.

The model is made tiny (a 1-channel CNN on 2 images of 8 px) so that what remains of a step is Python and kernel
launches, the part that does not shrink with a faster GPU. Each setting runs ``--steps`` steps; the median time
between the starts of two steps is reported, over ``--rounds`` interleaved rounds:
  plain:               views, loss, backward, optimizer step in a for loop;
  lightning:           the same module in ``Trainer.fit`` as the toolkit runs it (metrics logged on the steps
                       Lightning writes, ``log_every_n_steps`` 50; TensorBoard logger; no checkpoints, no bar);
  lightning_log_every_step: as before this change, every metric logged on every step;
  lightning_bar:       with the progress bar (refresh every step).

  python benchmarks/loop_overhead.py                  # CPU, one thread
  python benchmarks/loop_overhead.py --device cuda    # on a GPU

Writes ``benchmarks/results/loop-overhead-<device>.json`` with the commit, device and versions.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger

sys.path.insert(0, os.path.dirname(__file__))
from throughput import environment, sync, write_record  # noqa: E402

from ssl_toolkit.backbones import BackboneConfig  # noqa: E402
from ssl_toolkit.data import DigitsDataModule  # noqa: E402
from ssl_toolkit.methods import OptimConfig, SimCLR  # noqa: E402
from ssl_toolkit.views import ViewConfig  # noqa: E402

BATCH, SIZE, SKIP = 2, 8, 20  # images per step, their side, first steps left out of the median


def tiny() -> SimCLR:
    return SimCLR(BackboneConfig("tiny_cnn", width=1), views=ViewConfig(crop_size=SIZE), proj_hidden_dim=4,
                  proj_out_dim=4, optim=OptimConfig("sgd", lr=0.01, warmup_epochs=0))


def median_ms(starts: list[float]) -> float:
    return statistics.median(b - a for a, b in zip(starts[SKIP:], starts[SKIP + 1:])) * 1e3


def plain(steps: int, device: torch.device) -> float:
    model = tiny().to(device)
    data = DigitsDataModule(image_size=SIZE, batch_size=BATCH)
    data.setup()
    x = data.splits.x_train.to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    starts = []
    for _ in range(steps):
        sync(device)
        starts.append(time.perf_counter())
        views = model.view_policy(x[torch.randint(0, len(x), (BATCH,), device=device)])
        model.sum_losses(model.step(views)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return median_ms(starts)


class StepStarts(Callback):
    def __init__(self):
        self.starts = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(pl_module.device)
        self.starts.append(time.perf_counter())


def lightning(steps: int, device: torch.device, log_every_step: bool = False, bar: bool = False) -> float:
    model = tiny()
    if log_every_step:
        model.logs_this_step = lambda: True
    timer = StepStarts()
    trainer = pl.Trainer(max_steps=steps, accelerator=device.type, devices=1, log_every_n_steps=50,
                         logger=TensorBoardLogger(tempfile.mkdtemp()), enable_checkpointing=False,
                         enable_progress_bar=bar, enable_model_summary=False, callbacks=[timer])
    trainer.fit(model, DigitsDataModule(image_size=SIZE, batch_size=BATCH, resident=device.type == "cuda"))
    return median_ms(timer.starts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the Python cost, not the math)")
    p.add_argument("--out")
    a = p.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    settings = {"plain": lambda: plain(a.steps, device),
                "lightning": lambda: lightning(a.steps, device),
                "lightning_log_every_step": lambda: lightning(a.steps, device, log_every_step=True),
                "lightning_bar": lambda: lightning(a.steps, device, bar=True)}
    runs = {k: [] for k in settings}
    for r in range(a.rounds):
        for name, run in settings.items():
            runs[name].append(run())
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in runs.items()) + " ms/step", flush=True)
    ms = {k: statistics.median(v) for k, v in runs.items()}
    record = {**environment(device), "command": " ".join(sys.argv), "threads": a.threads, "steps": a.steps,
              "batch": BATCH, "image_size": SIZE, "model": "SimCLR, tiny_cnn width 1, projector 4-4",
              "median_ms_per_step": ms, "runs_ms_per_step": runs,
              "lightning_overhead_ms": ms["lightning"] - ms["plain"],
              "lightning_overhead_ms_log_every_step": ms["lightning_log_every_step"] - ms["plain"]}
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"loop-overhead-{device.type}.json")
    write_record(record, out)
    print(json.dumps({k: round(v, 2) for k, v in ms.items()}), f"-> {out}")


if __name__ == "__main__":
    main()
