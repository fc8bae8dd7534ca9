"""Proximal steps for L1-SP (eq. 5) and Group-Lasso-SP (eq. 6).

L1-SP, `alpha * ||w - w0||_1` (eq. 5), has the prox (soft-thresholding)
`w0 + sign(v - w0) * max(|v - w0| - eta * alpha, 0)`; GL-SP,
`alpha * sum_g sqrt(p_g) ||w_g - w0_g||_2` (eq. 6), has the prox (block
soft-thresholding) `w0_g + (v_g - w0_g) * max(0, 1 - eta * alpha *
sqrt(p_g) / ||v_g - w0_g||)`. Both are written here in NumPy and compared
with `keras_sp.proximal.Proximal` after the wrapped optimizer's update v.
"""

import json

import keras
import numpy as np
import pytest
from backend import to_numpy
from backend import value_and_gradients
from penalty_reference import shared_penalty

from keras_sp import penalties
from keras_sp import regularizers
from keras_sp.proximal import Proximal
from keras_sp.proximal import at_starting_point


def soft_threshold(v, w0, threshold):
    """The prox of eq. 5 at v (float64)."""
    d = np.asarray(v, "float64") - w0
    return w0 + np.sign(d) * np.maximum(np.abs(d) - threshold, 0.0)


def block_soft_threshold(v, w0, threshold, axes):
    """The prox of eq. 6 at v, groups over `axes`, s_g = sqrt(p_g)."""
    d = np.asarray(v, "float64") - w0
    group_size = int(np.prod([d.shape[a] for a in axes]))
    norm = np.sqrt(np.sum(d**2, axis=axes, keepdims=True))
    t = threshold * np.sqrt(group_size)
    factor = np.where(norm > t, 1 - t / np.where(norm > 0, norm, 1), 0.0)
    return w0 + d * factor


def _conv_dense_model():
    model = keras.Sequential(
        [
            keras.Input((5, 5, 2)),
            keras.layers.Conv2D(4, 3, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(3, name="dense"),
        ],
        name="net",
    )
    return model


def _starting_point_apart(model, moved_groups, scale=0.5, seed=0):
    """w0 equal to the current kernels except on output channels
    `moved_groups` of each kernel, which are moved by `scale` noise."""
    rng = np.random.default_rng(seed)
    w0 = {}
    for layer in model.layers:
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        value = to_numpy(kernel).astype("float64")
        noise = rng.normal(size=value.shape) * scale
        mask = np.zeros(value.shape[-1], bool)
        mask[list(moved_groups)] = True
        w0[kernel.path] = (value + noise * mask).astype("float32")
    return w0


def _data_gradients(model, x, y):
    """The mean squared error on (x, y) and its gradients (no penalty)."""
    y = keras.ops.convert_to_tensor(y)
    return value_and_gradients(
        lambda: keras.ops.mean(keras.ops.square(model(x) - y)),
        model.trainable_variables,
    )


def test_one_sgd_step_is_block_soft_thresholding_per_output_channel():
    """Eq. 6: Conv2D (3, 3, 2, 4) and Dense (36, 3) kernels, one fit step."""
    model = _conv_dense_model()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 5, 5, 2)).astype("float32")
    y = rng.normal(size=(6, 3)).astype("float32")
    w0 = _starting_point_apart(model, moved_groups=(1, 2))
    alpha, eta = 0.8, 0.1
    penalties.regularize(
        model,
        "group_lasso_sp",
        alpha=alpha,
        new_layers=(),
        starting_point=w0,
        proximal=True,
    )
    before = [to_numpy(v) for v in model.trainable_variables]
    data_loss, grads = _data_gradients(model, x, y)
    model.compile(Proximal(keras.optimizers.SGD(eta)), loss="mse")
    history = model.fit(x, y, batch_size=6, epochs=1, shuffle=False, verbose=0)

    # The logged loss is the whole objective: data term plus eq. 6 at w.
    penalty = sum(
        shared_penalty(
            "group_lasso_sp",
            alpha,
            w,
            w0[v.path],
            None,
            (0, 1, 2)[: w.ndim - 1],
        )
        for v, w in zip(model.trainable_variables, before, strict=True)
        if v.path in w0
    )
    np.testing.assert_allclose(
        history.history["loss"][0], data_loss + penalty, rtol=1e-5
    )
    snapped = kept = 0
    for variable, w, g in zip(
        model.trainable_variables, before, grads, strict=True
    ):
        v = w.astype("float64") - eta * g
        after = to_numpy(variable)
        if variable.path not in w0:  # a bias: SGD only
            np.testing.assert_allclose(after, v, atol=1e-6)
            continue
        axes = tuple(range(w.ndim - 1))
        expected = block_soft_threshold(v, w0[variable.path], eta * alpha, axes)
        np.testing.assert_allclose(after, expected, atol=1e-6)
        at_w0 = np.all(after == w0[variable.path], axis=axes)
        snapped += int(np.sum(at_w0))
        kept += int(np.sum(~at_w0))
    # Both branches of the prox ran: whole channels exactly at w0, others not.
    assert snapped > 0 and kept > 0


def test_one_sgd_step_is_soft_thresholding_and_the_head_gets_sgd_only():
    """Eq. 5 on the shared Dense kernel; the new head only steps."""
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(5, name="dense"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    rng = np.random.default_rng(2)
    x = rng.normal(size=(8, 4)).astype("float32")
    y = rng.normal(size=(8, 2)).astype("float32")
    kernel = model.get_layer("dense").kernel
    w0 = to_numpy(kernel) + rng.normal(size=(4, 5)).astype("float32") * (
        rng.uniform(size=(4, 5)) < 0.5
    )
    alpha, eta = 0.3, 0.05
    penalties.regularize(
        model,
        "l1_sp",
        alpha=alpha,
        beta=0.0,
        new_layers=["head"],
        starting_point={kernel.path: w0},
        proximal=True,
    )
    before = [to_numpy(v) for v in model.trainable_variables]
    data_loss, grads = _data_gradients(model, x, y)
    model.compile(Proximal(keras.optimizers.SGD(eta)), loss="mse")
    history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(
        history.history["loss"][0],
        data_loss + alpha * np.abs(before[0] - w0).sum(),
        rtol=1e-5,
    )
    for variable, w, g in zip(
        model.trainable_variables, before, grads, strict=True
    ):
        v = w.astype("float64") - eta * g
        if variable is kernel:
            v = soft_threshold(v, w0, eta * alpha)
        np.testing.assert_allclose(to_numpy(variable), v, atol=1e-6)
    after = to_numpy(kernel)
    assert 0 < np.sum(after == w0) < w0.size


def _penalized_variables():
    rng = np.random.default_rng(3)
    l1_w0 = rng.normal(size=(6, 5)).astype("float32")
    gl_w0 = rng.normal(size=(3, 3, 2, 4)).astype("float32")
    l1 = keras.Variable(l1_w0 + rng.normal(size=(6, 5)).astype("float32") * 0.1)
    gl = keras.Variable(
        gl_w0 + rng.normal(size=(3, 3, 2, 4)).astype("float32") * 0.05
    )
    plain = keras.Variable(rng.normal(size=(5,)).astype("float32"))
    l1.regularizer = regularizers.L1SP(0.5, l1_w0, proximal=True)
    gl.regularizer = regularizers.GroupLassoSP(0.2, gl_w0, proximal=True)
    return [l1, gl, plain], [l1_w0, gl_w0, None]


def _grads(shapes, steps, seed=4):
    rng = np.random.default_rng(seed)
    return [
        [rng.normal(size=s).astype("float32") for s in shapes]
        for _ in range(steps)
    ]


def _tensors(arrays):
    return [keras.ops.convert_to_tensor(a) for a in arrays]


def _prox_reference(index, v, w0, threshold):
    if index == 0:
        return soft_threshold(v, w0, threshold)
    if index == 1:
        return block_soft_threshold(v, w0, threshold, (0, 1, 2))
    return v


def test_momentum_and_schedule_prox_follows_the_inner_update():
    """SGD with momentum 0.9 and a decaying rate: NumPy m = 0.9 m - eta_t g,
    v = w + m, w = prox_{eta_t}(v) (eqs. 5-6), eta_t read at step t."""
    variables, starts = _penalized_variables()
    schedule = keras.optimizers.schedules.ExponentialDecay(
        0.1, decay_steps=1, decay_rate=0.5
    )
    optimizer = Proximal(keras.optimizers.SGD(schedule, momentum=0.9))
    steps = _grads([v.shape for v in variables], 3)
    w = [to_numpy(v).astype("float64") for v in variables]
    m = [np.zeros_like(x) for x in w]
    alphas = [0.5, 0.2, 0.0]
    for t, grads in enumerate(steps):
        optimizer.apply(_tensors(grads), variables)
        eta = 0.1 * 0.5**t
        for i, g in enumerate(grads):
            m[i] = 0.9 * m[i] - eta * g
            w[i] = _prox_reference(i, w[i] + m[i], starts[i], eta * alphas[i])
        for variable, expected in zip(variables, w, strict=True):
            np.testing.assert_allclose(to_numpy(variable), expected, atol=1e-6)
    assert int(to_numpy(optimizer.iterations)) == 3
    assert np.any(to_numpy(variables[0]) == starts[0])


def test_adam_prox_is_applied_to_adams_own_step():
    """Any optimizer: w_t = prox(w_{t-1} + Delta_t), Delta_t the step plain
    Adam takes for the same gradients (its moments ignore w)."""
    variables, starts = _penalized_variables()
    plain = [keras.Variable(to_numpy(v)) for v in variables]
    optimizer = Proximal(keras.optimizers.Adam(0.05))
    reference = keras.optimizers.Adam(0.05)
    w = [to_numpy(v).astype("float64") for v in variables]
    alphas = [0.5, 0.2, 0.0]
    for grads in _grads([v.shape for v in variables], 3):
        previous = [to_numpy(v).astype("float64") for v in plain]
        reference.apply(_tensors(grads), plain)
        optimizer.apply(_tensors(grads), variables)
        for i in range(3):
            delta = to_numpy(plain[i]).astype("float64") - previous[i]
            w[i] = _prox_reference(i, w[i] + delta, starts[i], 0.05 * alphas[i])
            np.testing.assert_allclose(to_numpy(variables[i]), w[i], atol=1e-6)


def test_float16_variables_are_proximed_in_float32():
    """Differences of 2^-13 square to 0 in float16; in float32 the group norm
    (4 * 2^-26)^(1/2) = 2^-12 exceeds the threshold and the group moves."""
    w0 = np.zeros((4, 2), "float16")
    start = np.full((4, 2), 2.0**-13, "float16")
    variable = keras.Variable(start, dtype="float16")
    variable.regularizer = regularizers.GroupLassoSP(1e-5, w0, proximal=True)
    optimizer = Proximal(keras.optimizers.SGD(1.0))
    optimizer.apply(_tensors([np.zeros((4, 2), "float16")]), [variable])
    expected = block_soft_threshold(start, w0, 1e-5, (0,)).astype("float16")
    assert variable.dtype == "float16"
    np.testing.assert_array_equal(to_numpy(variable), expected)
    assert np.all(to_numpy(variable) != 0)


def _teacher_data(model, moved_channels, seed=5):
    """A real tiny target: the pretrained model with output channels
    `moved_channels` of its first kernel changed."""
    rng = np.random.default_rng(seed)
    teacher = keras.models.clone_model(model)
    teacher.set_weights(model.get_weights())
    kernel = teacher.get_layer("a").kernel
    value = to_numpy(kernel)
    value[:, list(moved_channels)] += 2 * rng.normal(
        size=(value.shape[0], len(moved_channels))
    ).astype("float32")
    kernel.assign(value)
    x = rng.normal(size=(32, 6)).astype("float32")
    return x, to_numpy(teacher(x))


def _fine_tune(kind, proximal, alpha=0.05):
    """60 full-batch steps of SGD (the exact proximal gradient method when
    `proximal`) from the pretrained weights toward the teacher's outputs;
    returns the model and its objective (data term plus penalty) at the
    end."""
    keras.utils.set_random_seed(7)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="a"),
            keras.layers.Dense(3, name="b"),
        ]
    )
    x, y = _teacher_data(model, moved_channels=(0, 1))
    penalties.regularize(
        model, kind, alpha=alpha, new_layers=(), proximal=proximal
    )
    optimizer = keras.optimizers.SGD(0.05)
    model.compile(Proximal(optimizer) if proximal else optimizer, loss="mse")
    history = model.fit(
        x, y, batch_size=32, epochs=60, shuffle=False, verbose=0
    )
    objective = model.evaluate(x, y, batch_size=32, verbose=0)
    return model, history.history["loss"], objective


@pytest.mark.parametrize("kind", ["l1_sp", "group_lasso_sp"])
def test_proximal_fine_tuning_freezes_weights_the_subgradient_never_does(kind):
    proximal, losses, objective = _fine_tune(kind, True)
    subgradient, _, subgradient_objective = _fine_tune(kind, False)
    frozen = at_starting_point(proximal)
    assert 0 < frozen.weights < 1
    assert 0 < frozen.groups < 1
    assert at_starting_point(subgradient) == (0.0, 0.0)
    # It learned, and reached a lower objective than the subgradient steps.
    assert losses[-1] < losses[0]
    assert objective < subgradient_objective


def test_at_starting_point_counts_weights_and_output_channels():
    model = _conv_dense_model()
    penalties.regularize(model, "l1_sp", alpha=0.1, new_layers=["dense"])
    conv = model.get_layer("conv").kernel
    value = to_numpy(conv)
    moved = np.zeros(value.shape, bool)
    moved[0, 0, 0, 0] = True  # channel 0: one weight off w0
    moved[:, :, :, 2] = True  # channel 2: all off
    conv.assign(value + moved.astype("float32"))
    # Only the conv kernel is penalized with a starting point (the dense
    # layer is new: plain weight decay).
    result = at_starting_point(model)
    assert result.weights == pytest.approx(1 - moved.sum() / moved.size)
    assert result.groups == pytest.approx(2 / 4)
    plain = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="regularize"):
        at_starting_point(plain)


def _resumable_model():
    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [
            keras.Input((4, 4, 1)),
            keras.layers.Conv2D(3, 2, name="conv"),
            keras.layers.Flatten(),
            keras.layers.Dense(2, name="head"),
        ]
    )
    w0 = _starting_point_apart(model, moved_groups=(0,), scale=3.0, seed=2)
    penalties.regularize(
        model,
        "group_lasso_sp",
        alpha=1.0,
        beta=0.01,
        new_layers=["head"],
        starting_point={k: v for k, v in w0.items() if "conv" in k},
        proximal=True,
    )
    model.compile(
        Proximal(keras.optimizers.SGD(0.05, momentum=0.9)), loss="mse"
    )
    return model


def test_save_and_load_mid_training_resumes_bit_identically(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 4, 4, 1)).astype("float32")
    # The pretrained outputs, slightly perturbed: a target near w.
    y = to_numpy(_resumable_model()(x)) + 0.1 * rng.normal(size=(12, 2))
    y = y.astype("float32")
    fit = dict(batch_size=4, shuffle=False, verbose=0)

    straight = _resumable_model()
    straight.fit(x, y, epochs=4, **fit)

    interrupted = _resumable_model()
    interrupted.fit(x, y, epochs=2, **fit)
    interrupted.save(tmp_path / "mid.keras")
    saved_state = [to_numpy(v) for v in interrupted.optimizer.variables]
    loaded = keras.saving.load_model(tmp_path / "mid.keras")
    assert isinstance(loaded.optimizer, Proximal)
    assert isinstance(loaded.optimizer.optimizer, keras.optimizers.SGD)
    restored = [to_numpy(v) for v in loaded.optimizer.variables]
    assert len(restored) == len(saved_state)
    for a, b in zip(restored, saved_state, strict=True):
        np.testing.assert_array_equal(a, b)
    loaded.fit(x, y, epochs=2, **fit)

    for a, b in zip(loaded.weights, straight.weights, strict=True):
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert int(to_numpy(loaded.optimizer.iterations)) == 12
    # The resumed run froze channels (so the check above covers the prox).
    frozen = at_starting_point(loaded)
    assert 0 < frozen.groups < 1


def test_proximal_refuses_what_is_not_an_optimizer():
    with pytest.raises(ValueError, match=r"`optimizer`.*str"):
        Proximal("sgd")
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        Proximal(keras.optimizers.SGD(gradient_accumulation_steps=2))
    with pytest.raises(ValueError, match="use_ema"):
        Proximal(keras.optimizers.SGD(use_ema=True))


def test_training_without_a_proximal_penalty_fails_and_changes_nothing():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    penalties.regularize(model, "l1_sp", alpha=0.1, new_layers=())
    model.compile(Proximal(keras.optimizers.SGD(0.1, momentum=0.9)), loss="mse")
    weights = [to_numpy(v) for v in model.weights]
    w0 = dict(penalties.starting_point(model))
    x = np.ones((4, 3), "float32")
    with pytest.raises(ValueError, match=r"regularize\(.*proximal=True"):
        model.fit(x, np.ones((4, 2), "float32"), verbose=0)
    for variable, before in zip(model.weights, weights, strict=True):
        np.testing.assert_array_equal(to_numpy(variable), before)
    for path, value in penalties.starting_point(model).items():
        np.testing.assert_array_equal(value, w0[path])
    assert not model.optimizer.built
    assert int(to_numpy(model.optimizer.iterations)) == 0
    # Applied by hand, without a build: the same error, nothing changed.
    optimizer = Proximal(keras.optimizers.SGD(0.1, momentum=0.9))
    kernel = model.layers[0].kernel
    with pytest.raises(ValueError, match="no variable with a proximal"):
        optimizer.apply(_tensors([np.ones((3, 2), "float32")]), [kernel])
    np.testing.assert_array_equal(to_numpy(kernel), weights[0])
    assert not optimizer.built
    assert int(to_numpy(optimizer.iterations)) == 0


def test_proximal_is_refused_where_no_closed_form_prox_exists():
    w0 = np.zeros((4, 2), "float32")
    with pytest.raises(ValueError, match=r"proximal=True.*fisher_weighted"):
        regularizers.GroupLassoSP(
            0.1, w0, fisher=np.ones_like(w0), proximal=True
        )
    with pytest.raises(ValueError, match="proximal"):
        regularizers.L1SP(0.1, w0, proximal="yes")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    penalties.regularize(model, "l1_sp", alpha=0.1, new_layers=())
    attached = penalties.attached_penalties(model)
    for kind in ("group_lasso_sp_fisher", "l2_sp", "l2"):
        with pytest.raises(ValueError, match=rf"kind='{kind}', proximal=True"):
            penalties.regularize(
                model,
                kind,
                alpha=0.1,
                new_layers=(),
                fisher={model.layers[0].kernel.path: np.ones((4, 2))}
                if "fisher" in kind
                else None,
                proximal=True,
            )
    # The refused calls left the attached penalty as it was.
    assert penalties.attached_penalties(model) == attached


@pytest.mark.parametrize(
    "cls,shape",
    [(regularizers.L1SP, (4, 3)), (regularizers.GroupLassoSP, (4, 3))],
)
def test_proximal_penalty_is_in_the_value_not_in_the_gradient(cls, shape):
    rng = np.random.default_rng(8)
    w0 = rng.normal(size=shape).astype("float32")
    w = (w0 + rng.normal(size=shape)).astype("float32")
    kind = "l1_sp" if cls is regularizers.L1SP else "group_lasso_sp"
    variable = keras.Variable(w)
    proximal, smooth = cls(0.3, w0, proximal=True), cls(0.3, w0)
    # `0 * sum(w)` only keeps a graph to differentiate (PyTorch refuses a
    # value that has none).
    value, (gradient,) = value_and_gradients(
        lambda: proximal(variable) + 0 * keras.ops.sum(variable), [variable]
    )
    np.testing.assert_allclose(
        value, shared_penalty(kind, 0.3, w, w0, None, (0,)), rtol=1e-5
    )
    np.testing.assert_array_equal(gradient, np.zeros(shape))
    _, (gradient,) = value_and_gradients(lambda: smooth(variable), [variable])
    assert np.all(gradient != 0)


@pytest.mark.parametrize("cls", [regularizers.L1SP, regularizers.GroupLassoSP])
def test_regularizer_config_round_trip_with_and_without_proximal(cls):
    w0 = np.zeros((3, 2), "float32")
    regularizer = cls(0.2, w0, proximal=True)
    config = json.loads(json.dumps(regularizer.get_config()))
    assert config["proximal"] is True
    assert cls.from_config(config).proximal is True
    # A config saved before the flag existed loads as the gradient form.
    old = {k: v for k, v in config.items() if k != "proximal"}
    assert cls.from_config(old).proximal is False
    assert cls.from_config(old).get_config()["proximal"] is False


def test_proximal_config_round_trip_keeps_the_wrapped_optimizer():
    optimizer = Proximal(
        keras.optimizers.SGD(0.03, momentum=0.8, nesterov=True), name="prox"
    )
    serialized = json.loads(
        json.dumps(keras.saving.serialize_keras_object(optimizer))
    )
    assert serialized["registered_name"] == "keras_sp>Proximal"
    again = keras.saving.deserialize_keras_object(serialized)
    assert isinstance(again, Proximal) and again.name == "prox"
    inner = again.optimizer.get_config()
    assert (inner["momentum"], inner["nesterov"]) == (0.8, True)
    assert float(to_numpy(again.learning_rate)) == pytest.approx(0.03)


def test_freeze_first_rebuilds_the_wrapped_optimizer_in_place():
    """`keras_sp.freeze_first` mid-training: the same Proximal object goes
    on, the momenta of layers still trained are kept, frozen ones stay."""
    from keras_sp import units

    rng = np.random.default_rng(9)
    x = rng.normal(size=(16, 6)).astype("float32")
    y = rng.normal(size=(16, 2)).astype("float32")
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, name="a"),
            keras.layers.Dense(8, name="b"),
            keras.layers.Dense(2, name="head"),
        ]
    )
    penalties.regularize(
        model, "l1_sp", alpha=0.5, new_layers=["head"], proximal=True
    )
    optimizer = Proximal(keras.optimizers.SGD(0.05, momentum=0.9))
    model.compile(optimizer, loss="mse")
    model.fit(x, y, epochs=1, verbose=0)

    def momentum(name):
        (slot,) = [
            v
            for v in optimizer.optimizer.variables
            if f"{name}_kernel" in v.path
        ]
        return to_numpy(slot)

    before = momentum("b")
    assert np.any(before != 0)
    units.freeze_first(model, 1)
    assert model.optimizer is optimizer
    np.testing.assert_array_equal(momentum("b"), before)
    frozen = to_numpy(model.get_layer("a").kernel)
    model.fit(x, y, epochs=1, verbose=0)
    np.testing.assert_array_equal(to_numpy(model.get_layer("a").kernel), frozen)
    assert at_starting_point(model).weights > 0
