"""`model.fit` callbacks of keras-sp."""

import warnings

import keras
from keras import ops

from keras_sp import analysis
from keras_sp import penalties

__all__ = [
    "PenaltyMonitor",
]


class PenaltyMonitor(keras.callbacks.Callback):
    """Logs the keras-sp penalty and the distance to the starting point.

    At the end of each epoch, adds to `logs` (so History, the progress bar
    and TensorBoard see them):

    - `sp_penalty`: the sum of the penalties `keras_sp.regularize` attached
      to the trainable variables (the part of the loss they contribute);
    - `sp_distance`: ||w - w0|| over the shared part (every variable with a
      starting point);
    - `sp_drift`: `sp_distance / ||w0||`.

    Callbacks see `logs` in list order: put `PenaltyMonitor` before
    `keras.callbacks.TensorBoard` or `CSVLogger` so they record its values.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_sp.callbacks.PenaltyMonitor()])
    ```

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 3 and section 4.4.
    """

    def __init__(self):
        super().__init__()
        self._warned = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        logs.update(self.measure())

    def measure(self):
        """Returns the current `sp_penalty`, `sp_distance` and `sp_drift`."""
        total = 0.0
        for _, variable, regularizer in penalties.attached_penalties(
            self.model
        ):
            if variable.trainable:
                total += float(ops.convert_to_numpy(regularizer(variable)))
        values = {"sp_penalty": total}
        drift = analysis.weight_drift(self.model)
        if drift["variables"]:
            values["sp_distance"] = drift["distance"]
            values["sp_drift"] = drift["relative"]
        elif not self._warned:
            self._warned = True
            warnings.warn(
                "PenaltyMonitor: the model has no starting point (call "
                "keras_sp.regularize first), so only sp_penalty is logged.",
                stacklevel=2,
            )
        return values
