"""The `keras-sp` command line: one subcommand per experiment.

Each experiment module defines `add_parser(subparsers)`, which adds its
subcommand and sets `run=function(args)` as the parser default. Bad input
(`ValueError`, including `ConfigError`, or a missing file) ends with a
one-line error and exit code 2; `--debug` shows the traceback instead.
"""

import argparse
import importlib
import os
import sys

__all__ = [
    "main",
]

EXPERIMENT_MODULES = (
    "keras_sp.experiments.demo",
    "keras_sp.experiments.finetune",
    "keras_sp.experiments.grow",
    "keras_sp.experiments.transferability",
)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="keras-sp",
        description="Transfer learning experiments with keras-sp.",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full traceback on errors",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in EXPERIMENT_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv=None):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        if args.debug:
            raise
        message = str(error).splitlines()[0] if str(error) else repr(error)
        print(f"keras-sp {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
