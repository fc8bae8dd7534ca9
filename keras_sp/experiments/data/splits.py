"""Class splits and few-shot samples, seeded, shared by every experiment."""

import numpy as np

__all__ = [
    "class_split",
    "few_shot",
]


def _labels_array(labels):
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(
            "`labels` must be a 1-D array of class labels. Received: labels "
            f"of shape {labels.shape}"
        )
    return labels


def class_split(labels, seed):
    """A balanced random split of the classes into two halves A and B.

    Yosinski et al. split the 1000 ImageNet classes into two halves of 500 at
    random; with an odd number of classes, A gets the extra class.

    Args:
        labels: 1-D array of class labels (one per example) or of classes.
        seed: int, the seed of the random split.

    Returns:
        `(classes_a, classes_b)`: two sorted NumPy arrays of class labels.

    Example:

    >>> a, b = class_split(list(range(10)), seed=0)
    >>> len(a), len(b), sorted(set(a) | set(b)) == list(range(10))
    (5, 5, True)

    Reference:
        Yosinski, Clune, Bengio, Lipson. "How transferable are features in
        deep neural networks?" NIPS 2014.
    """
    classes = np.unique(_labels_array(labels))
    if len(classes) < 2:
        raise ValueError(
            "`labels` must hold at least 2 classes to split. Received: "
            f"labels with classes {classes.tolist()}"
        )
    order = np.random.default_rng(seed).permutation(len(classes))
    half = (len(classes) + 1) // 2
    return np.sort(classes[order[:half]]), np.sort(classes[order[half:]])


def few_shot(labels, per_class, seed, classes=None):
    """Indices of `per_class` random examples of each class.

    Args:
        labels: 1-D array of class labels, one per example.
        per_class: int >= 1, how many examples to draw from each class.
        seed: int, the seed of the draw.
        classes: the classes to draw from (default: every class present).

    Returns:
        A sorted 1-D NumPy array of example indices.

    Example:

    >>> labels = [0, 0, 0, 1, 1, 1]
    >>> indices = few_shot(labels, per_class=2, seed=0)
    >>> sorted(np.bincount(np.asarray(labels)[indices]).tolist())
    [2, 2]
    """
    labels = _labels_array(labels)
    if isinstance(per_class, bool) or not isinstance(
        per_class, (int, np.integer)
    ):
        raise ValueError(
            "`per_class` must be a positive integer. Received: "
            f"per_class={per_class!r}"
        )
    if per_class < 1:
        raise ValueError(
            "`per_class` must be a positive integer. Received: "
            f"per_class={per_class!r}"
        )
    if classes is None:
        classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    chosen = []
    for label in classes:
        members = np.flatnonzero(labels == label)
        if len(members) < per_class:
            raise ValueError(
                f"Class {label!r} has {len(members)} examples, fewer than "
                f"per_class={per_class}."
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
