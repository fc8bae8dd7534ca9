"""Data for keras-sp's experiments: loaders, splits and few-shot samples."""

from keras_sp.datasets.caltech256 import load_caltech256
from keras_sp.datasets.fashion_mnist import load_fashion_mnist
from keras_sp.datasets.images import ImageData
from keras_sp.datasets.images import find_unreadable_images
from keras_sp.datasets.images import image_dataset
from keras_sp.datasets.mit_indoor67 import load_mit_indoor67
from keras_sp.datasets.preprocessing import central_crop
from keras_sp.datasets.preprocessing import channel_mean
from keras_sp.datasets.preprocessing import gaussian_blur
from keras_sp.datasets.preprocessing import mobilenet_inputs
from keras_sp.datasets.preprocessing import mobilenet_preprocessing
from keras_sp.datasets.preprocessing import paper_preprocessing
from keras_sp.datasets.splits import class_split
from keras_sp.datasets.splits import few_shot
from keras_sp.datasets.tfds_loaders import load_imagenet
from keras_sp.datasets.tfds_loaders import load_places365
from keras_sp.datasets.tfds_loaders import load_stanford_dogs

__all__ = [
    "ImageData",
    "central_crop",
    "channel_mean",
    "class_split",
    "few_shot",
    "find_unreadable_images",
    "gaussian_blur",
    "image_dataset",
    "load_caltech256",
    "load_fashion_mnist",
    "load_imagenet",
    "load_mit_indoor67",
    "load_places365",
    "load_stanford_dogs",
    "mobilenet_inputs",
    "mobilenet_preprocessing",
    "paper_preprocessing",
]
