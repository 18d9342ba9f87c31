"""``medseg data split PATH --folds K [--export nnunet|monai] --out FILE``.

Makes the grouped folds ``medseg cv`` would make (patients, or near-duplicate groups, never
across folds) and writes them as medseg's ``splits.json``, nnU-Net v2's ``splits_final.json`` or
a MONAI datalist with a ``fold`` key (:mod:`medseg.data.split_export`). ``PATH`` is a dataset
folder or a YAML config, resolved as ``medseg data audit`` does.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

DEFAULT_FOLDS = 5


def _folds(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be >= 2, got {value}")
    return value


def add_split_verb(data_subparsers) -> argparse.ArgumentParser:
    """Add ``split`` to the ``medseg data`` subparsers; returns its parser."""
    p = data_subparsers.add_parser(
        "split",
        help="write leak-free grouped folds for medseg, nnU-Net or MONAI",
        description="Split a dataset into K folds by group (patient folder, case, or "
        "near-duplicate group), as `medseg cv` does with the same config, and write them: "
        "without --export medseg's splits.json manifest; --export nnunet: nnU-Net v2's "
        "splits_final.json (case ids: nnU-Net's identifiers for an MSD/nnU-Net dataset, "
        "medseg's sample ids, i.e. paths relative to the root, for other layouts); --export "
        "monai: a MONAI datalist (load_decathlon_datalist, Auto3DSeg) with paths relative to "
        "the dataset root and a 0-based 'fold' key. Folds are numbered from 0, as both tools "
        "count them. Prints the groups and cases of each fold, never an id.",
    )
    p.add_argument(
        "source",
        metavar="PATH",
        help="dataset folder, or a YAML config (its data section, cv.folds, train.seed, "
        "data.test_fraction)",
    )
    p.add_argument("--layout", help="dataset layout (default: detected, or the config's)")
    p.add_argument(
        "--folds",
        type=_folds,
        help=f"number of folds (default: the config's cv.folds, or {DEFAULT_FOLDS})",
    )
    p.add_argument("--seed", type=int, help="split seed (default: the config's train.seed, or 0)")
    p.add_argument(
        "--export",
        choices=["nnunet", "monai"],
        help="nnunet: splits_final.json; monai: a datalist (default: medseg's splits.json)",
    )
    p.add_argument("--out", required=True, metavar="FILE", help="the file to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    return p


def _scan(args):
    """The scanned dataset and the config (None for a folder) that ``args.source`` names."""
    from medseg.data.scan import scan_dataset, scan_from_config
    from medseg.errors import ConfigError

    source, cfg = Path(args.source), None
    try:
        if source.suffix in (".yaml", ".yml"):
            from medseg.config import load_config

            cfg = load_config(source)
            data = replace(cfg.data, layout=args.layout) if args.layout else cfg.data
            scan = scan_from_config(data)
        else:
            scan = scan_dataset(source, args.layout or "auto")
    except KeyError as e:  # unknown layout: the message lists the valid ones
        raise ConfigError(f"--layout: {e.args[0]}") from None
    scan.log_problems()
    return scan, cfg


def cmd_split(args) -> int:
    """Run ``medseg data split``; returns the exit code (0)."""
    from medseg.data.split_export import export_cases, export_splits, fold_counts, grouped_kfold

    scan, cfg = _scan(args)
    k = args.folds or (cfg.cv.folds if cfg else DEFAULT_FOLDS)
    seed = args.seed if args.seed is not None else (cfg.train.seed if cfg else 0)
    manifest = grouped_kfold(
        scan,
        k,
        seed=seed,
        test_fraction=cfg.data.test_fraction if cfg else 0.0,
        # as medseg cv: 3D models (unet3d) are not stratified, their cases all hold every label
        stratify=(cfg.model.name != "unet3d") if cfg else None,
    )
    path = export_splits(
        scan, manifest, args.export or "medseg", args.out, overwrite=args.overwrite
    )
    for row in fold_counts(export_cases(scan, manifest), k):
        name = "held-out test" if row["fold"] == "test" else f"fold {row['fold']}"
        print(f"{name}: {row['groups']} groups, {row['cases']} cases")
    print(f"written: {path} ({args.export or 'medseg'}, {k} folds, seed {seed}, {scan.layout})")
    return 0
