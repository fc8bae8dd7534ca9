"""The settings of a fine-tuning experiment: `FinetuneConfig` and its files.

`FinetuneConfig` is the schema of a config file (its checks are in
`_checks`). The stages of the experiment do not take it whole: each
defines a small settings dataclass whose fields are the config keys it
reads, and `settings_of` fills one from a config.
"""

import dataclasses
import typing

from keras_sp.experiments import config as experiment_config
from keras_sp.experiments.finetune import _checks
from keras_sp.experiments.finetune._own_spec import target_name

__all__ = [
    "FinetuneConfig",
    "config_path",
    "dataset_slug",
    "results_settings",
    "settings_of",
]


def _default_grid():
    return {"l2": [1e-4], "l2_sp": [0.1], "l2_sp_fisher": [0.1]}


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning experiment (a JSON file gives them).

    The defaults are the paper's (section 4.2): SGD with momentum 0.9, 9000
    iterations, the learning rate divided by 10 after 6000, batch 64,
    β = 0.01, 5 repeats, 224 px crops of 256 px images.

    Attributes:
        title: a title for the tables.
        backbone: `keras.applications` name, `.keras` file, or
            `"fashion_source"` (see the module docstring).
        weights: for a `keras.applications` backbone: `"imagenet"`, a
            `.weights.h5` file of the model with its classifier (e.g.
            Places365 weights, `source_num_classes` classes), `null`
            (random: dry runs) or `"imagenet_converted"` (MobileNet only).
        source_num_classes: classes of the source classifier of a
            `keras.applications` backbone (ImageNet 1000, Places365 365).
        backbone_layer: for a `.keras` source model, its nested backbone.
        source_head_layer: for a `.keras` source model, its classifier.
        input_size: side of the network's input images (crops).
        image_size: side images are resized to before cropping (`null`:
            `input_size * 256 / 224`, the paper's 256 for 224). Training
            takes random crops and mirrors, testing the central crop; equal
            to `input_size`, only mirroring remains.
        target: `"caltech256"`, `"mit_indoor67"`, `"stanford_dogs"` or
            `"fashion_mnist"`; or the user's own data, an object:
            `{"folder": PATH}` (class folders, optionally under `train`
            and `test`; option `"test_fraction"`), `{"npz": PATH}`
            (arrays `x_train`, `y_train`, `x_test`, `y_test`) or
            `{"tfds": NAME}` (options `"train_split"`, `"test_split"`,
            `"data_dir"`, `"image_key"`, `"label_key"`), each with an
            optional `"name"` (see `_own_spec`).
        target_dir: the Caltech-256 or MIT Indoors folder; the tfds data
            folder for Stanford Dogs.
        per_class: training images per class, one data set (one column of
            Table 2) each: 30 and 60 for Caltech-256; `null` for the
            official splits of Stanford Dogs and MIT Indoors; for an own
            target, an integer >= 2 (drawn with `seed`) or `null` (all
            its training images).
        target_classes: Fashion-MNIST classes of the target task.
        test_per_class: Fashion-MNIST test images per class (`null`: all).
        validation_fraction: part of each class's training images held out
            to choose α, β and the learning rate.
        on_corrupt: unreadable image files: `"error"` or `"skip"`.
        preprocessing: `"paper"` (minus the training set's channel mean),
            `"mobilenet"` (scaled to [-1, 1]) or `"none"` (0-255 values,
            for backbones that rescale themselves).
        color_order: `"rgb"`, or `"bgr"` for Caffe-converted backbones
            (keras.applications ResNets).
        source: where the source task's images come from (Table 3, and the
            Fisher information with `fisher_data="source"`): `"imagenet"`,
            `"places365"`, `"fashion_mnist"` or `null` (none available).
        source_dir: tfds data folder of ImageNet or Places365.
        source_classes: Fashion-MNIST classes of the source task.
        source_examples: source validation images for Table 3.
        source_batchnorm: the BatchNormalization statistics of Table 3:
            `"as_trained"` (as fine-tuning left them) and/or
            `"reestimated"` (recomputed on the source images, layer by
            layer: costly for deep networks).
        kinds: penalty kinds, one row of Table 2 each.
        alpha_grid: α values tried per kind.
        beta: β (L2 on the new head) for kinds without a `beta_grid`.
        beta_grid: β values tried per kind (Figure 1 for 2-D grids).
        learning_rate_grid: learning rates tried. The rate is chosen first,
            per data set, by validating `learning_rate_kind` at the first α
            and β of its grids; every kind then uses it, as the paper used
            one rate per task.
        learning_rate_kind: the kind the learning rate is chosen with
            (default: standard fine-tuning, L2).
        iterations: SGD steps per run.
        lr_drop_at: the step after which the rate is divided by 10
            (`null`: two thirds of `iterations`).
        warmup_iterations: steps of linear learning-rate warm-up.
        momentum: SGD momentum.
        batch_size: batch size.
        batchnorm: `"train"` (batch statistics, moving averages updated, as
            the paper's TensorFlow fine-tuning) or `"frozen"` (moving
            statistics kept, γ and β fixed: `keras_sp.freeze_batchnorm`).
        devices: where a run trains: `"one"` device, or `"all"` local
            devices (TensorFlow backend only): the model is built,
            penalized and fitted under a `tf.distribute.MirroredStrategy`,
            each global batch of `batch_size` (a multiple of the number
            of devices) split evenly across the replicas,
            the penalty counted once and every BatchNormalization layer
            synchronized across replicas, so that a run equals the same
            run on one device up to floating-point rounding. It is not a
            setting of the results file: runs on one device and on all
            devices are the same runs, and either can resume the other.
        repeats: test runs per kind at the chosen values (the paper: 5).
        validation_repeats: seeds per grid point in the validation phase.
        select_on: the `per_class` data set whose validation chooses the
            learning rate, α and β for every data set (`null`: each data
            set its own, as the paper). Must be the first of `per_class`.
        seed: base seed (training-set draw, validation split, runs).
        fisher_mode: `"exact"`, `"sampled"` or `"empirical"` (see
            `keras_sp.fisher.diagonal_fisher`).
        fisher_samples: labels drawn per example in `"sampled"` mode.
        fisher_data: inputs of the Fisher information: `"source"` images
            (the paper) or the `"target"` training images, when no source
            image is available; the expectation over outputs is the source
            model's own predictive distribution either way.
        fisher_examples: images the Fisher information is estimated on.
        fisher_scale: `"raw"` (the paper's F) or `"mean"` (F divided by
            its mean over the penalized kernels, so that α has the scale of
            L2-SP's; a constant factor that the α grid absorbs).
        freeze_units: the n of Figure 3 (first n depth units frozen).
        freeze_kinds: kinds of Figure 3.
        freeze_repeats: runs per n and kind (`null`: `repeats`).
        freeze_per_class: data sets of Figure 3 (`null`: all).
        r2_kinds: kinds of Figure 4.
        r2_examples: training images the activations are compared on.
        significance: level of the paired test (the paper: 5%).
    """

    # The `keras-sp` subcommand of these configs (see
    # `keras_sp.experiments.config`).
    COMMAND = "finetune"

    title: str = ""
    backbone: str = "ResNet101"
    weights: str | None = "imagenet"
    source_num_classes: int = 1000
    backbone_layer: str = "backbone"
    source_head_layer: str = "source_head"
    input_size: int = 224
    image_size: int | None = None
    target: str | dict[str, typing.Any] = "caltech256"
    target_dir: str | None = None
    per_class: list[int | None] = dataclasses.field(
        default_factory=lambda: [30]
    )
    target_classes: list[int] | None = None
    test_per_class: int | None = None
    validation_fraction: float = 0.2
    on_corrupt: str = "error"
    preprocessing: str = "paper"
    color_order: str = "rgb"
    source: str | None = None
    source_dir: str | None = None
    source_classes: list[int] | None = None
    source_examples: int = 2000
    source_batchnorm: list[str] = dataclasses.field(
        default_factory=lambda: ["as_trained", "reestimated"]
    )
    kinds: list[str] = dataclasses.field(
        default_factory=lambda: ["l2", "l2_sp", "l2_sp_fisher"]
    )
    alpha_grid: dict[str, list[float]] = dataclasses.field(
        default_factory=_default_grid
    )
    beta: float = 0.01
    beta_grid: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    learning_rate_grid: list[float] = dataclasses.field(
        default_factory=lambda: [0.01]
    )
    learning_rate_kind: str = "l2"
    iterations: int = 9000
    lr_drop_at: int | None = 6000
    warmup_iterations: int = 0
    momentum: float = 0.9
    batch_size: int = 64
    batchnorm: str = "train"
    devices: str = "one"
    repeats: int = 5
    validation_repeats: int = 1
    select_on: int | None = None
    seed: int = 0
    fisher_mode: str = "exact"
    fisher_samples: int = 1
    fisher_data: str = "source"
    fisher_examples: int = 1000
    fisher_scale: str = "raw"
    freeze_units: list[int] = dataclasses.field(default_factory=list)
    freeze_kinds: list[str] = dataclasses.field(
        default_factory=lambda: ["l2", "l2_sp"]
    )
    freeze_repeats: int | None = None
    freeze_per_class: list[int | None] | None = None
    r2_kinds: list[str] = dataclasses.field(
        default_factory=lambda: ["l2", "l2_sp"]
    )
    r2_examples: int = 500
    significance: float = 0.05

    def validate(self):
        """Raises `ConfigError` naming the first key with a bad value."""
        _checks.check(self)


def settings_of(settings_class, config):
    """The settings a stage reads: `settings_class` filled from `config`.

    Args:
        settings_class: a dataclass whose fields are keys of the config.
        config: a `FinetuneConfig`.

    Returns:
        A `settings_class` with the values of `config`.
    """
    return settings_class(
        **{
            field.name: getattr(config, field.name)
            for field in dataclasses.fields(settings_class)
        }
    )


def dataset_slug(target, per_class):
    """The name of a data set in the run records (`"caltech256_30"`).

    `target` is a config's `target`: a paper target's name or an own
    target's object (named by `_own_spec.target_name`).
    """
    name = target_name(target)
    return name if per_class is None else f"{name}_{per_class}"


# Keys that say how many runs to make or how to report them, not how a run
# is made: changing them keeps the runs already recorded valid (a run's key
# names its data set, and each data set is drawn on its own).
_EXTENT_KEYS = (
    "title",
    "per_class",
    "repeats",
    "freeze_units",
    "freeze_kinds",
    "freeze_repeats",
    "freeze_per_class",
    "select_on",
    "significance",
)


# Keys that say where a run is computed, not what it computes: a run on all
# local devices equals the same run on one (up to rounding).
_PLACEMENT_KEYS = ("devices",)


def results_settings(config):
    """The settings a results file is tied to (see `_EXTENT_KEYS` and
    `_PLACEMENT_KEYS`)."""
    settings = dataclasses.asdict(config)
    for key in _EXTENT_KEYS + _PLACEMENT_KEYS:
        settings.pop(key)
    return settings


def config_path(name):
    """A config file: `name` itself, or a finetune config shipped with keras-sp.

    Args:
        name: a path to a JSON file, or the name of a file of
            `keras_sp/configs/` whose `"command"` is `"finetune"`, with or
            without `.json` (e.g. `"caltech256_30"`).

    Returns:
        The path of the file.

    Raises:
        ConfigError: for a shipped config of another subcommand (such as
            `transferability_fashion_mnist`), naming it, or for a name that
            is neither a file nor a finetune config.

    Example:

    >>> import os
    >>> os.path.basename(config_path("caltech256_30"))
    'caltech256_30.json'
    """
    return experiment_config.config_path(name, FinetuneConfig.COMMAND)
