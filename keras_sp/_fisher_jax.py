"""Per-example gradients for `keras_sp.fisher`, JAX backend.

`batch_functions` returns the two functions `keras_sp.fisher.diagonal_fisher`
needs from a backend (as `_fisher_tensorflow` and `_fisher_torch` do):
`log_probabilities(x)`, and `squared_scores(x, classes, weights)`, the sum
over the examples i and rows r of a batch of
`w_ir (d log f_{c_ir}(x_i) / dw)^2`.

The model runs as a pure function of its variables through
`model.stateless_call(trainable, non_trainable, x, training=False)`
(inference mode: BatchNormalization reads its moving statistics, which are
not updated). For one example, `jax.vjp` runs the forward pass once and
returns its pullback; `jax.vmap` of the pullback over one-hot cotangents
gives the gradients of the R scores log f_{c_ir}(x_i); an outer `jax.vmap`
over the examples vectorises the whole, and `jax.jit` compiles it (once
per model, settings and batch shape).
"""

import weakref

import jax
import jax.numpy as jnp
import numpy as np
from keras import tree

from keras_sp import _fisher_data as _data

__all__ = [
    "batch_functions",
]

# Compiled functions per model; they reach the model through a weak
# reference, so the cache never keeps a model alive.
_COMPILED = weakref.WeakKeyDictionary()


class _Functions:
    def __init__(self, model_ref, outputs):
        def log_probabilities(trainable, non_trainable, x):
            return outputs.log_probabilities(
                lambda: model_ref().stateless_call(
                    trainable, non_trainable, x, **outputs.inference
                )[0]
            )

        def squared_scores(trainable, non_trainable, x, classes, weights):
            def one(x_i, classes_i, weights_i):
                x_i = tree.map_structure(lambda a: a[None], x_i)
                log_p, pullback = jax.vjp(
                    lambda t: log_probabilities(t, non_trainable, x_i)[0],
                    trainable,
                )
                cotangents = jax.nn.one_hot(
                    classes_i, log_p.shape[-1], dtype=log_p.dtype
                )
                (gradients,) = jax.vmap(pullback)(cotangents)
                return [
                    jnp.tensordot(weights_i.astype(g.dtype), g**2, axes=1)
                    for g in gradients
                ]

            terms = jax.vmap(one)(x, classes, weights)
            return [jnp.sum(term, axis=0) for term in terms]

        self._model_ref = model_ref
        self._log_probabilities = jax.jit(log_probabilities)
        self._squared_scores = jax.jit(squared_scores)

    def _state(self):
        model = self._model_ref()
        return (
            [v.value for v in model.trainable_variables],
            [v.value for v in model.non_trainable_variables],
        )

    def log_probabilities(self, x):
        """log f_k(x) of a batch, (batch, K), float64 NumPy."""
        values = self._log_probabilities(*self._state(), x)
        return np.asarray(values, "float64")

    def squared_scores(self, x, classes, weights):
        """`sum_i sum_r w_ir (d log f_{c_ir}(x_i) / dw)^2` per trainable
        variable (NumPy), for `classes` and `weights` of shape (B, R)."""
        sums = self._squared_scores(
            *self._state(),
            x,
            jnp.asarray(classes, "int32"),
            jnp.asarray(weights, "float32"),
        )
        return [np.asarray(s) for s in sums]


def batch_functions(model, variables, outputs):
    """The per-batch functions of `diagonal_fisher` for `model`, built once
    (`keras_sp._fisher_data.stateless_batch_functions`)."""
    return _data.stateless_batch_functions(
        _COMPILED, _Functions, model, variables, outputs, "JAX"
    )
