"""How many steps the far setting needs at 30 images per class.

    python docs/results/compare/mobilenet_long/schedule_study.py validation
    python docs/results/compare/mobilenet_long/schedule_study.py noise

`validation`: 3-fold validation on seed 0's training images (no test image)
of L2 fine-tuning after 200, 600 and 1000 steps and of the linear probe
after 300 and 1000; it chose this folder's `iterations` and
`probe_iterations`. `noise`: L2 fine-tuning on seed 0's draw of training
images with training seeds 0-4, after 200 and 600 steps, on the test
images: how much of the seed spread the training alone makes, once the
draw is fixed. Each prints one JSON record per run.
"""

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from keras_sp.experiments import compare
from keras_sp.experiments import comparison_stats
from keras_sp.experiments.comparison_methods import METHODS
from keras_sp.experiments.comparison_settings import load_setting
from keras_sp.experiments.config import load_config
from keras_sp.experiments.data import few_shot

CONFIG = Path(__file__).parents[1] / "mobilenet" / "config.json"


def run(task, grids, method, steps, seed, train, evaluate_on, **fields):
    """One run of `method` at the single point of its grid in `grids`."""
    name = "probe_iterations" if method == "probe" else "iterations"
    task = dataclasses.replace(task, **{name: steps})
    params = {key: values[0] for key, values in grids[method].items()}
    started = time.time()
    function, _ = METHODS[method]
    model, backbone = function(task, params, seed, *train)
    record = {**fields, "method": method, "steps": steps, "seed": seed}
    record.update(compare.evaluate(model, *evaluate_on))
    record["drift"] = compare.backbone_drift(model, backbone)
    record["seconds"] = round(time.time() - started, 1)
    print(json.dumps(record), flush=True)


def main(mode):
    config = load_config(str(CONFIG), compare.CompareConfig)
    setting = load_setting(config, verbose=0)
    task = compare.make_task(config, setting)
    x, y = setting.data["x"], setting.data["y"]
    draw = few_shot(y, 30, 0)
    if mode == "noise":
        test = (setting.data["x_test"], setting.data["y_test"])
        for steps in (200, 600):
            for seed in range(5):
                run(
                    task,
                    config.grids,
                    "l2",
                    steps,
                    seed,
                    (x[draw], y[draw]),
                    test,
                )
        return
    for fold, held in enumerate(comparison_stats.folds(y[draw], 3, 0)):
        validation = draw[held]
        train = np.setdiff1d(draw, validation)
        for method, values in (
            ("l2", (200, 600, 1000)),
            ("probe", (300, 1000)),
        ):
            for steps in values:
                run(
                    task,
                    config.grids,
                    method,
                    steps,
                    0,
                    (x[train], y[train]),
                    (x[validation], y[validation]),
                    fold=fold,
                )


if __name__ == "__main__":
    if sys.argv[1:] not in (["validation"], ["noise"]):
        sys.exit(f"usage: {sys.argv[0]} validation|noise")
    main(sys.argv[1])
