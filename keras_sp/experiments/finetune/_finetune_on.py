"""`finetune_on`: the fine-tuning experiment on your own data, from Python."""

import dataclasses
import json
import os

from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune._checks import TARGETS
from keras_sp.experiments.finetune._config import FinetuneConfig
from keras_sp.experiments.finetune._config import config_path
from keras_sp.experiments.finetune._config import dataset_slug
from keras_sp.experiments.finetune._config import settings_of
from keras_sp.experiments.finetune._experiment import run_finetune
from keras_sp.experiments.finetune._selection import SelectionSettings
from keras_sp.experiments.finetune._selection import point_of
from keras_sp.experiments.finetune._tables import chosen_runs

__all__ = [
    "finetune_on",
    "own_config",
]


def finetune_on(
    target,
    backbone,
    kinds=("l2", "l2_sp"),
    out="results/finetune",
    config=None,
    verbose=0,
    **settings,
):
    """Fine-tunes `backbone` on `target` per kind; returns Table 2's rows.

    A thin wrapper over `run_finetune`: the values given make a
    `FinetuneConfig` (the same keys and checks as a config file), the
    selection protocol runs (validation of the learning rate, α and β,
    then `repeats` test runs per kind) and the report is written to `out`.

    Args:
        target: the target: an `.npz` file (a path ending in `.npz`), a
            folder of class folders (any other path), or a config `target`
            value (`{"tfds": NAME, ...}`, `{"folder": PATH, "name": ...}`,
            a paper target's name such as `"caltech256"`).
        backbone: a `keras.applications` name (with `weights`), or a
            `.keras` source model file (see `FinetuneConfig.backbone`).
        kinds: the penalty kinds, one row each.
        out: output folder (`results.json`, `table2.md`, ...); resumable.
        config: a config to start from (a file, a shipped config's name or
            a dict), or None (the defaults of `FinetuneConfig`).
        verbose: 1 prints a line per run.
        **settings: other config keys (`per_class`, `iterations`,
            `alpha_grid`, `input_size`, ...); they replace the config's.

    Returns:
        A list with one dict per data set (`per_class`) and kind:
        `dataset`, `kind`, `alpha`, `beta`, `learning_rate` (the chosen
        point), `accuracies` (of its test runs, from `results.json`) and
        `accuracy` (their mean).

    Raises:
        ConfigError: naming the key (or argument) and the value received,
            for a bad setting or bad data.

    Example:

    ```python
    rows = finetune_on(
        "~/data/flowers", "ResNet50", kinds=["l2", "l2_sp"],
        out="results/flowers", per_class=[30], iterations=3000,
    )
    ```
    """
    finetune_config = own_config(target, backbone, kinds, config, **settings)
    run_finetune(finetune_config, out, verbose=verbose)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    selection = settings_of(SelectionSettings, finetune_config)
    rows = []
    for per_class in finetune_config.per_class:
        slug = dataset_slug(finetune_config.target, per_class)
        for kind in finetune_config.kinds:
            point = point_of(selection, runs, slug, kind)
            accuracies = [
                run["accuracy"] for run in chosen_runs(runs, slug, kind, point)
            ]
            rows.append(
                {
                    "dataset": slug,
                    "kind": kind,
                    "alpha": point[0],
                    "beta": point[1],
                    "learning_rate": point[2],
                    "accuracies": accuracies,
                    "accuracy": sum(accuracies) / len(accuracies),
                }
            )
    return rows


def own_config(target, backbone, kinds, config=None, **settings):
    """The `FinetuneConfig` that `finetune_on` runs (same arguments).

    The config's keys that name kinds (`alpha_grid`, `beta_grid`,
    `freeze_kinds`, `r2_kinds`, `learning_rate_kind`) follow `kinds`, and
    those that name data sets (`select_on`, `freeze_per_class`) follow
    `per_class`, unless given.
    """
    if not isinstance(target, (str, dict, os.PathLike)):
        raise TypeError(
            "`target` must be a folder or .npz path, or a config target "
            f"object. Received: target={target!r}"
        )
    if isinstance(target, os.PathLike):
        target = os.fspath(target)
    if isinstance(target, str) and target not in TARGETS:
        target = {"npz" if target.endswith(".npz") else "folder": target}
    source = config_path(config) if isinstance(config, str) else config
    values = dict(settings, target=target, backbone=backbone, kinds=list(kinds))
    # The defaults that name kinds follow `kinds` unless given.
    defaults = (
        FinetuneConfig()
        if source is None
        else load_config(source, FinetuneConfig, target=target)
    )
    kinds = values["kinds"]
    values.setdefault(
        "alpha_grid",
        {kind: defaults.alpha_grid.get(kind, [0.1]) for kind in kinds},
    )
    values.setdefault(
        "beta_grid",
        {k: grid for k, grid in defaults.beta_grid.items() if k in kinds},
    )
    for key in ("freeze_kinds", "r2_kinds"):
        values.setdefault(
            key, [kind for kind in getattr(defaults, key) if kind in kinds]
        )
    if defaults.learning_rate_kind not in kinds and kinds:
        values.setdefault("learning_rate_kind", kinds[0])
    per_class = values.get("per_class", defaults.per_class)
    if defaults.select_on not in per_class:
        values.setdefault("select_on", None)
    if defaults.freeze_per_class is not None:
        values.setdefault(
            "freeze_per_class",
            [n for n in defaults.freeze_per_class if n in per_class] or None,
        )
    # Values replace the config's, None included (unlike load_config's
    # overrides).
    return load_config(
        {**dataclasses.asdict(defaults), **values}, FinetuneConfig
    )
