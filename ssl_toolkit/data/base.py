"""The base DataModule: uint8 ``(B, 3, H, W)`` batches and labels, no augmentation.

Every source decodes its images once into a uint8 tensor held in memory. Training batches
are one fancy-index per step (no per-sample Python, no augmentation in workers); with
``resident=True`` the whole set is copied to the accelerator once and each step only moves
the batch's indices, because 2-16 CPU workers cannot feed a GPU at CIFAR scale.
"""

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from ssl_toolkit.data.cache import decode_cached, decode_one_part
from ssl_toolkit.data.images import Decoded, cpu_cores
from ssl_toolkit.distributed import rank

log = logging.getLogger(__name__)


@dataclass
class Splits:
    """Decoded arrays of one dataset: images ``(N, 3, H, W)`` uint8, labels ``(N,)`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]

    @classmethod
    def test_alone(cls, x_test: torch.Tensor, y_test: torch.Tensor, classes: list[str]) -> "Splits":
        """The test split with an empty training split (of the same image shape), as ``only_test`` loads it."""
        return cls(x_test[:0], y_test[:0], x_test, y_test, classes)


def check_images(x: torch.Tensor, name: str, source: str) -> None:
    """Raise a ValueError naming ``name`` and ``source`` unless ``x`` is uint8 ``(N, 3, H, W)``."""
    if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"{source}: {name} must be a non-empty uint8 array of RGB images (N, 3, H, W); "
                         f"got {x.dtype} {tuple(x.shape)}.")


class _Batches(Dataset):
    """Index-addressed view of a split; ``__getitems__`` serves a whole batch at once through ``fetch``."""

    def __init__(self, fetch, size: int, indices_only: bool):
        self.fetch, self.size, self.indices_only = fetch, size, indices_only

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, idx: list[int]):
        idx = torch.as_tensor(idx)
        if self.indices_only:
            return (idx,)  # resident mode: the batch is gathered on the device
        return self.fetch(idx, torch.device("cpu"))


def _stacked(batch):
    return batch  # ``__getitems__`` already returns stacked tensors


@dataclass
class EpochOrder:
    """Where training is in the current epoch: its shuffle seed and how many of its batches were trained on.

    Shared by the DataModule, which counts the batches it hands to the model and saves this in checkpoints, and
    the batch sampler, which draws the seed and, on a resume, skips the batches already trained on.
    """

    seed: int | None = None
    taken: int = 0
    resume: tuple[int | None, int] | None = None  # (seed, batches to skip) for the next pass over the data

    def state_dict(self, epoch_batches: int | float, batch_size: int, world_size: int) -> dict:
        return {"seed": self.seed, "taken": self.taken, "epoch_done": self.taken >= epoch_batches,
                "batch_size": batch_size, "world_size": world_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch where it stopped; after a finished epoch the next one starts afresh."""
        self.resume = None if state["epoch_done"] else (state["seed"], state["taken"])


def move_epoch_position(checkpoint: dict, datamodule, world_size: int, accumulate: int = 1) -> str | None:
    """Put a checkpoint's place in its epoch into batches of this run's size; returns the line that says so.

    The place is a count of batches, the DataModule's and Lightning's own. Resumed at another batch size or
    number of devices, the same count of the new batches skipped other images than were trained on: 64 -> 128
    after 6 batches left 384 of the epoch's 1152 images untrained, 128 -> 48 after 3 trained 240 twice. The epoch's
    order of images is the same at any batch size (devices take turns through it), so both counts become the whole
    new batches in the images trained on, and those past the last of them are trained on again. Under gradient
    accumulation (``accumulate`` batches a step; Lightning counts them from the epoch's first batch) the count is
    rounded down to whole steps: from a count between them, the first step summed fewer batches, at the same
    weight each (3 of 4: a step three quarters as long). Rewrites ``checkpoint`` before Lightning restores the
    DataModule and its loops from it.
    """
    state = (checkpoint.get(type(datamodule).__qualname__) or {}).get("epoch_order")
    if not state or state["epoch_done"] or "batch_size" not in state or not isinstance(datamodule, InMemoryDataModule):
        return None  # between two epochs, or from before the batch size was saved
    was, now = (state["batch_size"], state["world_size"]), (datamodule.batch_size, world_size)
    other_order = (was[1] == 1) != (now[1] == 1)  # one device shuffles with its own generator, several by the epoch
    images = state["taken"] * was[0] * was[1]
    taken = images // (now[0] * now[1]) // accumulate * accumulate
    if taken == state["taken"] and was[0] * was[1] == now[0] * now[1] and not other_order:
        return None
    progress = checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]
    for counts in (progress["current"], progress["total"]):
        for key in counts:
            counts[key] += taken - state["taken"]
    state["taken"] = taken
    again = images - taken * now[0] * now[1]

    def devices(n):
        return f"{n} device" + "s" * (n > 1)

    return (f"The checkpoint stopped {images} images into its epoch, at {was[0] * was[1]} a batch (data.batch_size "
            f"{was[0]} on {devices(was[1])}); at {now[0] * now[1]} a batch this run goes on from batch {taken} of "
            f"the epoch" + (f" (the first of {accumulate} summed into a step)" if accumulate > 1 else "")
            + (f", training the {again} images after those again" if again else "")
            + (" (the epoch's order on one device is not that on several: which images were trained on is not kept, "
               "only how many)" if other_order else "") + ".")


class ResumableBatchSampler(BatchSampler):
    """Shuffled batches of an epoch that a run can resume in the middle of, in the same order.

    Each epoch's shuffle seed is drawn from torch's global generator when the epoch starts (so
    ``seed_everything`` fixes the order, as with a plain shuffled DataLoader) and kept in ``order``. A resumed
    run reuses the saved seed and skips the batches already trained on. Under DDP Lightning replaces the sampler
    with a DistributedSampler, whose order is fixed by the epoch; the skipping works the same.
    """

    def __init__(self, sampler, batch_size: int, drop_last: bool, order: EpochOrder | None = None):
        super().__init__(sampler, batch_size, drop_last)
        self.order = order if order is not None else EpochOrder()

    def __iter__(self):
        o = self.order
        generator = getattr(self.sampler, "generator", None)
        if o.resume is not None:
            (seed, skip), o.resume = o.resume, None
        else:
            seed, skip = (int(torch.empty((), dtype=torch.int64).random_().item()) if generator is not None else None), 0
        o.seed, o.taken = seed, skip
        if generator is not None and seed is not None:
            generator.manual_seed(seed)
        yield from itertools.islice(super().__iter__(), skip, None)  # skipped: index lists only, no image work


class ResumableDataLoader(DataLoader):
    """Marks the training loader as resumable mid-epoch for Lightning (which otherwise warns on such a resume).

    The position itself is saved and restored by the DataModule (:class:`EpochOrder`): Lightning restores a
    DataModule before it first iterates the loader, whereas it skips restoring a loader's own state when
    ``configure_optimizers`` read ``trainer.estimated_stepping_batches`` (Lightning issue #20550), as ours does.
    """

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class InMemoryDataModule(pl.LightningDataModule):
    """Base for the toolkit's datasets; a subclass implements :meth:`load`.

    Args:
        batch_size: Images per step per device (SimCLR CIFAR-10: 512).
        num_workers: DataLoader workers; 0 is right for in-memory data (batches are one index op). A mid-epoch
            resume is exact with 0; workers start before a resumed epoch is set up (Lightning builds the first
            iterator early) and draw from their own random streams.
        resident: Copy the whole uint8 set to the accelerator once and sample indices there;
            use it when the set fits in device memory (CIFAR-10 is 150 MB).
        pin_memory: Pin host batches for faster copies (ignored when ``resident``).
    """

    name = "dataset"

    def __init__(self, batch_size: int = 256, num_workers: int = 0, resident: bool = False, pin_memory: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1; got {batch_size}.")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0; got {num_workers}.")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.resident, self.pin_memory = resident, pin_memory
        self.splits: Splits | None = None
        self.test_only = False  # only_test(): the training split need not be loaded
        self.order = EpochOrder()  # the training position, saved in checkpoints for an exact mid-epoch resume
        self._device_cache: dict[tuple[str, str], torch.Tensor] = {}

    def load(self) -> Splits:
        """Decode the dataset into uint8 tensors; called once, by :meth:`setup`."""
        raise NotImplementedError(f"{type(self).__name__} must implement load().")

    def only_test(self) -> "InMemoryDataModule":
        """Load the test split alone, for evaluators that use nothing else (zero-shot, retrieval, pictures): an
        image or caption folder's training images are not decoded, an ``.npz`` file's not read. Sources whose
        training split costs next to nothing (digits) load it anyway. Call before :meth:`setup`."""
        if self.splits is None:
            self.test_only = True
        return self

    def listed_labels(self) -> tuple[list[str], torch.Tensor] | None:
        """The class names and training labels, known before :meth:`setup` loads the images (from an image folder's
        listing), so that a command refuses data it cannot score in seconds, not after decoding every image (ImageNet's
        1.28M JPEGs take an hour); ``None``: known once loaded. Unreadable files left out by ``on_corrupt: skip`` may
        leave a class fewer images once decoded."""
        return None

    def setup(self, stage: str | None = None) -> None:
        if self.splits is not None:
            return
        s = self.load()
        for name in ("x_test",) if self.test_only and not len(s.x_train) else ("x_train", "x_test"):
            check_images(getattr(s, name), name, self.name)
        for x, y, split in ((s.x_train, s.y_train, "train"), (s.x_test, s.y_test, "test")):
            if y.ndim != 1 or len(y) != len(x):
                raise ValueError(f"{self.name}: {split} labels must be a 1-D array with one label per image; "
                                 f"got {tuple(y.shape)} labels for {len(x)} images.")
        self.splits = s

    @property
    def num_classes(self) -> int:
        self.setup()
        return len(self.splits.classes)

    def train_dataloader(self) -> DataLoader:
        self._checked_split("train")
        s = self.splits
        if len(s.y_train) < self.batch_size:
            raise ValueError(f"{self.name}: batch_size {self.batch_size} is larger than the training set "
                             f"({len(s.y_train)} images); lower data.batch_size.")
        data = _Batches(self.train_batch, len(s.y_train), indices_only=self.resident)
        # The loader draws its workers' base seed from this generator too, not from the global one: a resumed
        # run builds its first iterator after the random states are restored, an uninterrupted one before.
        generator = torch.Generator()
        batches = ResumableBatchSampler(RandomSampler(data, generator=generator), self.batch_size, drop_last=True,
                                        order=self.order)
        return ResumableDataLoader(data, batch_sampler=batches, num_workers=self.num_workers, collate_fn=_stacked,
                                   pin_memory=self.pin_memory and not self.resident and torch.cuda.is_available(),
                                   persistent_workers=self.num_workers > 0, generator=generator)

    def _split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.splits
        return (s.x_train, s.y_train) if split == "train" else (s.x_test, s.y_test)

    def on_device(self, name: str, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``tensor`` on ``device``, copied there once and cached under ``name``."""
        if device.type == "cpu":
            return tensor
        key = (name, str(device))
        if key not in self._device_cache:
            self._device_cache[key] = tensor.to(device)
        return self._device_cache[key]

    def _on_device(self, split: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._split(split)
        return self.on_device(f"x_{split}", x, device), self.on_device(f"y_{split}", y, device)

    def train_batch(self, idx: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of indices ``idx``, from the copy of the set on ``device``: images and labels.

        Subclasses whose batches carry something else (caption tokens) override this one method.
        """
        x, y = self._on_device("train", device)
        return x[idx], y[idx]

    def state_dict(self) -> dict:
        epoch_batches = self.trainer.num_training_batches if self.trainer is not None else float("inf")
        world_size = self.trainer.world_size if self.trainer is not None else 1
        return {"epoch_order": self.order.state_dict(epoch_batches, self.batch_size, world_size)}

    def load_state_dict(self, state: dict) -> None:
        if "epoch_order" in state:  # checkpoints from before exact mid-epoch resume have none
            self.order.load_state_dict(state["epoch_order"])

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        if self.trainer is not None and self.trainer.training:
            self.order.taken += 1  # counted here, not in the sampler, which DataLoader workers run ahead of
        if self.resident and len(batch) == 1:  # an index batch: gather the images already on the device
            return self.train_batch(batch[0].to(device, non_blocking=True), device)
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _checked_split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
        self.setup()
        if split == "train" and self.test_only and not len(self.splits.y_train):
            raise RuntimeError(f"{self.name} was loaded with its test split only (only_test()); make another data "
                               "module for the training split.")
        return self._split(split)

    def split_size(self, split: str) -> int:
        """Images in ``train`` or ``test``."""
        return len(self._checked_split(split)[1])

    def iter_split(self, split: str, batch_size: int = 1024, device: torch.device | str = "cpu",
                   batches: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(images, labels)`` of ``train`` or ``test`` in order, on ``device``: for evaluators.

        With ``resident`` the set is cached on the device once; otherwise each batch is copied. ``batches``: only
        these of the split's batches (a slice of their indices; a DDP rank's share), the others not even copied.
        """
        x, y = self._checked_split(split)
        device = torch.device(device)
        if self.resident:
            x, y = self._on_device(split, device)
        starts = range(0, len(y), batch_size)
        for i in starts if batches is None else starts[batches]:
            yield x[i:i + batch_size].to(device, non_blocking=True), y[i:i + batch_size].to(device, non_blocking=True)


class DecodesFiles:
    """What the DataModules of image files (ImageFolderDataModule, CaptionDataModule) share: decoding in processes
    (``data.num_workers``), through a cache of decoded images (``data.cache_dir``) that one process per node fills
    in ``prepare_data``. A mixin, not a subclass of InMemoryDataModule, so that LightningCLI does not offer it as
    a dataset. The class sets ``root`` and ``image_size``, calls :meth:`init_decoding`, and implements ``_listing()``
    (every check on the files, before anything is decoded) and ``_parts(listing)`` (the ``(folder, paths)`` to
    decode), and names its test split's part in ``test_part`` (``only_test`` decodes that one alone); ``load``
    starts from :meth:`listed_and_decoded`."""

    test_part = -1

    def init_decoding(self, num_workers: int | None, cache_dir: str | None) -> None:
        if num_workers is not None and num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, or null for one decoding process per CPU core; "
                             f"got {num_workers}.")
        self.decode_workers, self.cache_dir = num_workers, cache_dir
        self.skip_setting = "data.on_corrupt=skip"  # what unreadable-file errors name; `--on-corrupt skip` in commands
        self._prepared = None  # what prepare_data listed and mapped, for this process's setup
        self._listed = None  # what listed_labels() listed, for the decoding that follows

    def _listed_once(self):
        """``_listing()``, or what :meth:`listed_labels` listed: the files are listed and checked once."""
        listing, self._listed = self._listed or self._listing(), None
        return listing

    def _ranks_on_node(self) -> int:
        return self.trainer.num_devices if self.trainer is not None else 1

    def _decoded(self, listing, alone: bool = False) -> list[Decoded]:
        """Each part's images, indices kept and unreadable files: decoded, or from ``cache_dir``. The processes:
        ``data.num_workers``, or for ``None`` one per CPU core this process may use, shared with the other ranks of
        the node when they decode at the same time (``setup`` under DDP without a cache, which is said once), all of
        them when it decodes ``alone`` (``prepare_data``, which Lightning runs on one process per node)."""
        ranks = 1 if alone else self._ranks_on_node()
        if ranks > 1 and not self.cache_dir and rank() == 0:
            log.warning("Each of the %d processes on this node decodes %s and holds its own copy; set data.cache_dir "
                        "to a folder to decode it once per node and share one copy.", ranks, self.name)
        workers = cpu_cores(ranks) if self.decode_workers is None else self.decode_workers
        parts = self._parts(listing)
        if self.test_only and len(parts) > 1:  # only_test(): the test part alone
            return [decode_one_part(self.root, parts, self.test_part, self.image_size, workers, self.cache_dir)]
        return decode_cached(self.root, parts, self.image_size, workers, self.cache_dir)

    def prepare_data(self) -> None:
        """With ``cache_dir``, decode the files into the cache if they are not there yet. Lightning calls this once per
        node (local rank 0) before every rank's ``setup``, so the other ranks map the entry instead of decoding.
        This process keeps what it listed and mapped for its own ``setup``, which need not list and stat every file
        again. Once this process is set up, the entry is there: nothing to do."""
        if self.cache_dir and self.splits is None:
            listing = self._listed_once()
            self._prepared = listing, self._decoded(listing, alone=True)

    def listed_and_decoded(self) -> tuple:
        """``(listing, decoded)``: what ``prepare_data`` kept, or listed and decoded now."""
        if self._prepared:
            prepared, self._prepared = self._prepared, None
            return prepared
        listing = self._listed_once()
        return listing, self._decoded(listing)
