"""A model as an ordered list of depth units; freezing and copying them.

A depth unit is what the transfer-learning papers count as one layer when
they freeze or copy "the first n layers": the first convolution of a
ResNet with its BatchNormalization, one residual block, a MobileNet
depthwise + pointwise pair, a VGG convolution, a Dense layer.

References:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 4.3.3.
    Yosinski, Clune, Bengio, Lipson. "How transferable are features in deep
    neural networks?" NIPS 2014.
"""

import re

import keras
import numpy as np

from keras_sp import _keras_private
from keras_sp._trainable import apply_trainable_change

__all__ = [
    "copy_units",
    "depth_units",
    "freeze_batchnorm",
    "freeze_first",
    "unfreeze",
]

# Residual blocks: `conv2_block1_...` in keras.applications, `stack0_block0_...`
# in KerasHub's ResNetBackbone.
_RESNET_BLOCK = re.compile(r"^((?:conv|stack)\d+_block\d+)_")
# The stem: one convolution (`conv1_conv`, `conv1_bn`), or the three of a
# KerasHub ResNet-vd (`conv1_conv` ... `conv3_conv`).
_RESNET_STEM = re.compile(r"^conv\d+_(?:conv|bn)$")
_MOBILENET_PAIR = re.compile(r"^conv_(?:dw|pw)_(\d+)(?:_bn)?$")


def _family(model):
    """Which layer naming (`keras.applications`, KerasHub) `model`'s own
    layers follow."""
    names = {layer.name for layer in model.layers}
    if "conv1_conv" in names and any(_RESNET_BLOCK.match(n) for n in names):
        return "resnet"
    if {"conv1", "conv_dw_1", "conv_pw_1"} <= names:
        return "mobilenet"
    return None


def _family_key(family, name):
    """The unit a layer of a `keras.applications` or KerasHub model belongs
    to."""
    if family == "resnet":
        match = _RESNET_BLOCK.match(name)
        if match:
            return match.group(1)
        if _RESNET_STEM.match(name):
            return "stem"
        if name == "post_bn":
            return "last_block"
    if family == "mobilenet":
        if name in ("conv1", "conv1_bn"):
            return "conv1"
        match = _MOBILENET_PAIR.match(name)
        if match:
            return f"conv_block_{match.group(1)}"
    return None


def _leaf_layers(model):
    """`(layer, container, family)` in order, nested models flattened."""
    family = _family(model)
    leaves = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            leaves.extend(_leaf_layers(layer))
        else:
            leaves.append((layer, model, family))
    return leaves


def _producer_with_weights(layer, producers):
    """The closest layer with weights that feeds `layer` through a chain of
    single-input layers without weights, or None."""
    for _ in range(len(producers) + 1):
        try:
            inputs = layer.input
        except (AttributeError, ValueError):
            return None
        if not isinstance(inputs, keras.KerasTensor):
            return None
        layer = producers.get(id(inputs))
        if layer is None or layer.weights:
            return layer
    return None


def _producers(leaves):
    producers = {}
    for layer, _, _ in leaves:
        try:
            outputs = layer.output
        except (AttributeError, ValueError):
            continue
        for tensor in keras.tree.flatten(outputs):
            producers[id(tensor)] = layer
    return producers


def depth_units(model):
    """The model's layers with weights, grouped into ordered depth units.

    - `keras.applications` ResNet50/101/152 (V1 and V2): the stem (first
      convolution, with its BatchNormalization in V1) is one unit and each
      residual block (with its shortcut and, in V2, its pre-activation
      BatchNormalization; V2's final `post_bn` joins the last block) is one
      unit: ResNet-101 without its top has 1 + 33 = 34 units.
    - KerasHub's `keras_hub.models.ResNetBackbone` (ResNet, ResNetV2 and
      ResNet-vd, basic and bottleneck blocks) is counted the same way: the
      stem (its one or three convolutions with their BatchNormalizations)
      is one unit, each block `stack{i}_block{j}` one unit (V2's `post_bn`
      joins the last block): `1 + sum(stackwise_num_blocks)` units.
    - `keras.applications.MobileNet`: the stem, then each depthwise +
      pointwise pair with their BatchNormalizations (1 + 13 units).
    - Any other model (VGG, hand-made functional or Sequential models): each
      layer with weights is one unit, and a BatchNormalization joins the
      unit of the layer with weights that feeds it (through layers without
      weights such as activations), else the closest one before it.

    Nested models (a backbone inside a Sequential) are flattened, so a new
    head after a backbone is the last unit. Layers without weights belong to
    no unit.

    Args:
        model: a built `keras.Model`.

    Returns:
        A list of units, each a non-empty list of layers, from the input to
        the output.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 1)),
    ...     keras.layers.Conv2D(2, 3, name="conv"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ...     keras.layers.Flatten(),
    ...     keras.layers.Dense(3, name="head"),
    ... ])
    >>> [[layer.name for layer in unit] for unit in keras_sp.depth_units(model)]
    [['conv', 'bn'], ['head']]

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 4.3.3 (ResNet-101's
        first convolution and each 3-layer block count as one layer).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. Received: "
            f"model={model!r} of type {type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"`model` must be built (call it on data or build it) before its "
            f"depth units can be listed. Received: model={model.name!r}"
        )
    leaves = _leaf_layers(model)
    producers = _producers(leaves)
    units = []
    unit_of_layer = {}
    unit_of_key = {}
    last_unit_of_container = {}
    pending = []
    previous = None
    for layer, container, family in leaves:
        if not layer.weights:
            continue
        key = _family_key(family, layer.name)
        unit = None
        if key == "last_block":
            unit = last_unit_of_container.get(id(container))
        elif key is not None:
            unit = unit_of_key.get((id(container), key))
        elif isinstance(layer, keras.layers.BatchNormalization):
            producer = _producer_with_weights(layer, producers)
            unit = unit_of_layer.get(id(producer), previous)
            if unit is None:
                pending.append(layer)
                continue
        if unit is None:
            unit, pending = pending, []
            units.append(unit)
            if key is not None:
                unit_of_key[(id(container), key)] = unit
        unit.append(layer)
        unit_of_layer[id(layer)] = unit
        last_unit_of_container[id(container)] = unit
        previous = unit
    if pending:
        units.append(pending)
    return units


def _check_n(n, count, model_name):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(
            f"`n` must be an integer between 0 and {count}, the number of "
            f"depth units of model {model_name!r}. Received: n={n!r}"
        )
    if not 0 <= n <= count:
        raise ValueError(
            f"`n` must be between 0 and {count}, the number of depth units "
            f"of model {model_name!r}. Received: n={n}"
        )
    return int(n)


def _make_trainable(model):
    model.trainable = True
    for layer in _keras_private.all_layers(model):
        layer.trainable = True


def freeze_first(model, n):
    """Freezes the first `n` depth units and makes the others trainable.

    Frozen layers get `trainable=False`: their weights stay as they are and
    their BatchNormalization layers run in inference mode (moving statistics
    used and kept), as in the Keras transfer-learning guide. Every layer
    after the first `n` units becomes trainable, so call `freeze_batchnorm`
    afterwards to keep BatchNormalization frozen there too. On a compiled
    model the change takes effect at the next training step, also from a
    callback in the middle of `fit`, on every backend: a built optimizer is
    rebuilt in place for exactly `model.trainable_variables` (the object
    given to `compile` stays `model.optimizer`); its step count and the
    slots (momenta, Adam's m and v) of variables that stay trainable are
    kept bit for bit, the slots of newly trainable variables start at
    zero. Optimizers that wrap others (`LossScaleOptimizer`,
    `MultiOptimizer`) are replaced by a rebuilt copy instead, with a
    warning once per model.

    Args:
        model: a built `keras.Model`.
        n: int, 0 <= n <= len(depth_units(model)).

    Returns:
        `model`, changed in place.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([
    ...     keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)
    ... ])
    >>> model = keras_sp.freeze_first(model, 1)
    >>> [layer.trainable for layer in model.layers]
    [False, True]

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 4.3.3 and Figure 3.
    """
    units = depth_units(model)
    n = _check_n(n, len(units), model.name)
    _keras_private.sync_training_state(model)
    _make_trainable(model)
    for unit in units[:n]:
        for layer in unit:
            layer.trainable = False
    apply_trainable_change(model)
    return model


def unfreeze(model):
    """Makes every layer trainable, BatchNormalization in training mode too.

    Undoes `freeze_first` and `freeze_batchnorm`. On a compiled model the
    change takes effect at the next training step; the optimizer is
    rebuilt as `freeze_first` describes.

    Args:
        model: a `keras.Model`.

    Returns:
        `model`, changed in place.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    >>> model = keras_sp.unfreeze(keras_sp.freeze_first(model, 1))
    >>> model.layers[0].trainable
    True
    """
    _keras_private.sync_training_state(model)
    _make_trainable(model)
    for layer in _keras_private.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            _keras_private.restore_call(layer)
    apply_trainable_change(model)
    return model


def freeze_batchnorm(model, train_gamma_beta=False):
    """Keeps every BatchNormalization's moving statistics while the rest
    trains.

    With the default `train_gamma_beta=False`, each BatchNormalization layer
    gets `trainable=False`: it normalises with its moving mean and variance,
    never updates them, and its γ and β stay fixed. With
    `train_gamma_beta=True`, the layers still normalise with (and keep)
    their moving statistics, but γ and β train wherever the layer is
    trainable; this setting is not saved with the model.

    Keras 3's documented pattern `base(x, training=False)` does not do this
    inside a functional model: `fit` calls the outer model with
    `training=True`, which overrides the stored `training=False`, and the
    moving statistics change (keras-team/keras#20285).

    Args:
        model: a `keras.Model`.
        train_gamma_beta: bool, whether γ and β keep training.

    Returns:
        `model`, changed in place.

    Example:

    >>> import keras, keras_sp
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(3),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> model = keras_sp.freeze_batchnorm(model)
    >>> [layer.trainable for layer in model.layers]
    [True, False]
    """
    if not isinstance(train_gamma_beta, bool):
        raise ValueError(
            "`train_gamma_beta` must be True or False. Received: "
            f"train_gamma_beta={train_gamma_beta!r}"
        )
    _keras_private.sync_training_state(model)
    for layer in _keras_private.all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            if train_gamma_beta:
                _keras_private.run_in_inference_mode(layer)
            else:
                layer.trainable = False
    apply_trainable_change(model)
    return model


def _describe(index, unit):
    names = ", ".join(layer.name for layer in unit)
    return f"depth unit {index} ({names})"


def _shapes(unit):
    return [[tuple(w.shape) for w in layer.weights] for layer in unit]


def copy_units(source, target, n, freeze=False):
    """Copies the weights of the first `n` depth units of `source` into
    `target`.

    Every variable of those units is copied, BatchNormalization moving
    statistics included; the later units of `target` keep their weights
    (Yosinski et al. initialise them at random). `target` must have the
    same architecture as `source` over the first `n` units; its head may
    differ. Nothing is copied when they differ.

    With `freeze=True` the copied units are frozen (`freeze_first(target,
    n)`, the other units trainable): Yosinski's AnB and BnB networks. With
    `freeze=False` they are left trainable as they are: AnB+ and BnB+.

    Args:
        source: a built `keras.Model` (the base network).
        target: a built `keras.Model` (the transfer network).
        n: int, how many depth units to copy.
        freeze: bool, whether to freeze the copied units.

    Returns:
        `target`, changed in place.

    Example:

    >>> import keras, keras_sp
    >>> def net(classes):
    ...     return keras.Sequential([
    ...         keras.Input((4,)), keras.layers.Dense(3),
    ...         keras.layers.Dense(classes),
    ...     ])
    >>> base, transfer = net(5), net(2)
    >>> transfer = keras_sp.copy_units(base, transfer, 1, freeze=True)
    >>> bool((transfer.layers[0].kernel.numpy()
    ...       == base.layers[0].kernel.numpy()).all())
    True

    Reference:
        Yosinski, Clune, Bengio, Lipson. "How transferable are features in
        deep neural networks?" NIPS 2014, section 2.
    """
    if not isinstance(freeze, bool):
        raise ValueError(
            f"`freeze` must be True or False. Received: freeze={freeze!r}"
        )
    source_units = depth_units(source)
    target_units = depth_units(target)
    limit = min(len(source_units), len(target_units))
    shorter = source if len(source_units) <= len(target_units) else target
    n = _check_n(n, limit, shorter.name)
    for index in range(n):
        if _shapes(source_units[index]) != _shapes(target_units[index]):
            raise ValueError(
                "`source` and `target` differ at "
                f"{_describe(index, source_units[index])} of "
                f"{source.name!r} against "
                f"{_describe(index, target_units[index])} of "
                f"{target.name!r}: the layers or weight shapes do not match. "
                f"Received: n={n}"
            )
    for index in range(n):
        for from_layer, to_layer in zip(
            source_units[index], target_units[index], strict=True
        ):
            to_layer.set_weights(from_layer.get_weights())
    if freeze:
        freeze_first(target, n)
    return target
