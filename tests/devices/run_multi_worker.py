"""One worker of a two-worker `MultiWorkerMirroredStrategy` fit of an L2-SP
model (or, with "plain", the same model without penalty) on 127.0.0.1.
Arguments: the worker's index, "l2_sp" or "plain", and the two ports. Prints
the loss per epoch as JSON; the traceback of a failure goes to stderr
(read by `multi_worker_test.py`).

Run with KERAS_BACKEND=tensorflow; TF_CONFIG is set here, before
TensorFlow initialises, hence a subprocess per worker.
"""

import json
import os
import sys

index, kind, *ports = sys.argv[1:]
os.environ["TF_CONFIG"] = json.dumps(
    {
        "cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
        "task": {"type": "worker", "index": int(index)},
    }
)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sp  # noqa: E402


def main():
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 6)).astype("float32")
    y = rng.integers(0, 3, size=32)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh", name="c1"),
                keras.layers.Dense(3, name="head"),
            ],
            name="net",
        )
        if kind == "l2_sp":
            keras_sp.regularize(
                model, "l2_sp", alpha=0.5, beta=0.05, new_layers=["head"]
            )
        model.compile(
            optimizer=keras.optimizers.SGD(0.1),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(8)
    history = model.fit(dataset, epochs=2, shuffle=False, verbose=0)
    print(json.dumps(history.history["loss"]))


if __name__ == "__main__":
    main()
