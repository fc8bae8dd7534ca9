"""LP-FT: train the new head on the frozen backbone, then fine-tune all.

Reference:
    Kumar, Raghunathan, Jones, Ma, Liang. "Fine-Tuning can Distort
    Pretrained Features and Underperform Out-of-Distribution". ICLR 2022.
"""

import math
import weakref

import keras
import numpy as np

from keras_sp import _keras_private
from keras_sp._checks import check_positive_int
from keras_sp._selection import resolve_new_layers
from keras_sp._trainable import apply_trainable_change

__all__ = ["LinearProbe"]

# Per model, the `trainable` flags its layers had when a probe froze them:
# `(layer ids, flags)` in `_keras_private.all_layers` order. Kept in memory
# (a saved model records only its current flags) until fine-tuning begins.
_BEFORE_PROBE = weakref.WeakKeyDictionary()


class LinearProbe(keras.callbacks.Callback):
    """LP-FT: a linear probe of the new layers, then fine-tuning everything.

    For the first `epochs` epochs of `fit` (the linear probe) only
    `new_layers` train: every other layer gets `trainable=False`, so its
    weights stay as they are and its BatchNormalization layers run in
    inference mode with their moving statistics unchanged. At the start of
    epoch `epochs` the `trainable` flags the model had before the probe
    come back (fine-tuning) and, if given, the optimizer's learning rate
    becomes `finetune_learning_rate`. The head fine-tuning starts from is
    the head the probe trained, so the backbone's features are not
    distorted by the gradients of a random head (Kumar et al.).

    **Phases follow the epoch index.** At each `on_epoch_begin` the phase
    is `epoch < epochs` (probe) or not (fine-tuning), and the flags are set
    to that phase's if they differ. `fit(initial_epoch=k)` on a model
    loaded from a `.keras` file therefore resumes in the right phase, with
    a new `LinearProbe` given the same arguments. The learning rate is set
    at the first epoch of each `fit` and when the phase changes, so other
    learning-rate callbacks act in between.

    **Flags before the probe.** When the probe first freezes a model, the
    callback records every layer's `trainable` flag, in memory, for that
    model object (so a second `fit`, or a new `LinearProbe` on the same
    model, finds them), and restores them when fine-tuning begins. A file
    saved during the probe records the probe's flags, not those from
    before. On a model whose flags are the probe's (every layer with
    weights frozen except `new_layers`) and that has no record, fine-tuning
    makes every layer trainable except `keep_frozen`; any other model
    without a record is taken to have its pre-probe flags. So if you froze
    layers before the probe
    (`keras_sp.freeze_batchnorm`, `keras_sp.freeze_first`) and may resume
    from a file saved during the probe, list them in `keep_frozen`: both
    runs then fine-tune the same layers. `keep_frozen` layers stay frozen
    in fine-tuning in any case.

    **Optimizer.** Each change of flags takes effect at the next step on
    every backend: the optimizer given to `compile` is rebuilt in place for
    exactly the trainable variables (see `keras_sp.freeze_first`); the step
    count and the slots (momenta, Adam's m and v) of the new layers carry
    over into fine-tuning, those of the backbone start at zero. The
    learning rates need an optimizer compiled with a float learning rate:
    with a `keras.optimizers.schedules.LearningRateSchedule` they raise a
    `ValueError` when `fit` starts (put the schedule's own phases in the
    schedule instead, and leave them None).

    **With an -SP penalty.** `keras_sp.regularize(model, "l2_sp",
    new_layers=[head])` before `fit` takes the pretrained backbone as the
    starting point w0; the probe does not move the backbone, so fine-tuning
    is pulled toward the pretrained weights from the probed head on.

    Args:
        new_layers: the layers (or layer names) the probe trains, usually
            the new head; not empty. Give names to resume a loaded model.
        epochs: positive int, how many epochs the probe lasts.
        learning_rate: optional positive float, the optimizer's learning
            rate during the probe. Needs `finetune_learning_rate`.
        finetune_learning_rate: optional positive float, the learning rate
            from epoch `epochs` on (Kumar et al. use a smaller one than the
            probe's). Without it the learning rate is left as compiled.
        keep_frozen: layers (or names) kept frozen in fine-tuning; see
            "Flags before the probe".

    Example:

    ```python
    model = keras.Sequential([backbone, keras.layers.Dense(10, name="head")])
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9), loss=...)
    model.fit(x, y, epochs=20, callbacks=[
        keras_sp.callbacks.LinearProbe(
            ["head"], epochs=5, learning_rate=0.01,
            finetune_learning_rate=0.001),
    ])
    ```

    Reference:
        Kumar, Raghunathan, Jones, Ma, Liang. "Fine-Tuning can Distort
        Pretrained Features and Underperform Out-of-Distribution". ICLR
        2022, section 4 (LP-FT).
    """

    def __init__(
        self,
        new_layers,
        epochs,
        *,
        learning_rate=None,
        finetune_learning_rate=None,
        keep_frozen=None,
    ):
        super().__init__()
        _check_layers("new_layers", new_layers, allow_empty=False)
        if keep_frozen is not None:
            _check_layers("keep_frozen", keep_frozen, allow_empty=True)
        check_positive_int(
            "epochs", epochs, ", the number of epochs of the linear probe"
        )
        learning_rate = _check_rate("learning_rate", learning_rate)
        finetune_learning_rate = _check_rate(
            "finetune_learning_rate", finetune_learning_rate
        )
        if learning_rate is not None and finetune_learning_rate is None:
            raise ValueError(
                "`learning_rate` replaces the optimizer's learning rate "
                "during the probe; give `finetune_learning_rate` too, the "
                "rate to fine-tune with. Received: "
                f"learning_rate={learning_rate!r}, "
                "finetune_learning_rate=None"
            )
        self.new_layers = new_layers
        self.epochs = int(epochs)
        self.learning_rate = learning_rate
        self.finetune_learning_rate = finetune_learning_rate
        self.keep_frozen = keep_frozen
        self._new = None
        self._kept = None
        self._phase = None

    def on_train_begin(self, logs=None):
        model = self.model
        new = resolve_new_layers(model, self.new_layers)
        kept = resolve_new_layers(model, self.keep_frozen or (), "keep_frozen")
        both = [layer.name for layer in kept if any(layer is n for n in new)]
        if both:
            raise ValueError(
                "`keep_frozen` and `new_layers` must not share layers: the "
                f"probe trains new layers. Received: new_layers="
                f"{self.new_layers!r}, keep_frozen={self.keep_frozen!r} "
                f"(both name {both})"
            )
        for name, rate in (
            ("learning_rate", self.learning_rate),
            ("finetune_learning_rate", self.finetune_learning_rate),
        ):
            if rate is not None and not isinstance(
                model.optimizer.learning_rate, keras.Variable
            ):
                raise ValueError(
                    f"`{name}` cannot replace the learning rate of optimizer "
                    f"{type(model.optimizer).__name__}, which follows a "
                    "LearningRateSchedule (or a callable): compile it with a "
                    f"float learning rate, or leave `{name}` None. "
                    f"Received: {name}={rate!r}"
                )
        self._new, self._kept = new, kept
        self._phase = None

    def on_epoch_begin(self, epoch, logs=None):
        model = self.model
        if epoch < self.epochs:
            phase, rate = "probe", self.learning_rate
            flags = self._probe_flags(model)
        else:
            phase, rate = "fine-tune", self.finetune_learning_rate
            flags = self._finetune_flags(model)
        _set_flags(model, flags)
        if rate is not None and phase != self._phase:
            model.optimizer.learning_rate = rate
        self._phase = phase

    def _probe_flags(self, model):
        """The probe's flags; records the flags before it on first use."""
        layers = _keras_private.all_layers(model)
        ids = [id(layer) for layer in layers]
        record = _BEFORE_PROBE.get(model)
        if (record is None or record[0] != ids) and not self._is_probed(model):
            _BEFORE_PROBE[model] = (ids, [layer.trainable for layer in layers])
        inside = _inside(self._new)
        return [
            id(layer) in inside
            or any(
                id(sub) in inside for sub in _keras_private.all_layers(layer)
            )
            for layer in layers
        ]

    def _finetune_flags(self, model):
        """The flags from before the probe (recorded, or every layer
        trainable after a probe without record, or the current flags),
        with `keep_frozen` frozen."""
        layers = _keras_private.all_layers(model)
        ids = [id(layer) for layer in layers]
        record = _BEFORE_PROBE.pop(model, None)
        if record is not None and record[0] == ids:
            flags = list(record[1])
        elif self._is_probed(model):
            flags = [True] * len(layers)
        else:
            flags = [layer.trainable for layer in layers]
        kept = _inside(self._kept)
        return [
            flag and id(layer) not in kept
            for layer, flag in zip(layers, flags, strict=True)
        ]

    def _is_probed(self, model):
        """Whether the model's flags are the probe's: every layer with
        weights of its own trainable inside `new_layers`, frozen outside,
        and at least one frozen."""
        inside = _inside(self._new)
        frozen = False
        for layer in _keras_private.all_layers(model):
            if not _keras_private.own_variables(layer):
                continue
            if layer.trainable != (id(layer) in inside):
                return False
            frozen = frozen or not layer.trainable
        return frozen


def _inside(layers):
    """Ids of `layers` and of every layer inside them."""
    ids = set()
    for layer in layers:
        ids.add(id(layer))
        ids.update(id(sub) for sub in _keras_private.all_layers(layer))
    return ids


def _set_flags(model, flags):
    """Sets `trainable` of every layer of `model` (`all_layers` order) and
    makes the change take effect; does nothing when they are set already."""
    layers = _keras_private.all_layers(model)
    if [layer.trainable for layer in layers] == list(flags):
        return
    _keras_private.sync_training_state(model)
    # Parents come before their sublayers, and setting a parent's flag sets
    # its sublayers': each layer ends with its own flag.
    for layer, flag in zip(layers, flags, strict=True):
        layer.trainable = flag
    apply_trainable_change(model)


def _check_layers(name, value, allow_empty):
    if isinstance(value, (str, keras.layers.Layer)):
        return
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is None or (not items and not allow_empty):
        kind = "a list" if allow_empty else "a non-empty list"
        raise ValueError(
            f"`{name}` must be {kind} of layers (or layer names) of the "
            f"model. Received: {name}={value!r}"
        )


def _check_rate(name, value):
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float, np.integer, np.floating))
        or not math.isfinite(float(value))
        or value <= 0
    ):
        raise ValueError(
            f"`{name}` must be a positive finite number or None. "
            f"Received: {name}={value!r}"
        )
    return float(value)
