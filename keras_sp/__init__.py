"""keras-sp: transfer learning for Keras 3.

The -SP penalties of Li, Grandvalet & Davoine, diagonal Fisher information,
freezing depth units, growing a network (Wang, Ramanan & Hebert) and
Yosinski's transferability experiments.
"""

from keras_sp import analysis
from keras_sp import callbacks
from keras_sp import datasets
from keras_sp import fisher
from keras_sp import layers
from keras_sp import plots
from keras_sp import pretrained
from keras_sp import regularizers
from keras_sp import surgery
from keras_sp import units
from keras_sp.penalties import regularize
from keras_sp.penalties import starting_point
from keras_sp.penalties import unregularize
from keras_sp.surgery import deepen
from keras_sp.surgery import widen
from keras_sp.units import copy_units
from keras_sp.units import depth_units
from keras_sp.units import freeze_batchnorm
from keras_sp.units import freeze_first
from keras_sp.units import unfreeze

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "callbacks",
    "copy_units",
    "datasets",
    "deepen",
    "depth_units",
    "fisher",
    "freeze_batchnorm",
    "freeze_first",
    "layers",
    "plots",
    "pretrained",
    "regularize",
    "regularizers",
    "starting_point",
    "surgery",
    "unfreeze",
    "units",
    "unregularize",
    "widen",
]
