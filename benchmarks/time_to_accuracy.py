"""Time to accuracy: a CIFAR-10 recipe run end to end, its wall-clock and its kNN top-1 along the way.

  python benchmarks/time_to_accuracy.py --recipe recipes/simclr/cifar10.yaml --data data/cifar10/cifar10.npz
  python benchmarks/time_to_accuracy.py --recipe recipes/moco/cifar10.yaml --data ... --epochs 100
  python benchmarks/time_to_accuracy.py ... -- --trainer.limit_train_batches 2   # more pretrain flags after --
  python benchmarks/time_to_accuracy.py --recipe recipes/rotation/cifar10.yaml --epochs 20 --probe   # + linear probe

The recipe runs as written (model, views, optimizer, precision, checkpoints, callbacks) except: the data
come from the local ``.npz`` (resident on the device, as the recipe's CIFARDataModule), ``--epochs`` (the
schedules are built for that many), the kNN callback every ``--knn-every`` epochs, no progress bar (this
is a log, not a terminal) and the run folder. Wall-clock counts from before the data are loaded to after
the last kNN evaluation, both included; Python's start and imports are not. ``torch.compile`` starts from an
empty on-disk cache, so its time is a first run's (``--warm-compile-cache`` keeps the usual cache). Writes
``benchmarks/results/time-to-accuracy-<method>-<device>.json``: that time, the training and evaluation
seconds, the kNN curve (epoch, seconds since the start and the evaluation's own, top-1 at each k; rewritten after
every evaluation, so a run cut short keeps it, with ``finished: false``), the steady training ms per step between the
first and last evaluation after training started (after the compile), the random-init baseline, peak GPU memory, the
commit, device and library versions. With ``--probe``, the final checkpoint also gets ``ssl-toolkit probe``
(cached features, 100 epochs; its time is not part of the wall-clock) and the JSON its top-1.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import torch
import yaml

sys.path.insert(0, os.path.dirname(__file__))
from throughput import add_cifar_argument, environment, sync  # noqa: E402  (same commit/device/versions record)

from ssl_toolkit.cli import pretrain  # noqa: E402
from ssl_toolkit.eval import KNNCallback  # noqa: E402


def pretrain_config(cfg: dict, extra: list[str]):
    """``ssl-toolkit pretrain`` on a config dict (through a temporary YAML file) and more flags; returns the trainer."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(cfg, f)
    try:
        return pretrain(["--config", f.name, *extra])
    finally:
        os.unlink(f.name)


def recipe_for_benchmark(recipe: str, data: str, epochs: int | None, knn_every: int, runs: str,
                         compile: bool = True) -> dict:
    with open(recipe) as f:
        cfg = yaml.safe_load(f)
    trainer = cfg["trainer"]
    if epochs:
        trainer["max_epochs"] = epochs
    trainer["enable_progress_bar"] = False
    trainer["logger"]["init_args"]["save_dir"] = runs
    knn = [c for c in trainer.get("callbacks", []) if c["class_path"].endswith("KNNCallback")]
    if not knn:
        raise SystemExit(f"{recipe} has no KNNCallback; time to accuracy needs one.")
    knn[0].setdefault("init_args", {})["every_n_epochs"] = knn_every
    if not compile:
        trainer["callbacks"] = [c for c in trainer["callbacks"] if not c["class_path"].endswith("Compile")]
    batch = cfg["data"].get("init_args", {}).get("batch_size", 512)
    cfg["data"] = {"class_path": "ssl_toolkit.data.NpzDataModule",
                   "init_args": {"path": data, "batch_size": batch, "resident": True}}
    return cfg


def steady_ms_per_step(curve: list[dict]) -> float | None:
    """Training ms per step between the first evaluation after training started and the last one, evaluations left
    out: the pace after the compile and cudnn's autotuning (checkpoint saves and logging included). Each curve point's
    ``seconds`` is taken after its evaluation, so the evaluations after the first point are subtracted.

    Example:
        >>> steady_ms_per_step([{"step": 0, "seconds": 5.0, "eval_s": 1.0}, {"step": 100, "seconds": 60.0, "eval_s": 1.0},
        ...                     {"step": 300, "seconds": 65.0, "eval_s": 1.0}])
        20.0
    """
    trained = [c for c in curve if c.get("step")]
    if len(trained) < 2:
        return None
    first, last = trained[0], trained[-1]
    seconds = last["seconds"] - first["seconds"] - sum(c["eval_s"] for c in trained[1:])
    return round(1e3 * seconds / (last["step"] - first["step"]), 2)


def linear_probe_of(ckpt: str, data: str) -> dict:
    """``ssl-toolkit probe`` on ``ckpt`` with the local data: its top-1/top-5 and seconds."""
    from ssl_toolkit.cli import main as cli

    if not ckpt or not os.path.isfile(ckpt):
        raise SystemExit("--probe needs the run's last checkpoint; the recipe's ModelCheckpoint has save_last: true.")
    out = ckpt + ".probe.json"
    start = time.perf_counter()
    if cli(["probe", "--ckpt", ckpt, "--data", data, "--out", out]) != 0:
        raise SystemExit(f"ssl-toolkit probe failed on {ckpt}")
    result = json.load(open(out))
    return {"top1": result["top1"], "top5": result["top5"], "protocol": result["protocol"],
            "epochs": result["epochs"], "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/simclr/cifar10.yaml")
    add_cifar_argument(p)
    p.add_argument("--epochs", type=int, help="default: the recipe's max_epochs")
    p.add_argument("--knn-every", type=int, default=10)
    p.add_argument("--no-compile", action="store_true", help="drop the recipe's Compile callback (eager)")
    p.add_argument("--probe", action="store_true", help="then a linear probe on the final checkpoint")
    p.add_argument("--runs", default=os.path.join(tempfile.gettempdir(), "ssl-toolkit-bench"))
    p.add_argument("--out", help="JSON path (default: benchmarks/results/time-to-accuracy-<method>-<device>.json)")
    p.add_argument("--tag", default="", help="suffix of the default JSON name")
    p.add_argument("--note", default="", help="written into the JSON (e.g. that other runs shared the GPU)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="keep torch.compile's on-disk cache (default: a fresh one, so the compile is a first run's)")
    a, extra = p.parse_known_args()
    extra = [x for x in extra if x != "--"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device)
    if not a.warm_compile_cache:  # a cache left by an earlier run of the same recipe would cut the compile time
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor-cold-")
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    cache = cache_dir()
    compile_cache = {"dir": cache, "warm_at_start": os.path.isdir(cache) and any(os.scandir(cache))}
    cfg = recipe_for_benchmark(a.recipe, a.data, a.epochs, a.knn_every, a.runs, not a.no_compile)
    method = cfg["model"]["class_path"].rsplit(".", 1)[1].lower()

    tag = f"-{a.tag}" if a.tag else ""
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"time-to-accuracy-{method}-{device.type}{tag}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    record = {**env, "command": " ".join(sys.argv), "recipe": a.recipe, "method": method,
              "overrides": {"data": a.data, "knn_every": a.knn_every, "compile": not a.no_compile, "extra": extra},
              "compile_cache": compile_cache, "finished": False, "curve": [], **({"note": a.note} if a.note else {})}

    def write() -> None:
        with open(out, "w") as fh:
            json.dump(record, fh, indent=2)

    eval_seconds: list[float] = []
    evaluate = KNNCallback.evaluate
    start = time.perf_counter()

    def timed_evaluate(self, trainer, pl_module):  # the evaluations' share of the wall-clock, and the curve
        sync(pl_module.device)
        t = time.perf_counter()
        result = evaluate(self, trainer, pl_module)
        sync(pl_module.device)
        eval_seconds.append(time.perf_counter() - t)
        epoch = trainer.current_epoch + 1 if trainer.global_step else 0
        record["curve"].append({"epoch": epoch, "step": trainer.global_step,
                                "seconds": round(time.perf_counter() - start, 1), "eval_s": round(eval_seconds[-1], 2),
                                **{f"top1_k{k}": round(v, 2) for k, v in result.items()}})
        record["steady_ms_per_step"] = steady_ms_per_step(record["curve"])
        write()  # a run cut short keeps its curve
        return result

    KNNCallback.evaluate = timed_evaluate
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = pretrain_config(cfg, extra)
    sync(device)
    wall = time.perf_counter() - start

    knn_json = os.path.join(trainer.logger.log_dir, "knn.json")
    knn = json.load(open(knn_json)) if os.path.isfile(knn_json) else {}
    images = trainer.global_step * trainer.datamodule.batch_size
    train_seconds = wall - sum(eval_seconds)
    record.update({"finished": True, "epochs": trainer.current_epoch, "steps": trainer.global_step,
                   "wall_clock_s": round(wall, 1), "eval_s": round(sum(eval_seconds), 1),
                   "evaluations": len(eval_seconds), "train_s": round(train_seconds, 1),
                   "train_images_per_s": round(images / train_seconds, 1),
                   "eval_share": round(sum(eval_seconds) / wall, 4), "knn": knn,
                   "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None})
    write()
    if a.probe:
        record["probe"] = linear_probe_of(trainer.checkpoint_callback.last_model_path, a.data)
        write()
    final = knn.get("trained", {})
    print(f"{method}: {record['epochs']} epochs in {wall:.1f} s (evaluations {sum(eval_seconds):.1f} s, "
          f"{len(eval_seconds)}x); kNN top-1 {final}; peak memory {record['peak_memory_mb']} MB; wrote {out}")


if __name__ == "__main__":
    main()
