"""Zeroing one channel of a layer's output, for DELTA's channel attention.

`keras_sp.transfer_statistics.channel_attention` measures the loss increase
when channel j of a layer's output is set to zero. `ChannelZeroing` does it
without touching any variable: inside `active()`, the call of each chosen
layer is replaced on the instance by one that multiplies its channel-last
output by a mask with a 0 at that channel (the same instance-level
replacement `keras_sp._fisher_outputs` uses to read logits before a final
softmax). `resolve_layers` finds the layers by name, nested models
included.

A pass with a channel zeroed only needs to recompute what lies downstream
of the zeroed layer. Every other layer of the model (except the ones that
contain a chosen layer) is wrapped too: during the first pass over a batch,
with nothing zeroed, each call's outputs are kept under the identity of its
input tensors; in a later pass, a call whose inputs are those very tensors
returns the kept outputs without computing. Anything recomputed yields new
tensor objects, so every call downstream of the zeroed channel misses the
cache and runs: the results are the ones a full forward pass gives, at the
cost of the layers downstream of the zeroed one (plus Keras' per-call
overhead).
"""

import contextlib
import difflib
import functools

import keras
import numpy as np
from keras import ops
from keras import tree

from keras_sp import _keras_private

__all__ = ["ChannelZeroing", "channel_counts", "resolve_layers"]


def resolve_layers(model, layers):
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    try:
        layers = list(layers)
    except TypeError:
        raise ValueError(
            "`layers` must be a list of layer names (or layers) of the model. "
            f"Received: layers={layers!r}"
        ) from None
    if not layers:
        raise ValueError(
            "`layers` must name at least one layer. Received: layers=[]"
        )
    inside = _keras_private.all_layers(model)
    by_name = {}
    for layer in inside:
        by_name.setdefault(layer.name, []).append(layer)
    resolved = []
    for item in layers:
        if isinstance(item, keras.layers.Layer):
            if not any(item is layer for layer in inside):
                raise ValueError(
                    f"`layers`: layer '{item.name}' is not in model "
                    f"'{model.name}'. Received: layers="
                    f"{[getattr(a, 'name', a) for a in layers]}"
                )
            resolved.append(item)
            continue
        if not isinstance(item, str):
            raise ValueError(
                "`layers` must hold layer names or layers. Received: "
                f"an element {item!r}"
            )
        matches = by_name.get(item, [])
        if not matches:
            close = difflib.get_close_matches(item, list(by_name), n=5)
            hint = f" Close names: {close}." if close else ""
            raise ValueError(
                f"`layers`: model '{model.name}' (nested models included) "
                f"has no layer named '{item}'.{hint} Received: "
                f"layers={layers!r}"
            )
        if len(matches) > 1:
            raise ValueError(
                f"`layers`: model '{model.name}' has {len(matches)} layers "
                f"named '{item}' (in different nested models): pass the "
                f"layer object. Received: layers={layers!r}"
            )
        resolved.append(matches[0])
    names = [layer.name for layer in resolved]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"`layers` names a layer more than once. Received: repeated "
            f"{repeated}"
        )
    for layer in resolved:
        if getattr(layer, "data_format", None) == "channels_first":
            raise ValueError(
                f"`layers`: layer '{layer.name}' has "
                "data_format='channels_first': the channel attention is "
                "over the last axis of a channel-last feature map. Received: "
                f"{layer.name!r} (channels_first)"
            )
    return resolved


def _tensors(structure):
    return [
        leaf
        for leaf in tree.flatten(structure)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    ]


def _contains(layer, chosen):
    """Whether one of the `chosen` layers is `layer` or inside it."""
    if any(layer is item for item in chosen):
        return True
    inside = _keras_private.all_layers(layer)
    return any(item is other for item in chosen for other in inside)


class ChannelZeroing:
    """Records the outputs of some layers and zeroes one channel of one.

    Inside `active()`, each layer's call (or quantized call) is replaced on
    the instance by one that calls the original and then, for the layer
    whose channel is `zeroed`, multiplies the channel-last output by a mask
    with a 0 at that channel. No variable is touched.

    With `model` given, the other layers of the model reuse the outputs of
    the last pass run with `zeroed` None (see the module docstring); call
    `forget()` before that pass on each new batch.
    """

    def __init__(self, layers, model=None):
        self.layers = layers
        self.shapes = {}
        self.zeroed = None  # (layer index, channel) or None
        self.reused = []
        if model is not None:
            self.reused = [
                layer
                for layer in _keras_private.all_layers(model)
                if not _contains(layer, layers)
            ]
        self.forget()

    def forget(self):
        """Drops the outputs kept from earlier passes."""
        self._outputs = {}
        self._kept = []

    def _cached(self, layer, original, args, kwargs):
        """The layer's outputs: kept ones when its inputs are tensors of the
        recording pass (nothing zeroed), computed otherwise."""
        inputs = _tensors((args, kwargs))
        key = (id(layer), tuple(id(tensor) for tensor in inputs))
        if self.zeroed is not None and key in self._outputs:
            return self._outputs[key]
        outputs = original(*args, **kwargs)
        if self.zeroed is None:
            # Keeping the tensors alive keeps their ids unique.
            self._kept.append((inputs, outputs))
            self._outputs[key] = outputs
        return outputs

    def _wrap_reused(self, layer, original):
        def call(*args, **kwargs):
            return self._cached(layer, original, args, kwargs)

        return call

    def _wrap(self, index, original):
        def call(*args, **kwargs):
            layer = self.layers[index]
            outputs = self._cached(layer, original, args, kwargs)
            if not (hasattr(outputs, "shape") and hasattr(outputs, "dtype")):
                raise ValueError(
                    f"`layers`: layer '{layer.name}' must output one "
                    "channel-last feature map (batch, ..., channels). "
                    f"Received: {layer.name!r} with outputs of type "
                    f"{type(outputs).__name__}"
                )
            self.shapes.setdefault(index, tuple(outputs.shape))
            if self.zeroed is None or self.zeroed[0] != index:
                return outputs
            channels = outputs.shape[-1]
            mask = np.ones((channels,), "float32")
            mask[self.zeroed[1]] = 0.0
            return outputs * ops.cast(mask, outputs.dtype)

        return call

    @contextlib.contextmanager
    def active(self):
        wrapped = [
            (layer, functools.partial(self._wrap, index))
            for index, layer in enumerate(self.layers)
        ]
        wrapped += [
            (layer, functools.partial(self._wrap_reused, layer))
            for layer in self.reused
        ]
        replacements = [
            (
                layer,
                "call"
                if getattr(layer, "quantization_mode", None) is None
                else "quantized_call",
                wrap,
            )
            for layer, wrap in wrapped
        ]
        try:
            with _keras_private.overridden(replacements):
                yield
        finally:
            self.forget()


def channel_counts(layers, shapes):
    channels = []
    for index, layer in enumerate(layers):
        if index not in shapes:
            raise ValueError(
                f"`layers`: layer '{layer.name}' does not run when the model "
                "is called (it is not on the path from the inputs to the "
                f"outputs). Received: {layer.name!r}"
            )
        shape = shapes[index]
        if len(shape) < 2 or shape[-1] is None or shape[-1] < 1:
            raise ValueError(
                f"`layers`: layer '{layer.name}' must output a channel-last "
                "feature map (batch, h, w, channels) or (batch, channels). "
                f"Received: {layer.name!r} with output shape {shape}"
            )
        axis = getattr(layer, "axis", -1)
        if isinstance(layer, keras.layers.BatchNormalization) and axis not in (
            -1,
            len(shape) - 1,
        ):
            raise ValueError(
                f"`layers`: layer '{layer.name}' normalises axis {axis}, not "
                "the last one: its feature map is not channel-last. "
                f"Received: {layer.name!r} with axis={axis}"
            )
        channels.append(int(shape[-1]))
    return channels
