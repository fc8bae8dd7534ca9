"""Fails when a Keras release changes an internal keras-sp relies on."""

import keras

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
