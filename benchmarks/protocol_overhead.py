"""Run time of one comparison run against the time of its bare train steps.

`keras-sp compare` trains every run from a fresh copy of the pretrained
backbone: copy the backbone, attach the penalty, compile, build the input
pipeline, trace the train step, train, evaluate on every test image and
measure the drift. This benchmark runs `runs` runs of one method through
the same code the runner uses, timing each part, and reports per run:

- **bare steps**: the median wall-clock time of one train step (the
  second and later steps, timed by a callback) times the number of steps;
- **run**: training, evaluation on every test image and drift, as the
  runner times a run (without its results-file write);
- **overhead ratio**: run / bare steps, and where the rest goes (setup
  before `fit`, the first step's tracing, evaluation, drift).

Not a test: timings depend on the machine (on a shared machine, repeat).

Usage:

    python benchmarks/protocol_overhead.py [--setting fashion] [--runs 3]
        [--method l2]

The `mobilenet` setting needs the converted weights (`make mobilenet`).
"""

import argparse
import dataclasses
import gc
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402

from keras_sp.experiments import compare  # noqa: E402
from keras_sp.experiments import comparison_methods  # noqa: E402
from keras_sp.experiments.config import load_config  # noqa: E402
from keras_sp.experiments.data import few_shot  # noqa: E402


class StepTimes(keras.callbacks.Callback):
    """Wall-clock time of each train step, and when `fit` started."""

    def __init__(self):
        super().__init__()
        self.steps = []
        self.fit_started = None

    def on_train_begin(self, logs=None):
        self.fit_started = time.perf_counter()

    def on_train_batch_begin(self, batch, logs=None):
        self._started = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(time.perf_counter() - self._started)


class CollectorTime:
    """Wall-clock time spent in Python's garbage collector."""

    def __init__(self):
        self.total = 0.0
        self._started = None
        gc.callbacks.append(self)

    def __call__(self, phase, info):
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total += time.perf_counter() - self._started
            self._started = None


COLLECTOR = CollectorTime()


def timed_run(task, method, params, seed, x, y, test):
    """One run as `compare` does it, with the time of each part."""
    timer = StepTimes()
    task = dataclasses.replace(task, callbacks=(timer,))
    collected = COLLECTOR.total
    started = time.perf_counter()
    model, backbone = comparison_methods.METHODS[method][0](
        task, params, seed, x, y
    )
    trained = time.perf_counter()
    compare.evaluate(model, *test)
    evaluated = time.perf_counter()
    compare.backbone_drift(model, backbone)
    finished = time.perf_counter()
    steady = statistics.median(timer.steps[1:])
    return {
        "run": finished - started,
        "bare steps": steady * len(timer.steps),
        "setup": timer.fit_started - started,
        "first step": timer.steps[0],
        "fit rest": trained - timer.fit_started - sum(timer.steps),
        "evaluation": evaluated - trained,
        "drift": finished - evaluated,
        "garbage collector": COLLECTOR.total - collected,
        "median step (ms)": 1000 * steady,
        "steps": len(timer.steps),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", default="fashion")
    parser.add_argument("--method", default="l2")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=30)
    args = parser.parse_args()
    name = "compare_mobilenet" if args.setting == "mobilenet" else None
    config = load_config(
        compare.config_path(name, "compare") if name else None,
        compare.CompareConfig,
        setting=args.setting,
    )
    setting = compare.load_setting(config, verbose=0)
    task = compare.make_task(config, setting)
    data = setting.data
    params = {
        name: values[0] for name, values in config.grids[args.method].items()
    }
    test = (data["x_test"], data["y_test"])
    rows = []
    for seed in range(args.runs):
        indices = few_shot(data["y"], args.per_class, seed)
        rows.append(
            timed_run(
                task,
                args.method,
                params,
                seed,
                data["x"][indices],
                data["y"][indices],
                test,
            )
        )
    print(
        f"{args.setting}, {args.method} {params}, {args.per_class} images "
        f"per class, {len(test[1])} test images, {args.runs} runs "
        "(seconds, median over runs)"
    )
    for key in rows[0]:
        values = [row[key] for row in rows]
        each = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {key:>18}: {statistics.median(values):8.2f}  ({each})")
    ratios = [row["run"] / row["bare steps"] for row in rows]
    print(
        "  overhead ratio (run / bare steps): "
        + ", ".join(f"{r:.2f}" for r in ratios)
        + f" (median {statistics.median(ratios):.2f})"
    )


if __name__ == "__main__":
    main()
