"""Paired comparisons of methods run on matched seeds.

Every method of a comparison is run once per seed on the same training
images, head initialisation and batch order; its accuracy on a seed is
compared with the reference method's (L2 fine-tuning) on that seed. The
difference of the means is estimated by the mean of the per-seed
differences, with a Student-t 95 % interval; the smallest effect the table
can detect is the difference a paired t-test at the 5 % level finds with
80 % power, given the observed spread of the differences.
"""

import math

import numpy as np
from scipy import stats

__all__ = [
    "folds",
    "paired_difference",
    "smallest_detectable_effect",
]


def folds(labels, k, seed):
    """`k` stratified folds of the indices of `labels` (each class split as
    evenly as it can be), seeded.

    Args:
        labels: 1-D integer array.
        k: int >= 2, the number of folds; at most the size of the smallest
            class.
        seed: int.

    Returns:
        A list of `k` sorted index arrays that partition `range(len(labels))`.

    Example:

    >>> [f.tolist() for f in folds([0, 0, 1, 1], k=2, seed=0)]
    [[0, 2], [1, 3]]
    """
    labels = np.asarray(labels)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 2:
        raise ValueError(f"`k` must be an integer >= 2. Received: k={k!r}")
    counts = np.bincount(labels) if labels.size else np.zeros(0, int)
    smallest = int(counts[counts > 0].min()) if labels.size else 0
    if smallest < k:
        raise ValueError(
            f"`k` must be at most the number of examples of the smallest "
            f"class ({smallest}). Received: k={k}"
        )
    rng = np.random.default_rng(seed)
    parts = [[] for _ in range(k)]
    offset = 0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        for position, index in enumerate(members):
            parts[(position + offset) % k].append(index)
        offset += len(members)
    return [np.sort(np.asarray(part, dtype=int)) for part in parts]


def paired_difference(values, reference, confidence=0.95):
    """Mean of `values - reference` over matched seeds, with its interval.

    Args:
        values: per-seed results of a method.
        reference: per-seed results of the reference method, same seeds in
            the same order.
        confidence: the interval's level.

    Returns:
        `{"mean", "low", "high", "std", "n"}`: the mean difference, the
        Student-t interval (`low`, `high`; equal to `mean` when n < 2), the
        standard deviation of the differences and their number.

    Example:

    >>> d = paired_difference([0.9, 0.8, 0.7], [0.8, 0.7, 0.7])
    >>> round(d["mean"], 4), round(d["std"], 4)
    (0.0667, 0.0577)
    """
    values = np.asarray(values, dtype=float)
    reference = np.asarray(reference, dtype=float)
    if values.shape != reference.shape or values.ndim != 1:
        raise ValueError(
            "`values` and `reference` must be 1-D and of one length. "
            f"Received: shapes {values.shape} and {reference.shape}"
        )
    differences = values - reference
    n = len(differences)
    mean = float(differences.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "low": mean, "high": mean, "std": 0.0, "n": n}
    std = float(differences.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {
        "mean": mean,
        "low": mean - float(half),
        "high": mean + float(half),
        "std": std,
        "n": n,
    }


def smallest_detectable_effect(std, n, level=0.05, power=0.8):
    """The mean paired difference a two-sided paired t-test at `level`
    detects with probability `power`, for differences of standard deviation
    `std` over `n` seeds: `(t_{1-level/2} + t_{power}) * std / sqrt(n)`,
    t with n - 1 degrees of freedom. Infinite for n < 2.

    >>> round(smallest_detectable_effect(1.0, 10), 3)
    0.995
    """
    if n < 2:
        return math.inf
    t = stats.t.ppf(1 - level / 2, n - 1) + stats.t.ppf(power, n - 1)
    return float(t * std / math.sqrt(n))
