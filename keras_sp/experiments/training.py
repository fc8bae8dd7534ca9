"""The fine-tuning protocol shared by keras-sp's experiments."""

import keras
import numpy as np
import tensorflow as tf

from keras_sp import analysis

__all__ = [
    "accuracy",
    "accuracy_and_loss",
    "fine_tune",
    "training_dataset",
]


def training_dataset(x, y, batch_size, seed):
    """Shuffled, repeated batches of `(x, y)` as a `tf.data.Dataset`."""
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    dataset = dataset.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return dataset.repeat().batch(batch_size).prefetch(tf.data.AUTOTUNE)


def fine_tune(
    model,
    dataset,
    *,
    iterations,
    learning_rate=0.01,
    momentum=0.9,
    lr_drop_at=None,
    callbacks=(),
    verbose=0,
):
    """Fine-tunes `model` with SGD and momentum, dropping the rate once.

    The paper's protocol (section 4.2): SGD with momentum 0.9, the learning
    rate divided by 10 after `lr_drop_at` iterations (6000 of 9000 there),
    cross-entropy on logits. The penalties attached with
    `keras_sp.regularize` are part of the loss.

    Args:
        model: a built model whose output is logits.
        dataset: a repeated `tf.data.Dataset` of `(x, y)` batches.
        iterations: number of SGD steps.
        learning_rate: initial learning rate.
        momentum: SGD momentum.
        lr_drop_at: the step after which the rate is divided by 10 (default:
            two thirds of `iterations`, as 6000 of 9000).
        callbacks: Keras callbacks for `fit`.
        verbose: Keras verbosity.

    Returns:
        The `History` of the single `fit` epoch of `iterations` steps.
    """
    if lr_drop_at is None:
        lr_drop_at = (2 * iterations) // 3
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(lr_drop_at)], [learning_rate, learning_rate / 10]
    )
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model.fit(
        dataset,
        steps_per_epoch=int(iterations),
        epochs=1,
        shuffle=False,  # the dataset is already shuffled
        callbacks=list(callbacks),
        verbose=verbose,
    )


def accuracy(model, x, y, batch_size=512):
    """Top-1 accuracy of `model` (inference mode) on `(x, y)`."""
    scores = analysis.predict(model, x, batch_size)
    return float(np.mean(np.argmax(scores, axis=-1) == np.asarray(y)))


def accuracy_and_loss(model, x, y, batch_size=512):
    """Top-1 accuracy and mean cross-entropy of a logits model on `(x, y)`."""
    logits = analysis.predict(model, x, batch_size).astype("float64")
    logits -= logits.max(axis=-1, keepdims=True)
    log_probabilities = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    y = np.asarray(y)
    return (
        float(np.mean(np.argmax(logits, axis=-1) == y)),
        float(-np.mean(log_probabilities[np.arange(len(y)), y])),
    )
