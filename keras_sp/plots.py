"""The papers' figures, drawn with matplotlib to image files."""

import numpy as np

__all__ = [
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
