"""Model surgery for developmental transfer: widen (WA-CNN), deepen (DA-CNN).

Both functions return a new functional model and leave the model they are
given untouched: every layer is copied (same config, same weights), except
the layers they grow or insert. Nested models (a backbone inside a
Sequential, a `keras.applications` model inside a functional model) are
copied as nested functional models with the same names. Penalties attached
by `keras_sp.regularize` are not carried over: call `regularize` on the new
model. Variables keep their layer and variable names, but a layer built
inside a Sequential loses that scope in its `variable.path`
(`"small_cnn/head/kernel"` becomes `"head/kernel"`), which `regularize`
still matches when given the original model as `starting_point`.

Reference:
    Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing Model
    Capacity". CVPR 2017, section 3.
"""

import keras
import numpy as np

from keras_sp import _keras_private
from keras_sp import _selection
from keras_sp import penalties
from keras_sp._checks import check_bool
from keras_sp.layers import grow_layer as grow

__all__ = ["deepen", "widen"]

# Layers that act on each channel alone: widening their input widens their
# output, and the layer that consumes it is searched further on.
CHANNELWISE = (
    keras.layers.Activation,
    keras.layers.AveragePooling2D,
    keras.layers.Dropout,
    keras.layers.ELU,
    keras.layers.GlobalAveragePooling2D,
    keras.layers.GlobalMaxPooling2D,
    keras.layers.Identity,
    keras.layers.LeakyReLU,
    keras.layers.MaxPooling2D,
    keras.layers.ReLU,
    keras.layers.SpatialDropout2D,
)
GROW_OPTIONS = (
    "normalize",
    "scale_init",
    "kernel_initializer",
    "bias_initializer",
    "epsilon",
    "name",
)
# Standard deviation of the "random" initialisation of a widened consumer's
# new input weights.
CONSUMER_STDDEV = 0.01


def _copy_layer(layer):
    """A new layer with `layer`'s config, not built."""
    return type(layer).from_config(layer.get_config())


def _find(model, name, argument):
    """The one layer named `name` in `model` or its nested models."""
    matches = []

    def visit(container, scope):
        for layer in container.layers:
            if isinstance(layer, keras.layers.InputLayer):
                continue
            if layer.name == name:
                matches.append(("/".join(scope + [layer.name]), layer))
            if isinstance(layer, keras.Model):
                visit(layer, scope + [layer.name])

    visit(model, [])
    if not matches:
        raise ValueError(
            f"`{argument}` must name a layer of model '{model.name}' (or of "
            f"a model nested in it). Received: {argument}={name!r}"
        )
    if len(matches) > 1:
        raise ValueError(
            f"`{argument}`: several layers are named {name!r} "
            f"({[path for path, _ in matches]}). Rename them so the name is "
            f"unique. Received: {argument}={name!r}"
        )
    return matches[0][1]


def _check_model(model):
    if not isinstance(model, keras.Sequential) and not (
        _keras_private.is_functional(model)
    ):
        raise ValueError(
            "`model` must be a functional or Sequential keras.Model. "
            f"Received: model of type {type(model).__name__}"
        )
    if not model.built or not model.weights or not model.inputs:
        raise ValueError(
            f"`model` must be built (with weights and known inputs). "
            f"Received: model={model.name!r}, not built"
        )


def _new_inputs(model, like):
    """New `keras.Input`s shaped like the tensors `like` (a structure).

    A functional model's inputs keep their names (a Sequential model's
    input tensors have generated names).
    """
    if isinstance(model, keras.Sequential):
        return keras.tree.map_structure(
            lambda x: keras.Input(batch_shape=x.shape, dtype=x.dtype), like
        )
    return keras.tree.map_structure(
        lambda x, reference: keras.Input(
            batch_shape=x.shape, dtype=x.dtype, name=reference.name
        ),
        like,
        model.input,
    )


def _consumer_initializer(value):
    if isinstance(value, str) and value == "random":
        return keras.initializers.RandomNormal(stddev=CONSUMER_STDDEV)
    if isinstance(value, str) and value == "zeros":
        return keras.initializers.Zeros()
    if isinstance(value, keras.initializers.Initializer):
        return value
    raise ValueError(
        '`consumer_initializer` must be "random", "zeros" or a '
        "keras.initializers.Initializer. Received: "
        f"consumer_initializer={value!r}"
    )


def _hint(consumer):
    """Where to widen instead, when `consumer` keeps the width it has."""
    if isinstance(
        consumer, (keras.layers.BatchNormalization, keras.layers.Add)
    ):
        return (
            "A BatchNormalization or a residual addition keeps its width: in "
            "a ResNet (keras.applications, KerasHub's ResNetBackbone), widen "
            "a Dense or Conv2D layer after the backbone (on its pooled "
            "features), or use `deepen`. "
        )
    return ""


class _Surgery:
    """Copies a model's graph layer by layer, replacing the call of `target`.

    `replace(layer, *args, **kwargs)` computes the new output of `target`.
    When that output has more (or other) channels than before, it is
    tracked: channel-wise layers pass it on, and the Dense or Conv2D layer
    that consumes it is rebuilt for the new width by `adapt_consumer`.
    """

    def __init__(self, target, argument, replace, adapt_consumer, single):
        self.target = target
        self.argument = argument
        self.replace = replace
        self.adapt_consumer = adapt_consumer
        self.single = single
        self.target_calls = 0
        self._copies = {}
        self._tracked = {}
        self._derived = {}

    def _track(self, tensor):
        self._tracked[id(tensor)] = [tensor, 0]

    def _is_tracked(self, tensor):
        return id(tensor) in self._tracked

    def _derive(self, tensors):
        """Marks `tensors` as the new output of `target`, or computed from it
        by layers without weights."""
        self._derived.update({id(x): x for x in keras.tree.flatten(tensors)})

    def _use(self, tensor, user):
        record = self._tracked[id(tensor)]
        record[1] += 1
        if self.single and record[1] > 1:
            raise ValueError(
                f"`{self.argument}`: the output of layer "
                f"'{self.target.name}' has several consumers (the second is "
                f"{user}); widening needs exactly one. Received: "
                f"{self.argument}={self.target.name!r}"
            )

    def copy_model(self, model, inputs):
        """A functional copy of `model` called on `inputs`."""
        if isinstance(model, keras.Sequential):
            outputs = inputs
            for layer in model.layers:
                outputs = self.call(layer, outputs)
        else:
            clone = keras.models.clone_model(
                model,
                input_tensors=inputs,
                clone_function=lambda layer: layer,
                call_function=self.call,
            )
            outputs = clone.output
        for tensor in keras.tree.flatten(outputs):
            if self._is_tracked(tensor):
                self._use(tensor, f"an output of model '{model.name}'")
        return keras.Model(inputs, outputs, name=model.name)

    def call(self, layer, *args, **kwargs):
        outputs = self._call(layer, *args, **kwargs)
        inputs = keras.tree.flatten((args, kwargs))
        if layer is self.target or (
            not isinstance(layer, keras.Model)
            and not getattr(layer, "weights", None)
            and any(id(x) in self._derived for x in inputs)
        ):
            self._derive(outputs)
        return outputs

    def _call(self, layer, *args, **kwargs):
        tracked = [
            x for x in keras.tree.flatten((args, kwargs)) if self._is_tracked(x)
        ]
        for tensor in tracked:
            self._use(tensor, f"layer '{layer.name}'")
        if layer is self.target:
            self.target_calls += 1
            if self.target_calls > 1:
                raise ValueError(
                    f"`{self.argument}`: layer '{layer.name}' is called more "
                    "than once in the model (a shared layer); it cannot be "
                    f"replaced. Received: {self.argument}={layer.name!r}"
                )
            return self.replace(layer, *args, **kwargs)
        if id(layer) in self._copies:
            if tracked:
                raise ValueError(
                    f"Layer '{layer.name}' consumes the grown output of "
                    f"'{self.target.name}' and is shared (called more than "
                    "once); it cannot be rebuilt for the new width."
                )
            return self._copies[id(layer)](*args, **kwargs)
        if not tracked:
            return self.copy_call(layer, *args, **kwargs)
        if isinstance(layer, keras.Model):
            return self._copy_nested(layer, args, kwargs)
        if isinstance(layer, CHANNELWISE):
            outputs = self.copy_call(layer, *args, **kwargs)
            self._track(outputs)
            return outputs
        if (
            isinstance(layer, grow.GROWABLE)
            and len(keras.tree.flatten((args, kwargs))) == 1
            and getattr(layer, "data_format", "channels_last")
            == "channels_last"
            and getattr(layer, "groups", 1) == 1
        ):
            copy = _copy_layer(layer)
            self._copies[id(layer)] = copy
            outputs = copy(*args, **kwargs)
            self.adapt_consumer(layer, copy)
            return outputs
        raise ValueError(
            f"`{self.argument}`: the output of layer '{self.target.name}' "
            f"now has another number of channels, and its consumer "
            f"'{layer.name}' ({type(layer).__name__}) cannot be rebuilt for "
            "it: supported consumers are Dense and channels-last Conv2D "
            "layers (groups=1), reached directly or through channel-wise "
            f"layers ({', '.join(c.__name__ for c in CHANNELWISE)}). "
            f"{_hint(layer)}Received: {self.argument}={self.target.name!r}"
        )

    def copy_call(self, layer, *args, **kwargs):
        """Calls a copy of `layer` (same config and weights) on the inputs.

        An operation that is not a layer (such as the `keras.ops.pad` of a
        KerasHub ResNetV2) has no weights and is called as it is.
        """
        if not isinstance(layer, keras.layers.Layer):
            return layer(*args, **kwargs)
        if isinstance(layer, keras.Model):
            return self._copy_nested(layer, args, kwargs)
        copy = _copy_layer(layer)
        self._copies[id(layer)] = copy
        outputs = copy(*args, **kwargs)
        copy.set_weights(layer.get_weights())
        return outputs

    def _copy_nested(self, model, args, kwargs):
        _check_model(model)
        inputs = _new_inputs(model, args[0])
        for outer, inner in zip(
            keras.tree.flatten(args[0]), keras.tree.flatten(inputs), strict=True
        ):
            if self._is_tracked(outer):
                self._track(inner)
            if id(outer) in self._derived:
                self._derive(inner)
        copy = self.copy_model(model, inputs)
        self._copies[id(model)] = copy
        outputs = copy(*args, **kwargs)
        for inner, outer in zip(
            keras.tree.flatten(copy.outputs),
            keras.tree.flatten(outputs),
            strict=True,
        ):
            if self._is_tracked(inner):
                self._track(outer)
            if id(inner) in self._derived:
                self._derive(outer)
        return outputs

    def run(self, model, change_outputs, action):
        if isinstance(model, keras.Sequential):
            inputs = _new_inputs(model, model.inputs[0])
        else:
            inputs = _new_inputs(model, model.input)
        new_model = self.copy_model(model, inputs)
        if self.target_calls != 1:
            raise ValueError(
                f"`{self.argument}`: layer '{self.target.name}' is not on the "
                f"path from the inputs of model '{model.name}' to its outputs. "
                f"Received: {self.argument}={self.target.name!r}"
            )
        if not change_outputs:
            self._check_outputs(model, new_model, action)
        return penalties.unregularize(new_model)

    def _check_outputs(self, model, new_model, action):
        """Raises if the outputs change shape or come from new layers."""
        old = [tuple(x.shape) for x in model.outputs]
        new = [tuple(x.shape) for x in new_model.outputs]
        if old == new and not any(
            id(x) in self._derived for x in new_model.outputs
        ):
            return
        old, new = (old[0], new[0]) if len(old) == 1 else (old, new)
        change = f"change its output shape from {old} to {new}"
        if old == new:
            change = f"make new layers compute its output (shape {old} kept)"
        raise ValueError(
            f"`{self.argument}`: layer '{self.target.name}' computes the "
            f"output of model '{model.name}' (directly or through layers "
            f"without weights); {action} it would {change}. Pass "
            "`change_outputs=True` to change the model's outputs (for "
            "instance to add classes). Received: "
            f"{self.argument}={self.target.name!r}"
        )


def widen(
    model,
    layer_name,
    channels,
    *,
    consumer_initializer="random",
    change_outputs=False,
    **grow_options,
):
    """Widens a pretrained layer with new channels: the WA-CNN of the paper.

    In a copy of `model`, the Dense or Conv2D layer `layer_name` becomes a
    `keras_sp.layers.GrowLayer` with `channels` new channels, whose output is

        y = [γ_old ⊙ h / ‖h‖₂, γ_new ⊙ h⁺ / ‖h⁺‖₂]

    (or `[h, h⁺]` with `normalize=False`, the paper's WA-CNN-ori). The layer
    that consumes it, a Dense or Conv2D reached directly or through
    channel-wise layers (activations, dropout, pooling), is widened to
    accept the extra channels: its existing weights are copied and its new
    input weights (the kernel rows of the new channels) are drawn from
    `consumer_initializer`. Every other weight, BatchNormalization
    statistics included, is copied exactly.

    The GrowLayer is named `"<layer_name>_grow"` and keeps the pretrained
    layer, a copy named `layer_name`, inside. With `keras_sp.regularize`,
    put its sublayer `"<layer_name>_grow_new"` in `new_layers` (see
    `GrowLayer`), and keep the default `starting_point=None`: the widened
    consumer's kernel has a new shape, so the grown model's own weights are
    the starting point.

    On a classifier built on a ResNet (`keras.applications`, or KerasHub's
    `keras_hub.models.ResNetBackbone`), widen a Dense or Conv2D layer after
    the backbone, such as a fully connected layer on the pooled features
    (the paper's fc7, with the classifier as its consumer). The
    convolutions inside the backbone are refused with an error saying so:
    each feeds a BatchNormalization or a residual addition, whose width is
    fixed. The backbone is copied as a functional model with the same
    layers, names and weights; attributes of a KerasHub backbone that are
    not layers (`pyramid_outputs`, its preset) are not carried over.

    Args:
        model: a built functional or Sequential model (models nested inside
            it are searched too). It is not changed.
        layer_name: name of the Dense or Conv2D layer to widen. Its output
            must have exactly one consumer, or be a model output (directly
            or through layers without weights), which then grows by `channels`
            channels: this needs `change_outputs=True`.
        channels: int >= 1, the number of new output channels.
        consumer_initializer: the consumer's new input weights: `"random"`
            (default: small random values, N(0, 0.01²), as the fully
            connected layers of the paper's Caffe models), `"zeros"` (the
            consumer's output is unchanged at first), or a
            `keras.initializers.Initializer`.
        change_outputs: bool (default False); True lets `layer_name` be the
            output layer, which then gets `channels` more outputs (classes).
            Otherwise that raises a ValueError naming both output shapes.
        **grow_options: passed to `GrowLayer`: `normalize`, `scale_init`,
            `kernel_initializer`, `bias_initializer`, `epsilon`, `name`.

    Returns:
        A new, uncompiled functional `keras.Model`.

    Example:

    >>> import keras
    >>> from keras_sp.surgery import widen
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="fc"),
    ...     keras.layers.Dense(2, name="head")])
    >>> grown = widen(model, "fc", channels=2)
    >>> tuple(grown.get_layer("head").kernel.shape)
    (6, 2)

    Reference:
        Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing
        Model Capacity". CVPR 2017, section 3 (WA-CNN).
    """
    _check_model(model)
    channels = grow.check_channels(channels)
    change_outputs = check_bool("change_outputs", change_outputs)
    unknown = sorted(set(grow_options) - set(GROW_OPTIONS))
    if unknown:
        raise ValueError(
            f"Unknown option '{unknown[0]}' for `widen`; the GrowLayer "
            f"options are {list(GROW_OPTIONS)}. Received: "
            f"{unknown[0]}={grow_options[unknown[0]]!r}"
        )
    initializer = _consumer_initializer(consumer_initializer)
    target = _find(model, layer_name, "layer_name")
    grow.check_growable(target, "layer_name")
    pretrained = _copy_layer(target)
    pretrained.build_from_config(target.get_build_config())
    pretrained.set_weights(target.get_weights())
    grow_options.setdefault("name", f"{target.name}_grow")
    grow_layer = grow.GrowLayer(pretrained, channels, **grow_options)

    def replace(layer, *args, **kwargs):
        outputs = grow_layer(*args, **kwargs)
        surgery._track(outputs)
        return outputs

    def adapt_consumer(original, copy):
        for new, old in zip(copy.weights, original.weights, strict=True):
            old = _selection.to_numpy(old)
            if tuple(new.shape) == old.shape:
                new.assign(old)
                continue
            shape = list(old.shape)
            shape[-2] = channels
            rows = keras.ops.convert_to_numpy(
                initializer(tuple(shape), dtype=new.dtype)
            )
            new.assign(np.concatenate([old, rows], axis=-2))

    surgery = _Surgery(
        target, "layer_name", replace, adapt_consumer, single=True
    )
    return surgery.run(model, change_outputs, "widening")


def deepen(
    model,
    after,
    channels,
    *,
    normalize=True,
    scale_init=10.0,
    activation="relu",
    kernel_initializer="glorot_uniform",
    epsilon=1e-12,
    name=None,
    change_outputs=False,
):
    """Inserts a new layer after a pretrained one: the DA-CNN of the paper.

    In a copy of `model`, the output x of layer `after` goes through a new
    layer before reaching the layers that consumed it:

        h⁺ = activation(W x + b),   y = γ ⊙ h⁺ / ‖h⁺‖₂  (normalize=True)

    a Dense layer of `channels` units, or a 1×1 Conv2D of `channels`
    filters when x is a feature map (rank 4; the norm is then across
    channels at each position), followed with `normalize=True` by a
    `keras_sp.layers.ScaledL2Normalization` (γ per channel, starting at
    `scale_init`). Every other weight is copied exactly. When `channels`
    differs from the width of x, the Dense or Conv2D layers consuming y
    (directly or through channel-wise layers) get a kernel of the new shape,
    freshly initialised by their own `kernel_initializer`; their other
    weights are copied. Keep `channels` equal to the width of x to keep every
    pretrained weight.

    The new layers are named `"<after>_deepen"` and `"<after>_deepen_scale"`
    (or `name` and `"<name>_scale"`). With `keras_sp.regularize`, put the
    first in `new_layers`; the scale layer's γ is treated as GrowLayer's
    (penalised only with `penalize="all"`, toward its starting value).

    Args:
        model: a built functional or Sequential model (models nested inside
            it are searched too). It is not changed.
        after: name of the layer (or nested model) after which to insert.
        channels: int >= 1, the width (output channels) of the new layer.
        normalize: bool, whether to L2-normalise and rescale the new
            layer's output (default True).
        scale_init: positive float, the initial γ.
        activation: activation of the new layer (default `"relu"`).
        kernel_initializer: initializer of the new layer's kernel.
        epsilon: positive float added to ‖h⁺‖² before the square root.
        name: optional name of the new layer.
        change_outputs: bool (default False); True lets `after` be the
            output layer, the new layer then computing the outputs (`channels`
            of them). Otherwise that raises a ValueError naming the shapes.

    Returns:
        A new, uncompiled functional `keras.Model`.

    Example:

    >>> import keras
    >>> from keras_sp.surgery import deepen
    >>> model = keras.Sequential([keras.Input((3,)),
    ...     keras.layers.Dense(4, activation="relu", name="fc"),
    ...     keras.layers.Dense(2, name="head")])
    >>> deeper = deepen(model, after="fc", channels=4)
    >>> [layer.name for layer in deeper.layers[1:]]
    ['fc', 'fc_deepen', 'fc_deepen_scale', 'head']

    Reference:
        Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing
        Model Capacity". CVPR 2017, section 3 (DA-CNN).
    """
    _check_model(model)
    channels = grow.check_channels(channels)
    normalize = check_bool("normalize", normalize)
    change_outputs = check_bool("change_outputs", change_outputs)
    if name is None:
        name = f"{after}_deepen"
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"`name` must be a non-empty string. Received: name={name!r}"
        )
    scale = grow.ScaledL2Normalization(
        scale_init, epsilon=epsilon, name=f"{name}_scale"
    )
    activation = keras.activations.get(activation)
    kernel_initializer = keras.initializers.get(kernel_initializer)
    target = _find(model, after, "after")

    def replace(layer, *args, **kwargs):
        outputs = surgery.copy_call(layer, *args, **kwargs)
        if not isinstance(outputs, keras.KerasTensor):
            raise ValueError(
                f"`after`: layer '{layer.name}' has several outputs; deepen "
                f"needs one. Received: after={after!r}"
            )
        if len(outputs.shape) == 4:
            new_layer = keras.layers.Conv2D(
                channels,
                1,
                activation=activation,
                kernel_initializer=kernel_initializer,
                name=name,
            )
        else:
            new_layer = keras.layers.Dense(
                channels,
                activation=activation,
                kernel_initializer=kernel_initializer,
                name=name,
            )
        deeper = new_layer(outputs)
        if normalize:
            deeper = scale(deeper)
        if deeper.shape[-1] != outputs.shape[-1]:
            surgery._track(deeper)
        return deeper

    def adapt_consumer(original, copy):
        for new, old in zip(copy.weights, original.weights, strict=True):
            if tuple(new.shape) == tuple(old.shape):
                new.assign(old)

    surgery = _Surgery(target, "after", replace, adapt_consumer, single=False)
    return surgery.run(model, change_outputs, "deepening after")
