"""Keras layers of keras-sp."""

from keras_sp.layers.grow_layer import GrowLayer
from keras_sp.layers.grow_layer import ScaledL2Normalization

__all__ = [
    "GrowLayer",
    "ScaledL2Normalization",
]
