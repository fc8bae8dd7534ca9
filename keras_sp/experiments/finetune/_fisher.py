"""The source model's Fisher information for the -SP-Fisher kinds.

Estimated once per experiment on source images (the paper), or once per
training set on target images, and kept in the output folder as
`fisher_<scope>_<key>.npz`, so a rerun reads it back.
"""

import dataclasses
import hashlib
import os

import numpy as np

import keras_sp
from keras_sp import _paths
from keras_sp.experiments.finetune._targets import materialize
from keras_sp.experiments.fisher_command import load_fisher
from keras_sp.experiments.fisher_command import save_fisher
from keras_sp.penalties import KERNEL_NAMES

__all__ = [
    "FisherCache",
    "FisherSettings",
]


@dataclasses.dataclass(frozen=True)
class FisherSettings:
    """The config keys of the Fisher information."""

    fisher_mode: str
    fisher_samples: int
    fisher_data: str
    fisher_examples: int
    fisher_scale: str
    seed: int


def _backbone_entries(fisher, backbone):
    """The entries of `fisher` for the backbone's kernels, by their paths."""
    selected = {}
    for variable in backbone.weights:
        if variable.name not in KERNEL_NAMES:
            continue
        path = variable.path
        # The exact path first, as `keras_sp.regularize` matches entries.
        matches = _paths.matching_keys(fisher, path)
        if len(matches) != 1:
            raise ValueError(
                f"The source model's Fisher information has {len(matches)} "
                f"entries for the backbone's variable '{path}'; the backbone "
                "and the source model must share their layer names."
            )
        selected[path] = np.asarray(fisher[matches[0]])
    return selected


class FisherCache:
    """The source model's diagonal Fisher on the backbone's kernels.

    Args:
        settings: a `FisherSettings`.
        out: the output folder, where the Fisher files are kept.
        pretrained: the `Pretrained` starting point.
        source: a `SourceData` (needed for `fisher_data="source"`).
    """

    def __init__(self, settings, out, pretrained, source):
        self.settings = settings
        self.out = out
        self.pretrained = pretrained
        self.source = source
        self._computed = {}

    def fisher(self, slug, target, train_indices):
        """`{variable path: F}` for the data set `slug` (read back if its
        file exists); the target's images `train_indices` are the inputs
        with `fisher_data="target"`."""
        settings = self.settings
        scope = "source" if settings.fisher_data == "source" else slug
        key = hashlib.sha1(np.asarray(train_indices).tobytes()).hexdigest()[:8]
        name = f"fisher_{scope}_{key if scope != 'source' else 'all'}.npz"
        if name in self._computed:
            return self._computed[name]
        path = os.path.join(self.out, name)
        if os.path.exists(path):
            fisher = load_fisher(path)
        else:
            if settings.fisher_data == "source":
                x, y = self.source.arrays(
                    target, train_indices, settings.fisher_examples, "train"
                )
            else:
                count = min(settings.fisher_examples, len(train_indices))
                x, y = materialize(
                    target.eval_batches(
                        train_indices, "train", train_indices[:count]
                    )
                )
            full = keras_sp.fisher.diagonal_fisher(
                self.pretrained.source_model,
                (x, y),
                mode=settings.fisher_mode,
                samples=settings.fisher_samples,
                batch_size=16,
                seed=settings.seed,
            )
            fisher = _backbone_entries(full, self.pretrained.backbone)
            save_fisher(fisher, path)
        if settings.fisher_scale == "mean":
            mean = np.mean(np.concatenate([f.ravel() for f in fisher.values()]))
            fisher = {path: f / mean for path, f in fisher.items()}
        self._computed[name] = fisher
        return fisher
