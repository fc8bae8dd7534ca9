"""Gradients and arrays on whichever Keras backend the tests run under.

The library's tests run once per backend (`KERAS_BACKEND` = tensorflow, jax
or torch); these helpers keep the tests themselves backend-neutral.
"""

import keras
import numpy as np


def to_numpy(value):
    """A NumPy copy of a tensor, a variable or an array."""
    if isinstance(value, keras.Variable):
        value = value.value
    return np.array(keras.ops.convert_to_numpy(value))


def value_and_gradients(function, variables):
    """`(float(function()), [d function / d variable])` as NumPy arrays.

    `function` takes no argument and returns a scalar computed from the
    Keras `variables` (their current values); a variable it does not use
    gets a zero gradient.
    """
    variables = list(variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = function()
        grads = tape.gradient(value, [v.value for v in variables])
    elif backend == "jax":
        import jax

        def stateless(values):
            mapping = list(zip(variables, values, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                return function()

        value, grads = jax.value_and_grad(stateless)(
            [v.value for v in variables]
        )
    elif backend == "torch":
        import torch

        value = function()
        grads = torch.autograd.grad(
            value, [v.value for v in variables], allow_unused=True
        )
    else:
        raise ValueError(f"Unsupported backend: {backend!r}")
    return float(to_numpy(value)), [
        np.zeros(v.shape) if g is None else to_numpy(g)
        for v, g in zip(variables, grads, strict=True)
    ]


def total(tensors):
    """The sum of a list of scalar tensors (such as `model.losses`)."""
    return float(sum(to_numpy(t) for t in tensors))
