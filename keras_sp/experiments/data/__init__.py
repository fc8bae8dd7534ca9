"""Data for keras-sp's experiments: loaders, splits and few-shot samples."""

from keras_sp.experiments.data.caltech256 import load_caltech256
from keras_sp.experiments.data.fashion_mnist import load_fashion_mnist
from keras_sp.experiments.data.images import ImageData
from keras_sp.experiments.data.images import find_unreadable_images
from keras_sp.experiments.data.images import image_dataset
from keras_sp.experiments.data.mit_indoor67 import load_mit_indoor67
from keras_sp.experiments.data.preprocessing import central_crop
from keras_sp.experiments.data.preprocessing import channel_mean
from keras_sp.experiments.data.preprocessing import gaussian_blur
from keras_sp.experiments.data.preprocessing import mobilenet_inputs
from keras_sp.experiments.data.preprocessing import mobilenet_preprocessing
from keras_sp.experiments.data.preprocessing import paper_preprocessing
from keras_sp.experiments.data.splits import class_split
from keras_sp.experiments.data.splits import few_shot
from keras_sp.experiments.data.tfds_loaders import load_imagenet
from keras_sp.experiments.data.tfds_loaders import load_places365
from keras_sp.experiments.data.tfds_loaders import load_stanford_dogs

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
