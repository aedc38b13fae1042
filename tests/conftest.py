import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = ROOT.parent / "shared" / "datasets" / "cifar10"


def cli_command() -> list[str]:
    """The installed ``ssl-toolkit`` console script, as a user runs it (the module where it is not installed)."""
    exe = Path(sys.executable).with_name("ssl-toolkit")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "ssl_toolkit.cli"]


def run_cli(*args: str, cwd: Path, timeout: int = 600, warnings: bool = False) -> subprocess.CompletedProcess:
    """Run the installed ``ssl-toolkit`` console script, as a user would (``warnings``: as a user sees them)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    return subprocess.run(cli_command() + list(args), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env if warnings else {**env, "PYTHONWARNINGS": "ignore"})


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` skip without a CUDA GPU; ``bash benchmarks/gpu_session.sh tests`` runs them on one."""
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (benchmarks/gpu_session.sh tests runs these)")
        for item in items:
            if item.get_closest_marker("cuda"):
                item.add_marker(skip)


def small_cifar(src, dst, n_train=256, n_test=128):
    """The first ``n_train`` / ``n_test`` images of the .npz ``src`` (``cifar_small``, say), written to ``dst``."""
    with np.load(src) as f:
        np.savez(dst, x_train=f["x_train"][:n_train], y_train=f["y_train"][:n_train], x_test=f["x_test"][:n_test],
                 y_test=f["y_test"][:n_test], classes=f["classes"])
    return dst


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@contextmanager
def sigint(handler):
    """Ctrl-C (SIGINT) handled by ``handler`` inside the block; the handler before is put back afterwards."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.fixture
def python_ctrl_c():
    """Ctrl-C raises KeyboardInterrupt during the test, as in a terminal, also when pytest was started with it
    ignored (a background job of a script, ``nohup``)."""
    with sigint(signal.default_int_handler):
        yield


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """A real CIFAR-10 subset as .npz (2,000 train / 500 test, first images of the canonical order)."""
    if not (SHARED_CIFAR / "cifar10-jpeg-q75.npz").exists():
        pytest.skip("shared/datasets/cifar10 is not next to the checkout")
    sys.path.insert(0, str(SHARED_CIFAR))
    try:
        import unpack
    finally:
        sys.path.pop(0)
    pack = np.load(SHARED_CIFAR / "cifar10-jpeg-q75.npz")
    arrays = {"classes": np.array([str(c) for c in pack["classes"]])}
    for split, n in (("train", 2000), ("test", 500)):
        arrays[f"x_{split}"] = unpack._decode(unpack.jpeg_files(pack, split)[:n])
        arrays[f"y_{split}"] = pack[f"{split}_labels"][:n].astype(np.int64)
    out = tmp_path_factory.mktemp("cifar") / "cifar10_small.npz"
    np.savez(out, **arrays)
    return out


DIGITS_MEAN, DIGITS_STD = (0.3055,) * 3, (0.3237,) * 3  # digits train statistics (recipes/quickstart.yaml)


def knn_before_and_after(model, epochs: int, batch_size: int = 128, image_size: int = 32,
                         data=None) -> tuple[float, float]:
    """Train ``model`` for ``epochs`` on the CPU on ``data`` (default: digits); kNN top-1 (k=20) at random init
    and after training."""
    from ssl_toolkit.data import DigitsDataModule
    from ssl_toolkit.eval import KNNCallback

    knn = KNNCallback(every_n_epochs=10_000, k=[20])
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[knn])
    trainer.fit(model, data if data is not None else DigitsDataModule(image_size=image_size, batch_size=batch_size))
    init, trained = knn.results["init"][20], knn.results["trained"][20]
    print(f"kNN top-1 (k=20): {init:.2f}% at random init -> {trained:.2f}% trained")  # shown when a test fails
    return init, trained


SHARED_FLICKR = ROOT.parent / "shared" / "datasets" / "flickr8k-1k"


@pytest.fixture(scope="session")
def flickr() -> Path:
    """The real Flickr8k subset (1,000 images, 5 captions each) next to the checkout."""
    if not (SHARED_FLICKR / "captions.txt").exists():
        pytest.skip("shared/datasets/flickr8k-1k is not next to the checkout")
    return SHARED_FLICKR


@pytest.fixture
def count_cache_work(monkeypatch):
    """Call it to start counting the decoded-image cache's work; it returns two lists that fill as it goes: the
    number of files of each decode, and the root of each key computed (a key lists and stats every file)."""
    def start() -> tuple[list[int], list[str]]:
        from ssl_toolkit.data import cache

        decodes, keyed = [], []
        decode_files, entry_name = cache.decode_files, cache.entry_name
        monkeypatch.setattr(cache, "decode_files",
                            lambda paths, *a: decodes.append(len(paths)) or decode_files(paths, *a))
        monkeypatch.setattr(cache, "entry_name", lambda *a: keyed.append(a[0]) or entry_name(*a))
        return decodes, keyed

    return start


def mapped_from(x: torch.Tensor, path) -> bool:
    """Whether ``x``'s memory lies in this process's mapping of the file ``path`` (Linux): a view, not a copy."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(a, 16) for a in fields[0].split("-"))
            if start <= x.data_ptr() < end:
                return True
    return False
