"""`keras-sp finetune`: the subcommand of the fine-tuning experiments."""

import os

from keras_sp.experiments import config as experiment_config
from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune._config import FinetuneConfig
from keras_sp.experiments.finetune._config import config_path
from keras_sp.experiments.finetune._config import results_settings
from keras_sp.experiments.finetune._experiment import run_finetune
from keras_sp.experiments.finetune._report import write_report
from keras_sp.experiments.results import ResultsFile

__all__ = [
    "add_parser",
]

_DESCRIPTION = "The paper's fine-tuning experiments, driven by a config file."


def add_parser(subparsers):
    """Adds `finetune` to the `keras-sp` subcommands (see `cli`)."""
    parser = subparsers.add_parser(
        "finetune",
        help="the paper's fine-tuning experiments (Table 2, Figures 1, 3, 4, "
        "Table 3) from a config",
        description=_DESCRIPTION,
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a JSON config file, or the name of one of keras-sp's finetune "
        'configs (the shipped configs whose "command" is "finetune"): '
        + ", ".join(experiment_config.shipped_configs(FinetuneConfig.COMMAND)),
    )
    own = parser.add_mutually_exclusive_group()
    own.add_argument(
        "--target-folder",
        metavar="PATH",
        help="your own target: a folder of class folders (replaces the "
        'config\'s "target" by {"folder": PATH}; see docs/guides/own-data.md)',
    )
    own.add_argument(
        "--target-npz",
        metavar="PATH",
        help="your own target: an .npz file of x_train, y_train, x_test, "
        'y_test (replaces the config\'s "target" by {"npz": PATH})',
    )
    own.add_argument(
        "--target-tfds",
        metavar="NAME",
        help="your own target: a tfds data set prepared in tfds's data "
        'folder, splits train and test (replaces "target" by {"tfds": NAME})',
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


def _own_target(args):
    """The `target` the command line gives, or None (the config's)."""
    for flag, key in (
        ("target_folder", "folder"),
        ("target_npz", "npz"),
        ("target_tfds", "tfds"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            return {key: value}
    return None


def _run(args):
    config = load_config(
        config_path(args.config), FinetuneConfig, target=_own_target(args)
    )
    if args.report_only:
        path = os.path.join(args.out, "results.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"No results file {path!r} to report on.")
        results = ResultsFile(path, results_settings(config))
        write_report(config, args.out, results.runs)
    else:
        run_finetune(config, args.out)
