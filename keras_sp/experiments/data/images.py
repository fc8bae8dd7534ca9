"""Image files as `tf.data` pipelines, and the data sets they make up.

Every loader of the paper's target and source databases returns an
`ImageData`: a training and a test `tf.data.Dataset` of `(image, label)`
pairs, where `image` is a `uint8` tensor of shape `(height, width, 3)` (gray
images are duplicated to three channels, as in the paper) and `label` an
`int32` class index.
"""

import dataclasses

import numpy as np
import tensorflow as tf

__all__ = [
    "ImageData",
    "find_unreadable_images",
    "image_dataset",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
ON_CORRUPT = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class ImageData:
    """A classification database split into training and test images.

    Args:
        train: `tf.data.Dataset` of `(image, label)`: `uint8` images of shape
            `(height, width, 3)` and `int32` labels.
        test: the test images in the same form (for the source databases,
            their validation split).
        class_names: tuple of class names, indexed by label.
        skipped: tuple of the image files left out because they could not
            be read or decoded (see `on_corrupt` of the folder readers).
    """

    train: tf.data.Dataset
    test: tf.data.Dataset
    class_names: tuple
    skipped: tuple = ()

    @property
    def num_classes(self):
        """The number of classes."""
        return len(self.class_names)


def decode_image_file(path):
    """Reads and decodes one JPEG, PNG, GIF or BMP file as RGB `uint8`.

    Gray images are duplicated to three channels, an alpha channel is
    dropped, and only the first frame of an animated GIF is kept.

    Args:
        path: string tensor, the path of the image file.

    Returns:
        A `uint8` tensor of shape `(height, width, 3)`.

    Example:

    >>> import os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "gray.png")
    >>> tf.io.write_file(path, tf.io.encode_png(tf.zeros((2, 3, 1), tf.uint8)))
    >>> decode_image_file(path).shape
    TensorShape([2, 3, 3])
    """
    image = tf.io.decode_image(
        tf.io.read_file(path), channels=3, expand_animations=False
    )
    image.set_shape([None, None, 3])
    return image


def image_dataset(paths, labels):
    """A `tf.data.Dataset` of `(image, label)` decoded from image files.

    Files are decoded lazily, in parallel, in the order given.

    Args:
        paths: sequence of image file paths.
        labels: sequence of integer labels, one per path.

    Returns:
        A `tf.data.Dataset` of `(uint8 image (h, w, 3), int32 label)`.

    Example:

    >>> dataset = image_dataset([], [])
    >>> int(dataset.cardinality())
    0
    """
    paths = [str(path) for path in paths]
    labels = np.asarray(labels, dtype="int32").reshape(-1)
    if len(paths) != len(labels):
        raise ValueError(
            "`paths` and `labels` must have the same length. Received: "
            f"{len(paths)} paths and labels of length {len(labels)}"
        )
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths, dtype=tf.string), labels)
    )
    return dataset.map(
        lambda path, label: (decode_image_file(path), label),
        num_parallel_calls=tf.data.AUTOTUNE,
    )


def find_unreadable_images(paths):
    """The image files that are missing or cannot be decoded.

    Every file is decoded once, in parallel, with the same decoder as
    `image_dataset`, so a file that passes here will not fail later.

    Args:
        paths: sequence of image file paths.

    Returns:
        A list of the paths that could not be read or decoded, in the
        order given.

    Example:

    >>> find_unreadable_images(["/no/such/image.jpg"])
    ['/no/such/image.jpg']
    """
    paths = [str(path) for path in paths]
    if not paths:
        return []
    dataset = tf.data.Dataset.from_tensor_slices(
        (tf.range(len(paths)), tf.constant(paths, dtype=tf.string))
    )
    dataset = dataset.map(
        lambda index, path: (index, tf.shape(decode_image_file(path))),
        num_parallel_calls=tf.data.AUTOTUNE,
    ).ignore_errors()
    readable = np.zeros(len(paths), dtype=bool)
    for index, _ in dataset.as_numpy_iterator():
        readable[index] = True
    return [path for path, ok in zip(paths, readable, strict=True) if not ok]


def readable_images(paths, labels, on_corrupt):
    """Drops or rejects the unreadable files among `paths`.

    Args:
        paths: sequence of image file paths.
        labels: sequence of labels, one per path.
        on_corrupt: `"error"` raises a `ValueError` naming the unreadable
            files; `"skip"` leaves them out.

    Returns:
        `(paths, labels, skipped)`: the readable paths and their labels as
        lists, and a tuple of the skipped paths.

    Example:

    >>> readable_images(["/no/such/image.jpg"], [0], on_corrupt="skip")
    ([], [], ('/no/such/image.jpg',))
    """
    if on_corrupt not in ON_CORRUPT:
        raise ValueError(
            f"`on_corrupt` must be one of {ON_CORRUPT}. Received: "
            f"on_corrupt={on_corrupt!r}"
        )
    unreadable = find_unreadable_images(paths)
    if unreadable and on_corrupt == "error":
        shown = ", ".join(unreadable[:5])
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise ValueError(
            f"{len(unreadable)} image file(s) are missing or cannot be "
            f"decoded: {shown}{more}. Pass on_corrupt='skip' to leave them "
            "out. Received: on_corrupt='error'"
        )
    bad = set(unreadable)
    kept = [
        (p, y) for p, y in zip(paths, labels, strict=True) if str(p) not in bad
    ]
    return (
        [str(p) for p, _ in kept],
        [int(y) for _, y in kept],
        tuple(unreadable),
    )
