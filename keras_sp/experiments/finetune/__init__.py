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
  V1 that `keras-sp convert-mobilenet` converts offline); a `.keras` file
  holding the source model (a nested backbone model named `backbone_layer` and a
  source classifier named `source_head_layer`); or `"fashion_source"`, the
  small CNN pretrained on Fashion-MNIST classes 0-4 (a cached `.keras` file);
- the target: `"caltech256"` (`per_class` 30 or 60), `"mit_indoor67"`,
  `"stanford_dogs"` or `"fashion_mnist"` (`per_class` few-shot images of
  `target_classes`); or your own data: `{"folder": PATH}` (class folders),
  `{"npz": PATH}` or `{"tfds": NAME}` (see `_own_spec`, and `finetune_on`
  for the same from Python);
- the source data (`source`), for Table 3 and for the Fisher information
  when `fisher_data="source"`: `"imagenet"`, `"places365"` or
  `"fashion_mnist"` (`source_classes`).

The package's stages, each given only the config keys it reads (small
settings dataclasses): `_config` and `_checks` (the schema), `_backbones`
(the starting point), `_targets` (the data pipelines), `_own_spec` and
`_own_data` (your own target data), `_fisher`, `_runs`
(one run), `_selection` (the validation grids' choice), `_experiment`
(the protocol), `_tables`, `_figures` and `_report` (the report),
`_command_line` and `_finetune_on`.

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.
"""

# `keras-sp finetune` finds `add_parser` here (keras_sp.experiments.cli).
from keras_sp.experiments.finetune._command_line import add_parser  # noqa: F401
from keras_sp.experiments.finetune._config import FinetuneConfig
from keras_sp.experiments.finetune._config import config_path
from keras_sp.experiments.finetune._experiment import run_finetune
from keras_sp.experiments.finetune._finetune_on import finetune_on
from keras_sp.experiments.finetune._report import write_report
from keras_sp.experiments.finetune._selection import chosen_learning_rate
from keras_sp.experiments.finetune._selection import chosen_point

__all__ = [
    "FinetuneConfig",
    "chosen_learning_rate",
    "chosen_point",
    "config_path",
    "finetune_on",
    "run_finetune",
    "write_report",
]
