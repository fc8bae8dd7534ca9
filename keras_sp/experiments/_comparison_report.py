"""The tables and the figure of `keras-sp compare`, from its summaries.

`format_table` writes one Markdown table per number of training images per
class; with several, `format_regime_table` and `plot_regime_map` give each
method's paired difference to L2 fine-tuning against that number.
"""

import numpy as np


def label(params):
    return ",".join(f"{k}={v:g}" for k, v in sorted(params.items()))


def format_table(rows, per_class, test_images, seeds):
    """The Markdown table of one `per_class`."""
    p = next(r["accuracy_mean"] for r in rows if r["method"] == "l2")
    lines = [
        f"### {per_class} training images per class",
        "",
        f"{seeds} matched seeds; {test_images} test images (binomial SE of "
        "one run's accuracy at L2's mean: "
        f"{100 * np.sqrt(p * (1 - p) / test_images):.2f} points).",
        "",
        "| method | hyper-parameters | accuracy % | vs L2 (95 % CI) | "
        "detectable | drift | at w0: weights / channels |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        d = row["difference_to_l2"]
        versus = "—" if row["method"] == "l2" else _interval(d)
        detectable = (
            "—" if row["method"] == "l2" else f"{100 * row['detectable']:.2f}"
        )
        diverged = ""
        if row.get("diverged"):
            diverged = f" ({row['diverged']} diverged, scored as chance)"
        at_w0 = "—"
        if row.get("at_w0") is not None:
            weights, channels = row["at_w0"]
            at_w0 = f"{100 * weights:.1f} % / {100 * channels:.1f} %"
        chosen = label(row["params"]) or "—"
        chosen += " (fixed)" if row["cv_accuracy"] is None else " (CV)"
        lines.append(
            f"| {row['method']} | {chosen} | "
            f"{100 * row['accuracy_mean']:.2f} ± "
            f"{100 * row['accuracy_std']:.2f}{diverged} | {versus} | "
            f"{detectable} | "
            f"{row['drift_mean']:.4f} | {at_w0} |"
        )
    lines += [
        "",
        "Hyper-parameters: chosen by k-fold cross-validation on the "
        "training images (CV), or the grid's single value (fixed). "
        "vs L2: mean of the per-seed differences to L2 fine-tuning, in "
        "points, with its Student-t 95 % interval. Detectable: the "
        "difference a paired t-test at 5 % finds with 80 % power, given the "
        "observed spread of the differences. Drift: ||w - w0|| / ||w0|| of "
        "the backbone's kernels. At w0: the fraction of the penalized "
        "weights, and of their output channels, exactly at the starting "
        "point (L1-SP and GL-SP kinds).",
    ]
    return "\n".join(lines)


def _interval(difference):
    return (
        f"{100 * difference['mean']:+.2f} [{100 * difference['low']:+.2f}, "
        f"{100 * difference['high']:+.2f}]"
    )


def format_regime_table(summaries, seeds):
    """The regime map as a Markdown table: L2's accuracy, then each
    method's paired difference to L2 (95 % interval) and the chosen
    hyper-parameters, one column per number of training images per
    class."""
    sizes = sorted(summaries)
    methods = list(summaries[sizes[0]])
    header = " | ".join(f"{n} per class" for n in sizes)
    lines = [
        "### Gain over L2 fine-tuning, by training images per class",
        "",
        f"Points of test accuracy, mean of {seeds} matched seeds with the "
        "Student-t 95 % interval of the paired differences; under it, the "
        "hyper-parameters each size chose.",
        "",
        f"| method | {header} |",
        "|---|" + "---|" * len(sizes),
    ]
    for method in methods:
        rows = [summaries[n][method] for n in sizes]
        if method == "l2":
            cells = [
                f"{100 * r['accuracy_mean']:.2f} ± "
                f"{100 * r['accuracy_std']:.2f} % (accuracy)"
                for r in rows
            ]
        else:
            cells = [_interval(r["difference_to_l2"]) for r in rows]
        params = [label(r["params"]) or "—" for r in rows]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("| | " + " | ".join(params) + " |")
    return "\n".join(lines) + "\n"


def plot_regime_map(summaries, path):
    """Each method's gain over L2 (with its interval) against the number
    of training images per class, saved to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    methods = [m for m in summaries[min(summaries)] if m != "l2"]
    for offset, method in enumerate(methods):
        sizes = sorted(summaries)
        rows = [summaries[n][method]["difference_to_l2"] for n in sizes]
        shift = 1 + 0.03 * (offset - len(methods) / 2)
        axes.errorbar(
            [n * shift for n in sizes],
            [100 * r["mean"] for r in rows],
            yerr=[
                [100 * (r["mean"] - r["low"]) for r in rows],
                [100 * (r["high"] - r["mean"]) for r in rows],
            ],
            marker="o",
            capsize=3,
            label=method,
        )
    axes.axhline(0, color="black", linewidth=0.8)
    axes.set_xscale("log")
    axes.set_xlabel("training images per class")
    axes.set_ylabel("accuracy − L2 fine-tuning (points, 95 % CI)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
