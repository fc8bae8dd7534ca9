"""The `keras-sp grow` comparison end to end, on a tiny fake Fashion-MNIST."""

import gzip
import json
import os
import re

import numpy as np
import pytest

from keras_sp.experiments import cli
from keras_sp.experiments import growing_a_brain as grow
from keras_sp.experiments.config import ConfigError

_RUN_ONE = grow._run_one
TINY = {
    "seeds": [0, 1],
    "per_class": [2],
    "test_per_class": 3,
    "channels": 4,
    "steps": 2,
    "batch_size": 5,
    "source_epochs": 1,
}


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(
        int(size).to_bytes(4, "big") for size in array.shape
    )
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_fashion(tmp_path, monkeypatch):
    """Fashion-MNIST-shaped IDX files (8 train, 4 test images per class) and
    a private cache for the source network."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "fashion"
    folder.mkdir()
    for split, per_class in (("train", 8), ("t10k", 4)):
        labels = np.repeat(np.arange(10), per_class)
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        images += 19 * labels[:, None, None]  # a class-dependent brightness
        _write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        _write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    monkeypatch.setenv("KERAS_SP_FASHION_MNIST", str(folder))
    monkeypatch.setenv("KERAS_SP_CACHE", str(tmp_path / "cache"))
    return tmp_path


def _table_rows(table):
    rows = {}
    for line in table.splitlines():
        match = re.match(
            r"\| (\w+) \| ([0-9.]+) ± ([0-9.]+) \| (\S+)(?: ± (\S+))? \| "
            r"(\d+) \| ([\d,]+) \|",
            line,
        )
        if match:
            rows[match.group(1)] = match.groups()[1:]
    return rows


def test_runs_every_method_on_the_same_data_and_resumes(
    tiny_fashion, monkeypatch
):
    out = str(tiny_fashion / "out")
    table = grow.run_grow(TINY, out, verbose=0)
    with open(os.path.join(out, "results.json")) as handle:
        runs = json.load(handle)["runs"]
    assert sorted(run["key"] for run in runs) == sorted(
        f"{method}/per_class=2/seed={seed}"
        for method in ("fine_tuning", "wa_cnn_ori", "wa_cnn", "da_cnn")
        for seed in (0, 1)
    )
    for seed in (0, 1):
        drawn = {run["training_images"] for run in runs if run["seed"] == seed}
        assert len(drawn) == 1  # the same images for every method
    assert len({run["training_images"] for run in runs}) == 2

    # Parameters: the small CNN (fc: 64 -> 128) with a 5-class head, then
    # 4 new fc channels (+ their head rows, + gamma per channel) or a new
    # 128 -> 4 layer (+ gamma) feeding a 4 -> 5 head.
    params = {run["method"]: run["trainable_parameters"] for run in runs}
    base = params["fine_tuning"]
    assert params["wa_cnn_ori"] == base + (64 * 4 + 4) + 4 * 5
    assert params["wa_cnn"] == params["wa_cnn_ori"] + 128 + 4
    assert params["da_cnn"] == base + (128 * 4 + 4) + 4 - 124 * 5

    rows = _table_rows(table)
    assert list(rows) == ["fine_tuning", "wa_cnn_ori", "wa_cnn", "da_cnn"]
    for method, row in rows.items():
        scores = [r["test_accuracy"] for r in runs if r["method"] == method]
        assert float(row[0]) == pytest.approx(np.mean(scores), abs=5e-5)
        assert float(row[1]) == pytest.approx(np.std(scores, ddof=1), abs=5e-5)
        assert row[4] == "2" and int(row[5].replace(",", "")) == params[method]
    wa = {
        r["seed"]: r["test_accuracy"] for r in runs if r["method"] == "wa_cnn"
    }
    ft = {
        r["seed"]: r["test_accuracy"]
        for r in runs
        if r["method"] == "fine_tuning"
    }
    assert float(rows["wa_cnn"][2]) == pytest.approx(
        np.mean([wa[s] - ft[s] for s in (0, 1)]), abs=5e-5
    )
    with open(os.path.join(out, "results.md")) as handle:
        assert handle.read() == table

    # A second invocation trains nothing.
    def must_not_run(*args):
        raise AssertionError(f"run_one called again with {args[2:]}")

    monkeypatch.setattr(grow, "_run_one", must_not_run)
    assert grow.run_grow(TINY, out, verbose=0) == table

    # An interrupted run and new seeds are the only runs made.
    with open(os.path.join(out, "results.json")) as handle:
        data = json.load(handle)
    interrupted = "wa_cnn/per_class=2/seed=1"
    data["runs"] = [r for r in data["runs"] if r["key"] != interrupted]
    with open(os.path.join(out, "results.json"), "w") as handle:
        json.dump(data, handle)
    made = []

    def counting(source, data, method, per_class, seed, config):
        made.append((method, seed))
        return _RUN_ONE(source, data, method, per_class, seed, config)

    monkeypatch.setattr(grow, "_run_one", counting)
    extended = dict(TINY, seeds=[0, 1, 2], methods=["wa_cnn"])
    table = grow.run_grow(extended, out, verbose=0)
    assert sorted(made) == [("wa_cnn", 1), ("wa_cnn", 2)]
    assert list(_table_rows(table)) == ["wa_cnn"]
    assert _table_rows(table)["wa_cnn"][4] == "3"


def test_bad_config_keys_and_values_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="Unknown config key 'unit'"):
        grow.run_grow({"unit": 3}, str(tmp_path), verbose=0)
    with pytest.raises(ConfigError, match="'methods'.*Received: methods="):
        grow.run_grow({"methods": ["wa_cnn", "dropout"]}, str(tmp_path))
    with pytest.raises(ConfigError, match="Received: per_class=\\[0\\]"):
        grow.run_grow({"per_class": [0]}, str(tmp_path))
    assert not os.path.exists(tmp_path / "results.json")


def test_cli_bad_config_exits_with_a_one_line_error(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(
        cli, "EXPERIMENT_MODULES", ("keras_sp.experiments.growing_a_brain",)
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"channels": 0}))
    code = cli.main(
        ["grow", "--config", str(config), "--out", str(tmp_path / "out")]
    )
    error = capsys.readouterr().err
    assert code == 2
    assert error.count("\n") == 1
    assert error.startswith("keras-sp grow: error: Config key 'channels'")
    assert "Received: channels=0" in error
    assert not os.path.exists(tmp_path / "out")


def test_command_line_runs_the_comparison_on_tiny_data(tiny_fashion, capsys):
    path = tiny_fashion / "grow.json"
    path.write_text(json.dumps(TINY))
    out = tiny_fashion / "cli"
    assert cli.main(["grow", "--config", str(path), "--out", str(out)]) == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 4 * len(TINY["seeds"])
    table = (out / "results.md").read_text()
    assert table in capsys.readouterr().out
    for method, row in _table_rows(table).items():
        scores = [r["test_accuracy"] for r in runs if r["method"] == method]
        assert float(row[0]) == pytest.approx(np.mean(scores), abs=5e-5)
