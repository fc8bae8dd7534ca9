"""Per-example gradients for `keras_sp.fisher`, TensorFlow backend.

Everything `keras_sp.fisher` needs from a backend lives here, behind two
functions: `inspect_outputs` (what the model outputs) and
`squared_score_sums` (the sums of weighted squared per-example scores for
one batch). A JAX path would provide the same two functions with
`jax.vmap(jax.grad(...))` over `model.stateless_call`.

Per-example gradients are vectorised with `tf.vectorized_map` (pfor): the
function differentiating the log-probability of ONE example is traced once
and pfor turns every op into its batched form, so one graph computes the B
gradients of a batch; no Python loop runs over examples. Several scores per
example (the K classes of the exact Fisher, or S sampled labels) nest a
second `tf.vectorized_map` over the classes around it: the forward pass,
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

import numpy as np
import tensorflow as tf
from keras import tree
from tensorflow.python.ops.parallel_for import pfor as _pfor

from keras_sp import _keras_private

__all__ = [
    "inspect_outputs",
    "squared_score_sums",
]

# Probabilities are clipped at this value before their log is taken when
# the model outputs probabilities that keras-sp cannot trace back to logits
# (as Keras's crossentropy does).
PROBABILITY_EPSILON = 1e-7

# Compiled functions per model, so that repeated calls do not trace again.
# They reach the model through a weak reference: the cache never keeps a
# model alive.
_COMPILED = weakref.WeakKeyDictionary()

_CONVERTERS = getattr(_pfor, "_pfor_converter_registry", None)
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
        return _pfor.wrap(kernels, True)

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
        return _pfor.wrap(_unfold(outputs, loop_length), True)

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
        return _pfor.wrap(_unfold(outputs, loop_length), True)

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


def _output_kind(output):
    """`"softmax"`, `"sigmoid"` or None, and the logits when found.

    Keras's `softmax` and `sigmoid` record their input on the (symbolic)
    output, as Keras's own crossentropy uses; an output made by a raw
    `Softmax` op is recognised by its op type.
    """
    op_type = getattr(getattr(output, "op", None), "type", None)
    logits = _keras_private.keras_logits(output)
    if op_type == "Sigmoid":
        return "sigmoid", logits
    if op_type == "Softmax" and logits is None:
        logits = output.op.inputs[0]
    if logits is not None:
        return "softmax", logits
    return None, None


def _log_probabilities(outputs, from_logits):
    """log f_k(x) from the model's (single) output, of shape (batch, K).

    `from_logits=None`: log-softmax of the logits under a final softmax
    when there is one, otherwise of the outputs themselves.
    """
    output = tree.flatten(outputs)[0]
    kind, logits = _output_kind(output)
    if from_logits is True or (from_logits is None and kind != "softmax"):
        return tf.nn.log_softmax(tf.cast(output, "float32"))
    if kind == "softmax":
        return tf.nn.log_softmax(tf.cast(logits, "float32"))
    probabilities = tf.cast(output, "float32")
    return tf.math.log(tf.clip_by_value(probabilities, PROBABILITY_EPSILON, 1))


def inspect_outputs(model, x):
    """Calls `model` on `x` in inference mode and describes its outputs.

    Returns:
        A dict: `"count"` (number of output tensors), `"shape"` (the first
        output's shape), `"kind"` (`"softmax"`, `"sigmoid"` or None: the
        final activation when it can be told) and `"values"` (the first
        output as a NumPy array).
    """
    functions = _COMPILED.setdefault(model, {})
    if "inspect" not in functions:
        found = {}
        model_ref = weakref.ref(model)

        def call(x):
            outputs = tree.flatten(model_ref()(x, training=False))
            found["count"] = len(outputs)
            found["kind"] = _output_kind(outputs[0])[0]
            return outputs[0]

        functions["inspect"] = (
            tf.function(call, autograph=False, reduce_retracing=True),
            found,
        )
    call, found = functions["inspect"]
    values = call(x).numpy()
    return {
        "count": found["count"],
        "shape": values.shape,
        "kind": found["kind"],
        "values": values,
    }


def _example_terms(model, variables, from_logits, x, choose):
    """For one example: weight * (d log f_c(x) / dw)^2 for each variable.

    `choose(log_probabilities)` returns the class c and its weight.
    """
    x = tree.map_structure(lambda t: t[None], x)
    with tf.GradientTape() as tape:
        log_probabilities = _log_probabilities(
            model(x, training=False), from_logits
        )[0]
        label, weight = choose(tf.stop_gradient(log_probabilities))
        score = tf.gather(log_probabilities, label)
    gradients = tape.gradient(
        score, variables, unconnected_gradients=tf.UnconnectedGradients.ZERO
    )
    terms = []
    for gradient in gradients:
        gradient = tf.convert_to_tensor(gradient)
        terms.append(tf.cast(weight, gradient.dtype) * tf.square(gradient))
    return terms


def _sum_over_examples(model, variables, from_logits, elements, choose):
    """Sums `_example_terms` over the examples of `elements`, vectorised."""

    def one(element):
        x, extra = element
        return _example_terms(
            model,
            variables,
            from_logits,
            x,
            lambda log_probabilities: choose(log_probabilities, extra),
        )

    terms = tf.vectorized_map(one, elements)
    return [tf.reduce_sum(term, axis=0) for term in terms]


def squared_score_sums(
    model, variables, *, mode, samples, num_classes, from_logits
):
    """Builds the per-batch function of `keras_sp.fisher.diagonal_fisher`.

    The returned function `run(x, labels, mask, seed, rows)` returns, for
    each variable, `sum_i mask_i sum_r w_ir (d log f_{c_ir}(x_i) / dw)^2`
    over the batch as a NumPy array, where the rows r and their classes
    c_ir and weights w_ir are:

    - `"empirical"`: one row, c = the label, w = 1;
    - `"exact"`: the classes `rows` (a chunk of 0..K-1), w = f_c(x_i);
    - `"sampled"` with `samples` < K: the draws `rows` (a chunk of
      0..S-1), c = a label drawn from f(x_i), w = 1/S;
    - `"sampled"` with `samples` >= K: the classes `rows`, w = (number of
      the S draws equal to c) / S (the same estimate, with at most K
      backward passes per example).

    Draws use the Gumbel-max trick: argmax_k(log f_k(x_i) + G_ik), with
    G_ik standard Gumbel noise from `tf.random.stateless_uniform(seed)`.

    Args:
        model: a built Keras model with one categorical output.
        variables: the variables to differentiate.
        mode: `"exact"`, `"sampled"` or `"empirical"`.
        samples: number of draws per example (`"sampled"`).
        num_classes: K.
        from_logits: True, False or None, as in `diagonal_fisher`.

    Returns:
        `run(x, labels, mask, seed, rows)`.
    """
    key = (mode, samples, num_classes, from_logits) + tuple(
        id(variable) for variable in variables
    )
    functions = _COMPILED.setdefault(model, {})
    if key not in functions:
        functions[key] = tf.function(
            _batch_total(
                weakref.ref(model),
                variables,
                mode=mode,
                samples=samples,
                num_classes=num_classes,
                from_logits=from_logits,
            ),
            autograph=False,
            reduce_retracing=True,
        )
    compiled = functions[key]

    def run(x, labels, mask, seed, rows):
        arguments = (
            tree.map_structure(tf.convert_to_tensor, x),
            tf.convert_to_tensor(labels, "int32"),
            tf.convert_to_tensor(mask, "float32"),
            tf.convert_to_tensor(seed, "int64"),
            tf.convert_to_tensor(rows, "int32"),
        )
        # Our converters are needed while tracing only.
        with _batched_convolutions():
            concrete = compiled.get_concrete_function(*arguments)
        return [s.numpy() for s in concrete(*arguments)]

    return run


def _batch_total(
    model_ref, variables, *, mode, samples, num_classes, from_logits
):
    """The traced body of `squared_score_sums`'s function."""
    by_class = mode == "exact" or (mode == "sampled" and samples >= num_classes)
    single_row = mode == "empirical" or (mode == "sampled" and samples == 1)

    def noise(seed, batch):
        uniform = tf.random.stateless_uniform(
            [samples, batch, num_classes],
            seed=seed,
            minval=np.finfo("float32").tiny,
            maxval=1.0,
        )
        return -tf.math.log(-tf.math.log(uniform))

    def total(x, labels, mask, seed, rows):
        model = model_ref()
        batch = tf.shape(mask)[0]
        if mode == "empirical":
            return _sum_over_examples(
                model,
                variables,
                from_logits,
                (x, (labels, mask)),
                lambda _, extra: extra,
            )
        if single_row:
            gumbel = noise(seed, batch)[0]
            return _sum_over_examples(
                model,
                variables,
                from_logits,
                (x, (gumbel, mask)),
                lambda log_p, extra: (
                    tf.argmax(log_p + extra[0], output_type="int32"),
                    extra[1],
                ),
            )
        if mode == "exact":

            def per_class(label):
                return _sum_over_examples(
                    model,
                    variables,
                    from_logits,
                    (x, mask),
                    lambda log_p, weight: (
                        label,
                        weight * tf.exp(tf.gather(log_p, label)),
                    ),
                )

            sums = tf.vectorized_map(per_class, rows)
        elif by_class:
            gumbel = tf.transpose(noise(seed, batch), [1, 0, 2])

            def per_class(label):
                def choose(log_p, extra):
                    draws = tf.argmax(log_p + extra[0], -1, output_type="int32")
                    count = tf.reduce_sum(tf.cast(draws == label, "float32"))
                    return label, extra[1] * count / samples

                return _sum_over_examples(
                    model, variables, from_logits, (x, (gumbel, mask)), choose
                )

            sums = tf.vectorized_map(per_class, rows)
        else:
            gumbel = noise(seed, batch)

            def per_draw(draw):
                return _sum_over_examples(
                    model,
                    variables,
                    from_logits,
                    (x, (tf.gather(gumbel, draw), mask)),
                    lambda log_p, extra: (
                        tf.argmax(log_p + extra[0], output_type="int32"),
                        extra[1] / samples,
                    ),
                )

            sums = tf.vectorized_map(per_draw, rows)
        return [tf.reduce_sum(s, axis=0) for s in sums]

    return total
