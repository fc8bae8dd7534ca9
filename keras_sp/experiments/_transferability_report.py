"""The transferability experiment's summary and table (Yosinski et al.,
NIPS 2014, Figure 2): mean and spread of top-1 accuracy per kind of
network and copied depth n."""

import numpy as np

# The transferred networks, as in Yosinski et al.: B's or A's first n
# layers copied, frozen or (+) fine-tuned.
KINDS = ("BnB", "BnB+", "AnB", "AnB+")


def summarize(runs):
    """Mean, standard deviation and count of top-1 accuracy per kind and n.

    Args:
        runs: run records (dicts with `kind`, `n`, `accuracy`).

    Returns:
        `{kind: {n: {"mean", "std", "count", "values"}}}` with kinds
        "baseA", "baseB", "BnB", "BnB+", "AnB", "AnB+".
    """
    grouped = {}
    for record in runs:
        grouped.setdefault(record["kind"], {}).setdefault(
            record["n"], []
        ).append(record["accuracy"])
    return {
        kind: {
            n: {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0,
                "count": len(values),
                "values": list(values),
            }
            for n, values in sorted(by_n.items())
        }
        for kind, by_n in grouped.items()
    }


def markdown_table(summary, config):
    """The Markdown table of `summary` over `config.depths()`."""

    def cell(kind, n):
        entry = summary.get(kind, {}).get(n)
        if entry is None:
            return "–"
        if entry["count"] > 1:
            return f"{entry['mean']:.4f} ± {entry['std']:.4f}"
        return f"{entry['mean']:.4f}"

    lines = [
        "Top-1 accuracy on the test images of half B (mean ± standard "
        "deviation over repeats).",
        "",
        "| n | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
        f"| 0 (base B) | {cell('baseB', 0)} |" + " |" * (len(KINDS) - 1),
    ]
    for n in config.depths():
        lines.append(
            f"| {n} | " + " | ".join(cell(kind, n) for kind in KINDS) + " |"
        )
    lines.append("")
    lines.append(
        f"Base A on the test images of half A: {cell('baseA', 0)}. "
        f"Repeats: {config.repeats}."
    )
    return "\n".join(lines) + "\n"
