"""The paper's fine-tuning experiments, driven by a config file.

`keras-sp finetune --config FILE --out DIR` fine-tunes a pretrained backbone
with a new classifier on a target task, once per penalty kind, and writes
the paper's tables and figures:

- **Table 2**: target test accuracy, mean ± std over `repeats` runs per kind
  and data set, and McNemar's exact paired test of the worst run of each -SP
  kind against the best L2 run (on the same test images), at the level
  `significance` (the paper: 5%).
- **Figure 1**: accuracy over the α × β grid (for the kinds validated over
  more than one α and β).
- **Figure 3**: accuracy against the number n of frozen depth units, for
  `freeze_kinds` (the paper: L2 and L2-SP).
- **Table 3**: the source-task accuracy drop: the fine-tuned backbone with
  the original source classifier, on source validation images, with the
  BatchNormalization statistics as fine-tuning left them and re-estimated on
  those source images (the paper does not say which it used).
- **Figure 4**: box plots of the per-feature R² of the fine-tuned against
  the pretrained activations, per depth unit.

The protocol (section 4.2 of the paper): α, β and the learning rate are
chosen per kind and data set on a held-out part of the training set
(`validation_fraction` of each class) over the grids of the config, by the
mean validation accuracy over `validation_repeats` seeds; then `repeats`
runs at the chosen values train on the whole training set and are tested.
Runs of the same repeat index share their seed (new head's initialization,
batch order, augmentation) across kinds: the comparisons are matched. Every
run records the relative drift ||w - w0|| / ||w0|| of the backbone's kernels.
Every finished run is appended to `DIR/results.json`, so a rerun resumes;
a rerun with more `repeats` or another freezing sweep adds runs to it. It
and the Fisher files kept in `DIR` are written atomically (see
`keras_sp.experiments.results`). `--config` takes a file or the name of a
shipped config whose `"command"` is `"finetune"` (see `config_path`).

A config names:

- the backbone: a `keras.applications` name (`"ResNet101"`) with `weights`
  `"imagenet"`, a `.weights.h5` file (e.g. Places365 weights) or `null`;
  `"MobileNet"` with `weights="imagenet_converted"` (the ImageNet MobileNet
  V1 that `keras_sp.pretrained` converts offline); a `.keras` file holding
  the source model (a nested backbone model named `backbone_layer` and a
  source classifier named `source_head_layer`); or `"fashion_source"`, the
  small CNN pretrained on Fashion-MNIST classes 0-4 (a cached `.keras` file);
- the target: `"caltech256"` (`per_class` 30 or 60), `"mit_indoor67"`,
  `"stanford_dogs"` or `"fashion_mnist"` (`per_class` few-shot images of
  `target_classes`);
- the source data (`source`), for Table 3 and for the Fisher information
  when `fisher_data="source"`: `"imagenet"`, `"places365"` or
  `"fashion_mnist"` (`source_classes`).

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.
"""

import dataclasses
import hashlib
import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

import keras_sp
from keras_sp import analysis
from keras_sp import plots
from keras_sp import pretrained
from keras_sp import units
from keras_sp.datasets import channel_mean
from keras_sp.datasets import few_shot
from keras_sp.datasets import load_caltech256
from keras_sp.datasets import load_fashion_mnist
from keras_sp.datasets import load_imagenet
from keras_sp.datasets import load_mit_indoor67
from keras_sp.datasets import load_places365
from keras_sp.datasets import load_stanford_dogs
from keras_sp.datasets import paper_preprocessing
from keras_sp.datasets.preprocessing import three_channels
from keras_sp.experiments import config as experiment_config
from keras_sp.experiments import fashion_source
from keras_sp.experiments import training
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.fisher import load_fisher
from keras_sp.experiments.fisher import save_fisher
from keras_sp.experiments.results import ResultsFile
from keras_sp.experiments.results import write_text
from keras_sp.penalties import FISHER_KINDS
from keras_sp.penalties import KERNEL_NAMES
from keras_sp.penalties import KINDS

__all__ = [
    "FinetuneConfig",
    "add_parser",
    "chosen_learning_rate",
    "chosen_point",
    "config_path",
    "run_finetune",
    "write_report",
]

TARGETS = ("fashion_mnist", "caltech256", "mit_indoor67", "stanford_dogs")
SOURCES = ("imagenet", "places365", "fashion_mnist")
PREPROCESSING = ("paper", "mobilenet", "none")
BATCHNORM = ("train", "frozen")
FISHER_DATA = ("source", "target")
FISHER_SCALES = ("raw", "mean")
FISHER_MODES = ("exact", "sampled", "empirical")
CONVERTED_WEIGHTS = "imagenet_converted"
FASHION_SOURCE = "fashion_source"
# The paper resizes to 256 and crops 224: the crop keeps 224/256 of a side.
_CROP_RATIO = 256 / 224
_NAMES = {
    "fashion_mnist": "Fashion-MNIST",
    "caltech256": "Caltech 256",
    "mit_indoor67": "MIT Indoors 67",
    "stanford_dogs": "Stanford Dogs 120",
}
_KIND_NAMES = {
    "l2": "L2",
    "l2_sp": "L2-SP",
    "l2_sp_fisher": "L2-SP-Fisher",
    "l1_sp": "L1-SP",
    "group_lasso_sp": "GL-SP",
    "group_lasso_sp_fisher": "GL-SP-Fisher",
}


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
            `"fashion_mnist"`.
        target_dir: the Caltech-256 or MIT Indoors folder; the tfds data
            folder for Stanford Dogs.
        per_class: training images per class, one data set (one column of
            Table 2) each: 30 and 60 for Caltech-256; `null` for the
            official splits of Stanford Dogs and MIT Indoors.
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
    target: str = "caltech256"
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
        def choice(name, options, optional=False):
            value = getattr(self, name)
            if optional and value is None:
                return
            if value not in options:
                raise ConfigError(
                    f"Config key '{name}' must be one of {list(options)}. "
                    f"Received: {name}={value!r}"
                )

        def positive(name):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(
                    f"Config key '{name}' must be positive. Received: "
                    f"{name}={value!r}"
                )

        choice("target", TARGETS)
        choice("source", SOURCES, optional=True)
        choice("preprocessing", PREPROCESSING)
        choice("color_order", ("rgb", "bgr"))
        choice("on_corrupt", ("error", "skip"))
        choice("batchnorm", BATCHNORM)
        choice("fisher_mode", FISHER_MODES)
        choice("fisher_data", FISHER_DATA)
        choice("fisher_scale", FISHER_SCALES)
        for name in (
            "input_size",
            "source_num_classes",
            "source_examples",
            "iterations",
            "batch_size",
            "repeats",
            "validation_repeats",
            "fisher_samples",
            "fisher_examples",
            "freeze_repeats",
            "r2_examples",
            "test_per_class",
        ):
            positive(name)
        if self.image_size is not None and self.image_size < self.input_size:
            raise ConfigError(
                "Config key 'image_size' must be at least input_size "
                f"({self.input_size}). Received: image_size={self.image_size}"
            )
        if not 0 < self.validation_fraction < 1:
            raise ConfigError(
                "Config key 'validation_fraction' must be between 0 and 1. "
                f"Received: validation_fraction={self.validation_fraction!r}"
            )
        if not 0 < self.significance < 1:
            raise ConfigError(
                "Config key 'significance' must be between 0 and 1. "
                f"Received: significance={self.significance!r}"
            )
        if self.lr_drop_at is not None and self.lr_drop_at < 0:
            raise ConfigError(
                "Config key 'lr_drop_at' must be >= 0. Received: "
                f"lr_drop_at={self.lr_drop_at!r}"
            )
        if self.warmup_iterations < 0:
            raise ConfigError(
                "Config key 'warmup_iterations' must be >= 0. Received: "
                f"warmup_iterations={self.warmup_iterations!r}"
            )
        if not self.kinds:
            raise ConfigError("Config key 'kinds' must not be empty.")
        for index, kind in enumerate(self.kinds):
            if kind not in KINDS:
                raise ConfigError(
                    f"Config key 'kinds[{index}]' must be one of "
                    f"{list(KINDS)}. Received: kinds[{index}]={kind!r}"
                )
        if len(set(self.kinds)) != len(self.kinds):
            raise ConfigError(
                f"Config key 'kinds' repeats a kind. Received: kinds="
                f"{self.kinds}"
            )
        for index, mode in enumerate(self.source_batchnorm):
            if mode not in ("as_trained", "reestimated"):
                raise ConfigError(
                    f"Config key 'source_batchnorm[{index}]' must be "
                    "'as_trained' or 'reestimated'. Received: "
                    f"source_batchnorm[{index}]={mode!r}"
                )
        if self.learning_rate_kind not in self.kinds:
            raise ConfigError(
                "Config key 'learning_rate_kind' must be one of 'kinds' "
                f"({self.kinds}). Received: learning_rate_kind="
                f"{self.learning_rate_kind!r}"
            )
        for name in ("freeze_kinds", "r2_kinds"):
            for kind in getattr(self, name):
                if kind not in self.kinds:
                    raise ConfigError(
                        f"Config key '{name}' names a kind not in 'kinds' "
                        f"({self.kinds}). Received: {name}="
                        f"{getattr(self, name)}"
                    )
        for name in ("alpha_grid", "beta_grid"):
            for kind, grid in getattr(self, name).items():
                if kind not in self.kinds:
                    raise ConfigError(
                        f"Config key '{name}.{kind}' is not a kind of "
                        f"'kinds' ({self.kinds}). Received: {name}="
                        f"{getattr(self, name)}"
                    )
                if not grid:
                    raise ConfigError(
                        f"Config key '{name}.{kind}' must not be empty."
                    )
                for value in grid:
                    _check_coefficient(f"{name}.{kind}", value)
        missing = [kind for kind in self.kinds if kind not in self.alpha_grid]
        if missing:
            raise ConfigError(
                f"Config key 'alpha_grid' has no values for kind "
                f"'{missing[0]}'. Received: alpha_grid={self.alpha_grid}"
            )
        _check_coefficient("beta", self.beta)
        if not self.learning_rate_grid or any(
            rate <= 0 for rate in self.learning_rate_grid
        ):
            raise ConfigError(
                "Config key 'learning_rate_grid' must hold positive values. "
                f"Received: learning_rate_grid={self.learning_rate_grid}"
            )
        if not self.per_class:
            raise ConfigError("Config key 'per_class' must not be empty.")
        for index, count in enumerate(self.per_class):
            official = self.target in ("mit_indoor67", "stanford_dogs")
            if official != (count is None) or (count is not None and count < 2):
                expected = (
                    "null (the official split)"
                    if official
                    else "an integer >= 2"
                )
                raise ConfigError(
                    f"Config key 'per_class[{index}]' must be {expected} for "
                    f"target={self.target!r}. Received: per_class[{index}]="
                    f"{count!r}"
                )
        if self.select_on is not None and self.select_on != self.per_class[0]:
            raise ConfigError(
                "Config key 'select_on' must be the first data set of "
                f"'per_class' ({self.per_class[0]!r}). Received: select_on="
                f"{self.select_on!r}"
            )
        for n in self.freeze_units:
            if n < 0:
                raise ConfigError(
                    "Config key 'freeze_units' must hold n >= 0. Received: "
                    f"freeze_units={self.freeze_units}"
                )
        for count in self.freeze_per_class or ():
            if count not in self.per_class:
                raise ConfigError(
                    "Config key 'freeze_per_class' must name data sets of "
                    f"'per_class' ({self.per_class}). Received: "
                    f"freeze_per_class={self.freeze_per_class}"
                )
        fashion = self.target == "fashion_mnist"
        if fashion and self.preprocessing == "paper":
            raise ConfigError(
                "Config key 'preprocessing' must be 'mobilenet' or 'none' for "
                "target='fashion_mnist'. Received: preprocessing='paper'"
            )
        if not fashion and self.preprocessing == "none":
            raise ConfigError(
                "Config key 'preprocessing' must be 'paper' or 'mobilenet' "
                f"for target={self.target!r}. Received: preprocessing='none'"
            )
        if self.source == "fashion_mnist" and not self.source_classes:
            raise ConfigError(
                "Config key 'source_classes' must list the source task's "
                "Fashion-MNIST classes for source='fashion_mnist'. Received: "
                f"source_classes={self.source_classes!r}"
            )
        if self.target in ("caltech256", "mit_indoor67") and not (
            self.target_dir
        ):
            raise ConfigError(
                f"Config key 'target_dir' must name the {self.target} folder. "
                "Received: target_dir=None"
            )
        uses_fisher = any(kind in FISHER_KINDS for kind in self.kinds)
        if uses_fisher and self.fisher_data == "source" and not self.source:
            raise ConfigError(
                "Config key 'source' must name the source data when a Fisher "
                "kind uses fisher_data='source' (or set fisher_data="
                "'target'). Received: source=None"
            )
        if self.weights == CONVERTED_WEIGHTS and self.backbone != "MobileNet":
            raise ConfigError(
                f"Config key 'weights': {CONVERTED_WEIGHTS!r} is the "
                "converted ImageNet MobileNet V1; use backbone='MobileNet'. "
                f"Received: backbone={self.backbone!r}"
            )
        if not _is_model_file(self.backbone) and self.backbone not in (
            FASHION_SOURCE,
        ):
            if not hasattr(keras.applications, self.backbone):
                raise ConfigError(
                    "Config key 'backbone' must be a keras.applications name "
                    f"(e.g. 'ResNet101'), a .keras file or {FASHION_SOURCE!r}."
                    f" Received: backbone={self.backbone!r}"
                )

    def grid(self, kind, learning_rate):
        """The (alpha, beta, learning rate) points tried for `kind`."""
        betas = self.beta_grid.get(kind, [self.beta])
        return [
            (alpha, beta, learning_rate)
            for alpha in self.alpha_grid[kind]
            for beta in betas
        ]

    def learning_rate_points(self):
        """The points that choose the learning rate (first α and β)."""
        kind = self.learning_rate_kind
        beta = self.beta_grid.get(kind, [self.beta])[0]
        return [
            (self.alpha_grid[kind][0], beta, rate)
            for rate in self.learning_rate_grid
        ]


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


def _settings(config):
    """The settings a results file is tied to (see `_EXTENT_KEYS`)."""
    settings = dataclasses.asdict(config)
    for key in _EXTENT_KEYS:
        settings.pop(key)
    return settings


def _check_coefficient(key, value):
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"Config key '{key}' must hold non-negative finite numbers. "
            f"Received: {key}={value!r}"
        )


def _is_model_file(name):
    return isinstance(name, str) and name.endswith(".keras")


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

    >>> os.path.basename(config_path("caltech256_30"))
    'caltech256_30.json'
    """
    return experiment_config.config_path(name, FinetuneConfig.COMMAND)


# The pretrained model.


@dataclasses.dataclass
class _Pretrained:
    """The starting point: a backbone, and the source model it came from."""

    backbone: keras.Model
    source_model: keras.Model | None
    source_head: object | None


def _applications_models(config):
    """`(backbone, source model)` of a `keras.applications` backbone.

    The backbone ends with average pooling; the source model keeps the
    source classifier, with logits as outputs.
    """
    constructor = getattr(keras.applications, config.backbone)
    shape = (config.input_size, config.input_size, 3)
    if config.weights == CONVERTED_WEIGHTS:
        return (
            pretrained.imagenet_mobilenet(
                input_shape=shape, include_top=False, pooling="avg"
            ),
            pretrained.imagenet_mobilenet(
                input_shape=shape, classifier_activation=None
            ),
        )
    weights = config.weights
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise ConfigError(
            "Config key 'weights' must be 'imagenet', null, "
            f"{CONVERTED_WEIGHTS!r} or an existing .weights.h5 file. "
            f"Received: weights={weights!r}"
        )
    # A weights file holds the model with its classifier: it is loaded
    # there (checked) and the backbone's layers are copied from it.
    from_file = weights not in (None, "imagenet")
    source_model = constructor(
        include_top=True,
        weights=None if from_file else weights,
        input_shape=shape,
        classes=config.source_num_classes,
        classifier_activation=None,
    )
    if from_file:
        pretrained.load_weights_checked(source_model, weights)
    backbone = constructor(
        include_top=False,
        weights=None if from_file else weights,
        input_shape=shape,
        pooling="avg",
    )
    if from_file:
        for layer in backbone.layers:
            if layer.weights:
                layer.set_weights(
                    source_model.get_layer(layer.name).get_weights()
                )
    return backbone, source_model


def _load_pretrained(config):
    """The pretrained backbone, the full source model and its classifier."""
    if _is_model_file(config.backbone) or config.backbone == FASHION_SOURCE:
        if config.backbone == FASHION_SOURCE:
            source_model, _ = fashion_source.pretrained_source_model(
                width=32, fc_units=None, verbose=0
            )
        else:
            if not os.path.isfile(config.backbone):
                raise ConfigError(
                    "Config key 'backbone' names a .keras file that does not "
                    f"exist. Received: backbone={config.backbone!r}"
                )
            source_model = keras.saving.load_model(config.backbone)
        names = [layer.name for layer in source_model.layers]
        for key in ("backbone_layer", "source_head_layer"):
            if getattr(config, key) not in names:
                raise ConfigError(
                    f"Config key '{key}' must name a layer of the source model "
                    f"{config.backbone!r} (layers: {names}). Received: "
                    f"{key}={getattr(config, key)!r}"
                )
        backbone = source_model.get_layer(config.backbone_layer)
        if not isinstance(backbone, keras.Model):
            raise ConfigError(
                "Config key 'backbone_layer' must name a nested model (the "
                f"feature extractor). Received: backbone_layer="
                f"{config.backbone_layer!r}"
            )
        return _Pretrained(
            backbone,
            source_model,
            source_model.get_layer(config.source_head_layer),
        )
    try:
        backbone, source_model = _applications_models(config)
    except ConfigError:
        raise
    except ValueError as error:
        first = str(error).splitlines()[0] if str(error) else repr(error)
        raise ConfigError(
            f"Config key 'weights' does not fit backbone "
            f"{config.backbone!r} ({first}). Received: weights="
            f"{config.weights!r}"
        ) from None
    head = None
    names = [layer.name for layer in source_model.layers]
    if "predictions" in names and isinstance(
        source_model.get_layer("predictions"), keras.layers.Dense
    ):
        head = source_model.get_layer("predictions")
    return _Pretrained(backbone, source_model, head)


# Data.


def _seed_pairs(seed):
    return tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2)


class _ArrayTarget:
    """Images held in memory (Fashion-MNIST): resize, mirror and crop.

    The paper's augmentation at small scale: images are resized to
    `image_size` (default `input_size * 256 / 224`) px; training takes a
    random `input_size` crop and a random mirror, testing the central crop.
    """

    def __init__(self, x_train, y_train, x_test, y_test, config, channels):
        self.x_train = x_train
        self.labels = y_train
        self.x_test = x_test
        self.y_test = y_test
        self.config = config
        self.channels = channels
        self.size = config.input_size
        self.resized = _resized_size(config)

    def _resize(self, image):
        image = tf.image.resize(tf.cast(image, tf.float32), (self.resized,) * 2)
        if self.channels == 3:
            image = three_channels(image)
        return image

    def _finish(self, image):
        if self.config.preprocessing == "mobilenet":
            return image / 127.5 - 1.0
        return image

    def train_batches(self, train_indices, seed):
        size = self.size

        def augment(example, seed_pair):
            image, label = example
            seeds = tf.random.experimental.stateless_split(seed_pair, num=2)
            image = self._resize(image)
            mirror = tf.random.stateless_uniform([], seeds[0]) < 0.5
            image = tf.cond(mirror, lambda: image[:, ::-1, :], lambda: image)
            image = tf.image.stateless_random_crop(
                image, (size, size, image.shape[-1]), seeds[1]
            )
            return self._finish(image), label

        data = tf.data.Dataset.from_tensor_slices(
            (self.x_train[train_indices], self.labels[train_indices])
        )
        data = data.shuffle(len(train_indices), seed=seed).repeat()
        return (
            tf.data.Dataset.zip((data, _seed_pairs(seed)))
            .map(augment, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(self.config.batch_size, drop_remainder=True)
            .prefetch(tf.data.AUTOTUNE)
        )

    def eval_batches(self, train_indices, split, indices=None):
        del train_indices  # no statistic of the training images is used
        x, y = (
            (self.x_train, self.labels)
            if split == "train"
            else (self.x_test, self.y_test)
        )
        if indices is not None:
            x, y = x[indices], y[indices]
        offset = (self.resized - self.size) // 2

        def central(image, label):
            image = self._resize(image)
            image = image[
                :, offset : offset + self.size, offset : offset + self.size
            ]
            return self._finish(image), label

        return (
            tf.data.Dataset.from_tensor_slices((x, y))
            .batch(self.config.batch_size)
            .map(central, num_parallel_calls=tf.data.AUTOTUNE)
            .prefetch(tf.data.AUTOTUNE)
        )


class _ImageTarget:
    """An `ImageData` through the paper's pre-processing pipeline.

    The channel mean subtracted is that of the images a run trains on (the
    training part during validation, the whole training set for tests).
    """

    def __init__(self, data, config):
        self.data = data
        self.config = config
        self.skipped = data.skipped
        self.labels = np.array(
            [
                int(y)
                for y in data.train.map(lambda x, y: y).as_numpy_iterator()
            ],
            dtype="int32",
        )
        self._means = {}

    def _subset(self, indices):
        keep = np.zeros(len(self.labels), dtype=bool)
        keep[indices] = True
        keep = tf.constant(keep)
        return (
            self.data.train.enumerate()
            .filter(lambda i, example: tf.gather(keep, i))
            .map(lambda i, example: example)
        )

    def _mean(self, train_indices):
        key = hashlib.sha1(np.asarray(train_indices).tobytes()).hexdigest()
        if key not in self._means:
            if self.config.preprocessing == "mobilenet":
                self._means[key] = np.full(3, 127.5, dtype="float32")
            else:
                self._means[key] = channel_mean(
                    self._subset(train_indices),
                    image_size=_resized_size(self.config),
                )
        return self._means[key]

    def _pipeline(self, dataset, train_indices, training, seed=0):
        batches = paper_preprocessing(
            dataset,
            self._mean(train_indices),
            training=training,
            image_size=_resized_size(self.config),
            crop_size=self.config.input_size,
            batch_size=self.config.batch_size,
            seed=seed,
            color_order=self.config.color_order,
        )
        if self.config.preprocessing == "mobilenet":
            batches = batches.map(lambda x, y: (x / 127.5, y))
        return batches

    def train_batches(self, train_indices, seed):
        return self._pipeline(
            self._subset(train_indices), train_indices, True, seed
        )

    def eval_batches(self, train_indices, split, indices=None):
        dataset = self.data.train if split == "train" else self.data.test
        if split == "train" and indices is not None:
            dataset = self._subset(indices)
        return self._pipeline(dataset, train_indices, False)


def _resized_size(config):
    if config.image_size is not None:
        return config.image_size
    return round(config.input_size * _CROP_RATIO)


def _fashion_arrays(classes, train=True):
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x, y = (x_train, y_train) if train else (x_test, y_test)
    return fashion_source.select_classes(x, y, classes)


def _load_target(config, per_class, channels):
    """The target task of one data set (`per_class` images per class)."""
    if config.target == "fashion_mnist":
        classes = config.target_classes or list(range(10))
        x_train, y_train = _fashion_arrays(classes, train=True)
        x_test, y_test = _fashion_arrays(classes, train=False)
        draw = few_shot(y_train, per_class, seed=config.seed)
        if config.test_per_class is not None:
            test = few_shot(y_test, config.test_per_class, seed=config.seed)
            x_test, y_test = x_test[test], y_test[test]
        return (
            _ArrayTarget(
                x_train[draw], y_train[draw], x_test, y_test, config, channels
            ),
            len(classes),
        )
    if config.target == "caltech256":
        data = load_caltech256(
            config.target_dir,
            per_class=per_class,
            seed=config.seed,
            on_corrupt=config.on_corrupt,
        )
    elif config.target == "mit_indoor67":
        data = load_mit_indoor67(
            config.target_dir, seed=config.seed, on_corrupt=config.on_corrupt
        )
    else:
        data = load_stanford_dogs(data_dir=config.target_dir)
    return _ImageTarget(data, config), data.num_classes


def _validation_split(labels, fraction, seed):
    """Holds out `fraction` of each class's training images (at least 1)."""
    rng = np.random.default_rng(seed + 10_000)
    train, validation = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(fraction * len(members)))
        if held >= len(members):
            raise ConfigError(
                "Config key 'validation_fraction' leaves no training image "
                f"in class {label} ({len(members)} images). Received: "
                f"validation_fraction={fraction!r}"
            )
        validation.extend(members[:held])
        train.extend(members[held:])
    return np.sort(train), np.sort(validation)


def _source_images(config, target, train_indices, count, split):
    """`count` preprocessed source images (and labels) as NumPy arrays.

    `split` is `"train"` (Fisher inputs) or `"test"` (the source task's
    validation images, Table 3). Source images go through the target's
    test-time pre-processing, which the fine-tuned network expects.
    """
    if config.source == "fashion_mnist":
        x, y = _fashion_arrays(config.source_classes, train=split == "train")
        x, y = x[:count], y[:count]
        arrays = _ArrayTarget(x, y, x, y, config, target.channels)
        return _materialize(arrays.eval_batches(None, "train"))
    loader = load_imagenet if config.source == "imagenet" else load_places365
    data = loader(data_dir=config.source_dir)
    dataset = (data.train if split == "train" else data.test).take(count)
    return _materialize(target._pipeline(dataset, train_indices, False))


def _materialize(batches):
    xs, ys = [], []
    for x, y in batches:
        xs.append(np.asarray(x))
        ys.append(np.asarray(y))
    return np.concatenate(xs), np.concatenate(ys)


# One run.


def _kernel_paths(backbone):
    return {
        variable.path
        for variable in backbone.weights
        if variable.name in KERNEL_NAMES
    }


def _build_model(start, num_classes, seed):
    """A copy of the pretrained backbone with a new classifier."""
    keras.utils.set_random_seed(seed)
    backbone = keras.models.clone_model(start.backbone)
    backbone.set_weights(start.backbone.get_weights())
    head = keras.layers.Dense(num_classes, name="head")
    model = keras.Sequential([backbone, head], name="target")
    model.build((None,) + tuple(start.backbone.input_shape[1:]))
    return model, backbone, head


def _evaluate(model, batches):
    """Per-example correctness and cross-entropy of `model` (inference
    mode) on `batches`."""
    correct, losses = [], []
    for x, y in batches:
        scores = keras.ops.convert_to_numpy(model(x, training=False))
        labels = np.asarray(y)
        correct.append(np.argmax(scores, axis=-1) == labels)
        shifted = scores - scores.max(axis=-1, keepdims=True)
        log_probabilities = shifted - np.log(
            np.exp(shifted).sum(axis=-1, keepdims=True)
        )
        losses.append(-log_probabilities[np.arange(len(labels)), labels])
    return np.concatenate(correct), np.concatenate(losses)


def _pack(correct):
    return {
        "n": int(len(correct)),
        "bits": np.packbits(correct).tobytes().hex(),
    }


def _unpack(packed):
    bits = np.frombuffer(bytes.fromhex(packed["bits"]), dtype=np.uint8)
    return np.unpackbits(bits)[: packed["n"]].astype(bool)


class _Experiment:
    """Runs the config's fine-tuning runs and records them."""

    def __init__(self, config, out, verbose, run_eagerly):
        self.config = config
        self.out = out
        self.log = print if verbose else (lambda *args, **kwargs: None)
        self.verbose = verbose
        self.run_eagerly = run_eagerly
        self.results = ResultsFile(
            os.path.join(out, "results.json"), _settings(config)
        )
        self.pretrained = _load_pretrained(config)
        backbone = self.pretrained.backbone
        self.channels = backbone.input_shape[-1]
        self.unit_layers = _unit_activation_layers(backbone)
        self.reference_activations = keras.Model(
            backbone.input,
            [backbone.get_layer(name).output for name in self.unit_layers],
        )
        self._fishers = {}

    # Bookkeeping.

    def _record(self, key, make):
        if self.results.done(key):
            return self.results.get(key)
        started = time.time()
        record = make()
        record["key"] = key
        record["seconds"] = round(time.time() - started, 1)
        self.results.append(record)
        self.log(
            f"{key}: "
            + ", ".join(
                f"{name} {record[name]:.4f}"
                for name in ("validation_accuracy", "accuracy", "drift")
                if name in record
            )
            + f" ({record['seconds']:.0f} s)"
        )
        return record

    # Fisher information.

    def _fisher(self, dataset, target, train_indices):
        """The source model's diagonal Fisher on the backbone's kernels."""
        config = self.config
        scope = "source" if config.fisher_data == "source" else dataset
        key = hashlib.sha1(np.asarray(train_indices).tobytes()).hexdigest()[:8]
        name = f"fisher_{scope}_{key if scope != 'source' else 'all'}.npz"
        if name in self._fishers:
            return self._fishers[name]
        path = os.path.join(self.out, name)
        if os.path.exists(path):
            fisher = load_fisher(path)
        else:
            if config.fisher_data == "source":
                x, y = _source_images(
                    config,
                    target,
                    train_indices,
                    config.fisher_examples,
                    "train",
                )
            else:
                count = min(config.fisher_examples, len(train_indices))
                x, y = _materialize(
                    target.eval_batches(
                        train_indices, "train", train_indices[:count]
                    )
                )
            full = keras_sp.fisher.diagonal_fisher(
                self.pretrained.source_model,
                (x, y),
                mode=config.fisher_mode,
                samples=config.fisher_samples,
                batch_size=16,
                seed=config.seed,
            )
            fisher = _backbone_entries(full, self.pretrained.backbone)
            save_fisher(fisher, path)
        if config.fisher_scale == "mean":
            mean = np.mean(np.concatenate([f.ravel() for f in fisher.values()]))
            fisher = {path: f / mean for path, f in fisher.items()}
        self._fishers[name] = fisher
        return fisher

    # Runs.

    def _train(self, data, kind, point, seed, train_indices, freeze=0):
        config = self.config
        alpha, beta, rate = point
        model, backbone, head = _build_model(
            self.pretrained, data["num_classes"], seed
        )
        frozen = {}
        if freeze:
            units.freeze_first(model, freeze)
            frozen = {
                variable.path: np.array(variable.numpy())
                for unit in units.depth_units(model)[:freeze]
                for layer in unit
                for variable in layer.weights
            }
        if config.batchnorm == "frozen":
            units.freeze_batchnorm(model)
        fisher = None
        if kind in FISHER_KINDS:
            fisher = self._fisher(data["slug"], data["target"], train_indices)
        keras_sp.regularize(
            model,
            kind,
            alpha=alpha,
            beta=beta,
            new_layers=[head],
            fisher=fisher,
        )
        kernels = _kernel_paths(backbone)
        starting_point = {
            v.path: np.array(v.numpy())
            for v in backbone.weights
            if v.path in kernels
        }
        history = training.fine_tune(
            model,
            data["target"].train_batches(train_indices, seed),
            iterations=config.iterations,
            learning_rate=rate,
            momentum=config.momentum,
            lr_drop_at=config.lr_drop_at,
            warmup_iterations=config.warmup_iterations,
            run_eagerly=self.run_eagerly,
        )
        loss = float(history.history["loss"][-1])
        measures = {
            "final_loss": loss,
            "drift": analysis.weight_drift(backbone, starting_point)[
                "relative"
            ],
        }
        if frozen:
            # Frozen units' weights and BatchNormalization statistics.
            measures["frozen_distance"] = analysis.weight_drift(model, frozen)[
                "distance"
            ]
        return model, backbone, measures

    def _run_record(self, data, kind, point, seed, phase, freeze=0):
        alpha, beta, rate = point
        return {
            "dataset": data["slug"],
            "phase": phase,
            "kind": kind,
            "alpha": alpha,
            "beta": beta,
            "learning_rate": rate,
            "seed": seed,
            "frozen_units": freeze,
        }

    def validation_run(self, data, kind, point, seed):
        def make():
            model, _, measures = self._train(
                data, kind, point, seed, data["train_part"]
            )
            target = data["target"]
            validation, validation_loss = _evaluate(
                model,
                target.eval_batches(
                    data["train_part"], "train", data["held_out"]
                ),
            )
            test, _ = _evaluate(
                model, target.eval_batches(data["train_part"], "test")
            )
            record = self._run_record(data, kind, point, seed, "validation")
            record.update(measures)
            record["validation_accuracy"] = float(validation.mean())
            record["validation_loss"] = float(validation_loss.mean())
            record["test_accuracy"] = float(test.mean())
            return record

        alpha, beta, rate = point
        key = (
            f"{data['slug']}/validation/{kind}/alpha={alpha:g}/beta={beta:g}"
            f"/lr={rate:g}/seed={seed}"
        )
        return self._record(key, make)

    def test_run(self, data, kind, point, seed, freeze=0):
        config = self.config

        def make():
            everything = data["all"]
            model, backbone, measures = self._train(
                data, kind, point, seed, everything, freeze
            )
            correct, _ = _evaluate(
                model, data["target"].eval_batches(everything, "test")
            )
            phase = "freeze" if freeze else "test"
            record = self._run_record(data, kind, point, seed, phase, freeze)
            record.update(measures)
            record["accuracy"] = float(correct.mean())
            if freeze:
                return record
            record["correct"] = _pack(correct)
            if kind in config.r2_kinds:
                activations = keras.Model(
                    backbone.input,
                    [backbone.get_layer(n).output for n in self.unit_layers],
                )
                r2 = analysis.activation_r2(
                    self.reference_activations,
                    activations,
                    data["r2_inputs"],
                    batch_size=config.batch_size,
                )
                record["r2_layers"] = list(self.unit_layers)
                record["r2"] = [
                    [
                        None if np.isnan(v) else round(float(v), 4)
                        for v in values
                    ]
                    for values in r2
                ]
            source = data.get("source")
            if source is not None:
                for batchnorm in config.source_batchnorm:
                    record[f"source_{batchnorm}"] = analysis.source_task_drop(
                        backbone,
                        self.pretrained.source_head,
                        source["x"],
                        source["y"],
                        pretrained_accuracy=source["pretrained_accuracy"],
                        batchnorm=batchnorm,
                        batch_size=config.batch_size,
                    )
            return record

        alpha, beta, rate = point
        phase = f"freeze={freeze}" if freeze else "test"
        key = (
            f"{data['slug']}/{phase}/{kind}/alpha={alpha:g}/beta={beta:g}"
            f"/lr={rate:g}/seed={seed}"
        )
        return self._record(key, make)

    # The protocol.

    def dataset(self, per_class):
        config = self.config
        target, num_classes = _load_target(config, per_class, self.channels)
        train_part, held_out = _validation_split(
            target.labels, config.validation_fraction, config.seed
        )
        everything = np.arange(len(target.labels))
        r2_count = min(config.r2_examples, len(everything))
        data = {
            "slug": _slug(config.target, per_class),
            "per_class": per_class,
            "target": target,
            "num_classes": num_classes,
            "train_part": train_part,
            "held_out": held_out,
            "all": everything,
            "r2_inputs": _materialize(
                target.eval_batches(everything, "train", everything[:r2_count])
            )[0],
        }
        head = self.pretrained.source_head
        if config.source is not None and head is not None:
            x, y = _source_images(
                config, target, everything, config.source_examples, "test"
            )
            data["source"] = {
                "x": x,
                "y": y,
                "pretrained_accuracy": analysis.source_task_accuracy(
                    self.pretrained.backbone,
                    head,
                    x,
                    y,
                    batch_size=config.batch_size,
                ),
            }
        return data

    def choose(self, data):
        """Runs the validation grids; returns the chosen point per kind.

        With `select_on`, only that data set is validated, and the others
        take its choices (chosen_point reads them).
        """
        config = self.config
        seeds = _validation_seeds(config)
        validated = config.select_on is None or data["slug"] == _slug(
            config.target, config.select_on
        )
        if validated and len(config.learning_rate_grid) > 1:
            for seed in seeds:
                for point in config.learning_rate_points():
                    self.validation_run(
                        data, config.learning_rate_kind, point, seed
                    )
        runs = self.results.runs
        rate = chosen_learning_rate(config, runs, data["slug"])
        for kind in config.kinds:
            grid = config.grid(kind, rate)
            if validated and len(grid) > 1:
                for seed in seeds:
                    for point in grid:
                        self.validation_run(data, kind, point, seed)
        return {
            kind: chosen_point(config, self.results.runs, data["slug"], kind)
            for kind in config.kinds
        }

    def run(self):
        """Validation then test runs per data set; then the freezing sweep."""
        config = self.config
        datasets = {}
        for per_class in config.per_class:
            data = self.dataset(per_class)
            skipped = getattr(data["target"], "skipped", ())
            self.log(
                f"{data['slug']}: {len(data['all'])} training images "
                f"({len(data['held_out'])} held out to validate), "
                f"{data['num_classes']} classes"
                + (
                    f"; {len(skipped)} unreadable image files skipped"
                    if skipped
                    else ""
                )
            )
            chosen = self.choose(data)
            for repeat in range(config.repeats):
                for kind in config.kinds:
                    self.test_run(
                        data, kind, chosen[kind], config.seed + repeat
                    )
            datasets[per_class] = (data, chosen)
        for per_class, (data, chosen) in datasets.items():
            if config.freeze_per_class is not None and (
                per_class not in config.freeze_per_class
            ):
                continue
            for n in [n for n in config.freeze_units if n > 0]:
                for repeat in range(config.freeze_repeats or config.repeats):
                    for kind in config.freeze_kinds:
                        self.test_run(
                            data, kind, chosen[kind], config.seed + repeat, n
                        )


def _validation_seeds(config):
    return [config.seed + 100 + v for v in range(config.validation_repeats)]


def _validation_score(config, runs, slug, kind, point):
    """`(mean validation accuracy, -mean validation loss)` of a grid point
    over the validation seeds, or None while runs are missing."""
    seeds = set(_validation_seeds(config))
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


def _best(config, runs, slug, kind, points):
    """The point of best mean validation accuracy; on a tie, of lowest
    validation cross-entropy; then the first in grid order."""
    if len(points) == 1:
        return points[0]
    scores = [_validation_score(config, runs, slug, kind, p) for p in points]
    if any(score is None for score in scores):
        return None
    best = max(range(len(points)), key=lambda index: (scores[index], -index))
    return points[best]


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
    if config.select_on is not None:
        slug = _slug(config.target, config.select_on)
    point = _best(
        config,
        runs,
        slug,
        config.learning_rate_kind,
        config.learning_rate_points(),
    )
    return None if point is None else point[2]


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
    if config.select_on is not None:
        slug = _slug(config.target, config.select_on)
    rate = chosen_learning_rate(config, runs, slug)
    if rate is None:
        return None
    return _best(config, runs, slug, kind, config.grid(kind, rate))


def _slug(target, per_class):
    return target if per_class is None else f"{target}_{per_class}"


def _backbone_entries(fisher, backbone):
    """The entries of `fisher` for the backbone's kernels, by their paths."""
    selected = {}
    for variable in backbone.weights:
        if variable.name not in KERNEL_NAMES:
            continue
        path = variable.path
        matches = [
            key
            for key in fisher
            if key == path
            or key.endswith("/" + path)
            or path.endswith("/" + key)
        ]
        if len(matches) != 1:
            raise ValueError(
                f"The source model's Fisher information has {len(matches)} "
                f"entries for the backbone's variable '{path}'; the backbone "
                "and the source model must share their layer names."
            )
        selected[path] = np.asarray(fisher[matches[0]])
    return selected


def _unit_activation_layers(backbone):
    """For each depth unit, the layer whose output is the unit's activation.

    The unit's last layer, or the last activation layer (ReLU) that follows
    it before the next layer with weights: a MobileNet pair's
    `conv_pw_i_relu`, a ResNet block's `convX_blockY_out`.
    """
    order = list(backbone.layers)
    position = {id(layer): index for index, layer in enumerate(order)}
    names = []
    for unit in units.depth_units(backbone):
        if any(id(layer) not in position for layer in unit):
            raise ValueError(
                f"Backbone {backbone.name!r} nests models; Figure 4 needs its "
                "layers at the top level (a keras.applications model)."
            )
        last = max(position[id(layer)] for layer in unit)
        chosen = order[last]
        for layer in order[last + 1 :]:
            if layer.weights:
                break
            if isinstance(layer, (keras.layers.ReLU, keras.layers.Activation)):
                chosen = layer
        names.append(chosen.name)
    return names


def run_finetune(config, out, verbose=1, run_eagerly=False):
    """Runs an experiment (resuming it) and writes its tables and figures.

    Args:
        config: a `FinetuneConfig`.
        out: output folder; the runs already in its `results.json` are kept
            and not run again.
        verbose: 1 prints a line per run.
        run_eagerly: run the train steps eagerly (no graph tracing; for dry
            runs of large models at tiny size).

    Returns:
        The report written by `write_report` (a dict of its parts).

    Example:

    ```python
    config = load_config(config_path("caltech256_30"), FinetuneConfig)
    report = run_finetune(config, "results/caltech256_30")
    print(report["table2.md"])
    ```

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 4.
    """
    experiment = _Experiment(config, out, verbose, run_eagerly)
    experiment.run()
    return write_report(config, out, experiment.results.runs)


# The report: tables and figures.


def _dataset_title(config, slug):
    for per_class in config.per_class:
        if _slug(config.target, per_class) == slug:
            name = _NAMES[config.target]
            return name if per_class is None else f"{name} - {per_class}"
    return slug


def _percent(values):
    values = np.asarray(values, dtype="float64")
    return f"{100 * values.mean():.1f} ± {100 * values.std():.1f}"


def _chosen_runs(runs, slug, kind, point, phase="test"):
    alpha, beta, rate = point
    return [
        run
        for run in runs
        if run["dataset"] == slug
        and run["phase"] == phase
        and run["kind"] == kind
        and run["alpha"] == alpha
        and run["beta"] == beta
        and run["learning_rate"] == rate
    ]


def _table2(config, runs, chosen, slugs):
    lines = [
        "| method | "
        + " | ".join(_dataset_title(config, s) for s in slugs)
        + " |",
        "|---|" + "---|" * len(slugs),
    ]
    details = [
        "",
        "| data set | method | α | β | lr | runs | accuracy (%) | drift "
        "‖w−w0‖/‖w0‖ (%) | final training loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tests = [
        "",
        f"Paired tests (McNemar's exact test on the per-image test "
        f"predictions, two-sided, level {config.significance:g}): the worst "
        "run of each -SP kind against the best L2 run.",
        "",
        "| data set | method | worst run (%) | best L2 run (%) | only -SP "
        "right | only L2 right | p-value | significantly better | matched mean "
        "difference over seeds (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for kind in config.kinds:
        cells = []
        for slug in slugs:
            point = chosen.get((slug, kind))
            selected = _chosen_runs(runs, slug, kind, point) if point else []
            if not selected:
                cells.append("–")
                continue
            accuracies = [run["accuracy"] for run in selected]
            cells.append(_percent(accuracies))
            details.append(
                f"| {_dataset_title(config, slug)} | {_KIND_NAMES[kind]} | "
                f"{point[0]:g} | {point[1]:g} | {point[2]:g} | {len(selected)} "
                f"| {_percent(accuracies)} | "
                f"{_percent([run['drift'] for run in selected])} | "
                f"{np.mean([run['final_loss'] for run in selected]):.3f} |"
            )
            summary[(slug, kind)] = selected
        lines.append(f"| {_KIND_NAMES[kind]} | " + " | ".join(cells) + " |")
    comparisons = []
    for slug in slugs:
        baseline = summary.get((slug, "l2"))
        if not baseline:
            continue
        best = max(baseline, key=lambda run: run["accuracy"])
        by_seed = {run["seed"]: run["accuracy"] for run in baseline}
        for kind in config.kinds:
            if kind == "l2" or (slug, kind) not in summary:
                continue
            selected = summary[(slug, kind)]
            worst = min(selected, key=lambda run: run["accuracy"])
            test = analysis.mcnemar_test(
                _unpack(worst["correct"]), _unpack(best["correct"])
            )
            better = (
                test["p_value"] < config.significance
                and test["a_only"] > test["b_only"]
            )
            differences = [
                run["accuracy"] - by_seed[run["seed"]]
                for run in selected
                if run["seed"] in by_seed
            ]
            spread = ""
            if len(differences) > 1:
                error = np.std(differences, ddof=1) / math.sqrt(
                    len(differences)
                )
                spread = f" ± {100 * error:.1f} (SE)"
            tests.append(
                f"| {_dataset_title(config, slug)} | {_KIND_NAMES[kind]} | "
                f"{100 * worst['accuracy']:.1f} | {100 * best['accuracy']:.1f} "
                f"| {test['a_only']} | {test['b_only']} | "
                f"{test['p_value']:.3g} | {'yes' if better else 'no'} | "
                f"{100 * np.mean(differences):+.1f}{spread} |"
            )
            comparisons.append(
                {
                    "dataset": slug,
                    "kind": kind,
                    "worst": worst["accuracy"],
                    "best_l2": best["accuracy"],
                    "significantly_better": bool(better),
                    "mean_difference": float(np.mean(differences)),
                    **test,
                }
            )
    text = "\n".join(
        [
            f"# Table 2: {config.title}".rstrip(": "),
            "",
            *lines,
            *details,
            *tests,
            "",
        ]
    )
    return text, comparisons


def _table3(config, runs, chosen, slugs):
    modes = ("source_as_trained", "source_reestimated")
    rows = []
    for slug in slugs:
        selected_by_kind = {}
        for kind in config.kinds:
            point = chosen.get((slug, kind))
            selected = [
                run
                for run in (
                    _chosen_runs(runs, slug, kind, point) if point else []
                )
                if any(mode in run for mode in modes)
            ]
            if selected:
                selected_by_kind[kind] = selected
        baseline = {run["seed"]: run for run in selected_by_kind.get("l2", [])}
        for kind, selected in selected_by_kind.items():
            reference = next(
                selected[0][mode]["pretrained"]
                for mode in modes
                if mode in selected[0]
            )

            def cell(mode, selected=selected, kind=kind, baseline=baseline):
                if mode not in selected[0]:
                    return "–"
                drops = [run[mode]["drop"] for run in selected]
                kept = [run[mode]["fine_tuned"] for run in selected]
                text = f"{100 * np.mean(drops):+.1f} ({_percent(kept)})"
                matched = [
                    run[mode]["fine_tuned"]
                    - baseline[run["seed"]][mode]["fine_tuned"]
                    for run in selected
                    if run["seed"] in baseline
                ]
                if kind != "l2" and len(matched) > 1:
                    error = np.std(matched, ddof=1) / math.sqrt(len(matched))
                    text += (
                        f"; vs L2 {100 * np.mean(matched):+.1f} ± "
                        f"{100 * error:.1f}"
                    )
                return text

            rows.append(
                f"| {_dataset_title(config, slug)} | {_KIND_NAMES[kind]} | "
                f"{100 * reference:.1f} | {cell(modes[0])} | "
                f"{cell(modes[1])} | {len(selected)} |"
            )
    if not rows:
        return None
    return "\n".join(
        [
            f"# Table 3: {config.title}".rstrip(": "),
            "",
            "Source-task accuracy drop (points) of the fine-tuned backbone "
            "with the original source classifier, on source validation "
            "images; in brackets the accuracy kept (mean ± std over runs) "
            "and its difference from L2's on the same seeds (mean ± SE).",
            "",
            "| data set | method | pretrained (%) | drop, BN statistics as "
            "fine-tuning left them | drop, BN statistics re-estimated on the "
            "source images | runs |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )


def _figure1(config, runs, slug):
    """`{kind: {(alpha, beta): (validation, test accuracy)}}` at the chosen
    learning rate, for kinds validated over several α and several β."""
    rate = chosen_learning_rate(config, runs, slug)
    grids = {}
    for kind in config.kinds:
        if (
            len(config.alpha_grid[kind]) < 2
            or len(config.beta_grid.get(kind, [config.beta])) < 2
        ):
            continue
        grid = {}
        for alpha, beta, _ in config.grid(kind, rate):
            selected = [
                run
                for run in runs
                if run["dataset"] == slug
                and run["phase"] == "validation"
                and run["kind"] == kind
                and (run["alpha"], run["beta"], run["learning_rate"])
                == (alpha, beta, rate)
            ]
            if selected:
                grid[(alpha, beta)] = (
                    float(
                        np.mean([r["validation_accuracy"] for r in selected])
                    ),
                    float(np.mean([r["test_accuracy"] for r in selected])),
                )
        if grid:
            grids[kind] = grid
    return grids


def _figure3(config, runs, chosen, slug):
    series = {}
    for kind in config.freeze_kinds:
        point = chosen.get((slug, kind))
        if point is None:
            continue
        baseline = [
            run["accuracy"] for run in _chosen_runs(runs, slug, kind, point)
        ]
        points = {}
        for n in config.freeze_units:
            selected = [
                run["accuracy"]
                for run in _chosen_runs(runs, slug, kind, point, phase="freeze")
                if run["frozen_units"] == n
            ]
            if n == 0:
                selected = baseline
            if selected:
                points[n] = selected
        if points:
            series[_KIND_NAMES[kind]] = {
                "points": points,
                "baseline": float(np.mean(baseline)) if baseline else None,
            }
    return series


def _figure4(config, runs, chosen, slug, repeat_seed):
    boxes = {}
    for kind in config.r2_kinds:
        point = chosen.get((slug, kind))
        selected = [
            run
            for run in (_chosen_runs(runs, slug, kind, point) if point else [])
            if run["seed"] == repeat_seed and "r2" in run
        ]
        if selected:
            boxes[_KIND_NAMES[kind]] = [
                np.array([v for v in values if v is not None], dtype="float64")
                for values in selected[0]["r2"]
            ]
    return boxes


def write_report(config, out, runs):
    """Writes Table 2, Figures 1, 3 and 4 and Table 3 from recorded runs.

    Each goes to a Markdown file; the figures also to PNG files. Parts
    without runs (e.g. no source data for Table 3) are left out.

    Args:
        config: the `FinetuneConfig` of the runs.
        out: the output folder.
        runs: the run records (`ResultsFile.runs`).

    Returns:
        A dict with the Markdown text of each part written, and
        `"comparisons"`, the paired tests of Table 2.
    """
    os.makedirs(out, exist_ok=True)
    slugs = [_slug(config.target, n) for n in config.per_class]
    slugs = [s for s in slugs if any(run["dataset"] == s for run in runs)]
    chosen = {
        (slug, kind): chosen_point(config, runs, slug, kind)
        for slug in slugs
        for kind in config.kinds
    }
    report = {}

    def write(name, text):
        write_text(os.path.join(out, name), text)
        report[name] = text

    table2, comparisons = _table2(config, runs, chosen, slugs)
    write("table2.md", table2)
    report["comparisons"] = comparisons
    table3 = _table3(config, runs, chosen, slugs)
    if table3:
        write("table3.md", table3)
    for slug in slugs:
        title = _dataset_title(config, slug)
        for kind, grid in _figure1(config, runs, slug).items():
            name = f"figure1_{slug}_{kind}"
            plots.plot_alpha_beta_grid(
                grid,
                os.path.join(out, name + ".png"),
                title=f"{_KIND_NAMES[kind]}, {title}",
            )
            write(name + ".md", _grid_markdown(grid, kind, title))
        series = _figure3(config, runs, chosen, slug)
        if any(len(s["points"]) > 1 for s in series.values()):
            name = f"figure3_{slug}"
            plots.plot_freezing(
                series, os.path.join(out, name + ".png"), title=title
            )
            write(name + ".md", _freezing_markdown(series, title))
        boxes = _figure4(config, runs, chosen, slug, config.seed)
        if boxes:
            name = f"figure4_{slug}"
            labels = next(
                run["r2_layers"]
                for run in runs
                if run["dataset"] == slug and "r2_layers" in run
            )
            plots.plot_r2_boxes(
                boxes, labels, os.path.join(out, name + ".png"), title=title
            )
            write(name + ".md", _r2_markdown(boxes, labels, title))
    return report


def _grid_markdown(grid, kind, title):
    alphas = sorted({a for a, _ in grid})
    betas = sorted({b for _, b in grid})
    lines = [
        f"# Figure 1: {_KIND_NAMES[kind]}, {title}",
        "",
        "Accuracy (%) over the α × β grid: validation accuracy (held-out "
        "training images, which chose α and β) / test accuracy of the same "
        "models (trained without the held-out images; never used to choose).",
        "",
        "| β \\ α | " + " | ".join(f"{a:g}" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
    ]
    for beta in betas:
        cells = []
        for alpha in alphas:
            value = grid.get((alpha, beta))
            cells.append(
                "–"
                if value is None
                else f"{100 * value[0]:.1f} / {100 * value[1]:.1f}"
            )
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def _freezing_markdown(series, title):
    ns = sorted({n for s in series.values() for n in s["points"]})
    lines = [
        f"# Figure 3: {title}",
        "",
        "Test accuracy (%, mean ± std over runs) with the first n depth units "
        "frozen (n = 0: Table 2's runs).",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name, s in series.items():
        cells = [
            _percent(s["points"][n]) if n in s["points"] else "–" for n in ns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def _r2_markdown(boxes, labels, title):
    names = list(boxes)
    lines = [
        f"# Figure 4: {title}",
        "",
        "Per-feature R² of the fine-tuned against the pretrained activations "
        "at the output of each depth unit (first run): median [first "
        "quartile, third quartile]; constant features left out.",
        "",
        "| depth unit | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for index, label in enumerate(labels):
        cells = []
        for name in names:
            values = boxes[name][index]
            if len(values) == 0:
                cells.append("–")
                continue
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            cells.append(f"{median:.2f} [{q1:.2f}, {q3:.2f}]")
        lines.append(f"| {index + 1} ({label}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "finetune",
        help="the paper's fine-tuning experiments (Table 2, Figures 1, 3, 4, "
        "Table 3) from a config",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a JSON config file, or the name of one of keras-sp's finetune "
        'configs (the shipped configs whose "command" is "finetune"): '
        + ", ".join(experiment_config.shipped_configs(FinetuneConfig.COMMAND)),
    )
    parser.add_argument(
        "--out", default="results/finetune", help="output folder (resumable)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the tables and figures from the runs in --out, without "
        "training",
    )
    parser.set_defaults(run=_run)
    return parser


def _run(args):
    config = load_config(config_path(args.config), FinetuneConfig)
    if args.report_only:
        path = os.path.join(args.out, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No results file {path!r} to report on.")
        results = ResultsFile(path, _settings(config))
        write_report(config, args.out, results.runs)
    else:
        run_finetune(config, args.out)
