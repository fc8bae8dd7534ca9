"""The fine-tuning experiment runner: protocol, tables, resume, bad input."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from keras_sp.experiments import cli
from keras_sp.experiments import data as datasets
from keras_sp.experiments import fashion_source
from keras_sp.experiments import finetune
from keras_sp.experiments import measures
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.finetune import _runs
from keras_sp.experiments.finetune import _targets


def tiny_fashion(per_class_train=10, per_class_test=6):
    rng = np.random.default_rng(0)

    def split(per_class):
        labels = np.repeat(np.arange(10), per_class).astype("uint8")
        order = rng.permutation(len(labels))
        labels = labels[order]
        # Class-dependent brightness makes the classes learnable.
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        images = images + 19 * labels[:, None, None]
        return images.astype("uint8"), labels

    return split(per_class_train), split(per_class_test)


@pytest.fixture
def small_experiment(tmp_path, monkeypatch):
    """A source CNN saved as a .keras file, synthetic Fashion-MNIST."""
    data = tiny_fashion()
    monkeypatch.setattr(datasets, "load_fashion_mnist", lambda: data)
    source = fashion_source.build_small_cnn(
        5, width=4, fc_units=None, head_name="source_head"
    )
    path = str(tmp_path / "source.keras")
    source.save(path)
    values = {
        "backbone": path,
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
        "kinds": ["l2", "l2_sp", "l2_sp_fisher"],
        "alpha_grid": {
            "l2": [1e-4],
            "l2_sp": [0.01, 1.0],
            "l2_sp_fisher": [1.0],
        },
        "beta_grid": {"l2_sp": [0.001, 0.1]},
        "learning_rate_grid": [0.01, 0.05],
        "iterations": 3,
        "lr_drop_at": 2,
        "warmup_iterations": 1,
        "batch_size": 8,
        "repeats": 2,
        "fisher_data": "source",
        "fisher_examples": 10,
        "fisher_scale": "mean",
        "freeze_units": [0, 1],
        "freeze_repeats": 1,
        "r2_kinds": ["l2", "l2_sp"],
        "r2_examples": 10,
    }
    return load_config(values, finetune.FinetuneConfig), source, data


def by_phase(runs, phase):
    return [run for run in runs if run["phase"] == phase]


def test_small_experiment_protocol_report_and_resume(
    small_experiment, tmp_path, monkeypatch
):
    config, source, data = small_experiment
    out = str(tmp_path / "out")
    report = finetune.run_finetune(config, out, verbose=0, run_eagerly=True)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    validation = by_phase(runs, "validation")
    test = by_phase(runs, "test")
    frozen = by_phase(runs, "freeze")
    # 2 learning rates (L2 at its first alpha), then L2-SP's 2 x 2 grid.
    assert len(validation) == 2 + 4
    assert len(test) == 3 * 2 and len(frozen) == 2
    # The first unit (weights and BatchNormalization statistics) stays put.
    assert all(r["frozen_distance"] == 0.0 for r in frozen)
    assert all(r["drift"] > 0 for r in frozen)

    # The learning rate, then alpha and beta: best validation accuracy, then
    # lowest validation cross-entropy.
    def score(run):
        return (run["validation_accuracy"], -run["validation_loss"])

    lr_runs = [r for r in validation if r["kind"] == "l2"]
    rate = max(lr_runs, key=score)["learning_rate"]
    grid = [r for r in validation if r["kind"] == "l2_sp"]
    assert {r["learning_rate"] for r in grid} == {rate}
    best = max(grid, key=score)
    chosen = next(r for r in test if r["kind"] == "l2_sp")
    assert (chosen["alpha"], chosen["beta"]) == (best["alpha"], best["beta"])
    assert all(r["learning_rate"] == rate for r in test + frozen)
    # Matched seeds across kinds.
    assert sorted({r["seed"] for r in test}) == [0, 1]

    # Table 2: mean ± std of the recorded runs; per-image predictions kept.
    table = report["table2.md"]
    for kind, name in (("l2", "L2"), ("l2_sp", "L2-SP")):
        accuracies = np.array(
            [r["accuracy"] for r in test if r["kind"] == kind]
        )
        cell = f"{100 * accuracies.mean():.1f} ± {100 * accuracies.std():.1f}"
        assert f"| {name} | {cell} |" in table
    for run in test:
        correct = _runs.unpack(run["correct"])
        assert len(correct) == 5 * 4
        assert correct.mean() == pytest.approx(run["accuracy"])
        assert run["drift"] > 0
    # The paired test: worst -SP run against the best L2 run.
    best_l2 = max(
        (r for r in test if r["kind"] == "l2"), key=lambda r: r["accuracy"]
    )
    for comparison in report["comparisons"]:
        worst = min(
            (r for r in test if r["kind"] == comparison["kind"]),
            key=lambda r: r["accuracy"],
        )
        expected = measures.mcnemar_test(
            _runs.unpack(worst["correct"]),
            _runs.unpack(best_l2["correct"]),
        )
        assert {k: comparison[k] for k in expected} == expected
    assert {c["kind"] for c in report["comparisons"]} == {
        "l2_sp",
        "l2_sp_fisher",
    }

    # Table 3: the pretrained source accuracy is the source model's.
    (_, _), (x_test, y_test) = data
    x_source, y_source = fashion_source.select_classes(
        x_test, y_test, fashion_source.SOURCE_CLASSES
    )
    scores = source.predict(x_source[:20].astype("float32"), verbose=0)
    expected = np.mean(np.argmax(scores, axis=-1) == y_source[:20])
    for run in test:
        for batchnorm in ("as_trained", "reestimated"):
            part = run[f"source_{batchnorm}"]
            assert part["pretrained"] == pytest.approx(expected)
            assert part["drop"] == pytest.approx(
                part["fine_tuned"] - part["pretrained"]
            )
    assert "table3.md" in report

    # Figure 4: one R² per feature of each depth unit's activation.
    for run in test:
        if run["kind"] in config.r2_kinds:
            assert run["r2_layers"] == ["relu1", "relu2", "relu3"]
            assert [len(values) for values in run["r2"]] == [4, 8, 16]
        else:
            assert "r2" not in run
    # The Fisher information of the source model, saved once.
    fisher_files = [f for f in os.listdir(out) if f.startswith("fisher_")]
    assert len(fisher_files) == 1
    for name in (
        "table2.md",
        "table3.md",
        "figure1_fashion_mnist_6_l2_sp.png",
        "figure1_fashion_mnist_6_l2_sp.md",
        "figure3_fashion_mnist_6.png",
        "figure4_fashion_mnist_6.png",
    ):
        assert os.path.exists(os.path.join(out, name)), name

    # A rerun finds every run done and trains nothing.
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(_runs.Runner, "train", no_training)
    again = finetune.run_finetune(config, out, verbose=0, run_eagerly=True)
    assert again["table2.md"] == table


def test_validation_split_holds_out_part_of_each_class():
    labels = np.repeat(np.arange(4), [5, 10, 6, 3])
    train, held_out = _targets.validation_split(labels, 0.2, seed=0)
    assert not set(train) & set(held_out)
    assert sorted(np.concatenate([train, held_out])) == list(range(24))
    assert np.bincount(labels[held_out]).tolist() == [1, 2, 1, 1]
    with pytest.raises(ConfigError, match="validation_fraction"):
        _targets.validation_split(np.array([0, 1]), 0.5, seed=0)


def synthetic_images(classes, per_class, seed):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class).astype("int32")
    images = rng.integers(0, 255, size=(len(labels), 40, 36, 3), dtype=np.uint8)
    return tf.data.Dataset.from_tensor_slices((images, labels))


def fake_loader(classes):
    def load(*args, **kwargs):
        return datasets.ImageData(
            train=synthetic_images(classes, 3, 0),
            test=synthetic_images(classes, 1, 1),
            class_names=tuple(f"class{i}" for i in range(classes)),
        )

    return load


# Each full-size config once, at tiny size, one kind per config (together
# they cover L2, L2-SP and the Fisher information on source data); the
# validation grids and the freezing sweep run in the small experiment above.
DRY_RUNS = {
    "stanford_dogs": "l2",
    "caltech256_30": "l2_sp_fisher",
    "caltech256_60": "l2_sp",
    "mit_indoor67": "l2",
}


@pytest.mark.parametrize("name", sorted(DRY_RUNS))
def test_full_size_config_dry_run(name, tmp_path, monkeypatch):
    with open(finetune.config_path(name)) as handle:
        values = json.load(handle)
    assert values["backbone"] == "ResNet101"
    assert values["iterations"] == 9000 and values["lr_drop_at"] == 6000
    assert values["batch_size"] == 64 and values["repeats"] == 5
    assert values["momentum"] == 0.9 and values["beta"] == 0.01
    kinds = [DRY_RUNS[name]]
    assert set(kinds) <= set(values["kinds"])
    for loader in (
        "load_caltech256",
        "load_mit_indoor67",
        "load_stanford_dogs",
    ):
        monkeypatch.setattr(datasets, loader, fake_loader(3))
    for loader in ("load_imagenet", "load_places365"):
        monkeypatch.setattr(datasets, loader, fake_loader(4))
    values.update(
        weights=None,
        source_num_classes=4,
        input_size=32,
        iterations=2,
        lr_drop_at=1,
        batch_size=4,
        repeats=1,
        alpha_grid={kind: values["alpha_grid"][kind][:1] for kind in kinds},
        beta_grid={},
        # Random ResNet-101 weights and BatchNormalization over 4 values
        # per channel at the last blocks: a small rate keeps 2 steps finite.
        learning_rate_grid=[0.001],
        learning_rate_kind=kinds[0],
        source_examples=4,
        source_batchnorm=["as_trained"],
        fisher_examples=2,
        r2_examples=2,
        kinds=kinds,
        r2_kinds=kinds,
        freeze_kinds=kinds,
        freeze_units=[],
    )
    if "target_dir" in values and values["target"] != "stanford_dogs":
        values["target_dir"] = str(tmp_path)
    config = load_config(values, finetune.FinetuneConfig)
    out = str(tmp_path / "out")
    report = finetune.run_finetune(config, out, verbose=0, run_eagerly=True)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    test = by_phase(runs, "test")
    assert [r["kind"] for r in test] == kinds
    # ResNet-101: the stem and 33 blocks; source data give Table 3.
    assert len(test[0]["r2"]) == 34
    assert test[0]["r2_layers"][-1] == "conv5_block3_out"
    assert np.isfinite(test[0]["drift"]) and test[0]["drift"] > 0
    assert len(_runs.unpack(test[0]["correct"])) == 3
    assert "table3.md" in report


@pytest.mark.parametrize(
    "values,message",
    [
        ({"kindz": ["l2"]}, "Unknown config key 'kindz'"),
        ({"iterations": "9000"}, "Config key 'iterations' must be int"),
        ({"kinds": ["l3"]}, r"kinds\[0\]"),
        ({"alpha_grid": {"l2": [0.1]}}, "alpha_grid' has no values for kind"),
        ({"alpha_grid": {"l2": [-1.0], "l2_sp": [0.1]}}, "alpha_grid.l2"),
        ({"per_class": [None]}, r"per_class\[0\]"),
        ({"target": "cifar"}, "Config key 'target'"),
        ({"freeze_kinds": ["l1_sp"]}, "freeze_kinds"),
        ({"backbone": "ResNet1O1"}, "Config key 'backbone'"),
    ],
)
def test_bad_config_names_the_key(values, message):
    base = {
        "target": "caltech256",
        "target_dir": "data",
        "kinds": ["l2", "l2_sp"],
        "alpha_grid": {"l2": [1e-4], "l2_sp": [0.1]},
    }
    base.update(values)
    with pytest.raises(ConfigError, match=message):
        load_config(base, finetune.FinetuneConfig)


def test_weights_file_that_does_not_fit_the_backbone(tmp_path):
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    path = str(tmp_path / "other.weights.h5")
    other.save_weights(path)
    config = load_config(
        {
            "backbone": "MobileNet",
            "weights": path,
            "input_size": 32,
            "target": "fashion_mnist",
            "preprocessing": "mobilenet",
            "kinds": ["l2"],
            "alpha_grid": {"l2": [1e-4]},
            "r2_kinds": [],
            "freeze_kinds": [],
        },
        finetune.FinetuneConfig,
    )
    with pytest.raises(ConfigError, match="Config key 'weights'"):
        finetune.run_finetune(config, str(tmp_path / "out"), verbose=0)


def test_command_line_bad_input_is_one_line(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"target": "caltech256", "batch_size": 0}))
    code = cli.main(
        ["finetune", "--config", str(config), "--out", str(tmp_path)]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert error.startswith("keras-sp finetune: error: Config key 'batch_size'")


def test_choices_of_one_data_set_serve_the_others_with_select_on():
    values = {
        "target": "fashion_mnist",
        "preprocessing": "mobilenet",
        "per_class": [30, 60],
        "kinds": ["l2", "l2_sp"],
        "alpha_grid": {"l2": [1e-4], "l2_sp": [0.01, 0.1]},
        "learning_rate_grid": [0.003, 0.01],
    }

    def run(per_class, kind, alpha, rate, accuracy):
        return {
            "dataset": f"fashion_mnist_{per_class}",
            "phase": "validation",
            "kind": kind,
            "alpha": alpha,
            "beta": 0.01,
            "learning_rate": rate,
            "seed": 100,
            "validation_accuracy": accuracy,
        }

    runs = [
        run(30, "l2", 1e-4, 0.003, 0.6),
        run(30, "l2", 1e-4, 0.01, 0.7),
        run(30, "l2_sp", 0.01, 0.01, 0.65),
        run(30, "l2_sp", 0.1, 0.01, 0.8),
        # Runs at the rate not chosen never count.
        run(30, "l2_sp", 0.01, 0.003, 0.9),
    ]
    config = load_config(dict(values, select_on=30), finetune.FinetuneConfig)
    for slug in ("fashion_mnist_30", "fashion_mnist_60"):
        assert finetune.chosen_learning_rate(config, runs, slug) == 0.01
        assert finetune.chosen_point(config, runs, slug, "l2_sp") == (
            0.1,
            0.01,
            0.01,
        )
    # Without select_on, each data set needs its own validation runs.
    config = load_config(values, finetune.FinetuneConfig)
    assert finetune.chosen_point(config, runs, "fashion_mnist_60", "l2") is None
    with pytest.raises(ConfigError, match="select_on"):
        load_config(dict(values, select_on=60), finetune.FinetuneConfig)


def test_command_line_runs_a_tiny_experiment_then_reports_only(
    small_experiment, tmp_path
):
    config, _, _ = small_experiment
    values = dataclasses.asdict(config)
    values.update(
        kinds=["l2", "l2_sp"],
        alpha_grid={"l2": [1e-4], "l2_sp": [0.01]},
        beta_grid={},
        learning_rate_grid=[0.01],
        repeats=1,
        freeze_units=[],
        freeze_kinds=[],
        r2_kinds=["l2"],
        source_batchnorm=["as_trained"],
    )
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(values))
    out = tmp_path / "out"
    argv = ["finetune", "--config", str(path), "--out", str(out)]
    assert cli.main(argv) == 0
    with open(out / "results.json") as handle:
        runs = json.load(handle)["runs"]
    test = by_phase(runs, "test")
    assert sorted(r["kind"] for r in test) == ["l2", "l2_sp"]
    table = (out / "table2.md").read_text()
    for run in test:
        name = {"l2": "L2", "l2_sp": "L2-SP"}[run["kind"]]
        assert f"| {name} | {100 * run['accuracy']:.1f} ± 0.0 |" in table
    # --report-only redraws the tables from results.json, training nothing.
    (out / "table2.md").unlink()
    assert cli.main([*argv, "--report-only"]) == 0
    assert (out / "table2.md").read_text() == table
    with open(out / "results.json") as handle:
        assert len(json.load(handle)["runs"]) == len(runs)
    # --report-only on a folder without results is a one-line error.
    empty = ["finetune", "--config", str(path), "--out", str(tmp_path / "e")]
    assert cli.main([*empty, "--report-only"]) == 2
