"""Evaluators: weighted kNN (FAISS and a torch reference), linear probe, retrieval and zero-shot, online callbacks,
embedding search (``ssl_toolkit.eval.search``)."""

from ssl_toolkit.eval.callbacks import CollapseMonitor, KNNCallback, OnlineProbe, PeriodicEvaluation, RetrievalCallback
from ssl_toolkit.eval.features import extract_features
from ssl_toolkit.eval.knn import knn_accuracy, knn_scores, knn_search, knn_sweep
from ssl_toolkit.eval.linear_probe import linear_probe, train_linear
from ssl_toolkit.eval.pictures import PicturesCallback, save_pictures, view_pictures
from ssl_toolkit.eval.retrieval import recall_at_k, retrieval_recall, zero_shot, zero_shot_accuracy, zero_shot_weights

__all__ = ["CollapseMonitor", "KNNCallback", "OnlineProbe", "PeriodicEvaluation", "PicturesCallback", "save_pictures", "view_pictures", "RetrievalCallback", "extract_features", "knn_accuracy", "knn_scores", "knn_sweep",
           "knn_search", "linear_probe", "recall_at_k", "retrieval_recall", "train_linear", "zero_shot",
           "zero_shot_accuracy", "zero_shot_weights"]
