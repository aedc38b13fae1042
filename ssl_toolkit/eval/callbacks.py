"""Online evaluation during pretraining, as Lightning callbacks."""

import json
import os

import pytorch_lightning as pl

from ssl_toolkit.eval.features import extract_features
from ssl_toolkit.eval.knn import knn_accuracy


class KNNCallback(pl.Callback):
    """Weighted kNN top-1 of the frozen encoder on the datamodule's test split, logged as ``val/knn_top1``.

    It runs before training (the random-init baseline, ``val/knn_top1_init``), every
    ``every_n_epochs`` epochs and after the last one, then prints both numbers and writes
    ``knn.json`` in the run folder. Features are extracted once per evaluation and searched
    once with the largest k. ``knn.json`` is written only when the trainer has a logger (a run folder).

    Args:
        every_n_epochs: Evaluate every this many epochs (raise it if evaluation time matters).
        k: Neighbours; the first value is the one logged as ``val/knn_top1``.
        temperature: Vote weight ``exp(s / T)``.
        baseline: Also evaluate the encoder at random init before training.
        batch_size: Images per forward pass during extraction.
    """

    def __init__(self, every_n_epochs: int = 1, k: list[int] = [20, 200], temperature: float = 0.07,  # noqa: B006
                 baseline: bool = True, batch_size: int = 512):
        if every_n_epochs < 1 or not k or min(k) < 1:
            raise ValueError(f"KNNCallback needs every_n_epochs >= 1 and k values >= 1; got {every_n_epochs}, {k}.")
        self.every_n_epochs, self.ks, self.temperature = every_n_epochs, list(k), temperature
        self.baseline, self.batch_size = baseline, batch_size
        self.results: dict[str, dict[int, float]] = {}

    def evaluate(self, trainer: pl.Trainer, pl_module) -> dict[int, float]:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "iter_split"):
            raise TypeError("KNNCallback needs a toolkit DataModule (with iter_split); pass one as data in the config.")
        encoder = pl_module.encoder()
        train = extract_features(encoder, dm, "train", pl_module.device, self.batch_size)
        test = extract_features(encoder, dm, "test", pl_module.device, self.batch_size)
        return knn_accuracy(train[0], train[1], test[0], test[1], dm.num_classes, tuple(self.ks), self.temperature)

    def _metrics(self, prefix: str, acc: dict[int, float]) -> dict[str, float]:
        first = min(self.ks[0], max(acc))
        return {prefix: acc[first], **{f"{prefix}_k{k}": v for k, v in acc.items()}}

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.baseline and "init" not in self.results:
            self.results["init"] = self.evaluate(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics(self._metrics("val/knn_top1_init", self.results["init"]), step=0)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        epoch = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs
        if epoch % self.every_n_epochs and not last:
            return
        self.results["trained"] = acc = self.evaluate(trainer, pl_module)
        pl_module.log_dict(self._metrics("val/knn_top1", acc), prog_bar=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if "trained" not in self.results or not trainer.is_global_zero:
            return
        ks = sorted(self.results["trained"])
        init = self.results.get("init", {})
        lines = [f"kNN top-1 (T={self.temperature}) on {trainer.datamodule.name} test:"]
        for k in ks:
            before = f"random init {init[k]:.2f}% -> " if k in init else ""
            lines.append(f"  k={k:<4d} {before}trained {self.results['trained'][k]:.2f}%")
        print("\n".join(lines))
        if trainer.logger is not None and trainer.log_dir:  # without a logger, log_dir is the working directory
            os.makedirs(trainer.log_dir, exist_ok=True)
            with open(os.path.join(trainer.log_dir, "knn.json"), "w") as f:
                json.dump({"temperature": self.temperature, "epochs": trainer.current_epoch,
                           **{name: {str(k): v for k, v in r.items()} for name, r in self.results.items()}}, f, indent=2)
