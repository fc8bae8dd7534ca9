import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sp import pretrained

ALPHA, CLASSES, SIZE = 0.25, 5, 32
STRIDE_2_BLOCKS = (2, 4, 6, 12)


def tiny_mobilenet(seed=0):
    """A small Keras MobileNet with random weights and BN statistics."""
    model = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3),
        alpha=ALPHA,
        classes=CLASSES,
        weights=None,
        classifier_activation=None,
    )
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights(
                [
                    rng.uniform(0.5, 1.5, n),
                    rng.normal(0, 0.1, n),
                    rng.normal(0, 0.1, n),
                    rng.uniform(0.5, 1.5, n),
                ]
            )
        elif layer.name == "conv_preds":
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
    return model


def write_slim_graph(model, path, epsilon=1e-3, seed=1):
    """The model as a TF-slim MobileNet V1 frozen graph computing logits.

    Weights are `Const` nodes under the TF-slim names; the graph computes
    BatchNorm as TF-slim's frozen graphs do and prepends a background class.
    """
    rng = np.random.default_rng(seed)
    arrays = {layer.name: layer.get_weights() for layer in model.layers}
    graph = tf.Graph()
    with graph.as_default():
        h = tf.compat.v1.placeholder(tf.float32, (1, SIZE, SIZE, 3), "input")

        def weights(layer):
            return arrays[layer]

        def batch_norm(h, scope, layer):
            gamma, beta, mean, variance = (
                tf.constant(value, name=f"MobilenetV1/{scope}/BatchNorm/{name}")
                for value, name in zip(
                    weights(f"{layer}_bn"),
                    ("gamma", "beta", "moving_mean", "moving_variance"),
                    strict=True,
                )
            )
            prefix = f"MobilenetV1/MobilenetV1/{scope}/BatchNorm/batchnorm"
            eps = tf.constant(np.float32(epsilon), name=f"{prefix}/add/y")
            scale = tf.math.rsqrt(variance + eps) * gamma
            return tf.nn.relu6(h * scale + (beta - mean * scale))

        kernel = tf.constant(
            weights("conv1")[0], name="MobilenetV1/Conv2d_0/weights"
        )
        h = tf.nn.conv2d(h, kernel, 2, "SAME")
        h = batch_norm(h, "Conv2d_0", "conv1")
        for i in range(1, 14):
            stride = 2 if i in STRIDE_2_BLOCKS else 1
            scope = f"Conv2d_{i}_depthwise"
            kernel = tf.constant(
                weights(f"conv_dw_{i}")[0],
                name=f"MobilenetV1/{scope}/depthwise_weights",
            )
            h = tf.nn.depthwise_conv2d(
                h, kernel, [1, stride, stride, 1], "SAME"
            )
            h = batch_norm(h, scope, f"conv_dw_{i}")
            scope = f"Conv2d_{i}_pointwise"
            kernel = tf.constant(
                weights(f"conv_pw_{i}")[0], name=f"MobilenetV1/{scope}/weights"
            )
            h = batch_norm(
                tf.nn.conv2d(h, kernel, 1, "SAME"), scope, f"conv_pw_{i}"
            )
        h = tf.reduce_mean(h, axis=(1, 2), keepdims=True)
        kernel, bias = weights("conv_preds")
        background = rng.normal(size=kernel.shape[:-1] + (1,)).astype("float32")
        kernel = tf.constant(
            np.concatenate([background, kernel], axis=-1),
            name="MobilenetV1/Logits/Conv2d_1c_1x1/weights",
        )
        bias = tf.constant(
            np.concatenate([[5.0], bias]).astype("float32"),
            name="MobilenetV1/Logits/Conv2d_1c_1x1/biases",
        )
        h = tf.nn.bias_add(tf.nn.conv2d(h, kernel, 1, "SAME"), bias)
        tf.squeeze(h, [1, 2], name="MobilenetV1/Logits/SpatialSqueeze")
    with open(path, "wb") as handle:
        handle.write(graph.as_graph_def().SerializeToString())
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    keras.utils.set_random_seed(0)
    model = tiny_mobilenet()
    folder = tmp_path_factory.mktemp("graph")
    graph = write_slim_graph(model, folder / "graph.pb")
    converted = pretrained.convert_mobilenet_v1(
        graph, weights_path=folder / "tiny.weights.h5"
    )
    return model, graph, converted


def fresh_model():
    return keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3),
        alpha=ALPHA,
        classes=CLASSES,
        weights=None,
        classifier_activation=None,
    )


def test_converted_weights_equal_the_originals_exactly(tiny):
    original, _, converted = tiny
    model = pretrained.load_weights_checked(fresh_model(), converted)
    compared = 0
    for layer in original.layers:
        for mine, theirs in zip(
            layer.get_weights(),
            model.get_layer(layer.name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(mine, theirs)
            compared += 1
    # 27 kernels, 27 BatchNorms of 4 arrays, the classifier's 2 arrays.
    assert compared == 27 + 27 * 4 + 2


def test_converted_model_gives_the_graphs_logits(tiny):
    _, graph, converted = tiny
    model = pretrained.load_weights_checked(fresh_model(), converted)
    x = np.random.default_rng(2).uniform(-1, 1, (3, SIZE, SIZE, 3))
    graph_logits = pretrained.frozen_graph_outputs(graph, x)
    assert graph_logits.shape == (3, CLASSES + 1)
    keras_logits = model.predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(keras_logits, graph_logits[:, 1:], atol=1e-4)


def test_mapping_reads_alpha_classes_and_epsilon(tiny):
    _, graph, _ = tiny
    weights, settings = pretrained.mobilenet_v1_weights(
        pretrained.read_graph_constants(graph)
    )
    epsilon = float(np.float32(1e-3))
    assert settings == {"alpha": ALPHA, "classes": CLASSES, "epsilon": epsilon}
    assert len(weights) == 1 + 27 + 26 + 1


def test_default_conversion_installs_into_a_temporary_folder(
    tiny, tmp_path, monkeypatch
):
    _, graph, converted = tiny
    used = []

    def install(directory):
        used.append(directory)
        copy = os.path.join(directory, "graph.pb")
        with open(graph, "rb") as source, open(copy, "wb") as target:
            target.write(source.read())
        return copy

    monkeypatch.setattr(pretrained, "install_mobilenet_graph", install)
    monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path))
    path = pretrained.convert_mobilenet_v1()
    assert path == str(tmp_path / pretrained.MOBILENET_WEIGHTS_FILE)
    assert not os.path.exists(used[0])
    model = pretrained.load_weights_checked(fresh_model(), path)
    reference = pretrained.load_weights_checked(fresh_model(), converted)
    for mine, theirs in zip(
        model.get_weights(), reference.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, theirs)


def test_existing_weights_are_not_overwritten_silently(tiny):
    _, graph, converted = tiny
    before = os.path.getmtime(converted)
    with pytest.raises(ValueError, match="overwrite=True"):
        pretrained.convert_mobilenet_v1(graph, weights_path=converted)
    assert os.path.getmtime(converted) == before


def test_graphs_that_are_not_mobilenet_v1_are_rejected(tiny, tmp_path):
    original, _, _ = tiny
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x00\x01 not a graph \xff" * 10)
    with pytest.raises(ValueError, match="GraphDef"):
        pretrained.convert_mobilenet_v1(
            garbage, weights_path=tmp_path / "a.weights.h5"
        )
    with pytest.raises(ValueError, match="graph_path='/no/such.pb'"):
        pretrained.convert_mobilenet_v1(
            "/no/such.pb", weights_path=tmp_path / "a.weights.h5"
        )
    wrong_epsilon = write_slim_graph(original, tmp_path / "e.pb", epsilon=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        pretrained.convert_mobilenet_v1(
            wrong_epsilon, weights_path=tmp_path / "b.weights.h5"
        )
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="MobilenetV1/Conv2d_0/weights")
        tf.constant(np.float32(1e-3), name="x/BatchNorm/batchnorm/add/y")
    (tmp_path / "partial.pb").write_bytes(
        graph.as_graph_def().SerializeToString()
    )
    with pytest.raises(ValueError, match="Conv2d_0/BatchNorm/gamma"):
        pretrained.convert_mobilenet_v1(
            tmp_path / "partial.pb", weights_path=tmp_path / "c.weights.h5"
        )
    assert not list(tmp_path.glob("*.weights.h5"))


def test_weights_file_of_another_backbone_is_rejected_untouched(tiny, tmp_path):
    _, _, converted = tiny
    wider = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), alpha=0.5, classes=CLASSES, weights=None
    )
    before = [w.copy() for w in wider.get_weights()]
    with pytest.raises(ValueError, match="does not match") as error:
        pretrained.load_weights_checked(wider, converted)
    assert "shapes differ" in str(error.value)
    assert str(error.value).endswith(f"weights_path={converted!r}")
    for old, new in zip(before, wider.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    dense.save_weights(tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match="missing"):
        pretrained.load_weights_checked(wider, tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match="does not match"):
        pretrained.imagenet_mobilenet(weights_path=converted)
    (tmp_path / "text.weights.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable"):
        pretrained.load_weights_checked(wider, tmp_path / "text.weights.h5")


def test_imagenet_mobilenet_without_top_keeps_the_backbone_weights(tmp_path):
    full = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), weights=None
    )
    path = str(tmp_path / "full.weights.h5")
    full.save_weights(path)
    base = pretrained.imagenet_mobilenet(
        input_shape=(SIZE, SIZE, 3),
        include_top=False,
        pooling="avg",
        weights_path=path,
    )
    assert base.output.shape == (None, 1024)
    assert "conv_preds" not in [layer.name for layer in base.layers]
    for layer in [layer for layer in base.layers if layer.weights]:
        for mine, theirs in zip(
            layer.get_weights(),
            full.get_layer(layer.name).get_weights(),
            strict=True,
        ):
            np.testing.assert_array_equal(mine, theirs)
