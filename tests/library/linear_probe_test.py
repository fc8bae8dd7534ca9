"""LP-FT (Kumar et al., ICLR 2022): a linear probe of the new head on the
frozen backbone, then fine-tuning everything from that head."""

import re

import freezing_reference
import keras
import numpy as np
import pytest

import keras_sp
from keras_sp.linear_probe import LinearProbe

PROBE_RATE = 0.05
FINETUNE_RATE = 0.01


def backbone_and_head():
    """conv1 + bn1 + fc (the backbone, with BatchNormalization) and a
    Dense head, compiled with SGD and momentum."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Flatten()(x)
    x = keras.layers.Dense(5, activation="relu", name="fc")(x)
    outputs = keras.layers.Dense(3, name="head")(x)
    model = keras.Model(inputs, outputs, name="net")
    compile_like(model)
    return model


def compile_like(model):
    model.compile(
        optimizer=keras.optimizers.SGD(PROBE_RATE, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def twin(model):
    """Another model of the same architecture with the same weights."""
    other = backbone_and_head()
    other.set_weights(model.get_weights())
    return other


def data(count=16):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(count, 6, 6, 1)).astype("float32") * 2 + 1
    return x, rng.integers(0, 3, count)


FIT = dict(batch_size=8, verbose=0, shuffle=False)


def values(model):
    """`{variable.path: array}` of every variable, BN statistics included."""
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in model.weights}


def head_paths(model):
    return {v.path for v in model.get_layer("head").weights}


def flags(model):
    return {
        layer.name: layer.trainable for layer in model.layers if layer.weights
    }


def learning_rate(model):
    return float(keras.ops.convert_to_numpy(model.optimizer.learning_rate))


class EpochSnapshots(keras.callbacks.Callback):
    """Every variable at the start of `fit` and after each epoch, and the
    learning rate of each epoch's first step."""

    def __init__(self):
        super().__init__()
        self.snapshots = []
        self.rates = []

    def on_train_begin(self, logs=None):
        self.snapshots.append(values(self.model))

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.rates.append(learning_rate(self.model))

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append(values(self.model))


def test_the_probe_changes_only_the_head():
    """Two probe epochs: every backbone weight and BN statistic is
    bit-identical, every head variable moved."""
    model = backbone_and_head()
    before = values(model)
    model.fit(*data(), epochs=2, callbacks=[LinearProbe(["head"], 2)], **FIT)
    after = values(model)
    head = head_paths(model)
    assert len(before) == 10
    for path, value in before.items():
        if path in head:
            assert not np.array_equal(after[path], value), path
        else:
            np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_the_probed_head_is_a_head_trained_alone_on_the_features():
    """Brute force: a separate Dense model, trained on the frozen
    backbone's features (BatchNormalization in inference mode) with the
    same optimizer, data order and initial head, ends at the probe's head,
    bit for bit."""
    model = backbone_and_head()
    x, y = data()
    features = keras.Model(model.inputs, model.get_layer("fc").output)
    alone = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, name="head")]
    )
    initial = model.get_layer("head").get_weights()
    alone.set_weights(initial)
    compile_like(alone)
    alone.fit(features.predict(x, verbose=0), y, epochs=2, **FIT)
    model.fit(x, y, epochs=2, callbacks=[LinearProbe("head", 2)], **FIT)
    for got, expected, old in zip(
        model.get_layer("head").get_weights(),
        alone.get_layer("head").get_weights(),
        initial,
        strict=True,
    ):
        np.testing.assert_array_equal(got, expected)
        assert not np.array_equal(got, old)


def test_fine_tuning_changes_the_backbone_and_restores_the_flags():
    model = backbone_and_head()
    before = flags(model)
    snapshots = EpochSnapshots()
    model.fit(
        *data(),
        epochs=3,
        callbacks=[LinearProbe(["head"], 2), snapshots],
        **FIT,
    )
    probed, tuned = snapshots.snapshots[2], snapshots.snapshots[3]
    for path, value in probed.items():
        assert not np.array_equal(tuned[path], value), path
    assert flags(model) == before
    assert all(before.values())


def test_a_nested_backbone_is_frozen_then_fine_tuned():
    """`Sequential([backbone, head])`, the usual transfer model: the
    nested backbone (a model of its own) is frozen during the probe, and
    it and every layer in it are trainable again afterwards."""
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(4, 3, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.Flatten()(keras.layers.ReLU()(x))
    backbone = keras.Model(inputs, x, name="backbone")
    model = keras.Sequential(
        [backbone, keras.layers.Dense(3, name="head")], name="outer"
    )
    compile_like(model)
    snapshots = EpochSnapshots()
    model.fit(
        *data(), epochs=2, callbacks=[LinearProbe("head", 1), snapshots], **FIT
    )
    start, probed, tuned = snapshots.snapshots
    head = head_paths(model)
    assert len(start) == 8
    for path, value in start.items():
        if path in head:
            assert not np.array_equal(probed[path], value), path
        else:
            np.testing.assert_array_equal(probed[path], value, err_msg=path)
        assert not np.array_equal(tuned[path], probed[path]), path
    assert backbone.trainable
    assert all(layer.trainable for layer in backbone.layers)


def test_one_step_per_phase_matches_numpy_sgd():
    """x -> fc -> head, mean squared error, one full batch per epoch. The
    probe's step moves the head only, at the probe's rate; fine-tuning's
    first step starts from that head, at the fine-tuning rate, with the
    head's momentum carried and fc's starting at zero:
    m <- 0.9 m - lr g, w <- w + m."""
    x, y = freezing_reference.linear_data()
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    model = freezing_reference.linear_model(optimizer)
    weights = freezing_reference.values(model)
    head = ["head/kernel", "head/bias"]

    grads = freezing_reference.gradients(weights, x, y)
    momenta = {p: -PROBE_RATE * grads[p] for p in head}
    weights = {p: weights[p] + momenta.get(p, 0.0) for p in weights}
    probed = dict(weights)
    grads = freezing_reference.gradients(weights, x, y)
    expected = {}
    for path in weights:
        momentum = 0.9 * momenta.get(path, 0.0) - FINETUNE_RATE * grads[path]
        expected[path] = weights[path] + momentum

    snapshots = EpochSnapshots()
    probe = LinearProbe(
        "head",
        1,
        learning_rate=PROBE_RATE,
        finetune_learning_rate=FINETUNE_RATE,
    )
    model.fit(x, y, epochs=2, callbacks=[probe, snapshots], **FIT)
    assert snapshots.rates == pytest.approx([PROBE_RATE, FINETUNE_RATE])
    assert learning_rate(model) == pytest.approx(FINETUNE_RATE)
    assert model.optimizer is optimizer
    after_probe = snapshots.snapshots[1]
    for path in ("fc/kernel", "fc/bias"):
        np.testing.assert_array_equal(after_probe[path], probed[path])
    for path, value in probed.items():
        np.testing.assert_allclose(
            after_probe[path], value, rtol=1e-6, atol=1e-7, err_msg=path
        )
    freezing_reference.assert_weights(model, expected, frozen=[])


class HalveAtEpochEnd(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        self.model.optimizer.learning_rate = learning_rate(self.model) / 2


def test_the_rate_is_set_at_phase_changes_only():
    """Another callback halving the rate after each epoch: the probe's
    0.05 is replaced by 0.01 when fine-tuning starts, whose halving then
    stands (0.005 at epoch 2, not 0.01 again)."""
    model = backbone_and_head()
    snapshots = EpochSnapshots()
    probe = LinearProbe(
        "head",
        1,
        learning_rate=PROBE_RATE,
        finetune_learning_rate=FINETUNE_RATE,
    )
    model.fit(
        *data(),
        epochs=3,
        callbacks=[probe, HalveAtEpochEnd(), snapshots],
        **FIT,
    )
    assert snapshots.rates == pytest.approx([0.05, 0.01, 0.005])


def test_l2_sp_keeps_the_pretrained_backbone_as_starting_point():
    """L2-SP (eq. 3) attached before LP-FT: w0 is the pretrained backbone
    after the probe and fine-tuning, while the backbone itself moved."""
    model = backbone_and_head()
    pretrained = values(model)
    keras_sp.regularize(
        model, "l2_sp", alpha=0.1, beta=0.01, new_layers=["head"]
    )
    model.fit(*data(), epochs=3, callbacks=[LinearProbe(["head"], 2)], **FIT)
    w0 = keras_sp.starting_point(model)
    assert sorted(w0) == ["conv1/kernel", "fc/kernel"]
    for path, value in w0.items():
        np.testing.assert_array_equal(value, pretrained[path])
        assert not np.array_equal(values(model)[path], value)


def save_and_load(model, folder, name):
    path = str(folder / f"{name}.keras")
    model.save(path)
    return keras.saving.load_model(path)


@pytest.mark.parametrize("variant", ["plain", "l2_sp", "frozen_bn"])
def test_resuming_from_files_is_bit_identical(tmp_path, variant):
    """Saved after epoch 1 (in the probe) and after epoch 3 (fine-tuning),
    loaded, continued with `fit(initial_epoch=...)` and a new callback with
    the same arguments: the same weights as one uninterrupted run. With
    `frozen_bn`, bn1 was frozen before the probe and `keep_frozen` says
    so."""
    keep = ["bn1"] if variant == "frozen_bn" else None
    arguments = dict(
        learning_rate=PROBE_RATE,
        finetune_learning_rate=FINETUNE_RATE,
        keep_frozen=keep,
    )
    x, y = data()
    models = []
    for _ in range(2):
        model = backbone_and_head() if not models else twin(models[0])
        if variant == "l2_sp":
            keras_sp.regularize(
                model, "l2_sp", alpha=0.1, beta=0.01, new_layers=["head"]
            )
        if variant == "frozen_bn":
            keras_sp.freeze_batchnorm(model)
        models.append(model)
    whole, part = models
    start = values(whole)
    whole.fit(
        x, y, epochs=5, callbacks=[LinearProbe(["head"], 2, **arguments)], **FIT
    )
    part.fit(
        x, y, epochs=1, callbacks=[LinearProbe(["head"], 2, **arguments)], **FIT
    )
    part = save_and_load(part, tmp_path, "probe")
    assert not part.get_layer("conv1").trainable
    part.fit(
        x,
        y,
        initial_epoch=1,
        epochs=3,
        callbacks=[LinearProbe(["head"], 2, **arguments)],
        **FIT,
    )
    part = save_and_load(part, tmp_path, "finetune")
    assert learning_rate(part) == pytest.approx(FINETUNE_RATE)
    part.fit(
        x,
        y,
        initial_epoch=3,
        epochs=5,
        callbacks=[LinearProbe(["head"], 2, **arguments)],
        **FIT,
    )
    final, resumed = values(whole), values(part)
    assert sorted(final) == sorted(resumed)
    for path, value in final.items():
        np.testing.assert_array_equal(resumed[path], value, err_msg=path)
        if "bn1" in path and variant == "frozen_bn":
            np.testing.assert_array_equal(value, start[path])
        else:
            assert not np.array_equal(value, start[path]), path
    assert flags(part) == flags(whole)
    if variant == "l2_sp":
        w0 = keras_sp.starting_point(part)
        for path in ("conv1/kernel", "fc/kernel"):
            np.testing.assert_array_equal(w0[path], start[f"{path}"])


def test_keep_frozen_stays_frozen_in_fine_tuning():
    """conv1 was trainable before the probe; `keep_frozen` keeps it
    frozen (bit-identical) while fc and bn1 fine-tune."""
    model = backbone_and_head()
    start = values(model)
    probe = LinearProbe("head", 1, keep_frozen="conv1")
    model.fit(*data(), epochs=2, callbacks=[probe], **FIT)
    after = values(model)
    for path, value in start.items():
        if path.startswith("conv1/"):
            np.testing.assert_array_equal(after[path], value)
        else:
            assert not np.array_equal(after[path], value), path
    assert not model.get_layer("conv1").trainable
    assert model.get_layer("fc").trainable


def test_a_loaded_probe_without_keep_frozen_fine_tunes_every_layer(tmp_path):
    """A file saved during the probe records the probe's flags only: a
    layer frozen before the probe trains in fine-tuning unless
    `keep_frozen` names it (in one process it stays frozen)."""
    model = backbone_and_head()
    keras_sp.freeze_batchnorm(model)
    x, y = data()
    model.fit(x, y, epochs=1, callbacks=[LinearProbe(["head"], 1)], **FIT)
    loaded = save_and_load(model, tmp_path, "probe")
    model.fit(
        x,
        y,
        initial_epoch=1,
        epochs=2,
        callbacks=[LinearProbe("head", 1)],
        **FIT,
    )
    loaded.fit(
        x,
        y,
        initial_epoch=1,
        epochs=2,
        callbacks=[LinearProbe("head", 1)],
        **FIT,
    )
    assert not model.get_layer("bn1").trainable
    assert loaded.get_layer("bn1").trainable


def unchanged(model, before_values, before_flags, rate):
    for path, value in values(model).items():
        np.testing.assert_array_equal(value, before_values[path])
    assert flags(model) == before_flags
    assert learning_rate(model) == pytest.approx(rate)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 0


@pytest.mark.parametrize("new_layers", [None, [], (), 5])
def test_bad_new_layers(new_layers):
    with pytest.raises(
        ValueError,
        match="`new_layers`.*Received: "
        + re.escape(f"new_layers={new_layers!r}"),
    ):
        LinearProbe(new_layers, 1)


@pytest.mark.parametrize(
    "new_layers, keep_frozen, match",
    [
        (["head", "nope"], None, r"new_layers\[1\].*no layer named 'nope'"),
        ("head", ["conv1", 3], r"keep_frozen\[1\]` must be a layer"),
        ("head", ["nope"], r"keep_frozen\[0\].*Received: keep_frozen="),
        (["head"], ["head"], r"must not share.*keep_frozen=\['head'\]"),
    ],
)
def test_layers_not_in_the_model_fail_before_anything_changes(
    new_layers, keep_frozen, match
):
    model = backbone_and_head()
    model.get_layer("fc").trainable = False
    before_values, before_flags = values(model), flags(model)
    probe = LinearProbe(new_layers, 1, keep_frozen=keep_frozen)
    with pytest.raises(ValueError, match=match):
        model.fit(*data(), epochs=1, callbacks=[probe], **FIT)
    unchanged(model, before_values, before_flags, PROBE_RATE)


def test_a_layer_of_another_model_is_refused():
    model, other = backbone_and_head(), backbone_and_head()
    probe = LinearProbe([other.get_layer("head")], 1)
    with pytest.raises(ValueError, match=r"not in model 'net.*new_layers="):
        model.fit(*data(), epochs=1, callbacks=[probe], **FIT)


def test_bad_keep_frozen():
    with pytest.raises(
        ValueError, match=r"`keep_frozen` must be a list.*keep_frozen=5"
    ):
        LinearProbe("head", 1, keep_frozen=5)


@pytest.mark.parametrize("epochs", [0, -1, 1.5, True, "2", None])
def test_bad_epochs(epochs):
    with pytest.raises(ValueError, match=rf"Received: epochs={epochs!r}"):
        LinearProbe("head", epochs)


@pytest.mark.parametrize("name", ["learning_rate", "finetune_learning_rate"])
@pytest.mark.parametrize(
    "rate", [0, -0.1, float("nan"), float("inf"), "0.1", True]
)
def test_bad_learning_rates(name, rate):
    rates = dict(learning_rate=0.1, finetune_learning_rate=0.01)
    rates[name] = rate
    with pytest.raises(
        ValueError, match=rf"positive finite.*Received: {name}={rate!r}"
    ):
        LinearProbe("head", 1, **rates)


def test_a_probe_rate_needs_a_fine_tuning_rate():
    with pytest.raises(
        ValueError, match=r"Received: learning_rate=0.1, finetune_learning_"
    ):
        LinearProbe("head", 1, learning_rate=0.1)


def test_a_learning_rate_schedule_is_refused_before_anything_changes():
    model = backbone_and_head()
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, 10, 0.5)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before_values, before_flags = values(model), flags(model)
    probe = LinearProbe("head", 1, finetune_learning_rate=0.01)
    with pytest.raises(
        ValueError,
        match=r"LearningRateSchedule.*Received: finetune_learning_rate=0.01",
    ):
        model.fit(*data(), epochs=1, callbacks=[probe], **FIT)
    unchanged(model, before_values, before_flags, 0.1)
