"""The fine-tuning protocol shared by keras-sp's experiments."""

import keras
import numpy as np
import tensorflow as tf

import keras_sp
from keras_sp.callbacks import StopOnNonFinite
from keras_sp.experiments.measures import cross_entropy
from keras_sp.experiments.measures import predict

__all__ = [
    "StepDecayWithWarmup",
    "accuracy",
    "accuracy_and_loss",
    "fine_tune",
    "training_dataset",
]


@keras.saving.register_keras_serializable(package="keras_sp")
class StepDecayWithWarmup(keras.optimizers.schedules.LearningRateSchedule):
    """A learning rate divided by 10 once, after an optional linear warm-up.

    `lr(t) = learning_rate * min(1, (t + 1) / warmup) * (0.1 if t >= drop_at
    else 1)` at step t (counted from 0). With `warmup = 0` this is the
    paper's schedule: constant, then divided by 10 after `drop_at` steps
    (6000 of 9000).

    Args:
        learning_rate: the initial (peak) learning rate.
        drop_at: the step from which the rate is divided by 10.
        warmup: steps of linear warm-up (0 for none).

    Example:

    >>> schedule = StepDecayWithWarmup(0.1, drop_at=6, warmup=4)
    >>> [round(float(schedule(t)), 3) for t in (0, 3, 5, 6)]
    [0.025, 0.1, 0.1, 0.01]
    """

    def __init__(self, learning_rate, drop_at, warmup=0):
        self.learning_rate = float(learning_rate)
        self.drop_at = int(drop_at)
        self.warmup = int(warmup)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        rate = keras.ops.where(
            step >= self.drop_at,
            self.learning_rate / 10,
            self.learning_rate,
        )
        if self.warmup > 0:
            rate = rate * keras.ops.minimum(1.0, (step + 1) / self.warmup)
        return rate

    def get_config(self):
        return {
            "learning_rate": self.learning_rate,
            "drop_at": self.drop_at,
            "warmup": self.warmup,
        }


def light_pipeline(dataset, buffer=2):
    """`dataset` batched ahead by a fixed `buffer`, without tf.data's
    autotuner.

    For the in-memory few-shot pipelines, whose batches cost little to
    make. The autotuner's background thread makes tearing down each
    iterator wait about a second (measured: 1.0 s against 2 ms without
    it), paid once per fine-tuning run, during the next `fit`.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return dataset.prefetch(buffer).with_options(options)


def training_dataset(x, y, batch_size, seed):
    """Shuffled, repeated batches of `(x, y)` as a `tf.data.Dataset`."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return light_pipeline(dataset.repeat().batch(batch_size))


def fine_tune(
    model,
    dataset,
    *,
    iterations,
    learning_rate=0.01,
    momentum=0.9,
    lr_drop_at=None,
    warmup_iterations=0,
    callbacks=(),
    verbose=0,
    run_eagerly=False,
    proximal=False,
):
    """Fine-tunes `model` with SGD and momentum, dropping the rate once.

    The paper's protocol (section 4.2): SGD with momentum 0.9, the learning
    rate divided by 10 after `lr_drop_at` iterations (6000 of 9000 there),
    cross-entropy on logits. The penalties attached with
    `keras_sp.regularize` are part of the loss. An optional linear warm-up
    of the learning rate (`StepDecayWithWarmup`) keeps a fresh head with
    large gradients from wrecking the pretrained weights in the first steps.

    Args:
        model: a built model whose output is logits.
        dataset: a repeated `tf.data.Dataset` of `(x, y)` batches.
        iterations: number of SGD steps.
        learning_rate: initial learning rate.
        momentum: SGD momentum.
        lr_drop_at: the step after which the rate is divided by 10 (default:
            two thirds of `iterations`, as 6000 of 9000).
        warmup_iterations: steps of linear learning-rate warm-up (0: none,
            as in the paper).
        callbacks: Keras callbacks for `fit`. A
            `keras_sp.callbacks.StopOnNonFinite` is added unless one is
            given: a NaN or infinite loss raises `FloatingPointError`.
        verbose: Keras verbosity.
        run_eagerly: run the train steps eagerly instead of tracing a graph
            (much faster for a few steps of a large model, e.g. dry runs).
        proximal: wrap the SGD in `keras_sp.Proximal`, for penalties
            attached with `regularize(..., proximal=True)`.

    Returns:
        The `History` of the single `fit` epoch of `iterations` steps.
    """
    if lr_drop_at is None:
        lr_drop_at = (2 * iterations) // 3
    schedule = StepDecayWithWarmup(
        learning_rate, drop_at=lr_drop_at, warmup=warmup_iterations
    )
    optimizer = keras.optimizers.SGD(schedule, momentum=momentum)
    if proximal:
        optimizer = keras_sp.Proximal(optimizer)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        run_eagerly=run_eagerly,
    )
    return model.fit(
        dataset,
        steps_per_epoch=int(iterations),
        epochs=1,
        shuffle=False,  # the dataset is already shuffled
        callbacks=_with_guard(callbacks),
        verbose=verbose,
    )


def _with_guard(callbacks):
    """`callbacks` with a `StopOnNonFinite` at the end unless it has one.

    The loss is checked every step; the weights are copied every 100 steps
    only, which keeps the cost low for the full-size networks (the run
    raises anyway, and its weights are not used).
    """
    callbacks = list(callbacks)
    if not any(isinstance(c, StopOnNonFinite) for c in callbacks):
        callbacks.append(StopOnNonFinite(snapshot_every=100))
    return callbacks


def accuracy(model, x, y, batch_size=512):
    """Top-1 accuracy of `model` (inference mode) on `(x, y)`."""
    scores = predict(model, x, batch_size)
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y)))


def accuracy_and_loss(model, x, y, batch_size=512):
    """Top-1 accuracy and mean cross-entropy of a logits model on `(x, y)`."""
    logits = predict(model, x, batch_size)
    y = np.asarray(y)
    return (
        float(np.mean(np.argmax(logits, axis=-1) == y)),
        float(np.mean(cross_entropy(logits, y))),
    )
