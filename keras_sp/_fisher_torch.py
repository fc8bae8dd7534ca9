"""Per-example gradients for `keras_sp.fisher`, PyTorch backend.

`batch_functions` returns the two functions
`keras_sp.fisher.diagonal_fisher` needs from a backend (as
`_fisher_tensorflow` and `_fisher_jax` do): `log_probabilities(x)`, and
`squared_scores(x, classes, weights)`, the sum over the examples i and
rows r of a batch of `w_ir (d log f_{c_ir}(x_i) / dw)^2`.

The model runs as a function of its variables through
`model.stateless_call(trainable, non_trainable, x, training=False)`
(inference mode: BatchNormalization reads its moving statistics, which are
not updated). For one example, `torch.func.vjp` runs the forward pass once
and returns its pullback; `torch.func.vmap` of the pullback over one-hot
cotangents gives the gradients of the R scores log f_{c_ir}(x_i), and an
outer `torch.func.vmap` over the examples vectorises the whole.

Keras's PyTorch convolutions (`Conv1D/2D/3D`, `DepthwiseConv2D`,
`SeparableConv2D` and the transposed convolutions) ask whether their
inputs and kernels are contiguous in channels-last memory format
(`Tensor.is_contiguous(memory_format=...)`), which `torch.func.vmap` does
not implement ("NYI: querying is_contiguous inside of vmap for
memory_format other than torch.contiguous_format"). While the vectorised
function runs, `_ChannelsLastQueries`, a `torch.overrides.TorchFunctionMode`,
answers such queries with True and makes
`Tensor.contiguous(memory_format=...)` return its tensor unchanged: the
memory layout changes speed, never values.

When `torch.func` still cannot vectorise a model (an operation with no
batching rule, data-dependent Python control flow, `Tensor.item()`...),
`squared_scores` falls back, for that model, to a loop over the examples
of each batch and over their rows (`torch.func.vjp` per example, one
pullback per row), and warns once with the error `torch.func` raised. The
loop gives the same values, much more slowly.
"""

import warnings
import weakref

import torch
from keras import ops
from keras import tree

from keras_sp import _fisher_data as _data

__all__ = [
    "batch_functions",
]

# Compiled functions per model; they reach the model through a weak
# reference, so the cache never keeps a model alive.
_COMPILED = weakref.WeakKeyDictionary()


def _channels_last(memory_format):
    return memory_format not in (None, torch.contiguous_format)


class _ChannelsLastQueries(torch.overrides.TorchFunctionMode):
    """Channels-last contiguity queries that work inside `torch.func.vmap`.

    `is_contiguous(memory_format=<channels last>)` answers True, and
    `contiguous(memory_format=<channels last>)` returns its tensor.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.is_contiguous and _channels_last(
            kwargs.get("memory_format", args[1] if len(args) > 1 else None)
        ):
            return True
        if func is torch.Tensor.contiguous and _channels_last(
            kwargs.get("memory_format", args[1] if len(args) > 1 else None)
        ):
            return args[0]
        return func(*args, **kwargs)


class _Functions:
    def __init__(self, model_ref, outputs):
        self._model_ref = model_ref
        self._outputs = outputs
        self._vectorised = True

    def _state(self):
        model = self._model_ref()
        return (
            [v.value.detach() for v in model.trainable_variables],
            [v.value.detach() for v in model.non_trainable_variables],
        )

    def _log_p(self, trainable, non_trainable, x):
        model = self._model_ref()
        return self._outputs.log_probabilities(
            lambda: model.stateless_call(
                trainable, non_trainable, x, **self._outputs.inference
            )[0]
        )

    def log_probabilities(self, x):
        """log f_k(x) of a batch, (batch, K), float64 NumPy."""
        x = tree.map_structure(ops.convert_to_tensor, x)
        with torch.no_grad():
            values = self._log_p(*self._state(), x)
        return ops.convert_to_numpy(values).astype("float64")

    def _one(self, trainable, non_trainable, x_i, classes_i, weights_i):
        """For one example: sum_r w_r (d log f_{c_r}(x_i) / dw)^2."""
        x_i = tree.map_structure(lambda a: a[None], x_i)
        log_p, pullback = torch.func.vjp(
            lambda t: self._log_p(t, non_trainable, x_i)[0], trainable
        )
        cotangents = torch.nn.functional.one_hot(
            classes_i.long(), log_p.shape[-1]
        ).to(log_p.dtype)
        (gradients,) = torch.func.vmap(pullback)(cotangents)
        return [
            torch.tensordot(weights_i.to(g.dtype), g**2, dims=1)
            for g in gradients
        ]

    def _vectorised_sums(self, trainable, non_trainable, x, classes, weights):
        with _ChannelsLastQueries():
            terms = torch.func.vmap(
                lambda x_i, c_i, w_i: self._one(
                    trainable, non_trainable, x_i, c_i, w_i
                )
            )(x, classes, weights)
        return [term.sum(dim=0) for term in terms]

    def _pullback(self, trainable, non_trainable, x, index):
        """log f(x_index) and its pullback, for one example of `x`."""
        x_i = tree.map_structure(lambda a: a[index : index + 1], x)
        return torch.func.vjp(
            lambda t: self._log_p(t, non_trainable, x_i)[0], trainable
        )

    def _looped_sums(self, trainable, non_trainable, x, classes, weights):
        sums = [torch.zeros_like(t) for t in trainable]
        for i in range(classes.shape[0]):
            log_p, pullback = self._pullback(trainable, non_trainable, x, i)
            for r in range(classes.shape[1]):
                cotangent = torch.zeros_like(log_p)
                cotangent[classes[i, r]] = 1.0
                (gradients,) = pullback(cotangent)
                for total, g in zip(sums, gradients, strict=True):
                    total += weights[i, r].to(g.dtype) * g**2
        return sums

    def squared_scores(self, x, classes, weights):
        """`sum_i sum_r w_ir (d log f_{c_ir}(x_i) / dw)^2` per trainable
        variable (NumPy), for `classes` and `weights` of shape (B, R)."""
        arguments = (
            *self._state(),
            tree.map_structure(ops.convert_to_tensor, x),
            ops.convert_to_tensor(classes, "int32"),
            ops.convert_to_tensor(weights, "float32"),
        )
        if self._vectorised:
            try:
                sums = self._vectorised_sums(*arguments)
            except (RuntimeError, NotImplementedError) as error:
                sums = self._looped_sums(*arguments)
                self._vectorised = False
                warnings.warn(
                    "torch.func could not vectorise the per-example "
                    f"gradients of model '{self._model_ref().name}' "
                    f"({type(error).__name__}: {error}); they are computed "
                    "in a loop over examples instead (same values, slower).",
                    RuntimeWarning,
                    stacklevel=3,
                )
        else:
            sums = self._looped_sums(*arguments)
        return [ops.convert_to_numpy(s) for s in sums]


def batch_functions(model, variables, outputs):
    """The per-batch functions of `diagonal_fisher` for `model`, built once
    (`keras_sp._fisher_data.stateless_batch_functions`)."""
    return _data.stateless_batch_functions(
        _COMPILED, _Functions, model, variables, outputs, "PyTorch"
    )
