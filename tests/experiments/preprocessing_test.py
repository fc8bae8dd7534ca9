import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from keras_sp.experiments.data import central_crop
from keras_sp.experiments.data import channel_mean
from keras_sp.experiments.data import gaussian_blur
from keras_sp.experiments.data import mobilenet_inputs
from keras_sp.experiments.data import mobilenet_preprocessing
from keras_sp.experiments.data import paper_preprocessing
from keras_sp.experiments.data.preprocessing import three_channels

SIZE, CROP = 12, 8


def random_images(count, size=SIZE, channels=3, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def as_dataset(images, labels=None):
    labels = np.arange(len(images)) if labels is None else labels
    return tf.data.Dataset.from_tensor_slices((images, labels))


def windows(image, crop):
    """Every crop x crop window of `image` and of its mirror image."""
    size = image.shape[0]
    found = []
    for source in (image, image[:, ::-1]):
        for top in range(size - crop + 1):
            for left in range(size - crop + 1):
                found.append(source[top : top + crop, left : left + crop])
    return found


def test_three_channels_duplicates_gray_exactly():
    gray = random_images(2, channels=1)
    rgb = three_channels(gray).numpy()
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], gray[..., 0])
    color = random_images(1)
    np.testing.assert_array_equal(three_channels(color).numpy(), color)
    with pytest.raises(ValueError, match="1 \\(gray\\) or 3"):
        three_channels(np.zeros((4, 4, 2)))


def test_central_crop_takes_the_middle_rows_and_columns():
    image = np.arange(256 * 256 * 3).reshape(256, 256, 3)
    np.testing.assert_array_equal(
        central_crop(image, 224).numpy(), image[16:240, 16:240]
    )
    odd = np.arange(2 * 7 * 9 * 1).reshape(2, 7, 9, 1)
    np.testing.assert_array_equal(
        central_crop(odd, 4).numpy(), odd[:, 1:5, 2:6]
    )


def test_gaussian_blur_matches_scipy_with_mirrored_borders():
    image = random_images(1, size=10)[0].astype("float32")
    blurred = gaussian_blur(image, 1.3, radius=4).numpy()
    for channel in range(3):
        expected = ndimage.gaussian_filter(
            image[..., channel], sigma=1.3, radius=4, mode="mirror"
        )
        np.testing.assert_allclose(blurred[..., channel], expected, atol=1e-3)
    batch = gaussian_blur(np.stack([image, image]), 1.3, radius=4).numpy()
    np.testing.assert_allclose(batch[1], blurred, atol=1e-5)


def test_gaussian_blur_keeps_constants_and_zero_sigma_is_identity():
    constant = np.full((9, 11, 3), 37.0, "float32")
    np.testing.assert_allclose(
        gaussian_blur(constant, 2.0, radius=6).numpy(), constant, atol=1e-4
    )
    image = random_images(1)[0].astype("float32")
    np.testing.assert_array_equal(
        gaussian_blur(image, 0.0, radius=3).numpy(), image
    )
    smoothed = gaussian_blur(image, 1.0, radius=3).numpy()
    assert smoothed.std() < image.std()
    np.testing.assert_allclose(smoothed.mean(), image.mean(), rtol=0.05)


def test_channel_mean_weights_every_resized_image_equally():
    small = np.zeros((4, 4, 3), np.uint8) + np.array([10, 20, 30], np.uint8)
    wide = np.zeros((8, 2, 3), np.uint8) + np.array([50, 60, 70], np.uint8)
    exact = random_images(1)[0]
    images = [small, wide, exact]
    dataset = tf.data.Dataset.from_generator(
        lambda: ((image, 0) for image in images),
        output_signature=(
            tf.TensorSpec((None, None, 3), tf.uint8),
            tf.TensorSpec((), tf.int32),
        ),
    )
    expected = np.mean(
        [image.reshape(-1, 3).mean(axis=0) for image in images], axis=0
    )
    np.testing.assert_allclose(
        channel_mean(dataset, image_size=SIZE), expected, rtol=1e-5
    )
    with pytest.raises(ValueError, match="empty dataset"):
        channel_mean(dataset.take(0))


def test_test_pipeline_subtracts_mean_and_takes_central_crop():
    images = random_images(5)
    mean = np.array([100.0, 110.0, 120.0], "float32")
    batches = list(
        paper_preprocessing(
            as_dataset(images),
            mean,
            training=False,
            image_size=SIZE,
            crop_size=CROP,
            batch_size=2,
        ).as_numpy_iterator()
    )
    assert [x.shape for x, _ in batches] == [(2, CROP, CROP, 3)] * 2 + [
        (1, CROP, CROP, 3)
    ]
    x = np.concatenate([x for x, _ in batches])
    y = np.concatenate([y for _, y in batches])
    assert x.dtype == np.float32 and y.dtype == np.int32
    np.testing.assert_array_equal(y, np.arange(5))
    expected = (images.astype("float32") - mean)[:, 2:10, 2:10]
    np.testing.assert_allclose(x, expected, atol=1e-4)


def test_gray_and_bgr_inputs():
    gray = random_images(2, channels=1)
    mean = np.array([1.0, 2.0, 3.0], "float32")
    x, _ = next(
        iter(
            paper_preprocessing(
                as_dataset(gray),
                mean,
                training=False,
                image_size=SIZE,
                crop_size=CROP,
                color_order="bgr",
            )
        )
    )
    crop = gray[:, 2:10, 2:10, 0].astype("float32")
    for channel, value in enumerate(mean[::-1]):
        np.testing.assert_allclose(x[..., channel], crop - value, atol=1e-4)


def test_training_crops_are_exact_windows_or_mirrors_of_them():
    images = random_images(4)
    mean = np.array([5.0, 6.0, 7.0], "float32")
    pipeline = paper_preprocessing(
        as_dataset(images),
        mean,
        training=True,
        image_size=SIZE,
        crop_size=CROP,
        batch_size=4,
        blur_probability=0.0,
        seed=3,
    )
    mirrored, offsets = set(), set()
    for x, y in pipeline.take(12).as_numpy_iterator():
        assert x.shape == (4, CROP, CROP, 3) and y.dtype == np.int32
        for crop, label in zip(x, y, strict=True):
            candidates = windows(images[label].astype("float32") - mean, CROP)
            matches = [
                index
                for index, window in enumerate(candidates)
                if np.allclose(window, crop, atol=1e-4)
            ]
            assert matches, "a training crop is not a window of its image"
            mirrored.add(matches[0] >= len(candidates) // 2)
            offsets.add(matches[0] % (len(candidates) // 2))
    # 48 draws: both mirror states and several crop positions occur.
    assert mirrored == {False, True}
    assert len(offsets) > 5


def test_training_blur_keeps_a_constant_image_and_depends_on_seed():
    constant = np.full((3, SIZE, SIZE, 3), 90, np.uint8)
    mean = np.array([10.0, 20.0, 30.0], "float32")
    blurred = paper_preprocessing(
        as_dataset(constant),
        mean,
        training=True,
        image_size=SIZE,
        crop_size=CROP,
        batch_size=3,
        blur_probability=1.0,
        max_blur_sigma=1.5,
    )
    x, _ = next(iter(blurred))
    np.testing.assert_allclose(
        x.numpy(), np.broadcast_to(90.0 - mean, x.shape), atol=1e-3
    )

    def first_batches(seed, blur_probability=0.5):
        pipeline = paper_preprocessing(
            as_dataset(random_images(6)),
            mean,
            training=True,
            image_size=SIZE,
            crop_size=CROP,
            batch_size=3,
            seed=seed,
            blur_probability=blur_probability,
        )
        return np.concatenate([x for x, _ in pipeline.take(4)])

    np.testing.assert_array_equal(first_batches(1), first_batches(1))
    assert not np.array_equal(first_batches(1), first_batches(2))
    # With blur, some crops are no longer exact windows.
    sharp = first_batches(1, blur_probability=0.0)
    assert not np.allclose(first_batches(1, blur_probability=1.0), sharp)


def test_bad_preprocessing_arguments_are_named():
    dataset = as_dataset(random_images(1))
    with pytest.raises(ValueError, match="shape \\(2,\\)"):
        paper_preprocessing(dataset, [1.0, 2.0], training=False)
    with pytest.raises(ValueError, match="crop_size=300"):
        paper_preprocessing(dataset, [0, 0, 0], False, crop_size=300)
    with pytest.raises(ValueError, match="color_order='hsv'"):
        paper_preprocessing(dataset, [0, 0, 0], False, color_order="hsv")
    with pytest.raises(ValueError, match="blur_probability=2"):
        paper_preprocessing(dataset, [0, 0, 0], True, blur_probability=2)


def test_mobilenet_inputs_scale_to_minus_one_one():
    images = random_images(3, size=28, channels=1)
    same_size = mobilenet_inputs(images, image_size=28).numpy()
    expected = np.repeat(images.astype("float32") / 127.5 - 1.0, 3, axis=-1)
    np.testing.assert_allclose(same_size, expected, atol=1e-6)
    upscaled = mobilenet_inputs(images, image_size=64).numpy()
    assert upscaled.shape == (3, 64, 64, 3) and upscaled.dtype == np.float32
    assert upscaled.min() >= -1.0 and upscaled.max() <= 1.0
    np.testing.assert_array_equal(upscaled[..., 0], upscaled[..., 2])
    extremes = np.array([[0, 255], [255, 0]], np.uint8).reshape(2, 2, 1)
    np.testing.assert_allclose(
        mobilenet_inputs(extremes, image_size=2).numpy()[..., 1],
        [[-1.0, 1.0], [1.0, -1.0]],
    )
    with pytest.raises(ValueError, match="shape \\(5, 28, 28\\)"):
        mobilenet_inputs(np.zeros((5, 28, 28)))


def test_mobilenet_preprocessing_keeps_labels_with_their_images():
    labels = np.arange(7) % 3
    images = np.zeros((7, 28, 28, 1), np.uint8) + (
        40 * labels[:, None, None, None]
    ).astype(np.uint8)
    test = list(
        mobilenet_preprocessing(
            images, labels, training=False, image_size=32, batch_size=4
        ).as_numpy_iterator()
    )
    assert [x.shape for x, _ in test] == [(4, 32, 32, 3), (3, 32, 32, 3)]
    np.testing.assert_array_equal(np.concatenate([y for _, y in test]), labels)
    train = mobilenet_preprocessing(
        images, labels, training=True, image_size=32, batch_size=4, seed=0
    )
    seen = []
    for x, y in train.take(5).as_numpy_iterator():
        assert x.shape == (4, 32, 32, 3)
        np.testing.assert_allclose(
            x[:, 0, 0, 0], 40 * y / 127.5 - 1.0, atol=1e-5
        )
        seen.extend(y.tolist())
    assert len(seen) == 20
    with pytest.raises(ValueError, match="same length"):
        mobilenet_preprocessing(images, labels[:3], training=False)
