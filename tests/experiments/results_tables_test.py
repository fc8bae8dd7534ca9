"""The committed tables of `keras-sp finetune` come from their results.json.

Every `results.json` under `docs/results/` in a folder named after a
shipped finetune config (`docs/results/l2sp/<config>/`) is copied to a
fresh folder and reported on with `keras-sp finetune --config <config>
--report-only`; every Markdown file committed beside it (Table 2, Table 3,
the Markdown of Figures 1, 3 and 4) must come out byte for byte, and no
other. The PNG figures are left out: their bytes depend on the matplotlib
version that drew them.
"""

import os
import re
import shutil
from pathlib import Path

import pytest

from keras_sp.experiments import cli
from keras_sp.experiments import config

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"


def finetune_results():
    """`{config name: folder}` of the committed finetune results."""
    names = set(config.shipped_configs("finetune"))
    return {
        path.parent.name: path.parent
        for path in sorted(RESULTS.rglob("results.json"))
        if path.parent.name in names
    }


def committed_tables(folder):
    return sorted(
        name
        for name in os.listdir(folder)
        if name.endswith(".md") and name != "README.md"
    )


def test_the_committed_finetune_results_are_found():
    # The L2-SP write-up (docs/results/l2sp/README.md) links both.
    assert sorted(finetune_results()) == [
        "fashion_mobilenet",
        "fashion_small_cnn",
    ]
    for folder in finetune_results().values():
        assert "table2.md" in committed_tables(folder)


@pytest.mark.parametrize("name", sorted(finetune_results()))
def test_report_only_writes_the_committed_tables(name, tmp_path):
    folder = finetune_results()[name]
    shutil.copy(folder / "results.json", tmp_path / "results.json")
    argv = ["finetune", "--config", name, "--out", str(tmp_path)]
    assert cli.main([*argv, "--report-only"]) == 0
    written = committed_tables(tmp_path)
    assert written == committed_tables(folder)
    for table in written:
        expected = (folder / table).read_bytes()
        assert (tmp_path / table).read_bytes() == expected, table
    # Reporting leaves the runs as they were.
    assert (tmp_path / "results.json").read_bytes() == (
        folder / "results.json"
    ).read_bytes()


def compare_results():
    """`{name: folder}` of the committed `keras-sp compare` results: each
    folder under docs/results/compare/ holds the `config.json` it ran."""
    return {
        path.parent.name: path.parent
        for path in sorted((RESULTS / "compare").glob("*/config.json"))
    }


def test_the_committed_comparisons_are_found():
    # The write-up (docs/results/compare/README.md) includes the five
    # tables; "Which method, when" (docs/guides/which-method.md) both
    # regime maps.
    assert sorted(compare_results()) == [
        "fashion",
        "fashion_regime",
        "mobilenet",
        "mobilenet_long",
        "mobilenet_long_features",
        "mobilenet_long_replication",
        "mobilenet_regime",
    ]
    for name in ("fashion_regime", "mobilenet_regime"):
        assert (compare_results()[name] / "regime_map.md").exists()


@pytest.mark.parametrize("name", sorted(compare_results()))
def test_compare_report_only_writes_the_committed_table(name, tmp_path):
    """Without the source model or any training: the runs are read back."""
    folder = compare_results()[name]
    shutil.copy(folder / "results.json", tmp_path / "results.json")
    argv = ["compare", "--config", str(folder / "config.json")]
    assert cli.main([*argv, "--out", str(tmp_path), "--report-only"]) == 0
    for table in ("table.md", "regime_map.md"):
        assert (tmp_path / table).exists() == (folder / table).exists()
        if (folder / table).exists():
            expected = (folder / table).read_bytes()
            assert (tmp_path / table).read_bytes() == expected, table
    assert (tmp_path / "results.json").read_bytes() == (
        folder / "results.json"
    ).read_bytes()


def test_which_method_page_numbers_come_from_the_committed_tables():
    """Every number with two decimals in "Which method, when" (a mean, an
    interval end, an accuracy) is printed in a committed comparison table
    or regime map, which `--report-only` rebuilds from results.json."""
    page = (ROOT / "docs" / "guides" / "which-method.md").read_text()
    tables = "".join(
        (folder / name).read_text()
        for folder in compare_results().values()
        for name in ("table.md", "regime_map.md")
        if (folder / name).exists()
    )
    numbers = re.findall(r"[-+]?\d+\.\d{2}\b", page.replace("\u2212", "-"))
    assert len(numbers) > 10
    missing = sorted({n for n in numbers if n not in tables})
    assert not missing, missing
