"""Growing a Brain: fine-tuning against widening and deepening, from a config.

Every method starts from the same pretrained network and fine-tunes it on
the same few target images with the same seeds and the same protocol:

- `fine_tuning`: the pretrained network with a new classifier;
- `wa_cnn_ori`: `layer` widened by `channels` new channels, no normalisation
  (the paper's WA-CNN-ori);
- `wa_cnn`: the same, old and new channels L2-normalised separately and
  rescaled by a learned γ starting at `scale_init` (WA-CNN);
- `da_cnn`: a new layer of `channels` channels, normalised and scaled,
  inserted after `layer` (DA-CNN); `da_cnn_ori` is the same without
  normalisation.

The default config runs on a CPU: the small CNN of
`keras_sp.experiments.fashion_source`, pretrained on Fashion-MNIST classes
0-4, fine-tuned on classes 5-9 with a few training images per class, its
last fully connected layer `fc` widened (as the paper widens fc7) or
deepened. Each run is written to `results.json` as it finishes, so an
interrupted experiment resumes where it stopped; `results.md` holds the
table (mean ± sample standard deviation over seeds, and the difference to
fine-tuning paired by seed).

Reference:
    Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing Model
    Capacity". CVPR 2017.
"""

import dataclasses
import hashlib
import os
import time

import keras
import numpy as np

from keras_sp import surgery
from keras_sp.callbacks import StopOnNonFinite
from keras_sp.experiments import fashion_source
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import config_path
from keras_sp.experiments.config import load_config
from keras_sp.experiments.data import few_shot
from keras_sp.experiments.data import load_fashion_mnist
from keras_sp.experiments.results import ResultsFile
from keras_sp.experiments.results import write_text

__all__ = [
    "METHODS",
    "GrowConfig",
    "build_target_model",
    "run",
    "run_grow",
    "summarize",
]

METHODS = ("fine_tuning", "wa_cnn_ori", "wa_cnn", "da_cnn", "da_cnn_ori")
# Config keys that only select which runs to make (they are in each run's
# key); every other key changes what a run computes.
_SELECTION_KEYS = ("methods", "seeds", "per_class")


@dataclasses.dataclass
class GrowConfig:
    """The settings of a growing experiment (JSON keys).

    Runs: every method of `methods` (see `METHODS`), for every number of
    training images per target class in `per_class`, for every seed of
    `seeds` (the seed draws the training images and initialises the new
    classifier and the new channels, the same for every method).

    Growing: `layer` is the layer widened (and the layer after which
    DA-CNN inserts its new layer), `channels` the number of new channels
    (and the width of the new layer), `scale_init` the initial γ,
    `consumer_initializer` the widened classifier's new input weights
    ("random": N(0, 0.01²), or "zeros").

    Training (the same for every method): the whole network is fine-tuned
    with SGD (`momentum`) at `learning_rate`, divided by 10 after two thirds
    of `steps`, in batches of `batch_size` images (reshuffled every epoch),
    BatchNormalization using batch statistics. Test accuracy is measured
    after the last step on `test_per_class` test images per target class
    (null: all 1,000).

    Source: the cached source network of
    `fashion_source.pretrained_source_model(epochs=source_epochs,
    seed=source_seed)`.
    """

    # The `keras-sp` subcommand of these configs (see
    # `keras_sp.experiments.config`).
    COMMAND = "grow"

    methods: list[str] = dataclasses.field(
        default_factory=lambda: [
            "fine_tuning",
            "wa_cnn_ori",
            "wa_cnn",
            "da_cnn",
        ]
    )
    seeds: list[int] = dataclasses.field(
        default_factory=lambda: list(range(10))
    )
    per_class: list[int] = dataclasses.field(default_factory=lambda: [5, 20])
    test_per_class: int | None = None
    layer: str = "fc"
    channels: int = 128
    scale_init: float = 10.0
    consumer_initializer: str = "random"
    steps: int = 300
    batch_size: int = 10
    learning_rate: float = 0.01
    momentum: float = 0.9
    source_epochs: int = 4
    source_seed: int = 0

    def validate(self):
        def fail(key, rule):
            raise ConfigError(
                f"Config key '{key}' {rule}. Received: "
                f"{key}={getattr(self, key)!r}"
            )

        if not self.methods or any(m not in METHODS for m in self.methods):
            fail("methods", f"must be a non-empty list of {list(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            fail("methods", "must not repeat a method")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            fail("seeds", "must be a non-empty list of distinct integers")
        if not self.per_class or any(k < 1 for k in self.per_class):
            fail("per_class", "must be a non-empty list of integers >= 1")
        if self.test_per_class is not None and self.test_per_class < 1:
            fail("test_per_class", "must be null or an integer >= 1")
        for key in ("channels", "steps", "batch_size", "source_epochs"):
            if getattr(self, key) < 1:
                fail(key, "must be an integer >= 1")
        for key in ("scale_init", "learning_rate"):
            if not getattr(self, key) > 0:
                fail(key, "must be > 0")
        if not 0 <= self.momentum < 1:
            fail("momentum", "must be in [0, 1)")
        if self.consumer_initializer not in ("random", "zeros"):
            fail("consumer_initializer", "must be 'random' or 'zeros'")


def build_target_model(source, method, config, seed):
    """The network a method fine-tunes: a copy of the source backbone, a new
    classifier for the target classes, grown as the method says.

    Args:
        source: the pretrained source model (`Sequential([backbone, head])`);
            it is not changed.
        method: one of `METHODS`.
        config: a `GrowConfig`.
        seed: seeds the new classifier and the new channels.

    Returns:
        A built, uncompiled model returning logits.
    """
    backbone = source.get_layer("backbone")
    copy = keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            copy,
            keras.layers.Dense(
                len(fashion_source.TARGET_CLASSES), name="target_head"
            ),
        ],
        name="target",
    )
    model.build(source.inputs[0].shape)
    keras.utils.set_random_seed(seed)
    if method == "fine_tuning":
        return model
    if method in ("wa_cnn", "wa_cnn_ori"):
        return surgery.widen(
            model,
            config.layer,
            config.channels,
            normalize=method == "wa_cnn",
            scale_init=config.scale_init,
            consumer_initializer=config.consumer_initializer,
        )
    return surgery.deepen(
        model,
        after=config.layer,
        channels=config.channels,
        normalize=method == "da_cnn",
        scale_init=config.scale_init,
    )


def _training_order(count, config, seed):
    """Example indices for `config.steps` batches, reshuffled every epoch."""
    rng = np.random.default_rng(seed)
    batch = min(config.batch_size, count)
    needed = config.steps * batch
    epochs = -(-needed // count)
    order = np.concatenate([rng.permutation(count) for _ in range(epochs)])
    return order[:needed], batch


def _run_one(source, data, method, per_class, seed, config):
    """Fine-tunes one grown network; returns the run's record."""
    (x_train, y_train), (x_test, y_test) = data
    chosen = few_shot(y_train, per_class, seed=seed)
    model = build_target_model(source, method, config, seed)
    order, batch = _training_order(len(chosen), config, seed)
    boundary = max(1, (2 * config.steps) // 3)
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [boundary], [config.learning_rate, config.learning_rate / 10]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=config.momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    keras.utils.set_random_seed(seed)
    start = time.time()
    history = model.fit(
        x_train[chosen][order],
        y_train[chosen][order],
        batch_size=batch,
        epochs=1,
        shuffle=False,
        verbose=0,
        callbacks=[StopOnNonFinite()],
    )
    seconds = time.time() - start
    _, accuracy = model.evaluate(x_test, y_test, batch_size=500, verbose=0)
    return {
        "method": method,
        "per_class": per_class,
        "seed": seed,
        "test_accuracy": float(accuracy),
        "train_loss": float(history.history["loss"][-1]),
        "trainable_parameters": int(
            sum(np.prod(v.shape) for v in model.trainable_weights)
        ),
        "training_images": hashlib.sha256(chosen.tobytes()).hexdigest()[:16],
        "seconds": round(seconds, 2),
    }


def _target_data(config):
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    classes = fashion_source.TARGET_CLASSES
    x_train, y_train = fashion_source.select_classes(x_train, y_train, classes)
    x_test, y_test = fashion_source.select_classes(x_test, y_test, classes)
    if config.test_per_class is not None:
        keep = few_shot(y_test, config.test_per_class, seed=0)
        x_test, y_test = x_test[keep], y_test[keep]
    return (x_train.astype("float32"), y_train), (
        x_test.astype("float32"),
        y_test,
    )


def _run_key(method, per_class, seed):
    return f"{method}/per_class={per_class}/seed={seed}"


def _mean_std(values):
    values = np.asarray(values, dtype="float64")
    std = float(np.std(values, ddof=1)) if len(values) > 1 else float("nan")
    return float(np.mean(values)), std


def summarize(runs, config):
    """The Markdown table of the runs `config` selects.

    Args:
        runs: run records (dicts as in `results.json`).
        config: a `GrowConfig`.

    Returns:
        A Markdown string: per `per_class`, one row per method with the test
        accuracy (mean ± sample std over seeds), the difference to
        `fine_tuning` paired by seed (mean ± sample std; when `fine_tuning`
        is one of the methods) and the number of trainable parameters.
    """
    by_key = {run["key"]: run for run in runs}
    lines = [
        "# Growing a Brain: fine-tuning, widening and deepening",
        "",
        f"Fashion-MNIST classes 0-4 → 5-9; `{config.layer}` widened by "
        f"{config.channels} units / a new layer of {config.channels} units "
        f"after it; γ starts at {config.scale_init:g}; {config.steps} SGD "
        f"steps (lr {config.learning_rate:g}, ÷10 after 2/3, momentum "
        f"{config.momentum:g}, batch {config.batch_size}); mean ± sample "
        "standard deviation over seeds; Δ = difference to fine-tuning on the "
        "same seed.",
    ]
    for per_class in config.per_class:
        lines += [
            "",
            f"## {per_class} training images per class",
            "",
            "| method | test accuracy | Δ vs fine-tuning | seeds | "
            "trainable parameters |",
            "|---|---|---|---|---|",
        ]
        baseline = {
            seed: by_key.get(_run_key("fine_tuning", per_class, seed))
            for seed in config.seeds
        }
        for method in config.methods:
            done = [
                by_key[_run_key(method, per_class, seed)]
                for seed in config.seeds
                if _run_key(method, per_class, seed) in by_key
            ]
            if not done:
                continue
            mean, std = _mean_std([run["test_accuracy"] for run in done])
            paired = [
                run["test_accuracy"] - baseline[run["seed"]]["test_accuracy"]
                for run in done
                if baseline[run["seed"]] is not None
            ]
            if (
                method == "fine_tuning"
                or "fine_tuning" not in config.methods
                or not paired
            ):
                delta = "–"
            else:
                d_mean, d_std = _mean_std(paired)
                delta = f"{d_mean:+.4f} ± {d_std:.4f}"
            lines.append(
                f"| {method} | {mean:.4f} ± {std:.4f} | {delta} | "
                f"{len(done)} | {done[0]['trainable_parameters']:,} |"
            )
    return "\n".join(lines) + "\n"


def run_grow(config, out, verbose=1):
    """Runs (or resumes) the comparison and writes its results and table.

    Args:
        config: a `GrowConfig`, a dict of its keys, a JSON path or None.
        out: the output folder (`results.json`, `results.md`).
        verbose: 1 shows a progress bar over the runs to make, 0 is silent.

    Returns:
        The Markdown table.
    """
    if isinstance(config, GrowConfig):
        config.validate()
    else:
        config = load_config(config, GrowConfig)
    settings = {
        key: value
        for key, value in dataclasses.asdict(config).items()
        if key not in _SELECTION_KEYS
    }
    results = ResultsFile(os.path.join(out, "results.json"), settings)
    pending = [
        (per_class, seed, method)
        for per_class in config.per_class
        for seed in config.seeds
        for method in config.methods
        if not results.done(_run_key(method, per_class, seed))
    ]
    if pending:
        source, _ = fashion_source.pretrained_source_model(
            epochs=config.source_epochs, seed=config.source_seed, verbose=0
        )
        data = _target_data(config)
    progress = keras.utils.Progbar(
        len(pending), verbose=verbose, unit_name="run"
    )
    for per_class, seed, method in pending:
        record = _run_one(source, data, method, per_class, seed, config)
        record["key"] = _run_key(method, per_class, seed)
        results.append(record)
        progress.add(1)
    table = summarize(results.runs, config)
    write_text(os.path.join(out, "results.md"), table)
    return table


def run(args):
    """The `keras-sp grow` command."""
    path = config_path(args.config, GrowConfig.COMMAND)
    config = load_config(path, GrowConfig)
    table = run_grow(config, args.out, verbose=0 if args.quiet else 1)
    if not args.quiet:
        print(table)
    return 0


def add_parser(subparsers):
    """Adds the `grow` subcommand to the `keras-sp` command line."""
    parser = subparsers.add_parser(
        "grow",
        help="fine-tuning vs widening (WA-CNN) vs deepening (DA-CNN)",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument(
        "--config",
        help="JSON config (keys of "
        "keras_sp.experiments.growing_a_brain.GrowConfig; a config of "
        "another subcommand is refused); default: the CPU-scale "
        "Fashion-MNIST setting",
    )
    parser.add_argument(
        "--out",
        default=os.path.join("results", "grow"),
        help="output folder (results.json, results.md); default results/grow",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print nothing but errors"
    )
    parser.set_defaults(run=run)
