"""Diagonal Fisher information of a Keras classifier.

L2-SP-Fisher (eq. 4 of Li, Grandvalet & Davoine) and elastic weight
consolidation weight each parameter by the diagonal of the Fisher
information of the source model on source inputs:

    F_jj = 1/m sum_i sum_k f_k(x_i; w0) (d/dw_j log f_k(x_i; w0))^2

The expectation over outputs is taken under the model's own predictive
distribution f(x_i; w0), not over the data's labels. `diagonal_fisher`
computes it exactly (`mode="exact"`, all K classes), by Monte-Carlo
(`"sampled"`: labels drawn from f(x_i)), or as the *empirical* Fisher
(`"empirical"`: the data's labels, a different quantity). In every mode the
squares are those of per-example gradients, never the square of a batch
gradient, and the model runs in inference mode (BatchNormalization uses its
moving statistics and is not updated, Dropout is off).

The same code runs on the TensorFlow, JAX and PyTorch backends of Keras:
this module reads the data (`keras_sp._fisher_data`) and the model's
outputs (`keras_sp._fisher_outputs`) and draws the sampled labels with
NumPy, and one module per backend computes the per-example gradients
(`_fisher_tensorflow`, `_fisher_jax`, `_fisher_torch`).

Reference:
    Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer Learning
    with Convolutional Networks". ICML 2018, section 3 (eq. 4).
    Kirkpatrick et al. "Overcoming catastrophic forgetting in neural
    networks". PNAS 2017.
"""

import itertools
import math
import os
import tempfile
import zipfile

import keras
import numpy as np
from keras import tree

from keras_sp import _fisher_data as _data
from keras_sp import _fisher_outputs as _outputs
from keras_sp import _paths
from keras_sp._checks import check_array

__all__ = [
    "MAX_GRADIENT_ENTRIES",
    "diagonal_fisher",
    "load",
    "save",
]

MODES = ("exact", "sampled", "empirical")

# Several scores per example (the K classes of "exact", or the draws of
# "sampled") are differentiated in chunks so that one vectorised call holds
# at most MAX_GRADIENT_ENTRIES per-example gradient entries (256 MiB in
# float32) and MAX_PAIRS (example, class) pairs.
MAX_GRADIENT_ENTRIES = 2**26
MAX_PAIRS = 1024

# Examples of the first batch the model's outputs are inspected on.
_PROBE_EXAMPLES = 8


def _backend():
    """The module computing per-example gradients for the Keras backend."""
    name = keras.backend.backend()
    if name == "tensorflow":
        from keras_sp import _fisher_tensorflow

        return _fisher_tensorflow
    if name == "jax":
        from keras_sp import _fisher_jax

        return _fisher_jax
    if name == "torch":
        from keras_sp import _fisher_torch

        return _fisher_torch
    raise ValueError(
        "keras_sp.fisher computes per-example gradients with the "
        "TensorFlow, JAX or PyTorch backend of Keras: set the environment "
        "variable KERAS_BACKEND to 'tensorflow', 'jax' or 'torch' before "
        f"importing Keras. Received: backend={name!r}"
    )


def _check_int(name, value, minimum, allow_none=False):
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        raise ValueError(
            f"`{name}` must be an integer >= {minimum}"
            + (" or None" if allow_none else "")
            + f". Received: {name}={value!r}"
        )
    return int(value)


def _check_unique_paths(variables):
    counts = {}
    for variable in variables:
        counts[variable.path] = counts.get(variable.path, 0) + 1
    repeated = sorted(path for path, count in counts.items() if count > 1)
    if repeated:
        raise ValueError(
            "The Fisher information is keyed by `variable.path`, but several "
            f"trainable variables share a path. Give the layers unique "
            f"names. Received: repeated paths {repeated[:3]}"
        )


def diagonal_fisher(
    model,
    data,
    *,
    mode="exact",
    samples=1,
    from_logits=None,
    batch_size=32,
    max_examples=None,
    seed=None,
    verbose=0,
):
    """Diagonal of the Fisher information of a classifier, per variable.

    For every trainable variable, over the m examples x_i of `data`:

    - `mode="exact"` (the paper's formula, the default):
      `F_jj = 1/m sum_i sum_k f_k(x_i) (d/dw_j log f_k(x_i))^2`,
      the expectation over all K classes under the model's prediction f;
    - `mode="sampled"`: `1/(m S) sum_i sum_s (d/dw_j log f_{y_is}(x_i))^2`
      with S = `samples` labels y_is drawn from f(x_i) (unbiased; K times
      cheaper for large K);
    - `mode="empirical"`: `1/m sum_i (d/dw_j log f_{y_i}(x_i))^2` with the
      data's labels y_i: the *empirical* Fisher, a different quantity.

    Gradients are per example (vectorised over a batch, never the square
    of a batch gradient), in inference mode: BatchNormalization uses its
    moving statistics, Dropout is off, and no weight or statistic of the
    model changes. Every Keras backend with gradients works: TensorFlow
    (`tf.vectorized_map`), JAX (`jax.vmap` of `jax.vjp` over
    `model.stateless_call`) and PyTorch (`torch.func.vmap` of
    `torch.func.vjp` over `model.stateless_call`; a per-example loop for
    models `torch.func` cannot vectorise, see `keras_sp._fisher_torch`).
    Several backward passes per example (the K classes of `"exact"`, the
    draws of `"sampled"`) run in chunks so that one call holds at most
    `MAX_GRADIENT_ENTRIES` per-example gradient entries and `MAX_PAIRS`
    (example, class) pairs. The first call for a model traces and
    vectorises its gradient (seconds to minutes for a deep network); later
    calls with the same settings reuse it.

    Args:
        model: a built `keras.Model` with one output of shape (batch, K),
            K >= 2: logits, or probabilities from a final softmax.
        data: the inputs: an array (or a list or dict of arrays for several
            inputs; NumPy, TensorFlow, JAX or PyTorch), a tuple `(x,)` or
            `(x, y)`, or an iterable of such batches: a batched
            `tf.data.Dataset`, a PyTorch `DataLoader`, a
            `keras.utils.PyDataset`, a generator. In batches a list is read
            as a tuple, as `model.fit` does. Labels `y` (class indices or
            one-hot rows) are used in `"empirical"` mode only. Every batch
            must fit the model's input shape.
        mode: `"exact"`, `"sampled"` or `"empirical"`.
        samples: int >= 1, labels drawn per example in `"sampled"` mode.
        from_logits: None (default) detects a final softmax (a `Softmax`
            or `Activation("softmax")` output layer, or an output layer
            with `activation="softmax"`) and then works from the logits
            before it (log-softmax, no underflow), and otherwise treats the
            outputs as logits. True: the outputs are logits. False: they
            are probabilities (their log is taken, after clipping at 1e-7,
            unless a final softmax gives the logits).
        batch_size: examples per vectorised batch. Memory grows with
            `batch_size` times the number of parameters (the per-example
            gradients): lower it for large models.
        max_examples: optional int, use at most this many examples.
        seed: int seed of the draws in `"sampled"` mode; None draws one from
            NumPy's global generator (`keras.utils.set_random_seed` makes it
            reproducible). Labels are drawn on the host with
            `numpy.random.default_rng(seed)`, `samples` uniforms per
            example in data order: the same seed and data give the same
            draws on every backend and for every `batch_size`.
        verbose: 0 (silent), 1 (progress bar) or 2 (one line at the end).

    Returns:
        A dict `{variable.path: np.ndarray}` over `model.trainable_variables`,
        each array of the variable's shape and dtype.

    Example:

    >>> import keras, numpy as np, keras_sp
    >>> model = keras.Sequential(
    ...     [keras.Input((3,)), keras.layers.Dense(4, name="head")], name="net")
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    >>> fisher = keras_sp.fisher.diagonal_fisher(model, x)
    >>> [(path, value.shape) for path, value in fisher.items()]
    [('net/head/kernel', (3, 4)), ('net/head/bias', (4,))]

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 3 (below eq. 4).
    """
    _check_arguments(mode, from_logits, verbose)
    samples = _check_int("samples", samples, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    max_examples = _check_int("max_examples", max_examples, 1, True)
    seed = _check_int("seed", seed, 0, True)
    backend = _backend()
    variables = _trainable_variables(model)

    if _data.is_iterable_of_batches(data):
        _data.check_batched(model, data)
        total = max_examples  # unknown for an iterable of batches
        size = batch_size if total is None else min(batch_size, total)
    else:
        x, y = _data.split(data)
        total = _data.example_count(x, y)
        if max_examples is not None:
            total = min(total, max_examples)
        size = max(1, min(batch_size, total))
    batches = _data.batches(model, data, size, max_examples)
    first = next(batches, None)
    if first is None:
        raise ValueError(
            "`data` is empty: the Fisher information is an average over "
            "examples. Received: data with 0 examples"
        )
    # A few examples tell what the model outputs.
    probe = tree.map_structure(lambda a: a[:_PROBE_EXAMPLES], first[0])
    num_classes = _outputs.check_outputs(
        _outputs.describe(model, probe), from_logits
    )
    if mode == "empirical":
        if first[1] is None:
            raise ValueError(_NO_LABELS)
        if not _data.is_iterable_of_batches(data):
            _data.class_labels(_data.to_numpy(y)[:total], num_classes)
    if mode == "sampled" and seed is None:
        seed = int(np.random.randint(2**31 - 1))
    generator = np.random.default_rng(seed)

    functions = backend.batch_functions(
        model, variables, _outputs.Outputs(model, from_logits)
    )
    row_count = _outputs.row_count(mode, samples, num_classes)
    row_chunks = _row_chunks(
        row_count, size, sum(math.prod(v.shape) for v in variables)
    )
    progbar = None
    if verbose:
        progbar = keras.utils.Progbar(
            total, verbose=verbose, unit_name="example"
        )
    sums = [np.zeros(v.shape, "float64") for v in variables]
    seen = 0
    for x, y, count in itertools.chain([first], batches):
        labels = None
        if mode == "empirical":
            if y is None:
                raise ValueError(_NO_LABELS)
            labels = _data.pad(_data.class_labels(y, num_classes), size)
        x = tree.map_structure(lambda a: _data.pad(a, size), x)
        log_p = None
        if mode != "empirical":
            log_p = functions.log_probabilities(x)
        classes, weights = _outputs.rows(
            mode,
            samples,
            num_classes,
            count,
            size,
            log_p=log_p,
            labels=labels,
            generator=generator,
        )
        for rows in row_chunks:
            parts = functions.squared_scores(
                x, classes[:, rows], weights[:, rows]
            )
            for total_sum, part in zip(sums, parts, strict=True):
                total_sum += part
        seen += count
        if progbar is not None:
            progbar.update(seen)
    if progbar is not None and seen != total:
        progbar.update(seen, finalize=True)
    return _averages(variables, sums, seen)


_NO_LABELS = (
    'mode="empirical" uses the data\'s labels, but `data` has none: pass '
    '`(x, y)`, or use mode="exact" (the paper\'s Fisher), which needs no '
    "labels. Received: data without labels"
)


def _check_arguments(mode, from_logits, verbose):
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(
            f"`mode` must be one of {list(MODES)}. Received: mode={mode!r}"
        )
    if from_logits not in (None, True, False):
        raise ValueError(
            "`from_logits` must be None, True or False. Received: "
            f"from_logits={from_logits!r}"
        )
    if isinstance(verbose, bool) or verbose not in (0, 1, 2):
        raise ValueError(
            f"`verbose` must be 0, 1 or 2. Received: verbose={verbose!r}"
        )


def _trainable_variables(model):
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. Received: model of type "
            f"{type(model).__name__}"
        )
    if not model.built:
        raise ValueError(
            f"Model '{model.name}' is not built: call it on data or "
            f"`model.build(input_shape)` first. Received: model={model.name!r}"
        )
    variables = list(model.trainable_variables)
    if not variables:
        raise ValueError(
            f"Model '{model.name}' has no trainable variables: there is no "
            f"Fisher information to compute. Received: model={model.name!r}"
        )
    _check_unique_paths(variables)
    return variables


def _row_chunks(rows, size, parameters):
    """Splits the rows so that one call holds at most MAX_GRADIENT_ENTRIES
    per-example gradient entries and MAX_PAIRS (example, row) pairs."""
    per_call = max(
        1,
        min(
            rows,
            MAX_GRADIENT_ENTRIES // (size * parameters),
            MAX_PAIRS // size,
        ),
    )
    return np.array_split(np.arange(rows), math.ceil(rows / per_call))


def _averages(variables, sums, count):
    fisher = {}
    for variable, total_sum in zip(variables, sums, strict=True):
        value = (total_sum / count).astype(variable.dtype)
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"The Fisher information of variable '{variable.path}' is not "
                "finite: the model's log-probabilities or their gradients "
                "overflowed on this data. Received: data on which the "
                "model's outputs are not finite"
            )
        fisher[variable.path] = value
    return fisher


# Saving and loading: a .npz file keyed by variable path.


def _check_fisher(fisher, argument):
    if not hasattr(fisher, "items"):
        raise ValueError(
            f"`{argument}` must be a mapping from variable path to array. "
            f"Received: {argument} of type {type(fisher).__name__}"
        )
    checked = {}
    for key, value in fisher.items():
        if not isinstance(key, str) or not key:
            raise ValueError(
                f"`{argument}` keys must be variable paths (non-empty "
                f"strings). Received: key {key!r}"
            )
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"`{argument}['{key}']` must be a floating-point array. "
                f"Received: dtype {array.dtype}"
            )
        checked[key] = check_array(
            f"{argument}['{key}']", array, non_negative=True
        )
    return checked


def save(fisher, path, overwrite=True):
    """Saves a diagonal Fisher information to a `.npz` file.

    The file holds one array per variable, keyed by `variable.path`
    (`'/'` included); `np.load(path)` reads it too. The file is written
    to a temporary name and then renamed, so an interrupted save never
    leaves a truncated file.

    Args:
        fisher: `{variable.path: array}`, as `diagonal_fisher` returns.
        path: file path ending in `.npz`.
        overwrite: whether to replace an existing file.

    Example:

    >>> import os, tempfile, numpy as np, keras_sp
    >>> path = os.path.join(tempfile.mkdtemp(), "fisher.npz")
    >>> keras_sp.fisher.save({"dense/kernel": np.ones((2, 3))}, path)
    >>> keras_sp.fisher.load(path)["dense/kernel"].shape
    (2, 3)

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 4.
    """
    fisher = _check_fisher(fisher, "fisher")
    path = os.fspath(path)
    if not path.endswith(".npz"):
        raise ValueError(f"`path` must end in '.npz'. Received: path={path!r}")
    if not overwrite and os.path.exists(path):
        raise ValueError(
            f"`path` exists and overwrite=False. Received: path={path!r}"
        )
    directory = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(
        suffix=".npz", prefix=".fisher-", dir=directory
    )
    os.close(handle)
    try:
        with zipfile.ZipFile(temporary, "w", zipfile.ZIP_STORED) as archive:
            for key, array in fisher.items():
                with archive.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def load(path, model=None):
    """Loads a diagonal Fisher information saved by `save`.

    Args:
        path: a `.npz` file.
        model: optional `keras.Model` the Fisher was computed for. Every
            trainable variable needs exactly one entry of its shape, found
            by its path or a '/'-aligned path suffix (as
            `keras_sp.regularize` matches them: a reloaded or nested model
            has other path prefixes), and no entry may be left over.

    Returns:
        A dict `{variable.path: np.ndarray}`, keyed by the model's variable
        paths when `model` is given.

    Example:

    >>> import os, tempfile, numpy as np, keras_sp
    >>> path = os.path.join(tempfile.mkdtemp(), "fisher.npz")
    >>> keras_sp.fisher.save({"dense/bias": np.zeros(3)}, path)
    >>> list(keras_sp.fisher.load(path))
    ['dense/bias']

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 4.
    """
    path = os.fspath(path)
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as error:
        raise ValueError(
            f"`path` is not a .npz file saved by keras_sp.fisher.save "
            f"({error}). Received: path={path!r}"
        ) from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(
            "`path` holds a single array, not a Fisher information saved by "
            f"keras_sp.fisher.save. Received: path={path!r}"
        )
    with archive:
        fisher = {key: archive[key] for key in archive.files}
    fisher = _check_fisher(fisher, "fisher file")
    if model is not None:
        fisher = _match(fisher, model, f"The Fisher file {path!r}")
    return fisher


def _match(fisher, model, what):
    """`fisher` keyed by the paths of `model`'s trainable variables.

    Every trainable variable needs exactly one entry, found by its path or
    a '/'-aligned path suffix (as `keras_sp.regularize` matches them: a
    model saved and reloaded, or nested in another, has other path
    prefixes), of the variable's shape; no entry may be left over.
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. Received: model of type "
            f"{type(model).__name__}"
        )
    matched, used, missing = {}, set(), []
    for variable in model.trainable_variables:
        path = variable.path
        candidates = _paths.matching_keys(fisher, path)
        if len(candidates) > 1:
            raise ValueError(
                f"{what} has several entries for variable '{path}' of model "
                f"'{model.name}': {sorted(candidates)}. Received: entries "
                f"{sorted(fisher)[:5]}"
            )
        if not candidates:
            missing.append(path)
            continue
        key = candidates[0]
        if tuple(np.shape(fisher[key])) != tuple(variable.shape):
            raise ValueError(
                f"{what} does not match model '{model.name}': entry '{key}' "
                f"has shape {tuple(np.shape(fisher[key]))}, variable "
                f"'{path}' has shape {tuple(variable.shape)}. Received: "
                f"{key} of shape {tuple(np.shape(fisher[key]))}"
            )
        matched[path] = fisher[key]
        used.add(key)
    extra = sorted(set(fisher) - used)
    if missing or extra:
        raise ValueError(
            f"{what} does not match model '{model.name}': "
            f"{len(missing)} trainable variables have no entry "
            f"(e.g. {missing[:3]}) and {len(extra)} entries match no "
            f"trainable variable (e.g. {extra[:3]}). Received: entries "
            f"{sorted(fisher)[:5]}"
        )
    return matched
