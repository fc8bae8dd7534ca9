"""The comparison's settings: the MobileNet source and the augmentation."""

import keras
import numpy as np
import tensorflow as tf

from keras_sp.experiments import comparison_settings
from keras_sp.experiments import training
from keras_sp.experiments.data import mobilenet_inputs


def test_mobilenet_source_is_the_imagenet_network_on_scaled_gray_images(
    tmp_path,
):
    """Brute force: the source model's logits equal the full MobileNet's
    (with its ImageNet classifier, no softmax) on the images resized,
    repeated to three channels and scaled to [-1, 1]."""
    keras.utils.set_random_seed(0)
    full = keras.applications.MobileNet(
        input_shape=(32, 32, 3), weights=None, classifier_activation=None
    )
    path = str(tmp_path / "mobilenet.weights.h5")
    full.save_weights(path)
    source = comparison_settings.mobilenet_source(32, weights_path=path)
    images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1))
    images = images.astype("float32")
    expected = full.predict(mobilenet_inputs(images, 32), verbose=0)
    got = source.predict(images, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert source.get_layer("backbone").output.shape == (None, 1024)


def test_augmentation_shifts_and_flips_each_image_and_is_seeded():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (6, 8, 8, 1)).astype("float32")
    y = np.arange(6)
    batches = comparison_settings.augmented_dataset(x, y, 6, seed=3)
    first = [(a.numpy(), b.numpy()) for a, b in batches.take(2)]
    again = comparison_settings.augmented_dataset(x, y, 6, seed=3)
    second = [(a.numpy(), b.numpy()) for a, b in again.take(2)]
    for (a, b), (c, d) in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    # Each image is a 2-px-reflect-padded crop of its original, maybe
    # mirrored: brute force over the 25 shifts and 2 flips.
    padded = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
    moved = 0
    for images, labels in first:
        for image, label in zip(images, labels, strict=True):
            candidates = [
                crop[:, ::-1] if flip else crop
                for dy in range(5)
                for dx in range(5)
                for crop in [padded[label, dy : dy + 8, dx : dx + 8]]
                for flip in (False, True)
            ]
            assert any((image == c).all() for c in candidates)
            moved += not (image == x[label]).all()
    assert moved > 0


def test_the_few_shot_pipelines_run_without_the_autotuner():
    """Both training pipelines of the comparison turn tf.data's autotuner
    off (its thread makes each iterator's teardown wait) and yield the
    batches the same pipeline yields with it: the same seeded shuffle of
    every image once per epoch."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(10, 4, 4, 1)).astype("float32")
    y = np.arange(10)
    light = training.training_dataset(x, y, 5, seed=7)
    assert light.options().autotune.enabled is False
    augmented = comparison_settings.augmented_dataset(x, y, 5, seed=7)
    assert augmented.options().autotune.enabled is False
    tuned = (
        tf.data.Dataset.from_tensor_slices((x, y))
        .shuffle(10, seed=7, reshuffle_each_iteration=True)
        .repeat()
        .batch(5)
        .prefetch(tf.data.AUTOTUNE)
    )
    assert tuned.options().autotune.enabled is not False
    got = [(a.numpy(), b.numpy()) for a, b in light.take(6)]
    expected = [(a.numpy(), b.numpy()) for a, b in tuned.take(6)]
    for (a, b), (c, d) in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, c)
        np.testing.assert_array_equal(b, d)
    # Every epoch (2 batches) holds each image once.
    for epoch in range(3):
        labels = np.concatenate([got[2 * epoch][1], got[2 * epoch + 1][1]])
        assert sorted(labels) == list(range(10))
        np.testing.assert_array_equal(
            np.concatenate([got[2 * epoch][0], got[2 * epoch + 1][0]]),
            x[labels],
        )
