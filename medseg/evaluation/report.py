"""Cross-validation report of a ``medseg cv`` run: ``cv_summary.json``, ``report.md``,
``report.html`` and ``plots/cv_*.png``.

The numbers are those of :func:`medseg.evaluation.summary.summarize` (computed from the folds'
out-of-fold files); this module lays them out as blocks (headings, paragraphs, tables, figures,
lists) and renders the blocks to Markdown and to a self-contained HTML page. The same summary
gives the same bytes of ``report.md``. Group ids are never shown: the report holds counts only.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import numpy as np

from medseg.artifacts.cv import fold_dir
from medseg.evaluation.oof import CVData, load_cv
from medseg.evaluation.patients import CONVENTION, surface_labels
from medseg.evaluation.plots import (
    plot_confusion,
    plot_cv_history,
    plot_group_dice,
    plot_reliability,
    plot_roc,
)
from medseg.evaluation.stats import group_dice
from medseg.evaluation.summary import CLS_METRICS, PER_CLASS_METRICS, SEG_METRICS, summarize
from medseg.utils import atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

LABELS = {
    "dice": "Dice, pooled pixels",
    "iou": "IoU, pooled pixels",
    "dice_per_group_mean": "Dice per patient/group, mean",
    "dice_per_group_median": "Dice per patient/group, median",
    "dice_per_image_mean_nonempty": "Dice per image, mean over images with foreground",
    "accuracy": "Accuracy",
    "balanced_accuracy": "Balanced accuracy",
    "macro_f1": "Macro F1",
    "roc_auc_macro": "ROC AUC, macro one-vs-rest",
    "ece": "Expected calibration error (10 bins; lower is better)",
    **surface_labels(1.0),
}


def _labels(tolerance: float | None) -> dict[str, str]:
    """:data:`LABELS`, the per-patient surface metrics' naming the NSD ``tolerance`` (px)."""
    return LABELS if tolerance is None else {**LABELS, **surface_labels(tolerance)}


def _figures(d: CVData, summary: dict, plots: Path) -> list[tuple[str, str]]:
    """Write the figures; returns ``(caption, path relative to the run)`` of each written."""
    figs: list[tuple[str, str]] = []

    def add(caption: str, path: Path | None):
        if path is not None:
            figs.append((caption, path.relative_to(d.root).as_posix()))

    histories = {f: fold_dir(d.root, f) / "logs" / "history.csv" for f in d.folds_done}
    add(
        "Training curves of every fold (dashed: train, solid: validation)",
        plot_cv_history(histories, plots / "cv_history.png"),
    )
    if d.task == "segmentation":
        per_fold = {f: group_dice(d, d.fold == f)[1] for f in d.folds_done}
        add("Per-patient Dice, by fold", plot_group_dice(per_fold, plots / "cv_dice_per_group.png"))
    else:
        add(
            "Confusion matrix of the pooled out-of-fold predictions",
            plot_confusion(
                np.array(summary["confusion_matrix"]), d.class_names, plots / "cv_confusion.png"
            ),
        )
        add(
            "One-vs-rest ROC curves, pooled out-of-fold",
            plot_roc(d.probs, d.target, d.class_names, plots / "cv_roc.png"),
        )
        add(
            "Reliability diagram, pooled out-of-fold (bars: accuracy per confidence bin)",
            plot_reliability(
                summary["calibration"]["bins"],
                summary["metrics"]["ece"]["pooled"],
                plots / "cv_reliability.png",
            ),
        )
    return figs


def _fmt(v, digits: int = 4) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _ci(block: dict) -> str:
    ci = block.get("ci95")
    body = _fmt(block["pooled"])
    return body if ci is None else f"{body} ({_fmt(ci[0])}–{_fmt(ci[1])})"


def _mean_std(block: dict) -> str:
    if block["mean"] is None:
        return "–"
    return _fmt(block["mean"]) + ("" if block["std"] is None else f" ± {_fmt(block['std'])}")


def _test_line(test: dict, task: str) -> str:
    keys = SEG_METRICS if task == "segmentation" else CLS_METRICS
    labels = _labels(test.get("nsd_tolerance"))
    parts = [
        f"{labels.get(key, key)} {test[key]:.4f}"
        for key in keys
        if isinstance(test.get(key), float)
    ]
    n = test.get("n_images")
    who = test.get("ensemble")
    src = f"ensemble of {len(who)} fold models" if isinstance(who, list) else "fold models"
    return (
        f"Held-out test split ({src}"
        + (f", {n} images" if isinstance(n, int) else "")
        + "): "
        + ("; ".join(parts) if parts else "no scalar metrics recorded")
        + "."
    )


def _config_blocks(summary: dict) -> list[tuple]:
    """Title, the run in one paragraph and the configuration table."""
    cfg = summary["config"]
    task = summary["task"]
    unit = "slices/images" if task == "segmentation" else "images"
    out: list[tuple] = [("h1", f"Cross-validation report: {summary['run']}")]
    out.append(
        (
            "p",
            f"{task.capitalize()}, {summary['k']}-fold cross-validation; folds finished: "
            f"{len(summary['folds_done'])} of {summary['k']}. Out-of-fold predictions: "
            f"{summary['n_samples']} {unit} from {summary['n_groups']} patients/groups.",
        )
    )
    out.append(("h2", "Configuration"))
    size = cfg.get("image_size")
    rows = [
        ["model", str(cfg.get("model", "–"))],
        [
            "image size",
            " × ".join(str(s) for s in size)
            + (f" × {cfg['channels']}" if "channels" in cfg else "")
            if isinstance(size, list)
            else "–",
        ],
        ["epochs", str(cfg.get("epochs", "–"))],
        ["folds", str(cfg.get("folds", summary["k"]))],
    ]
    for key in ("batch_size", "optimizer", "learning_rate", "loss", "threshold", "seed"):
        if key in cfg:
            rows.append([key.replace("_", " "), str(cfg[key])])
    if "medseg_version" in cfg:
        rows.append(["medseg", f"{cfg['medseg_version']} (config {cfg.get('config_hash', '?')})"])
    out.append(("table", ["setting", "value"], rows))
    return out


def _results_blocks(summary: dict) -> list[tuple]:
    """The metrics table, per-class table (classification), notes and the test split."""
    task = summary["task"]
    out: list[tuple] = [("h2", "Results")]
    labels = _labels((summary.get("surface") or {}).get("nsd_tolerance"))
    rows = [
        [labels.get(m, m), _mean_std(b), _ci(b), ", ".join(_fmt(v) for v in b["folds"])]
        for m, b in summary["metrics"].items()
    ]
    out.append(
        (
            "table",
            [
                "metric",
                "mean ± std over folds",
                "95% CI (bootstrap by patient/group)",
                "fold values",
            ],
            rows,
        )
    )
    out.append(
        (
            "p",
            "The CI column shows the pooled out-of-fold estimate followed by its 95% bootstrap "
            "interval in parentheses.",
        )
    )
    if task == "classification":
        out.append(("h3", "Per class (pooled out-of-fold estimate, 95% CI)"))
        rows = [
            [name, str(pc["support"])] + [_ci(pc[m]) for m in PER_CLASS_METRICS]
            for name, pc in summary["per_class"].items()
        ]
        out.append(("table", ["class", "support", "precision", "recall", "F1", "ROC AUC"], rows))
    for note in summary.get("not_available", {}).values():
        out.append(("p", note))
    if summary.get("test"):
        out.append(("h2", "Held-out test split"))
        out.append(("p", _test_line(summary["test"], task)))
    return out


def _method_blocks(summary: dict) -> list[tuple]:
    """How the numbers were computed, and the summary's warnings."""
    b = summary["bootstrap"]
    out: list[tuple] = [("h2", "How these numbers were computed")]
    out.append(
        (
            "ul",
            [
                "Every sample was predicted once, by the model of the fold that held it out "
                "(out-of-fold, OOF); patients/groups never cross folds. All numbers come from "
                "the folds' oof.csv files.",
                "Fold values: each metric computed on one fold's OOF rows; mean ± std (sample "
                "standard deviation, ddof=1) across the finished folds.",
                "Pooled estimate: the metric computed on all OOF rows together.",
                (
                    "Pixel Dice/IoU pool the true/false positive and false negative pixel counts "
                    "of all images; per-patient Dice pools each patient's slices first; per-image "
                    "Dice is averaged over images whose ground truth has foreground."
                )
                if summary["task"] == "segmentation"
                else (
                    "Precision, recall, F1, balanced accuracy and one-vs-rest ROC AUC as in "
                    "scikit-learn (zero_division=0; macro AUC over classes with positives and "
                    "negatives). ECE: 10 equal-width bins of the max class probability, "
                    "|accuracy − mean confidence| weighted by the bin's share of samples."
                ),
                f"95% CI: percentile bootstrap with {b['n_boot']} replicates (seed {b['seed']}), "
                f"resampling whole patients/groups with replacement ({summary['n_groups']} per "
                "replicate), so correlated slices of one patient move together.",
                *_surface_items(summary.get("surface")),
            ],
        )
    )
    if summary.get("warnings"):
        out.append(("h2", "Warnings"))
        out.append(("ul", summary["warnings"]))
    return out


def _surface_items(surface: dict | None) -> list[str]:
    """The methods list's sentence on the per-patient surface metrics (none without them)."""
    if not surface:
        return []
    missing = ", ".join(f"{m.upper()} {surface[f'{m}_missing']}" for m in ("hd95", "assd", "nsd"))
    return [
        f"HD95, ASSD and NSD@{surface['nsd_tolerance']:g}{surface['unit']}: in "
        f"{surface['unit']} at {surface['resolution']}, {CONVENTION}. Patients without a value "
        f"(left out of the means): {missing}. Read from the folds' oof_groups.csv files."
    ]


def _blocks(summary: dict, figs: list[tuple[str, str]]) -> list[tuple]:
    """The report as a list of blocks, rendered to Markdown and HTML."""
    out = _config_blocks(summary) + _results_blocks(summary)
    if figs:
        out.append(("h2", "Figures"))
        for caption, rel in figs:
            out.append(("img", caption, rel))
    return out + _method_blocks(summary)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _markdown(blocks: list[tuple]) -> str:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(_md_cell(h) for h in header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({block[2]})", "", f"*{block[1]}*", ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
    return "\n".join(lines).rstrip() + "\n"


CSS = """
body { font-family: sans-serif; max-width: 60em; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: left; }
th { background: #eee; }
figure { margin: 1em 0; }
img { max-width: 100%; }
figcaption { font-style: italic; color: #555; }
"""


def _html(blocks: list[tuple], root: Path) -> str:
    esc = html.escape
    title = next((b[1] for b in blocks if b[0] == "h1"), "Cross-validation report")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
    ]
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            parts.append(f"<{kind}>{esc(block[1])}</{kind}>")
        elif kind == "p":
            parts.append(f"<p>{esc(block[1])}</p>")
        elif kind == "table":
            parts.append("<table>")
            parts.append("<tr>" + "".join(f"<th>{esc(h)}</th>" for h in block[1]) + "</tr>")
            for r in block[2]:
                parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>")
            parts.append("</table>")
        elif kind == "img":
            data = base64.b64encode((root / block[2]).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img alt="{esc(block[1])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{esc(block[1])}</figcaption></figure>"
            )
        elif kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in block[1]) + "</ul>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def write_report(run_dir: str | Path, summary: dict | None = None) -> dict:
    """Write ``cv_summary.json``, ``report.md``, ``report.html`` and ``plots/cv_*.png`` of a CV run.

    Args:
        run_dir: the CV run folder.
        summary: the result of :func:`summarize` (computed with its defaults when ``None``).

    Returns:
        The summary.

    Figures: training curves of all folds; segmentation: per-patient Dice by fold; classification:
    confusion matrix, ROC curves and reliability diagram of the pooled OOF predictions.
    ``report.md`` links them relatively (``plots/…``); ``report.html`` embeds them (base64 PNG) and
    needs nothing else.
    """
    root = Path(run_dir)
    if summary is None:
        summary = summarize(root)
    d = load_cv(root)
    figs = _figures(d, summary, root / "plots")
    blocks = _blocks(summary, figs)
    atomic_write_json(root / "cv_summary.json", summary)
    atomic_write_text(root / "report.md", _markdown(blocks))
    atomic_write_text(root / "report.html", _html(blocks, root))
    logger.info("wrote %s, report.md and report.html", root / "cv_summary.json")
    return summary
