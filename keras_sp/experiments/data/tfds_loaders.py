"""The paper's databases that TensorFlow Datasets provides.

Stanford Dogs 120 (target), ImageNet (source, manual download) and
Places365 (source). tfds downloads and prepares them on first use (except
ImageNet, whose two tar files the user downloads); later calls read the
prepared files under `data_dir`.
"""

import tensorflow as tf
import tensorflow_datasets as tfds

from keras_sp.experiments.data.images import ImageData

__all__ = [
    "load_imagenet",
    "load_places365",
    "load_stanford_dogs",
]


def _load(name, splits, data_dir, download, download_config=None):
    datasets, info = tfds.load(
        name,
        split=list(splits),
        data_dir=data_dir,
        download=download,
        with_info=True,
        download_and_prepare_kwargs=(
            {"download_config": download_config} if download_config else None
        ),
    )
    pairs = [
        dataset.map(
            lambda example: (
                example["image"],
                tf.cast(example["label"], tf.int32),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        for dataset in datasets
    ]
    return ImageData(
        train=pairs[0],
        test=pairs[1],
        class_names=tuple(info.features["label"].names),
    )


def load_stanford_dogs(data_dir=None, download=True):
    """Stanford Dogs 120: 100 training images per breed, 8,580 test images.

    Args:
        data_dir: tfds data folder (default: tfds's, `~/tensorflow_datasets`).
        download: whether tfds may download and prepare the data set.

    Returns:
        An `ImageData` of tfds's `train` and `test` splits (12,000 and 8,580
        images, 120 classes). The bounding boxes are not used.

    Reference:
        Khosla, Jayadevaprakash, Yao, Fei-Fei. "Novel dataset for
        fine-grained image categorization: Stanford dogs." CVPR Workshop on
        Fine-Grained Visual Categorization, 2011.
    """
    return _load("stanford_dogs", ("train", "test"), data_dir, download)


def load_imagenet(data_dir=None, manual_dir=None, download=True):
    """ImageNet (ILSVRC 2012), 1,000 classes; the `test` is its validation.

    ImageNet cannot be downloaded automatically: put
    `ILSVRC2012_img_train.tar` and `ILSVRC2012_img_val.tar` in `manual_dir`
    and tfds prepares them on the first call.

    Args:
        data_dir: tfds data folder (default: tfds's).
        manual_dir: folder holding the two ImageNet tar files (default:
            tfds's, `<data_dir>/downloads/manual`).
        download: whether tfds may prepare the data set.

    Returns:
        An `ImageData` of tfds's `train` (1,281,167 images) and `validation`
        (50,000 images) splits; `class_names` are WordNet ids, in the order
        of Keras's ImageNet models.

    Reference:
        Deng et al. "ImageNet: a large-scale hierarchical image database."
        CVPR 2009.
    """
    config = tfds.download.DownloadConfig(manual_dir=manual_dir)
    return _load(
        "imagenet2012", ("train", "validation"), data_dir, download, config
    )


def load_places365(data_dir=None, download=True):
    """Places365-Standard at 256x256 pixels; the `test` is its validation.

    Args:
        data_dir: tfds data folder (default: tfds's).
        download: whether tfds may download and prepare the data set.

    Returns:
        An `ImageData` of tfds's `places365_small` `train` (1,803,460 images)
        and `validation` (36,500 images) splits, 365 scene classes.

    Reference:
        Zhou, Lapedriza, Khosla, Oliva, Torralba. "Places: a 10 million
        image database for scene recognition." IEEE TPAMI 2017.
    """
    return _load("places365_small", ("train", "validation"), data_dir, download)
