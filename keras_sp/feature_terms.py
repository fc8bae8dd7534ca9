"""The feature-space transfer regularisers that followed L2-SP.

Each term is a small Keras layer that `keras_sp.FeatureRegularized` calls
with what one training step's forward pass produced (feature maps of the
fine-tuned network and of a frozen copy of the pretrained one, the outputs
of the source classifier) and the labels; it returns one scalar added to
the loss. Arrays a term needs (DELTA's channel attention, Co-Tuning's
category relationship) are non-trainable variables, saved with the model
and never put in a config.

Shapes: feature maps are channels-last, `(batch, ..., channels)`.
"""

import keras
import numpy as np
from keras import ops

from keras_sp._checks import check_array
from keras_sp._checks import check_coefficient

__all__ = ["BSS", "DELTA", "CoTuning", "FeatureTerm", "LwF"]


def _check_names(argument, value):
    """`value` (one layer, one name or a list of them) as a list of names."""
    if isinstance(value, (str, keras.layers.Layer)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(
            f"`{argument}` must be a non-empty list of layer names. "
            f"Received: {argument}={value!r}"
        )
    names = []
    for item in value:
        if isinstance(item, keras.layers.Layer):
            item = item.name
        if not isinstance(item, str) or not item:
            raise ValueError(
                f"`{argument}` must be a non-empty list of layer names. "
                f"Received: {argument}={value!r}"
            )
        names.append(item)
    if len(set(names)) != len(names):
        raise ValueError(
            f"`{argument}` names a layer twice. Received: {argument}={names!r}"
        )
    return names


def _check_positive_int(argument, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"`{argument}` must be a positive integer. "
            f"Received: {argument}={value!r}"
        )
    if value < 1:
        raise ValueError(
            f"`{argument}` must be a positive integer. "
            f"Received: {argument}={value!r}"
        )
    return int(value)


def _check_positive(argument, value):
    value = check_coefficient(argument, value)
    if value == 0:
        raise ValueError(
            f"`{argument}` must be a positive number. "
            f"Received: {argument}={value!r}"
        )
    return value


class FeatureTerm(keras.layers.Layer):
    """A term of `keras_sp.FeatureRegularized`'s training loss.

    Subclasses say which layers' outputs they read and compute their value
    in `penalty(extras, y)`, where `extras` holds:

    - `"model"`: `{layer name: output}` of the fine-tuned network;
    - `"reference"`: `{layer name: output}` of the frozen pretrained copy;
    - `"features"` / `"reference_features"`: the feature tensor the target
      head reads, in either network;
    - `"source_logits"` / `"reference_source_logits"`: the source head on
      those features (the trained source head and its frozen copy).
    """

    # What the term reads; `FeatureRegularized` runs only what is needed.
    uses_reference = False
    uses_source_head = False
    uses_reference_source_head = False

    def __init__(self, **kwargs):
        kwargs.pop("trainable", None)
        super().__init__(trainable=False, **kwargs)
        self.built = True

    def model_layers(self):
        """Names of the layers of the fine-tuned network the term reads."""
        return []

    def reference_layers(self):
        """Names of the layers of the frozen copy the term reads."""
        return []

    def penalty(self, extras, y):
        raise NotImplementedError

    def check_shapes(self, extras, logits):
        """Raises if what the forward pass produced cannot fit the term
        (static shapes; called while tracing the first training step)."""


@keras.saving.register_keras_serializable(package="keras_sp")
class DELTA(FeatureTerm):
    """DELTA: the distance between feature maps of the fine-tuned and the
    pretrained network, weighted per channel by an attention.

    Li et al. (ICLR 2019), the behavioural regulariser of Eq. 3-4:

        Omega(w) = sum_j W_j(w0, x, y) * ||FM_j(w, x) - FM_j(w0, x)||^2

    over the channels j of the chosen outer layers. As in the authors'
    reference implementation (`reg_att_fea_map`: `0.5 * sum(c * a_j *
    ||FM_j(w) - FM_j(w0)||^2 / (h * w))`), for a layer of C channels and
    H x W positions per example

        alpha / 2 * sum_j C a_j mean_positions (FM_j(w, x) - FM_j(w0, x))^2

    summed over the layers and averaged over the batch (the reference sums
    over the batch: its trade-off t is `alpha = t * batch size` here). The
    attention a of a layer sums to one (the paper's softmax over channels),
    so uniform attention (`a_j = 1/C`, the default) weights every channel
    by 1. Dense outputs are one position.

    Args:
        layers: names of the layers whose outputs are compared (layers of
            the model given to `FeatureRegularized`, looked up in nested
            models too).
        alpha: the coefficient of the term.
        attention: None (uniform) or `{layer name: array of shape
            (channels,)}`, non-negative, for some or all of `layers`; e.g.
            from `keras_sp.transfer_statistics.channel_attention`. Saved as
            non-trainable variables.

    Reference: X. Li, H. Xiong, H. Wang, Y. Rao, L. Liu, Z. Chen, J. Huan.
    DELTA: DEep Learning Transfer using Feature Map with Attention for
    Convolutional Networks. ICLR 2019.
    """

    uses_reference = True

    def __init__(
        self,
        layers,
        alpha=0.01,
        attention=None,
        attention_channels=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.layers = _check_names("layers", layers)
        self.alpha = check_coefficient("alpha", alpha)
        arrays = self._check_attention(attention)
        if attention_channels is not None:
            # From a config: empty variables the saved values fill.
            arrays = {
                name: np.zeros((int(channels),), "float32")
                for name, channels in attention_channels.items()
            }
        self.attention = {}
        for index, name in enumerate(self.layers):
            if name in arrays:
                variable = self.add_weight(
                    shape=arrays[name].shape,
                    initializer="zeros",
                    trainable=False,
                    name=f"attention_{index}",
                )
                variable.assign(arrays[name])
                self.attention[name] = variable

    def _check_attention(self, attention):
        if attention is None:
            return {}
        if not isinstance(attention, dict):
            raise ValueError(
                "`attention` must be None or a dict {layer name: array of "
                f"shape (channels,)}}. Received: attention={attention!r}"
            )
        arrays = {}
        for name, value in attention.items():
            if isinstance(name, keras.layers.Layer):
                name = name.name
            if name not in self.layers:
                raise ValueError(
                    f"`attention` names a layer not in `layers` "
                    f"{self.layers}. Received: attention key {name!r}"
                )
            array = check_array(
                f"attention[{name!r}]", value, non_negative=True
            )
            if array.ndim != 1 or array.size == 0:
                raise ValueError(
                    f"`attention[{name!r}]` must have shape (channels,). "
                    f"Received: attention[{name!r}] of shape {array.shape}"
                )
            arrays[name] = array.astype("float32")
        return arrays

    def model_layers(self):
        return list(self.layers)

    def reference_layers(self):
        return list(self.layers)

    def check_shapes(self, extras, logits):
        for name in self.layers:
            current = tuple(extras["model"][name].shape)
            reference = tuple(extras["reference"][name].shape)
            if current[1:] != reference[1:]:
                raise ValueError(
                    f"DELTA compares the output of layer {name!r} in the "
                    "fine-tuned and the pretrained network, but their shapes "
                    f"differ. Received: shapes {current} and {reference}"
                )
            if name in self.attention:
                channels = tuple(self.attention[name].shape)[0]
                if current[-1] != channels:
                    raise ValueError(
                        f"`attention[{name!r}]` must have one entry per "
                        f"channel of layer {name!r} ({current[-1]}). "
                        f"Received: attention[{name!r}] of shape "
                        f"({channels},)"
                    )

    def penalty(self, extras, y):
        total = None
        for name in self.layers:
            current = extras["model"][name]
            difference = current - ops.stop_gradient(
                ops.cast(extras["reference"][name], current.dtype)
            )
            squared = ops.square(difference)
            if len(squared.shape) > 2:
                squared = ops.mean(
                    squared, axis=tuple(range(1, len(squared.shape) - 1))
                )
            if name in self.attention:
                channels = squared.shape[-1]
                weights = ops.cast(self.attention[name], squared.dtype)
                per_example = ops.sum(squared * (channels * weights), axis=-1)
            else:
                per_example = ops.sum(squared, axis=-1)
            layer_term = 0.5 * ops.mean(per_example)
            total = layer_term if total is None else total + layer_term
        return ops.cast(self.alpha, total.dtype) * total

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "layers": list(self.layers),
                "alpha": self.alpha,
                "attention_channels": {
                    name: int(variable.shape[0])
                    for name, variable in self.attention.items()
                },
            }
        )
        return config


@keras.saving.register_keras_serializable(package="keras_sp")
class BSS(FeatureTerm):
    """Batch Spectral Shrinkage: the k smallest singular values of the batch
    feature matrix, squared.

    Chen et al. (NeurIPS 2019), Eq. 5:

        L_bss(F) = eta * sum_{i=1..k} sigma_{-i}^2

    where sigma_{-i} is the i-th smallest singular value of the feature
    matrix F (batch x features) the classifier reads. Defaults follow the
    paper: k = 1, eta = 0.001. Feature maps with more than two axes are
    flattened per example. When a batch (the last, smaller one) has fewer
    than k singular values, all of them are summed.

    Args:
        eta: the coefficient of the term.
        k: how many of the smallest singular values are penalised; at most
            min(batch size, feature dimension), checked on the first
            training step.
        layer: None (the features the target head reads) or the name of
            the layer whose output is F.

    Reference: X. Chen, S. Wang, B. Fu, M. Long, J. Wang. Catastrophic
    Forgetting Meets Negative Transfer: Batch Spectral Shrinkage for Safe
    Transfer Learning. NeurIPS 2019.
    """

    def __init__(self, eta=0.001, k=1, layer=None, **kwargs):
        super().__init__(**kwargs)
        self.eta = check_coefficient("eta", eta)
        self.k = _check_positive_int("k", k)
        if layer is not None:
            layer = _check_names("layer", layer)
            if len(layer) != 1:
                raise ValueError(
                    f"`layer` must name one layer. Received: layer={layer!r}"
                )
            layer = layer[0]
        self.layer = layer

    def model_layers(self):
        return [] if self.layer is None else [self.layer]

    def _features(self, extras):
        if self.layer is None:
            return extras["features"]
        return extras["model"][self.layer]

    def check_shapes(self, extras, logits):
        shape = tuple(self._features(extras).shape)
        dimension = (
            None if None in shape[1:] else int(np.prod(shape[1:], dtype=int))
        )
        for size, what in (
            (shape[0], "batch size"),
            (dimension, "feature dimension"),
        ):
            if size is not None and self.k > size:
                raise ValueError(
                    f"BSS penalises the k smallest of the min(batch size, "
                    f"feature dimension) singular values, but k is larger "
                    f"than the {what} {size}. Received: k={self.k}"
                )

    def penalty(self, extras, y):
        features = self._features(extras)
        matrix = ops.reshape(features, (ops.shape(features)[0], -1))
        singular_values = ops.svd(matrix, full_matrices=False, compute_uv=False)
        # Sorted ascending: the k smallest come first.
        smallest = ops.sort(singular_values)[: self.k]
        return ops.cast(self.eta, matrix.dtype) * ops.sum(ops.square(smallest))

    def get_config(self):
        config = super().get_config()
        config.update({"eta": self.eta, "k": self.k, "layer": self.layer})
        return config


def _soft_cross_entropy(target_probabilities, logits):
    """mean over the batch of -sum_c p_c log softmax(logits)_c."""
    log_probabilities = ops.log_softmax(logits, axis=-1)
    return ops.mean(-ops.sum(target_probabilities * log_probabilities, -1))


@keras.saving.register_keras_serializable(package="keras_sp")
class LwF(FeatureTerm):
    """Learning without Forgetting: the source head keeps answering as the
    pretrained network did.

    Li & Hoiem (ECCV 2016; TPAMI 2017), Eq. 2, the knowledge-distillation
    loss between the pretrained network's source outputs y_o on the target
    images and the current network's source outputs yhat_o:

        L_old = - sum_i y'_o(i) log yhat'_o(i),
        y'_o(i) = y_o(i)^(1/T) / sum_j y_o(j)^(1/T)

    (the same for yhat'_o), i.e. softmax(logits / T) on both sides, T = 2
    as in the paper, averaged over the batch and multiplied by `weight`
    (the paper's lambda_o = 1). The paper does not rescale by T^2, and
    neither does this term. y_o comes from the frozen copy of the backbone
    and of the source head on the same batch, which equals recording them
    before training, as the paper does.

    Needs `source_head` in `FeatureRegularized`.

    Args:
        weight: lambda_o.
        temperature: T, positive.

    Reference: Z. Li, D. Hoiem. Learning without Forgetting. ECCV 2016;
    IEEE TPAMI 40(12), 2017.
    """

    uses_reference = True
    uses_source_head = True
    uses_reference_source_head = True

    def __init__(self, weight=1.0, temperature=2.0, **kwargs):
        super().__init__(**kwargs)
        self.weight = check_coefficient("weight", weight)
        self.temperature = _check_positive("temperature", temperature)

    def penalty(self, extras, y):
        logits = extras["source_logits"]
        recorded = ops.stop_gradient(
            ops.cast(extras["reference_source_logits"], logits.dtype)
        )
        temperature = ops.cast(self.temperature, logits.dtype)
        targets = ops.softmax(recorded / temperature, axis=-1)
        loss = _soft_cross_entropy(targets, logits / temperature)
        return ops.cast(self.weight, logits.dtype) * loss

    def get_config(self):
        config = super().get_config()
        config.update({"weight": self.weight, "temperature": self.temperature})
        return config


@keras.saving.register_keras_serializable(package="keras_sp")
class CoTuning(FeatureTerm):
    """Co-Tuning: the source head learns the source-class distribution the
    target label stands for.

    You et al. (NeurIPS 2020), Eq. 4-5: with the category relationship
    p(y_s | y_t) (a table of shape (target classes, source classes), each
    row a distribution),

        lambda * CE(p(y_s | y_t = y), softmax(source_head(features)))

    averaged over the batch; `weight` is lambda (2.3 in the authors'
    quick start). Integer labels pick a row of the table; one-hot (or
    soft) labels of shape (batch, target classes) mix the rows.

    Needs `source_head` in `FeatureRegularized`; the head is trained.

    Args:
        relationship: array (target classes, source classes) of p(y_s |
            y_t), e.g. from
            `keras_sp.transfer_statistics.category_relationship`. Saved as a
            non-trainable variable.
        weight: lambda.

    Reference: K. You, Z. Kou, M. Long, J. Wang. Co-Tuning for Transfer
    Learning. NeurIPS 2020.
    """

    uses_source_head = True

    def __init__(
        self, relationship=None, weight=2.3, relationship_shape=None, **kwargs
    ):
        super().__init__(**kwargs)
        if relationship is None and relationship_shape is None:
            raise ValueError(
                "`relationship` must be an array (target classes, source "
                "classes) of p(y_s | y_t). Received: relationship=None"
            )
        if relationship is not None:
            array = check_array("relationship", relationship, non_negative=True)
            if array.ndim != 2 or 0 in array.shape:
                raise ValueError(
                    "`relationship` must have shape (target classes, source "
                    f"classes). Received: relationship of shape {array.shape}"
                )
            sums = array.sum(axis=1)
            if not np.allclose(sums, 1.0, atol=1e-3):
                raise ValueError(
                    "Each row of `relationship` must be a distribution "
                    "p(y_s | y_t) summing to 1. Received: relationship with "
                    f"row sums from {sums.min()} to {sums.max()}"
                )
        else:
            array = np.zeros(tuple(relationship_shape), "float32")
        self.weight = check_coefficient("weight", weight)
        self.relationship = self.add_weight(
            shape=array.shape,
            initializer="zeros",
            trainable=False,
            name="relationship",
        )
        self.relationship.assign(array.astype("float32"))

    def check_shapes(self, extras, logits):
        expected = (logits.shape[-1], extras["source_logits"].shape[-1])
        if tuple(self.relationship.shape) != tuple(expected):
            raise ValueError(
                "`relationship` must have shape (target classes, source "
                f"classes) = {expected}. Received: relationship of shape "
                f"{tuple(self.relationship.shape)}"
            )

    def penalty(self, extras, y):
        logits = extras["source_logits"]
        table = ops.cast(self.relationship, logits.dtype)
        y = ops.convert_to_tensor(y)
        if (
            keras.backend.is_int_dtype(y.dtype)
            or len(y.shape) < 2
            or (y.shape[-1] == 1 and table.shape[0] != 1)
        ):
            indices = ops.cast(ops.reshape(y, (-1,)), "int32")
            targets = ops.take(table, indices, axis=0)
        else:
            targets = ops.matmul(ops.cast(y, logits.dtype), table)
        loss = _soft_cross_entropy(targets, logits)
        return ops.cast(self.weight, logits.dtype) * loss

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight": self.weight,
                "relationship_shape": list(self.relationship.shape),
            }
        )
        return config
