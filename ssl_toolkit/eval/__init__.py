"""Evaluators: weighted kNN (FAISS and a torch reference), linear probe, online callbacks."""

from ssl_toolkit.eval.callbacks import KNNCallback
from ssl_toolkit.eval.features import extract_features
from ssl_toolkit.eval.knn import knn_accuracy, knn_scores, knn_search
from ssl_toolkit.eval.linear_probe import linear_probe, train_linear

__all__ = ["KNNCallback", "extract_features", "knn_accuracy", "knn_scores", "knn_search", "linear_probe",
           "train_linear"]
