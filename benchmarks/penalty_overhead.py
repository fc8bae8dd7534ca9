"""Train-step time with the L2-SP penalty attached, relative to none.

ResNet50 (weights=None), 224 px, batch 16, SGD momentum 0.9. Two copies of
the same model, one with `keras_sp.regularize(model, "l2_sp", ...)`, are
stepped alternately (one step each, `rounds` times) after a warm-up, so
that both see the same machine load; the ratio of their median step times
is reported, for wall-clock time and for this process's CPU time (less
sensitive to other processes on a shared machine). The paper reports under
1% extra FLOPs for L2-SP.

Usage:

    python benchmarks/penalty_overhead.py [--rounds 15] [--size 224]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sp  # noqa: E402


def build(size, penalty):
    keras.utils.set_random_seed(0)
    base = keras.applications.ResNet50(
        weights=None,
        include_top=False,
        pooling="avg",
        input_shape=(size, size, 3),
    )
    head = keras.layers.Dense(100, name="head")
    model = keras.Sequential([base, head])
    model.build((None, size, size, 3))
    if penalty:
        keras_sp.regularize(
            model, "l2_sp", alpha=0.1, beta=0.01, new_layers=[head]
        )
    model.compile(
        optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch, args.size, args.size, 3)).astype("float32")
    y = rng.integers(0, 100, size=args.batch)
    models = {"none": build(args.size, False), "l2_sp": build(args.size, True)}
    print(
        f"penalised variables: "
        f"{len(keras_sp.penalties.attached_penalties(models['l2_sp']))}"
    )
    for model in models.values():
        for _ in range(args.warmup):
            model.train_on_batch(x, y)
    clocks = {"wall": time.perf_counter, "cpu": time.process_time}
    times = {(clock, name): [] for clock in clocks for name in models}
    for round_ in range(args.rounds):
        order = list(models) if round_ % 2 == 0 else list(models)[::-1]
        for name in order:
            start = {clock: read() for clock, read in clocks.items()}
            models[name].train_on_batch(x, y)
            for clock, read in clocks.items():
                times[clock, name].append(read() - start[clock])
    for clock in clocks:
        none = np.array(times[clock, "none"])
        l2_sp = np.array(times[clock, "l2_sp"])
        print(
            f"{clock:4s} median step: none {np.median(none) * 1000:8.1f} ms, "
            f"l2_sp {np.median(l2_sp) * 1000:8.1f} ms; ratio of medians "
            f"{np.median(l2_sp) / np.median(none):.4f}, median of paired "
            f"ratios {np.median(l2_sp / none):.4f}"
        )
    print(
        f"ResNet50, {args.size} px, batch {args.batch}, {args.rounds} "
        "alternating rounds after warm-up"
    )


if __name__ == "__main__":
    main()
