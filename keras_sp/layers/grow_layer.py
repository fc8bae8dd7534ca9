"""Growing a network: new channels beside a pretrained layer, normalised and
scaled so that old and new channels learn at the same pace.

Reference:
    Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing Model
    Capacity". CVPR 2017, section 3.
"""

import keras
from keras import ops

from keras_sp._checks import check_bool

__all__ = [
    "GrowLayer",
    "ScaledL2Normalization",
]

# Layers whose output channels GrowLayer can extend.
GROWABLE = (keras.layers.Dense, keras.layers.Conv2D)


def _l2_normalize(x, epsilon):
    """x / sqrt(||x||^2 + epsilon) over the last (channel) axis."""
    square_sum = ops.sum(ops.square(x), axis=-1, keepdims=True)
    return x * ops.rsqrt(square_sum + ops.cast(epsilon, x.dtype))


def _check_positive(name, value):
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
        or value == float("inf")
    ):
        raise ValueError(
            f"`{name}` must be a positive number. Received: {name}={value!r}"
        )
    return float(value)


def check_channels(channels):
    """Returns `channels` if it is an int >= 1, else raises a ValueError."""
    if (
        isinstance(channels, bool)
        or not isinstance(channels, int)
        or channels < 1
    ):
        raise ValueError(
            "`channels` must be an integer >= 1. Received: "
            f"channels={channels!r}"
        )
    return channels


def output_channels(layer):
    """The number of output channels (units or filters) of a growable layer."""
    if isinstance(layer, keras.layers.Dense):
        return layer.units
    return layer.filters


def check_growable(layer, argument="layer"):
    """Raises a ValueError unless `layer` is a built Dense or channels-last
    Conv2D layer."""
    if not isinstance(layer, GROWABLE):
        raise ValueError(
            f"`{argument}` must be a Dense or Conv2D layer. Received: "
            f"{argument}={getattr(layer, 'name', layer)!r} of type "
            f"{type(layer).__name__}"
        )
    if (
        isinstance(layer, keras.layers.Conv2D)
        and layer.data_format != "channels_last"
    ):
        raise ValueError(
            f"`{argument}` must be a channels_last Conv2D. Received: "
            f"{argument}={layer.name!r} with data_format="
            f"{layer.data_format!r}"
        )
    if not layer.built:
        raise ValueError(
            f"`{argument}` must be built (a pretrained layer with weights). "
            f"Call it on data or `build(input_shape)` first. Received: "
            f"{argument}={layer.name!r}, not built"
        )


@keras.saving.register_keras_serializable(package="keras_sp")
class GrowLayer(keras.layers.Wrapper):
    """Widens a pretrained Dense or Conv2D layer with new channels (WA-CNN).

    The wrapped layer computes the pretrained activations h; `channels` new
    channels of the same kind (same activation, same kernel size) compute h⁺
    from the same input. With `normalize=True` each part is L2-normalised
    on its own and every channel is rescaled by a learned γ:

        ĥ = h / ‖h‖₂,   ĥ⁺ = h⁺ / ‖h⁺‖₂,   y = [γ_old ⊙ ĥ, γ_new ⊙ ĥ⁺]

    (old channels first). γ has one entry per output channel, all starting
    at `scale_init`. For a Dense layer the norm is over the feature vector;
    for a Conv2D layer it is across channels at each spatial position, the
    choice of ParseNet, from which the scheme comes. In code the norm is
    `sqrt(‖h‖² + epsilon)`. With `normalize=False` the output is the plain
    concatenation `[h, h⁺]` and there is no γ: the paper's "WA-CNN-ori".

    New channels start from random weights, so their activations and the
    error signal they receive are smaller than those of the pretrained ones:
    they learn slowly. Normalising each part and scaling it back up lets
    both learn at the same pace.

    The wrapped layer's weights are not changed; the new channels are
    computed by the sublayer `new_layer`, named `"<name>_new"` (a layer of
    the wrapped layer's class, whose variables are named "kernel" and
    "bias"), and γ is this layer's variable "gamma".

    With `keras_sp.regularize`, pass `new_layer` (not the GrowLayer) in
    `new_layers`: the wrapped layer is pretrained, so it belongs to the
    shared part and is pulled toward its starting point, while the new
    kernel and bias get plain L2 toward 0 like any new layer. Passing the
    GrowLayer itself would also put the wrapped pretrained layer in the new
    part. γ is never penalised with `penalize="kernels"` (the default); with
    `penalize="all"` it is penalised with the shared part, toward its value
    when `regularize` is called, like a BatchNormalization γ: L2 toward 0
    would shrink the scale that the method needs.

    Args:
        layer: a built `keras.layers.Dense` or channels-last
            `keras.layers.Conv2D`, usually pretrained.
        channels: int >= 1, the number of new output channels (units of a
            Dense layer, filters of a Conv2D layer).
        normalize: bool, whether to L2-normalise the old and new parts
            separately and rescale them by γ (default True).
        scale_init: positive float, the initial value of every γ (default
            10; ParseNet and the paper use 10 or 20).
        kernel_initializer: initializer of the new channels' kernel (default
            `"glorot_uniform"`, Keras's default for a new layer).
        bias_initializer: initializer of the new channels' bias (default
            `"zeros"`).
        epsilon: positive float added to ‖h‖² before the square root.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: the input of the wrapped layer.

    Returns:
        A tensor with `output_channels + channels` channels on its last axis.

    Example:

    >>> import keras
    >>> from keras_sp.layers import GrowLayer
    >>> fc = keras.layers.Dense(4, kernel_initializer="ones")
    >>> fc.build((None, 3))
    >>> grow = GrowLayer(fc, channels=2, kernel_initializer="ones")
    >>> y = grow(keras.ops.ones((1, 3)))
    >>> tuple(y.shape)
    (1, 6)
    >>> # Each part has norm scale_init = 10: 10 * [1, 1, 1, 1] / 2 for
    >>> # the old channels, 10 * [1, 1] / sqrt(2) for the new ones.
    >>> [round(float(v), 3) for v in keras.ops.convert_to_numpy(y)[0]]
    [5.0, 5.0, 5.0, 5.0, 7.071, 7.071]

    Reference:
        Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing
        Model Capacity". CVPR 2017, section 3.2 (normalisation and adaptive
        scaling). Liu, Rabinovich, Berg. "ParseNet: Looking Wider to See
        Better". ICLR 2016 workshop.
    """

    def __init__(
        self,
        layer,
        channels,
        *,
        normalize=True,
        scale_init=10.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        epsilon=1e-12,
        **kwargs,
    ):
        check_growable(layer)
        super().__init__(layer, **kwargs)
        self.channels = check_channels(channels)
        self.normalize = check_bool("normalize", normalize)
        self.scale_init = _check_positive("scale_init", scale_init)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.epsilon = _check_positive("epsilon", epsilon)
        config = layer.get_config()
        width = "units" if isinstance(layer, keras.layers.Dense) else "filters"
        config.update(
            {
                "name": f"{self.name}_new",
                width: self.channels,
                "kernel_initializer": self.kernel_initializer,
                "bias_initializer": self.bias_initializer,
                "kernel_regularizer": None,
                "bias_regularizer": None,
                "activity_regularizer": None,
                "kernel_constraint": None,
                "bias_constraint": None,
                "trainable": True,
            }
        )
        self.new_layer = type(layer).from_config(config)

    @property
    def new_units(self):
        """`new_layer` under its name in files saved before the rename.

        Keras finds a sublayer's weights in a `.keras` file under the
        attribute that holds it; files saved before hold them under
        `new_units`, which this alias keeps loading. Use `new_layer`.
        """
        return self.new_layer

    @property
    def old_channels(self):
        """The number of output channels of the wrapped layer."""
        return output_channels(self.layer)

    def build(self, input_shape):
        super().build(input_shape)
        self.new_layer.build(input_shape)
        if self.normalize:
            self.gamma = self.add_weight(
                name="gamma",
                shape=(self.old_channels + self.channels,),
                initializer=keras.initializers.Constant(self.scale_init),
            )

    def call(self, inputs):
        old = self.layer(inputs)
        new = self.new_layer(inputs)
        if not self.normalize:
            return ops.concatenate([old, new], axis=-1)
        outputs = ops.concatenate(
            [
                _l2_normalize(old, self.epsilon),
                _l2_normalize(new, self.epsilon),
            ],
            axis=-1,
        )
        return outputs * ops.cast(self.gamma, outputs.dtype)

    def compute_output_shape(self, input_shape):
        shape = tuple(self.layer.compute_output_shape(input_shape))
        return shape[:-1] + (shape[-1] + self.channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "channels": self.channels,
                "normalize": self.normalize,
                "scale_init": self.scale_init,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "epsilon": self.epsilon,
            }
        )
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        if "units" in config and "channels" not in config:
            # Configs saved before the argument was renamed.
            config["channels"] = config.pop("units")
        return super().from_config(config, custom_objects)


@keras.saving.register_keras_serializable(package="keras_sp")
class ScaledL2Normalization(keras.layers.Layer):
    """L2-normalises each feature vector and rescales it by a learned γ.

        y = γ ⊙ x / ‖x‖₂

    with the norm over the last (channel) axis, so for a feature map it is
    taken at each spatial position (ParseNet), and γ (one entry per
    channel) starting at `scale_init`. In code the norm is
    `sqrt(‖x‖² + epsilon)`. `keras_sp.deepen` puts it after the new layer
    of a DA-CNN.

    Args:
        scale_init: positive float, the initial value of every γ.
        epsilon: positive float added to ‖x‖² before the square root.
        **kwargs: base layer arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: a tensor with channels on its last axis.

    Returns:
        A tensor of the same shape.

    Example:

    >>> import keras
    >>> from keras_sp.layers import ScaledL2Normalization
    >>> layer = ScaledL2Normalization(scale_init=10.0)
    >>> y = layer(keras.ops.convert_to_tensor([[3.0, 4.0]]))
    >>> [round(float(v), 4) for v in keras.ops.convert_to_numpy(y)[0]]
    [6.0, 8.0]

    Reference:
        Wang, Ramanan, Hebert. "Growing a Brain: Fine-Tuning by Increasing
        Model Capacity". CVPR 2017, section 3.2. Liu, Rabinovich, Berg.
        "ParseNet: Looking Wider to See Better". ICLR 2016 workshop.
    """

    def __init__(self, scale_init=10.0, epsilon=1e-12, **kwargs):
        super().__init__(**kwargs)
        self.scale_init = _check_positive("scale_init", scale_init)
        self.epsilon = _check_positive("epsilon", epsilon)

    def build(self, input_shape):
        self.gamma = self.add_weight(
            name="gamma",
            shape=(input_shape[-1],),
            initializer=keras.initializers.Constant(self.scale_init),
        )

    def call(self, inputs):
        outputs = _l2_normalize(inputs, self.epsilon)
        return outputs * ops.cast(self.gamma, outputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update({"scale_init": self.scale_init, "epsilon": self.epsilon})
        return config
