"""Fails when a Keras release changes an internal keras-sp relies on."""

import keras
import numpy as np
import pytest

from keras_sp import _keras_private
from keras_sp import regularizers


def test_all_layers_reaches_nested_models_and_wrapped_layers():
    inner = keras.layers.Dense(2, name="inner")
    inputs = keras.Input((3,))
    backbone = keras.Model(inputs, inner(inputs), name="backbone")
    wrapped = keras.layers.TimeDistributed(
        keras.layers.Dense(2, name="wrapped")
    )
    model = keras.Sequential([keras.Input((4, 3)), wrapped])
    model.build((None, 4, 3))
    names = {layer.name for layer in _keras_private.all_layers(model)}
    assert "wrapped" in names
    names = {layer.name for layer in _keras_private.all_layers(backbone)}
    assert "inner" in names


def test_own_variables_survive_freezing():
    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    layer.trainable = False
    names = [v.name for v in _keras_private.own_trainable_variables(layer)]
    assert names == ["gamma", "beta"]
    names = [v.name for v in _keras_private.own_variables(layer)]
    assert names == ["gamma", "beta", "moving_mean", "moving_variance"]


def test_saving_walk_visits_a_regularizer_held_by_a_layer(tmp_path):
    layer = keras.layers.Dense(2, name="dense")
    model = keras.Sequential([keras.Input((3,)), layer])
    regularizer = regularizers.L2SP(1.0, starting_point=layer.kernel.numpy())
    layer.kernel_regularizer = regularizer
    layer.kernel.regularizer = regularizer
    path = str(tmp_path / "model.weights.h5")
    model.save_weights(path)
    import h5py

    with h5py.File(path) as handle:
        assert "layers/dense/kernel_regularizer/vars/0" in handle


def variables(*names, seed=0):
    rng = np.random.default_rng(seed)
    return [
        keras.Variable(rng.normal(size=(2, 3)).astype("float32"), name=name)
        for name in names
    ]


def ids(values):
    return [id(value) for value in values]


def numpy(value):
    return keras.ops.convert_to_numpy(value).copy()


def test_optimizer_keeps_its_variables_in_the_attributes_we_rebuild():
    weights = variables("a", "b")
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    optimizer.build(weights)
    assert ids(optimizer._variables) == ids(optimizer.variables)
    assert optimizer._iterations is optimizer.iterations
    assert id(optimizer._learning_rate) in ids(optimizer._variables)
    assert ids(optimizer._trainable_variables) == ids(weights)
    assert ids(_keras_private.optimizer_variables(optimizer)) == ids(weights)
    assert sorted(optimizer._trainable_variables_indices.values()) == [0, 1]
    slot = optimizer.variables[-1]
    optimizer._untrack_variable(slot)
    assert id(slot) not in ids(optimizer.variables)


@pytest.mark.parametrize(
    "optimizer, names",
    [
        (keras.optimizers.SGD(0.1, momentum=0.9), ["momentum"]),
        (keras.optimizers.Adam(), ["momentum", "velocity"]),
    ],
)
def test_slots_are_made_from_references_and_named_by_path(optimizer, names):
    weights = variables("a", "b")
    made = _keras_private._build_recording_references(optimizer, weights)
    assert [(id(reference), v.name) for reference, v in made] == [
        (id(w), f"{w.path.replace('/', '_')}_{name}")
        for w in weights
        for name in names
    ]
    assert ids(v for _, v in made) == ids(optimizer.variables[2:])


def test_rebuild_in_place_keeps_the_slots_of_the_same_variables():
    """Adam built for [a, b] and rebuilt for [b, c]: b's m and v kept, c's
    zero, the step count kept; two variables with the same path are told
    apart by their order."""
    a, b, c = variables("a", "b", "c")
    (twin,) = variables("b", seed=1)
    optimizer = keras.optimizers.Adam()
    optimizer.build([a, b, twin])
    for index, variable in enumerate(optimizer.variables[2:]):
        variable.assign(np.full(variable.shape, index + 1.0))
    optimizer.iterations.assign(7)
    old = {id(v): numpy(v) for v in optimizer.variables[2:]}
    slots_of_b = [numpy(v) for v in optimizer.variables[4:6]]
    slots_of_twin = [numpy(v) for v in optimizer.variables[6:8]]
    _keras_private.rebuild_optimizer(optimizer, [twin, c, b])
    assert ids(_keras_private.optimizer_variables(optimizer)) == ids(
        [twin, c, b]
    )
    assert len(optimizer.variables) == 2 + 6
    assert all(id(v) not in old for v in optimizer.variables[2:])
    got = [numpy(v) for v in optimizer.variables[2:]]
    for want, value in zip(slots_of_twin, got[0:2], strict=True):
        np.testing.assert_array_equal(value, want)
    assert not np.any(got[2]) and not np.any(got[3])
    for want, value in zip(slots_of_b, got[4:6], strict=True):
        np.testing.assert_array_equal(value, want)
    assert int(numpy(optimizer.iterations)) == 7


def test_rebuild_in_place_keeps_state_held_outside_the_slots():
    """Nadam keeps the product of its momentum schedule outside its slots:
    steps on `a` after a rebuild for [a, b] match Nadam on `a` alone."""
    (a,) = variables("a")
    (b,) = variables("b", seed=1)
    (alone,) = variables("a")
    gradient = keras.ops.full((2, 3), 0.5)
    rebuilt, reference = keras.optimizers.Nadam(), keras.optimizers.Nadam()
    rebuilt.build([a])
    reference.build([alone])
    for _ in range(3):
        rebuilt.apply([gradient], [a])
        reference.apply([gradient], [alone])
    _keras_private.rebuild_optimizer(rebuilt, [a, b])
    for _ in range(2):
        rebuilt.apply([gradient, keras.ops.zeros_like(gradient)], [a, b])
        reference.apply([gradient], [alone])
    np.testing.assert_array_equal(numpy(a), numpy(alone))


def test_jax_fit_keeps_state_outside_the_variables_until_synced():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    if keras.backend.backend() == "jax":
        assert callable(model.jax_state_sync)
    else:
        assert not hasattr(model, "jax_state_sync")
    _keras_private.sync_training_state(model)


def test_batchnorm_call_replaced_on_the_instance_runs_in_inference_mode():
    layer = keras.layers.BatchNormalization(epsilon=1e-3)
    layer.build((None, 2))
    layer.moving_mean.assign([1.0, -1.0])
    layer.moving_variance.assign([4.0, 0.25])
    x = np.array([[3.0, 0.0], [5.0, 2.0]], "float32")
    moving = (x - [1.0, -1.0]) / np.sqrt(np.array([4.0, 0.25]) + 1e-3)
    _keras_private.run_in_inference_mode(layer)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(out, moving, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), [1.0, -1.0])
    _keras_private.restore_call(layer)
    batch = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    np.testing.assert_allclose(out, batch, rtol=1e-5)


def test_overridden_changes_what_a_layer_computes_inside_the_block_only():
    """A `call` set on the instance is what `Layer.__call__` runs; after
    the block (also when it raises) the layer computes as before, and a
    replacement the instance already held is kept."""
    layer = keras.layers.Dense(2, kernel_initializer="ones")
    x = np.ones((1, 3), "float32")
    before = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(before, [[3.0, 3.0]])
    doubled = [(layer, "call", lambda call: lambda *a, **k: 2 * call(*a, **k))]
    with _keras_private.overridden(doubled):
        inside = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(inside, [[6.0, 6.0]])
    assert "call" not in layer.__dict__
    with pytest.raises(RuntimeError, match="inside"):
        with _keras_private.overridden(doubled):
            raise RuntimeError("inside")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), before)
    # Nested: the inner replacement wraps the outer one, and each exit
    # restores what the instance held before it.
    with _keras_private.overridden(doubled):
        with _keras_private.overridden(doubled):
            nested = keras.ops.convert_to_numpy(layer(x))
        outer = keras.ops.convert_to_numpy(layer(x))
    np.testing.assert_allclose(nested, [[12.0, 12.0]])
    np.testing.assert_allclose(outer, [[6.0, 6.0]])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), before)


def test_pfor_converter_registry_and_wrap():
    import tensorflow as tf
    from tensorflow.python.ops.parallel_for import pfor

    registry = _keras_private.pfor_converter_registry()
    assert registry is not None
    for name in (
        "Conv2DBackpropFilter",
        "DepthwiseConv2dNative",
        "DepthwiseConv2dNativeBackpropInput",
        "DepthwiseConv2dNativeBackpropFilter",
    ):
        assert callable(registry[name])
    # What keras_sp._fisher_tensorflow's converters call on their input.
    for method in ("input", "stacked_input", "unstacked_input", "get_attr"):
        assert callable(getattr(pfor._PforInput, method))
    assert callable(pfor._PforInput.stack_inputs)
    wrapped = _keras_private.pfor_wrap(tf.zeros((2, 3)))
    assert wrapped.is_stacked
    assert tuple(wrapped.t.shape) == (2, 3)
