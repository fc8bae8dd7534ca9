"""Keras layers of keras-sp."""

from keras_sp.layers.grow import GrowLayer
from keras_sp.layers.grow import ScaledL2Normalization

__all__ = [
    "GrowLayer",
    "ScaledL2Normalization",
]
