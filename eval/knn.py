"""Weighted k-nearest-neighbour classification (docs/methods.md, "Evaluation definitions").

Cosine similarity to the training features, the ``k = 20`` nearest neighbours vote for their
labels with weight ``exp(s / 0.07)``, and the class with the largest total wins (top-1).
Implemented with scikit-learn's ``KNeighborsClassifier`` (brute force, cosine metric).
"""

from __future__ import annotations

import numpy as np
import torch

from clipfnd.errors import UserError

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> np.ndarray:
    """Predicted label of every test feature."""
    if k < 1 or temperature <= 0:
        raise UserError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")

    def weights(distance: np.ndarray) -> np.ndarray:  # cosine distance = 1 - similarity
        # shifting by the row's best similarity leaves the vote unchanged and avoids overflow
        sim = 1.0 - distance
        return np.exp((sim - sim.max(axis=1, keepdims=True)) / temperature)

    # imported here: scikit-learn takes 1.5 s to import, paid by every training process
    from sklearn.neighbors import KNeighborsClassifier

    x = torch.nn.functional.normalize(train_features.float(), dim=-1).cpu().numpy()
    xt = torch.nn.functional.normalize(test_features.float(), dim=-1).cpu().numpy()
    clf = KNeighborsClassifier(
        n_neighbors=min(k, len(x)), metric="cosine", algorithm="brute", weights=weights
    )
    clf.fit(x, train_labels.cpu().numpy())
    return clf.predict(xt)


def knn_metrics(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, float]:
    """Top-1 of the weighted kNN classifier."""
    pred = knn_classify(train_features, train_labels, test_features, k=k, temperature=temperature)
    return {"top1": float((pred == test_labels.cpu().numpy()).mean())}
