"""Which method, by how much: a comparison on matched seeds.

Two settings (`keras_sp.experiments.comparison_settings`): `fashion`, the
small CNN pretrained here on Fashion-MNIST classes 0-4 (cached) -> classes
5-9, tested on their 5,000 test images (source and target near); and
`mobilenet`, the ImageNet MobileNet V1 -> the 10 Fashion-MNIST classes
(far). The target has `per_class` training images per class. For each
number of images per class and each method:

1. its hyper-parameters are chosen by k-fold cross-validation over the
   training images only (stratified folds, on the first `cv_seeds` seeds;
   mean validation accuracy, ties to the lower validation cross-entropy);
2. it is trained on all training images with each of the matched seeds
   (one seed draws the images, the head's initialisation and the batch
   order, the same for every method) and tested.

Reported per method: test accuracy (mean ± std over seeds), the paired
difference to L2 fine-tuning with its 95 % interval, the relative drift
||w - w0|| / ||w0|| of the backbone's kernels, and the smallest difference
to L2 the table can detect. The baselines a user compares against are
always run: the linear probe (`probe`) and L2 fine-tuning (`l2`). With
several `per_class` values, `regime_map.png` plots each method's gain over
L2 against the number of images per class, and `regime_map.md` gives its
numbers.
"""

import dataclasses
import math
import os
import time

import keras
import numpy as np

import keras_sp
from keras_sp.experiments import _comparison_report as report
from keras_sp.experiments import comparison_stats
from keras_sp.experiments import training
from keras_sp.experiments.comparison_methods import METHODS
from keras_sp.experiments.comparison_methods import SPARSE_METHODS
from keras_sp.experiments.comparison_methods import Task
from keras_sp.experiments.comparison_settings import SETTINGS
from keras_sp.experiments.comparison_settings import load_setting
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import config_path
from keras_sp.experiments.config import load_config
from keras_sp.experiments.data import few_shot
from keras_sp.experiments.results import ResultsFile
from keras_sp.experiments.results import write_text

__all__ = [
    "CompareConfig",
    "run_compare",
]

BASELINES = ("probe", "l2")


@dataclasses.dataclass
class CompareConfig:
    """Settings of a comparison (all have defaults; a JSON file may change
    them).

    Attributes:
        setting: `"fashion"` or `"mobilenet"`.
        methods: the methods compared (`probe` and `l2` are always run).
        per_class: training images per target class; several values give
            the regime map.
        seeds: matched seeds of the test runs.
        cv_seeds: how many of the first seeds the cross-validation uses.
        folds: k of the k-fold cross-validation.
        grids: per method, `{hyper-parameter: values}` tried by the
            cross-validation.
        beta: L2 strength on the new head of the fine-tuned methods.
        iterations: SGD steps per fine-tuning run.
        probe_iterations: SGD steps of the linear probe's head.
        min_epochs: at least this many passes over a run's training
            images: a run takes `max(iterations, ceil(min_epochs * images
            / batch_size))` steps (its probe the same with
            `probe_iterations`), so larger training sets get longer
            schedules; 0 (default): the fixed numbers of steps.
        batch_size: batch size.
        learning_rate: initial learning rate (divided by 10 after 2/3).
        warmup_iterations: steps of linear learning-rate warm-up.
        augment: random 2-px shifts and horizontal flips of the training
            images.
        delta_attention: DELTA's channel attention from a linear probe
            (for each channel, a pass through the layers downstream of
            it); False gives every channel weight 1.
        input_size: side of MobileNet's inputs (`mobilenet`).
        test_per_class: test images per class (None: all of them).
        pretrain_epochs: epochs of the source model's training (`fashion`).
        source_width: filters of the source CNN's first convolution
            (`fashion`).
    """

    COMMAND = "compare"

    setting: str = "fashion"
    methods: list[str] = dataclasses.field(
        default_factory=lambda: ["probe", "l2", "l2_sp"]
    )
    per_class: list[int] = dataclasses.field(default_factory=lambda: [30])
    seeds: list[int] = dataclasses.field(
        default_factory=lambda: list(range(10))
    )
    cv_seeds: int = 2
    folds: int = 3
    grids: dict[str, dict[str, list[float]]] = dataclasses.field(
        default_factory=lambda: {
            "probe": {"beta": [1e-3, 1e-2]},
            "l2": {"alpha": [1e-4, 1e-2]},
            "l2_sp": {"alpha": [1e-3, 1e-2, 1e-1]},
            "l1_sp": {"alpha": [1e-5, 1e-4, 1e-3]},
            "group_lasso_sp": {"alpha": [1e-4, 1e-3, 1e-2]},
            "l1_sp_proximal": {"alpha": [1e-5, 1e-4, 1e-3]},
            "group_lasso_sp_proximal": {"alpha": [1e-4, 1e-3, 1e-2]},
            "lp_ft": {"finetune_learning_rate": [1e-3, 1e-2]},
            "lp_ft_l2_sp": {
                "finetune_learning_rate": [1e-3, 1e-2],
                "sp_alpha": [1e-2],
            },
            "wise_ft": {"alpha": [1e-2], "t": [0.5, 0.7, 0.9, 1.0]},
            "delta": {"alpha": [1e-3, 1e-2, 1e-1]},
            "delta_l2_sp": {"alpha": [1e-3, 1e-2, 1e-1], "sp_alpha": [1e-2]},
            "bss": {"eta": [1e-3, 1e-2]},
            "lwf": {"weight": [0.1, 1.0]},
            "co_tuning": {"weight": [0.23, 2.3]},
        }
    )
    beta: float = 0.01
    iterations: int = 300
    probe_iterations: int = 600
    min_epochs: float = 0.0
    batch_size: int = 32
    learning_rate: float = 0.01
    warmup_iterations: int = 0
    augment: bool = False
    delta_attention: bool = True
    input_size: int = 64
    test_per_class: int | None = None
    pretrain_epochs: int = 3
    source_width: int = 32

    def validate(self):
        if self.setting not in SETTINGS:
            raise ConfigError(
                f"Config key 'setting' must be one of {list(SETTINGS)}. "
                f"Received: setting={self.setting!r}"
            )
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise ConfigError(
                f"Config key 'methods' names unknown methods {unknown}; "
                f"known: {sorted(METHODS)}. Received: methods={self.methods}"
            )
        for name in ("seeds", "per_class"):
            if not getattr(self, name):
                raise ConfigError(f"Config key '{name}' must not be empty.")
        if not 1 <= self.cv_seeds <= len(self.seeds):
            raise ConfigError(
                "Config key 'cv_seeds' must be between 1 and the number of "
                f"seeds. Received: cv_seeds={self.cv_seeds}"
            )
        if self.folds < 2 or self.folds > min(self.per_class):
            raise ConfigError(
                "Config key 'folds' must be between 2 and the smallest "
                f"per_class. Received: folds={self.folds}"
            )
        for method in self.compared():
            _, names = METHODS[method]
            grid = self.grids.get(method, {})
            if sorted(grid) != sorted(names) or not all(grid.values()):
                raise ConfigError(
                    f"Config key 'grids.{method}' must give a non-empty "
                    f"list for each of {list(names)}. Received: "
                    f"grids.{method}={grid}"
                )
            for name, values in grid.items():
                for value in values:
                    if not (isinstance(value, (int, float)) and value >= 0):
                        raise ConfigError(
                            f"Config key 'grids.{method}.{name}' must hold "
                            f"non-negative numbers. Received: {value!r}"
                        )
        if self.min_epochs < 0:
            raise ConfigError(
                "Config key 'min_epochs' must be 0 or more. Received: "
                f"min_epochs={self.min_epochs}"
            )
        if self.test_per_class is not None and self.test_per_class < 1:
            raise ConfigError(
                "Config key 'test_per_class' must be positive or null. "
                f"Received: test_per_class={self.test_per_class}"
            )
        for name in (
            "iterations",
            "probe_iterations",
            "input_size",
            "batch_size",
            "source_width",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(
                    f"Config key '{name}' must be positive. Received: "
                    f"{name}={getattr(self, name)}"
                )

    def compared(self):
        """The baselines, then the other methods, each once."""
        return list(dict.fromkeys([*BASELINES, *self.methods]))


def _points(grid):
    """Every combination of the grid's values, as dicts."""
    points = [{}]
    for name in sorted(grid):
        points = [{**p, name: v} for p in points for v in grid[name]]
    return points


def evaluate(model, x, y):
    """A run's test (or validation) record: `{"accuracy", "loss"}` of
    `model` on `x`, `y`."""
    accuracy, loss = training.accuracy_and_loss(model, x, y)
    return {"accuracy": accuracy, "loss": loss}


def backbone_drift(model, backbone):
    """A run's drift: ||w - w0|| / ||w0|| over the backbone's kernels (0
    when the backbone was frozen: nothing moved). WiSE-FT records w0 of
    every variable; only the kernels count here, as for the other
    methods."""
    kernels = {v.path for v in backbone.weights if v.path.endswith("kernel")}
    reference = {
        path: w0
        for path, w0 in keras_sp.starting_point(model).items()
        if path in kernels
    }
    return float(keras_sp.weight_drift(model, reference)["relative"])


class _Runs:
    """Trains, tests and records the runs of one comparison."""

    def __init__(self, config, task, data, results, progress, report_only):
        self.report_only = report_only
        self.config = config
        self.task = task
        self.tasks = {}
        self.data = data
        self.results = results
        self.progress = progress

    def _run(self, key, method, params, seed, train, evaluate_on):
        if not self.results.done(key) and self.report_only:
            raise ConfigError(
                f"--report-only: {self.results.path} has no run {key!r}; "
                "run without --report-only to make it."
            )
        if not self.results.done(key):
            started = time.time()
            function, _ = METHODS[method]
            x, y = self.data["x"], self.data["y"]
            record = {"key": key, "method": method, "seed": seed, **params}
            try:
                model, backbone = function(
                    self.task_for(len(train)), params, seed, x[train], y[train]
                )
            except FloatingPointError:
                # The loss became NaN or infinite: the run scores chance
                # (a guess among the classes) and says it diverged.
                record.update(
                    accuracy=1.0 / self.task.num_classes,
                    loss=float(np.log(self.task.num_classes)),
                    drift=float("nan"),
                    diverged=True,
                    seconds=round(time.time() - started, 2),
                )
                self.results.append(record)
                self.progress.add(1)
                return record
            record.update(evaluate(model, *evaluate_on))
            record["drift"] = backbone_drift(model, backbone)
            if method in SPARSE_METHODS:
                at_w0 = keras_sp.at_starting_point(model)
                record["at_w0_weights"] = at_w0.weights
                record["at_w0_channels"] = at_w0.groups
            record["seconds"] = round(time.time() - started, 2)
            self.results.append(record)
        self.progress.add(1)
        return self.results.get(key)

    def task_for(self, images):
        """The task of a run on `images` training images: at least
        `config.min_epochs` passes over them. One object per size, so the
        runs on it share what `comparison_methods` computes once."""
        if images not in self.tasks:
            steps = math.ceil(
                self.config.min_epochs * images / self.config.batch_size
            )
            self.tasks[images] = dataclasses.replace(
                self.task,
                iterations=max(self.task.iterations, steps),
                probe_iterations=max(self.task.probe_iterations, steps),
            )
        return self.tasks[images]

    def choose(self, method, per_class, draws):
        """The grid point with the best mean cross-validated accuracy."""
        grid = self.config.grids[method]
        points = _points(grid)
        if len(points) == 1:
            return points[0], None
        x, y = self.data["x"], self.data["y"]
        scores = []
        for params in points:
            runs = []
            for seed in self.config.seeds[: self.config.cv_seeds]:
                indices = draws[seed]
                parts = comparison_stats.folds(
                    y[indices], self.config.folds, seed
                )
                for fold, held in enumerate(parts):
                    validation = indices[held]
                    train = np.setdiff1d(indices, validation)
                    key = (
                        f"cv/{per_class}/{method}/{report.label(params)}"
                        f"/seed={seed}/fold={fold}"
                    )
                    runs.append(
                        self._run(
                            key,
                            method,
                            params,
                            seed,
                            train,
                            (x[validation], y[validation]),
                        )
                    )
            scores.append(
                (
                    np.mean([r["accuracy"] for r in runs]),
                    -np.mean([r["loss"] for r in runs]),
                )
            )
        best = max(range(len(points)), key=lambda i: scores[i])
        return points[best], {
            report.label(p): round(float(s[0]), 4)
            for p, s in zip(points, scores, strict=True)
        }

    def test(self, method, params, per_class, draws):
        test = (self.data["x_test"], self.data["y_test"])
        return [
            self._run(
                f"test/{per_class}/{method}/{report.label(params)}/seed={seed}",
                method,
                params,
                seed,
                draws[seed],
                test,
            )
            for seed in self.config.seeds
        ]


def _summary(method, params, cv_scores, runs, reference):
    accuracy = np.array([r["accuracy"] for r in runs])
    drift = np.array([r["drift"] for r in runs if not r.get("diverged")])
    difference = comparison_stats.paired_difference(
        accuracy, [r["accuracy"] for r in reference]
    )
    at_w0 = None
    if "at_w0_weights" in runs[0]:
        at_w0 = [
            float(np.mean([r[name] for r in runs]))
            for name in ("at_w0_weights", "at_w0_channels")
        ]
    return {
        "method": method,
        "params": params,
        "diverged": sum(bool(r.get("diverged")) for r in runs),
        "at_w0": at_w0,
        "cv_accuracy": cv_scores,
        "accuracy_mean": float(accuracy.mean()),
        "accuracy_std": float(accuracy.std(ddof=1)) if len(runs) > 1 else 0.0,
        "drift_mean": float(drift.mean()) if drift.size else float("nan"),
        "difference_to_l2": difference,
        "detectable": comparison_stats.smallest_detectable_effect(
            difference["std"], difference["n"]
        ),
    }


def make_task(config, setting):
    """The `Task` every run of the comparison `config` shares, on the
    loaded `setting`."""
    return Task(
        source=setting.source,
        num_classes=setting.num_classes,
        iterations=config.iterations,
        probe_iterations=config.probe_iterations,
        batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        beta=config.beta,
        warmup_iterations=config.warmup_iterations,
        augment=config.augment,
        delta_layers=setting.delta_layers,
        delta_attention=config.delta_attention,
    )


def run_compare(config, out, verbose=1, report_only=False):
    """Runs the comparison, writes `results.json`, `table.md` (and
    `regime_map.png` and `regime_map.md` for several `per_class`) under
    `out`.

    Args:
        config: a `CompareConfig`.
        out: output folder; runs already in its `results.json` are skipped.
        verbose: 1 prints progress and the tables.
        report_only: write the tables from the runs `results.json` holds,
            train nothing (a missing run is an error).

    Returns:
        `{per_class: {method: summary}}`.
    """
    config.validate()
    log = print if verbose else (lambda *args, **kwargs: None)
    setting = load_setting(config, verbose, with_source=not report_only)
    if setting.source_accuracy is not None:
        log(f"Source model: test accuracy {setting.source_accuracy:.3f}")
    data = setting.data
    y, y_t = data["y"], data["y_test"]
    task = make_task(config, setting)
    # What a run's key does not name: a later call with more methods, seeds
    # or sizes (or other grids) reuses the runs it shares with this one.
    settings = {
        k: v
        for k, v in dataclasses.asdict(config).items()
        if k not in ("methods", "per_class", "seeds", "cv_seeds", "grids")
    }
    if not config.min_epochs:
        # Fixed schedules are stored as no key: results files written
        # before the key existed still match.
        del settings["min_epochs"]
    results = ResultsFile(os.path.join(out, "results.json"), settings)
    methods = config.compared()
    cv_runs = sum(
        len(_points(config.grids[m])) * config.cv_seeds * config.folds
        for m in methods
        if len(_points(config.grids[m])) > 1
    )
    progress = keras.utils.Progbar(
        len(config.per_class) * (cv_runs + len(methods) * len(config.seeds)),
        verbose=verbose,
        unit_name="run",
    )
    runs = _Runs(config, task, data, results, progress, report_only)
    summaries, tables = {}, []
    for per_class in config.per_class:
        draws = {s: few_shot(y, per_class, s) for s in config.seeds}
        chosen = {m: runs.choose(m, per_class, draws) for m in methods}
        tested = {
            m: runs.test(m, chosen[m][0], per_class, draws) for m in methods
        }
        summaries[per_class] = {
            m: _summary(m, *chosen[m], tested[m], tested["l2"]) for m in methods
        }
        tables.append(
            report.format_table(
                list(summaries[per_class].values()),
                per_class,
                len(y_t),
                len(config.seeds),
            )
        )
    text = "\n\n".join(tables) + "\n"
    write_text(os.path.join(out, "table.md"), text)
    if len(config.per_class) > 1:
        report.plot_regime_map(summaries, os.path.join(out, "regime_map.png"))
        write_text(
            os.path.join(out, "regime_map.md"),
            report.format_regime_table(summaries, len(config.seeds)),
        )
    log("")
    log(text)
    return summaries


def add_parser(subparsers):
    parser = subparsers.add_parser(
        "compare",
        help="methods against a linear probe and L2 fine-tuning, "
        "matched seeds, k-fold CV",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "--config",
        help="JSON file changing CompareConfig's defaults",
    )
    parser.add_argument(
        "--out", default="results/compare", help="output folder (resumable)"
    )
    parser.add_argument(
        "--seeds", type=int, help="number of matched seeds (0, 1, ...)"
    )
    parser.add_argument(
        "--methods", help="comma-separated methods (probe and l2 always run)"
    )
    parser.add_argument(
        "--setting", choices=SETTINGS, help="source -> target setting"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="write the tables from results.json, train nothing",
    )
    parser.set_defaults(run=_run)
    return parser


def _run(args):
    overrides = {}
    if args.seeds is not None:
        overrides["seeds"] = list(range(args.seeds))
    if args.methods:
        overrides["methods"] = args.methods.split(",")
    if args.setting:
        overrides["setting"] = args.setting
    path = config_path(args.config, CompareConfig.COMMAND)
    config = load_config(path, CompareConfig, **overrides)
    run_compare(config, args.out, report_only=args.report_only)
