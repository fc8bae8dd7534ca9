"""WiSE-FT weight-space interpolation (Wortsman et al., CVPR 2022, eq. 1:
theta_alpha = (1 - alpha) theta_0 + alpha theta_1), checked against the
NumPy convex combination of w0 and the fine-tuned weights."""

import math
import os

import keras
import numpy as np
import pytest
from backend import to_numpy
from backend import total

import keras_sp
from keras_sp.interpolation import interpolate
from keras_sp.interpolation import interpolation_curve
from keras_sp.interpolation import record_starting_point

HEAD = ("head/kernel", "head/bias")


def build_model(seed=0):
    """Dense -> BatchNormalization -> ReLU -> a new Dense head."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((4,))
    x = keras.layers.Dense(6, name="d1")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="net")


def data(n=12, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def values(model):
    return {v.path: to_numpy(v) for v in model.weights}


def perturb(model, seed=1, scale=0.5):
    """Moves every variable (the "fine-tuning"); variances stay positive."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        value = to_numpy(variable)
        step = scale * rng.normal(size=value.shape)
        if variable.name == "moving_variance":
            value = value * np.exp(step)
        else:
            value = value + step
        variable.assign(value.astype(value.dtype))


def combination(w0, w_ft, t):
    """eq. 1 in float64, cast to the variable's dtype."""
    mixed = (1 - t) * w0.astype("float64") + t * w_ft.astype("float64")
    return mixed.astype(w_ft.dtype)


def assert_bits_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for path in expected:
        assert actual[path].dtype == expected[path].dtype, path
        assert actual[path].tobytes() == expected[path].tobytes(), path


def recorded(perturb_seed=1):
    """A model with w0 recorded (no penalty), then moved: (model, w0,
    w_ft)."""
    model = build_model()
    record_starting_point(model, new_layers=["head"])
    w0 = values(model)
    perturb(model, perturb_seed)
    return model, w0, values(model)


@pytest.mark.parametrize("t", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_interpolation_is_the_convex_combination(t):
    model, w0, w_ft = recorded()
    assert model.losses == []  # record_starting_point attached nothing
    assert interpolate(model, t) is model
    got = values(model)
    for path, value in got.items():
        if path in HEAD:  # no w0: the fine-tuned value
            np.testing.assert_array_equal(value, w_ft[path])
        else:  # exact in float32 (the only rounding is the cast)
            np.testing.assert_array_equal(
                value, combination(w0[path], w_ft[path], t)
            )
    if t == 0:
        for path in got:
            if path not in HEAD:
                np.testing.assert_array_equal(got[path], w0[path])
    # BatchNormalization moving statistics are interpolated too.
    assert "bn/moving_mean" in keras_sp.starting_point(model)
    assert "bn/moving_variance" in keras_sp.starting_point(model)


def test_numpy_scalar_weights_are_accepted():
    model, w0, w_ft = recorded()
    interpolate(model, np.float32(0.5))
    np.testing.assert_array_equal(
        values(model)["d1/kernel"],
        combination(w0["d1/kernel"], w_ft["d1/kernel"], 0.5),
    )


def test_repeated_calls_share_the_endpoint_and_one_restores_bit_exactly():
    model, w0, w_ft = recorded()
    for t in (0.3, 0.7, 0.0, 0.45):
        interpolate(model, t)
        # From the same fine-tuned endpoint, not from the previous call.
        for path in ("d1/kernel", "bn/moving_variance"):
            np.testing.assert_array_equal(
                values(model)[path], combination(w0[path], w_ft[path], t)
            )
    interpolate(model, 1.0)
    assert_bits_equal(values(model), w_ft)


def test_further_training_becomes_the_new_endpoint():
    model, w0, w_ft = recorded()
    interpolate(model, 0.5)
    x, y = data()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    trained = values(model)
    assert not np.array_equal(
        trained["d1/kernel"],
        combination(w0["d1/kernel"], w_ft["d1/kernel"], 0.5),
    )
    interpolate(model, 0.25)
    for path in trained:
        expected = trained[path]
        if path not in HEAD:
            expected = combination(w0[path], trained[path], 0.25)
        np.testing.assert_array_equal(values(model)[path], expected)
    interpolate(model, 1.0)
    assert_bits_equal(values(model), trained)


def test_set_weights_after_interpolate_becomes_the_new_endpoint():
    model, w0, _ = recorded()
    interpolate(model, 0.5)
    perturb(model, seed=7)
    moved = values(model)
    interpolate(model, 0.5)
    np.testing.assert_array_equal(
        values(model)["d1/bias"],
        combination(w0["d1/bias"], moved["d1/bias"], 0.5),
    )


def batchnorm_inputs(model, x):
    """The inputs of layer `bn`: x @ K + b of layer `d1`, in float64."""
    kernel = to_numpy(model.get_layer("d1").kernel).astype("float64")
    bias = to_numpy(model.get_layer("d1").bias).astype("float64")
    return x.astype("float64") @ kernel + bias


def test_batchnorm_statistics_reestimated_on_data():
    model, w0, w_ft = recorded()
    x, _ = data(n=10, seed=3)
    interpolate(model, 0.6, batchnorm_data=x, batch_size=4)
    got = values(model)
    features = batchnorm_inputs(model, x)
    np.testing.assert_allclose(
        got["bn/moving_mean"], features.mean(axis=0), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        got["bn/moving_variance"], features.var(axis=0), rtol=1e-5
    )
    # Not the interpolated statistics.
    assert not np.allclose(
        got["bn/moving_mean"],
        combination(w0["bn/moving_mean"], w_ft["bn/moving_mean"], 0.6),
    )
    for path in ("d1/kernel", "d1/bias", "bn/gamma"):
        np.testing.assert_array_equal(
            got[path], combination(w0[path], w_ft[path], 0.6)
        )
    np.testing.assert_array_equal(got["head/kernel"], w_ft["head/kernel"])
    # The same from a dataset of (inputs, targets) batches.
    other, _, _ = recorded()
    batches = ((x[i : i + 3], x[i : i + 3]) for i in range(0, len(x), 3))
    interpolate(other, 0.6, batchnorm_data=batches, batch_size=4)
    assert_bits_equal(values(other), got)
    # Weight 1 then restores the fine-tuned statistics, bit for bit.
    interpolate(model, 1.0)
    assert_bits_equal(values(model), w_ft)


def test_after_regularize_and_fit():
    model = build_model()
    keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=["head"])
    w0 = values(model)
    # starting_point lists the penalized kernel; regularize also keeps a
    # w0 for the biases, gamma, beta and moving statistics, for interpolate.
    assert list(keras_sp.starting_point(model)) == ["d1/kernel"]
    recorded_paths = set(w0) - set(HEAD)
    x, y = data()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, y, batch_size=4, epochs=2, verbose=0)
    w_ft = values(model)
    interpolate(model, 0.4)
    for path, value in values(model).items():
        expected = w_ft[path]
        if path not in HEAD:
            expected = combination(w0[path], w_ft[path], 0.4)
            assert not np.array_equal(w0[path], w_ft[path]), path
        np.testing.assert_array_equal(value, expected)
    interpolate(model, 0.0)
    for path in recorded_paths:
        np.testing.assert_array_equal(values(model)[path], w0[path])
    interpolate(model, 1.0)
    assert_bits_equal(values(model), w_ft)


def test_after_save_and_load_uses_the_attached_penalties(tmp_path):
    model = build_model()
    keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=["head"])
    w0 = values(model)
    perturb(model)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    w_ft = values(loaded)
    kernel = [v.path for v in loaded.weights if v.path.endswith("d1/kernel")]
    # Only the penalized kernel carries its w0 in the file.
    assert list(keras_sp.starting_point(loaded)) == kernel
    interpolate(loaded, 0.3)
    for path_, value in values(loaded).items():
        if path_ == kernel[0]:
            np.testing.assert_array_equal(
                value, combination(w0["d1/kernel"], w_ft[path_], 0.3)
            )
        else:
            np.testing.assert_array_equal(value, w_ft[path_])


def test_record_starting_point_takes_every_pretrained_variable():
    model = build_model()
    before = values(model)
    record_starting_point(model, new_layers=["head"])
    w0 = keras_sp.starting_point(model)
    assert set(w0) == set(before) - set(HEAD)
    for path in w0:
        np.testing.assert_array_equal(w0[path], before[path])
        assert not w0[path].flags.writeable
    perturb(model)  # a frozen copy: training does not move it
    for path in w0:
        np.testing.assert_array_equal(
            keras_sp.starting_point(model)[path], before[path]
        )


def test_record_starting_point_keeps_unless_overwrite():
    model = build_model()
    record_starting_point(model, new_layers=["head"])
    first = values(model)
    perturb(model)
    record_starting_point(model, new_layers=["head"])
    for path, array in keras_sp.starting_point(model).items():
        np.testing.assert_array_equal(array, first[path])
    record_starting_point(model, new_layers=["head"], overwrite=True)
    now = values(model)
    for path, array in keras_sp.starting_point(model).items():
        np.testing.assert_array_equal(array, now[path])
    # Without new_layers the head is recorded too, with a warning.
    with pytest.warns(UserWarning, match="new_layers"):
        record_starting_point(model)
    np.testing.assert_array_equal(
        keras_sp.starting_point(model)["head/kernel"],
        now["head/kernel"],
    )


def test_regularize_measures_from_the_recorded_starting_point():
    model = build_model()
    record_starting_point(model, new_layers=["head"])
    w0 = values(model)
    perturb(model)
    keras_sp.regularize(model, "l2_sp", alpha=2.0, new_layers=["head"])
    w = values(model)
    # eq. 3 of Li et al.: alpha/2 ||w - w0||^2 on the kernels of the
    # shared part (beta = 0).
    expected = np.sum((w["d1/kernel"] - w0["d1/kernel"]) ** 2)
    np.testing.assert_allclose(total(model.losses), expected, rtol=1e-5)


def test_overwrite_refuses_variables_with_a_penalty():
    model = build_model()
    keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=["head"])
    w0 = values(model)
    perturb(model)
    with pytest.raises(ValueError, match="overwrite=True"):
        record_starting_point(model, new_layers=["head"], overwrite=True)
    assert list(keras_sp.starting_point(model)) == ["d1/kernel"]
    np.testing.assert_array_equal(
        keras_sp.starting_point(model)["d1/kernel"], w0["d1/kernel"]
    )
    # Without overwrite the recorded w0 are kept: the penalty's, and those
    # regularize kept for the bias, gamma, beta and moving statistics.
    record_starting_point(model, new_layers=["head"])
    recorded_w0 = keras_sp.starting_point(model)
    assert set(recorded_w0) == set(w0) - set(HEAD)
    for path, array in recorded_w0.items():
        np.testing.assert_array_equal(array, w0[path])
    keras_sp.unregularize(model)
    record_starting_point(model, new_layers=["head"], overwrite=True)
    now = values(model)
    for path, array in keras_sp.starting_point(model).items():
        np.testing.assert_array_equal(array, now[path])


def compiled(model):
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="mse",
        metrics=["mae"],
    )
    return model


def test_interpolation_curve_gives_the_evaluate_numbers():
    model, w0, w_ft = recorded()
    compiled(model)
    x, y = data()
    weights = [0.0, 0.5, 1.0]
    curve = interpolation_curve(model, weights, x, y, batch_size=5, verbose=0)
    assert [point["weight"] for point in curve] == weights
    assert_bits_equal(values(model), w_ft)  # left fine-tuned
    for t, point in zip(weights, curve, strict=True):
        model.set_weights(
            [
                combination(w0[v.path], w_ft[v.path], t)
                if v.path not in HEAD
                else w_ft[v.path]
                for v in model.weights
            ]
        )
        expected = model.evaluate(
            x, y, batch_size=5, verbose=0, return_dict=True
        )
        assert point.keys() == {"weight", *expected}
        for name, value in expected.items():
            np.testing.assert_allclose(point[name], float(value), rtol=1e-6)
        # And the loss is the mean squared error of the interpolated model.
        outputs = to_numpy(model(x, training=False))
        np.testing.assert_allclose(
            point["loss"], np.mean((outputs - y) ** 2), rtol=1e-5
        )
    assert curve[0]["loss"] != curve[2]["loss"]


def test_interpolation_curve_shows_keras_progress(capsys):
    model, _, _ = recorded()
    compiled(model)
    x, y = data()
    curve = interpolation_curve(model, [0.0, 1.0], x, y, verbose=1)
    shown = capsys.readouterr().out
    assert "2/2" in shown
    assert f"{curve[-1]['loss']:.4f}" in shown


def test_interpolation_curve_restores_when_evaluate_raises():
    model, _, w_ft = recorded()
    compiled(model)
    x, y = data()
    with pytest.raises(Exception):  # noqa: B017 (Keras's own error)
        interpolation_curve(model, [0.5], np.zeros((3, 7)), y[:3], verbose=0)
    assert_bits_equal(values(model), w_ft)


def state(model):
    return (
        values(model),
        {k: np.array(v) for k, v in keras_sp.starting_point(model).items()},
        [to_numpy(v) for v in model.optimizer.variables],
    )


def assert_unchanged(model, before):
    after = state(model)
    assert_bits_equal(after[0], before[0])
    assert_bits_equal(after[1], before[1])
    assert len(after[2]) == len(before[2])
    for a, b in zip(after[2], before[2], strict=True):
        assert a.tobytes() == b.tobytes()


@pytest.fixture
def trained():
    """A model with w0, interpolated once, with an optimizer state."""
    model, _, _ = recorded()
    compiled(model)
    x, y = data()
    model.fit(x, y, batch_size=6, epochs=1, verbose=0)
    interpolate(model, 0.5)
    return model


@pytest.mark.parametrize(
    "weight",
    [-0.1, 1.5, math.nan, math.inf, "0.5", None, True, [0.5], 1 + 0j],
)
def test_bad_weight(trained, weight):
    before = state(trained)
    with pytest.raises(ValueError, match="`weight`") as info:
        interpolate(trained, weight)
    assert f"weight={weight!r}" in str(info.value)
    assert_unchanged(trained, before)


@pytest.mark.parametrize(
    "weights, message",
    [
        ([], r"weights=\[\]"),
        (0.5, "weights=0.5"),
        ("0.5", "weights='0.5'"),
        ([0.2, 2.0], r"weights\[1\]=2.0"),
        ([0.2, math.nan], r"weights\[1\]=nan"),
    ],
)
def test_bad_weights(trained, weights, message):
    before = state(trained)
    x, y = data()
    with pytest.raises(ValueError, match=message):
        interpolation_curve(trained, weights, x, y, verbose=0)
    assert_unchanged(trained, before)


def test_bad_verbose(trained):
    before = state(trained)
    x, y = data()
    with pytest.raises(ValueError, match="verbose=3"):
        interpolation_curve(trained, [0.5], x, y, verbose=3)
    assert_unchanged(trained, before)


def test_no_starting_point():
    model = compiled(build_model())
    x, y = data()
    model.fit(x, y, epochs=1, verbose=0)
    before = values(model)
    with pytest.raises(ValueError, match="record_starting_point"):
        interpolate(model, 0.5)
    with pytest.raises(ValueError, match="no starting point"):
        interpolation_curve(model, [0.5], x, y, verbose=0)
    assert_bits_equal(values(model), before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batchnorm_data": np.zeros((0, 4))}, "batchnorm_data"),
        ({"batchnorm_data": 3}, "batchnorm_data"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"batch_size": 2.5}, "batch_size=2.5"),
    ],
)
def test_bad_batchnorm_arguments(trained, kwargs, message):
    before = state(trained)
    with pytest.raises(ValueError, match=message):
        interpolate(trained, 0.2, **kwargs)
    assert_unchanged(trained, before)


def test_failed_reestimation_leaves_the_weights(trained):
    before = state(trained)
    with pytest.raises(Exception):  # noqa: B017 (Keras's own error)
        interpolate(trained, 0.2, batchnorm_data=np.zeros((4, 7)))
    assert_unchanged(trained, before)


def test_bad_model_and_overwrite():
    with pytest.raises(ValueError, match="keras.Model"):
        interpolate("model", 0.5)
    with pytest.raises(ValueError, match="not built"):
        record_starting_point(keras.Sequential([keras.layers.Dense(2)]))
    with pytest.raises(ValueError, match="overwrite='yes'"):
        record_starting_point(build_model(), new_layers=(), overwrite="yes")
    with pytest.raises(ValueError, match="new_layers"):
        record_starting_point(build_model(), new_layers=["nope"])
