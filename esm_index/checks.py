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


def label_matrix(labels: np.ndarray, regression: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """Columns LogME regresses on, and their weights in the mean over columns (None: equal).

    Regression: the targets themselves (rounded through float32, as hfselect's data loader
    does). Classification: hfselect averages over one-hot columns of classes 0..max(label),
    absent classes included. An absent class's column is all zeros, and the evidence of a
    zero column depends on the features alone (x = U^T y = 0, so m2 = res2 = 0 and the fixed
    point runs on the spectrum only): every absent class has the same evidence. So we keep
    one column per present class plus, when some class ids are absent, a single zero column
    weighted by their count. Memory and time then grow with the number of distinct classes,
    never with the size of the ids (labels {0, 10**8} are three columns, not 10**8 + 1)."""
    labels = np.asarray(labels)
    if labels.ndim == 0 or labels.shape[0] == 0:
        raise InvalidTargetError("the target has no examples")
    if regression:
        try:
            y = labels.astype(np.float32).astype(np.float64)
        except (TypeError, ValueError):
            raise InvalidTargetError("regression labels must be numbers") from None
        y = y.reshape(len(y), -1)
        if not np.isfinite(y).all():
            raise InvalidTargetError("regression labels contain NaN or infinity")
        constant = [c for c in range(y.shape[1]) if np.ptp(y[:, c]) == 0]
        if constant:
            raise InvalidTargetError(f"regression label column {constant[0]} is constant "
                                     f"({y[0, constant[0]]:g} everywhere); LogME needs labels that vary")
        return y, None
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise InvalidTargetError("classification labels must be a 1-d array of class ids")
    if labels.min() < 0:
        raise InvalidTargetError("class ids must be >= 0")
    present, ids = np.unique(labels, return_inverse=True)
    if len(present) < 2:
        raise InvalidTargetError("the target has a single class; LogME needs at least two")
    absent = int(present[-1]) + 1 - len(present)  # Python int: ids may be near 2**63
    y = np.zeros((len(labels), len(present) + (absent > 0)), dtype=np.float64)
    y[np.arange(len(labels)), ids.reshape(-1)] = 1.0
    if not absent:
        return y, None
    weight = np.ones(y.shape[1])
    weight[-1] = absent
    return y, weight / (len(present) + absent)


def check_stages(top: int, shortlist: int | None, exact: bool, candidates: int | None, refine: int | None) -> None:
    """Stage sizes must be positive, and a shortlist shorter than ``top`` would silently
    return fewer rows than asked for."""
    check_positive(top=top, shortlist=shortlist, candidates=candidates, refine=refine)
    if not exact and shortlist is not None and shortlist < top:
        raise InvalidArgumentError(f"shortlist ({shortlist}) is smaller than top ({top}): only {shortlist} "
                                   f"sources would be ranked; raise shortlist or use exact")


def check_method(method: str) -> None:
    """Refuse a ranking method that does not exist (before any slow step)."""
    from .results import METHODS

    if method not in METHODS:
        raise InvalidArgumentError(f"unknown ranking method {method!r}; one of {', '.join(METHODS)}")
