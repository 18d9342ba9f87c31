"""The ``medseg`` verbs: each parses nothing, calls one library function and prints its result.

Each command takes the parsed arguments and returns the exit code (see :mod:`medseg.cli`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path

EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


def _folder_to_claim(args) -> tuple[Path, str] | None:
    """The folder a command writes that must be locked before it starts (its run folder or
    ``--out``), and what it is; None when there is none to lock up front."""
    if args.verb == "predict":
        out = Path(args.out)
        return None if out.exists() and not out.is_dir() else (out, "output folder")
    if args.verb not in ("train", "cv"):
        return None
    if getattr(args, "workers", None) or "TF_CONFIG" in os.environ:
        return None  # a cluster: only the chief writes the run folder (create_run locks it)
    if getattr(args, "resume", None):
        run = Path(args.resume)
        return (run, "run folder") if run.is_dir() else None
    if not args.name:  # a new name with a time stamp: nobody else writes it
        return None
    from medseg.config import load_config

    cfg = load_config(args.config, _run_overrides(args))
    return Path(cfg.run.root) / cfg.run.name, "run folder"


@contextlib.contextmanager
def claim_folders(args):
    """Hold the lock (:mod:`medseg.locks`) of the folder the command writes, from before
    TensorFlow starts until the command ends: a second process given the same run folder or
    ``--out`` is refused within a second. The run's own code (``create_run``) takes the same
    lock again, at no cost; ``predict`` is locked here only.

    Raises:
        FolderInUseError: another process holds the folder (exit 2).
    """
    claim = _folder_to_claim(args)
    if claim is None:
        yield
        return
    from medseg import locks

    folder, what = claim
    locks.hold(folder, what)
    try:
        yield
    finally:
        locks.release(folder)


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
    names = args.only or ["unet", "classifier", "predict"]
    configs = {
        name: load_bench_config(name, given[name], args.overrides)
        for name in names
        if name not in ("unet3d", "predict")
    }
    predict = None
    if "predict" in names:
        from medseg.bench import DEFAULT_PREDICT_CONFIG
        from medseg.config import load_config

        predict = load_config(args.predict_config or DEFAULT_PREDICT_CONFIG, args.overrides)
    result = run_bench(
        configs,
        seconds=args.seconds,
        infer_paths=paths,
        torch_python=args.torch_python,
        torch_script=args.torch_script,
        torch_seconds=args.torch_seconds,
        torch=not args.no_torch,
        unet3d="unet3d" in names,
        peer3d_python=args.peer3d_python,
        predict=predict,
    )
    text = json.dumps(result)
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    print(text)
    return EXIT_OK


def _cmd_demo(args) -> int:
    if args.skip_3d and args.only_3d:
        from medseg.errors import ConfigError

        raise ConfigError("--skip-3d and --only-3d: give at most one")
    failed = 0
    if not args.only_3d:
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
        failed += r.predictions.n_failed
    if not args.skip_3d:
        failed += _demo_3d(args)
    return EXIT_PARTIAL if failed else EXIT_OK


def _demo_3d(args) -> int:
    """The 3D leg of ``medseg demo``; the number of failed predictions."""
    from medseg.demo3d import run_demo3d

    r = run_demo3d(args.config_3d, args.overrides_3d)
    print(f"\nmedseg demo, 3D leg, finished in {r.seconds / 60:.1f} min")
    print(f"  3D run folder: {r.run_dir}   (plan.json, fingerprint.json, cases_val.csv, ...)")
    print(f"  3D SavedModel: {r.export_dir}   (any volume shape and spacing in, labels out)")
    for row in r.predictions.rows:
        volumes = ", ".join(
            f"{k.removeprefix('volume_ml_')} {v} mL"
            for k, v in row.items()
            if k.startswith("volume_ml_")
        )
        files = ", ".join(str(row[k]) for k in ("mask", "seg") if row.get(k))
        print(f"  3D prediction: {row['case_id']} ({row['input_type']}): {volumes}; {files}")
    for name, block in r.val_metrics.get("structures", {}).items():
        print(f"  3D validation: {name} Dice {block['dice']['mean']:.3f}")
    return r.predictions.n_failed


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
    from medseg.artifacts.exports import folder_kind
    from medseg.errors import ConfigError, ModelError
    from medseg.evaluation.evaluate import evaluate, headline

    if args.export_oof:
        return _export_oof(args)
    if args.pred or args.truth or args.compare:
        return _evaluate_files(args)
    if args.run is None:
        raise ConfigError(
            "evaluate: give a run, CV or export folder, or --pred DIR --truth DIR, or --compare A B"
        )
    if args.groups:
        raise ConfigError("--groups applies to --pred/--truth and --compare")
    args.split, args.checkpoint = args.split or "val", args.checkpoint or "best"
    run = Path(args.run)
    try:
        kind = folder_kind(run)
    except ModelError:  # not a model folder: evaluate() below says what is missing
        kind = None
    if kind is not None and _is_3d(run):
        return _evaluate_3d(args)
    if args.out or kind in ("export", "cv"):
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
            tolerance_mm=1.0 if args.tolerance_mm is None else args.tolerance_mm,
        )
        print(f"{args.data}: {headline(metrics)}")
        for key in ("dice_per_group_mean", "accuracy", "macro_f1"):
            ci = metrics.get(f"{key}_ci95")
            if ci:
                print(f"  {key} {metrics[key]:.4f} (95% CI {ci[0]:.4f}-{ci[1]:.4f})")
        print(f"written: {Path(args.out) / 'metrics.json'}, cases.csv, groups.csv")
        return EXIT_OK
    extra = [o for o in ("tta", "largest_component", "overwrite") if getattr(args, o)]
    extra += ["with"] if args.ensemble_with else []
    extra += ["tolerance"] if args.tolerance_mm is not None else []
    if extra or args.threshold is not None or args.min_lesion_voxels or args.layout:
        raise ConfigError(
            "--tta, --threshold, --min-lesion-voxels, --largest-component, --layout, --with, "
            "--tolerance-mm and --overwrite need --data FOLDER --out DIR (a run's own split is "
            "scored with its evaluation.nsd_tolerance_mm)"
        )
    metrics = evaluate(args.run, split=args.split, checkpoint=args.checkpoint, data=args.data)
    print(f"{metrics['split']}: {headline(metrics)}")
    return EXIT_OK


#: ``evaluate`` options of a model, which scoring label-map folders does not take.
_MODEL_OPTIONS = {
    "split": "--split",
    "data": "--data",
    "layout": "--layout",
    "ensemble_with": "--with",
    "checkpoint": "--checkpoint",
    "tta": "--tta",
    "threshold": "--threshold",
    "min_lesion_voxels": "--min-lesion-voxels",
    "largest_component": "--largest-component",
}


def _check_files_args(args) -> None:
    """Refuse option mixes of ``evaluate --pred/--truth`` and ``--compare``, one line each."""
    from medseg.errors import ConfigError

    mode = "--compare" if args.compare else "--pred/--truth"
    if args.run is not None:
        raise ConfigError(
            f"{args.run}: {mode} scores label-map folders, not a run; give a run folder or "
            f"{mode}, not both"
        )
    given = [flag for key, flag in _MODEL_OPTIONS.items() if getattr(args, key)]
    if given:
        raise ConfigError(f"{', '.join(given)}: model options do not apply to {mode}")
    if args.compare and args.pred:
        raise ConfigError("--compare and --pred: give one (--compare A B takes --truth DIR)")
    if not args.compare and not (args.pred and args.truth):
        missing = "--truth DIR" if args.pred else "--pred DIR"
        raise ConfigError(f"{mode}: give both --pred DIR and --truth DIR (missing {missing})")
    if not args.out:
        raise ConfigError(f"{mode}: give --out DIR for the results")


def _evaluate_files(args) -> int:
    """``medseg evaluate --pred DIR --truth DIR`` and ``medseg evaluate --compare A B``."""
    _check_files_args(args)
    common = {
        "groups": Path(args.groups) if args.groups else None,
        "tolerance_mm": 1.0 if args.tolerance_mm is None else args.tolerance_mm,
        "n_boot": args.n_boot,
        "overwrite": args.overwrite,
    }
    out = Path(args.out)
    if args.compare:
        from medseg.evaluation.compare import compare, format_comparison

        a, b = (Path(p) for p in args.compare)
        truth = Path(args.truth) if args.truth else None
        result = compare(a, b, out, truth=truth, **common)
        print(format_comparison(result))
        print(f"written: {out}")
        return EXIT_OK
    from medseg.evaluation.files import score_folders
    from medseg.evaluation.volumetric import format_volumetric

    result = score_folders(Path(args.pred), Path(args.truth), out, **common)
    print(format_volumetric(result["summary"]))
    unit = result["unit"]
    for name, cis in result["ci_bca"].items():
        bca = ", ".join(f"{col} [{ci[0]:.3f}, {ci[1]:.3f}]" for col, ci in cis.items() if ci)
        print(f"  BCa 95% CI, {name}: {bca or '-'}")
    print(f"distances in {unit}; labels from {result['labels_from']}")
    print(f"written: {out / 'metrics.json'}, cases.csv, groups.csv, report.md")
    return EXIT_OK


def _export_oof(args) -> int:
    """``medseg evaluate CV_RUN --export-oof DIR``: the CV's out-of-fold label maps as NIfTI."""
    from medseg.errors import ConfigError
    from medseg.evaluation.oof_masks import PRED_DIR, TRUTH_DIR, export_oof_masks

    if args.run is None:
        raise ConfigError("--export-oof DIR: give the cross-validation folder to export")
    flags = {**_MODEL_OPTIONS, "out": "--out", "pred": "--pred", "truth": "--truth"}
    flags.update(compare="--compare", groups="--groups", tolerance_mm="--tolerance-mm")
    given = [flag for key, flag in flags.items() if getattr(args, key) not in (None, False, 0, [])]
    if given:
        raise ConfigError(f"{', '.join(given)}: do not apply to --export-oof (only --overwrite)")
    out = Path(args.export_oof)
    result = export_oof_masks(Path(args.run), out, overwrite=args.overwrite)
    per_fold = ", ".join(f"fold {k}: {n}" for k, n in result["cases_per_fold"].items())
    print(f"out-of-fold label maps: {result['n_cases']} cases ({per_fold}) -> {out}")
    pred, truth = out / PRED_DIR, out / TRUTH_DIR
    print(f"score them: medseg evaluate --pred {pred} --truth {truth} --out DIR")
    return EXIT_OK


def _is_3d(path: Path) -> bool:
    from medseg.inference.predict3d import is_volumetric_model

    return is_volumetric_model(path)


def _evaluate_3d(args) -> int:
    """``medseg evaluate`` for a 3D model: each structure in mm, with intervals."""
    from medseg.errors import ConfigError
    from medseg.evaluation.score3d import evaluate_volumes
    from medseg.evaluation.volumetric import format_volumetric

    unsupported = [o for o in ("tta", "overwrite", "layout") if getattr(args, o)]
    if unsupported or args.threshold is not None or args.min_lesion_voxels or args.ensemble_with:
        raise ConfigError(
            "--tta, --threshold, --min-lesion-voxels, --layout, --with and --overwrite do not "
            "apply to 3D models; both post-processings (none, largest component per structure) "
            "are always scored"
        )
    result = evaluate_volumes(
        args.run,
        split=args.split,
        data=args.data,
        out=args.out,
        checkpoint=args.checkpoint,
        n_boot=args.n_boot,
        tolerance_mm=args.tolerance_mm,
    )
    for key, summary in result.items():
        print(f"{key}:\n{format_volumetric(summary)}")
    print(f"written: {Path(args.out or args.run) / 'metrics.json'}")
    return EXIT_OK


def _tune_3d(args) -> int:
    """``medseg tune`` for a 3D cross-validation: post-processing and mirror TTA chosen out of
    fold."""
    from medseg.evaluation.report3d import tune_volumetric
    from medseg.evaluation.volumetric import format_volumetric

    result = tune_volumetric(args.run, n_boot=args.n_boot)
    for name, summary in result["variants"].items():
        print(f"{name}:\n{format_volumetric(summary)}")
    print(f"chosen on the other folds:\n{format_volumetric(result['chosen'])}")
    print(f"chosen per fold: {result['chosen_by_fold']}")
    print(f"written: {Path(args.run) / 'tune' / 'tune.json'}, ablation.md")
    return EXIT_OK


def _cmd_tune(args) -> int:
    from medseg.evaluation.report3d import is_volumetric_cv
    from medseg.evaluation.tune import ablation_markdown, tune

    if is_volumetric_cv(args.run):
        return _tune_3d(args)

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
        queue_depth=args.queue_depth,
    )
    from medseg.utils import display_text

    out = display_text(str(r.out_dir))
    print(
        f"{len(r.rows)} cases, {r.n_failed} failed, {r.n_slices} slices at "
        f"{r.end_to_end_slices_per_second:.1f} slices/s end to end "
        f"({r.slices_per_second:.1f} in the model) -> {out}/predictions.csv"
    )
    for row in r.rows:
        if row["status"] != "ok":
            print(f"  failed: {row['case_id']}: {display_text(row['error'])}", file=sys.stderr)
    return EXIT_PARTIAL if r.n_failed else EXIT_OK


def _cmd_audit(args) -> int:
    from medseg.data.audit import audit, format_audit

    root, layout, threshold = Path(args.source), args.layout, args.threshold
    cfg = None
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
        config=cfg,
        min_size=args.min_size,
    )
    print(format_audit(report))
    if args.out:
        print(f"written: {Path(args.out) / 'audit.json'}, {Path(args.out) / 'montage.png'}")
    return EXIT_OK


def _cmd_data(args) -> int:
    if args.data_verb == "audit":
        return _cmd_audit(args)
    if args.data_verb == "split":
        from medseg.cli.split_cmd import cmd_split

        return cmd_split(args)
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
