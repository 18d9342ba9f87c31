"""Cross-validation folders: the layout that ``medseg cv`` writes and every reader opens.

Layout::

    runs/<name>/config.yaml          resolved config
    runs/<name>/splits.json          k-fold manifest (no group in two folds; test groups apart)
    runs/<name>/fold_<k>/            an ordinary run folder per fold (k = 1..K), trained on the
                                     fold's own manifest, plus oof.csv (its out-of-fold cases)
                                     and, for 2D segmentation, oof_groups.csv (per patient)
    runs/<name>/ensemble.json        the fold models, combined by mean probability
    runs/<name>/test_metrics.json    the ensemble on the held-out test split (when there is one),
                                     with test_cases.csv and test_groups.csv
    runs/<name>/cv_summary.json, report.md, report.html, plots/

Training (:mod:`medseg.training.cv`) writes these folders; evaluation and inference read them
through the functions here.
"""

from __future__ import annotations

from pathlib import Path

from medseg.artifacts.runs import RunDir
from medseg.utils import read_json

#: The file that makes a run folder a cross-validation folder: its fold models.
ENSEMBLE_NAME = "ensemble.json"
#: The checkpoint whose out-of-fold predictions are scored and which the ensemble holds: "best"
#: would be chosen on the held-out fold itself (an optimistic score), "last" is not.
CV_CHECKPOINT = "last"


def fold_dir(root: Path, k: int) -> Path:
    """Folder of fold ``k`` (1-based)."""
    return root / f"fold_{k}"


def fold_done(root: Path, k: int) -> bool:
    """Has fold ``k`` finished training and written its out-of-fold cases?"""
    run = RunDir(fold_dir(root, k))
    return run.state().get("status") == "done" and (run.path / "oof.csv").is_file()


def load_ensemble(run_dir: str | Path) -> list[Path]:
    """Paths of the fold models recorded in a CV run's ``ensemble.json``.

    Raises:
        DataError: ``ensemble.json`` is missing, unreadable or not a JSON object; the message
            names the file.
    """
    root = Path(run_dir)
    spec = read_json(root / ENSEMBLE_NAME)
    return [root / f["model"] for f in spec["folds"]]
