"""Checks on what a user hands us, shared by ranking and by adding a source.

They live apart from the numerics so that ``rank`` and ``add`` refuse the same inputs with the
same words, before any slow step (embedding, fine-tuning) starts.
"""

from __future__ import annotations

import numpy as np

from .data import TASKS
from .errors import InvalidArgumentError, InvalidTargetError

MIN_TARGET_EXAMPLES = 20
"""Below this, LogME's evidence is dominated by its priors: a 3-row target scored 433 per
example. Refused rather than ranked."""


def check_labels(labels, task: str, count: int | None = None) -> dict:
    """Raise ``InvalidTargetError`` unless ``labels`` can be scored as ``task``; return what a
    report says about them (task, examples, classes or label columns). ``count``: the number
    of texts, which must match."""
    from .logme import label_matrix

    if task not in TASKS:
        raise InvalidTargetError(f"task must be classification or regression, not {task!r}")
    labels = np.asarray(labels)
    if labels.ndim == 0 or len(labels) == 0 or count == 0:
        raise InvalidTargetError("the target has no examples")
    if count is not None and count != len(labels):
        raise InvalidTargetError(f"{count} texts but {len(labels)} labels")
    y, _ = label_matrix(labels, task == "regression")
    about = {"examples": int(len(labels)), "task": task}
    if task == "regression":
        about["label_columns"] = int(y.shape[1])
    else:
        about["classes"] = int(len(np.unique(labels)))
    return about


def check_size(n: int, dim: int | None = None, what: str = "target") -> list[str]:
    """Refuse fewer than ``MIN_TARGET_EXAMPLES`` examples; return a warning when n is at most
    the embedding dimension, where LogME is noisy and scores do not compare across sizes."""
    if n < MIN_TARGET_EXAMPLES:
        raise InvalidTargetError(f"the {what} has {n} examples; ESM-LogME needs at least {MIN_TARGET_EXAMPLES} "
                                 f"(several hundred are better)")
    if dim is not None and n <= dim:
        return [f"the {what} has {n} examples, no more than the {dim} embedding dimensions: LogME is noisy "
                f"there and its scores do not compare with those of larger targets (several hundred "
                f"examples or more are better)"]
    return []


def check_positive(**values: int | None) -> None:
    """Raise ``InvalidArgumentError`` naming the first of ``values`` (``max_examples=0``, or
    ``**{"--epochs": 0}`` from the CLI) that is set and below 1."""
    for name, value in values.items():
        if value is not None and value < 1:
            raise InvalidArgumentError(f"{name} must be at least 1, not {value}")


def dense_classes(labels: np.ndarray) -> np.ndarray:
    """Class ids 0..k-1 in the order of the ids present. Fine-tuning gives a classifier one
    output per id up to the largest: ids like 1990..2019 or 10**8 would make a huge head."""
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
