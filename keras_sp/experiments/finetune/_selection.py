"""The choice of the learning rate, α and β on held-out training images.

Section 4.2 of the paper: the learning rate is chosen first, per data set,
by validating `learning_rate_kind` at the first α and β of its grids; then,
at that rate, α and β per kind. A point wins by its mean validation
accuracy over the validation seeds; on a tie (the held-out sets are small),
by its lowest mean validation cross-entropy; then by grid order.
"""

import dataclasses
import math
from typing import NamedTuple

import numpy as np

from keras_sp.experiments.finetune._config import dataset_slug
from keras_sp.experiments.finetune._config import settings_of

__all__ = [
    "Point",
    "SelectionSettings",
    "chosen_learning_rate",
    "chosen_point",
    "learning_rate_of",
    "point_of",
]


class Point(NamedTuple):
    """A point of a validation grid."""

    alpha: float
    beta: float
    learning_rate: float


@dataclasses.dataclass(frozen=True)
class SelectionSettings:
    """The config keys of the validation grids and of the choice."""

    target: object  # a name, or an own target's object
    select_on: int | None
    learning_rate_kind: str
    learning_rate_grid: list[float]
    alpha_grid: dict[str, list[float]]
    beta: float
    beta_grid: dict[str, list[float]]
    seed: int
    validation_repeats: int

    def betas(self, kind):
        """The β values tried for `kind`."""
        return self.beta_grid.get(kind, [self.beta])

    def grid(self, kind, learning_rate):
        """The points tried for `kind` at `learning_rate`."""
        return [
            Point(alpha, beta, learning_rate)
            for alpha in self.alpha_grid[kind]
            for beta in self.betas(kind)
        ]

    def learning_rate_points(self):
        """The points that choose the learning rate (first α and β)."""
        kind = self.learning_rate_kind
        return [
            Point(self.alpha_grid[kind][0], self.betas(kind)[0], rate)
            for rate in self.learning_rate_grid
        ]

    def validation_seeds(self):
        """The seeds of the validation runs of each grid point."""
        return [self.seed + 100 + v for v in range(self.validation_repeats)]

    def validated_slug(self, slug):
        """The data set whose validation runs choose for `slug`."""
        if self.select_on is not None:
            return dataset_slug(self.target, self.select_on)
        return slug


def _validation_score(settings, runs, slug, kind, point):
    """`(mean validation accuracy, -mean validation loss)` of a grid point
    over the validation seeds, or None while runs are missing."""
    seeds = set(settings.validation_seeds())
    selected = [
        run
        for run in runs
        if run["dataset"] == slug
        and run["phase"] == "validation"
        and run["kind"] == kind
        and (run["alpha"], run["beta"], run["learning_rate"]) == tuple(point)
        and run["seed"] in seeds
    ]
    if len(selected) < len(seeds):
        return None
    return (
        float(np.mean([run["validation_accuracy"] for run in selected])),
        -float(
            np.mean([run.get("validation_loss", math.inf) for run in selected])
        ),
    )


def _best(settings, runs, slug, kind, points):
    """The point of best mean validation accuracy; on a tie, of lowest
    validation cross-entropy; then the first in grid order."""
    if len(points) == 1:
        return points[0]
    scores = [_validation_score(settings, runs, slug, kind, p) for p in points]
    if any(score is None for score in scores):
        return None
    best = max(range(len(points)), key=lambda index: (scores[index], -index))
    return points[best]


def learning_rate_of(settings, runs, slug):
    """`chosen_learning_rate` with a `SelectionSettings`."""
    point = _best(
        settings,
        runs,
        settings.validated_slug(slug),
        settings.learning_rate_kind,
        settings.learning_rate_points(),
    )
    return None if point is None else point.learning_rate


def point_of(settings, runs, slug, kind):
    """`chosen_point` with a `SelectionSettings`."""
    slug = settings.validated_slug(slug)
    rate = learning_rate_of(settings, runs, slug)
    if rate is None:
        return None
    return _best(settings, runs, slug, kind, settings.grid(kind, rate))


def chosen_learning_rate(config, runs, slug):
    """The learning rate chosen on a data set (None while runs miss).

    Args:
        config: a `FinetuneConfig`.
        runs: the run records.
        slug: the data set's name in the records (e.g. "caltech256_30").

    Returns:
        The rate of `config.learning_rate_grid` whose validation run(s)
        of `learning_rate_kind` score best (accuracy, then cross-entropy),
        or None.
    """
    return learning_rate_of(settings_of(SelectionSettings, config), runs, slug)


def chosen_point(config, runs, slug, kind):
    """The (alpha, beta, learning rate) chosen for `kind` on a data set.

    At the chosen learning rate, the point of the α × β grid with the best
    validation accuracy, averaged over the validation seeds; on a tie (the
    held-out sets are small), the one of lowest mean validation
    cross-entropy; the only point of a one-point grid.

    Args:
        config: a `FinetuneConfig`.
        runs: the run records.
        slug: the data set's name in the records (e.g. "caltech256_30").
        kind: a penalty kind of `config.kinds`.

    Returns:
        A tuple `(alpha, beta, learning_rate)`, or None while validation
        runs are missing.

    Example:

    >>> from keras_sp.experiments.config import load_config
    >>> from keras_sp.experiments.finetune import FinetuneConfig
    >>> config = load_config({"target_dir": "data", "kinds": ["l2_sp"],
    ...     "alpha_grid": {"l2_sp": [0.01, 0.1]}, "learning_rate_kind":
    ...     "l2_sp", "r2_kinds": [], "freeze_kinds": []}, FinetuneConfig)
    >>> runs = [{"dataset": "caltech256_30", "phase": "validation",
    ...          "kind": "l2_sp", "alpha": alpha, "beta": 0.01,
    ...          "learning_rate": 0.01, "seed": 100,
    ...          "validation_accuracy": accuracy}
    ...         for alpha, accuracy in ((0.01, 0.80), (0.1, 0.85))]
    >>> chosen_point(config, runs, "caltech256_30", "l2_sp")
    (0.1, 0.01, 0.01)
    """
    settings = settings_of(SelectionSettings, config)
    point = point_of(settings, runs, slug, kind)
    return None if point is None else tuple(point)
