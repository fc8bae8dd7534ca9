"""The papers' figures, drawn with matplotlib to image files."""

import numpy as np

__all__ = [
    "plot_alpha_beta_grid",
    "plot_freezing",
    "plot_r2_boxes",
    "plot_transferability",
]

_STYLES = {
    "BnB": {"color": "#1f3d99", "marker": "o", "fill": "white"},
    "BnB+": {"color": "#5fa8e8", "marker": "o", "fill": "#5fa8e8"},
    "AnB": {"color": "#b01818", "marker": "D", "fill": "white"},
    "AnB+": {"color": "#f08080", "marker": "D", "fill": "#f08080"},
}


def plot_transferability(runs, path, depth=None, title=None):
    """Yosinski et al.'s Figure 2: top-1 accuracy against the depth n.

    Each run is a small point (jittered sideways); the mean of each series
    (BnB, BnB+, AnB, AnB+) over its runs is a line, and the base B networks
    are the points and dashed level at n = 0.

    Args:
        runs: run records, dicts with `kind` ("baseB", "BnB", "BnB+",
            "AnB", "AnB+"; others are ignored), `n` and `accuracy`.
        path: the image file to write (PNG by its extension).
        depth: L, the number of depth units (the x axis runs to L - 1).
        title: optional title.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile
    >>> runs = [{"kind": "baseB", "n": 0, "accuracy": 0.9},
    ...         {"kind": "AnB", "n": 1, "accuracy": 0.88}]
    >>> path = os.path.join(tempfile.mkdtemp(), "figure.png")
    >>> os.path.exists(plot_transferability(runs, path, depth=3))
    True

    Reference:
        Yosinski, Clune, Bengio, Lipson. "How transferable are features in
        deep neural networks?" NIPS 2014, Figure 2.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.5), dpi=120)
    axes = figure.add_subplot()
    rng = np.random.default_rng(0)
    base = [r["accuracy"] for r in runs if r["kind"] == "baseB"]
    if base:
        axes.axhline(np.mean(base), color="0.4", linestyle="--", linewidth=1)
        axes.scatter(
            np.zeros(len(base)) + rng.uniform(-0.08, 0.08, len(base)),
            base,
            s=22,
            color="white",
            edgecolors="black",
            zorder=3,
            label="base B",
        )
    for offset, (kind, style) in zip(
        (-0.15, -0.05, 0.05, 0.15), _STYLES.items(), strict=True
    ):
        points = [(r["n"], r["accuracy"]) for r in runs if r["kind"] == kind]
        if not points:
            continue
        n, accuracy = (
            np.asarray(values) for values in zip(*points, strict=True)
        )
        axes.scatter(
            n + offset + rng.uniform(-0.03, 0.03, len(n)),
            accuracy,
            s=18,
            marker=style["marker"],
            color=style["fill"],
            edgecolors=style["color"],
            zorder=3,
            alpha=0.8,
        )
        depths = np.unique(n)
        means = [accuracy[n == d].mean() for d in depths]
        axes.plot(
            depths,
            means,
            color=style["color"],
            marker=style["marker"],
            markerfacecolor=style["fill"],
            label=kind,
        )
    last = depth - 1 if depth else max([r["n"] for r in runs] + [1])
    axes.set_xticks(range(0, last + 1))
    axes.set_xlim(-0.5, last + 0.5)
    axes.set_xlabel("layer n at which the network is chopped and retrained")
    axes.set_ylabel("top-1 accuracy (higher is better)")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_alpha_beta_grid(grid, path, title=None):
    """L2-SP's Figure 1: accuracy over the α × β grid, as heat maps.

    Two panels: the validation accuracy (held-out training images, which
    chose α and β) and the test accuracy of the same models.

    Args:
        grid: `{(alpha, beta): (validation accuracy, test accuracy)}`.
        path: the image file to write (PNG by its extension).
        title: optional title.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile
    >>> grid = {(0.01, 0.01): (0.8, 0.7), (0.1, 0.01): (0.9, 0.8)}
    >>> path = os.path.join(tempfile.mkdtemp(), "figure1.png")
    >>> os.path.exists(plot_alpha_beta_grid(grid, path))
    True

    Reference:
        Li, Grandvalet, Davoine. "Explicit Inductive Bias for Transfer
        Learning with Convolutional Networks". ICML 2018, Figure 1.
    """
    from matplotlib.figure import Figure

    alphas = sorted({alpha for alpha, _ in grid})
    betas = sorted({beta for _, beta in grid})
    figure = Figure(figsize=(9.0, 3.8), dpi=120)
    panels = figure.subplots(1, 2)
    for index, (axes, name) in enumerate(
        zip(panels, ("validation accuracy", "test accuracy"), strict=True)
    ):
        values = np.full((len(betas), len(alphas)), np.nan)
        for (alpha, beta), accuracies in grid.items():
            values[betas.index(beta), alphas.index(alpha)] = accuracies[index]
        image = axes.imshow(100 * values, origin="lower", cmap="viridis")
        low, high = np.nanmin(values), np.nanmax(values)
        for row in range(len(betas)):
            for column in range(len(alphas)):
                value = values[row, column]
                if not np.isnan(value):
                    bright = high > low and (value - low) / (high - low) > 0.6
                    axes.text(
                        column,
                        row,
                        f"{100 * value:.1f}",
                        ha="center",
                        va="center",
                        color="black" if bright else "white",
                        fontsize=8,
                    )
        axes.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        axes.set_yticks(range(len(betas)), [f"{b:g}" for b in betas])
        axes.set_xlabel("α (layers from the source)")
        axes.set_ylabel("β (new classifier)")
        axes.set_title(name)
        figure.colorbar(image, ax=axes, label="%")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_freezing(series, path, title=None):
    """L2-SP's Figure 3: accuracy against the number of frozen units.

    Each method is a line of mean accuracies with the runs as points; its
    accuracy without freezing (Table 2) is a dashed level.

    Args:
        series: `{method name: {"points": {n: [accuracies]}, "baseline":
            mean accuracy with nothing frozen, or None}}`.
        path: the image file to write (PNG by its extension).
        title: optional title.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile
    >>> series = {"L2": {"points": {0: [0.8], 4: [0.82, 0.83]},
    ...                  "baseline": 0.8}}
    >>> path = os.path.join(tempfile.mkdtemp(), "figure3.png")
    >>> os.path.exists(plot_freezing(series, path))
    True

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, Figure 3.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.0, 4.2), dpi=120)
    axes = figure.add_subplot()
    colors = ("#1f3d99", "#b01818", "#2a8a3e", "#8a5a00")
    for color, (name, data) in zip(colors, series.items(), strict=False):
        ns = sorted(data["points"])
        means = [100 * np.mean(data["points"][n]) for n in ns]
        axes.plot(ns, means, marker="o", color=color, label=name)
        for n in ns:
            values = 100 * np.asarray(data["points"][n])
            axes.scatter(
                np.full(len(values), n), values, s=10, color=color, alpha=0.4
            )
        if data.get("baseline") is not None:
            axes.axhline(
                100 * data["baseline"], color=color, linestyle="--", linewidth=1
            )
    axes.set_xticks(
        sorted({n for data in series.values() for n in data["points"]})
    )
    axes.set_xlabel("n: depth units frozen (from the input)")
    axes.set_ylabel("test accuracy (%)")
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    return path


def plot_r2_boxes(boxes, labels, path, title=None):
    """L2-SP's Figure 4: box plots of per-feature R² per depth unit.

    Args:
        boxes: `{method name: [array of per-feature R² for each depth
            unit]}`.
        labels: the depth units' names (x axis).
        path: the image file to write (PNG by its extension).
        title: optional title.

    Returns:
        `path`.

    Example:

    >>> import os, tempfile, numpy as np
    >>> boxes = {"L2": [np.array([0.9, 0.8]), np.array([0.5, 0.4])],
    ...          "L2-SP": [np.array([0.95, 0.9]), np.array([0.8, 0.7])]}
    >>> path = os.path.join(tempfile.mkdtemp(), "figure4.png")
    >>> os.path.exists(plot_r2_boxes(boxes, ["unit 1", "unit 2"], path))
    True

    Reference:
        Li, Grandvalet, Davoine, ICML 2018, Figure 4.
    """
    from matplotlib.figure import Figure

    names = list(boxes)
    count = len(labels)
    width = 0.8 / max(1, len(names))
    figure = Figure(figsize=(max(7.0, 0.6 * count * len(names)), 4.2), dpi=120)
    axes = figure.add_subplot()
    colors = ("#1f3d99", "#b01818", "#2a8a3e", "#8a5a00")
    for index, (color, name) in enumerate(zip(colors, names, strict=False)):
        positions = np.arange(count) + (index - (len(names) - 1) / 2) * width
        data = [
            values if len(values) else np.array([np.nan])
            for values in boxes[name]
        ]
        parts = axes.boxplot(
            data,
            positions=positions,
            widths=0.9 * width,
            patch_artist=True,
            showfliers=False,
        )
        for box in parts["boxes"]:
            box.set_facecolor(color)
            box.set_alpha(0.6)
        axes.plot([], [], color=color, linewidth=6, alpha=0.6, label=name)
    axes.set_xticks(range(count), labels, rotation=60, ha="right", fontsize=7)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("depth unit")
    axes.set_ylabel("R² (fine-tuned vs pretrained activations)")
    axes.legend()
    if title:
        axes.set_title(title)
    figure.tight_layout()
    figure.savefig(path)
    return path
