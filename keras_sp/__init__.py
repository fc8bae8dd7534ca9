"""keras-sp: transfer learning for Keras 3.

The -SP penalties of Li, Grandvalet & Davoine, diagonal Fisher information,
freezing depth units, growing a network (Wang, Ramanan & Hebert) and the
measurements that go with them. It imports keras and NumPy only; the data
loaders, weight conversion, plots and experiment runners that reproduce the
papers are in `keras_sp.experiments`, which nothing here imports.
"""

from keras_sp import callbacks
from keras_sp import distribution
from keras_sp import feature_space
from keras_sp import fisher
from keras_sp import layers
from keras_sp import regularizers
from keras_sp import surgery
from keras_sp import transfer_statistics
from keras_sp import units
from keras_sp.batchnorm import reestimate_batchnorm
from keras_sp.drift import unit_drift
from keras_sp.drift import weight_drift
from keras_sp.feature_space import FeatureRegularized
from keras_sp.interpolation import interpolate
from keras_sp.interpolation import interpolation_curve
from keras_sp.interpolation import record_starting_point
from keras_sp.penalties import regularize
from keras_sp.penalties import starting_point
from keras_sp.penalties import unregularize
from keras_sp.proximal import Proximal
from keras_sp.proximal import at_starting_point
from keras_sp.surgery import deepen
from keras_sp.surgery import widen
from keras_sp.units import copy_units
from keras_sp.units import depth_units
from keras_sp.units import freeze_batchnorm
from keras_sp.units import freeze_first
from keras_sp.units import unfreeze

__version__ = "0.1.0"

__all__ = [
    "FeatureRegularized",
    "Proximal",
    "at_starting_point",
    "callbacks",
    "copy_units",
    "deepen",
    "depth_units",
    "distribution",
    "feature_space",
    "fisher",
    "freeze_batchnorm",
    "freeze_first",
    "interpolate",
    "interpolation_curve",
    "layers",
    "record_starting_point",
    "reestimate_batchnorm",
    "regularize",
    "regularizers",
    "starting_point",
    "surgery",
    "transfer_statistics",
    "unfreeze",
    "unit_drift",
    "units",
    "unregularize",
    "weight_drift",
    "widen",
]
