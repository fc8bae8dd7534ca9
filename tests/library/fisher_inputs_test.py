"""The data `keras_sp.fisher.diagonal_fisher` reads, and the models it
accepts, on every backend: every input form gives the NumPy closed form
of `fisher_reference`, and inputs of the wrong shape or kind raise errors
that name what was expected and what was received."""

import keras
import numpy as np
import pytest
from fisher_reference import BACKEND
from fisher_reference import Subclassed
from fisher_reference import assert_fisher_close
from fisher_reference import closed_form
from fisher_reference import data
from fisher_reference import dense_model
from fisher_reference import empirical_from
from fisher_reference import exact_from
from fisher_reference import flat

from keras_sp import fisher


class Batches(keras.utils.PyDataset):
    def __init__(self, x, y, size):
        super().__init__()
        self.x, self.y, self.size = x, y, size

    def __len__(self):
        return -(-len(self.x) // self.size)

    def __getitem__(self, index):
        part = slice(index * self.size, (index + 1) * self.size)
        return self.x[part], self.y[part]


def data_forms(x, y):
    """The same examples in every form `data` takes, by name."""
    import tensorflow as tf
    import torch

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    pairs = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )

    def generator():
        for start in range(0, len(x), 2):
            yield x[start : start + 2], y[start : start + 2]

    forms = {
        "array": x,
        "(x,)": (x,),
        "(x, y)": (x, y),
        "tf tensor": tf.convert_to_tensor(x),
        "torch tensor": torch.from_numpy(x),
        "tf.data (x, y)": dataset,
        "tf.data x": dataset.map(lambda a, b: a),
        "DataLoader [x, y]": torch.utils.data.DataLoader(pairs, batch_size=3),
        "DataLoader x": torch.utils.data.DataLoader(
            torch.from_numpy(x), batch_size=5
        ),
        "generator": generator(),
        "iterator": iter([(x[:4], y[:4]), (x[4:], y[4:])]),
        "PyDataset": Batches(x, y, 3),
    }
    if BACKEND == "jax":
        import jax.numpy as jnp

        forms["jax array"] = jnp.asarray(x)
    return forms


def test_data_forms_agree():
    model = dense_model(3, activation=None)
    x, y = data((7,), 7, 3)
    G, p = closed_form(model, x)
    for name, form in data_forms(x, y).items():
        result = fisher.diagonal_fisher(model, form, batch_size=3)
        assert_fisher_close(
            flat(result, model), exact_from(G, p), model, what=name
        )
    first_five = exact_from(G[:5], p[:5])
    for name, form in data_forms(x, y).items():
        result = fisher.diagonal_fisher(
            model, form, batch_size=3, max_examples=5
        )
        assert_fisher_close(flat(result, model), first_five, model, what=name)
    for name in ("(x, y)", "tf.data (x, y)", "DataLoader [x, y]", "generator"):
        result = fisher.diagonal_fisher(
            model, data_forms(x, y)[name], mode="empirical", batch_size=3
        )
        assert_fisher_close(flat(result, model), empirical_from(G, y), model)
    one_hot = np.eye(3)[y]
    assert_fisher_close(
        flat(
            fisher.diagonal_fisher(model, (x, one_hot), mode="empirical"), model
        ),
        empirical_from(G, y),
        model,
    )


def test_several_inputs_as_a_dict():
    a = keras.Input((3,), name="a")
    b = keras.Input((4,), name="b")
    h = keras.layers.Concatenate()([a, b])
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(h)
    h = keras.layers.Dropout(0.5, name="dropout")(h)
    model = keras.Model({"a": a, "b": b}, keras.layers.Dense(3, name="head")(h))
    twin = dense_model(3, activation=None)
    model.set_weights(twin.get_weights())
    x, _ = data((7,), 5, 3)
    inputs = {"a": x[:, :3], "b": x[:, 3:]}
    G, p = closed_form(twin, x)
    result = flat(fisher.diagonal_fisher(model, inputs, batch_size=2), model)
    assert_fisher_close(result, exact_from(G, p), model)
    with pytest.raises(ValueError, match=r"keyed by the inputs.*\['a', 'b'\]"):
        fisher.diagonal_fisher(model, {"a": x[:, :3], "c": x[:, 3:]})
    with pytest.raises(ValueError, match=r"input 'b'.*\(None, 4\).*\(5, 3\)"):
        fisher.diagonal_fisher(model, {"a": x[:, :3], "b": x[:, 4:]})


def test_wrong_input_shape_names_expected_and_received_shapes():
    import tensorflow as tf
    import torch

    functional = dense_model(3, activation=None)
    sequential = keras.Sequential(
        [keras.Input((7,)), keras.layers.Dense(3)], name="sequential_net"
    )
    x, y = data((5,), 4, 3)  # 5 features for a model that takes 7

    def generator():
        yield x[:2], y[:2]
        yield x[2:], y[2:]

    pairs = torch.utils.data.TensorDataset(
        torch.from_numpy(x), torch.from_numpy(y)
    )
    forms = {
        "array": (lambda: x, r"\(4, 5\)"),
        "(x, y)": (lambda: (x, y), r"\(4, 5\)"),
        "tf.data": (
            lambda: tf.data.Dataset.from_tensor_slices((x, y)).batch(3),
            r"\(3, 5\)",
        ),
        "generator": (generator, r"\(2, 5\)"),
        "DataLoader": (
            lambda: torch.utils.data.DataLoader(pairs, batch_size=3),
            r"\(3, 5\)",
        ),
    }
    for model in (functional, sequential):
        for make, received in forms.values():
            for mode in ("exact", "empirical"):
                with pytest.raises(
                    ValueError,
                    match=rf"'{model.name}'.*expects inputs of shape "
                    rf"\(None, 7\).*received a batch of shape {received}",
                ):
                    fisher.diagonal_fisher(model, make(), mode=mode)
    # A later batch of the wrong shape is caught too.
    good, _ = data((7,), 4, 3)

    def mixed():
        yield good
        yield x

    with pytest.raises(ValueError, match=r"\(None, 7\).*\(4, 5\)"):
        fisher.diagonal_fisher(functional, mixed())
    # An unbatched iterable is one axis short.
    with pytest.raises(ValueError, match=r"\(7,\).*one axis short"):
        fisher.diagonal_fisher(functional, iter(list(good)))


def test_bad_inputs():
    import tensorflow as tf

    model = dense_model(3, activation=None)
    x, y = data((7,), 4, 3)
    empty = np.zeros((0, 7), "float32")
    cases = [
        (dict(data=empty), "empty"),
        (dict(data=(empty, np.zeros(0))), "empty"),
        (
            dict(data=tf.data.Dataset.from_tensor_slices(empty).batch(2)),
            "empty",
        ),
        (dict(data=iter([])), "empty"),
        (dict(data=x, mode="empirical"), "labels.*data without labels"),
        (dict(data=(x,), mode="empirical"), "data without labels"),
        (dict(data=iter([x]), mode="empirical"), "data without labels"),
        (
            dict(data=(x, np.array([0, 1, 3, 2])), mode="empirical"),
            r"\[0, 3\).*3",
        ),
        (dict(data=(x, np.array([0, -1, 2, 2])), mode="empirical"), "-1"),
        (dict(data=(x, y + 0.5), mode="empirical"), "integer"),
        (dict(data=(x, np.full((4, 3), 1 / 3)), mode="empirical"), "one-hot"),
        (dict(data=(x, y[:3])), "same number of examples"),
        (dict(data=(x, y, np.ones(4))), "sample weights"),
        (dict(data=iter([(x, y, np.ones(4))])), "sample weights"),
        (dict(data=tf.data.Dataset.from_tensor_slices(x)), "must be batched"),
        (dict(data=[x, x]), r"takes 1 input\(s\).*2 input array"),
        (dict(data=x, mode="sampled", samples=0), "samples=0"),
        (dict(data=x, mode="sampled", samples=1.5), "samples=1.5"),
        (dict(data=x, mode="fisher"), "mode='fisher'"),
        (dict(data=x, from_logits="yes"), "from_logits='yes'"),
        (dict(data=x, batch_size=0), "batch_size=0"),
        (dict(data=x, max_examples=0), "max_examples=0"),
        (dict(data=x, verbose=3), "verbose=3"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            fisher.diagonal_fisher(model, **arguments)
    dataset = tf.data.Dataset.from_tensor_slices((x, y + 3)).batch(2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        fisher.diagonal_fisher(model, dataset, mode="empirical")


def test_models_that_are_not_one_classifier(monkeypatch):
    x, _ = data((7,), 4, 3)
    inputs = keras.Input((7,))
    two_outputs = keras.Model(
        inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)]
    )
    one_unit = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    sequence = keras.Model(
        inputs, keras.layers.Reshape((7, 1))(keras.layers.Dense(7)(inputs))
    )
    sigmoid = keras.Model(
        inputs, keras.layers.Dense(3, activation="sigmoid")(inputs)
    )
    frozen = keras.Model(inputs, keras.layers.Dense(3, trainable=False)(inputs))
    subclassed = Subclassed()
    subclassed(x)
    for model, message in (
        (two_outputs, "one output.*2 outputs"),
        (one_unit, r"shape \(4, 1\)"),
        (sequence, r"shape \(4, 7, 1\)"),
        (sigmoid, "sigmoid"),
        (frozen, "no trainable variables"),
        (keras.Sequential([keras.layers.Dense(3)]), "not built"),
        ("model.keras", "keras.Model"),
    ):
        with pytest.raises(ValueError, match=message):
            fisher.diagonal_fisher(model, x)
    # A subclassed model has no declared input shape: the error of its
    # call is reported with the shape received.
    with pytest.raises(ValueError, match=r"(?s)'subclassed'.*\[\(4, 5\)\]"):
        fisher.diagonal_fisher(subclassed, x[:, :5])
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(ValueError, match="KERAS_BACKEND.*backend='numpy'"):
        fisher.diagonal_fisher(one_unit, x)
