import keras
import numpy as np
import pytest

from keras_sp.callbacks import FreezeUnits
from keras_sp.callbacks import UnfreezeSchedule
from keras_sp.units import depth_units


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
        [w.numpy().copy() for layer in unit for w in layer.weights]
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
