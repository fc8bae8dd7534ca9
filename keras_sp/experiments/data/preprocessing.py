"""The paper's image pre-processing, and MobileNet inputs, as `tf.data`.

This module is TensorFlow-only: it builds `tf.data` pipelines (parallel
`map`, `prefetch`) that keep the CPU cores busy while the model trains.

The paper (section 4.2): gray images are duplicated to three channels;
images are resized to 256x256 and the per-channel mean computed over the
training set is subtracted; training uses random blur, random mirror and a
random 224x224 crop; testing uses the central 224x224 crop.
"""

import math

import numpy as np
import tensorflow as tf

__all__ = [
    "central_crop",
    "channel_mean",
    "gaussian_blur",
    "mobilenet_inputs",
    "mobilenet_preprocessing",
    "paper_preprocessing",
]

COLOR_ORDERS = ("rgb", "bgr")


def three_channels(image):
    """Duplicates a gray image (last axis 1) to three channels.

    Args:
        image: tensor `(..., height, width, 1 or 3)`.

    Returns:
        The image with three channels (unchanged if it had three).

    Example:

    >>> three_channels(tf.zeros((2, 2, 1))).shape
    TensorShape([2, 2, 3])
    """
    image = tf.convert_to_tensor(image)
    channels = image.shape[-1]
    if channels == 3:
        return image
    if channels == 1:
        return tf.repeat(image, 3, axis=-1)
    if channels is None:
        return tf.cond(
            tf.shape(image)[-1] == 1,
            lambda: tf.repeat(image, 3, axis=-1),
            lambda: image,
        )
    raise ValueError(
        "`image` must have 1 (gray) or 3 (RGB) channels on its last axis. "
        f"Received: image of shape {image.shape}"
    )


def central_crop(image, crop_size):
    """The central `crop_size` x `crop_size` window of an image.

    Rows and columns `offset .. offset + crop_size - 1` are kept, with
    `offset = (size - crop_size) // 2` (16 for 224 out of 256).

    Args:
        image: tensor `(..., height, width, channels)`.
        crop_size: int, side of the square crop.

    Returns:
        The cropped tensor.

    Example:

    >>> image = tf.reshape(tf.range(16), (4, 4, 1))
    >>> central_crop(image, 2)[..., 0].numpy().tolist()
    [[5, 6], [9, 10]]
    """
    image = tf.convert_to_tensor(image)
    height, width = tf.shape(image)[-3], tf.shape(image)[-2]
    top = (height - crop_size) // 2
    left = (width - crop_size) // 2
    return image[..., top : top + crop_size, left : left + crop_size, :]


def _gaussian_kernel(sigma, radius):
    """A normalised 1-D Gaussian of standard deviation `sigma`."""
    offsets = tf.cast(tf.range(-radius, radius + 1), tf.float32)
    sigma = tf.maximum(tf.cast(sigma, tf.float32), 1e-6)
    kernel = tf.exp(-0.5 * tf.square(offsets / sigma))
    return kernel / tf.reduce_sum(kernel)


def gaussian_blur(image, sigma, radius):
    """Blurs an image with a Gaussian of standard deviation `sigma`.

    `out[i, j] = sum_{u, v} g(u) g(v) in[i + u, j + v]` over
    `u, v in -radius..radius`, with `g(u) ∝ exp(-u² / (2 sigma²))`
    normalised to sum 1 and the image mirrored at its borders (the edge
    pixel is not repeated). A constant image stays constant; `sigma = 0` is
    the identity.

    Args:
        image: float tensor `(height, width, channels)` or
            `(batch, height, width, channels)`; height and width > radius.
        sigma: scalar, the standard deviation in pixels.
        radius: int, the kernel spans `2 * radius + 1` pixels.

    Returns:
        The blurred image, same shape, `float32`.

    Example:

    >>> image = tf.fill((5, 5, 3), 7.0)
    >>> bool(tf.reduce_max(tf.abs(gaussian_blur(image, 1.0, 2) - 7.0)) < 1e-5)
    True
    """
    image = tf.convert_to_tensor(image, dtype=tf.float32)
    single = image.shape.rank == 3
    if single:
        image = image[None]
    kernel = _gaussian_kernel(sigma, radius)
    size = 2 * radius + 1
    padded = tf.pad(
        image,
        [[0, 0], [radius, radius], [radius, radius], [0, 0]],
        mode="REFLECT",
    )
    height, width = tf.shape(image)[1], tf.shape(image)[2]
    # Separable: a weighted sum of shifted rows, then of shifted columns.
    rows = tf.add_n(
        [kernel[k] * padded[:, k : k + height] for k in range(size)]
    )
    blurred = tf.add_n(
        [kernel[k] * rows[:, :, k : k + width] for k in range(size)]
    )
    return blurred[0] if single else blurred


def _resized(image, image_size):
    """Three channels, resized (bilinear) to `image_size`², float32."""
    image = three_channels(image)
    return tf.image.resize(image, (image_size, image_size))


def channel_mean(dataset, image_size=256):
    """The per-channel mean of the training images, resized as in training.

    `mean[c] = (1 / (N H W)) sum_{n, i, j} x_n[i, j, c]` over the `N`
    images of `dataset` resized to `H = W = image_size`.

    Args:
        dataset: `tf.data.Dataset` of `(image, label)` (one image each).
        image_size: side the images are resized to (paper: 256).

    Returns:
        A `float32` NumPy array of shape `(3,)`.

    Example:

    >>> images = tf.data.Dataset.from_tensor_slices(
    ...     (tf.fill((2, 4, 4, 3), 10.0), [0, 1]))
    >>> channel_mean(images, image_size=2).tolist()
    [10.0, 10.0, 10.0]

    Reference:
        Li, Grandvalet, Davoine. "Explicit inductive bias for transfer
        learning with convolutional networks." ICML 2018, section 4.2.
    """
    means = dataset.map(
        lambda image, label: tf.reduce_mean(
            _resized(image, image_size), axis=(0, 1)
        ),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    per_image = [mean for mean in means.as_numpy_iterator()]
    if not per_image:
        raise ValueError(
            "`dataset` must hold at least one image to compute the mean. "
            "Received: an empty dataset"
        )
    return np.mean(np.stack(per_image).astype("float64"), axis=0).astype(
        "float32"
    )


def _check_mean(mean):
    mean = np.asarray(mean, dtype="float32")
    if mean.shape != (3,):
        raise ValueError(
            "`mean` must hold one value per RGB channel (see "
            f"`channel_mean`). Received: mean of shape {mean.shape}"
        )
    return mean


def paper_preprocessing(
    dataset,
    mean,
    training,
    image_size=256,
    crop_size=224,
    batch_size=64,
    seed=0,
    blur_probability=0.5,
    max_blur_sigma=1.0,
    shuffle_buffer=1000,
    color_order="rgb",
):
    """The paper's pre-processing and augmentation as a batched pipeline.

    Every image: gray duplicated to 3 channels, bilinear resize to
    `image_size`², minus the per-channel training-set `mean`. Training
    adds, per image: with probability `blur_probability` a Gaussian blur of
    `sigma ~ U(0, max_blur_sigma)` (the paper gives no parameters), a
    left-right mirror with probability 1/2 and a random `crop_size`² crop;
    the data are shuffled and repeated forever (the paper counts
    iterations: pass `steps_per_epoch` to `fit`). Testing takes the central
    crop, in order, once. The random draws depend only on `seed`, not on
    the thread timing. `map` runs in parallel and batches are prefetched.
    (The authors' released code applied random brightness, saturation and
    contrast under its "blur" option; this follows the paper's text.)

    Args:
        dataset: `tf.data.Dataset` of `(image, label)`, images `uint8` or
            float in 0..255 with 1 or 3 channels (e.g. `ImageData.train`).
        mean: the 3 channel means, e.g. `channel_mean(data.train)`.
        training: bool, augment, shuffle and repeat (True) or central crop.
        image_size: side of the resized image (paper: 256).
        crop_size: side of the crop fed to the network (paper: 224).
        batch_size: images per batch (paper: 64). Training batches are all
            full.
        seed: int, the seed of shuffling and augmentation.
        blur_probability: probability of blurring a training image.
        max_blur_sigma: largest blur standard deviation, in pixels.
        shuffle_buffer: size of the shuffle buffer (decoded images).
        color_order: `"rgb"`, or `"bgr"` for networks converted from Caffe
            (e.g. `keras.applications.ResNet101`), applied last.

    Returns:
        A `tf.data.Dataset` of `(float32 images (batch, crop, crop, 3),
        int32 labels (batch,))`.

    Example:

    >>> images = tf.data.Dataset.from_tensor_slices(
    ...     (tf.zeros((3, 40, 30, 1), tf.uint8), [0, 1, 2]))
    >>> batches = paper_preprocessing(images, [0.0, 0.0, 0.0],
    ...     training=False, image_size=32, crop_size=28, batch_size=2)
    >>> [tuple(x.shape) for x, _ in batches]
    [(2, 28, 28, 3), (1, 28, 28, 3)]

    Reference:
        Li, Grandvalet, Davoine. "Explicit inductive bias for transfer
        learning with convolutional networks." ICML 2018, section 4.2.
    """
    mean = _check_mean(mean)
    if not 0 < crop_size <= image_size:
        raise ValueError(
            "`crop_size` must be positive and at most `image_size` "
            f"({image_size}). Received: crop_size={crop_size!r}"
        )
    if color_order not in COLOR_ORDERS:
        raise ValueError(
            f"`color_order` must be one of {COLOR_ORDERS}. Received: "
            f"color_order={color_order!r}"
        )
    if not 0 <= blur_probability <= 1:
        raise ValueError(
            "`blur_probability` must be in [0, 1]. Received: "
            f"blur_probability={blur_probability!r}"
        )
    if max_blur_sigma < 0:
        raise ValueError(
            "`max_blur_sigma` must be >= 0. Received: "
            f"max_blur_sigma={max_blur_sigma!r}"
        )
    radius = max(1, math.ceil(3 * max_blur_sigma))

    def finish(image):
        return image[..., ::-1] if color_order == "bgr" else image

    def test_map(image, label):
        image = _resized(image, image_size) - mean
        image = central_crop(image, crop_size)
        return finish(image), tf.cast(label, tf.int32)

    def train_map(example, seed_pair):
        image, label = example
        seeds = tf.random.experimental.stateless_split(seed_pair, num=4)
        image = _resized(image, image_size)
        sigma = tf.random.stateless_uniform([], seeds[1], 0.0, max_blur_sigma)
        image = tf.cond(
            tf.random.stateless_uniform([], seeds[0]) < blur_probability,
            lambda: gaussian_blur(image, sigma, radius),
            lambda: image,
        )
        image = image - mean
        mirror = tf.random.stateless_uniform([], seeds[2]) < 0.5
        image = tf.cond(mirror, lambda: image[:, ::-1, :], lambda: image)
        image = tf.image.stateless_random_crop(
            image, (crop_size, crop_size, 3), seeds[3]
        )
        return finish(image), tf.cast(label, tf.int32)

    if not training:
        return (
            dataset.map(test_map, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE)
        )
    dataset = dataset.shuffle(
        shuffle_buffer, seed=seed, reshuffle_each_iteration=True
    ).repeat()
    seeds = tf.data.Dataset.random(
        seed=seed, rerandomize_each_iteration=True
    ).batch(2)
    return (
        tf.data.Dataset.zip((dataset, seeds))
        .map(train_map, num_parallel_calls=tf.data.AUTOTUNE)
        .batch(batch_size, drop_remainder=True)
        .prefetch(tf.data.AUTOTUNE)
    )


def mobilenet_inputs(images, image_size=96):
    """Images in 0..255 as ImageNet MobileNet inputs: 3 channels, [-1, 1].

    `x' = resize(x) / 127.5 - 1` (bilinear resize to `image_size`², gray
    duplicated to three channels), the input scaling of MobileNet V1.

    Args:
        images: `uint8` or float array `(..., height, width, 1 or 3)`, e.g.
            Fashion-MNIST images with a channel axis, `x[..., None]`.
        image_size: side of the output (64-96 px keeps CPU runs short).

    Returns:
        A `float32` tensor `(..., image_size, image_size, 3)`.

    Example:

    >>> x = mobilenet_inputs(np.full((1, 28, 28, 1), 255, np.uint8), 32)
    >>> tuple(x.shape), float(tf.reduce_min(x)), float(tf.reduce_max(x))
    ((1, 32, 32, 3), 1.0, 1.0)
    """
    images = tf.convert_to_tensor(images)
    if images.shape.rank not in (3, 4) or images.shape[-1] not in (1, 3):
        raise ValueError(
            "`images` must be (height, width, channels) or (batch, height, "
            "width, channels) with 1 or 3 channels. Received: images of "
            f"shape {images.shape}"
        )
    images = tf.image.resize(
        three_channels(tf.cast(images, tf.float32)), (image_size, image_size)
    )
    return mobilenet_scale(images)


def mobilenet_scale(images):
    """Pixel values in [0, 255] scaled to [-1, 1]: `x / 127.5 - 1`, the input
    scaling of ImageNet MobileNet.

    Example:

    >>> mobilenet_scale(np.array([0.0, 127.5, 255.0])).tolist()
    [-1.0, 0.0, 1.0]
    """
    return images / 127.5 - 1.0


def mobilenet_preprocessing(
    images, labels, training, image_size=96, batch_size=32, seed=0
):
    """Arrays of images (e.g. Fashion-MNIST) as batches of MobileNet inputs.

    Each batch goes through `mobilenet_inputs`; training data are shuffled
    (seeded) and repeated forever, test data are read once in order.

    Args:
        images: `uint8` array `(n, height, width, 1 or 3)`.
        labels: integer array `(n,)`.
        training: bool, shuffle and repeat.
        image_size: side of the network input.
        batch_size: images per batch (training batches are all full).
        seed: int, the seed of the shuffling.

    Returns:
        A `tf.data.Dataset` of `(float32 (batch, size, size, 3), int32
        (batch,))`.

    Example:

    >>> data = mobilenet_preprocessing(np.zeros((5, 28, 28, 1), np.uint8),
    ...     np.arange(5), training=False, image_size=32, batch_size=4)
    >>> [tuple(x.shape) for x, _ in data]
    [(4, 32, 32, 3), (1, 32, 32, 3)]
    """
    images = np.asarray(images)
    labels = np.asarray(labels).astype("int32").reshape(-1)
    if len(images) != len(labels):
        raise ValueError(
            "`images` and `labels` must have the same length. Received: "
            f"{len(images)} images and {len(labels)} labels"
        )
    dataset = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        dataset = dataset.shuffle(
            len(images), seed=seed, reshuffle_each_iteration=True
        ).repeat()
    return (
        dataset.batch(batch_size, drop_remainder=training)
        .map(
            lambda x, y: (mobilenet_inputs(x, image_size), y),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .prefetch(tf.data.AUTOTUNE)
    )
