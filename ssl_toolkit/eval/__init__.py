"""Evaluators: weighted kNN (FAISS and a torch reference), linear probe, retrieval and zero-shot, online callbacks,
embedding search (``ssl_toolkit.eval.search``).

The names load with their module on first use (``ssl_toolkit._lazy``): an evaluation command's ``--help`` reads
``EVAL_PRECISIONS`` from ``ssl_toolkit.eval.features`` without importing the callbacks' Lightning. ``linear_probe``
is imported here at once, since it is also the name of its module (see ``lazy_names``)."""

from typing import TYPE_CHECKING

from ssl_toolkit._lazy import lazy_names
from ssl_toolkit.eval.linear_probe import linear_probe, train_linear

_HOME, __getattr__, __dir__ = lazy_names(__name__, {
    "ssl_toolkit.eval.callbacks": ("CollapseMonitor", "KNNCallback", "OnlineProbe", "PeriodicEvaluation",
                                   "RetrievalCallback"),
    "ssl_toolkit.eval.features": ("extract_features",),
    "ssl_toolkit.eval.few_labels": ("LabelBudget", "labelled_subset", "labelled_subsets"),
    "ssl_toolkit.eval.knn": ("knn_accuracy", "knn_scores", "knn_search", "knn_sweep"),
    "ssl_toolkit.eval.pictures": ("PicturesCallback", "save_pictures", "view_pictures"),
    "ssl_toolkit.eval.retrieval": ("recall_at_k", "retrieval_recall", "zero_shot", "zero_shot_accuracy",
                                   "zero_shot_weights"),
})

__all__ = ["CollapseMonitor", "KNNCallback", "OnlineProbe", "PeriodicEvaluation", "PicturesCallback", "save_pictures",
           "view_pictures", "RetrievalCallback", "extract_features", "LabelBudget", "labelled_subset",
           "labelled_subsets", "knn_accuracy", "knn_scores", "knn_sweep",
           "knn_search", "linear_probe", "recall_at_k", "retrieval_recall", "train_linear", "zero_shot",
           "zero_shot_accuracy", "zero_shot_weights"]  # literal, for pyflakes and editors; a test checks it

if TYPE_CHECKING:  # what editors and type checkers read
    from ssl_toolkit.eval.callbacks import (CollapseMonitor, KNNCallback, OnlineProbe, PeriodicEvaluation,
                                            RetrievalCallback)
    from ssl_toolkit.eval.features import extract_features
    from ssl_toolkit.eval.few_labels import LabelBudget, labelled_subset, labelled_subsets
    from ssl_toolkit.eval.knn import knn_accuracy, knn_scores, knn_search, knn_sweep
    from ssl_toolkit.eval.pictures import PicturesCallback, save_pictures, view_pictures
    from ssl_toolkit.eval.retrieval import (recall_at_k, retrieval_recall, zero_shot, zero_shot_accuracy,
                                            zero_shot_weights)
