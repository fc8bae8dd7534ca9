"""Train-step time of each feature-space term, relative to a bare step.

A small CNN (three conv blocks with BatchNormalization, 32 px, batch 32,
SGD momentum 0.9) is trained bare and wrapped in
`keras_sp.FeatureRegularized` with each term (and DELTA together with
L2-SP). All variants are built first, warmed up, then stepped in turn (one
`train_on_batch` each, `rounds` times), so that all see the same machine
load; the table gives each variant's median wall-clock step time and its
ratio to the bare step's (on a shared machine, repeat the run: other
processes move single steps by several per cent). DELTA and LwF run a second
forward pass through the frozen copy of the network; BSS adds an SVD of the
batch feature matrix; Co-Tuning adds the source head only.

Not a test: timings depend on the machine.

Usage:

    python benchmarks/feature_space.py [--rounds 30] [--batch 32]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sp  # noqa: E402
from keras_sp import feature_space as fs  # noqa: E402

SIZE = 32
CLASSES = 10
SOURCE_CLASSES = 100


def build_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = inputs
    for index, filters in enumerate((32, 64, 128)):
        x = keras.layers.Conv2D(
            filters, 3, padding="same", name=f"conv{index}"
        )(x)
        x = keras.layers.BatchNormalization(name=f"bn{index}")(x)
        x = keras.layers.ReLU(name=f"block{index}")(x)
        x = keras.layers.MaxPooling2D(name=f"pool{index}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="features")(x)
    outputs = keras.layers.Dense(CLASSES, name="head")(x)
    return keras.Model(inputs, outputs, name="cnn")


def source_head():
    head = keras.layers.Dense(SOURCE_CLASSES, name="source")
    head.build((None, 128))
    return head


def relationship():
    table = np.random.default_rng(0).uniform(size=(CLASSES, SOURCE_CLASSES))
    return table / table.sum(1, keepdims=True)


def variants():
    def wrap(terms, head=None, l2_sp=False):
        model = build_model()
        if l2_sp:
            keras_sp.regularize(
                model,
                "l2_sp",
                alpha=0.1,
                beta=0.01,
                new_layers=[model.get_layer("head")],
            )
        return fs.FeatureRegularized(model, terms, source_head=head)

    layers = ["block1", "block2"]
    return {
        "bare fit step": build_model,
        "DELTA": lambda: wrap([fs.DELTA(layers, alpha=0.01)]),
        "DELTA + L2-SP": lambda: wrap(
            [fs.DELTA(layers, alpha=0.01)], l2_sp=True
        ),
        "BSS": lambda: wrap([fs.BSS(eta=0.001, k=1)]),
        "LwF": lambda: wrap([fs.LwF()], head=source_head()),
        "Co-Tuning": lambda: wrap(
            [fs.CoTuning(relationship())], head=source_head()
        ),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, SIZE, SIZE, 3)).astype("float32")
    y = rng.integers(0, CLASSES, size=args.batch)
    models = {}
    for name, make in variants().items():
        model = make()
        model.compile(
            keras.optimizers.SGD(0.01, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
        models[name] = model
    times = {name: [] for name in models}
    for _ in range(args.rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model.train_on_batch(x, y)
            times[name].append(time.perf_counter() - start)
    bare = np.median(times["bare fit step"])
    print(
        f"backend={keras.backend.backend()} batch={args.batch} "
        f"size={SIZE} rounds={args.rounds}"
    )
    print(f"| {'variant':<15} | median step (ms) | ratio to bare |")
    print(f"|{'-' * 17}|{'-' * 18}|{'-' * 15}|")
    for name, values in times.items():
        median = np.median(values)
        print(f"| {name:<15} | {1000 * median:16.1f} | {median / bare:13.2f} |")


if __name__ == "__main__":
    main()
