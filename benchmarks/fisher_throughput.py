"""Throughput of `keras_sp.fisher.diagonal_fisher` on a small ResNet (CPU).

Examples per second of each mode, against

- a naive eager loop over examples (one `GradientTape` per example, the
  squared gradient of log f_y accumulated in NumPy), and
- one batched forward + backward pass of the same examples (a compiled
  `GradientTape` over the batch: the cost of a training step, which gives
  no per-example gradients).

Each repeat measures every method once, in turn; the script prints the
medians over repeats and their ratios, all measured in this one run, in
wall-clock time and in CPU time of this process (all threads). On a shared
machine the CPU-time ratios are the steadier figure: other processes
stretch wall-clock time unevenly.
Targets: "empirical" and "sampled" within 2x the batched pass per example
and at least 5x faster than the naive loop; "exact" within K x "sampled".

    python benchmarks/fisher_throughput.py [--repeats 5] [--examples 256]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--naive-examples", type=int, default=32)
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    num_classes = 10
    model = small_resnet(num_classes)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.examples, 32, 32, 3)).astype("float32")
    y = rng.integers(0, num_classes, args.examples)
    batch = args.batch_size

    @tf.function
    def batched_pass(x, y):
        with tf.GradientTape() as tape:
            log_p = tf.nn.log_softmax(model(x, training=False))
            score = tf.reduce_sum(tf.gather(log_p, y, batch_dims=1))
        return tape.gradient(score, variables)

    def batched():
        for start in range(0, args.examples, batch):
            stop = start + batch
            gradients = batched_pass(x[start:stop], y[start:stop])
        [g.numpy() for g in gradients]

    def naive():
        sums = [np.zeros(v.shape, "float32") for v in variables]
        for i in range(args.naive_examples):
            with tf.GradientTape() as tape:
                log_p = tf.nn.log_softmax(model(x[i : i + 1], training=False))
                score = log_p[0, y[i]]
            for total, gradient in zip(
                sums, tape.gradient(score, variables), strict=True
            ):
                total += gradient.numpy() ** 2

    def mode(name):
        def run():
            fisher.diagonal_fisher(
                model, (x, y), mode=name, batch_size=batch, seed=0
            )

        return run

    methods = {
        "batched forward+backward": (batched, args.examples),
        "naive eager loop": (naive, args.naive_examples),
        "empirical": (mode("empirical"), args.examples),
        "sampled (1 label)": (mode("sampled"), args.examples),
        "exact (K=10)": (mode("exact"), args.examples),
    }
    print(
        f"small ResNet, {model.count_params()} parameters, 32x32x3 inputs, "
        f"K={num_classes}, batch {batch}, {args.examples} examples, "
        f"{args.repeats} repeats, TensorFlow {tf.__version__}, "
        f"Keras {keras.__version__}"
    )
    for name, (run, _) in methods.items():
        start = time.perf_counter()
        run()  # traces and warms up
        print(f"  first call of {name}: {time.perf_counter() - start:.1f} s")
    clocks = {"wall-clock": time.perf_counter, "CPU": time.process_time}
    seconds = {(clock, name): [] for clock in clocks for name in methods}
    for _ in range(args.repeats):
        for name, (run, count) in methods.items():
            start = {clock: now() for clock, now in clocks.items()}
            run()
            for clock, now in clocks.items():
                elapsed = (now() - start[clock]) / count
                seconds[clock, name].append(elapsed)
    median = {key: statistics.median(t) for key, t in seconds.items()}

    print(
        f"\n{'method':<26}{'examples/s':>12}{'ms/example':>12}"
        f"{'CPU ms/example':>16}"
    )
    for name in methods:
        wall, cpu = median["wall-clock", name], median["CPU", name]
        print(
            f"{name:<26}{1 / wall:>12.1f}{1e3 * wall:>12.2f}{1e3 * cpu:>16.2f}"
        )
    for clock in clocks:
        per_example = {name: median[clock, name] for name in methods}
        batched_time = per_example["batched forward+backward"]
        naive_time = per_example["naive eager loop"]
        sampled_time = per_example["sampled (1 label)"]
        print(f"\nratios in {clock} time (per example, medians of this run):")
        for name in ("empirical", "sampled (1 label)"):
            print(
                f"  {name}: {per_example[name] / batched_time:.2f}x the "
                f"batched pass (target <= 2), "
                f"{naive_time / per_example[name]:.1f}x faster than the "
                "naive loop (target >= 5)"
            )
        print(
            f"  exact: {per_example['exact (K=10)'] / sampled_time:.2f}x "
            f"sampled (target <= K = {num_classes})"
        )


if __name__ == "__main__":
    main()
