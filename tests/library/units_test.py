import re
import warnings

import freezing_reference
import keras
import numpy as np
import pytest

from keras_sp import _keras_private
from keras_sp.units import copy_units
from keras_sp.units import depth_units
from keras_sp.units import freeze_batchnorm
from keras_sp.units import freeze_first
from keras_sp.units import unfreeze


def names(unit):
    return [layer.name for layer in unit]


def branchy_model():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.BatchNormalization(name="input_bn")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv_a")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.BatchNormalization(name="bn_a")(x)
    left = keras.layers.Conv2D(4, 1, name="conv_b")(x)
    right = keras.layers.Conv2D(4, 3, padding="same", name="conv_c")(x)
    right = keras.layers.ReLU()(right)
    right = keras.layers.BatchNormalization(name="bn_c")(right)
    left = keras.layers.BatchNormalization(name="bn_b")(left)
    x = keras.layers.Add()([left, right])
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs, name="branchy")


def test_functional_model_attaches_each_batchnorm_to_the_layer_feeding_it():
    units = [sorted(names(unit)) for unit in depth_units(branchy_model())]
    assert units[0] == ["bn_a", "conv_a", "input_bn"]
    assert sorted(units[1:3]) == [["bn_b", "conv_b"], ["bn_c", "conv_c"]]
    assert units[3:] == [["head"]]


def test_nested_backbone_is_flattened():
    backbone = branchy_model()
    model = keras.Sequential([keras.Input((8, 8, 2)), backbone])
    model.add(keras.layers.Dense(2, name="new_head"))
    units = depth_units(model)
    assert len(units) == 5
    assert names(units[-1]) == ["new_head"]
    assert names(units[-2]) == ["head"]


def test_bad_models_are_refused():
    with pytest.raises(ValueError, match="Received: model="):
        depth_units(keras.layers.Dense(2))
    unbuilt = keras.Sequential([keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="must be built"):
        depth_units(unbuilt)


def small_model(classes=3, width=4, name=None):
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(width, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(classes, name="head")(x)
    return keras.Model(inputs, outputs, name=name)


def randomize(model, seed):
    """Every variable (BN statistics too) set to distinct random values."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        variable.assign(rng.uniform(0.5, 1.5, variable.shape))
    return model


def arrays(unit):
    return [np.array(w) for layer in unit for w in layer.get_weights()]


@pytest.mark.parametrize("n", [0, 2, 3])
def test_copy_units_copies_exactly_the_first_n_units(n):
    source = randomize(small_model(classes=5, name="source"), 0)
    target = randomize(small_model(classes=3, name="target"), 1)
    before = [arrays(unit) for unit in depth_units(target)]
    copy_units(source, target, n, freeze=False)
    source_units, target_units = depth_units(source), depth_units(target)
    for i, unit in enumerate(target_units):
        expected = arrays(source_units[i]) if i < n else before[i]
        for got, want in zip(arrays(unit), expected, strict=True):
            np.testing.assert_array_equal(got, want)
    assert all(layer.trainable for layer in target.layers)


def test_copy_units_with_freeze_freezes_the_copied_units_only():
    source, target = small_model(5), small_model(3)
    copy_units(source, target, 2, freeze=True)
    units = depth_units(target)
    assert [layer.trainable for unit in units for layer in unit] == [
        False,
        False,
        False,
        False,
        True,
        True,
    ]


def test_copy_units_names_the_first_mismatching_unit_and_copies_nothing():
    source = randomize(small_model(name="source"), 0)
    target = randomize(small_model(width=6, name="target"), 1)
    before = [w.copy() for w in target.get_weights()]
    with pytest.raises(ValueError, match=r"depth unit 0 \(conv1, bn1\)"):
        copy_units(source, target, 2)
    for got, want in zip(target.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, want)
    other = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten()])
    other.add(keras.layers.Dense(3, name="dense"))
    other.add(keras.layers.Dense(3, name="out"))
    with pytest.raises(ValueError, match=r"depth unit 0 \(dense\)"):
        copy_units(other, target, 1)


@pytest.mark.parametrize("n", [-1, 5, 1.0, True, "2"])
def test_n_out_of_range_is_an_error(n):
    model = small_model()
    with pytest.raises(ValueError, match=re.escape(f"Received: n={n!r}")):
        freeze_first(model, n)
    with pytest.raises(ValueError, match="Received: n="):
        copy_units(small_model(), model, n)
    assert all(layer.trainable for layer in model.layers)


def test_freeze_first_and_unfreeze_set_trainable():
    model = small_model()
    freeze_first(model, 3)
    flags = {layer.name: layer.trainable for layer in model.layers}
    assert not any(flags[name] for name in ("conv1", "bn1", "conv2", "fc"))
    assert flags["head"]
    freeze_first(model, 1)
    assert model.get_layer("conv2").trainable
    assert not model.get_layer("bn1").trainable
    unfreeze(model)
    assert all(layer.trainable for layer in model.layers)
    assert len(model.trainable_weights) == len(small_model().trainable_weights)


def data(count=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 6, 6, 1)).astype("float32") * 3 + 1
    return x, rng.integers(0, 3, count)


def compiled(model, optimizer=None):
    model.compile(
        optimizer=optimizer or keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def numpy(value):
    return keras.ops.convert_to_numpy(value).copy()


def snapshot(layers):
    return [numpy(w) for layer in layers for w in layer.weights]


def same(before, layers):
    after = snapshot(layers)
    return all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def changed(before, layers):
    after = snapshot(layers)
    return all(
        not np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )


def test_freezing_a_compiled_model_takes_effect_at_the_next_step():
    x, y = data()
    model = compiled(small_model())
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    frozen = [model.get_layer("conv1"), model.get_layer("bn1")]
    before = snapshot(frozen)
    freeze_first(model, 1)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert same(before, frozen)
    if keras.backend.backend() != "tensorflow":
        return
    # Without rebuilding the traced train function, TensorFlow keeps
    # training the layer.
    control = compiled(small_model())
    control.fit(x, y, batch_size=8, epochs=1, verbose=0)
    layer = control.get_layer("conv1")
    kernel = numpy(layer.kernel)
    layer.trainable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        control.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(kernel, numpy(layer.kernel))


def optimizer_slots(optimizer):
    return {v.name: numpy(v) for v in optimizer.variables}


def test_unfreezing_rebuilds_the_same_optimizer_and_keeps_its_state():
    x, y = data()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    model = compiled(small_model(), optimizer)
    freeze_first(model, 2)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    momentum = optimizer_slots(optimizer)
    unfreeze(model)
    assert model.optimizer is optimizer
    tracked = _keras_private.optimizer_variables(optimizer)
    assert list(map(id, tracked)) == list(map(id, model.trainable_variables))
    carried = optimizer_slots(optimizer)
    for name, value in momentum.items():
        np.testing.assert_array_equal(carried[name], value)
    added = set(carried) - set(momentum)
    assert len(added) == len(model.trainable_variables) - (len(momentum) - 2)
    for name in added:
        assert not np.any(carried[name]), name
    assert int(numpy(optimizer.iterations)) == 2
    bottom = [model.get_layer(name) for name in ("conv1", "conv2")]
    before = snapshot(bottom)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert changed(before, bottom)
    assert int(numpy(optimizer.iterations)) == 4


def test_freeze_first_after_the_optimizer_is_built_steps_like_numpy():
    """A step, freeze the first unit, a step: the frozen unit is
    bit-identical and the head takes an SGD step with its momentum."""
    x, y = freezing_reference.linear_data()
    model = freezing_reference.linear_model()
    optimizer = model.optimizer
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    head = model.get_layer("head")
    momenta = {
        v.path: freezing_reference.slot(optimizer, v) for v in head.weights
    }
    assert all(np.any(m) for m in momenta.values())
    freeze_first(model, 1)
    assert model.optimizer is optimizer
    tracked = _keras_private.optimizer_variables(optimizer)
    assert list(map(id, tracked)) == list(map(id, head.weights))
    assert len(optimizer.variables) == 2 + 2
    for variable in head.weights:
        np.testing.assert_array_equal(
            freezing_reference.slot(optimizer, variable), momenta[variable.path]
        )
    weights = freezing_reference.values(model)
    grads = freezing_reference.gradients(weights, x, y)
    expected, _ = freezing_reference.sgd_step(
        weights, momenta, grads, trained=["head/kernel", "head/bias"]
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    freezing_reference.assert_weights(
        model, expected, frozen=["fc/kernel", "fc/bias"]
    )
    assert int(numpy(optimizer.iterations)) == 2


def test_fit_after_unfreeze_starts_new_momenta_at_zero():
    """Head only for a step, then everything: fc's momentum starts at 0,
    the head's carries over (Keras SGD: m <- 0.9 m - 0.1 g, w <- w + m)."""
    x, y = freezing_reference.linear_data()
    model = freeze_first(freezing_reference.linear_model(), 1)
    optimizer = model.optimizer
    weights = freezing_reference.values(model)
    grads = freezing_reference.gradients(weights, x, y)
    head = ["head/kernel", "head/bias"]
    expected, momenta = freezing_reference.sgd_step(
        weights, {}, grads, trained=head
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    freezing_reference.assert_weights(
        model, expected, frozen=["fc/kernel", "fc/bias"]
    )
    unfreeze(model)
    assert model.optimizer is optimizer
    for variable in model.get_layer("fc").weights:
        assert not np.any(freezing_reference.slot(optimizer, variable))
    weights = freezing_reference.values(model)
    grads = freezing_reference.gradients(weights, x, y)
    expected, _ = freezing_reference.sgd_step(
        weights, momenta, grads, trained=list(grads)
    )
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    freezing_reference.assert_weights(model, expected, frozen=[])
    assert int(numpy(optimizer.iterations)) == 2


def test_a_wrapping_optimizer_is_replaced_with_one_warning():
    """LossScaleOptimizer keeps its state in the optimizer it wraps: it is
    replaced by a rebuilt copy, which keeps the step count, and the
    replacement is said once."""
    x, y = freezing_reference.linear_data()
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1, momentum=0.9)
    )
    model = freezing_reference.linear_model(optimizer)
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    with pytest.warns(UserWarning, match="LossScaleOptimizer in place"):
        freeze_first(model, 1)
    assert model.optimizer is not optimizer
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unfreeze(model)
    assert not [w for w in caught if "keras-sp" in str(w.message)]
    rebuilt = model.optimizer
    assert isinstance(rebuilt, keras.optimizers.LossScaleOptimizer)
    tracked = _keras_private.optimizer_variables(rebuilt)
    assert list(map(id, tracked)) == list(map(id, model.trainable_variables))
    assert int(numpy(rebuilt.iterations)) == 1
    fc = snapshot([model.get_layer("fc")])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, shuffle=False)
    assert changed(fc, [model.get_layer("fc")])
    assert int(numpy(rebuilt.iterations)) == 2


def frozen_bn_backbone():
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(inputs, x, name="base")


def model_with_base_called_in_inference_mode():
    base = frozen_bn_backbone()
    inputs = keras.Input((6, 6, 1))
    x = base(inputs, training=False)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    return keras.Model(inputs, outputs), base.get_layer("bn")


def test_documented_training_false_pattern_lets_fit_change_bn_statistics():
    x, y = data()
    model, bn = model_with_base_called_in_inference_mode()
    statistics = snapshot([bn])[2:]
    compiled(model).fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert not np.array_equal(statistics[0], numpy(bn.moving_mean))
    assert not np.array_equal(statistics[1], numpy(bn.moving_variance))


@pytest.mark.parametrize("train_gamma_beta", [False, True])
def test_freeze_batchnorm_keeps_statistics_during_fit(train_gamma_beta):
    x, y = data()
    model, bn = model_with_base_called_in_inference_mode()
    freeze_batchnorm(model, train_gamma_beta=train_gamma_beta)
    before = snapshot([bn])
    conv = model.layers[1].get_layer("conv")
    kernel = numpy(conv.kernel)
    compiled(model).fit(x, y, batch_size=8, epochs=2, verbose=0)
    gamma, beta, mean, variance = (numpy(w) for w in bn.weights)
    np.testing.assert_array_equal(mean, before[2])
    np.testing.assert_array_equal(variance, before[3])
    assert np.array_equal(gamma, before[0]) is not train_gamma_beta
    assert np.array_equal(beta, before[1]) is not train_gamma_beta
    assert not np.array_equal(kernel, numpy(conv.kernel))
    # Normalised with the moving statistics even when called in training
    # mode: the output is the affine map of the inference formula.
    expected = (numpy(conv(x)) - mean) / np.sqrt(variance + bn.epsilon)
    np.testing.assert_allclose(
        numpy(model.layers[1](x, training=True)),
        expected * gamma + beta,
        rtol=1e-4,
        atol=1e-5,
    )
    unfreeze(model)
    assert "call" not in vars(bn) and bn.trainable


def test_freeze_batchnorm_bad_flag():
    with pytest.raises(ValueError, match="Received: train_gamma_beta=1"):
        freeze_batchnorm(small_model(), train_gamma_beta=1)
    with pytest.raises(ValueError, match="Received: freeze='yes'"):
        copy_units(small_model(), small_model(), 1, freeze="yes")
