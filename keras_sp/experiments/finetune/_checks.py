"""The checks of a `FinetuneConfig`, and the values its keys take.

`check(config)` raises a `ConfigError` naming the first key with a bad
value and the value received; the checks run in the order of the groups
below (choices, counts, kinds, grids, data sets, data sources, backbone).
"""

import math

import keras

from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.finetune._own_spec import check_target
from keras_sp.experiments.finetune._own_spec import is_own_target
from keras_sp.penalties import FISHER_KINDS
from keras_sp.penalties import KINDS

__all__ = [
    "CONVERTED_WEIGHTS",
    "FASHION_SOURCE",
    "check",
    "is_model_file",
]

TARGETS = ("fashion_mnist", "caltech256", "mit_indoor67", "stanford_dogs")
SOURCES = ("imagenet", "places365", "fashion_mnist")
PREPROCESSING = ("paper", "mobilenet", "none")
BATCHNORM = ("train", "frozen")
DEVICES = ("one", "all")
FISHER_DATA = ("source", "target")
FISHER_SCALES = ("raw", "mean")
FISHER_MODES = ("exact", "sampled", "empirical")
CONVERTED_WEIGHTS = "imagenet_converted"
FASHION_SOURCE = "fashion_source"
# The targets that come with their own training and test split.
_OFFICIAL_SPLITS = ("mit_indoor67", "stanford_dogs")


def is_model_file(name):
    """Whether `name` is a `.keras` file (a source model)."""
    return isinstance(name, str) and name.endswith(".keras")


def check(config):
    """Raises `ConfigError` naming the first key of `config` that is bad."""
    _check_choices(config)
    _check_counts(config)
    _check_kinds(config)
    _check_grids(config)
    _check_data_sets(config)
    _check_data_sources(config)
    _check_backbone(config)


def _check_choices(config):
    def choice(name, options, optional=False):
        value = getattr(config, name)
        if optional and value is None:
            return
        if value not in options:
            raise ConfigError(
                f"Config key '{name}' must be one of {list(options)}. "
                f"Received: {name}={value!r}"
            )

    if is_own_target(config.target):
        check_target(config.target)
    else:
        choice("target", TARGETS)
    choice("source", SOURCES, optional=True)
    choice("preprocessing", PREPROCESSING)
    choice("color_order", ("rgb", "bgr"))
    choice("on_corrupt", ("error", "skip"))
    choice("batchnorm", BATCHNORM)
    choice("devices", DEVICES)
    backend = keras.backend.backend()
    if config.devices == "all" and backend != "tensorflow":
        raise ConfigError(
            "Config key 'devices': 'all' (a MirroredStrategy over the "
            "local devices) needs the TensorFlow backend; use "
            f"devices='one' on the {backend} backend. Received: "
            f"devices={config.devices!r}"
        )
    choice("fisher_mode", FISHER_MODES)
    choice("fisher_data", FISHER_DATA)
    choice("fisher_scale", FISHER_SCALES)


def _check_counts(config):
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
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(
                f"Config key '{name}' must be positive. Received: "
                f"{name}={value!r}"
            )
    if config.image_size is not None and config.image_size < config.input_size:
        raise ConfigError(
            "Config key 'image_size' must be at least input_size "
            f"({config.input_size}). Received: image_size={config.image_size}"
        )
    for name in ("validation_fraction", "significance"):
        value = getattr(config, name)
        if not 0 < value < 1:
            raise ConfigError(
                f"Config key '{name}' must be between 0 and 1. "
                f"Received: {name}={value!r}"
            )
    if config.lr_drop_at is not None and config.lr_drop_at < 0:
        raise ConfigError(
            "Config key 'lr_drop_at' must be >= 0. Received: "
            f"lr_drop_at={config.lr_drop_at!r}"
        )
    if config.warmup_iterations < 0:
        raise ConfigError(
            "Config key 'warmup_iterations' must be >= 0. Received: "
            f"warmup_iterations={config.warmup_iterations!r}"
        )


def _check_kinds(config):
    kinds = config.kinds
    if not kinds:
        raise ConfigError("Config key 'kinds' must not be empty.")
    for index, kind in enumerate(kinds):
        if kind not in KINDS:
            raise ConfigError(
                f"Config key 'kinds[{index}]' must be one of "
                f"{list(KINDS)}. Received: kinds[{index}]={kind!r}"
            )
    if len(set(kinds)) != len(kinds):
        raise ConfigError(
            f"Config key 'kinds' repeats a kind. Received: kinds={kinds}"
        )
    for index, mode in enumerate(config.source_batchnorm):
        if mode not in ("as_trained", "reestimated"):
            raise ConfigError(
                f"Config key 'source_batchnorm[{index}]' must be "
                "'as_trained' or 'reestimated'. Received: "
                f"source_batchnorm[{index}]={mode!r}"
            )
    if config.learning_rate_kind not in kinds:
        raise ConfigError(
            "Config key 'learning_rate_kind' must be one of 'kinds' "
            f"({kinds}). Received: learning_rate_kind="
            f"{config.learning_rate_kind!r}"
        )
    for name in ("freeze_kinds", "r2_kinds"):
        for kind in getattr(config, name):
            if kind not in kinds:
                raise ConfigError(
                    f"Config key '{name}' names a kind not in 'kinds' "
                    f"({kinds}). Received: {name}={getattr(config, name)}"
                )


def _check_coefficient(key, value):
    if not math.isfinite(value) or value < 0:
        raise ConfigError(
            f"Config key '{key}' must hold non-negative finite numbers. "
            f"Received: {key}={value!r}"
        )


def _check_grids(config):
    for name in ("alpha_grid", "beta_grid"):
        for kind, grid in getattr(config, name).items():
            if kind not in config.kinds:
                raise ConfigError(
                    f"Config key '{name}.{kind}' is not a kind of "
                    f"'kinds' ({config.kinds}). Received: {name}="
                    f"{getattr(config, name)}"
                )
            if not grid:
                raise ConfigError(
                    f"Config key '{name}.{kind}' must not be empty."
                )
            for value in grid:
                _check_coefficient(f"{name}.{kind}", value)
    missing = [kind for kind in config.kinds if kind not in config.alpha_grid]
    if missing:
        raise ConfigError(
            f"Config key 'alpha_grid' has no values for kind "
            f"'{missing[0]}'. Received: alpha_grid={config.alpha_grid}"
        )
    _check_coefficient("beta", config.beta)
    rates = config.learning_rate_grid
    if not rates or any(rate <= 0 for rate in rates):
        raise ConfigError(
            "Config key 'learning_rate_grid' must hold positive values. "
            f"Received: learning_rate_grid={rates}"
        )


def _check_data_sets(config):
    per_class = config.per_class
    if not per_class:
        raise ConfigError("Config key 'per_class' must not be empty.")
    own = is_own_target(config.target)
    official = not own and config.target in _OFFICIAL_SPLITS
    for index, count in enumerate(per_class):
        too_few = count is not None and count < 2
        if too_few or (not own and official != (count is None)):
            expected = (
                "null (the official split)" if official else "an integer >= 2"
            )
            if own:
                expected += " or null (all the training images)"
            raise ConfigError(
                f"Config key 'per_class[{index}]' must be {expected} for "
                f"target={config.target!r}. Received: per_class[{index}]="
                f"{count!r}"
            )
    if config.select_on is not None and config.select_on != per_class[0]:
        raise ConfigError(
            "Config key 'select_on' must be the first data set of "
            f"'per_class' ({per_class[0]!r}). Received: select_on="
            f"{config.select_on!r}"
        )
    if any(n < 0 for n in config.freeze_units):
        raise ConfigError(
            "Config key 'freeze_units' must hold n >= 0. Received: "
            f"freeze_units={config.freeze_units}"
        )
    for count in config.freeze_per_class or ():
        if count not in per_class:
            raise ConfigError(
                "Config key 'freeze_per_class' must name data sets of "
                f"'per_class' ({per_class}). Received: "
                f"freeze_per_class={config.freeze_per_class}"
            )


def _check_data_sources(config):
    fashion = config.target == "fashion_mnist"
    if fashion and config.preprocessing == "paper":
        raise ConfigError(
            "Config key 'preprocessing' must be 'mobilenet' or 'none' for "
            "target='fashion_mnist'. Received: preprocessing='paper'"
        )
    if not fashion and config.preprocessing == "none":
        raise ConfigError(
            "Config key 'preprocessing' must be 'paper' or 'mobilenet' "
            f"for target={config.target!r}. Received: preprocessing='none'"
        )
    if config.source == "fashion_mnist" and not config.source_classes:
        raise ConfigError(
            "Config key 'source_classes' must list the source task's "
            "Fashion-MNIST classes for source='fashion_mnist'. Received: "
            f"source_classes={config.source_classes!r}"
        )
    if config.target in ("caltech256", "mit_indoor67") and not (
        config.target_dir
    ):
        raise ConfigError(
            f"Config key 'target_dir' must name the {config.target} folder. "
            "Received: target_dir=None"
        )
    uses_fisher = any(kind in FISHER_KINDS for kind in config.kinds)
    if uses_fisher and config.fisher_data == "source" and not config.source:
        raise ConfigError(
            "Config key 'source' must name the source data when a Fisher "
            "kind uses fisher_data='source' (or set fisher_data="
            "'target'). Received: source=None"
        )


def _check_backbone(config):
    if config.weights == CONVERTED_WEIGHTS and config.backbone != "MobileNet":
        raise ConfigError(
            f"Config key 'weights': {CONVERTED_WEIGHTS!r} is the "
            "converted ImageNet MobileNet V1; use backbone='MobileNet'. "
            f"Received: backbone={config.backbone!r}"
        )
    named = is_model_file(config.backbone) or config.backbone == FASHION_SOURCE
    if not named and not hasattr(keras.applications, config.backbone):
        raise ConfigError(
            "Config key 'backbone' must be a keras.applications name "
            f"(e.g. 'ResNet101'), a .keras file or {FASHION_SOURCE!r}."
            f" Received: backbone={config.backbone!r}"
        )
