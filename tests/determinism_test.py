"""The same seed gives the same numbers twice on CPU, bit for bit.

Covers `keras_sp.regularize` + `model.fit` for every kind of penalty,
`keras_sp.fisher.diagonal_fisher` in every mode, and each `keras-sp`
runner (demo, finetune, grow, transferability, fisher) run twice on tiny
data into separate output folders. Each check has a control that changes
the seed and must change the numbers, so that equality is not vacuous.
"""

import json

import keras
import numpy as np
import pytest
from demo_test import tiny_fashion as demo_fashion
from finetune_test import tiny_fashion as finetune_fashion
from grow_experiment_test import _write_idx
from transferability_test import TINY as TRANSFERABILITY_TINY
from transferability_test import synthetic_images

import keras_sp
from keras_sp import datasets
from keras_sp import fisher
from keras_sp.experiments import cli
from keras_sp.experiments import demo
from keras_sp.experiments import fashion_source
from keras_sp.experiments import finetune
from keras_sp.experiments import grow
from keras_sp.experiments import transferability
from keras_sp.experiments.config import load_config

# Record fields that measure time, not results.
TIMINGS = ("seconds",)


def without_timings(value):
    """`value` (parsed JSON) with every timing field removed."""
    if isinstance(value, dict):
        return {
            key: without_timings(item)
            for key, item in value.items()
            if key not in TIMINGS
        }
    if isinstance(value, list):
        return [without_timings(item) for item in value]
    return value


def numbers(value):
    """Every float in `value` (parsed JSON), in order."""
    if isinstance(value, dict):
        return [n for key in sorted(value) for n in numbers(value[key])]
    if isinstance(value, list):
        return [n for item in value for n in numbers(item)]
    return [value] if isinstance(value, float) else []


def assert_same_results(first, second):
    """Two results.json files hold the same runs, numbers bit-identical
    (JSON writes floats with `repr`, which round-trips exactly)."""
    one = without_timings(json.loads(first.read_text()))
    two = without_timings(json.loads(second.read_text()))
    assert numbers(one), "no numbers to compare"
    assert one == two


# (1) regularize + fit, every kind.


def train(kind, seed):
    """A small classifier with dropout, regularized with `kind`, fit for 2
    shuffled epochs; returns its weights."""
    keras.utils.set_random_seed(seed)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="relu", name="shared"),
            keras.layers.Dropout(0.3),
            keras.layers.Dense(3, name="head"),
        ]
    )
    weights = None
    if kind in ("l2_sp_fisher", "group_lasso_sp_fisher"):
        weights = {
            v.path: np.linspace(0.5, 2.0, int(np.prod(v.shape)))
            .reshape(v.shape)
            .astype("float32")
            for v in model.trainable_variables
        }
    keras_sp.regularize(
        model, kind, alpha=0.1, beta=0.01, new_layers=["head"], fisher=weights
    )
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype("float32")
    y = rng.integers(0, 3, 40)
    start = [np.array(w) for w in model.get_weights()]
    model.fit(x, y, batch_size=8, epochs=2, shuffle=True, verbose=0)
    final = model.get_weights()
    assert any(
        not np.array_equal(a, b) for a, b in zip(start, final, strict=True)
    )
    return final


@pytest.mark.parametrize("kind", keras_sp.penalties.KINDS)
def test_regularize_and_fit_twice_with_one_seed(kind):
    for a, b in zip(train(kind, 0), train(kind, 0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_another_seed_gives_other_weights():
    """The control: the seed reaches the initialization, dropout and the
    shuffling, so the equality above is not vacuous."""
    first, other = train("l2_sp", 0), train("l2_sp", 1)
    assert any(
        not np.array_equal(a, b) for a, b in zip(first, other, strict=True)
    )


# (2) diagonal_fisher, every mode.


@pytest.fixture(scope="module")
def source():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 5)).astype("float32")
    y = rng.integers(0, 4, 12)
    return model, x, y


def assert_same_fisher(one, two):
    assert list(one) == list(two)
    for key in one:
        np.testing.assert_array_equal(one[key], two[key])


def differs(one, two):
    return any(not np.array_equal(one[key], two[key]) for key in one)


@pytest.mark.parametrize(
    "mode, options",
    [
        ("exact", {}),
        ("empirical", {}),
        ("sampled", {"seed": 3, "samples": 2}),
    ],
)
def test_diagonal_fisher_twice(source, mode, options):
    model, x, y = source

    def compute(**extra):
        return fisher.diagonal_fisher(
            model, (x, y), mode=mode, batch_size=5, **{**options, **extra}
        )

    first = compute()
    assert_same_fisher(first, compute())
    assert all(np.all(value > 0) for value in first.values())
    if mode == "sampled":
        assert differs(first, compute(seed=4))


def test_sampled_fisher_without_a_seed_follows_the_global_seed(source):
    """seed=None draws from NumPy's global generator, which
    `keras.utils.set_random_seed` seeds."""
    model, x, _ = source
    results = []
    for seed in (7, 7, 8):
        keras.utils.set_random_seed(seed)
        results.append(fisher.diagonal_fisher(model, x, mode="sampled"))
    assert_same_fisher(results[0], results[1])
    assert differs(results[0], results[2])


# (3) The runners, each twice into separate folders.


def test_demo_twice(tmp_path, monkeypatch):
    data = demo_fashion()
    monkeypatch.setattr(demo, "load_fashion_mnist", lambda: data)

    def source(**kwargs):
        # A fresh source network each run, as the cache would give.
        keras.utils.set_random_seed(0)
        model = fashion_source.build_small_cnn(
            5, width=4, fc_units=None, head_name="source_head"
        )
        return model, 0.5

    monkeypatch.setattr(fashion_source, "pretrained_source_model", source)
    config = load_config(
        {
            "seeds": [0],
            "per_class": 6,
            "validation_per_class": 2,
            "alpha_grid": {"l2": [1e-4], "l2_sp": [0.01]},
            "iterations": 3,
            "batch_size": 8,
        },
        demo.DemoConfig,
    )
    for name in ("one", "two"):
        demo.run_demo(config, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_finetune_twice(tmp_path, monkeypatch):
    data = finetune_fashion()
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda: data)
    keras.utils.set_random_seed(0)
    fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    ).save(tmp_path / "source.keras")
    values = {
        "backbone": str(tmp_path / "source.keras"),
        "input_size": 28,
        "image_size": 28,
        "preprocessing": "none",
        "target": "fashion_mnist",
        "per_class": [6],
        "target_classes": [5, 6, 7, 8, 9],
        "test_per_class": 4,
        "validation_fraction": 0.34,
        "source": "fashion_mnist",
        "source_classes": [0, 1, 2, 3, 4],
        "source_examples": 20,
        "kinds": ["l2", "l2_sp_fisher"],
        "alpha_grid": {"l2": [1e-4], "l2_sp_fisher": [1.0]},
        "learning_rate_grid": [0.01],
        "iterations": 3,
        "lr_drop_at": 2,
        "batch_size": 8,
        "repeats": 1,
        "fisher_data": "source",
        "fisher_examples": 10,
        "freeze_units": [],
        "freeze_kinds": [],
        "r2_kinds": ["l2"],
        "r2_examples": 10,
    }
    config = load_config(values, finetune.FinetuneConfig)
    for name in ("one", "two"):
        finetune.run_finetune(config, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_grow_twice(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, per_class in (("train", 8), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        images += 19 * labels[:, None, None]
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("KERAS_SP_FASHION_MNIST", str(folder))
    tiny = {
        "methods": ["wa_cnn", "da_cnn"],
        "seeds": [0],
        "per_class": [2],
        "test_per_class": 3,
        "units": 4,
        "steps": 2,
        "batch_size": 5,
        "source_epochs": 1,
    }
    for name in ("one", "two"):
        # A cache per run: each trains its own source network.
        monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path / f"cache_{name}"))
        grow.run_grow(tiny, str(tmp_path / name), verbose=0)
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


def test_transferability_twice(tmp_path):
    data = synthetic_images()
    for name in ("one", "two"):
        transferability.run(
            TRANSFERABILITY_TINY, tmp_path / name, data=data, log=lambda _: None
        )
    assert_same_results(
        tmp_path / "one" / "results.json", tmp_path / "two" / "results.json"
    )


@pytest.mark.parametrize("mode", ["exact", "sampled"])
def test_fisher_command_twice(tmp_path, monkeypatch, mode):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="relu", name="hidden"),
            keras.layers.Dense(4, activation="softmax", name="head"),
        ]
    )
    model.save(tmp_path / "source.keras")
    np.savez(
        tmp_path / "source.npz",
        x=np.random.default_rng(0).normal(size=(9, 5)).astype("float32"),
    )
    monkeypatch.setattr(
        cli, "EXPERIMENT_MODULES", ("keras_sp.experiments.fisher",)
    )
    written = []
    for name in ("one", "two"):
        argv = [
            "fisher",
            "--model",
            str(tmp_path / "source.keras"),
            "--data",
            str(tmp_path / "source.npz"),
            "--mode",
            mode,
            "--quiet",
            "--out",
            str(tmp_path / name),
        ]
        assert cli.main(argv) == 0
        written.append(fisher.load(tmp_path / name / "fisher.npz"))
        summary = json.loads((tmp_path / name / "fisher.json").read_text())
        assert summary["examples"] == 9
    assert_same_fisher(*written)
