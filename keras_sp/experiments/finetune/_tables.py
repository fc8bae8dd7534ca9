"""The tables of the report: Table 2 (accuracy, paired tests), Table 3.

Both are Markdown, built from the run records alone (`results.json`), at
the points the validation runs chose.
"""

import dataclasses
import math

import numpy as np

from keras_sp.experiments import measures
from keras_sp.experiments.finetune._config import dataset_slug
from keras_sp.experiments.finetune._own_spec import is_own_target
from keras_sp.experiments.finetune._own_spec import target_name
from keras_sp.experiments.finetune._runs import unpack

__all__ = [
    "KIND_NAMES",
    "ReportSettings",
    "chosen_runs",
    "dataset_title",
    "percent",
    "table2",
    "table3",
]

_NAMES = {
    "fashion_mnist": "Fashion-MNIST",
    "caltech256": "Caltech 256",
    "mit_indoor67": "MIT Indoors 67",
    "stanford_dogs": "Stanford Dogs 120",
}
KIND_NAMES = {
    "l2": "L2",
    "l2_sp": "L2-SP",
    "l2_sp_fisher": "L2-SP-Fisher",
    "l1_sp": "L1-SP",
    "group_lasso_sp": "GL-SP",
    "group_lasso_sp_fisher": "GL-SP-Fisher",
}


@dataclasses.dataclass(frozen=True)
class ReportSettings:
    """The config keys the tables and figures read."""

    title: str
    target: object
    per_class: list[int | None]
    kinds: list[str]
    significance: float
    freeze_kinds: list[str]
    freeze_units: list[int]
    r2_kinds: list[str]
    seed: int


def dataset_title(settings, slug):
    """The title of a data set in the tables (`"Caltech 256 - 30"`)."""
    for per_class in settings.per_class:
        if dataset_slug(settings.target, per_class) == slug:
            target = settings.target
            own = is_own_target(target)
            name = target_name(target) if own else _NAMES[target]
            return name if per_class is None else f"{name} - {per_class}"
    return slug


def percent(values):
    """`"mean ± std"` of fractions, in percent."""
    values = np.asarray(values, dtype="float64")
    return f"{100 * values.mean():.1f} ± {100 * values.std():.1f}"


def chosen_runs(runs, slug, kind, point, phase="test"):
    """The runs of `kind` at `point` on a data set, in a phase."""
    alpha, beta, rate = point
    return [
        run
        for run in runs
        if run["dataset"] == slug
        and run["phase"] == phase
        and run["kind"] == kind
        and run["alpha"] == alpha
        and run["beta"] == beta
        and run["learning_rate"] == rate
    ]


def table2(settings, runs, chosen, slugs):
    """Table 2's Markdown, and its paired tests (a list of dicts)."""
    lines = [
        "| method | "
        + " | ".join(dataset_title(settings, s) for s in slugs)
        + " |",
        "|---|" + "---|" * len(slugs),
    ]
    details = [
        "",
        "| data set | method | α | β | lr | runs | accuracy (%) | drift "
        "‖w−w0‖/‖w0‖ (%) | final training loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    tests = [
        "",
        f"Paired tests (McNemar's exact test on the per-image test "
        f"predictions, two-sided, level {settings.significance:g}): the worst "
        "run of each -SP kind against the best L2 run.",
        "",
        "| data set | method | worst run (%) | best L2 run (%) | only -SP "
        "right | only L2 right | p-value | significantly better | matched mean "
        "difference over seeds (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for kind in settings.kinds:
        cells = []
        for slug in slugs:
            point = chosen.get((slug, kind))
            selected = chosen_runs(runs, slug, kind, point) if point else []
            if not selected:
                cells.append("–")
                continue
            accuracies = [run["accuracy"] for run in selected]
            cells.append(percent(accuracies))
            details.append(
                f"| {dataset_title(settings, slug)} | {KIND_NAMES[kind]} | "
                f"{point[0]:g} | {point[1]:g} | {point[2]:g} | {len(selected)} "
                f"| {percent(accuracies)} | "
                f"{percent([run['drift'] for run in selected])} | "
                f"{np.mean([run['final_loss'] for run in selected]):.3f} |"
            )
            summary[(slug, kind)] = selected
        lines.append(f"| {KIND_NAMES[kind]} | " + " | ".join(cells) + " |")
    comparisons = []
    for slug in slugs:
        baseline = summary.get((slug, "l2"))
        if not baseline:
            continue
        best = max(baseline, key=lambda run: run["accuracy"])
        by_seed = {run["seed"]: run["accuracy"] for run in baseline}
        for kind in settings.kinds:
            if kind == "l2" or (slug, kind) not in summary:
                continue
            selected = summary[(slug, kind)]
            worst = min(selected, key=lambda run: run["accuracy"])
            test = measures.mcnemar_test(
                unpack(worst["correct"]), unpack(best["correct"])
            )
            better = (
                test["p_value"] < settings.significance
                and test["a_only"] > test["b_only"]
            )
            differences = [
                run["accuracy"] - by_seed[run["seed"]]
                for run in selected
                if run["seed"] in by_seed
            ]
            spread = ""
            if len(differences) > 1:
                error = np.std(differences, ddof=1) / math.sqrt(
                    len(differences)
                )
                spread = f" ± {100 * error:.1f} (SE)"
            tests.append(
                f"| {dataset_title(settings, slug)} | {KIND_NAMES[kind]} | "
                f"{100 * worst['accuracy']:.1f} | {100 * best['accuracy']:.1f} "
                f"| {test['a_only']} | {test['b_only']} | "
                f"{test['p_value']:.3g} | {'yes' if better else 'no'} | "
                f"{100 * np.mean(differences):+.1f}{spread} |"
            )
            comparisons.append(
                {
                    "dataset": slug,
                    "kind": kind,
                    "worst": worst["accuracy"],
                    "best_l2": best["accuracy"],
                    "significantly_better": bool(better),
                    "mean_difference": float(np.mean(differences)),
                    **test,
                }
            )
    text = "\n".join(
        [
            f"# Table 2: {settings.title}".rstrip(": "),
            "",
            *lines,
            *details,
            *tests,
            "",
        ]
    )
    return text, comparisons


def table3(settings, runs, chosen, slugs):
    """Table 3's Markdown (the source-task drop), or None without runs."""
    modes = ("source_as_trained", "source_reestimated")
    rows = []
    for slug in slugs:
        selected_by_kind = {}
        for kind in settings.kinds:
            point = chosen.get((slug, kind))
            selected = [
                run
                for run in (
                    chosen_runs(runs, slug, kind, point) if point else []
                )
                if any(mode in run for mode in modes)
            ]
            if selected:
                selected_by_kind[kind] = selected
        baseline = {run["seed"]: run for run in selected_by_kind.get("l2", [])}
        for kind, selected in selected_by_kind.items():
            reference = next(
                selected[0][mode]["pretrained"]
                for mode in modes
                if mode in selected[0]
            )

            def cell(mode, selected=selected, kind=kind, baseline=baseline):
                if mode not in selected[0]:
                    return "–"
                drops = [run[mode]["drop"] for run in selected]
                kept = [run[mode]["fine_tuned"] for run in selected]
                text = f"{100 * np.mean(drops):+.1f} ({percent(kept)})"
                matched = [
                    run[mode]["fine_tuned"]
                    - baseline[run["seed"]][mode]["fine_tuned"]
                    for run in selected
                    if run["seed"] in baseline
                ]
                if kind != "l2" and len(matched) > 1:
                    error = np.std(matched, ddof=1) / math.sqrt(len(matched))
                    text += (
                        f"; vs L2 {100 * np.mean(matched):+.1f} ± "
                        f"{100 * error:.1f}"
                    )
                return text

            rows.append(
                f"| {dataset_title(settings, slug)} | {KIND_NAMES[kind]} | "
                f"{100 * reference:.1f} | {cell(modes[0])} | "
                f"{cell(modes[1])} | {len(selected)} |"
            )
    if not rows:
        return None
    return "\n".join(
        [
            f"# Table 3: {settings.title}".rstrip(": "),
            "",
            "Source-task accuracy drop (points) of the fine-tuned backbone "
            "with the original source classifier, on source validation "
            "images; in brackets the accuracy kept (mean ± std over runs) "
            "and its difference from L2's on the same seeds (mean ± SE).",
            "",
            "| data set | method | pretrained (%) | drop, BN statistics as "
            "fine-tuning left them | drop, BN statistics re-estimated on the "
            "source images | runs |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
