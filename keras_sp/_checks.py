"""Argument checks shared by several keras-sp modules.

Every check raises a `ValueError` naming the argument and the value received.
"""

import math

import keras
import numpy as np


def check_bool(name, value):
    """Returns `value` if it is True or False, else raises."""
    if not isinstance(value, bool):
        raise ValueError(
            f"`{name}` must be True or False. Received: {name}={value!r}"
        )
    return value


def check_positive_int(name, value, meaning=""):
    """Returns `value` as an int if it is an integer >= 1 (not a bool),
    else raises; `meaning` follows "a positive integer" in the message."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, np.integer))
        or value < 1
    ):
        raise ValueError(
            f"`{name}` must be a positive integer{meaning}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_built_model(model):
    """Raises unless `model` is a `keras.Model` that has its weights."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            "`model` must be a keras.Model. Received: model of type "
            f"{type(model).__name__}"
        )
    if not model.built or not model.weights:
        raise ValueError(
            f"Model '{model.name}' is not built: it has no weights yet. Call "
            "`model.build(input_shape)` or call it on data first. Received: "
            f"model={model.name!r}"
        )


def check_coefficient(name, value):
    """Returns `value` as a float, or raises if it is negative or not finite."""
    if isinstance(value, bool) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"`{name}` must be a non-negative finite number. "
            f"Received: {name}={value!r}"
        )
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"`{name}` must be a non-negative finite number. "
            f"Received: {name}={value!r}"
        )
    return value


def is_extension_float(dtype):
    """Whether `dtype` is a float NumPy does not classify as a number: the
    bfloat16 (and float8) types of `ml_dtypes`, which Keras returns for the
    variables of a bfloat16 model."""
    if dtype.kind != "V" or dtype.names is not None:
        return False
    try:
        return keras.backend.is_float_dtype(
            keras.backend.standardize_dtype(dtype)
        )
    except ValueError:
        return False


def check_array(name, value, *, non_negative=False, shape=None):
    """Returns `value` as a real NumPy float array, or raises.

    The one check of starting points and Fisher weights (w0 and F of the
    paper's Eq. 1-5): real, of `shape` when given, finite, and non-negative
    when `non_negative` (a Fisher). Integer arrays become float32, and so
    do bfloat16 (and float8) ones, which float32 holds exactly.
    """
    array = np.asarray(value)
    if is_extension_float(array.dtype):
        array = array.astype("float32")
    if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
        raise ValueError(
            f"`{name}` must be a real array. Received: {name} of dtype "
            f"{array.dtype}"
        )
    if shape is not None and array.shape != tuple(shape):
        raise ValueError(
            f"`{name}` must have shape {tuple(shape)}. "
            f"Received: {name} of shape {array.shape}"
        )
    if not np.all(np.isfinite(array)):
        raise ValueError(
            f"`{name}` must be finite. Received: {name} with "
            f"{int(np.sum(~np.isfinite(array)))} non-finite entries"
        )
    if non_negative and np.any(array < 0):
        raise ValueError(
            f"`{name}` must be non-negative. Received: {name} with minimum "
            f"{array.min()}"
        )
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype("float32")
    return array
