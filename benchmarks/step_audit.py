"""Where a recipe's Lightning step spends its time on a GPU: device busy time, host waits, and each host sync's source.

The raw compiled SimCLR step takes 17.3 ms on an H100 (throughput.py) and the same step in Lightning 21.2 ms
(time_to_accuracy.py). A step is device-bound when the GPU is busy for nearly all of it; a gap is the host
failing to keep the GPU's queue full, either because it waits for the GPU (a host sync: ``.item()``, ``bool()``
of a tensor, a synchronous copy) or because it has more Python and launches to do than the GPU has work. This
runs a recipe as time_to_accuracy.py does (the local ``.npz`` resident on the device, compile as in the recipe;
no kNN evaluations) for ``--skip`` steps (compile, cudnn autotuning), then two windows of ``--steps`` steps:

  1. timing only: wall-clock per step, synchronised at the window's ends only (the speed);
  2. diagnosis: ``torch.profiler`` (device busy time per step = the union of kernel, copy and memset intervals;
     host time in each CUDA runtime call per step, e.g. ``cudaStreamSynchronize``, ``cudaLaunchKernel``) and
     ``torch.cuda.set_sync_debug_mode("warn")``, whose warnings are counted by the Python lines that caused them.

  python benchmarks/step_audit.py                                        # the SimCLR recipe
  python benchmarks/step_audit.py --recipe recipes/moco/cifar10.yaml
  python benchmarks/step_audit.py -- --trainer.precision 32-true       # more pretrain flags after --

Writes ``benchmarks/results/step-audit-<method>-<device>[-<tag>].json``. On a CPU there is no device queue to
keep full: the windows' timings and the profiler's host-side rows are still written, the device fields are null,
and window 2 counts :class:`HostReads` instead of syncs: every read of a tensor's values on the host, by source
line, which on a GPU would be a sync wherever the tensor lives on the device.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode

sys.path.insert(0, os.path.dirname(__file__))
from throughput import add_cifar_argument, environment, sync  # noqa: E402
from time_to_accuracy import pretrain_config, recipe_for_benchmark  # noqa: E402

from ssl_toolkit.methods import base  # noqa: E402

HERE = os.path.abspath(__file__)


def union_us(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by ``(start, end)`` intervals, overlaps counted once.

    Example:
        >>> union_us([(0, 4), (2, 6), (10, 11)])
        7
    """
    total, end = 0, float("-inf")
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def short(path: str) -> str:
    """A frame's file relative to the checkout or to site-packages."""
    path = os.path.abspath(path)
    if "site-packages" + os.sep in path:
        return path.rsplit("site-packages" + os.sep, 1)[1]
    root = os.path.dirname(os.path.dirname(HERE))
    return os.path.relpath(path, root) if path.startswith(root + os.sep) else path


def call_site() -> str:
    """Where the current call comes from, innermost first: the innermost toolkit/Lightning lines (up to 3), after
    the library line that made the call when that is another package's (kornia's, say); torch's own frames, the
    warnings module's and this file's are left out."""
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    skip = (HERE, os.path.abspath(warnings.__file__))  # a sync warning reaches record_sync through warnings.py
    frames = [f for f in traceback.extract_stack()
              if os.path.abspath(f.filename) not in skip and not os.path.abspath(f.filename).startswith(torch_dir)]
    own = [f for f in frames if "ssl_toolkit" in f.filename or "pytorch_lightning" in f.filename]
    chain = (own or frames)[-3:]
    if frames and own and frames[-1] is not own[-1]:
        chain.append(frames[-1])
    return " <- ".join(f"{short(f.filename)}:{f.lineno} ({f.name})" for f in reversed(chain))


class HostReads(TorchFunctionMode):
    """Counts, by :func:`call_site`, the calls that read a tensor's values on the host or size a result by them
    (``item()``, ``bool()``, ``float()``, ``tolist()``, ``.cpu()``, ``nonzero``, boolean-mask indexing and the like),
    and ``torch.tensor(host data, device=...)``, which on a GPU is a blocking copy from pageable memory.

    On a GPU each of these waits for all the work queued before it (``torch.cuda.set_sync_debug_mode`` reports
    them, on CUDA only). This finds them on a CPU, where nothing tells a device tensor from a host one: a read of a
    tensor that stays on the host on a GPU too (a schedule) is listed as well, and ``.to(device)`` of a host tensor,
    also a blocking copy on a GPU, is not seen.

    Example:
        >>> with HostReads() as reads:
        ...     y = torch.ones(3) * 2  # queued work: no read
        ...     big = bool(y.sum() > 5)  # a read: on a GPU, the host would wait here
        ...     first = y[y > 1]  # a boolean mask: the result's size depends on the values
        ...     k = torch.arange(4).repeat_interleave(2)  # counts given on the host: no read
        ...     lo = torch.tensor([0.5, 1.5], device=y.device)  # from the host to y's device: a copy
        >>> sum(reads.sites.values())
        3
    """

    NAMES = frozenset({"item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__",
                       "__format__", "__repr__", "nonzero", "argwhere", "masked_select", "unique",
                       "unique_consecutive"})

    def __init__(self):
        super().__init__()
        self.sites: Counter = Counter()

    @classmethod
    def reads(cls, name: str, args: tuple, kwargs: dict) -> bool:
        """Whether ``name(*args, **kwargs)`` needs tensor values on the host."""
        if name in cls.NAMES:
            return True
        if name in ("__getitem__", "__setitem__") and len(args) > 1:  # a boolean mask sizes the result by its values
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index)
        if name in ("tensor", "as_tensor"):  # host data copied to ``device``: a blocking copy on a GPU (torch#120996)
            return kwargs.get("device") is not None and not isinstance(args[0] if args else None, torch.Tensor)
        if name == "repeat_interleave":  # tensor counts without output_size: the output's length is their sum
            counts = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
            return isinstance(counts, torch.Tensor) and kwargs.get("output_size") is None
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.reads(getattr(func, "__name__", ""), args, kwargs):
            self.sites[call_site()] += 1
        return func(*args, **kwargs)


class BlockingFlag:
    """The non-finite flag as read before :class:`ssl_toolkit.methods.base.HostFlag`: ``bool()`` of the device
    tensor, which waits for everything queued on the stream (``--blocking-check``)."""

    def __init__(self, flag: torch.Tensor):
        self.value = flag

    def __bool__(self) -> bool:
        return bool(self.value)


class StepAudit(pl.Callback):
    """Times window 1, profiles window 2 and writes ``out`` (see the module docstring); then stops the run."""

    def __init__(self, out: str, skip: int = 30, steps: int = 20):
        self.out, self.skip, self.steps = out, skip, steps
        self.starts: list[float] = []
        self.sites: Counter = Counter()
        self.prof = None
        self.reads: HostReads | None = None  # CPU runs: what would sync on a GPU

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step, device = trainer.global_step, pl_module.device
        first, second, end = self.skip, self.skip + self.steps, self.skip + 2 * self.steps
        if step in (first, second):
            sync(device)  # only at the windows' ends: a sync each step would add the stall this looks for
        if first <= step <= second:
            self.starts.append(time.perf_counter())
        if step == second:
            self.start_diagnosis(device)
        elif step == end:
            sync(device)
            self.window2_s = time.perf_counter() - self.window2_start
            self.stop_diagnosis(device)
            self.write(trainer, pl_module)
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        if self.prof is not None:  # the run ended inside window 2: leave the profiler and warnings as they were
            self.stop_diagnosis(pl_module.device)

    def start_diagnosis(self, device: torch.device) -> None:
        self.saved_filters, self.saved_show = warnings.filters[:], warnings.showwarning
        warnings.filterwarnings("always", message=r".*synchroniz.*")
        warnings.showwarning = self.record_sync
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.start()
        if device.type == "cpu":
            self.reads = HostReads().__enter__()
        self.window2_start = time.perf_counter()

    def stop_diagnosis(self, device: torch.device) -> None:
        if self.reads is not None:
            self.reads.__exit__(None, None, None)
        self.prof.stop()
        self.events, self.prof = self.prof.events(), None
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        warnings.filters[:], warnings.showwarning = self.saved_filters, self.saved_show

    def record_sync(self, message, category, filename, lineno, file=None, line=None) -> None:
        if "synchroniz" not in str(message):  # another warning that passed the run's filters: shown as before
            self.saved_show(message, category, filename, lineno, file, line)
            return
        self.sites[call_site()] += 1

    def write(self, trainer, pl_module) -> None:
        n = self.steps
        host_ms = [(b - a) * 1e3 for a, b in zip(self.starts, self.starts[1:])]  # the host's pace, not synced
        events = self.events
        device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        busy_us = union_us([(e.time_range.start, e.time_range.end) for e in device_events]) if device_events else None
        runtime = Counter()
        runtime_us = Counter()
        for e in events:
            if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("cuda"):
                runtime[e.name] += 1
                runtime_us[e.name] += e.cpu_time_total
        wall_ms = self.window2_s * 1e3 / n
        record = {
            "steps_per_window": n, "skipped_steps": self.skip,
            "window1_ms_per_step": round((self.starts[-1] - self.starts[0]) * 1e3 / n, 2),
            "window1_host_ms_each_step": [round(t, 2) for t in host_ms],
            "window2_ms_per_step_profiled": round(wall_ms, 2),
            "device_busy_ms_per_step": round(busy_us / 1e3 / n, 2) if busy_us is not None else None,
            "device_busy_fraction": round(busy_us / 1e3 / n / wall_ms, 3) if busy_us is not None else None,
            "device_ops_per_step": round(len(device_events) / n, 1) if device_events else None,
            "cuda_runtime_per_step": {k: {"calls": round(runtime[k] / n, 2), "host_ms": round(runtime_us[k] / 1e3 / n, 3)}
                                      for k, _ in runtime_us.most_common()},
            "host_syncs_per_step": {k: round(v / n, 2) for k, v in self.sites.most_common()},
            "host_reads_per_step": ({k: round(v / n, 2) for k, v in self.reads.sites.most_common()}
                                    if self.reads is not None else None),
            "precision": str(trainer.precision), "batch_size": trainer.datamodule.batch_size,
        }
        with open(self.out, "w") as f:
            json.dump(record, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/simclr/cifar10.yaml")
    add_cifar_argument(p)
    p.add_argument("--skip", type=int, default=30, help="steps before the windows (compile, cudnn autotuning)")
    p.add_argument("--steps", type=int, default=20, help="steps in each window")
    p.add_argument("--no-compile", action="store_true", help="drop the recipe's Compile callback (eager)")
    p.add_argument("--compile-mode", help="the Compile callback's torch.compile mode, e.g. reduce-overhead (CUDA graphs)")
    p.add_argument("--blocking-check", action="store_true",
                   help="read each step's non-finite flag as before HostFlag (bool() of the device tensor): the A/B")
    p.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "ssl-toolkit-audit"))
    p.add_argument("--out", help="JSON path (default: benchmarks/results/step-audit-<method>-<device>[-<tag>].json)")
    p.add_argument("--tag", default="")
    a, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = recipe_for_benchmark(a.recipe, a.data, None, 1, a.runs, not a.no_compile)
    trainer = cfg["trainer"]
    trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("KNNCallback")]
    if a.compile_mode:
        compiles = [c for c in trainer["callbacks"] if c["class_path"].endswith("Compile")]
        if not compiles:
            raise SystemExit(f"--compile-mode: {a.recipe} has no Compile callback (or --no-compile dropped it)")
        compiles[0].setdefault("init_args", {})["mode"] = a.compile_mode
    method = cfg["model"]["class_path"].rsplit(".", 1)[1].lower()
    tag = f"-{a.tag}" if a.tag else ""
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"step-audit-{method}-{device.type}{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    window = tempfile.NamedTemporaryFile(suffix=".json", delete=False).name
    trainer["callbacks"].append({"class_path": "step_audit.StepAudit",
                                 "init_args": {"out": window, "skip": a.skip, "steps": a.steps}})
    if a.blocking_check:
        base.HostFlag = BlockingFlag
    warnings.filterwarnings("ignore")
    pretrain_config(cfg, extra)
    if not os.path.getsize(window):
        raise SystemExit(f"the run ended before step {a.skip + 2 * a.steps}, the end of the second window")
    with open(window) as fh:
        audit = json.load(fh)
    os.unlink(window)
    record = {**environment(device), "command": " ".join(sys.argv), "recipe": a.recipe, "method": method,
              "overrides": {"data": a.data, "compile": not a.no_compile, "compile_mode": a.compile_mode,
                            "blocking_check": a.blocking_check,
                            "extra": extra}, **audit}
    with open(out, "w") as fh:
        json.dump(record, fh, indent=2)
    print(json.dumps({k: record[k] for k in ("window1_ms_per_step", "window2_ms_per_step_profiled",
                                             "device_busy_ms_per_step", "device_busy_fraction",
                                             "host_syncs_per_step", "host_reads_per_step")}, indent=1)[:3000],
          f"\n-> {out}")


if __name__ == "__main__":
    main()
