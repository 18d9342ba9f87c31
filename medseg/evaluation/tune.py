"""Out-of-fold ablation and post-processing tuning of a cross-validation run (``medseg tune``).

Every number here is honest by construction:

* each sample's probabilities come from the one fold model that never saw its patient/group
  (the run's k-fold manifest);
* the ``last`` checkpoint is the default: ``best`` was selected on the very fold it is then
  scored on, so its figures are optimistic (they are reported as a row of their own);
* post-processing parameters (threshold, minimum lesion size, 3D largest component) used on fold
  ``k`` are chosen on the out-of-fold predictions of the OTHER folds only (leave-one-fold-out),
  then applied to fold ``k``. The parameters chosen on all folds together are the recommendation
  for the exported ensemble (they were never scored on data they were not chosen on; the scores
  come from the per-fold choices).

Segmentation post-processing works on each patient's volume: the slices of one group, ordered by
the natural order of their ids (``..._2.tif`` before ``..._10.tif``; volume slices by index), so
connected components are 3D across neighbouring slices.

Variants (rows of the ablation), each scored like ``medseg cv`` scores its folds
(:func:`medseg.evaluation.summary.summarize`: pooled, per-fold and a patient/group bootstrap 95%
interval)::

    segmentation:   best  last  last+tta  last+threshold  last+min_lesion  last+largest_component
                    last+tta+postprocess (threshold, minimum lesion and largest component tuned)
    classification: best  last  last+tta

Files, inside the CV run folder::

    tune/probs/fold_<k>.npz      cached out-of-fold probabilities (float16) of each checkpoint/view,
                                 with the checkpoints' SHA-256 (recomputed when they change)
    tune/<variant>/fold_<k>/oof.csv, oof_groups.csv (segmentation: per patient volume, HD95,
                                 ASSD, NSD in px), config.yaml, splits.json, cv_summary.json,
                                 report.md, plots/
    tune/tune.json               the variants: settings, parameters chosen per fold, metrics
    tune/ablation.md             the same as a Markdown table
    tune-with-<OTHER>/...        the same for the out-of-fold ensemble with other CV runs on the
                                 same folds (``medseg tune RUN --with OTHER [--with ...]``; the
                                 other runs' folder names joined by ``+``): each sample's
                                 probabilities are the mean of the runs' models that never saw it;
                                 one folder per set of partners, so scoring RUN with another
                                 partner never overwrites an earlier ensemble's results
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np

from medseg.artifacts.cv import ENSEMBLE_NAME, fold_dir
from medseg.artifacts.runs import RunDir, load_run_model, open_run
from medseg.data.pipeline import load_arrays
from medseg.data.scan import scan_from_config
from medseg.data.split import fold_manifest, load_manifest, select
from medseg.errors import DataError
from medseg.evaluation.evaluate import segmentation_row, write_cases
from medseg.evaluation.oof import GROUPS_FILE
from medseg.evaluation.patients import group_surface_rows, patient_volumes
from medseg.evaluation.report import write_report
from medseg.evaluation.stats import CI_LEVEL
from medseg.evaluation.summary import summarize
from medseg.inference.postprocess import postprocess
from medseg.models.ensemble import mean_probabilities, reference_probabilities
from medseg.models.metrics import dice_from_counts
from medseg.utils import atomic_write_bytes, atomic_write_json, atomic_write_text, file_sha256

logger = logging.getLogger(__name__)

# The default first (ties keep it). The low ones are for nets that under-segment (LGG: see
# docs/results.md); the 3D largest component removes the scattered false alarms they let in.
THRESHOLDS = (0.5, 0.3, 0.4, 0.6, 0.7, 0.2, 0.1, 0.05)
MIN_LESION_VOXELS = (0, 10, 25, 50, 100, 200, 400)
VIEWS = ("best", "last", "last_tta")  # checkpoint[_tta]
#: What each view means, as the ablation's rows describe it.
VIEW_DESCRIPTIONS = {
    "best": "checkpoint with the best validation score of each fold (chosen on the scored "
    "fold itself: optimistic)",
    "last": "last checkpoint of each fold",
    "last_tta": "last checkpoint, mean with the horizontal flip (TTA)",
}
#: Segmentation variants with post-processing: name -> (view, levers tuned, description).
LEVERS = {
    "last_threshold": ("last", ("threshold",), "threshold tuned on the other folds"),
    "last_min_lesion": (
        "last",
        ("min_lesion",),
        "minimum 3D lesion size tuned on the other folds",
    ),
    "last_largest_component": (
        "last",
        ("largest_component",),
        "3D largest component kept when it helps on the other folds",
    ),
    "last_tta_postprocess": (
        "last_tta",
        ("threshold", "min_lesion", "largest_component"),
        "TTA; threshold, minimum lesion size and largest component tuned jointly on "
        "the other folds",
    ),
}
HEADLINE_KEYS = (
    "dice_per_group_mean",
    "dice_per_group_median",
    "dice",
    "hd95_per_group_mean",
    "nsd_per_group_mean",
    "accuracy",
    "macro_f1",
    "balanced_accuracy",
    "ece",
)


@dataclass
class FoldProbs:
    """Out-of-fold predictions of one fold: ids and groups in manifest order, the truth (label
    maps [N, H, W] or class indices [N]) and the probabilities of each view."""

    ids: list[str]
    groups: list[str]
    truth: np.ndarray
    probs: dict[str, np.ndarray]
    class_names: list[str]


@dataclass(frozen=True)
class Setting:
    """Post-processing of one variant: threshold, minimum lesion size (voxels), largest
    component."""

    threshold: float = 0.5
    min_lesion_voxels: int = 0
    largest_component: bool = False

    def as_dict(self) -> dict:
        return {
            "threshold": self.threshold,
            "min_lesion_voxels": self.min_lesion_voxels,
            "largest_component": self.largest_component,
        }


# --------------------------------------------------------------------------------------------
# Out-of-fold probabilities


def _checkpoint_hashes(fdir: Path) -> dict[str, str]:
    run = RunDir(fdir)
    out = {}
    for name, path in (("best", run.best_model), ("last", run.last_model)):
        if not path.is_file():
            raise DataError(f"{path}: checkpoint not found (has fold {fdir.name} finished?)")
        out[name] = file_sha256(path)
    return out


def _predict(model, images: np.ndarray, tta: bool, batch: int = 32) -> np.ndarray:
    return reference_probabilities(model, images, tta, batch_size=batch).astype(np.float16)


def fold_probabilities(root: Path, k: int, cfg, manifest: dict, samples: list) -> FoldProbs:
    """The OOF probabilities of fold ``k`` for every view (cached in ``tune/probs``)."""
    fdir = fold_dir(root, k)
    hashes = _checkpoint_hashes(fdir)
    cache = root / "tune" / "probs" / f"fold_{k}.npz"
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if all(str(z[f"sha_{n}"]) == h for n, h in hashes.items()):
                return FoldProbs(
                    ids=[str(i) for i in z["ids"]],
                    groups=[str(g) for g in z["groups"]],
                    truth=z["truth"],
                    probs={v: z[f"p_{v}"] for v in VIEWS},
                    class_names=[str(c) for c in z["class_names"]],
                )
    fold_samples = select(samples, fold_manifest(manifest, k - 1), "val")
    probs, data = {}, None
    for ckpt in ("best", "last"):
        model = load_run_model(RunDir(fdir), ckpt)
        if data is None:
            data = load_arrays(fold_samples, cfg.data, model.output_shape[-1])
            if data.problems:
                raise DataError(
                    f"fold {k}: {len(data.problems)} sample(s) unreadable: {data.problems[0]}"
                )
        probs[ckpt] = _predict(model, data.images, tta=False)
        if ckpt == "last":
            probs["last_tta"] = _predict(model, data.images, tta=True)
    out = FoldProbs(
        ids=[s.id for s in data.samples],
        groups=[s.group for s in data.samples],
        truth=data.targets,
        probs=probs,
        class_names=list(manifest.get("class_names") or []),
    )
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        ids=np.array(out.ids),
        groups=np.array(out.groups),
        truth=out.truth,
        class_names=np.array(out.class_names, dtype=str),
        **{f"p_{v}": p for v, p in probs.items()},
        **{f"sha_{n}": np.array(h) for n, h in hashes.items()},
    )
    atomic_write_bytes(cache, buf.getvalue())
    return out


# --------------------------------------------------------------------------------------------
# Segmentation: patient volumes and post-processing


def _foreground(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Binary foreground of [N, H, W, K] probabilities (threshold for K=1, argmax > 0 else)."""
    if probs.shape[-1] == 1:
        return probs[..., 0].astype(np.float32) > threshold
    return probs.argmax(-1) > 0


class _PatientTable:
    """Per patient and setting: volume (tp, fp, fn), from 3D components computed once per
    threshold, so that a grid of settings costs almost nothing."""

    def __init__(self, probs: np.ndarray, truth: np.ndarray, volumes: dict[str, list[int]]):
        from scipy import ndimage

        self.groups = sorted(volumes)
        self.truth_total = {g: int((truth[volumes[g]] > 0).sum()) for g in self.groups}
        thresholds = THRESHOLDS if probs.shape[-1] == 1 else (0.5,)
        self.thresholds = thresholds
        self.components: dict[tuple[str, float], tuple[np.ndarray, np.ndarray]] = {}
        structure = ndimage.generate_binary_structure(3, 1)
        for g in self.groups:
            idx = volumes[g]
            t = truth[idx] > 0
            for th in thresholds:
                fg = _foreground(probs[idx], th)
                lab, n = ndimage.label(fg, structure=structure)
                sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]
                overlap = np.bincount(lab[t], minlength=n + 1)[1:]
                self.components[(g, th)] = (sizes, overlap)

    def counts(self, g: str, s: Setting) -> tuple[int, int, int]:
        sizes, overlap = self.components[(g, s.threshold)]
        keep = sizes >= max(s.min_lesion_voxels, 1)
        if s.largest_component and len(sizes):
            largest = np.zeros(len(sizes), bool)
            largest[int(np.argmax(sizes))] = True
            keep &= largest
        tp = int(overlap[keep].sum())
        fp = int(sizes[keep].sum()) - tp
        return tp, fp, self.truth_total[g] - tp

    def mean_dice(self, groups: list[str], s: Setting) -> float:
        return float(np.mean([dice_from_counts(*self.counts(g, s)) for g in groups]))


def _grid(levers: tuple[str, ...], thresholds: tuple[float, ...]) -> list[Setting]:
    ths = thresholds if "threshold" in levers else (0.5,)
    mins = MIN_LESION_VOXELS if "min_lesion" in levers else (0,)
    lccs = (False, True) if "largest_component" in levers else (False,)
    return [Setting(t, m, c) for t, m, c in product(ths, mins, lccs)]


def choose_setting(tables: list[_PatientTable], grid: list[Setting]) -> Setting:
    """The setting of ``grid`` with the highest mean per-patient Dice over the patients of
    ``tables`` (each table: one fold's patients, predicted by that fold's model); the first one
    on a tie, so the default wins ties."""
    scores = np.zeros(len(grid))
    n = 0
    for table in tables:
        scores += np.array([table.mean_dice(table.groups, s) for s in grid]) * len(table.groups)
        n += len(table.groups)
    if n == 0:
        raise DataError("no patients to choose post-processing on")
    return grid[int(np.argmax(scores))]


def _seg_rows(
    fp: FoldProbs, view: str, setting: Setting, tolerance: float
) -> tuple[list[dict], list[dict]]:
    """``(oof.csv rows, oof_groups.csv rows)`` of a fold after post-processing each patient's
    volume; the patient rows score the post-processed volumes (NSD ``tolerance`` in px)."""
    probs = fp.probs[view]
    fg = _foreground(probs, setting.threshold).astype(np.uint8)
    for idx in patient_volumes(fp.groups, fp.ids).values():
        fg[idx] = postprocess(
            fg[idx],
            min_size_voxels=setting.min_lesion_voxels,
            largest_component=setting.largest_component,
        )
    rows = [
        segmentation_row(i, g, p, t)
        for i, g, p, t in zip(fp.ids, fp.groups, fg, fp.truth, strict=True)
    ]
    return rows, group_surface_rows(fp.ids, fp.groups, fg, fp.truth > 0, tolerance)


def _cls_rows(fp: FoldProbs, view: str) -> list[dict]:
    probs = fp.probs[view].astype(np.float32)
    names = fp.class_names or [str(c) for c in range(probs.shape[-1])]
    return [
        {
            "id": i,
            "group": g,
            "target": int(t),
            "pred": int(p.argmax()),
            **{f"p_{n}": round(float(v), 6) for n, v in zip(names, p, strict=True)},
        }
        for i, g, t, p in zip(fp.ids, fp.groups, fp.truth, probs, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Variants


def _write_variant(
    root: Path,
    name: str,
    rows_by_fold: dict[int, list[dict]],
    out_name: str = "tune",
    groups_by_fold: dict[int, list[dict]] | None = None,
) -> Path:
    vdir = root / out_name / name
    if vdir.exists():
        shutil.rmtree(vdir)
    vdir.mkdir(parents=True)
    for f in ("config.yaml", "splits.json"):
        shutil.copy2(root / f, vdir / f)
    for k, rows in rows_by_fold.items():
        write_cases(fold_dir(vdir, k) / "oof.csv", rows, {"fold": k})
    for k, rows in (groups_by_fold or {}).items():
        write_cases(fold_dir(vdir, k) / GROUPS_FILE, rows, {"fold": k})
    return vdir


def _headline(summary: dict) -> dict:
    out = {}
    for key in HEADLINE_KEYS:
        block = summary["metrics"].get(key)
        if block and block.get("pooled") is not None:
            out[key] = {"value": block["pooled"], "ci95": block.get("ci95")}
    return out


def all_fold_probabilities(root: Path) -> tuple:
    """``(config, manifest, {fold: FoldProbs})`` of a finished CV run folder."""
    if not (root / ENSEMBLE_NAME).is_file() or not (root / "splits.json").is_file():
        raise DataError(f"{root}: not a finished cross-validation run (no {ENSEMBLE_NAME})")
    cfg = open_run(root).config()
    manifest = load_manifest(root / "splits.json")
    k_folds = len(manifest.get("folds") or [])
    missing = [k for k in range(1, k_folds + 1) if not (fold_dir(root, k) / "oof.csv").is_file()]
    if missing:
        raise DataError(f"{fold_dir(root, missing[0])}: fold not finished; run medseg cv first")
    samples = scan_from_config(cfg.data).samples
    folds = {k: fold_probabilities(root, k, cfg, manifest, samples) for k in range(1, k_folds + 1)}
    return cfg, manifest, folds


def _mean_over_runs(root: Path, manifest: dict, folds: dict, others: list[Path]) -> dict:
    """Per fold, the mean probabilities of ``root``'s fold models and ``others``' (CV runs of
    the same task on the same folds): an out-of-fold ensemble of several recipes."""
    members = [folds]
    for other in others:
        _, other_manifest, other_folds = all_fold_probabilities(other)
        if other_manifest.get("folds") != manifest.get("folds"):
            raise DataError(
                f"{other}: its folds differ from those of {root} (splits.json); an out-of-fold "
                "ensemble needs the same folds (same data, cv.folds and seed)"
            )
        for k, fp in folds.items():
            ofp = other_folds[k]
            if ofp.ids != fp.ids or ofp.probs["last"].shape[-1] != fp.probs["last"].shape[-1]:
                raise DataError(
                    f"{fold_dir(other, k)}: its out-of-fold samples or outputs differ from "
                    f"those of {fold_dir(root, k)}"
                )
        members.append(other_folds)
    return {
        k: FoldProbs(
            ids=fp.ids,
            groups=fp.groups,
            truth=fp.truth,
            probs={
                v: mean_probabilities([m[k].probs[v] for m in members]).astype(np.float16)
                for v in VIEWS
            },
            class_names=fp.class_names,
        )
        for k, fp in folds.items()
    }


def tune_folder(ensemble_with: list[str | Path] | tuple = ()) -> str:
    """The folder, inside the CV run, that :func:`tune` writes to.

    ``tune`` for the run alone; ``tune-with-<name>[+<name>...]`` for the out-of-fold ensemble
    with other runs (their folder names, in the order given), so that each set of partners keeps
    its own results.

    Example:
        >>> tune_folder(["runs/lgg-ctx1", "runs/lgg-144"])
        'tune-with-lgg-ctx1+lgg-144'
    """
    names = [Path(o).resolve().name for o in ensemble_with]
    return "tune-with-" + "+".join(names) if names else "tune"


def _segmentation_variants(folds: dict[int, FoldProbs], add: Callable, tolerance: float) -> dict:
    """Score the segmentation variants through ``add(name, description, rows, settings,
    group_rows)``; returns the post-processing recommended for the ensemble (chosen on all
    folds). ``tolerance``: NSD tolerance (px) of the per-patient rows."""
    for view in VIEWS:
        scored = {k: _seg_rows(fp, view, Setting(), tolerance) for k, fp in folds.items()}
        add(
            view,
            VIEW_DESCRIPTIONS[view] + ", threshold 0.5",
            {k: r for k, (r, _) in scored.items()},
            None,
            {k: g for k, (_, g) in scored.items()},
        )
    tables = {
        view: {
            k: _PatientTable(fp.probs[view], fp.truth, patient_volumes(fp.groups, fp.ids))
            for k, fp in folds.items()
        }
        for view in ("last", "last_tta")
    }
    thresholds = next(iter(tables["last"].values())).thresholds  # (0.5,) for label maps
    for name, (view, lever_names, description) in LEVERS.items():
        grid = _grid(lever_names, thresholds)
        rows, group_rows, settings = {}, {}, {}
        for k, fp in folds.items():
            others = [t for j, t in tables[view].items() if j != k]
            chosen = choose_setting(others, grid)
            settings[k] = chosen.as_dict()
            rows[k], group_rows[k] = _seg_rows(fp, view, chosen, tolerance)
        add(name, description, rows, settings, group_rows)
    grid = _grid(("threshold", "min_lesion", "largest_component"), thresholds)
    chosen = choose_setting(list(tables["last_tta"].values()), grid)
    return {"checkpoint": "last", "tta": True, **chosen.as_dict()}


def tune(
    run_dir: str | Path,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    ensemble_with: list[str | Path] | tuple = (),
) -> dict:
    """Score the ablation variants of a finished CV run on its out-of-fold predictions.

    Args:
        run_dir: a ``medseg cv`` run folder whose folds have all finished.
        n_boot: bootstrap replicates (patients/groups resampled) for the 95% intervals.
        seed: bootstrap seed.
        ensemble_with: other finished CV runs on the same folds (e.g. another recipe): each
            fold's variants then score the mean probabilities of all the runs' fold models (an
            out-of-fold ensemble), written to ``<run>/tune-with-<other runs' names>/``
            (:func:`tune_folder`) instead of ``<run>/tune/``; the members are listed in its
            ``tune.json``.

    Returns:
        ``tune.json``'s content: ``task``, ``variants`` (name, description, settings per fold,
        headline metrics with ``ci95``), ``recommended`` (segmentation: the post-processing
        chosen on all folds for the ensemble), ``best_variant`` and ``folder`` (where it was
        written, inside ``run_dir``).

    Raises:
        DataError: the run is not a finished CV run, or a fold checkpoint is missing.
    """
    root = Path(run_dir)
    cfg, manifest, folds = all_fold_probabilities(root)
    k_folds = len(folds)
    ensemble_runs = [Path(o) for o in ensemble_with]
    out_name = tune_folder(ensemble_runs)
    if ensemble_runs:
        folds = _mean_over_runs(root, manifest, folds, ensemble_runs)
    seg = cfg.data.task == "segmentation"
    variants: list[dict] = []

    def add(name: str, description: str, rows: dict, settings=None, group_rows=None) -> None:
        vdir = _write_variant(root, name, rows, out_name, group_rows)
        summary = summarize(vdir, n_boot=n_boot, seed=seed)
        variants.append(
            {
                "name": name,
                "description": description,
                "settings_per_fold": settings,
                "metrics": _headline(summary),
                "folder": str(vdir.relative_to(root)),
            }
        )

    recommended = None
    if seg:
        recommended = _segmentation_variants(folds, add, cfg.evaluation.nsd_tolerance_mm)
    else:
        for view in VIEWS:
            add(view, VIEW_DESCRIPTIONS[view], {k: _cls_rows(fp, view) for k, fp in folds.items()})
    key = "dice_per_group_mean" if seg else "accuracy"
    honest = [v for v in variants if v["name"] != "best"]
    best = max(honest, key=lambda v: v["metrics"][key]["value"])
    write_report(root / best["folder"])
    result = {
        "task": cfg.data.task,
        "run": root.name,
        "ensemble_with": [str(o) for o in ensemble_runs],
        "folds": k_folds,
        "n_groups": len({g for fp in folds.values() for g in fp.groups}),
        "n_samples": sum(len(fp.ids) for fp in folds.values()),
        "variants": variants,
        "best_variant": best["name"],
        "recommended": recommended,
        "nsd_tolerance": cfg.evaluation.nsd_tolerance_mm if seg else None,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "unit": "group", "level": CI_LEVEL},
        "folder": out_name,
    }
    atomic_write_json(root / out_name / "tune.json", result)
    atomic_write_text(root / out_name / "ablation.md", ablation_markdown(result))
    logger.info("wrote %s", root / out_name / "tune.json")
    return result


def _fmt(metric: dict | None) -> str:
    if not metric:
        return "-"
    ci = metric.get("ci95")
    tail = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else ""
    return f"{metric['value']:.3f}{tail}"


#: Ablation columns of the per-patient surface metrics, naming unit and convention.
SURFACE_COLUMNS = {
    "hd95_per_group_mean": "HD95 per patient volume, mean (px)",
    "nsd_per_group_mean": "NSD@{t}px per patient volume, mean",
}


def ablation_markdown(result: dict) -> str:
    """The variants of :func:`tune` as a Markdown table (value [95% CI])."""
    seg = result["task"] == "segmentation"
    keys = (
        ("dice_per_group_mean", "dice_per_group_median", "dice", *SURFACE_COLUMNS)
        if seg
        else ("accuracy", "macro_f1", "balanced_accuracy", "ece")
    )
    tol = f"{float(result.get('nsd_tolerance') or 1.0):g}"
    names = [SURFACE_COLUMNS.get(k, k).format(t=tol) for k in keys]
    lines = [
        f"| variant | {' | '.join(names)} | what |",
        "|---" * (len(keys) + 2) + "|",
    ]
    for v in result["variants"]:
        cells = [_fmt(v["metrics"].get(k)) for k in keys]
        lines.append(f"| {v['name']} | {' | '.join(cells)} | {v['description']} |")
    return "\n".join(lines) + "\n"
