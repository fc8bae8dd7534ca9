"""Yosinski et al.'s transferability experiment, driven by a JSON config.

The classes are split at random into halves A and B. Base networks A and B
are trained on each half; then, for every depth n = 1..L-1, four transfer
networks are trained on B: their first n depth units are copied from base B
(selffer BnB) or from base A (transfer AnB), and either frozen (BnB, AnB) or
fine-tuned (BnB+, AnB+), while units n+1..L start from a fresh random
initialisation. Every run is written to `results.json` as it finishes, so
an interrupted experiment resumes where it stopped; the table and figure
are drawn from that file.

The default config (no file) runs on this machine: Fashion-MNIST split 5/5,
an 8-weight-layer CNN (5 convolutions + 3 dense layers, AlexNet's count),
28 px. `keras-sp transferability --config transferability_imagenet`
(`keras_sp/configs/transferability_imagenet.json`) runs the paper's
ImageNet 500/500 protocol with AlexNet-sized networks through
tensorflow-datasets, on a GPU. Files are written atomically, so an
interrupted write leaves the previous file whole.

Reference:
    Yosinski, Clune, Bengio, Lipson. "How transferable are features in deep
    neural networks?" NIPS 2014.
"""

import dataclasses
import json
import os
import time

import keras
import numpy as np

from keras_sp import units
from keras_sp.callbacks import StopOnNonFinite
from keras_sp.experiments import plots
from keras_sp.experiments._transferability_data import TaskData
from keras_sp.experiments._transferability_report import KINDS
from keras_sp.experiments._transferability_report import markdown_table
from keras_sp.experiments._transferability_report import summarize
from keras_sp.experiments.config import CONFIG_DIRECTORY
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import config_path
from keras_sp.experiments.config import load_config
from keras_sp.experiments.config import shipped_configs
from keras_sp.experiments.results import READ_ERRORS
from keras_sp.experiments.results import CorruptFileError
from keras_sp.experiments.results import ResultsFile
from keras_sp.experiments.results import atomic_write
from keras_sp.experiments.results import check_archive
from keras_sp.experiments.results import write_text

__all__ = [
    "KINDS",
    "TransferabilityConfig",
    "build_network",
    "default_config_path",
    "run",
    "summarize",
]


def default_config_path(name="fashion_mnist"):
    """The path of a config shipped in `keras_sp/configs/`."""
    return os.path.join(CONFIG_DIRECTORY, f"transferability_{name}.json")


@dataclasses.dataclass
class TransferabilityConfig:
    """The settings of a transferability experiment (JSON keys).

    Data: `dataset` is "fashion_mnist" (in memory) or "tfds:NAME" (a
    tensorflow-datasets dataset of (image, label), e.g. "tfds:imagenet2012",
    read from `data_dir`); `split_seed` seeds the A/B class split;
    `per_class` / `test_per_class` subsample that many training / test
    images per class (null: all; in-memory datasets only); `image_size` and
    `channels` are the network's input.

    Network: 5 convolutions (`conv_filters`, `conv_kernels`,
    `conv_strides`), max pooling (`pool_size`, stride 2) after the
    convolutions listed in `pool_after` (1-based), dense layers `fc_units`,
    then the classifier: len(conv_filters) + len(fc_units) + 1 depth units.

    Training: `optimizer` ("adam" or "sgd" with momentum 0.9),
    `learning_rate` (with cosine decay over `epochs` for in-memory data,
    constant for streamed tfds data), `batch_size`, `dropout` after each
    dense layer, `batch_norm` after each convolution, `jit_compile` (XLA;
    slower than plain TensorFlow for the small default network on a CPU).
    `transfer_depths` lists the n to run (null: 1..L-1); `repeats` repeats
    the whole experiment (new bases and transfer networks) with seeds
    `seed`, `seed + 1`, ... on the same data.
    """

    COMMAND = "transferability"

    dataset: str = "fashion_mnist"
    data_dir: str | None = None
    train_split: str = "train"
    test_split: str = "test"
    split_seed: int = 1
    per_class: int | None = 400
    test_per_class: int | None = None
    image_size: int = 28
    channels: int = 1
    conv_filters: list[int] = dataclasses.field(
        default_factory=lambda: [32, 48, 64, 64, 48]
    )
    conv_kernels: list[int] = dataclasses.field(
        default_factory=lambda: [3, 3, 3, 3, 3]
    )
    conv_strides: list[int] = dataclasses.field(
        default_factory=lambda: [1, 1, 1, 1, 1]
    )
    pool_after: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 5])
    pool_size: int = 2
    fc_units: list[int] = dataclasses.field(default_factory=lambda: [256, 256])
    batch_norm: bool = False
    dropout: float = 0.5
    optimizer: str = "adam"
    learning_rate: float = 0.001
    epochs: int = 5
    batch_size: int = 64
    transfer_depths: list[int] | None = None
    repeats: int = 2
    seed: int = 0
    jit_compile: bool = False

    @property
    def depth(self):
        """L, the number of depth units of the networks."""
        return len(self.conv_filters) + len(self.fc_units) + 1

    def depths(self):
        """The n of the transfer networks, in order."""
        if self.transfer_depths is None:
            return list(range(1, self.depth))
        return list(self.transfer_depths)

    def validate(self):
        def fail(key, rule):
            raise ConfigError(
                f"Config key '{key}' {rule}. Received: "
                f"{key}={getattr(self, key)!r}"
            )

        if self.dataset != "fashion_mnist" and not (
            self.dataset.startswith("tfds:") and len(self.dataset) > 5
        ):
            fail("dataset", "must be 'fashion_mnist' or 'tfds:NAME'")
        for key in ("per_class", "test_per_class"):
            value = getattr(self, key)
            if value is not None and value < 1:
                fail(key, "must be null or an integer >= 1")
            if value is not None and self.dataset.startswith("tfds:"):
                fail(key, "must be null for a tfds dataset (streamed)")
        for key in ("image_size", "epochs", "batch_size", "repeats"):
            if getattr(self, key) < 1:
                fail(key, "must be an integer >= 1")
        if self.channels not in (1, 3):
            fail("channels", "must be 1 or 3")
        if not self.conv_filters:
            fail("conv_filters", "must list at least one convolution")
        for key in ("conv_kernels", "conv_strides"):
            if len(getattr(self, key)) != len(self.conv_filters):
                fail(key, "must have one entry per convolution")
        for key in ("conv_filters", "conv_kernels", "conv_strides", "fc_units"):
            if any(value < 1 for value in getattr(self, key)):
                fail(key, "must hold integers >= 1")
        if any(not 1 <= i <= len(self.conv_filters) for i in self.pool_after):
            fail("pool_after", "must list convolution numbers (1-based)")
        if self.pool_size < 1:
            fail("pool_size", "must be an integer >= 1")
        if not 0.0 <= self.dropout < 1.0:
            fail("dropout", "must be in [0, 1)")
        if self.optimizer not in ("adam", "sgd"):
            fail("optimizer", "must be 'adam' or 'sgd'")
        if self.learning_rate <= 0:
            fail("learning_rate", "must be > 0")
        if self.transfer_depths is not None and (
            not self.transfer_depths
            or any(not 1 <= n < self.depth for n in self.transfer_depths)
            or len(set(self.transfer_depths)) != len(self.transfer_depths)
        ):
            fail(
                "transfer_depths",
                f"must be null or distinct integers in 1..{self.depth - 1}",
            )


def build_network(config, num_classes, name="network"):
    """The experiment's network: convolutions, dense layers, classifier.

    Inputs are images with values 0-255. Layers are named as in AlexNet
    (`conv1`..`conv5`, `fc6`, `fc7`, `fc8` for the default sizes); each
    convolution or dense layer (with its BatchNormalization when
    `config.batch_norm`) is one depth unit.

    Args:
        config: a `TransferabilityConfig`.
        num_classes: int, outputs of the classifier.
        name: the model's name.

    Returns:
        A built functional `keras.Model` returning logits.
    """
    shape = (config.image_size, config.image_size, config.channels)
    inputs = keras.Input(shape, name="image")
    x = keras.layers.Rescaling(1.0 / 255, name="rescale")(inputs)
    for index, filters in enumerate(config.conv_filters, start=1):
        x = keras.layers.Conv2D(
            filters,
            config.conv_kernels[index - 1],
            strides=config.conv_strides[index - 1],
            padding="same",
            use_bias=not config.batch_norm,
            name=f"conv{index}",
        )(x)
        if config.batch_norm:
            x = keras.layers.BatchNormalization(name=f"conv{index}_bn")(x)
        x = keras.layers.ReLU(name=f"conv{index}_relu")(x)
        if index in config.pool_after:
            x = keras.layers.MaxPooling2D(
                config.pool_size,
                strides=2,
                padding="same",
                name=f"pool{index}",
            )(x)
    x = keras.layers.Flatten(name="flatten")(x)
    first_fc = len(config.conv_filters) + 1
    for index, fc_units in enumerate(config.fc_units, start=first_fc):
        x = keras.layers.Dense(fc_units, activation="relu", name=f"fc{index}")(
            x
        )
        if config.dropout:
            x = keras.layers.Dropout(config.dropout, name=f"drop{index}")(x)
    outputs = keras.layers.Dense(num_classes, name=f"fc{config.depth}")(x)
    return keras.Model(inputs, outputs, name=name)


def _steps_per_epoch(data, batch_size):
    if isinstance(data, tuple):
        return int(np.ceil(len(data[0]) / batch_size))
    return None


def _train(config, data, half, model, seed):
    """Compiles and fits `model` on half `half`; returns test accuracy."""
    keras.utils.set_random_seed(seed)
    train = data.task(half, training=True)
    test = data.task(half, training=False)
    steps = _steps_per_epoch(train, config.batch_size)
    rate = config.learning_rate
    if steps is not None:
        rate = keras.optimizers.schedules.CosineDecay(
            config.learning_rate, config.epochs * steps
        )
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(rate)
    else:
        optimizer = keras.optimizers.SGD(rate, momentum=0.9)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        jit_compile=config.jit_compile,
    )
    if isinstance(train, tuple):
        model.fit(
            train[0],
            train[1],
            batch_size=config.batch_size,
            epochs=config.epochs,
            verbose=0,
            callbacks=[StopOnNonFinite()],
        )
        _, accuracy = model.evaluate(
            test[0], test[1], batch_size=512, verbose=0
        )
    else:
        model.fit(
            train,
            epochs=config.epochs,
            verbose=0,
            shuffle=False,
            callbacks=[StopOnNonFinite()],
        )
        _, accuracy = model.evaluate(test, verbose=0)
    return float(accuracy)


def _base_network(config, data, out, half, repeat, results, log):
    """Base network A or B of a repeat: trained, or loaded when finished."""
    key = f"base{half}/repeat{repeat}"
    path = os.path.join(out, "models", f"base{half}_repeat{repeat}.npz")
    seed = config.seed + repeat
    keras.utils.set_random_seed(1000 * seed + (half == "B"))
    model = build_network(
        config, len(data.halves[half]), name=f"base{half}_{repeat}"
    )
    if results.done(key):
        if not os.path.exists(path):
            raise ValueError(
                f"{results.path} records run {key!r} but its weights file "
                f"{path!r} is missing; move the results away to start over."
            )
        try:
            check_archive(path)
            with np.load(path) as stored:
                for variable in model.weights:
                    variable.assign(stored[variable.path])
        except READ_ERRORS as error:
            raise CorruptFileError(
                path,
                f"it does not hold the weights of {key} ({error!r}), perhaps "
                "truncated",
                f"Move {results.path!r} away (or use another output folder) "
                "to start over.",
            ) from error
        return model, 0
    start = time.time()
    accuracy = _train(
        config, data, half, model, 1000 * seed + 2 + (half == "B")
    )
    with atomic_write(path) as temporary:
        np.savez(temporary, **{v.path: v.numpy() for v in model.weights})
    results.append(
        {
            "key": key,
            "kind": f"base{half}",
            "n": 0,
            "repeat": repeat,
            "accuracy": accuracy,
            "seconds": round(time.time() - start, 1),
        }
    )
    log(f"{key}: top-1 {accuracy:.4f}")
    return model, 1


def _count_pending(config, results):
    """How many runs (base and transfer networks) are not finished yet."""
    keys = []
    for repeat in range(config.repeats):
        keys += [f"base{half}/repeat{repeat}" for half in "AB"]
        keys += [
            f"{kind}/n{n}/repeat{repeat}"
            for n in config.depths()
            for kind in KINDS
        ]
    return sum(not results.done(key) for key in keys)


def run(
    config=None,
    out="results/transferability",
    data=None,
    log=print,
    progress=False,
):
    """Runs (or resumes) the experiment and writes results, table, figure.

    Args:
        config: a `TransferabilityConfig`, a dict, a JSON path or None (the
            default config).
        out: output folder: `results.json` (every run), `models/` (base
            network weights, `.npz` keyed by variable path), `table.md`
            and `transferability.png`.
        data: optional in-memory data `((x_train, y_train), (x_test,
            y_test))` used instead of `config.dataset`.
        log: a function printing one line per finished run.
        progress: whether to show a progress bar over the runs to train.

    Returns:
        A dict: `trained` (runs trained by this call), `runs` (all finished
        runs), `summary` (see `summarize`), and the paths `results`,
        `table` and `figure`.
    """
    if not isinstance(config, TransferabilityConfig):
        config = load_config(config, TransferabilityConfig)
    out = os.fspath(out)
    data = TaskData(config, data)
    settings = dataclasses.asdict(config)
    settings["classes_A"] = data.halves["A"].tolist()
    settings["classes_B"] = data.halves["B"].tolist()
    results = ResultsFile(os.path.join(out, "results.json"), settings)
    bar = keras.utils.Progbar(
        _count_pending(config, results),
        verbose=1 if progress else 0,
        unit_name="run",
    )

    def finished(line):
        log(line)
        bar.add(1)

    trained = 0
    for repeat in range(config.repeats):
        pending = [
            (n, index, kind)
            for n in config.depths()
            for index, kind in enumerate(KINDS)
            if not results.done(f"{kind}/n{n}/repeat{repeat}")
        ]
        sources = {}
        for half in "AB":
            if not results.done(f"base{half}/repeat{repeat}") or any(
                kind[0] == half for _, _, kind in pending
            ):
                sources[half], count = _base_network(
                    config, data, out, half, repeat, results, finished
                )
                trained += count
        for n, index, kind in pending:
            key = f"{kind}/n{n}/repeat{repeat}"
            start = time.time()
            seed = 1000 * (config.seed + repeat) + 10 * n + index + 4
            keras.utils.set_random_seed(seed)
            model = build_network(
                config,
                len(data.halves["B"]),
                name=f"{kind.replace('+', '_plus')}_{n}",
            )
            units.copy_units(
                sources[kind[0]], model, n, freeze=not kind.endswith("+")
            )
            accuracy = _train(config, data, "B", model, seed)
            results.append(
                {
                    "key": key,
                    "kind": kind,
                    "n": n,
                    "repeat": repeat,
                    "accuracy": accuracy,
                    "seconds": round(time.time() - start, 1),
                }
            )
            trained += 1
            finished(f"{key}: top-1 {accuracy:.4f}")
    runs = results.runs
    summary = summarize(runs)
    table = os.path.join(out, "table.md")
    write_text(table, markdown_table(summary, config))
    figure = os.path.join(out, "transferability.png")
    plots.plot_transferability(runs, figure, depth=config.depth)
    return {
        "trained": trained,
        "runs": runs,
        "summary": summary,
        "results": results.path,
        "table": table,
        "figure": figure,
    }


def add_parser(subparsers):
    """Adds the `transferability` subcommand to the `keras-sp` command."""
    parser = subparsers.add_parser(
        "transferability",
        help="Yosinski et al.'s transferability experiment (AnB, BnB...)",
        description=(
            "Trains base networks on class halves A and B, then the "
            "transfer networks BnB, BnB+, AnB, AnB+ for every depth n, and "
            "writes results.json, table.md and transferability.png."
        ),
    )
    parser.add_argument(
        "--config",
        default=None,
        help="a JSON config file or a shipped transferability config: "
        + ", ".join(shipped_configs(TransferabilityConfig.COMMAND))
        + " (default: transferability_fashion_mnist)",
    )
    parser.add_argument(
        "--out",
        default="results/transferability",
        help="output folder (a rerun resumes from its results.json)",
    )
    parser.set_defaults(run=_command)


def _command(args):
    path = config_path(args.config, TransferabilityConfig.COMMAND)
    config = load_config(path, TransferabilityConfig)
    result = run(config, args.out, log=lambda line: None, progress=True)
    print(json.dumps({"table": result["table"], "figure": result["figure"]}))
