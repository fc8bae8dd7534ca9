"""`model.fit` callbacks of keras-sp."""

import os
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

    At the end of each epoch, adds to `logs` (so History, the progress bar,
    CSVLogger and TensorBoard see them):

    - `sp_penalty`: the sum of the penalties `keras_sp.regularize` attached
      to the trainable variables (the part of the loss they contribute);
    - `sp_distance`: ||w - w0|| over the shared part (every variable with a
      starting point);
    - `sp_drift`: `sp_distance / ||w0||`.

    Callbacks see `logs` in list order: put `PenaltyMonitor` before
    `keras.callbacks.TensorBoard` or `CSVLogger` so they record its values
    (TensorBoard shows them as `epoch_sp_penalty`, `epoch_sp_distance` and
    `epoch_sp_drift`).

    With `log_dir` (a folder, or a `keras.callbacks.TensorBoard` whose
    folder to use), it also writes TensorBoard scalars under
    `<log_dir>/keras_sp`: `sp_penalty`, `sp_distance`, `sp_drift`, and for
    every depth unit (`keras_sp.depth_units`) with a starting point
    `sp_unit_distance/<index>_<first layer>` and
    `sp_unit_drift/<index>_<first layer>` (its ||w - w0|| and
    ||w - w0|| / ||w0||), so you can see which depth moves.

    Args:
        log_dir: optional folder or `keras.callbacks.TensorBoard`.

    Example:

    ```python
    board = keras.callbacks.TensorBoard("logs")
    monitor = keras_sp.callbacks.PenaltyMonitor(log_dir=board)
    model.fit(x, y, callbacks=[monitor, board])
    ```

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eq. 3 and section 4.4.
    """

    def __init__(self, log_dir=None):
        super().__init__()
        if isinstance(log_dir, keras.callbacks.TensorBoard):
            log_dir = log_dir.log_dir
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise ValueError(
                "`log_dir` must be a folder or a keras.callbacks.TensorBoard. "
                f"Received: log_dir={log_dir!r}"
            )
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self._warned = False
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        values = self.measure()
        logs.update(values)
        if self.log_dir is not None:
            scalars = dict(values)
            for row in analysis.unit_drift(self.model):
                name = f"{row['unit']:03d}_{row['name']}"
                scalars[f"sp_unit_distance/{name}"] = row["distance"]
                scalars[f"sp_unit_drift/{name}"] = row["relative"]
            if self._writer is None:
                self._writer = _ScalarWriter(
                    os.path.join(self.log_dir, "keras_sp")
                )
            self._writer.write(scalars, step=epoch)

    def on_train_end(self, logs=None):
        if self._writer is not None:
            self._writer.close()
            self._writer = None

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


class _ScalarWriter:
    """TensorBoard scalars through `tf.summary` (the TensorFlow-only part)."""

    def __init__(self, folder):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(folder)

    def write(self, scalars, step):
        with self._writer.as_default():
            for name, value in scalars.items():
                self._tf.summary.scalar(name, value, step=step)
        self._writer.flush()

    def close(self):
        self._writer.close()


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
