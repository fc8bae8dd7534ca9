import dataclasses
import json

import pytest

from keras_sp.experiments.config import ConfigError
from keras_sp.experiments.config import load_config


@dataclasses.dataclass
class Schema:
    name: str
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    alpha: float = 0.1
    repeats: int = 3
    weights: str | None = None
    grid: dict[str, list[float]] = dataclasses.field(default_factory=dict)


def test_loads_a_file_with_defaults_and_overrides(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"name": "x", "alpha": 1, "grid": {"a": [1]}}))
    config = load_config(path, Schema, repeats=5)
    assert config == Schema(name="x", alpha=1.0, repeats=5, grid={"a": [1.0]})
    assert isinstance(config.alpha, float)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"name": "x", "alpah": 0.1}, "Unknown config key 'alpah'"),
        ({"name": "x", "repeats": 2.5}, "'repeats' must be int"),
        ({"name": "x", "repeats": True}, "'repeats' must be int"),
        ({"name": "x", "seeds": [1, "2"]}, "'seeds\\[1\\]' must be int"),
        ({"name": "x", "weights": 3}, "'weights' must be"),
        ({}, "'name' is required"),
    ],
)
def test_names_the_bad_key(values, message):
    with pytest.raises(ConfigError, match=message):
        load_config(values, Schema)


def test_unreadable_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read config file"):
        load_config(tmp_path / "missing.json", Schema)
    bad = tmp_path / "bad.json"
    bad.write_text("{name: x}")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad, Schema)
