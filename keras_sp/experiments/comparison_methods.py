"""The methods a comparison runs: each trains a target model on `(x, y)`.

A method takes the `Task` (the pretrained source model and the training
settings), its hyper-parameters (a dict, one point of its grid), a seed and
the training images, and returns the trained model and its backbone. Every
method starts from the same copy of the pretrained backbone with a new head
initialised by the seed, and sees the same batches in the same order for a
given seed.
"""

import dataclasses

import keras

import keras_sp
from keras_sp.experiments import training

__all__ = [
    "METHODS",
    "Task",
]


@dataclasses.dataclass(frozen=True)
class Task:
    """What every run of a comparison shares.

    Attributes:
        source: the pretrained source model, with layers "backbone" and
            "source_head".
        num_classes: target classes.
        iterations: SGD steps of a fine-tuning run.
        probe_iterations: SGD steps of the linear probe (the head alone).
        batch_size: batch size.
        learning_rate: initial learning rate (divided by 10 after 2/3).
        beta: L2 strength on the new head.
    """

    source: keras.Model
    num_classes: int
    iterations: int
    probe_iterations: int
    batch_size: int
    learning_rate: float
    beta: float


def target_model(task, seed):
    """A copy of the pretrained backbone with a new head seeded by `seed`."""
    keras.utils.set_random_seed(seed)
    pretrained = task.source.get_layer("backbone")
    backbone = keras.models.clone_model(pretrained)
    backbone.set_weights(pretrained.get_weights())
    head = keras.layers.Dense(task.num_classes, name="head")
    model = keras.Sequential([backbone, head], name="target")
    model.build((None,) + tuple(pretrained.input_shape[1:]))
    return model, backbone, head


def _fit(task, model, x, y, seed, iterations, learning_rate):
    training.fine_tune(
        model,
        training.training_dataset(x, y, task.batch_size, seed),
        iterations=iterations,
        learning_rate=learning_rate,
    )


def probe(task, params, seed, x, y):
    """Linear probe: the backbone frozen (BatchNormalization in inference
    mode), the head trained for `probe_iterations` steps."""
    model, backbone, head = target_model(task, seed)
    backbone.trainable = False
    keras_sp.regularize(
        model, "l2", alpha=0.0, beta=params["beta"], new_layers=[head]
    )
    _fit(task, model, x, y, seed, task.probe_iterations, task.learning_rate)
    return model, backbone


def penalized(kind):
    """Fine-tuning of the whole network with the penalty `kind` (eqs. 1-7)
    at `params["alpha"]`, `task.beta` on the head."""

    def train(task, params, seed, x, y):
        model, backbone, head = target_model(task, seed)
        keras_sp.regularize(
            model,
            kind,
            alpha=params["alpha"],
            beta=task.beta,
            new_layers=[head],
        )
        _fit(task, model, x, y, seed, task.iterations, task.learning_rate)
        return model, backbone

    train.__doc__ = penalized.__doc__.replace("`kind`", repr(kind))
    return train


# name -> (train function, the hyper-parameters of its grid)
METHODS = {
    "probe": (probe, ("beta",)),
    "l2": (penalized("l2"), ("alpha",)),
    "l2_sp": (penalized("l2_sp"), ("alpha",)),
    "l1_sp": (penalized("l1_sp"), ("alpha",)),
    "group_lasso_sp": (penalized("group_lasso_sp"), ("alpha",)),
}
