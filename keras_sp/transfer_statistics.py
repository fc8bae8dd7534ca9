"""Statistics of the pretrained model computed once, before fine-tuning.

Two feature-space methods weight their penalty with a statistic of the
pretrained network on the target training data:

- DELTA (Li et al., ICLR 2019) weights the distance between the feature
  maps of the fine-tuned and the pretrained backbone by a *channel
  attention*: how much the target loss grows when a channel is set to zero
  (`channel_attention`).
- Co-Tuning (You et al., NeurIPS 2020) trains the source head towards
  p(y_s | y_t), the source model's predictions averaged over the target
  training images of each target class (`category_relationship`).

Both return NumPy arrays, computed in inference mode (BatchNormalization
uses its moving statistics, Dropout is off) without changing any weight of
the model, on the TensorFlow, JAX and PyTorch backends of Keras.

Reference:
    Li, Xiong, Wang, Rao, Liu, Huan. "DELTA: DEep Learning Transfer using
    Feature Map with Attention for Convolutional Networks". ICLR 2019.
    You, Kou, Jiang, Wang, Long. "Co-Tuning for Transfer Learning".
    NeurIPS 2020.
"""

import contextlib
import math

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sp import _channel_zeroing
from keras_sp import _fisher_data as _data
from keras_sp import _fisher_outputs as _outputs
from keras_sp._checks import check_positive_int

__all__ = [
    "NORMALIZATIONS",
    "category_relationship",
    "channel_attention",
]

NORMALIZATIONS = ("standardized_softmax", "softmax", None)

# The reference code divides the standardised loss increases by 5 before
# the softmax (DELTA train.py, line 115).
STANDARDIZED_TEMPERATURE = 5.0

# Tolerance on the row sums of outputs taken as probabilities.
_PROBABILITY_TOLERANCE = 1e-3

# Argument checks.


def _check_batch_size(batch_size):
    check_positive_int("batch_size", batch_size)
    return int(batch_size)


def _check_verbose(verbose):
    if verbose == "auto" and isinstance(verbose, str):
        return 1
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            "`verbose` must be 'auto', 0, 1 or 2. Received: "
            f"verbose={verbose!r}"
        )
    return verbose


def _check_model(model, argument):
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{argument}` must be a keras.Model. Received: {argument} of "
            f"type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`{argument}` is not built: call it on data or "
            f"`{argument}.build(input_shape)` first. Received: "
            f"{argument}={model.name!r}"
        )


def _examples(model, x, y, argument):
    """The number of examples of `x`, checked against `y` and the model."""
    leaves = tree.flatten(x)
    if not leaves or any(np.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError(
            f"`x` must be an array (or a list or dict of arrays) of "
            f"examples along its first axis. Received: x={x!r}"
        )
    counts = sorted({int(np.shape(leaf)[0]) for leaf in leaves})
    if len(counts) != 1:
        raise ValueError(
            "Every array in `x` must hold the same number of examples. "
            f"Received: lengths {counts}"
        )
    count = counts[0]
    if count == 0:
        raise ValueError(
            f"`x` is empty: the {argument} is an average over examples. "
            "Received: x with 0 examples"
        )
    if np.ndim(y) == 0 or np.shape(y)[0] != count:
        raise ValueError(
            f"`y` must hold one label per example of `x` ({count} "
            f"examples). Received: y of shape {tuple(np.shape(y))}"
        )
    _data.check_input_shapes(model, x, "`x`")
    return count


def _class_indices(y, num_classes, what):
    """Integer class indices in [0, num_classes) from indices or one-hot
    rows; `num_classes` None takes it from the labels."""
    y = _data.to_numpy(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise ValueError(
            "`y` must hold class indices or one-hot rows. Received: y of "
            f"dtype {y.dtype}"
        )
    if y.ndim == 2 and y.shape[1] > 1:
        if num_classes is not None and y.shape[1] != num_classes:
            raise ValueError(
                f"One-hot `y` must have {num_classes} columns ({what}). "
                f"Received: y of shape {y.shape}"
            )
        if not np.all((y == 0) | (y == 1)) or not np.all(y.sum(axis=1) == 1):
            raise ValueError(
                f"`y` of shape {y.shape} must be one-hot rows (one 1 per "
                "row, zeros elsewhere). Received: y with row sums in "
                f"[{y.sum(axis=1).min()}, {y.sum(axis=1).max()}]"
            )
        return np.argmax(y, axis=1), y.shape[1]
    if y.ndim == 2:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            "`y` must have shape (n,), (n, 1) or (n, classes) one-hot. "
            f"Received: y of shape {y.shape}"
        )
    bad = ~np.isfinite(y) | (y != np.round(y))
    if np.any(bad):
        raise ValueError(
            "`y` must hold integer class indices. Received: y with values "
            f"such as {y[bad][:3].tolist()}"
        )
    y = y.astype("int64")
    if num_classes is None:
        num_classes = max(int(y.max()) + 1, 1)
    bad = (y < 0) | (y >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"`y` must hold class indices in [0, {num_classes}) ({what}). "
            f"Received: y with values such as {np.unique(y[bad])[:5].tolist()}"
        )
    return y, num_classes


@contextlib.contextmanager
def _no_gradients():
    """No autograd graph on PyTorch (the statistics need no gradient)."""
    if keras.backend.backend() == "torch":
        import torch

        with torch.no_grad():
            yield
    else:
        yield


def _progbar(target, verbose, unit_name):
    if not verbose:
        return None
    return keras.utils.Progbar(target, verbose=verbose, unit_name=unit_name)


def _batches(model, x, y, batch_size):
    """Yields `(x, y, count)` NumPy batches in data order."""
    yield from _data.batches(model, (x, y), batch_size, None)


# DELTA's channel attention.


class _Loss:
    """`forward(x)` calls the model in inference mode; `__call__(y, out)`
    is the loss of its result. The default loss is the cross-entropy from
    the log-softmax of the logits, read before a final softmax as
    `diagonal_fisher` does (no probability clipped at 1e-7)."""

    def __init__(self, model, loss):
        if loss is not None and not callable(loss):
            raise ValueError(
                "`loss` must be None or a callable `loss(y_true, y_pred)`, "
                f"such as a keras.losses.Loss. Received: loss={loss!r}"
            )
        self.model = model
        self.loss = loss
        self.outputs = _outputs.Outputs(model, None)

    def forward(self, x):
        if self.loss is not None:
            return self.model(x, training=False)
        return self.outputs.log_probabilities(
            lambda: self.model(x, training=False)
        )

    def __call__(self, y, outputs):
        if self.loss is not None:
            return self.loss(y, outputs)
        return -ops.take_along_axis(outputs, ops.expand_dims(y, 1), axis=1)


def _mean(value):
    return float(ops.convert_to_numpy(ops.mean(value)))


def _target_labels(model, outputs, y):
    """The class indices of `y`, checked against the model's outputs."""
    shape = tuple(outputs.shape)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(
            "The default loss (sparse categorical cross-entropy) needs a "
            "model whose output has shape (batch, classes), classes >= 2; "
            "pass `loss` for other outputs. Received: model "
            f"{model.name!r} with output shape {shape}"
        )
    indices, _ = _class_indices(
        y, shape[1], f"the model has {shape[1]} outputs"
    )
    return indices.astype("int32")


def _normalized(increase, normalize):
    if normalize is None:
        return increase
    if normalize == "standardized_softmax":
        std = np.std(increase)
        if std == 0:
            return np.full_like(increase, 1.0 / increase.size)
        increase = (increase - np.mean(increase)) / std
        increase = increase / STANDARDIZED_TEMPERATURE
    shifted = np.exp(increase - np.max(increase))
    return shifted / np.sum(shifted)


def channel_attention(
    model,
    x,
    y,
    layers,
    *,
    loss=None,
    normalize="standardized_softmax",
    batch_size=32,
    verbose="auto",
):
    """DELTA's channel attention: the loss increase when a channel is zeroed.

    For each layer l of `layers` and each channel j of its channel-last
    output, the increase of the target loss over the m examples of
    `(x, y)` when channel j of that output is set to zero (everything
    downstream recomputed):

        d_j = 1/m sum_i [L(f(x_i; w0 with channel j zeroed), y_i)
                         - L(f(x_i; w0), y_i)]

    then normalised over the channels of the layer. `normalize`:

    - `"standardized_softmax"` (default, as the public code of the paper,
      lixingjian/DELTA train.py lines 112-115, and TLlib's DELTA example):
      `a = softmax((d - mean(d)) / std(d) / 5)`, std the population
      standard deviation; negative increases are kept (not clipped). All
      d_j equal (std = 0, or a single channel) gives a = 1/C.
    - `"softmax"`: `a = softmax(d)`, the paper's formula.
    - None: the increases d themselves.

    The attention sums to 1 over the channels of a layer; the reference
    DELTA loss multiplies it by the number of channels C (its mean weight
    is 1).

    The model runs in inference mode (BatchNormalization uses its moving
    statistics, Dropout is off), and no weight changes: the channel is
    zeroed by multiplying the layer's output by a mask while the layer's
    call is replaced on the instance for the duration of the computation.
    The public code zeroes the j-th filter of a convolution without bias,
    which is the same. A layer called at several places in the model has
    each of its outputs zeroed. Every (batch, channel) pair costs one pass
    through the layers downstream of the zeroed one: the outputs of the
    others are kept from the batch's first pass and reused (they hold the
    batch's activations in memory; a larger `batch_size` means fewer
    passes). The reference code uses a few batches of the target training
    set (4 batches of 32 images in lixingjian/DELTA, 10 in TLlib); pass such
    a subset as `(x, y)`.

    Args:
        model: a built `keras.Model` mapping inputs to target logits: the
            pretrained backbone with a classifier trained on the target
            data with the backbone frozen.
        x: the target training inputs: an array (NumPy, TensorFlow, JAX or
            PyTorch), or a list or dict of arrays for several inputs.
        y: their labels: class indices (n,) or (n, 1), or one-hot rows
            (n, classes), for the default loss; anything `loss` takes
            otherwise.
        layers: names (or layer objects) of layers of `model`, looked up in
            nested models too. Each must output one channel-last feature
            map: (batch, h, w, channels), (batch, channels) or another rank
            with the channels last.
        loss: None (default): sparse categorical cross-entropy from the
            logits (from probabilities when the model's output layer ends
            with a softmax). Otherwise a callable `loss(y_true, y_pred)`
            returning per-example losses or their batch mean, such as a
            `keras.losses.Loss` with its default reduction.
        normalize: `"standardized_softmax"`, `"softmax"` or None.
        batch_size: examples per forward pass.
        verbose: `"auto"` (1), 0 (silent), 1 (progress bar over the
            forward passes) or 2 (one line at the end).

    Returns:
        A dict `{layer name: np.ndarray of shape (channels,), float32}`, in
        the order of `layers`.

    Example:

    >>> import keras, numpy as np, keras_sp
    >>> inputs = keras.Input((4,))
    >>> hidden = keras.layers.Dense(3, activation="relu", name="hidden")(inputs)
    >>> model = keras.Model(inputs, keras.layers.Dense(2)(hidden))
    >>> x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    >>> y = np.arange(16) % 2
    >>> attention = keras_sp.transfer_statistics.channel_attention(
    ...     model, x, y, ["hidden"], verbose=0)
    >>> attention["hidden"].shape, round(float(attention["hidden"].sum()), 5)
    ((3,), 1.0)

    Reference:
        Li et al., "DELTA", ICLR 2019, section 3 (channel attention).
    """
    _check_model(model, "model")
    if not isinstance(normalize, (str, type(None))) or (
        normalize not in NORMALIZATIONS
    ):
        raise ValueError(
            f"`normalize` must be one of {list(NORMALIZATIONS)}. Received: "
            f"normalize={normalize!r}"
        )
    batch_size = _check_batch_size(batch_size)
    verbose = _check_verbose(verbose)
    resolved = _channel_zeroing.resolve_layers(model, layers)
    count = _examples(model, x, y, "channel attention")
    loss_fn = _Loss(model, loss)
    intervention = _channel_zeroing.ChannelZeroing(resolved, model)
    sums, progbar, done, offset, indices = None, None, 0, 0, None
    batch_count = math.ceil(count / batch_size)
    with _no_gradients(), intervention.active():
        for x_batch, y_batch, size in _batches(model, x, y, batch_size):
            x_batch = tree.map_structure(ops.convert_to_tensor, x_batch)
            intervention.zeroed = None
            intervention.forget()
            outputs = loss_fn.forward(x_batch)
            if sums is None:
                channels = _channel_zeroing.channel_counts(
                    resolved, intervention.shapes
                )
                sums = [np.zeros(c, "float64") for c in channels]
                progbar = _progbar(batch_count * sum(channels), verbose, "step")
                if loss is None:
                    indices = _target_labels(model, outputs, y)
            if indices is not None:
                y_batch = indices[offset : offset + size]
            offset += size
            y_batch = ops.convert_to_tensor(y_batch)
            base = _mean(loss_fn(y_batch, outputs))
            for index, total in enumerate(sums):
                for channel in range(total.size):
                    intervention.zeroed = (index, channel)
                    outputs = loss_fn.forward(x_batch)
                    total[channel] += (
                        _mean(loss_fn(y_batch, outputs)) - base
                    ) * size
                    done += 1
                    if progbar is not None:
                        progbar.update(done)
            intervention.zeroed = None
    attention = {}
    for layer, total in zip(resolved, sums, strict=True):
        increase = total / count
        if not np.all(np.isfinite(increase)):
            raise ValueError(
                f"The loss increases of layer '{layer.name}' are not finite: "
                "the model's loss overflowed on this data. Received: x on "
                "which the loss is not finite"
            )
        attention[layer.name] = _normalized(increase, normalize).astype(
            "float32"
        )
    return attention


# Co-Tuning's category relationship.


def _probabilities(model, outputs, from_logits, temperature):
    shape = tuple(outputs.shape)
    if len(shape) != 2 or shape[1] < 2:
        raise ValueError(
            "`source_model` must output (batch, source classes), with at "
            f"least 2 source classes. Received: source_model "
            f"{model.name!r} with output shape {shape}"
        )
    if from_logits:
        outputs = ops.cast(outputs, "float32") / temperature
        return ops.convert_to_numpy(ops.softmax(outputs, axis=-1))
    p = ops.convert_to_numpy(ops.cast(outputs, "float32"))
    sums = p.sum(axis=1)
    if np.any(p < 0) or np.any(np.abs(sums - 1) > _PROBABILITY_TOLERANCE):
        raise ValueError(
            "With from_logits=False the outputs of `source_model` must be "
            "probabilities (non-negative, rows summing to 1); pass "
            "from_logits=True for logits. Received: outputs with minimum "
            f"{p.min():.4g} and row sums in [{sums.min():.4g}, "
            f"{sums.max():.4g}]"
        )
    return p


def category_relationship(
    source_model,
    x,
    y,
    num_classes=None,
    *,
    from_logits=True,
    temperature=1.0,
    batch_size=32,
    verbose="auto",
):
    """Co-Tuning's category relationship p(y_s | y_t), the direct approach.

    The average, over the target training images x_i of each target class
    t, of the source model's predicted distribution over source classes:

        p(y_s | y_t = t) = 1/|{i: y_i = t}| sum_{i: y_i = t} p(y_s | x_i)

    with `p(y_s | x) = softmax(source_logits(x) / temperature)`. Each row is
    an average of distributions, so it sums to 1. This is the paper's
    *direct approach*, as TLlib computes it (tllib/regularization/
    co_tuning.py, `Relationship.get_category_relationship`: softmax of the
    source logits, mean per target class). The original code
    (thuml/CoTuning, module/relationship_learning.py,
    `direct_relationship_learning`) scales the logits by 0.8840456604957581
    first (`temperature=1 / 0.8840456604957581`, about 1.1312, reproduces
    it) and averages over the training and validation images together.

    The paper's *calibrated* variant (the default of the original code,
    `relationship_learning`) is not implemented: it fits a multinomial
    logistic regression without intercept from p(y_s | x) to the target
    labels (its regularisation chosen on a validation set), calibrates a
    temperature on the validation set, and inverts p(y_t | y_s) with Bayes'
    rule and the source marginal p(y_s).

    The model runs in inference mode and no weight changes. Use the
    target images without random augmentation (the reference code uses the
    validation transform here).

    Args:
        source_model: a built `keras.Model` mapping target inputs to the
            source classifier's outputs (batch, source classes): the
            pretrained backbone with its source head.
        x: the target training inputs: an array, or a list or dict of
            arrays for several inputs.
        y: their target labels: class indices (n,) or (n, 1), or one-hot
            rows (n, target classes).
        num_classes: the number of target classes; None takes the largest
            label plus one (one-hot `y`: its width). Every class needs at
            least one example.
        from_logits: True (default): `source_model` outputs logits. False:
            it outputs probabilities (rows summing to 1), used as they are.
        temperature: positive number dividing the logits before the
            softmax (from_logits=True only); 1 by default.
        batch_size: examples per forward pass.
        verbose: `"auto"` (1), 0 (silent), 1 (progress bar over the
            examples) or 2 (one line at the end).

    Returns:
        A float32 array of shape (target classes, source classes) whose
        rows sum to 1.

    Example:

    >>> import keras, numpy as np, keras_sp
    >>> source = keras.Sequential([keras.Input((3,)), keras.layers.Dense(5)])
    >>> x = np.random.default_rng(0).normal(size=(6, 3)).astype("float32")
    >>> relationship = keras_sp.transfer_statistics.category_relationship(
    ...     source, x, np.array([0, 1, 2, 0, 1, 2]), verbose=0)
    >>> relationship.shape, np.allclose(relationship.sum(axis=1), 1)
    ((3, 5), True)

    Reference:
        You et al., "Co-Tuning for Transfer Learning", NeurIPS 2020,
        section 4 (category relationship, direct approach).
    """
    _check_model(source_model, "source_model")
    if not isinstance(from_logits, bool):
        raise ValueError(
            "`from_logits` must be True or False. Received: "
            f"from_logits={from_logits!r}"
        )
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not math.isfinite(temperature)
        or temperature <= 0
    ):
        raise ValueError(
            "`temperature` must be a positive finite number. Received: "
            f"temperature={temperature!r}"
        )
    if not from_logits and temperature != 1:
        raise ValueError(
            "`temperature` divides logits: it applies with "
            "from_logits=True only. Received: from_logits=False, "
            f"temperature={temperature!r}"
        )
    if num_classes is not None:
        check_positive_int("num_classes", num_classes, " or None")
    batch_size = _check_batch_size(batch_size)
    verbose = _check_verbose(verbose)
    count = _examples(source_model, x, y, "category relationship")
    what = f"num_classes={num_classes}"
    if num_classes is None:
        what = "num_classes=None: the largest label plus one"
    labels, num_classes = _class_indices(y, num_classes, what)
    members = np.bincount(labels, minlength=num_classes)
    empty = np.flatnonzero(members == 0)
    if empty.size:
        raise ValueError(
            "p(y_s | y_t) is an average over the examples of each target "
            f"class, and {empty.size} of the {num_classes} target classes "
            f"have none: classes {empty[:10].tolist()}. Received: y with "
            f"no example of class {int(empty[0])}"
        )
    sums = None
    progbar = _progbar(count, verbose, "example")
    offset = 0
    with _no_gradients():
        for x_batch, _, size in _batches(source_model, x, y, batch_size):
            x_batch = tree.map_structure(ops.convert_to_tensor, x_batch)
            outputs = source_model(x_batch, training=False)
            p = _probabilities(source_model, outputs, from_logits, temperature)
            if sums is None:
                sums = np.zeros((num_classes, p.shape[1]), "float64")
            np.add.at(sums, labels[offset : offset + size], p)
            offset += size
            if progbar is not None:
                progbar.update(offset)
    if not np.all(np.isfinite(sums)):
        raise ValueError(
            "The source model's predictions are not finite on this data. "
            "Received: x on which source_model's outputs are not finite"
        )
    return (sums / members[:, None]).astype("float32")
