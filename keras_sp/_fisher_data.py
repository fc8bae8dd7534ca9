"""The data of `keras_sp.fisher.diagonal_fisher`: batches of NumPy arrays.

Backend-neutral. Accepted forms:

- arrays: `x` (one array, or a list or dict of arrays for several inputs),
  `(x,)` or `(x, y)`; NumPy arrays or TensorFlow, JAX or PyTorch tensors;
- an iterable of batches, each `x`, `(x,)` or `(x, y)`: a batched
  `tf.data.Dataset`, a PyTorch `DataLoader`, a `keras.utils.PyDataset`, a
  Python generator or any other iterable. As in `model.fit`, a list
  element is read as a tuple (a `DataLoader` over `(x, y)` pairs yields
  `[x, y]` lists): several inputs then come as a tuple or dict inside it.

Every batch is checked against the model's input shape (when the model
has one: a Functional or Sequential model), with an error naming the
expected and the received shape.
"""

import math
import weakref

import numpy as np
from keras import tree

__all__ = [
    "batches",
    "check_all_trainable",
    "check_batched",
    "check_input_shapes",
    "class_labels",
    "example_count",
    "is_iterable_of_batches",
    "pad",
    "split",
    "to_numpy",
]


def _is_array(value):
    return hasattr(value, "shape") and hasattr(value, "dtype")


def _is_tf_dataset(data):
    return type(data).__module__.startswith("tensorflow") and hasattr(
        data, "element_spec"
    )


def is_iterable_of_batches(data):
    """Whether `data` yields batches (rather than being the arrays)."""
    if _is_array(data) or isinstance(data, (tuple, list, dict, str, bytes)):
        return False
    return _is_tf_dataset(data) or hasattr(data, "__iter__")


def split(element, argument="data", lists_are_tuples=False):
    """`(x, y)` from `x`, `(x,)` or `(x, y)`."""
    if lists_are_tuples and isinstance(element, list):
        element = tuple(element)
    if isinstance(element, tuple):
        if len(element) == 1:
            return element[0], None
        if len(element) == 2:
            return element
        raise ValueError(
            f"`{argument}` must be `x`, `(x,)` or `(x, y)`: sample weights "
            "are not used by the Fisher information. Received: a tuple of "
            f"{len(element)} elements"
        )
    return element, None


def to_numpy(value):
    if hasattr(value, "detach"):  # a PyTorch tensor
        return value.detach().cpu().numpy()
    if hasattr(value, "numpy"):  # a TensorFlow tensor
        return value.numpy()
    return np.asarray(value)


def example_count(x, y, argument="data"):
    """Number of examples in a chunk; all arrays must agree."""
    leaves = tree.flatten(x)
    if not leaves:
        raise ValueError(f"`{argument}` has no input arrays. Received: x={x!r}")
    lengths = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in leaves}
    if y is not None:
        lengths.add(np.shape(y)[0] if np.ndim(y) else None)
    if None in lengths or len(lengths) != 1:
        raise ValueError(
            f"Every array in `{argument}` must hold the same number of "
            "examples along its first axis. Received: lengths "
            f"{sorted(str(n) for n in lengths)}"
        )
    return lengths.pop()


def _expected_inputs(model):
    """The model's symbolic inputs (a tensor, list or dict), or None.

    A Functional model has `input` (its input structure); a Sequential
    model has `inputs` only; a subclassed model has neither.
    """
    for attribute in ("input", "inputs"):
        try:
            inputs = getattr(model, attribute)
        except (AttributeError, ValueError):
            continue
        if inputs is not None and tree.flatten(inputs):
            return inputs
    return None


def _compatible(expected, received):
    if len(expected) != len(received):
        return False
    return all(
        e is None or e == r
        for e, r in zip(expected[1:], received[1:], strict=True)
    )


def _shape_error(model, name, expected, received, where):
    hint = ""
    if len(received) == len(expected) - 1:
        hint = (
            " (one axis short: batch the data, as for `model.fit`, e.g. "
            "`dataset.batch(...)`)"
        )
    label = "" if name is None else f" {name!r}"
    return ValueError(
        f"{where} does not fit the input{label} of model '{model.name}': "
        f"it expects inputs of shape {tuple(expected)}, and received a "
        f"batch of shape {tuple(received)}{hint}. Received: "
        f"x.shape={tuple(received)}"
    )


def check_input_shapes(model, x, where="`data`"):
    """Raises unless the arrays `x` fit the model's inputs."""
    expected = _expected_inputs(model)
    if expected is None:
        return
    if isinstance(expected, dict):
        if not isinstance(x, dict) or set(x) != set(expected):
            received = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"{where} must be a dict of arrays keyed by the inputs of "
                f"model '{model.name}': {sorted(expected)}. Received: "
                f"{received}"
            )
        pairs = [(key, expected[key], x[key]) for key in sorted(expected)]
    else:
        expected = tree.flatten(expected)
        leaves = tree.flatten(x)
        if len(expected) != len(leaves):
            raise ValueError(
                f"Model '{model.name}' takes {len(expected)} input(s), but "
                f"{where} holds {len(leaves)} input array(s). Received: "
                f"shapes {[tuple(np.shape(a)) for a in leaves]}"
            )
        names = [None] * len(expected)
        if len(expected) > 1:
            names = [getattr(t, "name", None) for t in expected]
        pairs = list(zip(names, expected, leaves, strict=True))
    for name, tensor, array in pairs:
        shape = tuple(tensor.shape)
        received = tuple(np.shape(array))
        if not _compatible(shape, received):
            raise _shape_error(model, name, shape, received, where)


def _chunks(data):
    """Yields `(x, y)` chunks of examples as NumPy arrays."""
    if is_iterable_of_batches(data):
        for element in data:
            x, y = split(element, "data's batches", lists_are_tuples=True)
            yield (
                tree.map_structure(to_numpy, x),
                (None if y is None else to_numpy(y)),
            )
        return
    x, y = split(data)
    yield tree.map_structure(to_numpy, x), (None if y is None else to_numpy(y))


def _take(chunk, start, stop):
    x, y = chunk
    x = tree.map_structure(lambda a: a[start:stop], x)
    return x, (None if y is None else y[start:stop])


def _concatenate(parts):
    x = tree.map_structure(lambda *a: np.concatenate(a), *[p[0] for p in parts])
    if any(p[1] is None for p in parts):
        return x, None
    return x, np.concatenate([p[1] for p in parts])


def batches(model, data, batch_size, max_examples):
    """Yields `(x, y, count)` batches of at most `batch_size` examples.

    Every chunk of `data` is checked against the model's input shape
    before it is used.
    """
    remaining = math.inf if max_examples is None else max_examples
    pending = []
    pending_count = 0
    where = "`data`"
    if is_iterable_of_batches(data):
        where = f"A batch of `data` ({type(data).__name__})"
    for chunk in _chunks(data):
        count = example_count(*chunk)
        check_input_shapes(model, chunk[0], where)
        start = 0
        while start < count and remaining > 0:
            take = int(
                min(batch_size - pending_count, count - start, remaining)
            )
            pending.append(_take(chunk, start, start + take))
            pending_count += take
            remaining -= take
            start += take
            if pending_count == batch_size:
                yield (*_concatenate(pending), pending_count)
                pending, pending_count = [], 0
        if remaining <= 0:
            break
    if pending_count:
        yield (*_concatenate(pending), pending_count)


def check_all_trainable(model, variables, backend):
    """Raises unless `variables` are all of `model.trainable_variables`, in
    order: the JAX and PyTorch backends differentiate the model's stateless
    call with respect to all of them."""
    if [id(v) for v in variables] != [id(v) for v in model.trainable_variables]:
        raise ValueError(
            f"On the {backend} backend the Fisher information is computed "
            "for all of `model.trainable_variables`. Received: a subset of "
            f"{len(variables)} variables"
        )


def check_batched(model, dataset):
    """Raises if a tf.data.Dataset's elements look like single examples."""
    if not _is_tf_dataset(dataset):
        return
    try:
        inputs = model.inputs
    except (AttributeError, ValueError):
        return
    specs = tree.flatten(split(dataset.element_spec, "data's elements")[0])
    if not inputs or len(inputs) != len(specs) or specs[0].shape.rank is None:
        return
    if specs[0].shape.rank == len(inputs[0].shape) - 1:
        raise ValueError(
            "The tf.data.Dataset in `data` must be batched, as for "
            "`model.fit`: call `dataset.batch(...)`. Received: elements of "
            f"shape {tuple(specs[0].shape)} for a model input of shape "
            f"{tuple(inputs[0].shape)}"
        )


def pad(array, size):
    """Repeats the last example of `array` up to `size` examples."""
    missing = size - len(array)
    if missing == 0:
        return array
    return np.concatenate([array, np.repeat(array[-1:], missing, axis=0)])


def class_labels(y, num_classes):
    """Integer class labels from class indices or one-hot rows."""
    y = np.asarray(y)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool):
        raise ValueError(
            "Labels must be class indices or one-hot rows. Received: labels "
            f"of dtype {y.dtype}"
        )
    if y.ndim == 2 and y.shape[1] == num_classes:
        if not np.all((y == 0) | (y == 1)) or not np.all(y.sum(axis=1) == 1):
            raise ValueError(
                f"Labels of shape {y.shape} must be one-hot rows (one 1 per "
                "row, zeros elsewhere): the empirical Fisher needs one class "
                "per example. Received: labels with row sums in "
                f"[{y.sum(axis=1).min()}, {y.sum(axis=1).max()}]"
            )
        return np.argmax(y, axis=1).astype("int32")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            "Labels must have shape (n,), (n, 1) or (n, K) one-hot with "
            f"K={num_classes}. Received: labels of shape {y.shape}"
        )
    if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
        raise ValueError(
            "Labels must be integer class indices. Received: labels such as "
            f"{y[~np.isfinite(y) | (y != np.round(y))][:3].tolist()}"
        )
    bad = (y < 0) | (y >= num_classes)
    if np.any(bad):
        raise ValueError(
            f"Labels must be class indices in [0, {num_classes}) for a model "
            f"with {num_classes} outputs. Received: labels such as "
            f"{np.unique(y[bad])[:5].tolist()}"
        )
    return y.astype("int32")


def stateless_batch_functions(cache, make, model, variables, outputs, backend):
    """The per-batch functions of `diagonal_fisher` on a backend that
    differentiates the model's stateless call (JAX, PyTorch).

    Args:
        cache: a `weakref.WeakKeyDictionary` of the backend's module,
            `{model: {key: functions}}`.
        make: the backend's class, called as `make(weakref.ref(model),
            outputs)`.
        model: a built Keras model with one categorical output.
        variables: `model.trainable_variables` (the variables
            differentiated, in the order of the returned sums).
        outputs: a `keras_sp._fisher_outputs.Outputs`.
        backend: the backend's name, for the error message.

    Returns:
        An object with `log_probabilities(x)` and
        `squared_scores(x, classes, weights)`, built once per model, output
        and number of variables.
    """
    check_all_trainable(model, variables, backend)
    key = (outputs.key, len(variables))
    functions = cache.setdefault(model, {})
    if key not in functions:
        functions[key] = make(weakref.ref(model), outputs)
    return functions[key]
