"""The protocol of the paper's section 4.2, from a config to its run records.

Per data set (`per_class`): the validation grids choose the learning rate,
then α and β per kind; `repeats` matched test runs per kind follow at the
chosen points; then the freezing sweep (Figure 3). `run_finetune` builds the
stages from the config, each with the settings it reads, runs the protocol
and writes the report.
"""

import dataclasses
import functools
import os

import numpy as np

from keras_sp.experiments import measures
from keras_sp.experiments.finetune import _own_data
from keras_sp.experiments.finetune import _targets
from keras_sp.experiments.finetune._backbones import BackboneSettings
from keras_sp.experiments.finetune._backbones import load_pretrained
from keras_sp.experiments.finetune._backbones import unit_activation_layers
from keras_sp.experiments.finetune._config import dataset_slug
from keras_sp.experiments.finetune._config import results_settings
from keras_sp.experiments.finetune._config import settings_of
from keras_sp.experiments.finetune._fisher import FisherCache
from keras_sp.experiments.finetune._fisher import FisherSettings
from keras_sp.experiments.finetune._report import write_report
from keras_sp.experiments.finetune._runs import MeasureSettings
from keras_sp.experiments.finetune._runs import Runner
from keras_sp.experiments.finetune._runs import TrainingSettings
from keras_sp.experiments.finetune._selection import SelectionSettings
from keras_sp.experiments.finetune._selection import learning_rate_of
from keras_sp.experiments.finetune._selection import point_of
from keras_sp.experiments.finetune._targets import DataSet
from keras_sp.experiments.finetune._targets import ImageSettings
from keras_sp.experiments.finetune._targets import SourceData
from keras_sp.experiments.finetune._targets import SourceImages
from keras_sp.experiments.finetune._targets import SourceSettings
from keras_sp.experiments.finetune._targets import TargetSettings
from keras_sp.experiments.results import ResultsFile

__all__ = [
    "Experiment",
    "ProtocolSettings",
    "run_finetune",
]


@dataclasses.dataclass(frozen=True)
class ProtocolSettings:
    """The config keys of the protocol: data sets, runs, sweeps."""

    target: object
    per_class: list[int | None]
    validation_fraction: float
    seed: int
    kinds: list[str]
    repeats: int
    freeze_units: list[int]
    freeze_kinds: list[str]
    freeze_repeats: int | None
    freeze_per_class: list[int | None] | None
    r2_examples: int
    source_examples: int
    batch_size: int


class Experiment:
    """Runs the protocol's runs (those the results file lacks).

    Args:
        protocol: a `ProtocolSettings`.
        selection: a `SelectionSettings`.
        runner: the `Runner` that trains and records runs.
        load_target: `per_class -> target` (see `_targets.load_target`).
        source: a `SourceData`, or None without source images.
        log: prints progress.
    """

    def __init__(self, protocol, selection, runner, load_target, source, log):
        self.protocol = protocol
        self.selection = selection
        self.runner = runner
        self.load_target = load_target
        self.source = source
        self.log = log

    def dataset(self, per_class):
        """The `DataSet` of `per_class` training images per class."""
        protocol = self.protocol
        target = self.load_target(per_class)
        train_part, held_out = _targets.validation_split(
            target.labels, protocol.validation_fraction, protocol.seed
        )
        everything = np.arange(len(target.labels))
        r2_count = min(protocol.r2_examples, len(everything))
        r2_inputs = _targets.materialize(
            target.eval_batches(everything, "train", everything[:r2_count])
        )[0]
        source = None
        pretrained = self.runner.pretrained
        if self.source is not None and pretrained.source_head is not None:
            x, y = self.source.arrays(
                target, everything, protocol.source_examples, "test"
            )
            accuracy = measures.source_task_accuracy(
                pretrained.backbone,
                pretrained.source_head,
                x,
                y,
                batch_size=protocol.batch_size,
            )
            source = SourceImages(x, y, accuracy)
        return DataSet(
            slug=dataset_slug(protocol.target, per_class),
            per_class=per_class,
            target=target,
            train_part=train_part,
            held_out=held_out,
            everything=everything,
            r2_inputs=r2_inputs,
            source=source,
        )

    def choose(self, data):
        """Runs the validation grids; returns the chosen point per kind.

        With `select_on`, only that data set is validated, and the others
        take its choices (`point_of` reads them).
        """
        selection = self.selection
        seeds = selection.validation_seeds()
        validated = selection.validated_slug(data.slug) == data.slug
        if validated and len(selection.learning_rate_grid) > 1:
            for seed in seeds:
                for point in selection.learning_rate_points():
                    self.runner.validation_run(
                        data, selection.learning_rate_kind, point, seed
                    )
        runs = self.runner.results.runs
        rate = learning_rate_of(selection, runs, data.slug)
        for kind in self.protocol.kinds:
            grid = selection.grid(kind, rate)
            if validated and len(grid) > 1:
                for seed in seeds:
                    for point in grid:
                        self.runner.validation_run(data, kind, point, seed)
        runs = self.runner.results.runs
        return {
            kind: point_of(selection, runs, data.slug, kind)
            for kind in self.protocol.kinds
        }

    def run(self):
        """Validation then test runs per data set; then the freezing sweep."""
        protocol = self.protocol
        datasets = {}
        for per_class in protocol.per_class:
            data = self.dataset(per_class)
            skipped = data.target.skipped
            self.log(
                f"{data.slug}: {len(data.everything)} training images "
                f"({len(data.held_out)} held out to validate), "
                f"{data.target.num_classes} classes"
                + (
                    f"; {len(skipped)} unreadable image files skipped"
                    if skipped
                    else ""
                )
            )
            chosen = self.choose(data)
            for repeat in range(protocol.repeats):
                for kind in protocol.kinds:
                    self.runner.test_run(
                        data, kind, chosen[kind], protocol.seed + repeat
                    )
            datasets[per_class] = (data, chosen)
        for per_class, (data, chosen) in datasets.items():
            if protocol.freeze_per_class is not None and (
                per_class not in protocol.freeze_per_class
            ):
                continue
            repeats = protocol.freeze_repeats or protocol.repeats
            for n in [n for n in protocol.freeze_units if n > 0]:
                for repeat in range(repeats):
                    for kind in protocol.freeze_kinds:
                        self.runner.test_run(
                            data, kind, chosen[kind], protocol.seed + repeat, n
                        )


def _experiment(config, out, verbose, run_eagerly):
    """The `Experiment` of `config`, its stages given their settings."""
    log = print if verbose else (lambda *args, **kwargs: None)
    results = ResultsFile(
        os.path.join(out, "results.json"), results_settings(config)
    )
    pretrained = load_pretrained(settings_of(BackboneSettings, config))
    channels = pretrained.backbone.input_shape[-1]
    images = settings_of(ImageSettings, config)
    source = None
    if config.source is not None:
        source = SourceData(
            settings_of(SourceSettings, config), images, channels
        )
    runner = Runner(
        pretrained,
        unit_activation_layers(pretrained.backbone),
        settings_of(TrainingSettings, config),
        settings_of(MeasureSettings, config),
        FisherCache(
            settings_of(FisherSettings, config), out, pretrained, source
        ),
        results,
        log,
        run_eagerly,
    )
    return Experiment(
        settings_of(ProtocolSettings, config),
        settings_of(SelectionSettings, config),
        runner,
        functools.partial(
            _own_data.load_target,
            settings_of(TargetSettings, config),
            images,
            channels,
        ),
        source,
        log,
    )


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
    experiment = _experiment(config, out, verbose, run_eagerly)
    experiment.run()
    return write_report(config, out, experiment.runner.results.runs)
