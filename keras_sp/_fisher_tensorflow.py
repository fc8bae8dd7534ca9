"""Per-example gradients for `keras_sp.fisher`, TensorFlow backend.

`batch_functions` returns the two functions `keras_sp.fisher` needs from
a backend (as `_fisher_jax` and `_fisher_torch` do): `log_probabilities(x)`,
and `squared_scores(x, classes, weights)`, the sum over the examples i and
rows r of a batch of `w_ir (d log f_{c_ir}(x_i) / dw)^2`.

Per-example gradients are vectorised with `tf.vectorized_map` (pfor): the
function differentiating the log-probability of ONE example is traced once
and pfor turns every op into its batched form, so one graph computes the B
gradients of a batch; no Python loop runs over examples. Several scores per
example (the K classes of the exact Fisher, or S sampled labels) nest a
second `tf.vectorized_map` over the rows around it: the forward pass,
which does not depend on the class, is computed once per example, and the
backward passes of all (class, example) pairs run as one batched graph.

A few convolution ops have no batched pfor converter in TensorFlow for the
case per-example gradients meet, and TensorFlow then falls back to a
`tf.while_loop` over examples: `Conv2DBackpropFilter` (the gradient of a
convolution kernel) when the layer input and the output gradient are both
per-example, and the depthwise convolution ops with a shared kernel.
While our functions are traced, `_batched_convolutions` installs
batched converters for them: the per-example kernel gradient as
kh * kw batched matmuls (one per kernel tap, with the FLOPs of the batch
kernel gradient), and the depthwise ops with the loop axis folded into the
batch axis. There is no public TensorFlow hook for pfor converters; the
registry is swapped only while our functions are traced, and TensorFlow's
converter is used for every case ours do not cover.
"""

import contextlib
import threading
import weakref

import tensorflow as tf
from keras import tree

from keras_sp import _keras_private

__all__ = [
    "batch_functions",
]

# Compiled functions per model, so that repeated calls do not trace again.
# They reach the model through a weak reference: the cache never keeps a
# model alive.
_COMPILED = weakref.WeakKeyDictionary()

_CONVERTERS = _keras_private.pfor_converter_registry()
_CONVERTER_LOCK = threading.RLock()


def _windows(images, kernel_size, output_size, strides, dilations, padding):
    """The inputs each kernel tap (i, j) multiplies, over all outputs.

    Returns kh * kw tensors of shape (batch, H', W', C): tap (i, j) of a
    convolution meets `images[:, i*d + s*h, j*d + s*w, :]` at output (h, w)
    (after TensorFlow's "SAME" padding: the extra row or column, if any,
    goes after).
    """
    if padding == b"SAME":
        paddings = [[0, 0]]
        for axis in range(2):
            total = tf.maximum(
                (output_size[axis] - 1) * strides[axis]
                + (kernel_size[axis] - 1) * dilations[axis]
                + 1
                - tf.shape(images)[axis + 1],
                0,
            )
            paddings.append([total // 2, total - total // 2])
        paddings.append([0, 0])
        images = tf.pad(images, paddings)
    windows = []
    for i in range(kernel_size[0]):
        for j in range(kernel_size[1]):
            top, left = i * dilations[0], j * dilations[1]
            bottom = top + (output_size[0] - 1) * strides[0] + 1
            right = left + (output_size[1] - 1) * strides[1] + 1
            windows.append(
                images[:, top : bottom : strides[0], left : right : strides[1]]
            )
    return windows


def _conv2d_backprop_filter_per_example(original):
    """A pfor converter for per-example convolution kernel gradients.

    The kernel gradient of one example is, for each tap (i, j) of the
    kernel, `window_ij(x)^T @ g` over the output positions: kh * kw batched
    matmuls, with the FLOPs of the batch kernel gradient.
    """

    def convert(pfor_input):
        _, inputs_stacked, _ = pfor_input.input(0)
        kernel_shape = pfor_input.op.outputs[0].shape
        if (
            not inputs_stacked
            or pfor_input.get_attr("data_format") != b"NHWC"
            or pfor_input.get_attr("padding") not in (b"SAME", b"VALID")
            or kernel_shape.rank != 4
            or kernel_shape[0] is None
            or kernel_shape[1] is None
        ):
            return original(pfor_input)
        pfor_input.stack_inputs(stack_indices=[0, 2])
        inputs = pfor_input.stacked_input(0)  # (n, b, H, W, C_in)
        grads = pfor_input.stacked_input(2)  # (n, b, H', W', C_out)
        loop_length = tf.shape(inputs)[0]
        channels_in = tf.shape(inputs)[-1]
        channels_out = tf.shape(grads)[-1]
        windows = _windows(
            _fold(inputs),
            (kernel_shape[0], kernel_shape[1]),
            (tf.shape(grads)[2], tf.shape(grads)[3]),
            pfor_input.get_attr("strides")[1:3],
            pfor_input.get_attr("dilations")[1:3],
            pfor_input.get_attr("padding"),
        )
        grads = tf.reshape(grads, [loop_length, -1, channels_out])
        taps = [
            tf.matmul(
                tf.reshape(window, [loop_length, -1, channels_in]),
                grads,
                transpose_a=True,
            )
            for window in windows
        ]
        kernels = tf.reshape(
            tf.stack(taps, axis=1),
            tf.concat(
                [
                    [loop_length, kernel_shape[0], kernel_shape[1]],
                    [channels_in, -1],
                ],
                0,
            ),
        )
        return _keras_private.pfor_wrap(kernels, True)

    return convert


def _fold(tensor):
    """(n, b, ...) -> (n * b, ...): the loop axis joins the batch axis."""
    return tf.reshape(tensor, tf.concat([[-1], tf.shape(tensor)[2:]], 0))


def _unfold(tensor, loop_length):
    """(n * b, ...) -> (n, b, ...)."""
    return tf.reshape(
        tensor, tf.concat([[loop_length, -1], tf.shape(tensor)[1:]], 0)
    )


def _depthwise_attributes(pfor_input):
    return {
        name: pfor_input.get_attr(name)
        for name in (
            "strides",
            "padding",
            "explicit_paddings",
            "data_format",
            "dilations",
        )
    }


def _depthwise_conv(original):
    """Depthwise convolution of per-example inputs with a shared kernel.

    TensorFlow's converter only handles a per-iteration kernel; a shared
    kernel lets the loop axis join the batch axis.
    """

    def convert(pfor_input):
        if pfor_input.input(1)[1] or not pfor_input.input(0)[1]:
            return original(pfor_input)
        outputs = tf.raw_ops.DepthwiseConv2dNative(
            input=_fold(pfor_input.stacked_input(0)),
            filter=pfor_input.unstacked_input(1),
            **_depthwise_attributes(pfor_input),
        )
        loop_length = pfor_input.pfor.loop_len_vector[0]
        return _keras_private.pfor_wrap(_unfold(outputs, loop_length), True)

    return convert


def _depthwise_conv_backprop_input(original):
    """Gradient of a depthwise convolution's input, shared kernel."""

    def convert(pfor_input):
        if pfor_input.input(1)[1] or not pfor_input.input(2)[1]:
            return original(pfor_input)
        loop_length = pfor_input.pfor.loop_len_vector[0]
        sizes = pfor_input.unstacked_input(0)
        sizes = sizes * tf.concat(
            [tf.cast(pfor_input.pfor.loop_len_vector, sizes.dtype), [1, 1, 1]],
            0,
        )
        outputs = tf.raw_ops.DepthwiseConv2dNativeBackpropInput(
            input_sizes=sizes,
            filter=pfor_input.unstacked_input(1),
            out_backprop=_fold(pfor_input.stacked_input(2)),
            **_depthwise_attributes(pfor_input),
        )
        return _keras_private.pfor_wrap(_unfold(outputs, loop_length), True)

    return convert


def _depthwise_conv_backprop_filter(original):
    """Gradient of a depthwise kernel when only the output gradient is
    per-iteration (the shared input is broadcast)."""

    def convert(pfor_input):
        pfor_input.stack_inputs(stack_indices=[0, 2])
        return original(pfor_input)

    return convert


# Converters installed while our functions are traced: op type -> a
# function of TensorFlow's converter (None when it has none).
_BATCHED_CONVERTERS = {
    "Conv2DBackpropFilter": _conv2d_backprop_filter_per_example,
    "DepthwiseConv2dNative": _depthwise_conv,
    "DepthwiseConv2dNativeBackpropInput": _depthwise_conv_backprop_input,
    "DepthwiseConv2dNativeBackpropFilter": _depthwise_conv_backprop_filter,
}


@contextlib.contextmanager
def _batched_convolutions():
    """Installs the batched pfor converters of `_BATCHED_CONVERTERS`."""
    with _CONVERTER_LOCK:
        if _CONVERTERS is None:
            yield
            return
        originals = {
            name: _CONVERTERS.get(name) for name in _BATCHED_CONVERTERS
        }
        for name, make in _BATCHED_CONVERTERS.items():
            _CONVERTERS[name] = make(originals[name])
        try:
            yield
        finally:
            for name, original in originals.items():
                if original is None:
                    _CONVERTERS.pop(name, None)
                else:
                    _CONVERTERS[name] = original


class _Functions:
    def __init__(self, model_ref, variables, outputs):
        def log_probabilities(x):
            return outputs.log_probabilities(
                lambda: model_ref()(x, training=False)
            )

        def squared_scores(x, classes, weights):
            return _batch_total(
                model_ref(), variables, log_probabilities, x, classes, weights
            )

        self._log_probabilities = tf.function(
            log_probabilities, autograph=False, reduce_retracing=True
        )
        self._squared_scores = tf.function(
            squared_scores, autograph=False, reduce_retracing=True
        )

    def log_probabilities(self, x):
        """log f_k(x) of a batch, (batch, K), float64 NumPy."""
        x = tree.map_structure(tf.convert_to_tensor, x)
        return self._log_probabilities(x).numpy().astype("float64")

    def squared_scores(self, x, classes, weights):
        """`sum_i sum_r w_ir (d log f_{c_ir}(x_i) / dw)^2` per variable
        (NumPy), for `classes` and `weights` of shape (B, R)."""
        arguments = (
            tree.map_structure(tf.convert_to_tensor, x),
            tf.convert_to_tensor(classes, "int32"),
            tf.convert_to_tensor(weights, "float32"),
        )
        # Our converters are needed while tracing only.
        with _batched_convolutions():
            concrete = self._squared_scores.get_concrete_function(*arguments)
        return [s.numpy() for s in concrete(*arguments)]


def _example_terms(variables, log_probabilities, x, label, weight):
    """For one example: weight * (d log f_label(x) / dw)^2 per variable."""
    x = tree.map_structure(lambda t: t[None], x)
    with tf.GradientTape() as tape:
        score = tf.gather(log_probabilities(x)[0], label)
    gradients = tape.gradient(
        score, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    terms = []
    for gradient in gradients:
        gradient = tf.convert_to_tensor(gradient)
        terms.append(tf.cast(weight, gradient.dtype) * tf.square(gradient))
    return terms


def _batch_total(model, variables, log_probabilities, x, classes, weights):
    """The traced body of `squared_scores`: a `tf.vectorized_map` over the
    rows r around a `tf.vectorized_map` over the examples i."""

    def per_row(row):
        labels, row_weights = row

        def per_example(element):
            x_i, label, weight = element
            return _example_terms(
                variables, log_probabilities, x_i, label, weight
            )

        terms = tf.vectorized_map(per_example, (x, labels, row_weights))
        return [tf.reduce_sum(term, axis=0) for term in terms]

    sums = tf.vectorized_map(
        per_row, (tf.transpose(classes), tf.transpose(weights))
    )
    return [tf.reduce_sum(s, axis=0) for s in sums]


def batch_functions(model, variables, outputs):
    """The per-batch functions of `diagonal_fisher` for `model`.

    Args:
        model: a built Keras model with one categorical output.
        variables: the variables to differentiate.
        outputs: a `keras_sp._fisher_outputs.Outputs`.

    Returns:
        An object with `log_probabilities(x)` and
        `squared_scores(x, classes, weights)`.
    """
    key = (outputs.key,) + tuple(id(variable) for variable in variables)
    functions = _COMPILED.setdefault(model, {})
    if key not in functions:
        functions[key] = _Functions(weakref.ref(model), variables, outputs)
    return functions[key]
