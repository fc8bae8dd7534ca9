"""The figures of the report: their data, and their Markdown versions.

Figure 1: accuracy over the α × β grid; Figure 3: accuracy against the
number of frozen depth units; Figure 4: the R² of the fine-tuned against
the pretrained activations per depth unit. `keras_sp.experiments.plots`
draws them.
"""

import numpy as np

from keras_sp.experiments.finetune._selection import learning_rate_of
from keras_sp.experiments.finetune._tables import KIND_NAMES
from keras_sp.experiments.finetune._tables import chosen_runs
from keras_sp.experiments.finetune._tables import percent

__all__ = [
    "figure1",
    "figure3",
    "figure4",
    "freezing_markdown",
    "grid_markdown",
    "r2_markdown",
]


def figure1(settings, selection, runs, slug):
    """`{kind: {(alpha, beta): (validation, test accuracy)}}` at the chosen
    learning rate, for kinds validated over several α and several β."""
    rate = learning_rate_of(selection, runs, slug)
    grids = {}
    for kind in settings.kinds:
        if (
            len(selection.alpha_grid[kind]) < 2
            or len(selection.betas(kind)) < 2
        ):
            continue
        grid = {}
        for alpha, beta, _ in selection.grid(kind, rate):
            selected = [
                run
                for run in runs
                if run["dataset"] == slug
                and run["phase"] == "validation"
                and run["kind"] == kind
                and (run["alpha"], run["beta"], run["learning_rate"])
                == (alpha, beta, rate)
            ]
            if selected:
                grid[(alpha, beta)] = (
                    float(
                        np.mean([r["validation_accuracy"] for r in selected])
                    ),
                    float(np.mean([r["test_accuracy"] for r in selected])),
                )
        if grid:
            grids[kind] = grid
    return grids


def figure3(settings, runs, chosen, slug):
    """`{method: {"points": {n: accuracies}, "baseline": mean}}`: test
    accuracy against the number n of frozen depth units."""
    series = {}
    for kind in settings.freeze_kinds:
        point = chosen.get((slug, kind))
        if point is None:
            continue
        baseline = [
            run["accuracy"] for run in chosen_runs(runs, slug, kind, point)
        ]
        points = {}
        for n in settings.freeze_units:
            selected = [
                run["accuracy"]
                for run in chosen_runs(runs, slug, kind, point, phase="freeze")
                if run["frozen_units"] == n
            ]
            if n == 0:
                selected = baseline
            if selected:
                points[n] = selected
        if points:
            series[KIND_NAMES[kind]] = {
                "points": points,
                "baseline": float(np.mean(baseline)) if baseline else None,
            }
    return series


def figure4(settings, runs, chosen, slug, repeat_seed):
    """`{method: [R² values per depth unit]}` of the run of `repeat_seed`."""
    boxes = {}
    for kind in settings.r2_kinds:
        point = chosen.get((slug, kind))
        selected = [
            run
            for run in (chosen_runs(runs, slug, kind, point) if point else [])
            if run["seed"] == repeat_seed and "r2" in run
        ]
        if selected:
            boxes[KIND_NAMES[kind]] = [
                np.array([v for v in values if v is not None], dtype="float64")
                for values in selected[0]["r2"]
            ]
    return boxes


def grid_markdown(grid, kind, title):
    """Figure 1's Markdown: the α × β grid of one kind."""
    alphas = sorted({a for a, _ in grid})
    betas = sorted({b for _, b in grid})
    lines = [
        f"# Figure 1: {KIND_NAMES[kind]}, {title}",
        "",
        "Accuracy (%) over the α × β grid: validation accuracy (held-out "
        "training images, which chose α and β) / test accuracy of the same "
        "models (trained without the held-out images; never used to choose).",
        "",
        "| β \\ α | " + " | ".join(f"{a:g}" for a in alphas) + " |",
        "|---|" + "---|" * len(alphas),
    ]
    for beta in betas:
        cells = []
        for alpha in alphas:
            value = grid.get((alpha, beta))
            cells.append(
                "–"
                if value is None
                else f"{100 * value[0]:.1f} / {100 * value[1]:.1f}"
            )
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def freezing_markdown(series, title):
    """Figure 3's Markdown: accuracy against n frozen units."""
    ns = sorted({n for s in series.values() for n in s["points"]})
    lines = [
        f"# Figure 3: {title}",
        "",
        "Test accuracy (%, mean ± std over runs) with the first n depth units "
        "frozen (n = 0: Table 2's runs).",
        "",
        "| method | " + " | ".join(f"n = {n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for name, s in series.items():
        cells = [
            percent(s["points"][n]) if n in s["points"] else "–" for n in ns
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def r2_markdown(boxes, labels, title):
    """Figure 4's Markdown: quartiles of the R² per depth unit."""
    names = list(boxes)
    lines = [
        f"# Figure 4: {title}",
        "",
        "Per-feature R² of the fine-tuned against the pretrained activations "
        "at the output of each depth unit (first run): median [first "
        "quartile, third quartile]; constant features left out.",
        "",
        "| depth unit | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for index, label in enumerate(labels):
        cells = []
        for name in names:
            values = boxes[name][index]
            if len(values) == 0:
                cells.append("–")
                continue
            q1, median, q3 = np.percentile(values, [25, 50, 75])
            cells.append(f"{median:.2f} [{q1:.2f}, {q3:.2f}]")
        lines.append(f"| {index + 1} ({label}) | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])
