"""Data for keras-sp's experiments: loaders, splits and few-shot samples."""

from keras_sp.datasets.fashion_mnist import load_fashion_mnist
from keras_sp.datasets.splits import class_split
from keras_sp.datasets.splits import few_shot

__all__ = [
    "class_split",
    "few_shot",
    "load_fashion_mnist",
]
