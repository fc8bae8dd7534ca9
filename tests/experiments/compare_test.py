"""The comparison runner: k-fold selection, matched seeds, paired intervals."""

import collections
import dataclasses
import json
import math
import os
import re
import shutil

import keras
import numpy as np
import pytest
from demo_test import tiny_fashion
from scipy import stats

import keras_sp
from keras_sp import transfer_statistics as ts
from keras_sp.experiments import compare
from keras_sp.experiments import comparison_methods
from keras_sp.experiments import comparison_settings
from keras_sp.experiments import comparison_stats
from keras_sp.experiments import fashion_source
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import config_path
from keras_sp.experiments.config import load_config


def test_folds_partition_each_class_evenly():
    labels = np.repeat([0, 1, 2], [6, 7, 9])
    parts = comparison_stats.folds(labels, 3, seed=4)
    joined = np.sort(np.concatenate(parts))
    np.testing.assert_array_equal(joined, np.arange(len(labels)))
    for label, size in ((0, 6), (1, 7), (2, 9)):
        counts = [int(np.sum(labels[p] == label)) for p in parts]
        assert max(counts) - min(counts) <= 1 and sum(counts) == size
    again = comparison_stats.folds(labels, 3, seed=4)
    assert all((a == b).all() for a, b in zip(parts, again, strict=True))
    with pytest.raises(ValueError, match=r"k=7"):
        comparison_stats.folds(labels, 7, seed=0)
    with pytest.raises(ValueError, match=r"k=1"):
        comparison_stats.folds(labels, 1, seed=0)


def test_paired_difference_is_the_student_t_interval_of_the_differences():
    rng = np.random.default_rng(1)
    reference = rng.uniform(0.8, 0.9, size=10)
    values = reference + rng.normal(0.01, 0.005, size=10)
    d = comparison_stats.paired_difference(values, reference)
    differences = values - reference
    low, high = stats.ttest_rel(values, reference).confidence_interval(0.95)
    assert d["mean"] == pytest.approx(differences.mean())
    assert d["std"] == pytest.approx(differences.std(ddof=1))
    assert (d["low"], d["high"]) == pytest.approx((low, high))
    with pytest.raises(ValueError, match="one length"):
        comparison_stats.paired_difference([1.0, 2.0], [1.0])


@pytest.mark.parametrize("n", [5, 10, 20])
def test_smallest_detectable_effect_has_the_power_it_claims(n):
    """Brute force: the exact power of the two-sided paired t-test (a
    noncentral t) at the returned effect is close to 80 %."""
    effect = comparison_stats.smallest_detectable_effect(2.0, n)
    critical = stats.t.ppf(0.975, n - 1)
    shift = effect / (2.0 / math.sqrt(n))
    power = stats.nct.sf(critical, n - 1, shift) + stats.nct.cdf(
        -critical, n - 1, shift
    )
    assert power == pytest.approx(0.8, abs=0.03)
    assert comparison_stats.smallest_detectable_effect(1.0, 1) == math.inf


@pytest.fixture
def tiny_setting(monkeypatch):
    data = tiny_fashion(per_class_train=12, per_class_test=6)
    source = fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    )
    monkeypatch.setattr(comparison_settings, "load_fashion_mnist", lambda: data)
    monkeypatch.setattr(
        fashion_source,
        "pretrained_source_model",
        lambda **kwargs: (source, 0.5),
    )
    config = load_config(
        {
            "methods": ["l2_sp"],
            "per_class": [4, 6],
            "seeds": [0, 1, 2],
            "cv_seeds": 2,
            "folds": 2,
            "grids": {
                "probe": {"beta": [0.01]},
                "l2": {"alpha": [1e-4, 1.0]},
                "l2_sp": {"alpha": [0.01]},
            },
            "iterations": 3,
            "probe_iterations": 3,
            "batch_size": 8,
        },
        compare.CompareConfig,
    )
    return config, data


def tiny_task(tiny_setting, iterations):
    """A `Task` on the tiny setting's source model, and its target's
    training images."""
    _, data = tiny_setting
    source, _ = fashion_source.pretrained_source_model()
    task = comparison_methods.Task(
        source=source,
        num_classes=5,
        iterations=iterations,
        probe_iterations=3,
        batch_size=8,
        learning_rate=0.01,
        beta=0.01,
    )
    (x, y), _ = data
    x, y = fashion_source.select_classes(x, y, fashion_source.TARGET_CLASSES)
    return task, x.astype("float32"), y


def test_compare_end_to_end_and_resume(tiny_setting, tmp_path, monkeypatch):
    config, data = tiny_setting
    out = str(tmp_path / "compare")
    summaries = compare.run_compare(config, out, verbose=0)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    (x_train, y_train), _ = data
    target = np.isin(y_train, fashion_source.TARGET_CLASSES)
    for per_class in (4, 6):
        cv = [r for r in runs if r["key"].startswith(f"cv/{per_class}/")]
        # Only l2 has more than one grid point: 2 alphas x 2 seeds x 2 folds.
        assert {r["method"] for r in cv} == {"l2"} and len(cv) == 8
        scores = {}
        for alpha in (1e-4, 1.0):
            chosen = [r for r in cv if r["alpha"] == alpha]
            scores[alpha] = (
                np.mean([r["accuracy"] for r in chosen]),
                -np.mean([r["loss"] for r in chosen]),
            )
        row = summaries[per_class]["l2"]
        assert row["params"] == {"alpha": max(scores, key=scores.get)}

        test = {
            m: [
                r for r in runs if r["key"].startswith(f"test/{per_class}/{m}/")
            ]
            for m in ("probe", "l2", "l2_sp")
        }
        for method, records in test.items():
            assert [r["seed"] for r in records] == [0, 1, 2]
            accuracy = np.array([r["accuracy"] for r in records])
            reference = np.array([r["accuracy"] for r in test["l2"]])
            summary = summaries[per_class][method]
            assert summary["accuracy_mean"] == pytest.approx(accuracy.mean())
            assert summary["difference_to_l2"]["mean"] == pytest.approx(
                (accuracy - reference).mean()
            )
            if method == "probe":
                assert all(r["drift"] == 0.0 for r in records)
            else:
                assert all(r["drift"] > 0.0 for r in records)
        # The test set is every test image of the target classes.
        assert target.sum() == 5 * 12
    with open(os.path.join(out, "table.md")) as handle:
        table = handle.read()
    assert "### 4 training images per class" in table
    assert "| l2_sp | alpha=0.01 (fixed) |" in table
    assert f"| l2 | alpha={summaries[4]['l2']['params']['alpha']:g} (CV) |" in (
        table
    )
    assert os.path.exists(os.path.join(out, "regime_map.png"))
    with open(os.path.join(out, "regime_map.md")) as handle:
        regime = handle.read().splitlines()
    assert "| method | 4 per class | 6 per class |" in regime
    # Each method's row: the paired differences to L2 of the summaries.
    row = next(line for line in regime if line.startswith("| probe |"))
    cells = row.strip("| ").split(" | ")[1:]
    for per_class, cell in zip((4, 6), cells, strict=True):
        d = summaries[per_class]["probe"]["difference_to_l2"]
        mean, low, high = (float(v) for v in re.findall(r"[-+]\d+\.\d+", cell))
        assert mean == pytest.approx(100 * d["mean"], abs=0.005)
        assert (low, high) == pytest.approx(
            (100 * d["low"], 100 * d["high"]), abs=0.005
        )

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setitem(
        comparison_methods.METHODS, "l2", (no_training, ("alpha",))
    )
    # --report-only writes the same table from results.json alone, and
    # refuses when a run is missing.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(os.path.join(out, "results.json"), copy / "results.json")
    compare.run_compare(config, str(copy), verbose=0, report_only=True)
    assert (copy / "table.md").read_text() == table
    assert (copy / "regime_map.md").read_text().splitlines() == regime
    config.seeds = [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="report-only.*seed=3"):
        compare.run_compare(config, str(copy), verbose=0, report_only=True)
    config.seeds = [0, 1, 2]
    again = compare.run_compare(config, out, verbose=0)
    assert again[4]["l2"]["params"] == summaries[4]["l2"]["params"]
    # A later call with one more method reuses every run it shares.
    config.methods = ["l2_sp", "l1_sp"]
    config.grids["l1_sp"] = {"alpha": [1e-4]}
    more = compare.run_compare(config, out, verbose=0)
    assert more[6]["l2"] == summaries[6]["l2"]
    assert set(more[6]) == {"probe", "l2", "l2_sp", "l1_sp"}


def test_matched_seeds_give_the_same_images_head_and_batches(tiny_setting):
    """Two methods on one seed start from one head: with alpha = 0, L2 and
    L2-SP are the same objective and train to the same weights."""
    config, data = tiny_setting
    source, _ = fashion_source.pretrained_source_model()
    task = comparison_methods.Task(
        source=source,
        num_classes=5,
        iterations=3,
        probe_iterations=3,
        batch_size=8,
        learning_rate=0.01,
        beta=0.01,
    )
    (x, y), _ = data
    x, y = fashion_source.select_classes(x, y, fashion_source.TARGET_CLASSES)
    x = x.astype("float32")
    first, _ = comparison_methods.METHODS["l2"][0](
        task, {"alpha": 0.0}, 3, x, y
    )
    second, _ = comparison_methods.METHODS["l2_sp"][0](
        task, {"alpha": 0.0}, 3, x, y
    )
    for a, b in zip(first.get_weights(), second.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_min_epochs_lengthens_the_schedules_of_larger_training_sets(
    tiny_setting, tmp_path, monkeypatch
):
    """With `min_epochs`, a run on n images takes max(iterations,
    ceil(min_epochs * n / batch_size)) steps, its probe the same with
    probe_iterations: counted on every `fit` of the comparison. Without
    it, results files keep the settings they had."""
    config, _ = tiny_setting
    config = dataclasses.replace(
        config, min_epochs=2.5, methods=[], seeds=[0, 1], cv_seeds=1
    )
    fitted = collections.Counter()
    fit = comparison_methods._fit

    def counted(task, model, x, y, seed, iterations, *args, **kwargs):
        fitted[(len(x), iterations)] += 1
        return fit(task, model, x, y, seed, iterations, *args, **kwargs)

    monkeypatch.setattr(comparison_methods, "_fit", counted)
    out = str(tmp_path / "compare")
    compare.run_compare(config, out, verbose=0)
    # 5 classes: per_class 4 -> 20 images (10 per CV fold's training part),
    # per_class 6 -> 30 (15); batches of 8, at least 3 steps.
    expected = {n: max(3, math.ceil(2.5 * n / 8)) for n in (10, 15, 20, 30)}
    assert expected == {10: 4, 15: 5, 20: 7, 30: 10}
    # probe and l2 (2 seeds each) at both sizes; l2's CV: 2 alphas x 1
    # seed x 2 folds.
    assert fitted == {(20, 7): 4, (30, 10): 4, (10, 4): 4, (15, 5): 4}
    with open(os.path.join(out, "results.json")) as handle:
        assert json.load(handle)["settings"]["min_epochs"] == 2.5
    plain = str(tmp_path / "plain")
    single = {**config.grids, "l2": {"alpha": [1e-4]}}
    compare.run_compare(
        dataclasses.replace(
            config, per_class=[4], seeds=[0], min_epochs=0.0, grids=single
        ),
        plain,
        verbose=0,
    )
    with open(os.path.join(plain, "results.json")) as handle:
        assert "min_epochs" not in json.load(handle)["settings"]


@pytest.mark.parametrize(
    "values,message",
    [
        ({"methods": ["l3"]}, "unknown methods"),
        ({"folds": 40}, "folds"),
        ({"cv_seeds": 11}, "cv_seeds"),
        ({"grids": {"l2": {"alpha": [0.1]}}}, "grids.probe"),
        ({"per_class": []}, "per_class"),
        ({"min_epochs": -1}, "min_epochs=-1"),
    ],
)
def test_bad_config(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(values, compare.CompareConfig)


@pytest.mark.parametrize(
    "method,params",
    [
        ("bss", {"eta": 0.0}),
        ("lwf", {"weight": 0.0}),
        ("co_tuning", {"weight": 0.0}),
        ("delta", {"alpha": 0.0}),
    ],
)
def test_a_feature_term_at_zero_weight_trains_as_plain_fine_tuning(
    tiny_setting, method, params
):
    """The wrapper adds its term and nothing else: at weight 0 the target
    network trains to the weights of L2 fine-tuning at alpha = 0 (same seed,
    same images, same batches)."""
    task, x, y = tiny_task(tiny_setting, iterations=3)
    plain, _ = comparison_methods.METHODS["l2"][0](
        task, {"alpha": 0.0}, 5, x, y
    )
    source = task.source
    source_before = [w.copy() for w in source.get_weights()]
    regularized, _ = comparison_methods.METHODS[method][0](
        task, params, 5, x, y
    )
    for a, b in zip(
        plain.get_weights(), regularized.get_weights(), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The pretrained source model (its classifier included) is untouched.
    for a, b in zip(source_before, source.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_tasks_callbacks_see_every_step_of_every_fit(tiny_setting):
    """`Task.callbacks` go to the `fit` of every run: LP-FT's is one `fit`
    of two epochs (the probe's steps, then the fine-tuning's)."""
    task, x, y = tiny_task(tiny_setting, iterations=4)

    class Steps(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.fits, self.steps = 0, 0

        def on_train_begin(self, logs=None):
            self.fits += 1

        def on_train_batch_end(self, batch, logs=None):
            self.steps += 1

    counter = Steps()
    task = dataclasses.replace(task, callbacks=(counter,))
    comparison_methods.METHODS["l2"][0](task, {"alpha": 0.01}, 0, x, y)
    assert (counter.fits, counter.steps) == (1, 4)
    comparison_methods.METHODS["lp_ft"][0](
        task, {"finetune_learning_rate": 0.001}, 0, x, y
    )
    assert (counter.fits, counter.steps) == (2, 4 + 4 + 4)


def test_wise_ft_interpolates_the_l2_run_of_the_same_seed(tiny_setting):
    """WiSE-FT at t is L2 fine-tuning (same seed) moved back toward w0:
    its kernels' drift is t times L2's, and t = 1 is the L2 run itself."""
    task, x, y = tiny_task(tiny_setting, iterations=3)
    train = comparison_methods.METHODS["wise_ft"][0]
    plain, backbone = comparison_methods.METHODS["l2"][0](
        task, {"alpha": 0.01}, 2, x, y
    )
    full, _ = train(task, {"alpha": 0.01, "t": 1.0}, 2, x, y)
    for a, b in zip(plain.get_weights(), full.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    half, half_backbone = train(task, {"alpha": 0.01, "t": 0.3}, 2, x, y)
    assert compare.backbone_drift(half, half_backbone) == pytest.approx(
        0.3 * compare.backbone_drift(plain, backbone), rel=1e-5
    )


def test_wise_ft_and_delta_share_their_expensive_parts(
    tiny_setting, monkeypatch
):
    """The values of WiSE-FT's t share one fine-tuning (same alpha, seed and
    images); DELTA and DELTA + L2-SP share one channel attention. Another
    seed, other images or another alpha computes them again."""
    task, x, y = tiny_task(tiny_setting, iterations=2)
    task = dataclasses.replace(task, delta_layers=("relu3",))
    counts = collections.Counter()
    fit, attention = comparison_methods._fit, ts.channel_attention

    def counted(name, function):
        def call(*args, **kwargs):
            counts[name] += 1
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(comparison_methods, "_fit", counted("fit", fit))
    monkeypatch.setattr(
        ts, "channel_attention", counted("attention", attention)
    )
    wise_ft = comparison_methods.METHODS["wise_ft"][0]
    for t in (0.5, 0.9, 1.0):
        wise_ft(task, {"alpha": 0.01, "t": t}, 0, x, y)
    assert counts["fit"] == 1
    wise_ft(task, {"alpha": 0.01, "t": 0.5}, 1, x, y)
    wise_ft(task, {"alpha": 0.1, "t": 0.5}, 0, x, y)
    wise_ft(task, {"alpha": 0.01, "t": 0.5}, 0, x[:-5], y[:-5])
    assert counts["fit"] == 4
    counts.clear()
    delta = comparison_methods.METHODS["delta"][0]
    delta_l2_sp = comparison_methods.METHODS["delta_l2_sp"][0]
    delta(task, {"alpha": 0.01}, 0, x, y)
    delta_l2_sp(task, {"alpha": 0.01, "sp_alpha": 0.01}, 0, x, y)
    # One probe for the attention, then the two fine-tunings.
    assert counts == {"attention": 1, "fit": 3}
    delta(task, {"alpha": 0.01}, 1, x, y)
    assert counts == {"attention": 2, "fit": 5}


def test_the_runners_delta_weighs_channels_as_eq_4(tiny_setting, monkeypatch):
    """DELTA's term in the runner, with the attention a of
    `channel_attention` (a softmax: sums to 1 over a layer's C channels),
    is alpha / 2 * mean_batch sum_j C a_j mean_positions (FM_j(w) -
    FM_j(w0))^2 (Eq. 3-4 with the reference code's scale): mean channel
    weight 1, as the uniform default, not C."""
    task, x, y = tiny_task(tiny_setting, iterations=2)
    task = dataclasses.replace(task, delta_layers=("relu3",))
    found = {}
    attention = ts.channel_attention

    def recorded(*args, **kwargs):
        found.update(attention(*args, **kwargs))
        return found

    monkeypatch.setattr(ts, "channel_attention", recorded)
    (term,) = comparison_methods._terms("delta", task, {"alpha": 0.3}, 11, x, y)
    a = found["relu3"]
    np.testing.assert_allclose(np.sum(a), 1.0, rtol=1e-5)
    rng = np.random.default_rng(0)
    shape = (4, 3, 3, a.size)
    current, reference = rng.normal(size=(2,) + shape).astype("float32")
    extras = {"model": {"relu3": current}, "reference": {"relu3": reference}}
    expected = (
        0.3
        / 2
        * np.mean(
            np.sum(
                a.size * a * np.mean((current - reference) ** 2, axis=(1, 2)),
                axis=-1,
            )
        )
    )
    value = float(keras.ops.convert_to_numpy(term.penalty(extras, y)))
    assert value == pytest.approx(expected, rel=1e-5)


def test_the_proximal_methods_put_weights_exactly_at_w0(tiny_setting):
    """Through the runner's wiring (regularize(proximal=True) and the
    Proximal optimizer): at a strong alpha, weights sit exactly at w0 after
    proximal fine-tuning and none do after the subgradient version."""
    task, x, y = tiny_task(tiny_setting, iterations=5)
    found = {}
    for method in ("l1_sp", "l1_sp_proximal"):
        model, _ = comparison_methods.METHODS[method][0](
            task, {"alpha": 1.0}, 0, x, y
        )
        found[method] = keras_sp.at_starting_point(model).weights
        assert keras_sp.weight_drift(model)["distance"] > 0
    assert found["l1_sp"] == 0.0
    assert found["l1_sp_proximal"] > 0.5


def test_a_diverged_run_is_scored_as_chance_and_flagged(
    tiny_setting, tmp_path, monkeypatch
):
    config, _ = tiny_setting
    config.per_class = [4]

    def diverges(*args, **kwargs):
        raise FloatingPointError("loss is nan")

    monkeypatch.setitem(
        comparison_methods.METHODS, "l2_sp", (diverges, ("alpha",))
    )
    summaries = compare.run_compare(config, str(tmp_path), verbose=0)
    row = summaries[4]["l2_sp"]
    assert row["diverged"] == 3
    assert row["accuracy_mean"] == pytest.approx(1 / 5)
    table = (tmp_path / "table.md").read_text()
    assert "(3 diverged, scored as chance)" in table


def test_the_shipped_mobilenet_comparison_is_valid():
    """Its every method has one grid point per hyper-parameter it takes."""
    path = config_path("compare_mobilenet", compare.CompareConfig.COMMAND)
    config = load_config(path, compare.CompareConfig)
    config.validate()
    assert config.setting == "mobilenet"
    assert set(config.compared()) <= set(comparison_methods.METHODS)
