"""The demo: L2 against L2-SP on a real, small transfer task, offline.

Source task: Fashion-MNIST classes 0-4; a small CNN is pretrained on their
30,000 training images (cached). Target task: classes 5-9 with 30 training
images per class. Each method starts from the pretrained backbone with a new
head:

- `l2`: fine-tune everything, L2 toward 0 on the backbone (eq. 1);
- `l2_sp`: fine-tune everything, L2 toward the starting point (eq. 3);
- `frozen`: the backbone frozen (BatchNormalization in inference mode),
  only the head trained (a linear probe on the pretrained features).

An extra `l2_sp` row at the alpha of the authors' code (0.1) shows what the
penalty does when it is strong, whatever validation chose.

For `l2` and `l2_sp`, alpha is chosen on a validation split of the training
images (20 per class to train, 10 to validate) over a small grid, averaging
the matched seeds (ties broken by the validation cross-entropy), as the
paper chose its hyper-parameters by cross-validation; then each method is
fine-tuned on all 30 images per class with the same seeds. Reported per
method: target test accuracy, the relative drift ||w - w0|| / ||w0|| of the
backbone's kernels, and the source-task accuracy the fine-tuned backbone
keeps with the original source head (Table 3 of the paper), with
BatchNormalization statistics as fine-tuning left them and re-estimated on
source images.
"""

import dataclasses
import os
import time

import keras
import numpy as np

import keras_sp
from keras_sp._checks import check_coefficient
from keras_sp.experiments import fashion_source
from keras_sp.experiments import training
from keras_sp.experiments.config import config_path
from keras_sp.experiments.config import load_config
from keras_sp.experiments.data import few_shot
from keras_sp.experiments.data import load_fashion_mnist
from keras_sp.experiments.measures import source_task_accuracy
from keras_sp.experiments.results import ResultsFile
from keras_sp.experiments.results import write_text

__all__ = [
    "DemoConfig",
    "run_demo",
]

METHODS = ("l2", "l2_sp", "frozen")


@dataclasses.dataclass
class DemoConfig:
    """Settings of the demo (all have defaults; a JSON file may change them).

    Attributes:
        seeds: matched seeds: each draws the training images, the head's
            initialization and the batch order, the same for every method.
        per_class: training images per target class.
        validation_per_class: of those, held out to choose alpha.
        alpha_grid: the alpha values tried per kind.
        paper_alpha: an extra `l2_sp` row at this alpha (the authors' code
            used 0.1); None for no extra row.
        beta: L2 strength on the new head (the paper's cross-validated 0.01).
        iterations: SGD steps per run.
        batch_size: batch size.
        learning_rate: initial learning rate (divided by 10 after 2/3).
        pretrain_epochs: epochs of the source model's training.
        source_width: filters of the source CNN's first convolution; its
            head reads the pooled features, as a ResNet's classifier does.
    """

    # The `keras-sp` subcommand of these configs (see
    # `keras_sp.experiments.config`).
    COMMAND = "demo"

    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    per_class: int = 30
    validation_per_class: int = 10
    alpha_grid: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {
            "l2": [1e-4, 1e-2],
            "l2_sp": [1e-3, 1e-2, 1e-1],
        }
    )
    paper_alpha: float | None = 0.1
    beta: float = 0.01
    iterations: int = 300
    batch_size: int = 32
    learning_rate: float = 0.01
    pretrain_epochs: int = 3
    source_width: int = 32

    def validate(self):
        if not self.seeds:
            raise ValueError("Config key 'seeds' must not be empty.")
        if not 0 < self.validation_per_class < self.per_class:
            raise ValueError(
                "Config key 'validation_per_class' must be between 1 and "
                f"per_class - 1. Received: validation_per_class="
                f"{self.validation_per_class}"
            )
        unknown = sorted(set(self.alpha_grid) - {"l2", "l2_sp"})
        missing = sorted({"l2", "l2_sp"} - set(self.alpha_grid))
        if unknown or missing:
            raise ValueError(
                "Config key 'alpha_grid' must give lists for 'l2' and "
                f"'l2_sp'. Received: alpha_grid={self.alpha_grid}"
            )
        for kind, grid in self.alpha_grid.items():
            if not grid:
                raise ValueError(
                    f"Config key 'alpha_grid.{kind}' must not be empty."
                )
            for alpha in grid:
                check_coefficient(f"alpha_grid.{kind}", alpha)
        for name in ("per_class", "iterations", "batch_size", "source_width"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"Config key '{name}' must be positive. Received: "
                    f"{name}={getattr(self, name)}"
                )


def _target_model(source, seed):
    """The pretrained backbone (a copy) with a new 5-class head."""
    keras.utils.set_random_seed(seed)
    pretrained = source.get_layer("backbone")
    backbone = keras.models.clone_model(pretrained)
    backbone.set_weights(pretrained.get_weights())
    head = keras.layers.Dense(5, name="head")
    model = keras.Sequential([backbone, head], name="target")
    model.build((None, 28, 28, 1))
    return model, backbone, head


def _fine_tune_once(config, source, method, alpha, seed, x, y):
    model, backbone, head = _target_model(source, seed)
    if method == "frozen":
        backbone.trainable = False
        kind, alpha = "l2", 0.0
    else:
        kind = method
    keras_sp.regularize(
        model, kind, alpha=alpha, beta=config.beta, new_layers=[head]
    )
    dataset = training.training_dataset(x, y, config.batch_size, seed)
    training.fine_tune(
        model,
        dataset,
        iterations=config.iterations,
        learning_rate=config.learning_rate,
    )
    return model, backbone


def _validation_score(results, kind, alpha, seeds):
    """Mean validation accuracy over the seeds; ties go to the lower mean
    validation cross-entropy (few validation images make ties common)."""
    runs = [
        results.get(f"validation/{kind}/alpha={alpha:g}/seed={seed}")
        for seed in seeds
    ]
    return (
        np.mean([run["validation_accuracy"] for run in runs]),
        -np.mean([run["validation_loss"] for run in runs]),
    )


def _split_for_validation(indices, labels, validation_per_class, seed):
    """Holds out `validation_per_class` of each class's training images."""
    rng = np.random.default_rng(seed + 10_000)
    train, validation = [], []
    for label in np.unique(labels[indices]):
        members = rng.permutation(indices[labels[indices] == label])
        validation.extend(members[:validation_per_class])
        train.extend(members[validation_per_class:])
    return np.sort(train), np.sort(validation)


def run_demo(config, out, verbose=1):
    """Runs the demo, writes `results.json` and `table.md` under `out`.

    Args:
        config: a `DemoConfig`.
        out: output folder; runs already in its `results.json` are skipped.
        verbose: 1 prints progress and the table.

    Returns:
        The rows of the table, as a list of dicts.
    """
    started = time.time()
    log = print if verbose else (lambda *args, **kwargs: None)
    source, source_accuracy = fashion_source.pretrained_source_model(
        epochs=config.pretrain_epochs,
        width=config.source_width,
        fc_units=None,
        verbose=2 if verbose else 0,
    )
    log(f"Source model (classes 0-4): test accuracy {source_accuracy:.3f}")
    (x_train, y_train), (x_test, y_test) = load_fashion_mnist()
    x_target, y_target = fashion_source.select_classes(
        x_train, y_train, fashion_source.TARGET_CLASSES
    )
    x_target_test, y_target_test = fashion_source.select_classes(
        x_test, y_test, fashion_source.TARGET_CLASSES
    )
    x_source_test, y_source_test = fashion_source.select_classes(
        x_test, y_test, fashion_source.SOURCE_CLASSES
    )
    x_target = x_target.astype("float32")
    x_target_test = x_target_test.astype("float32")
    x_source_test = x_source_test.astype("float32")
    source_head = source.get_layer("source_head")

    settings = dataclasses.asdict(config)
    results = ResultsFile(os.path.join(out, "results.json"), settings)

    draws = {
        seed: few_shot(y_target, config.per_class, seed)
        for seed in config.seeds
    }
    planned = [
        (kind, alpha, seed)
        for kind in ("l2", "l2_sp")
        for alpha in config.alpha_grid[kind]
        for seed in config.seeds
    ]
    progress = keras.utils.Progbar(
        len(planned) + (len(METHODS) + 1) * len(config.seeds),
        verbose=verbose,
        unit_name="run",
    )
    for kind, alpha, seed in planned:
        key = f"validation/{kind}/alpha={alpha:g}/seed={seed}"
        if not results.done(key):
            train, validation = _split_for_validation(
                draws[seed], y_target, config.validation_per_class, seed
            )
            model, _ = _fine_tune_once(
                config,
                source,
                kind,
                alpha,
                seed,
                x_target[train],
                y_target[train],
            )
            accuracy, loss = training.accuracy_and_loss(
                model, x_target[validation], y_target[validation]
            )
            results.append(
                {
                    "key": key,
                    "phase": "validation",
                    "method": kind,
                    "alpha": alpha,
                    "seed": seed,
                    "validation_accuracy": accuracy,
                    "validation_loss": loss,
                }
            )
        progress.add(1)

    chosen = {"frozen": 0.0}
    for kind in ("l2", "l2_sp"):
        chosen[kind] = max(
            config.alpha_grid[kind],
            key=lambda alpha, kind=kind: _validation_score(
                results, kind, alpha, config.seeds
            ),
        )

    rows_to_run = [(method, chosen[method]) for method in METHODS]
    if config.paper_alpha is not None and config.paper_alpha != chosen["l2_sp"]:
        rows_to_run.insert(2, ("l2_sp", config.paper_alpha))
    else:
        progress.add(len(config.seeds))
    for method, alpha in rows_to_run:
        for seed in config.seeds:
            key = f"test/{method}/alpha={alpha:g}/seed={seed}"
            if not results.done(key):
                indices = draws[seed]
                model, backbone = _fine_tune_once(
                    config,
                    source,
                    method,
                    alpha,
                    seed,
                    x_target[indices],
                    y_target[indices],
                )
                results.append(
                    {
                        "key": key,
                        "phase": "test",
                        "method": method,
                        "alpha": alpha,
                        "seed": seed,
                        "target_accuracy": training.accuracy(
                            model, x_target_test, y_target_test
                        ),
                        "drift": keras_sp.weight_drift(model)["relative"],
                        "source_accuracy": source_task_accuracy(
                            backbone, source_head, x_source_test, y_source_test
                        ),
                        "source_accuracy_reestimated_bn": (
                            source_task_accuracy(
                                backbone,
                                source_head,
                                x_source_test,
                                y_source_test,
                                batchnorm="reestimated",
                            )
                        ),
                    }
                )
            progress.add(1)

    rows = []
    for method, alpha in rows_to_run:
        runs = [
            results.get(f"test/{method}/alpha={alpha:g}/seed={seed}")
            for seed in config.seeds
        ]

        def stat(name, runs=runs):
            values = np.array([run[name] for run in runs])
            return float(values.mean()), float(values.std())

        rows.append(
            {
                "method": method,
                "alpha": alpha,
                "chosen_on_validation": method != "frozen"
                and alpha == chosen[method],
                "target_accuracy": stat("target_accuracy"),
                "drift": stat("drift"),
                "source_accuracy": stat("source_accuracy"),
                "source_accuracy_reestimated_bn": stat(
                    "source_accuracy_reestimated_bn"
                ),
            }
        )
    table = format_table(
        rows,
        config,
        source_accuracy,
        test_images=(len(y_target_test), len(y_source_test)),
    )
    write_text(os.path.join(out, "table.md"), table)
    log("")
    log(table)
    log(f"Written to {out}/ in {time.time() - started:.0f} s.")
    return rows


def format_table(rows, config, source_accuracy, test_images):
    """The demo's Markdown table with the settings it was made with."""

    def cell(pair, percent=True):
        scale = 100 if percent else 1
        return f"{scale * pair[0]:.1f} ± {scale * pair[1]:.1f}"

    lines = [
        "| method | alpha | target accuracy (%) | drift ‖w−w0‖/‖w0‖ (%) "
        "| source accuracy kept (%), BN as fine-tuned | source accuracy "
        "kept (%), BN re-estimated |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["method"] == "frozen":
            alpha = "–"
        elif row["chosen_on_validation"]:
            alpha = f"{row['alpha']:g} (validated)"
        else:
            alpha = f"{row['alpha']:g} (fixed)"
        lines.append(
            f"| {row['method']} | {alpha} | {cell(row['target_accuracy'])} "
            f"| {cell(row['drift'])} | {cell(row['source_accuracy'])} "
            f"| {cell(row['source_accuracy_reestimated_bn'])} |"
        )
    lines += [
        "",
        f"Mean ± std over seeds {config.seeds}. Target: Fashion-MNIST "
        f"classes 5-9, {config.per_class} training images per class, "
        f"{test_images[0]} test images. Source: classes 0-4; the pretrained "
        f"model scores {100 * source_accuracy:.1f}% on their "
        f"{test_images[1]} test images. alpha chosen "
        f"on {config.validation_per_class} held-out images per class from "
        f"{config.alpha_grid}; beta = {config.beta:g} on the new head; "
        f"SGD momentum 0.9, lr {config.learning_rate:g} (÷10 after 2/3), "
        f"{config.iterations} iterations, batch {config.batch_size}.",
        "",
    ]
    return "\n".join(lines)


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="L2 vs L2-SP on Fashion-MNIST, offline (about 10 minutes)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--config",
        help="JSON file changing DemoConfig's defaults (a config of another "
        "subcommand is refused)",
    )
    parser.add_argument(
        "--out", default="results/demo", help="output folder (resumable)"
    )
    parser.add_argument(
        "--seeds", type=int, help="number of matched seeds (0, 1, ...)"
    )
    parser.add_argument(
        "--iterations", type=int, help="SGD steps per fine-tuning run"
    )
    parser.set_defaults(run=_run)
    return parser


def _run(args):
    overrides = {"iterations": args.iterations}
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    path = config_path(args.config, DemoConfig.COMMAND)
    config = load_config(path, DemoConfig, **overrides)
    run_demo(config, args.out)
