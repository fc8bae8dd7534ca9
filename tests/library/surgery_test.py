"""widen and deepen: weights copied exactly, the original left as it was."""

import os

import keras
import numpy as np
import pytest

import keras_sp
from keras_sp import _keras_private
from keras_sp import surgery
from keras_sp.experiments.fashion_source import build_small_cnn
from keras_sp.layers import GrowLayer
from keras_sp.layers import ScaledL2Normalization


def _images(count=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 255, size=(count, 28, 28, 1)).astype("float32")


def _key(variable):
    """'layer/variable': a model built inside a Sequential scopes its paths
    ('small_cnn/head/kernel'), a functional copy does not ('head/kernel')."""
    return "/".join(variable.path.split("/")[-2:])


def _snapshot(model):
    return {_key(v): np.array(v.numpy()) for v in model.weights}


def _assert_copied(original, new, skip=()):
    """Every variable of `original` is in `new`, same layer, equal values."""
    copied = {_key(v): v for v in new.weights}
    assert len(copied) == len(new.weights)
    for variable in original.weights:
        key = _key(variable)
        if key in skip:
            continue
        assert key in copied, key
        np.testing.assert_array_equal(
            copied[key].numpy(), variable.numpy(), key
        )


def _assert_untouched(model, snapshot, layer_names):
    assert _snapshot(model).keys() == snapshot.keys()
    for path, value in _snapshot(model).items():
        np.testing.assert_array_equal(value, snapshot[path], path)
    assert [layer.name for layer in model.layers] == layer_names


def _small_cnn():
    """The small CNN with non-trivial BatchNormalization statistics."""
    model = build_small_cnn(5, width=4, fc_units=8)
    rng = np.random.default_rng(0)
    for layer in model.get_layer("backbone").layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(rng.normal(size=size).astype("float32"))
            layer.moving_variance.assign(
                rng.uniform(0.5, 2, size=size).astype("float32")
            )
    return model


def test_widen_nested_fc_copies_weights_and_widens_the_head():
    model = _small_cnn()
    before = _snapshot(model)
    names = [layer.name for layer in model.layers]
    grown = surgery.widen(model, "fc", channels=3)
    _assert_untouched(model, before, names)
    _assert_copied(model, grown, skip={"head/kernel"})
    grow = grown.get_layer("backbone").get_layer("fc_grow")
    assert isinstance(grow, GrowLayer) and grow.layer.name == "fc"
    head = grown.get_layer("head").kernel.numpy()
    assert head.shape == (11, 5)
    np.testing.assert_array_equal(head[:8], before["head/kernel"])
    assert 0 < np.std(head[8:]) < 0.05  # small random new rows
    assert grown.get_layer("backbone").output.shape == (None, 11)
    assert not {id(x) for x in _keras_private.all_layers(grown)} & {
        id(x) for x in _keras_private.all_layers(model)
    }


def test_widen_with_zero_consumer_rows_keeps_the_function():
    """normalize=False and zero new rows: the output is exactly unchanged;
    normalize=True: the head sees scale_init * h / ||h||."""
    model = _small_cnn()
    x = _images()
    plain = surgery.widen(
        model, "fc", channels=3, normalize=False, consumer_initializer="zeros"
    )
    np.testing.assert_allclose(
        plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6
    )
    scaled = surgery.widen(
        model, "fc", channels=3, scale_init=4.0, consumer_initializer="zeros"
    )
    features = model.get_layer("backbone").predict(x, verbose=0)
    head = model.get_layer("head")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    expected = 4.0 * unit @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(scaled.predict(x, verbose=0), expected, 1e-4)


def test_widen_conv_through_channelwise_layers_to_a_conv_consumer():
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(3, 3, padding="same", name="conv_a")(inputs)
    x = keras.layers.ReLU(name="relu_a")(x)
    x = keras.layers.MaxPooling2D(name="pool_a")(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="conv_b")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="out")(x))
    grown = surgery.widen(
        model,
        "conv_a",
        channels=2,
        normalize=False,
        consumer_initializer="zeros",
    )
    kernel = grown.get_layer("conv_b").kernel.numpy()
    assert kernel.shape == (3, 3, 5, 4)
    np.testing.assert_array_equal(
        kernel[:, :, :3], model.get_layer("conv_b").kernel.numpy()
    )
    np.testing.assert_array_equal(kernel[:, :, 3:], 0.0)
    _assert_copied(model, grown, skip={"conv_b/kernel"})
    data = np.random.default_rng(1).normal(size=(2, 8, 8, 2))
    np.testing.assert_allclose(
        grown.predict(data, verbose=0), model.predict(data, verbose=0), 1e-5
    )


def test_widen_vgg16_fc2():
    model = keras.applications.VGG16(
        weights=None, input_shape=(32, 32, 3), classes=7
    )
    grown = surgery.widen(model, "fc2", channels=16)
    _assert_copied(model, grown, skip={"predictions/kernel"})
    kernel = grown.get_layer("predictions").kernel.numpy()
    assert kernel.shape == (4096 + 16, 7)
    np.testing.assert_array_equal(
        kernel[:4096], model.get_layer("predictions").kernel.numpy()
    )
    assert grown.get_layer("fc2_grow").output.shape == (None, 4112)


def test_deepen_resnet50_pooled_features_keeps_every_weight():
    base = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(32, 32, 3)
    )
    model = keras.Sequential([base, keras.layers.Dense(3, name="head")])
    model.build((None, 32, 32, 3))
    deeper = surgery.deepen(model, after="avg_pool", channels=2048)
    _assert_copied(model, deeper)
    assert len(deeper.weights) == len(model.weights) + 3
    inner = deeper.get_layer("resnet50")
    assert inner.layers[-2].name == "avg_pool_deepen"
    assert isinstance(inner.layers[-1], ScaledL2Normalization)
    features = inner.predict(np.ones((2, 32, 32, 3)), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 10.0, 1e-4)


def test_deepen_small_cnn_after_fc_with_and_without_width_change():
    model = _small_cnn()
    before = _snapshot(model)
    names = [layer.name for layer in model.layers]
    deeper = surgery.deepen(model, after="fc", channels=8, scale_init=3.0)
    _assert_untouched(model, before, names)
    _assert_copied(model, deeper)
    backbone = deeper.get_layer("backbone")
    assert [layer.name for layer in backbone.layers[-3:]] == [
        "fc",
        "fc_deepen",
        "fc_deepen_scale",
    ]
    features = backbone.predict(_images(), verbose=0)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 3.0, 1e-4)

    narrow = surgery.deepen(model, after="fc", channels=4, normalize=False)
    _assert_copied(model, narrow, skip={"head/kernel"})
    assert narrow.get_layer("head").kernel.shape == (4, 5)
    assert "fc_deepen_scale" not in [
        layer.name for layer in narrow.get_layer("backbone").layers
    ]

    conv = surgery.deepen(model, after="relu3", channels=16, name="conv_new")
    layer = conv.get_layer("backbone").get_layer("conv_new")
    assert isinstance(layer, keras.layers.Conv2D)
    assert layer.kernel_size == (1, 1) and layer.filters == 16
    _assert_copied(model, conv, skip={"fc/kernel"})
    assert conv.get_layer("backbone").get_layer("fc").kernel.shape == (16, 8)


def test_grown_model_round_trips_through_a_keras_file(tmp_path):
    model = _small_cnn()
    grown = surgery.widen(model, "fc", channels=3)
    grown = surgery.deepen(grown, after="fc_grow", channels=11)
    path = os.path.join(tmp_path, "grown.keras")
    grown.save(path)
    loaded = keras.saving.load_model(path)
    x = _images()
    np.testing.assert_array_equal(
        grown.predict(x, verbose=0), loaded.predict(x, verbose=0)
    )


def test_regularize_after_deepen_treats_the_new_layer_as_new():
    model = _small_cnn()
    deeper = surgery.deepen(model, after="fc", channels=8)
    keras_sp.regularize(
        deeper, "l2_sp", alpha=0.1, beta=0.01, new_layers=["head", "fc_deepen"]
    )
    shared = set(keras_sp.starting_point(deeper))
    assert "fc/kernel" in shared and "conv1/kernel" in shared
    assert not {"fc_deepen/kernel", "head/kernel"} & shared
    # The original model as the starting point: matched across the lost
    # Sequential scope ("small_cnn/head/kernel" -> "head/kernel").
    keras_sp.regularize(
        deeper,
        "l2_sp",
        alpha=0.1,
        new_layers=["fc_deepen"],
        starting_point=model,
    )
    w0 = keras_sp.starting_point(deeper)
    np.testing.assert_array_equal(
        w0["head/kernel"], model.get_layer("head").kernel.numpy()
    )


def test_keras_sp_penalties_are_not_carried_over():
    model = _small_cnn()
    keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=["head"])
    grown = surgery.widen(model, "fc", channels=3)
    assert keras_sp.penalties.attached_penalties(grown) == []
    assert len(keras_sp.penalties.attached_penalties(model)) == 4


def _two_heads():
    inputs = keras.Input((4,))
    features = keras.layers.Dense(5, name="fc")(inputs)
    a = keras.layers.Dense(2, name="a")(features)
    b = keras.layers.Dense(2, name="b")(features)
    return keras.Model(inputs, [a, b])


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda m: surgery.widen(m, "missing", 2),
            "Received: layer_name='missing'",
        ),
        (
            lambda m: surgery.deepen(m, "missing", 2),
            "Received: after='missing'",
        ),
        (
            lambda m: surgery.widen(m, "bn1", 2),
            "Dense or Conv2D.*BatchNormalization",
        ),
        (
            lambda m: surgery.widen(m, "conv3", 2),
            "consumer 'bn3' \\(BatchNormalization\\)",
        ),
        (lambda m: surgery.widen(m, "fc", 0), "Received: channels=0"),
        (lambda m: surgery.deepen(m, "fc", -1), "Received: channels=-1"),
        (
            lambda m: surgery.widen(m, "fc", 2, scale_init=0),
            "Received: scale_init=0",
        ),
        (
            lambda m: surgery.widen(m, "fc", 2, scale=3),
            "Unknown option 'scale'.*Received: scale=3",
        ),
        (
            lambda m: surgery.widen(m, "fc", 2, consumer_initializer="ones"),
            "Received: consumer_initializer='ones'",
        ),
        (
            lambda m: surgery.widen(_two_heads(), "fc", 2),
            "several consumers.*Received: layer_name='fc'",
        ),
        (
            lambda m: surgery.widen(keras.Sequential(), "fc", 2),
            "must be built",
        ),
        (
            lambda m: surgery.widen(m, "head", 2, change_outputs="yes"),
            "Received: change_outputs='yes'",
        ),
        (
            lambda m: surgery.deepen(m, "head", 2, change_outputs=1),
            "Received: change_outputs=1",
        ),
    ],
)
def test_bad_input_raises_a_clear_value_error(call, match):
    model = _small_cnn()
    before = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        call(model)
    _assert_untouched(model, before, ["backbone", "head"])


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.fc = keras.layers.Dense(3, name="fc")

    def call(self, inputs):
        return self.fc(inputs)


def test_subclassed_models_are_rejected():
    model = _Subclassed()
    model(np.ones((1, 2), "float32"))
    assert not _keras_private.is_functional(model)
    assert _keras_private.is_functional(_two_heads())
    with pytest.raises(ValueError, match="functional or Sequential.*_Sub"):
        surgery.widen(model, "fc", 2)


def test_deepen_keeps_several_consumers():
    model = _two_heads()
    deeper = surgery.deepen(model, after="fc", channels=5)
    _assert_copied(model, deeper)
    x = np.ones((1, 4), "float32")
    assert [y.shape for y in deeper.predict(x, verbose=0)] == [(1, 2), (1, 2)]


def _classifier(softmax=False, nested=False):
    """x (3) -> fc (4, relu) -> head (2) [-> softmax], with fixed weights;
    `nested`: the layers sit in a Sequential model nested in another."""
    layers = [
        keras.layers.Dense(4, activation="relu", name="fc"),
        keras.layers.Dense(2, name="head"),
    ]
    if softmax:
        layers.append(keras.layers.Activation("softmax", name="probs"))
    if nested:
        layers = [keras.Sequential(layers, name="inner")]
    model = keras.Sequential([keras.Input((3,))] + layers, name="classifier")
    rng = np.random.default_rng(3)
    for variable in model.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    return model


def _inputs():
    return np.random.default_rng(4).normal(size=(5, 3)).astype("float32")


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: _classifier(), "classifier"),
        (lambda: _classifier(softmax=True), "classifier"),
        (lambda: _classifier(nested=True), "classifier"),
        (lambda: _small_cnn(), "small_cnn"),
    ],
)
def test_widening_the_output_layer_raises_naming_layer_and_shapes(make, name):
    """The output layer, reached directly, through a layer without weights
    (softmax) or through a nested model's boundary."""
    model = make()
    before = _snapshot(model)
    names = [layer.name for layer in model.layers]
    classes = model.outputs[0].shape[-1]
    with pytest.raises(
        ValueError,
        match=(
            f"`layer_name`: layer 'head' computes the output of model "
            f"'{name}'.*widening it would change its output shape from "
            f"\\(None, {classes}\\) to \\(None, {classes + 3}\\)\\. Pass "
            "`change_outputs=True`.*Received: layer_name='head'"
        ),
    ):
        surgery.widen(model, "head", channels=3)
    _assert_untouched(model, before, names)


def test_widening_the_output_layer_with_the_opt_in_adds_outputs():
    """change_outputs=True, normalize=False: y = [h, x W+ + b+], the old
    outputs h unchanged and the new ones in closed form."""
    model = _classifier()
    x = _inputs()
    grown = surgery.widen(
        model, "head", channels=3, normalize=False, change_outputs=True
    )
    assert grown.output.shape == (None, 5)
    y = grown.predict(x, verbose=0)
    np.testing.assert_allclose(y[:, :2], model.predict(x, verbose=0), 1e-5)
    fc = model.get_layer("fc")
    hidden = np.maximum(x @ fc.kernel.numpy() + fc.bias.numpy(), 0)
    new = grown.get_layer("head_grow").new_layer
    expected = hidden @ new.kernel.numpy() + new.bias.numpy()
    np.testing.assert_allclose(y[:, 2:], expected, 1e-5, 1e-6)


def test_deepening_after_the_output_layer_raises_naming_layer_and_shapes():
    model = _classifier(softmax=True)
    before = _snapshot(model)
    names = [layer.name for layer in model.layers]
    with pytest.raises(
        ValueError,
        match=(
            "`after`: layer 'head' computes the output of model "
            "'classifier'.*deepening after it would change its output shape "
            "from \\(None, 2\\) to \\(None, 6\\).*Received: after='head'"
        ),
    ):
        surgery.deepen(model, after="head", channels=6)
    # Same width: the shape stays, but new layers would compute the output.
    with pytest.raises(
        ValueError,
        match="make new layers compute its output \\(shape \\(None, 2\\) "
        "kept\\).*Received: after='probs'",
    ):
        surgery.deepen(model, after="probs", channels=2)
    # A model whose output is a nested model's output layer.
    backbone = _small_cnn().get_layer("backbone")
    with pytest.raises(ValueError, match="Received: after='fc'"):
        surgery.deepen(backbone, after="fc", channels=8)
    _assert_untouched(model, before, names)


def test_deepening_after_the_output_layer_with_the_opt_in():
    """y = scale_init * h+ / ||h+||, h+ = relu(logits W + b): closed form."""
    model = _classifier()
    x = _inputs()
    deeper = surgery.deepen(
        model, after="head", channels=6, scale_init=2.0, change_outputs=True
    )
    assert deeper.output.shape == (None, 6)
    new = deeper.get_layer("head_deepen")
    logits = model.predict(x, verbose=0)
    hidden = np.maximum(logits @ new.kernel.numpy() + new.bias.numpy(), 0)
    norm = np.sqrt(np.sum(hidden**2, axis=1, keepdims=True) + 1e-12)
    np.testing.assert_allclose(
        deeper.predict(x, verbose=0), 2.0 * hidden / norm, 1e-5, 1e-6
    )


def test_growing_hidden_layers_needs_no_opt_in():
    """Hidden layers inside a nested model, before an output layer with
    weights: no opt-in is needed, and the outputs are in closed form."""
    model = _classifier(softmax=True, nested=True)
    x = _inputs()
    deeper = surgery.deepen(model, after="fc", channels=4, normalize=False)
    fc = model.get_layer("inner").get_layer("fc")
    head = model.get_layer("inner").get_layer("head")
    new = deeper.get_layer("inner").get_layer("fc_deepen")
    hidden = np.maximum(x @ fc.kernel.numpy() + fc.bias.numpy(), 0)
    hidden = np.maximum(hidden @ new.kernel.numpy() + new.bias.numpy(), 0)
    logits = hidden @ head.kernel.numpy() + head.bias.numpy()
    probs = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
    np.testing.assert_allclose(deeper.predict(x, verbose=0), probs, 1e-5)
    grown = surgery.widen(
        model, "fc", channels=2, normalize=False, consumer_initializer="zeros"
    )
    np.testing.assert_allclose(
        grown.predict(x, verbose=0), model.predict(x, verbose=0), 1e-6
    )
