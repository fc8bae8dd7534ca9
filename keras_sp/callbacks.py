"""`model.fit` callbacks of keras-sp."""

import importlib
import os
import warnings
import weakref

import keras
import numpy as np
from keras import ops

from keras_sp import drift
from keras_sp import fisher as fisher_lib
from keras_sp import penalties
from keras_sp import units
from keras_sp._checks import check_coefficient
from keras_sp._non_finite import StopOnNonFinite
from keras_sp.linear_probe import LinearProbe

__all__ = [
    "FisherInformation",
    "FreezeUnits",
    "LinearProbe",
    "PenaltyMonitor",
    "StopOnNonFinite",
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

    Writing them needs TensorFlow and TensorBoard (`pip install
    "keras-sp[tensorboard]"`); without them, `log_dir` raises an
    `ImportError` that says so.

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
        if self.log_dir is not None:
            # What `_ScalarWriter` needs: tf.summary and TensorBoard's
            # summary ops behind it (tf.summary.scalar imports them).
            for module in ("tensorflow", "tensorboard.summary.v2"):
                try:
                    importlib.import_module(module)
                except ImportError as error:
                    raise ImportError(
                        "PenaltyMonitor(log_dir=...) writes TensorBoard "
                        "scalars, which needs TensorFlow and TensorBoard: "
                        f'pip install "keras-sp[tensorboard]" ({error}). '
                        f"Received: log_dir={self.log_dir!r}"
                    ) from error
        self._warned = False
        self._writer = None

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            logs = {}
        values = self.measure()
        logs.update(values)
        if self.log_dir is not None:
            scalars = dict(values)
            for row in drift.unit_drift(self.model):
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
        measured = drift.weight_drift(self.model)
        if measured["variables"]:
            values["sp_distance"] = measured["distance"]
            values["sp_drift"] = measured["relative"]
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
    The change takes effect at the first step, on every backend: the
    optimizer given to `compile` is rebuilt in place for exactly the
    trainable variables (see `keras_sp.freeze_first`).

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
    listed, the model trains as it was given. At each change the optimizer
    given to `compile` is rebuilt in place for exactly the trainable
    variables: the step count and the slots (momenta, Adam's m and v) of
    the variables that stay trainable carry over unchanged, the slots of
    newly unfrozen variables start at zero.

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


class FisherInformation(keras.callbacks.Callback):
    """Computes the diagonal Fisher information and attaches L2-SP-Fisher.

    When `fit` starts, the callback computes the diagonal Fisher
    information F of the source model on `source_data` with
    `keras_sp.fisher.diagonal_fisher` (unless `fisher` gives it), then
    attaches the Fisher-weighted penalty with `keras_sp.regularize`:

    `Omega(w) = alpha/2 sum_j F_j (w_j - w0_j)^2 + beta/2 ||w_new||^2`
    (eq. 4; `kind="group_lasso_sp_fisher"` gives eq. 7)

    with w0 the model's weights at that moment. F is matched to the shared
    variables by `variable.path` (also when the source model is nested in
    the model), following the rules of `regularize`.

    **Which model gives F.** `source_model` when given: the pretrained
    source network with its source classifier, as in the paper. Otherwise
    the model being fine-tuned itself, its shared part with its *current*
    head; with a new, randomly initialised head that is the Fisher of the
    new head's predictions on the source inputs, not the source task's:
    pass `source_model` to follow the paper. Either model must have one
    categorical output of shape (batch, K) that accepts `source_data`.

    **Resuming.** The penalty is attached in `set_model`, which `fit` calls
    when it builds its callback list, before any callback's
    `on_train_begin`. The starting point and F are held in variables saved
    with the model's weights, so when `keras.callbacks.BackupAndRestore`
    (in any position of the callback list) restores a crashed run, it
    restores the fine-tuned weights *and* the w0 and F of the pretrained
    weights. The callback attaches nothing when the model already carries
    a Fisher-weighted keras-sp penalty (for instance a model reloaded from
    a `.keras` file saved during fine-tuning) with the same settings, and
    never recomputes F on a second `fit` of the same model. When the
    carried penalty's settings (kind, alpha, beta, `penalize`,
    `fisher_epsilon`, `fisher_clip`, or a `fisher` given explicitly) differ
    from the callback's, it attaches its own with the same starting point
    and F (the given `fisher` if any) and warns, naming what changed.

    Args:
        source_data: inputs of the source task, as `data` of
            `keras_sp.fisher.diagonal_fisher` (arrays, `(x, y)`, or a
            batched `tf.data.Dataset`).
        fisher: instead of `source_data`, a precomputed Fisher
            `{variable.path: array}` or the path of a `.npz` file saved by
            `keras_sp.fisher.save`.
        source_model: the model F is computed with; defaults to the model
            being fit.
        kind: `"l2_sp_fisher"` (eq. 4) or `"group_lasso_sp_fisher"` (eq. 7).
        alpha: non-negative float, the strength on the shared part.
        beta: non-negative float, the L2 strength on `new_layers`.
        new_layers: layers (or names) new for the target task; omitting
            it warns, as in `keras_sp.regularize`.
        penalize: `"kernels"` or `"all"`, as in `keras_sp.regularize`.
        mode: `"exact"`, `"sampled"` or `"empirical"` (see `diagonal_fisher`).
        samples: labels drawn per example in `"sampled"` mode.
        from_logits: None, True or False (see `diagonal_fisher`).
        batch_size: examples per vectorised batch while computing F.
        max_examples: optional int, at most this many source examples.
        seed: seed of the draws in `"sampled"` mode.
        fisher_epsilon: non-negative float added to F (default 0, the
            paper's raw F).
        fisher_clip: optional positive float, F is clipped at this maximum.
        verbose: 0 or 1 (a progress bar while F is computed).

    Attributes:
        fisher: the Fisher information given, or the one computed when
            `fit` started; None until then, and when the model already
            carried a Fisher penalty.

    Example:

    ```python
    model.fit(x_target, y_target, callbacks=[
        keras_sp.callbacks.FisherInformation(
            x_source, source_model=source_model, alpha=0.1, beta=0.01,
            new_layers=["head"]),
    ])
    ```

    Reference:
        Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks". ICML 2018, eqs. 4 and 7.
    """

    def __init__(
        self,
        source_data=None,
        *,
        fisher=None,
        source_model=None,
        kind="l2_sp_fisher",
        alpha,
        beta=0.0,
        new_layers=None,
        penalize="kernels",
        mode="exact",
        samples=1,
        from_logits=None,
        batch_size=32,
        max_examples=None,
        seed=None,
        fisher_epsilon=0.0,
        fisher_clip=None,
        verbose=0,
    ):
        super().__init__()
        if (source_data is None) == (fisher is None):
            raise ValueError(
                "Pass exactly one of `source_data` (to compute the Fisher "
                "information) and `fisher` (a precomputed one). Received: "
                f"source_data={_describe(source_data)}, "
                f"fisher={_describe(fisher)}"
            )
        if fisher is not None and source_model is not None:
            raise ValueError(
                "`source_model` computes the Fisher information from "
                "`source_data`; with a precomputed `fisher` it is not used. "
                "Received: fisher and source_model="
                f"{getattr(source_model, 'name', source_model)!r}"
            )
        if kind not in penalties.FISHER_KINDS:
            raise ValueError(
                f"`kind` must be one of {list(penalties.FISHER_KINDS)}. "
                f"Received: kind={kind!r}"
            )
        if mode not in fisher_lib.MODES:
            raise ValueError(
                f"`mode` must be one of {list(fisher_lib.MODES)}. "
                f"Received: mode={mode!r}"
            )
        if source_model is not None and not isinstance(
            source_model, keras.Model
        ):
            raise ValueError(
                "`source_model` must be a keras.Model or None. Received: "
                f"source_model of type {type(source_model).__name__}"
            )
        if isinstance(fisher, (str, os.PathLike)):
            fisher = fisher_lib.load(fisher)
        self.source_data = source_data
        self.fisher = fisher
        self.source_model = source_model
        self.kind = kind
        self.alpha = check_coefficient("alpha", alpha)
        self.beta = check_coefficient("beta", beta)
        self.new_layers = new_layers
        self.penalize = penalize
        self.mode = mode
        self.samples = samples
        self.from_logits = from_logits
        self.batch_size = batch_size
        self.max_examples = max_examples
        self.seed = seed
        self._fisher_given = fisher is not None
        self.fisher_epsilon = fisher_epsilon
        self.fisher_clip = fisher_clip
        self.verbose = verbose
        self._attached_to = None

    def set_model(self, model):
        super().set_model(model)
        if model is not None and model.built:
            self._attach(model)

    def on_train_begin(self, logs=None):
        self._attach(self.model)

    def _attach(self, model):
        if self._attached_to is not None and self._attached_to() is model:
            return
        self._attached_to = weakref.ref(model)
        if any(
            getattr(regularizer, "fisher_weighted", False)
            for _, _, regularizer in penalties.attached_penalties(model)
        ):
            # A resumed or reloaded run: F is never recomputed. Attach anew
            # only when the carried penalty is not the one asked for.
            changed = self._changed_settings(model)
            if changed:
                warnings.warn(
                    f"FisherInformation: model '{model.name}' already "
                    "carries a Fisher-weighted penalty with other settings "
                    f"({'; '.join(changed)}). Attaching kind={self.kind!r}, "
                    f"alpha={self.alpha}, beta={self.beta} with the same "
                    "starting point and "
                    + (
                        "the `fisher` given."
                        if self._fisher_given
                        else "Fisher weights (F is not recomputed)."
                    ),
                    UserWarning,
                    stacklevel=2,
                )
                self._regularize(
                    model, self.fisher if self._fisher_given else None
                )
            return
        if self.fisher is None:
            self.fisher = fisher_lib.diagonal_fisher(
                self.source_model if self.source_model is not None else model,
                self.source_data,
                mode=self.mode,
                samples=self.samples,
                from_logits=self.from_logits,
                batch_size=self.batch_size,
                max_examples=self.max_examples,
                seed=self.seed,
                verbose=self.verbose,
            )
        self._regularize(model, self.fisher)

    def _regularize(self, model, fisher):
        penalties.regularize(
            model,
            self.kind,
            alpha=self.alpha,
            beta=self.beta,
            new_layers=self.new_layers,
            fisher=fisher,
            penalize=self.penalize,
            fisher_epsilon=self.fisher_epsilon,
            fisher_clip=self.fisher_clip,
        )

    def _changed_settings(self, model):
        """How the penalty `model` carries differs from this callback's:
        `["alpha: 0.1 attached, 10.0 asked", ...]`. Settings a model loaded
        from a file does not record (beta, penalize, ...) are not compared.
        """
        carried = penalties.attached_settings(model) or {}
        asked = {
            "kind": self.kind,
            "alpha": self.alpha,
            "beta": self.beta,
            "penalize": self.penalize,
            "fisher_epsilon": check_coefficient(
                "fisher_epsilon", self.fisher_epsilon
            ),
            "fisher_clip": self.fisher_clip,
        }
        changed = [
            f"{key}: {carried[key]!r} attached, {value!r} asked"
            for key, value in asked.items()
            if carried.get(key) is not None and carried[key] != value
        ]
        if self._fisher_given:
            carried_fisher = penalties.PathDict(
                penalties.remembered_fisher(model)
            )
            for _, variable, regularizer in penalties.attached_penalties(model):
                if getattr(regularizer, "fisher_weighted", False):
                    carried_fisher.setdefault(variable.path, regularizer.fisher)
            given = penalties.PathDict(self.fisher)
            if any(
                path not in given
                or not np.array_equal(np.asarray(given[path]), array)
                for path, array in carried_fisher.items()
            ):
                changed.append("fisher: another array given")
        return changed


def _describe(value):
    return "None" if value is None else f"<{type(value).__name__}>"
