"""The report of an experiment: its tables and figures, from the records.

`write_report` needs only the config and the run records, so
`keras-sp finetune --report-only` redraws everything from `results.json`.
"""

import os

from keras_sp.experiments import plots
from keras_sp.experiments.finetune import _figures
from keras_sp.experiments.finetune import _tables
from keras_sp.experiments.finetune._config import dataset_slug
from keras_sp.experiments.finetune._config import settings_of
from keras_sp.experiments.finetune._selection import SelectionSettings
from keras_sp.experiments.finetune._selection import point_of
from keras_sp.experiments.finetune._tables import KIND_NAMES
from keras_sp.experiments.finetune._tables import ReportSettings
from keras_sp.experiments.results import write_text

__all__ = [
    "write_report",
]


def write_report(config, out, runs):
    """Writes Table 2, Figures 1, 3 and 4 and Table 3 from recorded runs.

    Each goes to a Markdown file; the figures also to PNG files. Parts
    without runs (e.g. no source data for Table 3) are left out.

    Args:
        config: the `FinetuneConfig` of the runs.
        out: the output folder.
        runs: the run records (`ResultsFile.runs`).

    Returns:
        A dict with the Markdown text of each part written, and
        `"comparisons"`, the paired tests of Table 2.
    """
    settings = settings_of(ReportSettings, config)
    selection = settings_of(SelectionSettings, config)
    os.makedirs(out, exist_ok=True)
    slugs = [dataset_slug(settings.target, n) for n in settings.per_class]
    slugs = [s for s in slugs if any(run["dataset"] == s for run in runs)]
    chosen = {
        (slug, kind): point_of(selection, runs, slug, kind)
        for slug in slugs
        for kind in settings.kinds
    }
    report = {}

    def write(name, text):
        write_text(os.path.join(out, name), text)
        report[name] = text

    table2, comparisons = _tables.table2(settings, runs, chosen, slugs)
    write("table2.md", table2)
    report["comparisons"] = comparisons
    table3 = _tables.table3(settings, runs, chosen, slugs)
    if table3:
        write("table3.md", table3)
    for slug in slugs:
        title = _tables.dataset_title(settings, slug)
        grids = _figures.figure1(settings, selection, runs, slug)
        for kind, grid in grids.items():
            name = f"figure1_{slug}_{kind}"
            plots.plot_alpha_beta_grid(
                grid,
                os.path.join(out, name + ".png"),
                title=f"{KIND_NAMES[kind]}, {title}",
            )
            write(name + ".md", _figures.grid_markdown(grid, kind, title))
        series = _figures.figure3(settings, runs, chosen, slug)
        if any(len(s["points"]) > 1 for s in series.values()):
            name = f"figure3_{slug}"
            plots.plot_freezing(
                series, os.path.join(out, name + ".png"), title=title
            )
            write(name + ".md", _figures.freezing_markdown(series, title))
        boxes = _figures.figure4(settings, runs, chosen, slug, settings.seed)
        if boxes:
            name = f"figure4_{slug}"
            labels = next(
                run["r2_layers"]
                for run in runs
                if run["dataset"] == slug and "r2_layers" in run
            )
            plots.plot_r2_boxes(
                boxes, labels, os.path.join(out, name + ".png"), title=title
            )
            write(name + ".md", _figures.r2_markdown(boxes, labels, title))
    return report
