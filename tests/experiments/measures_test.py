"""Source-task measurements of the reproduction kit (Table 3 of the paper)."""

import keras
import numpy as np
import pytest

import keras_sp
from keras_sp.experiments import measures


def _bn_backbone():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.Conv2D(3, 3, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, x, name="backbone")


def test_source_task_accuracy_with_both_statistics():
    backbone = _bn_backbone()
    head = keras.layers.Dense(3)
    rng = np.random.default_rng(1)
    x = rng.normal(1.0, 2.0, size=(40, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, size=40)
    before = [w.copy() for w in backbone.get_weights()]
    scores = keras.ops.convert_to_numpy(head(backbone(x, training=False)))
    expected = np.mean(np.argmax(scores, axis=-1) == y)
    assert measures.source_task_accuracy(backbone, head, x, y) == pytest.approx(
        expected
    )

    copy = keras.models.clone_model(backbone)
    copy.set_weights(backbone.get_weights())
    keras_sp.reestimate_batchnorm(copy, x)
    scores = keras.ops.convert_to_numpy(head(copy(x, training=False)))
    expected = np.mean(np.argmax(scores, axis=-1) == y)
    assert measures.source_task_accuracy(
        backbone, head, x, y, batchnorm="reestimated"
    ) == pytest.approx(expected)
    for old, new in zip(before, backbone.get_weights(), strict=True):
        np.testing.assert_array_equal(old, new)
    with pytest.raises(ValueError, match="batchnorm='moving'"):
        measures.source_task_accuracy(backbone, head, x, y, batchnorm="moving")
