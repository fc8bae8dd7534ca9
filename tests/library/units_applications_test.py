"""`depth_units` on `keras.applications` models.

These models are large to build (ResNet-152 and others, about 40 s on JAX
for the set) and their depth units depend only on the layer graph, not on
the backend, so they live apart from `units_test.py`, whose tests run on
every backend.
"""

import re

import keras
import pytest

from keras_sp.units import depth_units

# Residual blocks per stage (He et al. 2016, Table 1).
RESNET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
SHAPE = (32, 32, 3)


@pytest.fixture(scope="class")
def applications():
    """Each keras.applications model once per module (they are slow)."""
    models = {}
    for depth in RESNET_BLOCKS:
        for suffix in ("", "V2"):
            name = f"ResNet{depth}{suffix}"
            models[name] = getattr(keras.applications, name)(
                weights=None, include_top=False, input_shape=SHAPE
            )
    models["MobileNet"] = keras.applications.MobileNet(
        weights=None, input_shape=SHAPE, classes=7
    )
    models["VGG16"] = keras.applications.VGG16(
        weights=None, input_shape=SHAPE, classes=7
    )
    return models


def names(unit):
    return [layer.name for layer in unit]


def weighted_layers(model):
    return [layer for layer in model.layers if layer.weights]


class TestApplications:
    """keras.applications models, built once for this class."""

    @pytest.mark.parametrize("depth", sorted(RESNET_BLOCKS))
    @pytest.mark.parametrize("suffix", ["", "V2"])
    def test_resnet_stem_plus_one_unit_per_residual_block(
        self, applications, depth, suffix
    ):
        model = applications[f"ResNet{depth}{suffix}"]
        units = depth_units(model)
        blocks = [
            f"conv{stage}_block{block}"
            for stage, count in enumerate(RESNET_BLOCKS[depth], start=2)
            for block in range(1, count + 1)
        ]
        assert len(units) == 1 + len(blocks)
        stem = ["conv1_conv"] if suffix else ["conv1_conv", "conv1_bn"]
        assert names(units[0]) == stem
        for unit, block in zip(units[1:], blocks, strict=True):
            extra = ["post_bn"] if suffix and block == blocks[-1] else []
            assert (
                all(name.startswith(block + "_") for name in names(unit))
                or names(unit)[-1:] == extra
            )
            expected = sorted(
                layer.name
                for layer in weighted_layers(model)
                if layer.name.startswith(block + "_")
            )
            assert sorted(n for n in names(unit) if n not in extra) == expected
        flat = [layer for unit in units for layer in unit]
        assert (
            len(flat) == len(weighted_layers(model)) == len(set(map(id, flat)))
        )

    def test_resnet101_has_34_units_and_a_new_head_is_the_35th(
        self, applications
    ):
        backbone = applications["ResNet101"]
        head = keras.layers.Dense(3, name="new_head")
        model = keras.Sequential([keras.Input(SHAPE), backbone, head])
        units = depth_units(model)
        assert len(depth_units(backbone)) == 34
        assert len(units) == 35
        assert units[-1] == [head]
        assert names(units[0]) == ["conv1_conv", "conv1_bn"]

    def test_mobilenet_stem_then_depthwise_pointwise_pairs(self, applications):
        model = applications["MobileNet"]
        units = depth_units(model)
        pairs = sum(
            bool(re.fullmatch(r"conv_dw_\d+", layer.name))
            for layer in model.layers
        )
        assert len(units) == 1 + pairs + 1
        assert names(units[0]) == ["conv1", "conv1_bn"]
        for i, unit in enumerate(units[1:-1], start=1):
            assert sorted(names(unit)) == sorted(
                [
                    f"conv_dw_{i}",
                    f"conv_dw_{i}_bn",
                    f"conv_pw_{i}",
                    f"conv_pw_{i}_bn",
                ]
            )
        assert names(units[-1]) == ["conv_preds"]

    def test_vgg16_one_unit_per_convolution_and_dense_layer(self, applications):
        model = applications["VGG16"]
        units = depth_units(model)
        expected = [[layer.name] for layer in weighted_layers(model)]
        assert [names(unit) for unit in units] == expected
        convolutions = [u for u in expected if "conv" in u[0]]
        assert len(convolutions) == 13 and len(units) == 16
