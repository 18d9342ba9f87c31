"""The ``medseg`` argument parser: global flags and one subcommand per verb.

The global flags (``--debug``, ``--quiet``) are accepted anywhere: before the verb, after it and
after a sub-verb (``medseg data audit X --debug``): every verb's parser is a :class:`VerbParser`.
"""

from __future__ import annotations

import argparse

from medseg.cli.split_cmd import add_split_verb


def _add_global_options(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    p.add_argument(
        "--quiet", "-q", action="store_true", default=default, help="only warnings and errors"
    )


class VerbParser(argparse.ArgumentParser):
    """The parser of a verb (and, through ``add_subparsers``, of its sub-verbs): it accepts the
    global options too, without a default of its own, so that one given before the verb
    stands."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _add_global_options(self, default=argparse.SUPPRESS)


def _add_config_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    p.add_argument(
        "--config", "-c", default=default, help=f"YAML config file (default: {default or 'none'})"
    )
    _add_set(p, "override one config value, e.g. --set train.epochs=5 (repeatable)")


def _add_set(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _add_with(p: argparse.ArgumentParser, metavar: str, help: str) -> None:
    """``--with MODEL`` (repeatable): more models or runs averaged with the first."""
    p.add_argument(
        "--with", dest="ensemble_with", action="append", default=[], metavar=metavar, help=help
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _add_files_args(p: argparse.ArgumentParser) -> None:
    """``evaluate``'s options for label-map folders: ``--pred``, ``--truth``, ``--compare``,
    ``--groups`` and ``--tolerance-mm``."""
    p.add_argument(
        "--pred", metavar="DIR", help="folder of predicted label maps to score against --truth"
    )
    p.add_argument(
        "--truth",
        metavar="DIR",
        help="folder of reference label maps, the same case ids (labels from a dataset.json "
        "in it or its parent, else the values found)",
    )
    p.add_argument(
        "--compare",
        nargs=2,
        metavar=("A", "B"),
        help="compare two evaluate outputs, or two prediction folders (with --truth)",
    )
    p.add_argument(
        "--groups",
        metavar="CSV",
        help="with --pred or --compare: CSV with columns case,patient (default: one patient "
        "per case)",
    )
    p.add_argument(
        "--tolerance-mm",
        type=float,
        metavar="MM",
        help="with --pred, --compare, --data or a 3D model: NSD tolerance in mm (pixels "
        "without spacing; default 1; a run's own split: its evaluation.nsd_tolerance_mm)",
    )


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    """The ``medseg`` argument parser: ``--debug``, ``--quiet`` and one subcommand per verb."""
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical image segmentation and classification on TensorFlow/Keras.",
    )
    _add_global_options(parser)
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True, parser_class=VerbParser)

    _add_run_verbs(sub)
    _add_model_verbs(sub)
    _add_predict_verb(sub)
    _add_tool_verbs(sub)
    return parser


def _add_run_verbs(sub) -> None:
    """``demo``, ``train``, ``cv`` and ``tune``."""
    p = sub.add_parser(
        "demo",
        help="run the whole chain on generated data (no download)",
        description="Generate synthetic phantoms, train a small U-Net, evaluate it on held-out "
        "patients, export a SavedModel and predict on held-out slices and pydicom's MR/CT scans; "
        "then the 3D leg: synthetic volumes, a 3D U-Net, its export, and predictions on a NIfTI "
        "volume and a DICOM series (label NIfTI, DICOM SEG, volumes in mL).",
    )
    _add_config_args(p, "configs/demo.yaml")
    p.add_argument("--synth-dir", default="data/synthetic", help="synthetic data folder")
    p.add_argument(
        "--config-3d", default="configs/demo3d.yaml", help="config of the 3D leg (unet3d)"
    )
    p.add_argument(
        "--set-3d",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides_3d",
        help="override a value of the 3D leg's config",
    )
    p.add_argument("--skip-3d", action="store_true", help="run only the 2D leg")
    p.add_argument("--only-3d", action="store_true", help="run only the 3D leg")

    p = sub.add_parser(
        "train",
        help="train a model into runs/<name>/",
        description="Train the configured model, write checkpoints, logs and plots into "
        "runs/<name>/, and evaluate it on the validation split. Rerunning the same command "
        "resumes an unfinished run.",
    )
    _add_config_args(p)
    p.add_argument("--name", help="run name (default: <config name>-<timestamp>)")
    p.add_argument(
        "--resume",
        metavar="RUN",
        help="continue an unfinished run folder with its own config (other options ignored)",
    )
    _add_overwrite(p)
    p.add_argument(
        "--workers",
        metavar="HOST:PORT,...",
        help="multi-worker training: every worker's address, the same list on each worker "
        "(worker 0 is the chief and writes the run folder); sets TF_CONFIG",
    )
    p.add_argument(
        "--worker-index",
        type=int,
        metavar="N",
        help="this worker's position in --workers (0-based)",
    )

    p = sub.add_parser(
        "cv",
        help="K-fold cross-validation into runs/<name>/ (resumable)",
        description="Split by group (patient or near-duplicate group) into K folds, train one "
        "fresh model per fold into runs/<name>/fold_<k>/, save out-of-fold predictions, and "
        "write cv_summary.json, report.md and report.html (mean +- std over folds, 95% "
        "bootstrap CIs by group). Rerunning the same command skips finished folds and resumes "
        "an unfinished one.",
    )
    _add_config_args(p)
    p.add_argument("--folds", type=_positive_int, help="number of folds (default: cv.folds)")
    p.add_argument("--only", help="train only these folds now, e.g. 2,3 (1-based)")
    p.add_argument("--name", help="run name (default: <config name>-<timestamp>)")
    p.add_argument("--executor", default="local", choices=["local", "ray"])
    p.add_argument("--address", help="Ray cluster address (default: a local Ray instance)")
    _add_overwrite(p)

    p = sub.add_parser(
        "tune",
        help="ablation and post-processing tuning of a finished CV run, out of fold",
        description="Score a finished cross-validation run's out-of-fold predictions under "
        "several variants: best vs last checkpoint, flip TTA and (segmentation) threshold, "
        "minimum 3D lesion size and 3D largest component, each chosen on the OTHER folds only. "
        "Writes <run>/tune/tune.json, ablation.md and a report per variant; prints the table "
        "and the post-processing recommended for the exported ensemble.",
    )
    p.add_argument("run", help="cross-validation run folder (runs/<name>)")
    p.add_argument(
        "--n-boot", type=int, default=1000, help="bootstrap replicates for the 95%% intervals"
    )
    _add_with(
        p,
        "RUN",
        "another finished CV run on the same folds (repeatable): score the out-of-fold "
        "ensemble (mean probabilities) of the runs instead; written to "
        "<run>/tune-with-<OTHER>/ (one folder per set of partners)",
    )


def _add_model_verbs(sub) -> None:
    """``evaluate`` and ``export``."""
    p = sub.add_parser(
        "evaluate",
        help="evaluate a run or any model on a labelled folder, score any tool's label maps "
        "(--pred/--truth), or compare two models (--compare)",
        description="With a run folder: Dice/IoU (segmentation) or accuracy/F1 "
        "(classification) of its model on one split of its split manifest, recorded in "
        "metrics.json. With --data FOLDER --out DIR: score a run, a cross-validation run (the "
        "ensemble of its folds) or an export folder on every labelled sample of FOLDER (any "
        "medseg layout), as the model is served (native resolution), with 95% bootstrap "
        "intervals by patient/group; writes cases.csv, groups.csv, metrics.json and plots/. "
        "With --pred DIR --truth DIR --out DIR (no run folder): score label maps made by any "
        "tool (NIfTI, PNG/TIFF, DICOM SEG; matched by case id, the file name without its "
        "extension) per case and structure: Dice, HD95, ASSD, NSD and volumes, in mm where "
        "the files carry a spacing (else pixels), with percentile and BCa 95% intervals over "
        "patients (--groups); writes cases.csv, groups.csv, metrics.json and report.md. "
        "With --compare A B --out DIR: the paired difference B - A per metric, with a paired "
        "patient-bootstrap interval and the Wilcoxon signed-rank p-value; A and B are "
        "evaluate outputs, or prediction folders scored against --truth DIR. "
        "With a CV folder and --export-oof DIR: write the CV's out-of-fold label maps.",
    )
    p.add_argument(
        "run",
        nargs="?",
        help="run folder, cross-validation run folder or export folder (not with --pred or "
        "--compare)",
    )
    p.add_argument(
        "--split", choices=["train", "val", "test"], help="split of a run folder (default: val)"
    )
    p.add_argument(
        "--data", metavar="FOLDER", help="evaluate on every labelled sample of a dataset folder"
    )
    p.add_argument("--out", help="with --data, --pred or --compare: folder for the results")
    _add_files_args(p)
    p.add_argument(
        "--export-oof",
        metavar="DIR",
        help="with a finished CV folder (3D, or 2D segmentation: one volume per patient, "
        "named patient_<n>): write its out-of-fold label maps (each case predicted by the fold "
        "model that did not train on it, as the CV scored it) as NIfTI in DIR/pred and "
        "DIR/truth, to score with --pred DIR/pred --truth DIR/truth",
    )
    p.add_argument("--layout", help="layout of --data (default: the model's, or detected)")
    _add_with(
        p,
        "MODEL",
        "with --data: another model (repeatable); score the mean of the models' "
        "probabilities (e.g. two recipes' CV folders, as `medseg tune --with` scored them)",
    )
    p.add_argument(
        "--checkpoint", choices=["best", "last"], help="checkpoint of a run (default: best)"
    )
    p.add_argument("--tta", action="store_true", help="mean with the horizontal flip")
    p.add_argument("--threshold", type=float, help="foreground threshold (binary models)")
    p.add_argument(
        "--min-lesion-voxels",
        type=int,
        default=0,
        help="remove 3D components smaller than this (per patient)",
    )
    p.add_argument(
        "--largest-component", action="store_true", help="keep each patient's largest component"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap replicates")
    _add_overwrite(p)

    p = sub.add_parser(
        "export",
        help="export a run as a SavedModel with in-graph preprocessing",
        description="Write <out>/saved_model (signature 'serve': raw pixels in, probabilities "
        "and masks out; 'model': preprocessed input), <out>/medseg.json (model card), a Keras "
        "copy (model.keras, or folds/ for a CV ensemble) and optionally model.tflite, after "
        "checking that each reloaded format matches the Keras model. A CV run folder exports "
        "the mean-probability ensemble of its folds.",
    )
    p.add_argument("run", help="run folder (runs/<name>)")
    p.add_argument("--out", help="export folder (default: <export.dir>/<run name>)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
    p.add_argument(
        "--format",
        default="savedmodel",
        choices=["savedmodel", "tflite", "both"],
        help="savedmodel (default), tflite (preprocessed input, see medseg.json) or both",
    )
    p.add_argument(
        "--ensemble",
        action="store_true",
        help="mean-probability ensemble of a CV run's folds (automatic for a CV run folder)",
    )
    p.add_argument(
        "--tta", action="store_true", help="average with the horizontally flipped image, in-graph"
    )
    _add_overwrite(p)


def _add_predict_verb(sub) -> None:
    """``predict``."""
    p = sub.add_parser(
        "predict",
        help="predict on images, DICOM files or folders",
        description="Predict every input file (PNG/JPEG/TIFF/DICOM; folders are searched) and "
        "write masks, overlays, predictions.csv and predictions.json into --out.",
    )
    p.add_argument("--model", "-m", required=True, help="export folder or run folder")
    _add_with(
        p,
        "MODEL",
        "another model of the same outputs (repeatable): predict with the mean of the "
        "models' probabilities, each fed as it is served (e.g. the 2D and 2.5D LGG recipes' "
        "exports, as `medseg tune --with` scored them)",
    )
    p.add_argument("inputs", nargs="+", help="files or folders")
    p.add_argument("--out", "-o", required=True, help="output folder")
    p.add_argument(
        "--batch-size", type=_positive_int, default=8, help="images/slices per model call"
    )
    p.add_argument(
        "--queue-depth",
        type=int,
        help="local executor: the most cases in flight at once (read ahead, in the model, being "
        "written); bounds the memory (default: 2 x batch size, at most one of them a volume); "
        "0: one case at a time",
    )
    p.add_argument("--no-overlays", action="store_true", help="skip overlay PNGs")
    p.add_argument(
        "--threshold", type=float, help="foreground probability threshold (binary segmentation)"
    )
    p.add_argument(
        "--largest-component",
        action="store_true",
        help="keep only the largest connected lesion (3D for volumes)",
    )
    p.add_argument(
        "--min-lesion-voxels", type=int, default=0, help="remove lesions smaller than this"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--mc-samples",
        type=int,
        default=0,
        help="MC-dropout passes per case for an uncertainty score and map (0: off)",
    )
    p.add_argument(
        "--explain", action="store_true", help="classifiers: write a Grad-CAM heatmap per case"
    )
    p.add_argument(
        "--keep-identifiers",
        action="store_true",
        help="name DICOM cases after the PatientID (made file-name safe) and add patient_id, "
        "patient_name and study_date to the tables; off by default: no patient or study data "
        "in names, tables or logs",
    )
    p.add_argument(
        "--executor",
        default="local",
        choices=["local", "ray"],
        help="local: in this process; ray: over a pool of Ray workers that each load the model "
        "once (needs medseg[ray]; --out, inputs and model on storage every worker sees)",
    )
    p.add_argument(
        "--address",
        help="Ray cluster address, e.g. auto or ray://head:10001 (default: a local Ray instance)",
    )
    p.add_argument(
        "--ray-workers",
        type=_positive_int,
        help="Ray workers (default: one per GPU of the cluster, else one per CPU)",
    )
    _add_overwrite(p)


def _add_tool_verbs(sub) -> None:
    """``bench``, ``models make-hub-module``, ``data synth`` and ``data audit``."""
    p = sub.add_parser(
        "bench",
        help="measure training, inference and input-pipeline speed on this machine",
        description="Benchmark the reference U-Net and the MobileNetV2 classifier (or the given "
        "configs): input pipeline, training steps and inference (Keras, folded batch norm, "
        "SavedModel, TFLite) in images/s, FLOPs, peak memory and the fraction of a measured "
        "matmul peak; beside a PyTorch reference U-Net when torch is available. The last line "
        "printed is one JSON object (docs/performance.md).",
    )
    p.add_argument(
        "--only",
        choices=["unet", "classifier", "predict", "unet3d"],
        action="append",
        help="benchmark only this (predict: batch inference end to end beside the model; "
        "unet3d: the 3D U-Net beside the torch/MONAI peer, run only when named)",
    )
    p.add_argument("--predict-config", help="model config of predict (default: lgg-unet)")
    p.add_argument("--unet-config", help="config of the U-Net benchmark (default: bench-unet)")
    p.add_argument(
        "--classifier-config", help="config of the classifier benchmark (default: bench-classifier)"
    )
    _add_set(p, "override a value of every benchmarked config, e.g. train.steps_per_execution=4")
    p.add_argument("--seconds", type=float, default=20.0, help="timed seconds per model")
    p.add_argument(
        "--infer-paths",
        default="keras,keras_folded,savedmodel,tflite",
        help="inference paths to time (comma-separated)",
    )
    p.add_argument("--torch-python", help="interpreter with torch for the PyTorch reference")
    p.add_argument("--torch-script", help="reference script printing the same JSON keys")
    p.add_argument("--torch-seconds", type=float, default=8.0, help="reference training seconds")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    p.add_argument(
        "--peer3d-python", help="interpreter with torch and MONAI for the unet3d peer benchmark"
    )
    p.add_argument("--out", help="also write the JSON to this file")

    models = sub.add_parser("models", help="model tools").add_subparsers(
        dest="models_verb", metavar="MODELS_VERB", required=True
    )
    p = models.add_parser(
        "make-hub-module",
        help="write a MobileNetV2 TF-Hub feature-vector module",
        description="Write a TF-Hub reusable SavedModel (images in [0, 1] -> pooled features) "
        "from keras.applications' MobileNetV2, for model.hub_handle, without network access.",
    )
    p.add_argument("--out", required=True, help="module folder")
    p.add_argument("--input-size", type=_positive_int, default=224, help="square input size")
    p.add_argument("--alpha", type=float, default=1.0, help="MobileNetV2 width multiplier")
    p.add_argument(
        "--weights", metavar="FILE", help="local MobileNetV2 no-top weights file (default: random)"
    )
    p.add_argument("--bn-momentum", type=float, default=0.9, help="batch-norm momentum")
    _add_overwrite(p)

    data = sub.add_parser("data", help="dataset tools").add_subparsers(
        dest="data_verb", metavar="DATA_VERB", required=True
    )
    p = data.add_parser(
        "synth",
        help="generate the synthetic phantom dataset",
        description="Write deterministic brain-MRI-like phantoms: LGG-layout segmentation "
        "patients and brain-tumour-layout class folders.",
    )
    p.add_argument("--out", default="data/synthetic", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--patients", type=int, default=12, help="segmentation patients")
    p.add_argument("--slices", type=int, default=16, help="slices per patient")
    p.add_argument("--per-class", type=int, default=40, help="training images per class")
    _add_overwrite(p)

    p = data.add_parser(
        "audit",
        help="report what a dataset folder holds and what would leak",
        description="Detect the layout of a dataset folder (or take it from a config), then "
        "report counts per class/split/group, image sizes and intensities, unreadable files, "
        "mask problems, near-duplicates within and across splits and classes, and groups that "
        "would leak. Writes audit.json and montage.png into --out.",
    )
    p.add_argument("source", help="dataset folder, or a YAML config (its data.root and layout)")
    p.add_argument("--layout", help="dataset layout (default: detected, or the config's)")
    p.add_argument("--out", help="folder for audit.json and montage.png")
    p.add_argument(
        "--threshold", type=int, default=None, help="perceptual-hash distance of near-duplicates"
    )
    p.add_argument("--strict", action="store_true", help="fail on the first unusable file")
    p.add_argument(
        "--min-size",
        type=int,
        default=16,
        metavar="N",
        help="report images with fewer than N pixels along a side (default 16)",
    )
    add_split_verb(data)
