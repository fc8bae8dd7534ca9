import freezing_reference
import keras
import numpy as np
import pytest

from keras_sp import _keras_private
from keras_sp.callbacks import FreezeUnits
from keras_sp.callbacks import UnfreezeSchedule
from keras_sp.units import depth_units
from keras_sp.units import freeze_first
from keras_sp.units import unfreeze


def bn_model():
    """Four depth units: conv+BN, conv+BN, dense, head."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, name="conv2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def data(count=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 6, 6, 1)).astype("float32") * 2 + 1
    return x, rng.integers(0, 3, count)


def unit_arrays(model):
    """Per depth unit, every variable's value (BN statistics included)."""
    return [
        [
            keras.ops.convert_to_numpy(w).copy()
            for layer in unit
            for w in layer.weights
        ]
        for unit in depth_units(model)
    ]


def unit_is_unchanged(before, after):
    return all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def unit_is_all_changed(before, after):
    return all(
        not np.array_equal(a, b) for a, b in zip(before, after, strict=True)
    )


class EpochSnapshots(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.snapshots = []

    def on_train_begin(self, logs=None):
        self.snapshots.append(unit_arrays(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append(unit_arrays(self.model))


@pytest.mark.parametrize("n", [0, 2, 3])
def test_freeze_units_keeps_the_first_n_units_bit_identical(n):
    model = bn_model()
    before = unit_arrays(model)
    model.fit(
        *data(), batch_size=8, epochs=2, verbose=0, callbacks=[FreezeUnits(n)]
    )
    after = unit_arrays(model)
    for index, (old, new) in enumerate(zip(before, after, strict=True)):
        if index < n:
            assert unit_is_unchanged(old, new), index
        else:
            assert unit_is_all_changed(old, new), index


def test_unfreeze_schedule_unfreezes_from_the_top_at_the_given_epochs():
    model = bn_model()
    snapshots = EpochSnapshots()
    schedule = {0: 3, 2: 1, 3: 0}
    model.fit(
        *data(),
        batch_size=8,
        epochs=4,
        verbose=0,
        callbacks=[UnfreezeSchedule(schedule), snapshots],
    )
    frozen = 0
    for epoch in range(4):
        frozen = schedule.get(epoch, frozen)
        old, new = snapshots.snapshots[epoch], snapshots.snapshots[epoch + 1]
        for index in range(4):
            if index < frozen:
                assert unit_is_unchanged(old[index], new[index]), (epoch, index)
            else:
                assert unit_is_all_changed(old[index], new[index]), (
                    epoch,
                    index,
                )
    assert all(layer.trainable for layer in model.layers)


def test_schedule_starting_later_trains_everything_until_then():
    model = bn_model()
    snapshots = EpochSnapshots()
    model.fit(
        *data(),
        batch_size=8,
        epochs=2,
        verbose=0,
        callbacks=[UnfreezeSchedule({1: 3}), snapshots],
    )
    first, second = (
        zip(snapshots.snapshots[i], snapshots.snapshots[i + 1], strict=True)
        for i in (0, 1)
    )
    assert all(unit_is_all_changed(old, new) for old, new in first)
    second = list(second)
    assert all(unit_is_unchanged(old, new) for old, new in second[:3])
    assert unit_is_all_changed(*second[3])


@pytest.mark.parametrize("n", [-1, 1.5, True, None])
def test_freeze_units_bad_n(n):
    with pytest.raises(ValueError, match=f"Received: n={n!r}"):
        FreezeUnits(n)


def test_freeze_units_beyond_the_model_depth_fails_before_training():
    model = bn_model()
    before = unit_arrays(model)
    with pytest.raises(ValueError, match="between 0 and 4.*Received: n=5"):
        model.fit(*data(), epochs=1, verbose=0, callbacks=[FreezeUnits(5)])
    for old, new in zip(before, unit_arrays(model), strict=True):
        assert unit_is_unchanged(old, new)


@pytest.mark.parametrize(
    "schedule", [{}, [(0, 1)], {-1: 2}, {0: -2}, {"0": 1}, {0: 1.0}]
)
def test_unfreeze_schedule_bad_schedule(schedule):
    with pytest.raises(ValueError, match="Received: schedule="):
        UnfreezeSchedule(schedule)


def test_freeze_units_steps_like_numpy_on_the_compiled_optimizer():
    """One step with FreezeUnits(1): fc bit-identical, the head takes
    Keras's first SGD step m = -lr g, w <- w + m."""
    x, y = freezing_reference.linear_data()
    model = freezing_reference.linear_model()
    optimizer = model.optimizer
    weights = freezing_reference.values(model)
    grads = freezing_reference.gradients(weights, x, y)
    expected, _ = freezing_reference.sgd_step(
        weights, {}, grads, trained=["head/kernel", "head/bias"]
    )
    model.fit(
        x, y, batch_size=8, verbose=0, shuffle=False, callbacks=[FreezeUnits(1)]
    )
    freezing_reference.assert_weights(
        model, expected, frozen=["fc/kernel", "fc/bias"]
    )
    assert model.optimizer is optimizer
    tracked = _keras_private.optimizer_variables(optimizer)
    assert list(map(id, tracked)) == list(map(id, model.trainable_variables))


def test_unfreeze_schedule_steps_like_numpy_and_carries_the_momentum():
    """Head only at epoch 0, everything at epoch 1 (one step each): the
    head's momentum carries over, fc's starts at zero."""
    x, y = freezing_reference.linear_data()
    model = freezing_reference.linear_model()
    optimizer = model.optimizer
    weights = freezing_reference.values(model)
    grads = freezing_reference.gradients(weights, x, y)
    head = ["head/kernel", "head/bias"]
    weights, momenta = freezing_reference.sgd_step(
        weights, {}, grads, trained=head
    )
    grads = freezing_reference.gradients(weights, x, y)
    expected, _ = freezing_reference.sgd_step(
        weights, momenta, grads, trained=list(grads)
    )
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=2,
        verbose=0,
        shuffle=False,
        callbacks=[UnfreezeSchedule({0: 1, 1: 0})],
    )
    freezing_reference.assert_weights(model, expected, frozen=[])
    assert model.optimizer is optimizer
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 2


def two_branch_model(optimizer):
    """Two independent Dense branches with their own loss: the gradient of
    `kept` never depends on `toggled`. `toggled` is depth unit 0."""
    inputs = keras.Input((3,))
    toggled = keras.layers.Dense(2, name="toggled")(inputs)
    kept = keras.layers.Dense(2, name="kept")(inputs)
    model = keras.Model(inputs, [toggled, kept])
    model.compile(optimizer=optimizer, loss=["mse", "mse"])
    return model


OPTIMIZERS = {
    "sgd_momentum": (
        lambda: keras.optimizers.SGD(0.05, momentum=0.9),
        ["momentum"],
    ),
    "adam": (
        lambda: keras.optimizers.Adam(0.01),
        ["momentum", "velocity"],
    ),
}


class FreezeAtSteps(keras.callbacks.Callback):
    """Freezes the first unit before global step `start` and unfreezes
    everything before step `stop`, in the middle of epochs; keeps the
    frozen unit's weights at both moments.

    Like a `LambdaCallback` closing over the model, it holds `model`
    itself: on JAX, `Callback.model` writes the state `fit` keeps between
    steps back into the variables, `model` does not.
    """

    def __init__(self, model, start, stop):
        super().__init__()
        self.target, self.start, self.stop = model, start, stop
        self.step = 0
        self.frozen_weights = []

    def on_train_batch_begin(self, batch, logs=None):
        if self.step == self.start:
            freeze_first(self.target, 1)
        if self.step == self.stop:
            unfreeze(self.target)
        if self.step in (self.start, self.stop):
            self.frozen_weights.append(
                freezing_reference.values(self.target.get_layer("toggled"))
            )
        self.step += 1


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("when", ["epochs", "mid_epoch"])
def test_freezing_mid_training_keeps_the_other_slots_bit_identical(name, when):
    """Freezing and unfreezing one branch in the middle of training leaves
    the step count, the weights and the optimizer slots of the branch that
    always trains bit-identical to an optimizer that only ever trained it
    (same data, same order)."""
    make_optimizer, slot_names = OPTIMIZERS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = [rng.normal(size=(16, 2)).astype("float32") for _ in range(2)]
    optimizer = make_optimizer()
    model = two_branch_model(optimizer)
    reference = two_branch_model(make_optimizer())
    reference.set_weights(model.get_weights())
    reference.get_layer("toggled").trainable = False
    reference.compile(optimizer=reference.optimizer, loss=["mse", "mse"])
    toggled = model.get_layer("toggled")
    start = freezing_reference.values(toggled)

    if when == "epochs":
        snapshots = EpochSnapshots()
        callbacks = [UnfreezeSchedule({1: 1, 2: 0}), snapshots]
    else:
        toggling = FreezeAtSteps(model, start=2, stop=6)
        callbacks = [toggling]
    fit = dict(batch_size=4, epochs=3, verbose=0, shuffle=False)
    model.fit(x, y, callbacks=callbacks, **fit)
    reference.fit(x, y, **fit)

    assert model.optimizer is optimizer
    steps = keras.ops.convert_to_numpy(optimizer.iterations)
    assert steps == keras.ops.convert_to_numpy(reference.optimizer.iterations)
    assert steps == 12
    kept, kept_reference = (m.get_layer("kept") for m in (model, reference))
    for variable, twin in zip(
        kept.weights, kept_reference.weights, strict=True
    ):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(variable),
            keras.ops.convert_to_numpy(twin),
        )
        for slot in slot_names:
            value = freezing_reference.slot(optimizer, variable, slot)
            assert np.any(value)
            np.testing.assert_array_equal(
                value,
                freezing_reference.slot(reference.optimizer, twin, slot),
            )
    # The toggled branch trained, stood still while frozen, trained again.
    if when == "epochs":
        during = [s[0] for s in snapshots.snapshots]
        assert unit_is_all_changed(during[0], during[1])
        assert unit_is_unchanged(during[1], during[2])
        assert unit_is_all_changed(during[2], during[3])
    else:
        at_freeze, at_unfreeze = toggling.frozen_weights
        for path, value in at_freeze.items():
            assert not np.array_equal(value, start[path])
            np.testing.assert_array_equal(at_unfreeze[path], value)
        final = freezing_reference.values(toggled)
        assert all(not np.array_equal(final[p], at_unfreeze[p]) for p in final)
    tracked = _keras_private.optimizer_variables(optimizer)
    assert list(map(id, tracked)) == list(map(id, model.trainable_variables))
