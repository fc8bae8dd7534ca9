"""`keras_sp.fisher` on every backend: run with KERAS_BACKEND=tensorflow,
jax or torch. Numbers are checked against the NumPy closed forms and the
per-example backprop loop of `fisher_reference` (eq. 4 of Li, Grandvalet &
Davoine: F_jj = 1/m sum_i sum_k f_k(x_i) (d log f_k(x_i) / dw_j)^2)."""

import io
import json
import os
import statistics
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest
from fisher_reference import BACKEND
from fisher_reference import Subclassed
from fisher_reference import assert_fisher_close
from fisher_reference import backprop
from fisher_reference import backprop_signed
from fisher_reference import closed_form
from fisher_reference import conv_model
from fisher_reference import data
from fisher_reference import dense_model
from fisher_reference import empirical_from
from fisher_reference import exact_from
from fisher_reference import flat
from fisher_reference import sampled_from
from fisher_reference import three_modes
from keras import ops

from keras_sp import fisher


def test_closed_form_equals_backprop():
    # The NumPy closed form is checked once against the backend's autodiff.
    model = dense_model(4, activation=None)
    x, _ = data((7,), 3, 4)
    G, p = closed_form(model, x)
    G_backprop, p_backprop = backprop(model, x)
    np.testing.assert_allclose(p_backprop, p, rtol=1e-5)
    np.testing.assert_allclose(G_backprop, G, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("activation", ["softmax", None])
def test_dense_model_every_mode_equals_closed_form(activation):
    model = dense_model(3, activation=activation)
    # 7 examples in batches of 3: the last batch is padded and masked.
    x, y = data((7,), 7, 3)
    G, p = closed_form(model, x)
    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    # One draw per example; fewer draws than classes (one backward pass per
    # draw); more draws than classes (one per class, weighted by counts).
    for samples in (1, 2, 5):
        result = fisher.diagonal_fisher(
            model, x, mode="sampled", samples=samples, batch_size=3, seed=7
        )
        expected = sampled_from(G, p, samples, seed=7)
        assert_fisher_close(flat(result, model), expected, model)
        assert not np.allclose(expected, exact_from(G, p), rtol=1e-3)


def test_conv_batchnorm_model_every_mode_equals_backprop():
    model = conv_model(10)
    x, y = data((10, 10, 2), 5, 10)
    G, p = backprop(model, x)
    # BatchNormalization's mode matters here: batch statistics differ.
    G_training, _ = backprop(model, x[:2], training=True)
    assert not np.allclose(G_training[0], G[0], rtol=1e-2)
    before = [np.array(ops.convert_to_numpy(v)) for v in model.weights]

    exact = fisher.diagonal_fisher(model, x, mode="exact", batch_size=3)
    assert_fisher_close(flat(exact, model), exact_from(G, p), model)
    empirical = fisher.diagonal_fisher(
        model, (x, y), mode="empirical", batch_size=3
    )
    assert_fisher_close(flat(empirical, model), empirical_from(G, y), model)
    sampled = fisher.diagonal_fisher(
        model, x, mode="sampled", samples=2, batch_size=3, seed=7
    )
    expected = sampled_from(G, p, 2, seed=7)
    assert_fisher_close(flat(sampled, model), expected, model)

    # Weights and BatchNormalization moving statistics are bit-identical.
    after = [np.array(ops.convert_to_numpy(v)) for v in model.weights]
    assert len(after) > len(model.trainable_variables)
    for variable, old, new in zip(model.weights, before, after, strict=True):
        np.testing.assert_array_equal(old, new, err_msg=variable.path)


def test_exact_in_class_chunks_equals_closed_form(monkeypatch):
    # At most 2 (example, class) pairs per call: 3 classes in 2 chunks.
    monkeypatch.setattr(fisher, "MAX_PAIRS", 2)
    model = dense_model(3, activation=None)
    x, _ = data((7,), 5, 3, seed=1)
    G, p = closed_form(model, x)
    result = fisher.diagonal_fisher(model, x, mode="exact", batch_size=1)
    assert_fisher_close(flat(result, model), exact_from(G, p), model)


def test_squared_batch_gradient_would_fail():
    model = dense_model(4, activation=None)
    x, y = data((7,), 6, 4, seed=2)
    G, p = closed_form(model, x)
    expected = empirical_from(G, y)
    assert_fisher_close(
        flat(fisher.diagonal_fisher(model, (x, y), mode="empirical"), model),
        expected,
        model,
    )
    # The shortcut: square the gradient of the batch's log-likelihood (the
    # signed per-example gradients come from the closed form's roots).
    signed = backprop_signed(model, x, y)
    for shortcut in (signed.mean(0) ** 2, len(x) * signed.mean(0) ** 2):
        with pytest.raises(AssertionError):
            assert_fisher_close(shortcut, expected, model)


def test_sampled_approaches_exact_within_its_standard_error():
    model = dense_model(10, activation=None)
    x, _ = data((7,), 24, 10, seed=3)
    G, p = closed_form(model, x)
    m = len(x)
    exact = exact_from(G, p)
    # Variance of one draw's squared score, per example and parameter.
    per_draw_variance = np.einsum("ik,ikj->ij", p, G**2) - (
        np.einsum("ik,ikj->ij", p, G) ** 2
    )
    # Bonferroni over the parameters, family-wise error 1e-3.
    z = statistics.NormalDist().inv_cdf(1 - 1e-3 / (2 * exact.size))
    uniform = G.mean(axis=1).mean(axis=0)  # a sampler ignoring f(x)
    for samples in (9, 400):  # draws < K, and counts over K classes
        estimate = flat(
            fisher.diagonal_fisher(
                model, x, mode="sampled", samples=samples, seed=11
            ),
            model,
        )
        standard_error = np.sqrt(
            per_draw_variance.sum(axis=0) / (m**2 * samples)
        )
        tolerance = z * standard_error + 1e-5 * exact
        assert np.all(np.abs(estimate - exact) <= tolerance)
        # The same tolerance rejects labels drawn uniformly.
        assert not np.all(np.abs(uniform - exact) <= tolerance)


def test_seed_makes_sampled_reproducible_for_every_batch_size():
    model = dense_model(4, activation=None, head_scale=0.5)
    x, _ = data((7,), 6, 4)

    def run(seed, batch_size=32):
        return flat(
            fisher.diagonal_fisher(
                model, x, mode="sampled", seed=seed, batch_size=batch_size
            ),
            model,
        )

    first = run(3)
    np.testing.assert_array_equal(first, run(3))
    # The draws of an example do not depend on the batch it falls in.
    np.testing.assert_allclose(run(3, batch_size=4), first, rtol=1e-6)
    assert not np.allclose(first, run(4))


def test_final_softmax_is_detected_and_read_as_logits():
    logits_model = dense_model(5, activation=None, head_scale=60.0)
    x, _ = data((7,), 6, 5)
    probabilities = ops.convert_to_numpy(
        ops.softmax(logits_model(x, training=False))
    )
    assert np.min(probabilities) == 0.0  # log(f) would be -inf here
    G, p = closed_form(logits_model, x)
    expected = exact_from(G, p)
    assert np.all(np.isfinite(expected)) and np.max(expected) > 0
    assert_fisher_close(
        flat(fisher.diagonal_fisher(logits_model, x), logits_model),
        expected,
        logits_model,
    )
    head = logits_model.get_layer("head")
    dense_softmax = keras.Model(
        logits_model.input,
        keras.layers.Activation("softmax")(logits_model.outputs[0]),
    )
    softmax_layer = keras.Model(
        logits_model.input, keras.layers.Softmax()(logits_model.outputs[0])
    )
    nested = keras.Sequential(
        [
            keras.Input((7,)),
            keras.Sequential([logits_model, keras.layers.Softmax()]),
        ]
    )
    head_activation = dense_model(5, activation="softmax", head_scale=60.0)
    for model, from_logits in (
        (dense_softmax, None),
        (dense_softmax, False),
        (softmax_layer, None),
        (nested, None),
        (head_activation, None),
        (head_activation, False),
    ):
        result = fisher.diagonal_fisher(model, x, from_logits=from_logits)
        assert_fisher_close(flat(result, model), expected, model)
    # The softmax is back in place afterwards.
    np.testing.assert_allclose(
        ops.convert_to_numpy(head_activation(x, training=False)),
        probabilities,
        atol=1e-6,
    )
    assert head.activation is keras.activations.linear
    # With from_logits=True the softmax outputs are taken as logits.
    result = flat(
        fisher.diagonal_fisher(dense_softmax, x, from_logits=True),
        dense_softmax,
    )
    assert not np.allclose(result, expected, rtol=1e-2)


def test_probabilities_without_softmax():
    logits_model = dense_model(4, activation=None)
    x, _ = data((7,), 6, 4)
    manual = keras.Model(
        logits_model.input,
        keras.layers.Lambda(
            lambda z: ops.exp(z) / ops.sum(ops.exp(z), axis=-1, keepdims=True)
        )(logits_model.outputs[0]),
    )
    with pytest.raises(
        ValueError, match="look like probabilities.*from_logits=None"
    ):
        fisher.diagonal_fisher(manual, x)
    G, p = closed_form(logits_model, x)
    result = flat(fisher.diagonal_fisher(manual, x, from_logits=False), manual)
    # log of float32 probabilities instead of a log-softmax: ~1e-6 apart.
    assert_fisher_close(result, exact_from(G, p), manual, rtol=1e-4)
    with pytest.raises(ValueError, match="not.*Received: from_logits=False"):
        fisher.diagonal_fisher(logits_model, x, from_logits=False)


def test_progress_bar(capsys):
    model = dense_model(3, activation=None)
    x, _ = data((7,), 7, 3)
    fisher.diagonal_fisher(model, x, batch_size=3, verbose=1)
    assert "7/7" in capsys.readouterr().out
    fisher.diagonal_fisher(model, x, batch_size=3, verbose=0)
    assert capsys.readouterr().out == ""


def test_save_load_round_trip(tmp_path):
    model = dense_model(3)
    x, _ = data((7,), 3, 3)
    result = fisher.diagonal_fisher(model, x)
    assert any("/" in key for key in result)
    path = tmp_path / "fisher.npz"
    fisher.save(result, path)
    for loaded in (fisher.load(path), fisher.load(str(path), model=model)):
        assert list(loaded) == list(result)
        for key, value in result.items():
            assert loaded[key].dtype == value.dtype
            np.testing.assert_array_equal(loaded[key], value)
    with np.load(path) as archive:  # a plain .npz file
        assert sorted(archive.files) == sorted(result)
    with pytest.raises(ValueError, match="exists and overwrite=False"):
        fisher.save(result, path, overwrite=False)
    fisher.save({"a/b": np.ones(2)}, path)
    assert list(fisher.load(path)) == ["a/b"]
    assert [p.name for p in tmp_path.iterdir()] == ["fisher.npz"]


def test_file_that_does_not_match_the_model(tmp_path):
    model = dense_model(3)
    path = tmp_path / "fisher.npz"
    result = {
        v.path: np.ones(v.shape, "float32") for v in model.trainable_variables
    }
    renamed = dict(result)
    renamed["other/kernel"] = renamed.pop("head/kernel")
    fisher.save(renamed, path)
    with pytest.raises(ValueError, match="does not match model.*head/kernel"):
        fisher.load(path, model=model)
    # Paths match up to a '/'-aligned prefix (a reloaded or nested model).
    prefixed = {"source/" + key: value for key, value in result.items()}
    fisher.save(prefixed, path)
    assert list(fisher.load(path, model=model)) == list(result)
    prefixed["hidden/kernel"] = result["hidden/kernel"]
    fisher.save(prefixed, path)
    with pytest.raises(ValueError, match="1 entries match no.*source/hidden"):
        fisher.load(path, model=model)
    prefixed["other/hidden/kernel"] = prefixed.pop("hidden/kernel")
    fisher.save(prefixed, path)
    with pytest.raises(ValueError, match="several entries.*hidden/kernel"):
        fisher.load(path, model=model)
    reshaped = dict(result)
    reshaped["head/kernel"] = np.ones((3, 8), "float32")
    fisher.save(reshaped, path)
    with pytest.raises(ValueError, match=r"'head/kernel' has shape \(3, 8\)"):
        fisher.load(path, model=model)
    with pytest.raises(ValueError, match="end in '.npz'"):
        fisher.save(result, tmp_path / "fisher.npy")
    with pytest.raises(ValueError, match="non-negative"):
        fisher.save({"head/bias": -np.ones(3)}, path)
    np.save(tmp_path / "single.npy", np.ones(3))
    with pytest.raises(ValueError, match="single array"):
        fisher.load(tmp_path / "single.npy")
    (tmp_path / "text.npz").write_text("not an archive")
    with pytest.raises(ValueError, match="not a .npz file"):
        fisher.load(tmp_path / "text.npz")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        with archive.open("head/bias.npy", "w") as handle:
            np.lib.format.write_array(handle, -np.ones(3))
    (tmp_path / "negative.npz").write_bytes(buffer.getvalue())
    with pytest.raises(ValueError, match="non-negative"):
        fisher.load(tmp_path / "negative.npz")
    with pytest.raises(FileNotFoundError):
        fisher.load(tmp_path / "missing.npz")


def test_subclassed_model_equals_closed_form():
    model = Subclassed()
    model(np.zeros((1, 7), "float32"))
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(7, 3)), rng.normal(size=3)]
    model.set_weights(weights)
    x, y = data((7,), 5, 3)
    z = x.astype("float64") @ weights[0] + weights[1]
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    # Softmax regression: d log f_k / dW = x (e_k - p)^T, d / db = e_k - p.
    G = np.array(
        [
            [
                np.concatenate(
                    [
                        np.outer(x[i], np.eye(3)[k] - p[i]).ravel(),
                        np.eye(3)[k] - p[i],
                    ]
                )
                ** 2
                for k in range(3)
            ]
            for i in range(len(x))
        ]
    )
    for mode, expected in (
        ("exact", exact_from(G, p)),
        ("empirical", empirical_from(G, y)),
        ("sampled", sampled_from(G, p, 3, seed=2)),
    ):
        result = fisher.diagonal_fisher(
            model, (x, y), mode=mode, samples=3, seed=2, batch_size=2
        )
        assert_fisher_close(flat(result, model), expected, model)


_ON_BACKEND = """
import json, sys
sys.path.insert(0, {tests!r})
import fisher_reference
print(json.dumps(fisher_reference.three_modes()))
"""


def three_modes_on(backend):
    """`three_modes()` computed in a subprocess running `backend`."""
    environment = dict(os.environ, KERAS_BACKEND=backend)
    environment["PYTHONPATH"] = os.pathsep.join(
        [os.path.dirname(os.path.dirname(fisher.__file__))]
        + [p for p in [os.environ.get("PYTHONPATH")] if p]
    )
    finished = subprocess.run(
        [
            sys.executable,
            "-c",
            _ON_BACKEND.format(tests=os.path.dirname(__file__)),
        ],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def test_every_backend_gives_the_same_fisher():
    # The same weights, data and seed on TensorFlow, JAX and PyTorch: the
    # same Fisher in every mode (the sampled labels are drawn on the host).
    # This backend runs here, the two others in subprocesses.
    results = {BACKEND: three_modes()}
    for backend in ("tensorflow", "jax", "torch"):
        if backend != BACKEND:
            results[backend] = three_modes_on(backend)
    model = conv_model(10)
    for mode in ("exact", "sampled", "empirical"):
        reference = np.array(results[BACKEND][mode])
        assert np.max(reference) > 0
        for backend, result in results.items():
            assert_fisher_close(
                np.array(result[mode]), reference, model, what=backend
            )
    exact = np.array(results[BACKEND]["exact"])
    assert not np.allclose(np.array(results[BACKEND]["sampled"]), exact)


# The per-example loop is PyTorch's fallback: the test exists on that
# backend only (defined, not skipped, elsewhere).
if BACKEND == "torch":

    def test_torch_falls_back_to_a_loop_when_torch_func_fails(monkeypatch):
        from keras_sp import _fisher_torch

        def fail(*arguments):
            raise RuntimeError("no batching rule")

        monkeypatch.setattr(_fisher_torch._Functions, "_vectorised_sums", fail)
        model = dense_model(3, activation=None, seed=4)
        x, y = data((7,), 5, 3)
        G, p = closed_form(model, x)
        with pytest.warns(RuntimeWarning, match="no batching rule.*loop"):
            exact = fisher.diagonal_fisher(model, x, batch_size=2)
        assert_fisher_close(flat(exact, model), exact_from(G, p), model)
        for mode, expected in (
            ("empirical", empirical_from(G, y)),
            ("sampled", sampled_from(G, p, 2, seed=1)),
        ):
            result = fisher.diagonal_fisher(
                model, (x, y), mode=mode, samples=2, seed=1, batch_size=2
            )
            assert_fisher_close(flat(result, model), expected, model)
