"""`model.fit` callbacks of keras-sp."""

import warnings

import keras
from keras import ops

from keras_sp import analysis
from keras_sp import penalties
from keras_sp import units

__all__ = [
    "FreezeUnits",
    "PenaltyMonitor",
    "UnfreezeSchedule",
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


class FreezeUnits(keras.callbacks.Callback):
    """Freezes the first `n` depth units of the model for the whole `fit`.

    At the start of training, calls `keras_sp.freeze_first(model, n)`: the
    first `n` units of `keras_sp.depth_units(model)` get `trainable=False`
    (weights and BatchNormalization statistics unchanged), the others train.
    The change takes effect at the first step.

    Args:
        n: int, how many depth units to freeze.

    Example:

    ```python
    model.fit(x, y, callbacks=[keras_sp.callbacks.FreezeUnits(n=10)])
    ```

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, section 4.3.3 and Figure 3.
    """

    def __init__(self, n):
        super().__init__()
        _check_count(n, "n")
        self.n = n

    def on_train_begin(self, logs=None):
        units.freeze_first(self.model, self.n)


class UnfreezeSchedule(keras.callbacks.Callback):
    """Gradual unfreezing from the top: how many depth units stay frozen
    from each epoch on.

    `schedule` maps an epoch (0-based, as in `fit`) to `n`, the number of
    first depth units kept frozen from that epoch on; the others train. At
    the start of each epoch listed, calls `keras_sp.freeze_first(model, n)`,
    which takes effect at that epoch's first step. Before the first epoch
    listed, the model trains as it was given.

    Args:
        schedule: dict `{epoch: n}` with integer epochs >= 0 and integer
            `n >= 0`.

    Example:

    ```python
    # Head only for 2 epochs, then the top 4 units, then everything.
    total = len(keras_sp.depth_units(model))
    model.fit(x, y, epochs=6, callbacks=[
        keras_sp.callbacks.UnfreezeSchedule(
            {0: total - 1, 2: total - 5, 4: 0}
        ),
    ])
    ```

    Reference:
        Howard, Ruder. "Universal Language Model Fine-tuning for Text
        Classification". ACL 2018 (gradual unfreezing); Li, Grandvalet,
        Davoine, ICML 2018, section 4.3.3.
    """

    def __init__(self, schedule):
        super().__init__()
        if not isinstance(schedule, dict) or not schedule:
            raise ValueError(
                "`schedule` must be a non-empty dict {epoch: n}. Received: "
                f"schedule={schedule!r}"
            )
        for epoch, n in schedule.items():
            _check_count(epoch, "schedule epoch", schedule)
            _check_count(n, "schedule n", schedule)
        self.schedule = {int(epoch): int(n) for epoch, n in schedule.items()}

    def on_epoch_begin(self, epoch, logs=None):
        if epoch in self.schedule:
            units.freeze_first(self.model, self.schedule[epoch])


def _check_count(value, name, received=None):
    """Raises unless `value` is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        shown = (
            f"{name}={value!r}"
            if received is None
            else (f"schedule={received!r}")
        )
        raise ValueError(f"`{name}` must be an integer >= 0. Received: {shown}")
