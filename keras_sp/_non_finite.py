"""The callback that stops fine-tuning at the first non-finite loss."""

import warnings

import keras
import numpy as np
from keras import ops

from keras_sp import _selection
from keras_sp import penalties


class StopOnNonFinite(keras.callbacks.Callback):
    """Stops training at the first NaN or infinite loss and restores the
    last finite weights.

    After every `snapshot_every` batches with a finite loss, the callback
    checks that the weights and the optimizer's variables (momentum, step
    count) are finite and keeps a NumPy copy of them. At the first batch
    whose loss (or whose weights) is NaN or infinite, it restores that copy
    and stops with a message naming the step (epoch and batch, from 0), the
    loss, the keras-sp penalty (the sum `PenaltyMonitor` logs as
    `sp_penalty`) after the failed step and at the restored weights, and
    the likely cause: a learning rate or `alpha` too large (with SGD, the
    step `w <- w - lr * alpha * (w - w0)` of the L2-SP term of eq. 2
    diverges once `lr * alpha > 2`).

    `raise_error=True` (the default) raises `FloatingPointError`, so a
    script cannot go on with a half-trained model as if `fit` had finished;
    `raise_error=False` warns (`RuntimeWarning`) and sets
    `model.stop_training`. The loss checked is the one Keras logs after
    each batch (the epoch's running mean). The first copy is taken when the
    first batch starts, so build the model before `fit` (`keras.Input`).

    **Cost.** A copy reads the weights and optimizer state to host memory
    (with SGD and momentum, twice the model): negligible every batch for
    small models on CPU; for a large network on a GPU, `snapshot_every=100`
    keeps it low (the restored weights are then up to 100 batches old).

    Args:
        snapshot_every: integer >= 1, copy every this many batches.
        raise_error: raise `FloatingPointError` (True) or warn and stop.

    Attributes:
        stopped: None, or after a stop `{"epoch", "batch", "loss",
            "penalty", "restored"}`: the failed batch (from 0), its loss,
            the keras-sp penalty at the restored weights, and the `(epoch,
            batch)` of those (None: the weights `fit` started with).

    Example:

    ```python
    keras_sp.regularize(model, "l2_sp", alpha=0.1, new_layers=["head"])
    model.fit(x, y, callbacks=[keras_sp.callbacks.StopOnNonFinite()])
    ```

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, eqs. 2-3.
    """

    def __init__(self, snapshot_every=1, raise_error=True):
        super().__init__()
        if (
            isinstance(snapshot_every, bool)
            or not isinstance(snapshot_every, int)
            or snapshot_every < 1
        ):
            raise ValueError(
                "`snapshot_every` must be an integer >= 1. Received: "
                f"snapshot_every={snapshot_every!r}"
            )
        if not isinstance(raise_error, bool):
            raise ValueError(
                "`raise_error` must be True or False. Received: "
                f"raise_error={raise_error!r}"
            )
        self.snapshot_every = snapshot_every
        self.raise_error = raise_error
        self.stopped = None
        self._epoch = self._batches = 0
        self._snapshot = self._snapshot_step = None

    def on_train_begin(self, logs=None):
        self.stopped = None
        self._epoch = self._batches = 0
        self._snapshot = self._snapshot_step = None

    def on_train_batch_begin(self, batch, logs=None):
        if self._batches or self._snapshot or not self.model.built:
            return
        # Once every callback has set up the model, build the optimizer as
        # `fit` would, to copy its state too.
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            optimizer.build(self.model.trainable_variables)
        self._snapshot = self._read()
        if bad := _first_non_finite(self._snapshot):
            raise ValueError(f"The weights are not finite before fit: {bad}")

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self._batches += 1
        loss = logs.get("loss")
        if loss is not None:
            loss = float(ops.convert_to_numpy(loss))
            if not np.isfinite(loss):
                return self._stop(batch, loss, "the loss is not finite")
        if self._batches % self.snapshot_every == 0:
            arrays = self._read()
            bad = _first_non_finite(arrays)
            if bad is not None:
                what = f"the weights are not finite (first: '{bad}')"
                return self._stop(batch, loss, what)
            self._snapshot = arrays
            self._snapshot_step = (self._epoch, batch)

    def on_train_end(self, logs=None):
        self._snapshot = None

    def _read(self):
        """`[(variable, NumPy copy)]` of the weights and optimizer state."""
        getattr(self.model, "jax_state_sync", lambda: None)()
        variables = list(self.model.weights)
        if getattr(self.model, "optimizer", None) is not None:
            variables += list(self.model.optimizer.variables)
        unique = {id(variable): variable for variable in variables}
        return [
            (variable, _selection.to_numpy(variable))
            for variable in unique.values()
        ]

    def _stop(self, batch, loss, what):
        getattr(self.model, "jax_state_sync", lambda: None)()
        after_step = _penalty_value(self.model)
        if self._snapshot is None:  # `fit` built the model.
            raise FloatingPointError(f"{what}, with no finite copy yet.")
        for variable, value in self._snapshot:
            variable.assign(value)
        restored = _penalty_value(self.model)
        step = self._snapshot_step
        self.stopped = dict(epoch=self._epoch, batch=batch, loss=loss)
        self.stopped.update(penalty=restored, restored=step)
        self._snapshot = None
        copy = "the weights `fit` started with"
        if step is not None:
            copy = f"the weights after epoch {step[0]}, batch {step[1]}"
        message = (
            f"StopOnNonFinite: {what} at epoch {self._epoch}, batch {batch} "
            f"(counted from 0): loss={loss}, keras-sp penalty={after_step} "
            f"after this step and {restored} at the restored weights. "
            f"Restored {copy}, the last finite ones, and the optimizer's "
            "state. Likely cause: the learning rate or alpha (or beta) is "
            "too large (with SGD, the step of the L2-SP term diverges once "
            "learning_rate * alpha > 2); lower them and train again."
        )
        if self.raise_error:
            raise FloatingPointError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        self.model.stop_training = True


def _penalty_value(model):
    """The sum of the keras-sp penalties on trainable variables."""
    return sum(
        float(ops.convert_to_numpy(regularizer(variable)))
        for _, variable, regularizer in penalties.attached_penalties(model)
        if variable.trainable
    )


def _first_non_finite(arrays):
    """The path of the first variable in `arrays` with a NaN or infinity."""
    for variable, value in arrays:
        if value.dtype.kind in "fc" and not np.all(np.isfinite(value)):
            return variable.path
    return None
