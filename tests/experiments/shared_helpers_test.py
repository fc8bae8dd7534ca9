"""Helpers the kit's modules share: the cross-entropy of `measures`, the
MobileNet input scaling, and the Fisher entries of a fine-tuned backbone."""

import keras
import numpy as np
import pytest

from keras_sp.experiments.data import preprocessing
from keras_sp.experiments.finetune import _fisher
from keras_sp.experiments.measures import cross_entropy


def test_cross_entropy_against_brute_force():
    rng = np.random.default_rng(0)
    logits = rng.normal(0.0, 3.0, size=(7, 5)).astype("float32")
    labels = rng.integers(0, 5, size=7)
    probabilities = np.exp(logits.astype("float64"))
    probabilities /= probabilities.sum(axis=-1, keepdims=True)
    expected = -np.log(probabilities[np.arange(7), labels])
    np.testing.assert_allclose(
        cross_entropy(logits, labels), expected, rtol=1e-12
    )
    # Shifting every logit of a row leaves the softmax unchanged; logits
    # that would overflow exp() stay finite.
    np.testing.assert_allclose(
        cross_entropy(logits.astype("float64") + 1000.0, labels),
        expected,
        rtol=1e-9,
    )


def test_mobilenet_scale_maps_0_255_to_minus_one_one():
    x = np.array([0.0, 51.0, 127.5, 255.0])
    np.testing.assert_allclose(
        preprocessing.mobilenet_scale(x), [-1.0, -0.6, 0.0, 1.0]
    )
    images = np.full((1, 4, 4, 1), 51, np.uint8)
    np.testing.assert_allclose(
        preprocessing.mobilenet_inputs(images, image_size=4).numpy(),
        -0.6,
        rtol=1e-6,
    )


def _backbone():
    inputs = keras.Input((3,))
    x = keras.layers.Dense(2, name="c1")(inputs)
    return keras.Model(inputs, x, name="backbone")


def test_backbone_entries_prefer_the_exact_path():
    backbone = _backbone()
    kernel = backbone.get_layer("c1").kernel
    exact = np.full((3, 2), 1.0)
    nested = np.full((3, 2), 2.0)
    # The exact path wins over a nested model's path ending with it, as
    # keras_sp.regularize matches entries.
    fisher = {kernel.path: exact, "source/" + kernel.path: nested}
    selected = _fisher._backbone_entries(fisher, backbone)
    assert list(selected) == [kernel.path]
    np.testing.assert_array_equal(selected[kernel.path], exact)
    # A '/'-aligned suffix alone matches.
    selected = _fisher._backbone_entries(
        {"source/" + kernel.path: nested}, backbone
    )
    np.testing.assert_array_equal(selected[kernel.path], nested)
    # Two suffix matches and none are errors naming the variable.
    with pytest.raises(ValueError, match=f"2 entries .*'{kernel.path}'"):
        _fisher._backbone_entries(
            {"a/" + kernel.path: nested, "b/" + kernel.path: nested}, backbone
        )
    with pytest.raises(ValueError, match=f"0 entries .*'{kernel.path}'"):
        _fisher._backbone_entries({"other/kernel": nested}, backbone)
