"""Throughput of `keras_sp.fisher.diagonal_fisher` on a small ResNet (CPU).

Examples per second of the three modes on one Keras backend, as ratios to
that backend's batched forward + backward pass over the same examples (the
gradient of the batch's summed log-likelihood, compiled: the cost of a
training step, which gives no per-example gradients), and to a loop of the
same compiled pass over single examples (the naive way to get per-example
gradients).

Run one process per backend:

    KERAS_BACKEND=tensorflow python benchmarks/fisher_throughput.py
    KERAS_BACKEND=jax python benchmarks/fisher_throughput.py --repeats 5
    python benchmarks/fisher_throughput.py --backend torch

Each repeat times every method once, in turn; the script prints the median
over repeats, in wall-clock time and in CPU time of this process (all
threads): on a shared machine the CPU times are the steadier figure.
"""

import argparse
import os
import statistics
import sys
import time


def _backend_from_arguments():
    """`--backend` must be known before Keras is imported."""
    for index, argument in enumerate(sys.argv):
        if argument == "--backend" and index + 1 < len(sys.argv):
            return sys.argv[index + 1]
        if argument.startswith("--backend="):
            return argument.split("=", 1)[1]
    return None


if _backend_from_arguments():
    os.environ["KERAS_BACKEND"] = _backend_from_arguments()
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from keras_sp import fisher  # noqa: E402


def small_resnet(num_classes=10, width=16, blocks=(2, 2, 2), size=32):
    """A CIFAR-style ResNet: 3 stages of basic blocks with BatchNorm."""
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.ReLU()(x)
    for stage, count in enumerate(blocks):
        filters = width * 2**stage
        for block in range(count):
            strides = 2 if stage > 0 and block == 0 else 1
            shortcut = x
            y = keras.layers.Conv2D(
                filters, 3, strides=strides, padding="same", use_bias=False
            )(x)
            y = keras.layers.BatchNormalization()(y)
            y = keras.layers.ReLU()(y)
            y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(
                y
            )
            y = keras.layers.BatchNormalization()(y)
            if strides != 1 or shortcut.shape[-1] != filters:
                shortcut = keras.layers.Conv2D(
                    filters, 1, strides=strides, use_bias=False
                )(shortcut)
                shortcut = keras.layers.BatchNormalization()(shortcut)
            x = keras.layers.ReLU()(keras.layers.Add()([y, shortcut]))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(num_classes)(x)
    return keras.Model(inputs, outputs, name="small_resnet")


def batched_gradient(model):
    """`run(x, y)`: the gradient of sum_i log f_{y_i}(x_i) over a batch,
    compiled on the backend, returned as NumPy arrays."""
    backend = keras.backend.backend()
    variables = model.trainable_variables

    def score(outputs, y):
        log_p = ops.log_softmax(outputs, axis=-1)
        return ops.sum(ops.take_along_axis(log_p, y[:, None], axis=1))

    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function
        def step(x, y):
            with tf.GradientTape() as tape:
                value = score(model(x, training=False), y)
            return tape.gradient(value, variables)

        return lambda x, y: [g.numpy() for g in step(x, y)]
    if backend == "jax":
        import jax

        def value(trainable, non_trainable, x, y):
            outputs, _ = model.stateless_call(
                trainable, non_trainable, x, training=False
            )
            return score(outputs, y)

        step = jax.jit(jax.grad(value))

        def run(x, y):
            gradients = step(
                [v.value for v in variables],
                [v.value for v in model.non_trainable_variables],
                x,
                y,
            )
            return [np.asarray(g) for g in gradients]

        return run
    import torch

    def run(x, y):
        x = torch.as_tensor(x)
        y = torch.as_tensor(y)
        value = score(model(x, training=False), y)
        gradients = torch.autograd.grad(value, [v.value for v in variables])
        return [g.numpy() for g in gradients]

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend",
        choices=["tensorflow", "jax", "torch"],
        help="Keras backend (default: $KERAS_BACKEND, else tensorflow)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-examples", type=int, default=32)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    num_classes = 10
    model = small_resnet(num_classes)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, num_classes, args.examples).astype("int32")
    batch = args.batch_size
    gradient = batched_gradient(model)

    def batched():
        for start in range(0, args.examples, batch):
            gradient(x[start : start + batch], y[start : start + batch])

    def naive():
        sums = [np.zeros(v.shape, "float32") for v in model.trainable_variables]
        for i in range(args.naive_examples):
            for total, g in zip(
                sums, gradient(x[i : i + 1], y[i : i + 1]), strict=True
            ):
                total += g**2

    def mode(name):
        def run():
            fisher.diagonal_fisher(
                model, (x, y), mode=name, batch_size=batch, seed=0
            )

        return run

    methods = {
        "batched forward+backward": (batched, args.examples),
        "naive loop (batch of 1)": (naive, args.naive_examples),
        "empirical": (mode("empirical"), args.examples),
        "sampled (1 label)": (mode("sampled"), args.examples),
        f"exact (K={num_classes})": (mode("exact"), args.examples),
    }
    backend = keras.backend.backend()
    print(
        f"backend {backend}, small ResNet, {model.count_params()} "
        f"parameters, 32x32x3 inputs, K={num_classes}, batch {batch}, "
        f"{args.examples} examples, median of {args.repeats} repeats, "
        f"Keras {keras.__version__}"
    )
    for name, (run, _) in methods.items():
        start = time.perf_counter()
        run()  # traces, compiles and warms up
        print(f"  first call of {name}: {time.perf_counter() - start:.1f} s")
    clocks = {"wall-clock": time.perf_counter, "CPU": time.process_time}
    seconds = {(clock, name): [] for clock in clocks for name in methods}
    for _ in range(args.repeats):
        for name, (run, count) in methods.items():
            start = {clock: now() for clock, now in clocks.items()}
            run()
            for clock, now in clocks.items():
                seconds[clock, name].append((now() - start[clock]) / count)
    median = {key: statistics.median(t) for key, t in seconds.items()}
    print(
        f"\n{'method':<26}{'examples/s':>12}{'x batched':>11}"
        f"{'CPU ex/s':>10}{'x batched':>11}"
    )
    wall_0 = median["wall-clock", "batched forward+backward"]
    cpu_0 = median["CPU", "batched forward+backward"]
    for name in methods:
        wall, cpu = median["wall-clock", name], median["CPU", name]
        print(
            f"{name:<26}{1 / wall:>12.1f}{wall_0 / wall:>11.3f}"
            f"{1 / cpu:>10.1f}{cpu_0 / cpu:>11.3f}"
        )
    print(
        "\n'x batched': examples/s divided by the batched forward+backward "
        "pass's examples/s (1 = as fast as a training step)."
    )


if __name__ == "__main__":
    main()
