"""The `keras-sp` command line: one subcommand per experiment.

Each experiment module defines `add_parser(subparsers)`, which adds its
subcommand (with `--help`, and `--out DIR` for its results) and sets
`run=function(args)` as the parser default; long work shows a progress bar.
The tool modules add subcommands the same way that prepare an experiment
rather than run one (`keras-sp convert-mobilenet` writes the ImageNet
MobileNet V1 weights into the cache).
`keras-sp` alone prints the usage and exits with code 2; `keras-sp
--version` prints the version. Bad input (`ValueError`, including
`ConfigError` and `CorruptFileError` for a damaged file read back, or an
`OSError` such as a missing file or a failed write, which names the file)
ends with a one-line error and exit code 2, an interruption (Ctrl-C) with
exit code 130; `--debug` shows the traceback instead, and TensorFlow's
warnings. The console script starts in `keras_sp_cli`, which keeps
TensorFlow's start-up log out of the output.
"""

import argparse
import importlib
import logging
import sys

import keras_sp

__all__ = [
    "main",
]

EXPERIMENT_MODULES = (
    "keras_sp.experiments.demo",
    "keras_sp.experiments.compare",
    "keras_sp.experiments.finetune",
    "keras_sp.experiments.growing_a_brain",
    "keras_sp.experiments.transferability",
    "keras_sp.experiments.fisher_command",
)
TOOL_MODULES = ("keras_sp.experiments.convert_mobilenet",)


def build_parser():
    """The `keras-sp` argument parser, with every experiment's subcommand
    and every tool's."""
    parser = argparse.ArgumentParser(
        prog="keras-sp",
        description="Transfer learning experiments with keras-sp.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"keras-sp {keras_sp.__version__}",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback on errors (and TensorFlow's log)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in EXPERIMENT_MODULES + TOOL_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None):
    """Runs the `keras-sp` command line.

    Args:
        argv: the arguments (default: `sys.argv[1:]`).

    Returns:
        The exit code: 0 on success, 2 on bad input or without a
        subcommand, 130 when interrupted.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if not args.debug:
        # TensorFlow's Python warnings while experiments run (such as
        # "triggered tf.function retracing" when many models are trained).
        logging.getLogger("tensorflow").setLevel(logging.ERROR)
    try:
        result = args.run(args)
    except (ValueError, OSError, FloatingPointError) as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else repr(error)
        print(f"keras-sp {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"keras-sp {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
