import dataclasses
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from keras_sp import units
from keras_sp.experiments import _transferability_data as transferability_data
from keras_sp.experiments import cli
from keras_sp.experiments import transferability
from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config
from keras_sp.experiments.transferability import KINDS
from keras_sp.experiments.transferability import TransferabilityConfig

TINY = {
    "per_class": 6,
    "test_per_class": 5,
    "conv_filters": [2, 3, 2, 2, 2],
    "fc_units": [4, 4],
    "epochs": 1,
    "batch_size": 8,
    "repeats": 1,
    "transfer_depths": [3],
}


def synthetic_images(classes=4, train=12, test=8, size=28, channels=None):
    """Images whose mean brightness depends on the class."""
    rng = np.random.default_rng(0)
    shape = (size, size) if channels is None else (size, size, channels)

    def draw(count):
        labels = np.repeat(np.arange(classes), count)
        noise = rng.integers(0, 60, (len(labels),) + shape)
        images = (noise + 40 * labels.reshape((-1,) + (1,) * len(shape))).clip(
            0, 255
        )
        return images.astype("uint8"), labels.astype("uint8")

    return draw(train), draw(test)


def test_runner_end_to_end_then_resume_skips_finished_runs(tmp_path):
    data = synthetic_images()
    lines = []
    result = transferability.run(TINY, tmp_path, data=data, log=lines.append)
    config = load_config(TINY, TransferabilityConfig)
    expected = 2 + len(KINDS) * len(config.transfer_depths)
    assert result["trained"] == expected == len(lines)
    runs = result["runs"]
    keys = sorted(run["key"] for run in runs)
    assert keys == sorted(
        ["baseA/repeat0", "baseB/repeat0"]
        + [f"{kind}/n3/repeat0" for kind in KINDS]
    )
    for run in runs:
        assert 0.0 <= run["accuracy"] <= 1.0
        # 10 B test images (2 classes x 5): accuracy is a multiple of 1/10.
        assert run["accuracy"] * 10 == pytest.approx(
            round(run["accuracy"] * 10)
        )
    stored = json.loads((tmp_path / "results.json").read_text())
    assert stored["runs"] == runs
    halves = stored["settings"]["classes_A"] + stored["settings"]["classes_B"]
    assert sorted(halves) == [0, 1, 2, 3]
    table = (tmp_path / "table.md").read_text()
    for run in runs:
        if run["kind"] in KINDS:
            row = next(
                line
                for line in table.splitlines()
                if line.startswith(f"| {run['n']} |")
            )
            cells = [c.strip() for c in row.strip("|").split("|")]
            assert (
                cells[1 + KINDS.index(run["kind"])] == f"{run['accuracy']:.4f}"
            )
    with open(result["figure"], "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"

    before = (tmp_path / "results.json").read_bytes()
    again = transferability.run(TINY, tmp_path, data=data, log=lines.append)
    assert again["trained"] == 0
    assert (tmp_path / "results.json").read_bytes() == before
    assert len(lines) == expected

    # An interruption before the last run was written: only it is trained.
    stored["runs"] = stored["runs"][:-1]
    (tmp_path / "results.json").write_text(json.dumps(stored))
    resumed = transferability.run(TINY, tmp_path, data=data, log=lines.append)
    assert resumed["trained"] == 1
    assert lines[-1].startswith("AnB+/n3/repeat0")


def test_transfer_networks_copy_the_right_base_units(tmp_path):
    """AnB's first n units equal base A's (frozen), the rest differ."""
    config = load_config(TINY, TransferabilityConfig)
    base = transferability.build_network(config, 2, name="base")
    target = transferability.build_network(config, 2, name="target")
    units.copy_units(base, target, 3, freeze=True)
    for index, (a, b) in enumerate(
        zip(units.depth_units(base), units.depth_units(target), strict=True)
    ):
        same = all(
            np.array_equal(x.numpy(), y.numpy())
            for la, lb in zip(a, b, strict=True)
            for x, y in zip(la.weights, lb.weights, strict=True)
        )
        assert same is (index < 3)
        assert all(layer.trainable is (index >= 3) for layer in b)
    assert len(units.depth_units(target)) == config.depth == 8


# Keras warns at the end of the first epoch over any dataset of unknown
# length, which a tfds split filtered to half of the classes is.
@pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning")
def test_imagenet_config_takes_the_same_code_path_at_tiny_size(tmp_path):
    path = transferability.default_config_path("imagenet")
    config = load_config(path, TransferabilityConfig)
    assert config.dataset == "tfds:imagenet2012"
    assert config.conv_filters == [96, 256, 384, 384, 256]
    assert config.fc_units == [4096, 4096] and config.depth == 8
    tiny = dataclasses.replace(
        config,
        image_size=20,
        conv_filters=[2, 2, 2, 2, 2],
        fc_units=[3, 3],
        epochs=1,
        batch_size=4,
        transfer_depths=[5],
        jit_compile=False,
    )
    # tensorflow-datasets' mock: random examples with ImageNet's features,
    # read through the real tfds.load pipeline, nothing downloaded.
    with tfds.testing.mock_data(num_examples=24):
        result = transferability.run(tiny, tmp_path, log=lambda s: None)
        data = transferability.TaskData(tiny, None)
        images, labels = next(iter(data.task("B", training=False)))
    assert result["trained"] == 2 + len(KINDS)
    assert all(0.0 <= run["accuracy"] <= 1.0 for run in result["runs"])
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    halves = settings["classes_A"] + settings["classes_B"]
    assert len(settings["classes_A"]) == 500
    assert sorted(halves) == list(range(1000))
    assert tuple(images.shape[1:]) == (20, 20, 3)
    assert images.dtype == "float32"
    assert 0 <= int(np.min(labels)) and int(np.max(labels)) < 500


def test_shipped_default_config_is_the_default():
    path = transferability.default_config_path()
    assert load_config(path, TransferabilityConfig) == TransferabilityConfig()
    assert load_config(None, TransferabilityConfig).depth == 8


def test_unknown_config_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'layers'"):
        transferability.run(dict(TINY, layers=8), tmp_path)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [
        ("transfer_depths", [0]),
        ("transfer_depths", [8]),
        ("conv_kernels", [3, 3]),
        ("pool_after", [6]),
        ("dataset", "mnist"),
        ("optimizer", "rmsprop"),
        ("per_class", 0),
        ("dropout", 1.0),
    ],
)
def test_invalid_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=f"'{key}'.*Received: {key}="):
        load_config({key: value}, TransferabilityConfig)


def test_command_line_bad_config_exits_with_one_line_error(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        cli, "EXPERIMENT_MODULES", ("keras_sp.experiments.transferability",)
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 1, "epoch": 2}))
    code = cli.main(
        ["transferability", "--config", str(config), "--out", str(tmp_path)]
    )
    error = capsys.readouterr().err
    assert code != 0
    assert error.count("\n") == 1
    assert error.startswith("keras-sp transferability: error: Unknown config")
    assert "Received: epoch=2" in error


def test_command_line_runs_the_experiment_on_tiny_data(
    tmp_path, monkeypatch, capsys
):
    data = synthetic_images(classes=10)
    monkeypatch.setattr(
        transferability_data,
        "load_fashion_mnist",
        lambda *args, **kwargs: data,
    )
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    out = tmp_path / "out"
    argv = ["transferability", "--config", str(path), "--out", str(out)]
    assert cli.main(argv) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["table"] == str(out / "table.md")
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted(run["key"] for run in runs) == sorted(
        ["baseA/repeat0", "baseB/repeat0"]
        + [f"{kind}/n3/repeat0" for kind in KINDS]
    )
    table = (out / "table.md").read_text()
    base_b = next(r for r in runs if r["key"] == "baseB/repeat0")
    assert f"| 0 (base B) | {base_b['accuracy']:.4f}" in table
