"""The ``medseg`` command line: thin wrappers around one library function per verb.

Exit codes: 0 success; 1 the job ran but some cases failed (they are listed); 2 bad usage,
configuration or input, or an output that cannot be written because the disk is full (one
readable line naming the file or key); 3 an unexpected internal error (a bug: rerun with
``--debug`` for the traceback and report it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

logger = logging.getLogger("medseg")


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


def _add_overwrite(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medseg",
        description="Medical image segmentation and classification on TensorFlow/Keras.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = sub.add_parser(
        "demo",
        help="run the whole chain on generated data (no download)",
        description="Generate synthetic phantoms, train a small U-Net, evaluate it on held-out "
        "patients, export a SavedModel and predict on held-out slices and pydicom's MR/CT scans.",
    )
    _add_config_args(p, "configs/demo.yaml")
    p.add_argument("--synth-dir", default="data/synthetic", help="synthetic data folder")

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
        "write cv_summary.json, report.md and report.html (mean +- std over folds, 95%% "
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

    p = sub.add_parser(
        "evaluate",
        help="evaluate a run on a split of its manifest, or any model on a labelled folder",
        description="With a run folder: Dice/IoU (segmentation) or accuracy/F1 "
        "(classification) of its model on one split of its split manifest, recorded in "
        "metrics.json. With --data FOLDER --out DIR: score a run, a cross-validation run (the "
        "ensemble of its folds) or an export folder on every labelled sample of FOLDER (any "
        "medseg layout), as the model is served (native resolution), with 95%% bootstrap "
        "intervals by patient/group; writes cases.csv, groups.csv, metrics.json and plots/.",
    )
    p.add_argument("run", help="run folder, cross-validation run folder or export folder")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument(
        "--data", metavar="FOLDER", help="evaluate on every labelled sample of a dataset folder"
    )
    p.add_argument("--out", help="with --data: folder for the per-case results")
    p.add_argument("--layout", help="layout of --data (default: the model's, or detected)")
    _add_with(
        p,
        "MODEL",
        "with --data: another model (repeatable); score the mean of the models' "
        "probabilities (e.g. two recipes' CV folders, as `medseg tune --with` scored them)",
    )
    p.add_argument("--checkpoint", default="best", choices=["best", "last"])
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
        "--only", choices=["unet", "classifier"], action="append", help="benchmark only this"
    )
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
    return parser


def _setup_logging(quiet: bool, debug: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="medseg: %(message)s",
        stream=sys.stderr,
    )
    if not debug:
        # pydicom logs a traceback of its own before medseg reports a failed decode in one line.
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
        # highdicom logs the source's SOP instance UIDs at INFO level
        logging.getLogger("highdicom").setLevel(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _cmd_bench(args) -> int:
    import json

    from medseg.bench import INFER_PATHS, load_bench_config, run_bench
    from medseg.errors import ConfigError
    from medseg.utils import atomic_write_text

    paths = tuple(p.strip() for p in args.infer_paths.split(",") if p.strip())
    unknown = sorted(set(paths) - set(INFER_PATHS))
    if unknown or not paths:
        raise ConfigError(
            f"--infer-paths: unknown path(s) {', '.join(unknown) or '(none given)'}; expected "
            f"some of {', '.join(INFER_PATHS)}"
        )
    given = {"unet": args.unet_config, "classifier": args.classifier_config}
    configs = {
        name: load_bench_config(name, given[name], args.overrides)
        for name in (args.only or ["unet", "classifier"])
    }
    result = run_bench(
        configs,
        seconds=args.seconds,
        infer_paths=paths,
        torch_python=args.torch_python,
        torch_script=args.torch_script,
        torch_seconds=args.torch_seconds,
        torch=not args.no_torch,
    )
    text = json.dumps(result)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return EXIT_OK


def _cmd_demo(args) -> int:
    from medseg.demo import run_demo

    r = run_demo(args.config, args.overrides, synth_dir=args.synth_dir)
    m = r.test_metrics
    print(f"\nmedseg demo finished in {r.seconds / 60:.1f} min")
    print(f"  run folder:   {r.run_dir}   (config, splits, checkpoints, logs, plots, metrics)")
    print(f"  SavedModel:   {r.export_dir}")
    print(
        f"  predictions:  {r.predictions.out_dir}/predictions.csv "
        f"({len(r.predictions.rows)} cases, {r.predictions.n_failed} failed)"
    )
    print(
        f"  test patients: Dice {m['dice']:.3f}, IoU {m['iou']:.3f}, per-patient Dice "
        f"{m['dice_per_group_mean']:.3f} (mean) / {m['dice_per_group_median']:.3f} (median)"
    )
    return EXIT_PARTIAL if r.predictions.n_failed else EXIT_OK


def _run_overrides(args) -> list[str]:
    """``--set`` values plus what ``--name`` and ``--overwrite`` say about the run folder."""
    overrides = list(args.overrides)
    if args.name:
        overrides.append(f"run.name={args.name}")
    if args.overwrite:
        overrides.append("run.overwrite=true")
    return overrides


def _cmd_train(args) -> int:
    from medseg.config import load_config
    from medseg.errors import ConfigError
    from medseg.evaluation.evaluate import headline
    from medseg.training.cluster import tf_config_for
    from medseg.training.train import resume, train

    if (args.workers is None) != (args.worker_index is None):
        given = "--workers" if args.workers is not None else "--worker-index"
        raise ConfigError(f"{given}: give both --workers and --worker-index (or set TF_CONFIG)")
    if args.workers is not None:
        os.environ["TF_CONFIG"] = tf_config_for(args.workers, args.worker_index)
    if not args.debug:
        # tf.distribute logs every collective it builds at INFO level
        logging.getLogger("tensorflow").setLevel(logging.WARNING)
    if args.resume:
        result = resume(args.resume)
    else:
        result = train(load_config(args.config, _run_overrides(args)))
    if not result.is_chief:
        print(f"worker finished; the chief writes the run folder: {result.run.path}")
        print(f"final weights: {result.weights}")
        return EXIT_OK
    print(f"run: {result.run.path}")
    print(f"val: {headline(result.metrics)}")
    return EXIT_OK


def _cmd_cv(args) -> int:
    from medseg.config import load_config
    from medseg.errors import ConfigError
    from medseg.training.cv import run_cv

    overrides = _run_overrides(args)
    if args.folds:
        overrides.append(f"cv.folds={args.folds}")
    only = None
    if args.only:
        try:
            only = [int(x) for x in args.only.split(",") if x.strip()]
        except ValueError:
            raise ConfigError(
                f"--only: expected fold numbers like 2,3, got {args.only!r}"
            ) from None
    result = run_cv(
        load_config(args.config, overrides),
        only=only,
        executor=args.executor,
        address=args.address,
    )
    print(f"cross-validation: {result.path} (folds done: {result.folds_done})")
    for line in result.summary.get("headline", []):
        print(f"  {line}")
    print(f"  report: {result.path / 'report.md'}")
    return EXIT_OK


def _cmd_evaluate(args) -> int:
    from medseg.errors import ConfigError
    from medseg.evaluation.evaluate import evaluate, headline

    run = Path(args.run)
    is_export = (run / "medseg.json").is_file()
    is_cv = (run / "ensemble.json").is_file()
    if args.out or is_export or is_cv:
        if not args.data or not args.out:
            raise ConfigError(
                f"{run}: an export or cross-validation folder is scored on a labelled folder: "
                "give --data FOLDER and --out DIR"
            )
        from medseg.evaluation.scoring import evaluate_model

        metrics = evaluate_model(
            run,
            args.data,
            args.out,
            layout=args.layout,
            checkpoint=args.checkpoint,
            tta=args.tta,
            threshold=args.threshold,
            min_lesion_voxels=args.min_lesion_voxels,
            largest_component=args.largest_component,
            overwrite=args.overwrite,
            n_boot=args.n_boot,
            ensemble_with=args.ensemble_with,
        )
        print(f"{args.data}: {headline(metrics)}")
        for key in ("dice_per_group_mean", "accuracy", "macro_f1"):
            ci = metrics.get(f"{key}_ci95")
            if ci:
                print(f"  {key} {metrics[key]:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f})")
        print(f"written: {Path(args.out) / 'metrics.json'}, cases.csv")
        return EXIT_OK
    extra = [o for o in ("tta", "largest_component", "overwrite") if getattr(args, o)]
    extra += ["with"] if args.ensemble_with else []
    if extra or args.threshold is not None or args.min_lesion_voxels or args.layout:
        raise ConfigError(
            "--tta, --threshold, --min-lesion-voxels, --largest-component, --layout, --with "
            "and --overwrite need --data FOLDER --out DIR"
        )
    metrics = evaluate(args.run, split=args.split, checkpoint=args.checkpoint, data=args.data)
    print(f"{metrics['split']}: {headline(metrics)}")
    return EXIT_OK


def _cmd_tune(args) -> int:
    from medseg.evaluation.tune import ablation_markdown, tune

    result = tune(args.run, n_boot=args.n_boot, ensemble_with=args.ensemble_with)
    print(ablation_markdown(result), end="")
    print(f"best honest variant: {result['best_variant']}")
    rec = result["recommended"]
    if rec:
        print(f"recommended post-processing (chosen on all folds): {rec}")
        flags = f"--threshold {rec['threshold']} --min-lesion-voxels {rec['min_lesion_voxels']}"
        flags += " --largest-component" if rec["largest_component"] else ""
        tta = " --tta" if rec["tta"] else ""
        exports = []
        for run in [args.run, *args.ensemble_with]:  # several runs: one export each
            exports.append(str(Path("models") / Path(run).name))
            print(f"  export: medseg export {run} --checkpoint last{tta} --out {exports[-1]}")
        models = " ".join([exports[0], *(f"--with {e}" for e in exports[1:])])
        print(f"  then:   medseg predict --model {models} INPUTS --out DIR {flags}")
        print(f"          medseg evaluate {models} --data FOLDER --out DIR {flags}")
    print(f"written: {Path(args.run) / result['folder'] / 'tune.json'}")
    return EXIT_OK


def _cmd_export(args) -> int:
    from medseg.inference.export import export_run

    out = export_run(
        args.run,
        args.out,
        checkpoint=args.checkpoint,
        overwrite=args.overwrite,
        ensemble=args.ensemble,
        tta=args.tta,
        formats=args.format,
    )
    print(f"exported: {out}")
    return EXIT_OK


def _cmd_predict(args) -> int:
    from medseg.inference.predict import predict

    r = predict(
        args.model,
        args.inputs,
        args.out,
        batch_size=args.batch_size,
        overlays=not args.no_overlays,
        overwrite=args.overwrite,
        threshold=args.threshold,
        largest_component=args.largest_component,
        min_lesion_voxels=args.min_lesion_voxels,
        progress=not args.no_progress,
        mc_samples=args.mc_samples,
        explain=args.explain,
        keep_identifiers=args.keep_identifiers,
        executor=args.executor,
        address=args.address,
        ray_workers=args.ray_workers,
        ensemble_with=args.ensemble_with,
    )
    print(
        f"{len(r.rows)} cases, {r.n_failed} failed, {r.n_slices} slices at "
        f"{r.end_to_end_slices_per_second:.1f} slices/s end to end "
        f"({r.slices_per_second:.1f} in the model) -> {r.out_dir}/predictions.csv"
    )
    for row in r.rows:
        if row["status"] != "ok":
            print(f"  failed: {row['case_id']}: {row['error']}", file=sys.stderr)
    return EXIT_PARTIAL if r.n_failed else EXIT_OK


def _cmd_audit(args) -> int:
    from medseg.data.audit import audit, format_audit

    root, layout, threshold = Path(args.source), args.layout, args.threshold
    if root.suffix in (".yaml", ".yml"):
        from medseg.config import load_config

        cfg = load_config(root)
        root, layout = Path(cfg.data.root), layout or cfg.data.layout
        threshold = cfg.data.phash_threshold if threshold is None else threshold
    report = audit(
        root,
        layout,
        args.out,
        threshold=6 if threshold is None else threshold,
        strict=args.strict,
    )
    print(format_audit(report))
    if args.out:
        print(f"written: {Path(args.out) / 'audit.json'}, {Path(args.out) / 'montage.png'}")
    return EXIT_OK


def _cmd_data(args) -> int:
    if args.data_verb == "audit":
        return _cmd_audit(args)
    from medseg.data.synthetic import SynthSpec, generate

    spec = SynthSpec(
        seed=args.seed,
        size=args.size,
        patients=args.patients,
        slices_per_patient=args.slices,
        images_per_class=args.per_class,
    )
    s = generate(Path(args.out), spec, overwrite=args.overwrite)
    state = "generated" if s.created else "already present (identical spec), reused"
    print(f"{s.root}: {state}")
    print(
        f"  segmentation:   {s.segmentation_dir} ({s.n_seg_slices} slices, "
        f"{s.n_seg_tumour_slices} with tumour)"
    )
    print(f"  classification: {s.classification_dir} ({s.n_cls_images} images)")
    return EXIT_OK


def _cmd_models(args) -> int:
    from medseg.models.hub import make_hub_module

    out = make_hub_module(
        args.out,
        input_size=args.input_size,
        alpha=args.alpha,
        weights=args.weights,
        bn_momentum=args.bn_momentum,
        overwrite=args.overwrite,
    )
    print(f"written: {out} (use --set model.hub_handle={out})")
    return EXIT_OK


COMMANDS = {
    "cv": _cmd_cv,
    "models": _cmd_models,
    "demo": _cmd_demo,
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "tune": _cmd_tune,
    "export": _cmd_export,
    "predict": _cmd_predict,
    "data": _cmd_data,
    "bench": _cmd_bench,
}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medseg`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet, args.debug)
    if not args.debug and args.verb != "data":
        from medseg.utils import import_tensorflow_quietly

        import_tensorflow_quietly()
    from medseg.errors import MedsegError

    try:
        return COMMANDS[args.verb](args)
    except MedsegError as e:
        if args.debug:
            raise
        print(f"medseg: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("medseg: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            raise
        from medseg.utils import is_disk_full

        if is_disk_full(e):  # a full disk outside medseg's own writers (TensorFlow, Keras)
            where = getattr(e, "filename", None) or "output"
            print(f"medseg: error: {where}: no space left on the output disk", file=sys.stderr)
            return EXIT_USAGE
        print(
            f"medseg: internal error: {type(e).__name__}: {e} (rerun with --debug for the "
            "traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
