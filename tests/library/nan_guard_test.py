"""`keras_sp.callbacks.StopOnNonFinite`: stops at the first non-finite loss,
names the step and the penalty, and restores the last finite weights.

The expected step, weights and penalty come from brute force (a callback
that copies every weight after every batch) and from the closed forms of
the penalties (eqs. 1-3): `alpha/2 ||w - w0||^2 + beta/2 ||w_new||^2`.
"""

import itertools

import keras
import numpy as np
import pytest

import keras_sp
from keras_sp.callbacks import StopOnNonFinite

FLOAT32_MAX = float(np.finfo("float32").max)


class Recorder(keras.callbacks.Callback):
    """Brute force: NumPy copies of the weights, the optimizer's variables
    and the logged loss after every batch, keyed by (epoch, batch)."""

    def __init__(self):
        super().__init__()
        self.weights = {}
        self.optimizer_state = {}
        self.losses = {}
        self.order = []

    def on_train_begin(self, logs=None):
        self.weights["start"] = [np.array(w) for w in self.model.get_weights()]
        self.optimizer_state["start"] = self._optimizer_state()

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = (self._epoch, batch)
        self.order.append(step)
        self.weights[step] = [np.array(w) for w in self.model.get_weights()]
        self.optimizer_state[step] = self._optimizer_state()
        self.losses[step] = float(logs["loss"])

    def _optimizer_state(self):
        return [np.array(v.numpy()) for v in self.model.optimizer.variables]

    def first_non_finite(self):
        """The first (epoch, batch) whose logged loss is not finite, and the
        step before it (None when it is the first batch)."""
        for index, step in enumerate(self.order):
            if not np.isfinite(self.losses[step]):
                return step, self.order[index - 1] if index else None
        return None, None


def poisoned_batches(x, y, batch_size, poisoned):
    """Endless batches of (x, y), epoch after epoch; batch `poisoned[1]` of
    epoch `poisoned[0]` holds an infinite input, so its loss is not
    finite."""
    per_epoch = len(x) // batch_size
    for index in itertools.count():
        rows = slice(
            (index % per_epoch) * batch_size,
            (index % per_epoch + 1) * batch_size,
        )
        inputs = np.array(x[rows])
        if divmod(index, per_epoch) == poisoned:
            inputs[1, 0] = np.inf
        yield inputs, y[rows]


def regularized_model(seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(4, name="shared"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    # The starting point is not the initialization, so that the penalty is
    # not zero from the first step.
    keras_sp.regularize(
        model,
        "l2_sp",
        alpha=0.3,
        beta=0.05,
        new_layers=["head"],
        starting_point={
            "shared/kernel": np.full((3, 4), 0.1, "float32"),
        },
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9), loss="mse"
    )
    # Built now, so that the brute-force copy at the start holds its state.
    model.optimizer.build(model.trainable_variables)
    return model


def l2_sp_penalty(weights, alpha=0.3, beta=0.05):
    """Eq. 3 in float64: alpha/2 ||w_S - w0||^2 + beta/2 ||w_new||^2 over
    the kernels (`model.get_weights()` order: kernel, bias, kernel, bias)."""
    shared, head = weights[0].astype("float64"), weights[2].astype("float64")
    return alpha / 2 * np.sum((shared - 0.1) ** 2) + beta / 2 * np.sum(head**2)


def data(count=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, 3)).astype("float32")
    y = rng.normal(size=(count, 2)).astype("float32")
    return x, y


def assert_weights_equal(model, expected):
    actual = model.get_weights()
    assert len(actual) == len(expected)
    for a, b in zip(actual, expected, strict=True):
        assert np.all(np.isfinite(a))
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("poisoned", [(1, 2), (0, 0)], ids=str)
def test_stops_at_the_infinite_input_and_restores_the_last_finite_weights(
    poisoned,
):
    model = regularized_model()
    x, y = data()
    batches = poisoned_batches(x, y, batch_size=4, poisoned=poisoned)
    recorder = Recorder()
    guard = StopOnNonFinite()
    with pytest.raises(FloatingPointError) as raised:
        model.fit(
            batches,
            steps_per_epoch=8,
            epochs=3,
            shuffle=False,
            verbose=0,
            callbacks=[recorder, guard],
        )
    message = str(raised.value)
    failed, last_finite = recorder.first_non_finite()
    assert failed == poisoned
    assert f"at epoch {poisoned[0]}, batch {poisoned[1]} " in message
    # The step after the infinite input leaves NaN weights behind...
    assert any(np.isnan(w).any() for w in recorder.weights[failed])
    assert "penalty=nan after this step" in message
    # ... the model gets back those after the last finite batch, and the
    # optimizer its momentum.
    restored = recorder.weights[last_finite or "start"]
    assert_weights_equal(model, restored)
    for variable, value in zip(
        model.optimizer.variables,
        recorder.optimizer_state[last_finite or "start"],
        strict=True,
    ):
        np.testing.assert_array_equal(variable.numpy(), value)
    penalty = l2_sp_penalty(restored)
    assert guard.stopped["penalty"] == pytest.approx(penalty, rel=1e-5)
    assert (guard.stopped["epoch"], guard.stopped["batch"]) == poisoned
    assert guard.stopped["restored"] == last_finite
    assert f"and {guard.stopped['penalty']} at the restored weights" in message
    assert f"loss={recorder.losses[failed]}" in message
    if last_finite is None:
        assert "Restored the weights `fit` started with" in message
    else:
        assert (
            "Restored the weights after epoch {}, batch {},".format(
                *last_finite
            )
            in message
        )
    assert "learning rate or alpha (or beta) is too large" in message


def growing_head(learning_rate=1.0, beta=10.0):
    """x = 0 and y = 0: the data loss and its gradient are 0, and SGD on
    beta/2 w^2 alone gives w_t = (1 - learning_rate * beta)^t (eq. 1)."""
    model = keras.Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(
                1, use_bias=False, kernel_initializer="ones", name="shared"
            ),
            keras.layers.Dense(
                1, use_bias=False, kernel_initializer="ones", name="head"
            ),
        ]
    )
    keras_sp.regularize(
        model, "l2_sp", alpha=1.0, beta=beta, new_layers=["head"]
    )
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def first_overflow(factor, beta):
    """The first step t whose loss beta/2 w_t^2 overflows float32, with
    w_t = factor^t, by brute force in float32."""
    w = np.float32(1.0)
    with np.errstate(over="ignore"):
        for t in range(1000):
            if not np.isfinite(np.float32(beta / 2) * np.float32(w * w)):
                return t
            w = np.float32(w * np.float32(factor))
    raise AssertionError("no overflow")


@pytest.mark.parametrize("snapshot_every", [1, 3])
def test_learning_rate_too_large_stops_where_the_penalty_overflows(
    snapshot_every,
):
    """lr * beta = 10 > 2: the L2 step multiplies w by -9; the penalty
    beta/2 w^2 = 5 * 81^t first overflows float32 at t = 20 (epoch 2,
    batch 4 with 8 batches per epoch)."""
    t = first_overflow(-9.0, 10.0)
    assert t == 20
    model = growing_head()
    recorder = Recorder()
    guard = StopOnNonFinite(snapshot_every=snapshot_every, raise_error=False)
    x = np.zeros((16, 1), "float32")
    with pytest.warns(RuntimeWarning, match="at epoch 2, batch 4 ") as caught:
        history = model.fit(
            x,
            x,
            batch_size=2,
            epochs=5,
            shuffle=False,
            verbose=0,
            callbacks=[recorder, guard],
        )
    # The guard's warning (on JAX, Keras may warn too).
    message = next(
        str(w.message) for w in caught if w.category is RuntimeWarning
    )
    assert recorder.first_non_finite()[0] == (2, 4)
    assert len(history.history["loss"]) == 3  # stopped in epoch 2
    # The last copy: after global batch 19, or, every 3 batches, after
    # global batch 17 (the 18th), that is epoch 2, batch 1.
    last_copy = 19 if snapshot_every == 1 else 17
    step = divmod(last_copy, 8)
    assert guard.stopped["restored"] == step
    assert f"Restored the weights after epoch {step[0]}, batch {step[1]}," in (
        message
    )
    expected = np.float32(-9.0) ** (last_copy + 1)
    assert_weights_equal(model, recorder.weights[step])
    assert model.get_weights()[1][0, 0] == expected
    # The head's penalty at the restored weights, beta/2 w^2 in float64.
    assert guard.stopped["penalty"] == pytest.approx(
        5.0 * float(expected) ** 2 if last_copy < 19 else np.inf, rel=1e-6
    )
    assert guard.stopped["loss"] == np.inf


def test_weights_non_finite_with_a_finite_loss_stop_too():
    """The loss of batch 0 is computed before its step: beta/2 w^2 = 5 is
    finite, but the step lr * beta * w = 3e38 * 10 overflows to infinity."""
    model = growing_head(learning_rate=3e38, beta=10.0)
    guard = StopOnNonFinite()
    x = np.zeros((4, 1), "float32")
    with pytest.raises(
        FloatingPointError,
        match="the weights are not finite .first: '.*head/kernel'. at "
        "epoch 0, batch 0 .*penalty=inf after this step and 5.0 at the",
    ):
        model.fit(x, x, batch_size=2, verbose=0, callbacks=[guard])
    assert guard.stopped["loss"] == 5.0
    assert guard.stopped["penalty"] == 5.0  # beta/2 * 1^2 (eq. 1)
    assert guard.stopped["restored"] is None
    np.testing.assert_array_equal(model.get_weights()[1], [[1.0]])


def test_training_without_non_finite_loss_is_unchanged():
    """The guard only reads: the same weights as `fit` without it."""
    x, y = data()
    weights = []
    for callbacks in ([], [StopOnNonFinite(snapshot_every=2)]):
        model = regularized_model(seed=3)
        model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=callbacks)
        weights.append(model.get_weights())
    for a, b in zip(*weights, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"snapshot_every": 0}, "snapshot_every=0"),
        ({"snapshot_every": 1.5}, "snapshot_every=1.5"),
        ({"snapshot_every": True}, "snapshot_every=True"),
        ({"raise_error": "yes"}, "raise_error='yes'"),
    ],
)
def test_bad_arguments_name_the_value(arguments, message):
    with pytest.raises(ValueError, match=message):
        StopOnNonFinite(**arguments)
