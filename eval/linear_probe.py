"""Linear probe (docs/methods.md, "Evaluation definitions").

Logistic regression (scikit-learn) on frozen, L2-normalised image features. The inverse
regularisation strength ``C`` is chosen on a validation split carved from the training
features (stratified when every class has two or more samples); the probe is then refitted on
all training features with the chosen ``C`` and scored on the test features (top-1).

The fits run with one BLAS thread by default: on probe-sized problems (thousands of samples,
hundreds of dimensions) multi-threaded BLAS was 5-10x *slower* (measured on 2 cores); pass
``blas_threads=None`` for very large problems.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from clipfnd.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CS = tuple(float(c) for c in np.logspace(-2, 4, 7))


def _normalise(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.float(), dim=-1).cpu().numpy()


def _fit(x: np.ndarray, y: np.ndarray, c: float, max_iter: int, seed: int):
    # imported here: scikit-learn takes 1.5 s to import, paid by every training process
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():  # weakly regularised fits of separable data run to max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(C=c, max_iter=max_iter, random_state=seed).fit(x, y)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    cs: Sequence[float] = DEFAULT_CS,
    val_fraction: float = 0.2,
    max_iter: int = 1000,
    seed: int = 0,
    blas_threads: int | None = 1,
) -> dict[str, float]:
    """Top-1 of the probe whose ``C`` scored best on the validation split (ties: smaller C)."""
    x, y = _normalise(train_features), train_labels.cpu().numpy()
    xt, yt = _normalise(test_features), test_labels.cpu().numpy()
    if len(np.unique(y)) < 2:
        raise UserError("the linear probe needs training samples of at least two classes")
    from sklearn.model_selection import train_test_split

    counts = np.unique(y, return_counts=True)[1]
    x_fit, x_val, y_fit, y_val = train_test_split(
        x,
        y,
        test_size=val_fraction,
        random_state=seed,
        stratify=y if counts.min() >= 2 else None,
    )
    if len(np.unique(y_fit)) < 2:
        raise UserError("too few training samples to carve a validation split")
    with threadpool_limits(limits=blas_threads, user_api="blas"):
        scores = [(_fit(x_fit, y_fit, c, max_iter, seed).score(x_val, y_val), c) for c in cs]
        best_score = max(s for s, _ in scores)
        best_c = min(c for s, c in scores if s == best_score)
        probe = _fit(x, y, best_c, max_iter, seed)
    if int(np.max(probe.n_iter_)) >= max_iter:
        log.warning(
            "linear probe: the fit with C=%g stopped at max_iter=%d before converging",
            best_c,
            max_iter,
        )
    return {
        "top1": float(probe.score(xt, yt)),
        "C": best_c,
        "val_top1": float(best_score),
    }
