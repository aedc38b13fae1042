"""Evaluation with few labels: the kNN and the linear probe given a class-balanced subset of the training labels.

Low-shot evaluation asks how well a representation separates classes from a handful of labelled images: N images per
class (MSN, https://arxiv.org/abs/2204.07141, Sec. 5: 1, 2 and 5 per class; VISSL's low-shot benchmarks) or a
class-balanced share of them (SimCLR's 1% and 10% subsets, https://arxiv.org/abs/2002.05709, Sec. 6). The rest of
the training images stay available without their labels, and the test split is scored whole. A score from a few
images depends on which ones were drawn, so each budget is drawn several times (draw ``r`` is seeded with ``r``)
and reported as the mean and standard deviation over the draws.
"""

import math
import re
import statistics
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LabelBudget:
    """How many labelled training images an evaluation may use: ``per_class`` images of every class, or ``percent``
    of each class's images (rounded, at least one).

    Example:
        >>> [str(LabelBudget.parse(t)) for t in ("5", "1%", "12.5%")]
        ['5/class', '1%', '12.5%']
        >>> LabelBudget.parse("10%").counts([50, 7, 0])
        [5, 1, 0]
    """

    per_class: int | None = None
    percent: float | None = None

    def __post_init__(self):
        if (self.per_class is None) == (self.percent is None):
            raise ValueError("A label budget is either per_class or percent, one of them.")
        if self.per_class is not None and self.per_class < 1:
            raise ValueError(f"A label budget needs at least 1 image per class; got {self.per_class}.")
        if self.percent is not None and not 0 < self.percent <= 100:
            raise ValueError(f"A label budget's share must be above 0% and at most 100%; got {self.percent:g}%.")

    @classmethod
    def parse(cls, text: str) -> "LabelBudget":
        """``"5"``: 5 labelled images per class; ``"1%"``: 1% of each class's images."""
        text = text.strip()
        if re.fullmatch(r"\d+", text):
            return cls(per_class=int(text))
        share = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)%", text)
        if share:
            return cls(percent=float(share.group(1)))
        raise ValueError(f"{text!r} is not a label budget: give images per class ('5') or a share of each class "
                         "('1%', '12.5%').")

    def __str__(self) -> str:
        return f"{self.per_class}/class" if self.per_class is not None else f"{self.percent:g}%"

    def counts(self, class_counts: list[int]) -> list[int]:
        """Labelled images to draw from each class, given how many training images each class has."""
        if self.per_class is not None:
            return [self.per_class] * len(class_counts)
        return [max(1, math.floor(n * self.percent / 100 + 0.5)) if n else 0 for n in class_counts]

    def check(self, labels: torch.Tensor, num_classes: int, classes: list[str] | None = None) -> list[int]:
        """The images to draw from each class (:meth:`counts`); a per-class budget that a class has too few training
        images for is refused, naming the class."""
        have = torch.bincount(labels.cpu(), minlength=num_classes).tolist()
        want = self.counts(have)
        short = [c for c in range(num_classes) if want[c] > have[c]]
        if short:
            c = short[0]
            name = f"{classes[c]!r}" if classes and c < len(classes) else str(c)
            others = f" ({len(short) - 1} more class{'es' * (len(short) > 2)} too)" if len(short) > 1 else ""
            fix = (f"Ask for at most {min(have)} per class, or a share ('10%')" if min(have) else
                   "A share ('10%') leaves out the classes without training images")
            raise ValueError(f"{self.per_class} labelled images per class: class {name} has {have[c]} training "
                             f"image{'s' * (have[c] != 1)}{others}. {fix}.")
        return want


def labelled_subset(labels: torch.Tensor, budget: LabelBudget, num_classes: int, seed: int = 0,
                    classes: list[str] | None = None) -> torch.Tensor:
    """Sorted indices of a class-balanced random subset of the training images whose labels an evaluation may use.

    Args:
        labels: ``(N,)`` training labels in ``[0, num_classes)``.
        budget: How many of each class (:class:`LabelBudget`).
        num_classes: Classes; a class with too few training images for a per-class budget is refused.
        seed: Seed of the draw (the same seed draws the same images).
        classes: Class names, for the error message.

    Example:
        >>> y = torch.tensor([0, 0, 0, 1, 1, 1])
        >>> idx = labelled_subset(y, LabelBudget(per_class=2), 2)
        >>> y[idx].tolist()
        [0, 0, 1, 1]
    """
    return _draw(labels, budget, num_classes, [seed], classes)[0]


def labelled_subsets(labels: torch.Tensor, budget: LabelBudget, num_classes: int, draws: int = 5,
                     classes: list[str] | None = None) -> list[torch.Tensor]:
    """``draws`` subsets of :func:`labelled_subset`, draw ``r`` seeded with ``r``."""
    if draws < 1:
        raise ValueError(f"Draw the labelled images at least once; got draws={draws}.")
    return _draw(labels, budget, num_classes, range(draws), classes)


def _draw(labels: torch.Tensor, budget: LabelBudget, num_classes: int, seeds, classes: list[str] | None):
    """One subset per seed; the budget is checked and the labels grouped by class (one stable argsort) once."""
    labels = labels.cpu()
    want = budget.check(labels, num_classes, classes)
    by_class = torch.argsort(labels, stable=True).split(torch.bincount(labels, minlength=num_classes).tolist())
    subsets = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(seed)
        picked = [members[torch.randperm(len(members), generator=gen)[:n]] for members, n in zip(by_class, want)]
        subsets.append(torch.cat(picked).sort().values)
    return subsets


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of scores over draws."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0
