"""regularize, depth_units, freeze_first and widen on KerasHub's ResNet.

The backbones are built from a config (random weights, no preset), saved
to a local `.weights.h5` file and loaded from it into a second backbone,
as a user loads pretrained weights without downloading anything.
"""

import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
from backend import total

import keras_sp
from keras_sp import _keras_private

ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)

# Small configs (the first stack must have 64 filters in KerasHub).
RESNET_V1_BASIC = {
    "input_conv_filters": [64],
    "input_conv_kernel_sizes": [3],
    "stackwise_num_filters": [64, 32],
    "stackwise_num_blocks": [2, 1],
    "stackwise_num_strides": [1, 2],
    "block_type": "basic_block",
    "use_pre_activation": False,
    "image_shape": (32, 32, 3),
}
RESNET_V2_BOTTLENECK = {
    "input_conv_filters": [16, 16, 64],
    "input_conv_kernel_sizes": [3, 3, 3],
    "stackwise_num_filters": [64, 32],
    "stackwise_num_blocks": [1, 2],
    "stackwise_num_strides": [1, 2],
    "block_type": "bottleneck_block",
    "use_pre_activation": True,
    "image_shape": (32, 32, 3),
}
RESNET_VD_BOTTLENECK = dict(
    RESNET_V2_BOTTLENECK,
    block_type="bottleneck_block_vd",
    use_pre_activation=False,
)
# ResNet-101's block configuration (as in KerasHub's presets), unbuilt
# weights never loaded.
RESNET_101 = {
    "input_conv_filters": [64],
    "input_conv_kernel_sizes": [7],
    "stackwise_num_filters": [64, 128, 256, 512],
    "stackwise_num_blocks": [3, 4, 23, 3],
    "stackwise_num_strides": [1, 2, 2, 2],
    "block_type": "bottleneck_block",
    "use_pre_activation": False,
}


def _images(count, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(count, 32, 32, 3)).astype("float32")


def _randomize_batchnorm(backbone, seed):
    """Non-trivial moving statistics, so copying them is checked too."""
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            size = layer.moving_mean.shape
            layer.moving_mean.assign(
                rng.normal(0, 0.1, size=size).astype("float32")
            )
            layer.moving_variance.assign(
                rng.uniform(0.5, 2, size=size).astype("float32")
            )


def _pretrained_backbone(tmp_path, config):
    """A backbone whose weights come from a local `.weights.h5` file.

    Returns the loaded backbone and `{variable.path: array}` of the file.
    """
    keras.utils.set_random_seed(1)
    source = keras_hub.models.ResNetBackbone(**config)
    _randomize_batchnorm(source, seed=1)
    path = os.path.join(tmp_path, "resnet.weights.h5")
    source.save_weights(path)
    saved = {v.path: np.array(v.numpy()) for v in source.weights}
    keras.utils.set_random_seed(2)
    backbone = keras_hub.models.ResNetBackbone(**config)
    kernel = backbone.get_layer("conv1_conv").kernel
    assert not np.array_equal(kernel.numpy(), saved[kernel.path])
    backbone.load_weights(path)
    for variable in backbone.weights:
        np.testing.assert_array_equal(variable.numpy(), saved[variable.path])
    return backbone, saved


def _classifier(backbone, functional, fc_units=None, classes=3):
    """The backbone, its pooled features, an optional fc layer, a new head."""
    layers = [keras.layers.GlobalAveragePooling2D(name="pool")]
    if fc_units:
        layers.append(
            keras.layers.Dense(fc_units, activation="relu", name="fc")
        )
    layers.append(keras.layers.Dense(classes, name="head"))
    if not functional:
        model = keras.Sequential([backbone] + layers, name="classifier")
        model.build((None, 32, 32, 3))
        return model
    inputs = keras.Input((32, 32, 3), name="images")
    outputs = backbone(inputs)
    for layer in layers:
        outputs = layer(outputs)
    return keras.Model(inputs, outputs, name="classifier")


def _stem_names(config):
    """The stem's layers with weights, from the KerasHub configuration."""
    count = len(config["input_conv_filters"])
    names = []
    for index in range(1, count + 1):
        names.append(f"conv{index}_conv")
        if index < count or not config["use_pre_activation"]:
            names.append(f"conv{index}_bn")
    return names


def _block_names(config):
    return [
        f"stack{stack}_block{block}"
        for stack, blocks in enumerate(config["stackwise_num_blocks"])
        for block in range(blocks)
    ]


@pytest.mark.parametrize(
    "config",
    [RESNET_V1_BASIC, RESNET_V2_BOTTLENECK, RESNET_VD_BOTTLENECK],
    ids=["v1_basic", "v2_bottleneck", "vd_bottleneck"],
)
def test_depth_units_stem_then_one_unit_per_block_then_the_head(config):
    backbone = keras_hub.models.ResNetBackbone(**config)
    model = _classifier(backbone, functional=False)
    units = keras_sp.depth_units(model)
    blocks = _block_names(config)
    assert len(units) == 1 + sum(config["stackwise_num_blocks"]) + 1
    assert sorted(layer.name for layer in units[0]) == sorted(
        _stem_names(config)
    )
    for unit, block in zip(units[1:-1], blocks, strict=True):
        names = [layer.name for layer in unit]
        if block == blocks[-1] and config["use_pre_activation"]:
            assert names[-1] == "post_bn"
            names = names[:-1]
        assert all(name.startswith(block + "_") for name in names), names
    assert [layer.name for layer in units[-1]] == ["head"]
    in_units = [layer for unit in units for layer in unit]
    weighted = [
        layer
        for layer in _keras_private.all_layers(model)
        if layer.weights and not isinstance(layer, keras.Model)
    ]
    assert len(in_units) == len({id(layer) for layer in in_units})
    assert {id(layer) for layer in in_units} == {id(x) for x in weighted}


def test_resnet101_counts_as_in_the_paper():
    """The first convolution and each of the 33 blocks: 34 units."""
    backbone = keras_hub.models.ResNetBackbone(**RESNET_101)
    units = keras_sp.depth_units(backbone)
    assert len(units) == 1 + sum(RESNET_101["stackwise_num_blocks"]) == 34
    assert [layer.name for layer in units[0]] == ["conv1_conv", "conv1_bn"]


def test_regularize_l2_sp_equals_equation_2_after_perturbing(tmp_path):
    backbone, saved = _pretrained_backbone(tmp_path, RESNET_V2_BOTTLENECK)
    model = _classifier(backbone, functional=False)
    alpha, beta = 0.1, 0.01
    keras_sp.regularize(
        model, "l2_sp", alpha=alpha, beta=beta, new_layers=["head"]
    )
    head = model.get_layer("head")
    convolutions = [
        layer
        for layer in backbone.layers
        if isinstance(layer, keras.layers.Conv2D)
    ]
    attached = keras_sp.penalties.attached_penalties(model)
    assert {id(variable) for _, variable, _ in attached} == {
        id(layer.kernel) for layer in convolutions + [head]
    }
    # w = w0 (the file's weights): only the new head is penalized.
    np.testing.assert_allclose(
        total(model.losses),
        beta / 2 * np.sum(head.kernel.numpy() ** 2),
        rtol=1e-5,
    )
    rng = np.random.default_rng(3)
    for variable in model.weights:
        if variable.trainable:
            noise = rng.normal(0, 0.01, size=variable.shape)
            variable.assign(variable.numpy() + noise.astype("float32"))
    expected = alpha / 2 * sum(
        np.sum((layer.kernel.numpy() - saved[layer.kernel.path]) ** 2)
        for layer in convolutions
    ) + beta / 2 * np.sum(head.kernel.numpy() ** 2)
    np.testing.assert_allclose(total(model.losses), expected, rtol=1e-5)
    starting_point = keras_sp.starting_point(model)
    for layer in convolutions:
        np.testing.assert_array_equal(
            starting_point[layer.kernel.path], saved[layer.kernel.path]
        )


def test_freeze_first_keeps_frozen_units_bit_identical_after_fit(tmp_path):
    backbone, _ = _pretrained_backbone(tmp_path, RESNET_V1_BASIC)
    model = _classifier(backbone, functional=True)
    n = 2  # the stem and the first residual block
    keras_sp.freeze_first(model, n)
    units = keras_sp.depth_units(model)
    model.compile(
        optimizer=keras.optimizers.SGD(0.1),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {id(v): np.array(v.numpy()) for v in model.weights}
    labels = np.arange(8) % 3
    model.fit(_images(8), labels, batch_size=8, epochs=1, verbose=0)
    for unit in units[:n]:
        for layer in unit:
            assert not layer.trainable
            for variable in layer.weights:
                np.testing.assert_array_equal(
                    variable.numpy(), before[id(variable)], variable.path
                )
    for unit in units[n:]:
        changed = [
            not np.array_equal(variable.numpy(), before[id(variable)])
            for layer in unit
            for variable in layer.weights
        ]
        assert all(layer.trainable for layer in unit)
        assert any(changed), [layer.name for layer in unit]
    # The first trainable block's BatchNormalization ran in training mode.
    bn = next(
        layer
        for layer in units[n]
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert not np.array_equal(
        bn.moving_mean.numpy(), before[id(bn.moving_mean)]
    )


def _key(variable):
    """'layer/variable': a layer built inside a Sequential scopes its path
    with the model's name, the grown functional copy does not."""
    return "/".join(variable.path.split("/")[-2:])


@pytest.mark.parametrize(
    "config, functional",
    [(RESNET_V1_BASIC, False), (RESNET_V2_BOTTLENECK, True)],
    ids=["v1_sequential", "v2_functional"],
)
def test_widen_fc_on_pooled_features_copies_every_weight(
    tmp_path, config, functional
):
    backbone, _ = _pretrained_backbone(tmp_path, config)
    model = _classifier(backbone, functional, fc_units=8)
    before = {_key(v): np.array(v.numpy()) for v in model.weights}
    grown = keras_sp.widen(model, "fc", channels=4)
    # The original model is untouched.
    for variable in model.weights:
        np.testing.assert_array_equal(variable.numpy(), before[_key(variable)])
    # Every pre-existing weight is in the grown model, equal; the head has
    # 4 new input rows after the 8 copied ones.
    copied = {_key(v): np.array(v.numpy()) for v in grown.weights}
    assert len(copied) == len(grown.weights)
    for key, value in before.items():
        if key == "head/kernel":
            assert copied[key].shape == (8 + 4, 3)
            np.testing.assert_array_equal(copied[key][:8], value)
            assert 0 < np.std(copied[key][8:]) < 0.05
        else:
            np.testing.assert_array_equal(copied[key], value, key)
    grow = grown.get_layer("fc_grow")
    assert isinstance(grow, keras_sp.layers.GrowLayer)
    assert grow.compute_output_shape((None, 8))[-1] == 8 + 4
    # Same depth units: fc_grow takes fc's place.
    assert [len(unit) for unit in keras_sp.depth_units(grown)] == [
        len(unit) for unit in keras_sp.depth_units(model)
    ]
    # Brute force: with WA-CNN-ori and zero new rows the function is the
    # pretrained one, so the copied backbone (BN statistics included) is
    # exact.
    plain = keras_sp.widen(
        model, "fc", channels=4, normalize=False, consumer_initializer="zeros"
    )
    x = _images(4, seed=5)
    np.testing.assert_allclose(
        plain.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5
    )


@pytest.mark.parametrize(
    "config, layer_name, consumer",
    [
        (RESNET_V1_BASIC, "stack0_block0_1_conv", "stack0_block0_1_bn"),
        (RESNET_V2_BOTTLENECK, "stack1_block1_3_conv", "stack1_block1_out"),
    ],
)
def test_widen_inside_the_backbone_is_a_clear_error(
    config, layer_name, consumer
):
    backbone = keras_hub.models.ResNetBackbone(**config)
    model = _classifier(backbone, functional=False, fc_units=8)
    with pytest.raises(
        ValueError,
        match=(
            f"consumer '{consumer}'.*keeps its width.*after the backbone"
            f".*Received: layer_name='{layer_name}'"
        ),
    ):
        keras_sp.widen(model, layer_name, channels=4)


def test_importing_keras_sp_does_not_import_keras_hub():
    code = "import sys, keras_sp; print('keras_hub' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert result.stdout.strip() == "False"
