"""`keras-sp fisher`: the diagonal Fisher information of a saved model.

    keras-sp fisher --model source.keras --data source.npz --out DIR

reads a Keras model (`.keras`) and a `.npz` file holding the inputs `x`
(and optionally the labels `y`, needed by `--mode empirical`), computes
`keras_sp.fisher.diagonal_fisher`, and writes `DIR/fisher.npz` (one array
per trainable variable, keyed by `variable.path`, for
`keras_sp.fisher.load` or `FisherInformation(fisher=...)`) and
`DIR/fisher.json` (the settings, the number of examples and the time).
Both are written atomically (`keras_sp.experiments.results.atomic_write`):
an interrupted run leaves a previous `fisher.npz` whole, and a failed write
is an error naming the file.
"""

import json
import os
import time

import keras
import numpy as np

from keras_sp import fisher
from keras_sp.experiments.results import READ_ERRORS
from keras_sp.experiments.results import CorruptFileError
from keras_sp.experiments.results import atomic_write
from keras_sp.experiments.results import check_archive
from keras_sp.experiments.results import write_text

__all__ = [
    "load_fisher",
    "run",
    "save_fisher",
]

FROM_LOGITS = {"auto": None, "true": True, "false": False}


def add_parser(subparsers):
    """Adds the `fisher` subcommand to the `keras-sp` command line."""
    parser = subparsers.add_parser(
        "fisher",
        help="diagonal Fisher information of a saved model",
        description=__doc__.splitlines()[0],
    )
    parser.add_argument("--model", required=True, help="a .keras model file")
    parser.add_argument(
        "--data",
        required=True,
        help=".npz file with the inputs `x` and optionally the labels `y`",
    )
    parser.add_argument(
        "--mode",
        choices=fisher.MODES,
        default="exact",
        help="exact (the paper's formula, default), sampled or empirical",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=1,
        help="labels drawn per example in sampled mode (default 1)",
    )
    parser.add_argument(
        "--from-logits",
        choices=sorted(FROM_LOGITS),
        default="auto",
        help="whether the model outputs logits; auto detects a final softmax",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--max-examples", type=int, help="use at most this many examples"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the sampled labels (default 0: reruns give the same "
        "Fisher)",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing DIR/fisher.npz",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress bar or summary"
    )
    parser.set_defaults(run=run)


def save_fisher(values, path):
    """Writes a Fisher information file atomically (`keras_sp.fisher.save`).

    The file appears whole or not at all: an interrupted write leaves the
    previous file at `path` unchanged and raises an `OSError` naming
    `path`. The file's permissions are those of a file made by `open()`.

    Args:
        values: `{variable.path: array}`.
        path: a `.npz` file.
    """
    with atomic_write(path) as temporary:
        fisher.save(values, temporary)


def load_fisher(path):
    """Reads a Fisher information file written by `save_fisher`.

    Raises:
        CorruptFileError: if the file is truncated or not a Fisher file,
            naming it and suggesting to delete it so that the Fisher
            information is computed again (chained from the original error).
    """
    try:
        check_archive(path)
        return fisher.load(path)
    except FileNotFoundError:
        raise
    except READ_ERRORS as error:
        raise CorruptFileError(
            path,
            f"it is not a readable Fisher file ({error}), perhaps truncated",
            "Delete it to compute the Fisher information again.",
        ) from error


def _read_data(path):
    try:
        check_archive(path)
        with np.load(path, allow_pickle=False) as archive:
            names = sorted(archive.files) if hasattr(archive, "files") else []
            x = archive["x"] if "x" in names else None
            y = archive["y"] if "y" in names else None
    except FileNotFoundError:
        raise
    except READ_ERRORS as error:
        raise ValueError(
            f"`--data` is not a readable .npz file ({error}). Received: "
            f"--data={path!r}"
        ) from error
    if x is None:
        raise ValueError(
            "`--data` must be a .npz file with an array named 'x' (and "
            f"optionally 'y'). Received: arrays {names} in {path!r}"
        )
    return x, y


def run(args):
    """Runs `keras-sp fisher` with the parsed command-line `args`."""
    target = os.path.join(args.out, "fisher.npz")
    if os.path.exists(target) and not args.overwrite:
        raise ValueError(
            f"{target} exists: pass --overwrite to replace it. Received: "
            f"--out={args.out!r}"
        )
    x, y = _read_data(args.data)
    model = keras.saving.load_model(args.model)
    start = time.perf_counter()
    result = fisher.diagonal_fisher(
        model,
        x if y is None else (x, y),
        mode=args.mode,
        samples=args.samples,
        from_logits=FROM_LOGITS[args.from_logits],
        batch_size=args.batch_size,
        max_examples=args.max_examples,
        seed=args.seed,
        verbose=0 if args.quiet else 1,
    )
    seconds = time.perf_counter() - start
    save_fisher(result, target)
    examples = (
        len(x) if args.max_examples is None else min(len(x), args.max_examples)
    )
    summary = {
        "model": os.path.abspath(args.model),
        "data": os.path.abspath(args.data),
        "mode": args.mode,
        "samples": args.samples,
        "from_logits": args.from_logits,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "examples": examples,
        "variables": len(result),
        "parameters": int(sum(value.size for value in result.values())),
        "seconds": round(seconds, 3),
        "keras": keras.__version__,
    }
    write_text(
        os.path.join(args.out, "fisher.json"), json.dumps(summary, indent=2)
    )
    if not args.quiet:
        print(
            f"Wrote {target}: {args.mode} Fisher of {len(result)} variables "
            f"on {examples} examples in {seconds:.1f} s."
        )
