"""The bad-input corpus (``tests/data/bad``): every case is refused with medseg's own error naming
the file and the problem, in the library and through the CLI; never a traceback, a hang or a
silent skip.

The cases are listed once, in :data:`CASES`. Each names a file or folder of the corpus that
``tests/data/bad/make_corpus.py`` writes (``path``), how the library meets it (``call``), the exact
error type and a pattern of its message, and which CLI run covers it (``cli``):

* ``predict``: one ``medseg predict`` over every reader case (and a few valid edge cases): the
  batch goes on, exit 1, one failed row and one ``failed:`` line per bad file, nothing written
  outside ``--out``;
* ``audit``: ``medseg data audit <dataset> --layout L --strict`` per scanner case: exit 2;
* ``config``: ``medseg data audit <config.yaml>`` per config case (loads and validates the whole
  config, no TensorFlow): exit 2; two of them also through ``medseg train -c``;
* ``evaluate-pairs`` / ``evaluate-nifti``: one ``medseg evaluate RUN --data <all-bad dataset>``
  each: every sample named on a ``skipped:`` line, then exit 2 as none is left;
* ``evaluate`` / ``predict-model``: one ``medseg evaluate RUN`` or ``medseg predict --model M``
  per model case: exit 2;
* ``predict-input``: ``medseg predict`` over an input folder that cannot be read: exit 2;
* ``predict-out``: ``medseg predict`` with ``--out`` the input folder or inside it: exit 2,
  nothing written;
* ``train``: ``medseg train --set data.root=<missing>``: exit 2 and no run folder left behind;
* ``predict-split``: a folder with two DICOM series, refused by ``read_image`` (one series per
  folder) but split into its two series by ``predict`` (exit 0 for them, by design).

Valid inputs from the wild that must be handled, not refused (file names that are not UTF-8 or
that a spreadsheet would run, a 3x3-pixel image, a JPEG whose compressed data is garbled), are
listed in :data:`HANDLED`, each with the exit code and the text its CLI run must give.

CLI errors are checked to be exactly one ``medseg: error:`` line naming the file; library errors
to be one line too. The CLI runs in the test process (``tests.conftest.run_cli``). The unreadable
file and folder have their permissions removed; when the tests run as root, who reads everything,
the denial is emulated by patching ``Path.open``, ``os.scandir`` and ``os.listdir`` for that one
path.
"""

from __future__ import annotations

import csv
import errno
import os
import re
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from medseg.config import DataConfig, load_config
from medseg.errors import ConfigError, DataError, MedsegError, ModelError
from medseg.io import list_image_files, read_image, read_mask
from tests.conftest import TINY_UNET, load_make_corpus, run_cli

#: Root reads files whatever their permissions: the unreadable cases are then emulated.
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


@dataclass(frozen=True)
class Case:
    """One bad input and what medseg must make of it.

    Attributes:
        id: test id.
        path: file or folder, relative to the corpus root.
        call: how the library meets it: ``image`` (read_image), ``mask`` (read_mask), ``scan``
            (scan_dataset, non-strict and strict), ``pipeline`` (load_samples of the dataset
            sample whose image is ``path``), ``config`` (load_config), ``config_data``
            (load_config, then scan_from_config), ``evaluate``, ``predictor``, ``cases``
            (predict's collect_cases), ``case_row`` (the ``error`` case collect_cases makes of
            ``path`` in its folder), ``model_input`` (read_image, then check_model_input for a
            1-channel model), ``train`` (train with ``data.root`` = ``path``) or ``out``
            (predict with ``--out`` = ``path``, inside or equal to an input folder).
        error: the exact medseg error type.
        match: regular expression the message must hold.
        cli: which CLI run covers it (see the module docstring).
        names: what the message must name (default: the file name of ``path``).
        layout: dataset layout for ``scan`` and ``pipeline``.
        denied: a file or folder (relative to the corpus) that this user may not read:
            ``path`` itself, or a folder inside the dataset ``path`` (emulated for root).
    """

    id: str
    path: str
    call: str
    error: type[MedsegError]
    match: str
    cli: str
    names: str = ""
    layout: str = ""
    denied: str = ""

    @property
    def named(self) -> str:
        return self.names or Path(self.path).name


def _reader(id, path, match, **kw) -> Case:
    return Case(id, path, "image", DataError, match, "predict", **kw)


CASES: list[Case] = [
    # ------------------------------------------------------------------ readers: DICOM files
    _reader("dicom_truncated_pydicom", "files/dicom_truncated.dcm", "truncated or corrupt"),
    _reader(
        "dicom_cut_in_header",
        "files/dicom_cut_header.dcm",
        r"no pixel data \(CT Image Storage\); the file is truncated",
    ),
    _reader(
        "dicom_garbage_after_marker",
        "files/dicom_garbage.dcm",
        "no pixel data and no known SOP class",
    ),
    _reader("dicom_without_pixel_data", "files/dicom_no_pixels.dcm", "no pixel data"),
    _reader("dicom_not_an_image_rtplan", "files/dicom_rtplan.dcm", r"no pixel data \(RT Plan"),
    _reader(
        "dicom_unsupported_transfer_syntax",
        "files/dicom_unsupported_syntax.dcm",
        "MPEG2.*cannot decode",
    ),
    _reader(
        "dicom_unknown_transfer_syntax",
        "files/dicom_unknown_syntax.dcm",
        "not a DICOM transfer syntax",
    ),
    _reader("dicom_zero_rows", "files/dicom_zero_rows.dcm", "'Rows' value of '0'"),
    _reader("dicom_pixel_data_too_short", "files/dicom_short_pixels.dcm", "truncated or corrupt"),
    _reader("dicom_palette_without_lut", "files/dicom_palette_no_lut.dcm", "palette cannot be"),
    # ------------------------------------------------------------------ readers: plain images
    _reader("zero_byte_png", "files/zero_byte.png", r"empty \(0 bytes\)"),
    _reader("text_file_named_png", "files/text.png", "not a readable image"),
    _reader("png_truncated", "files/png_truncated.png", "truncated or corrupt"),
    _reader("png_decompression_bomb", "files/png_bomb.png", "too large to read safely"),
    _reader("png_zero_width", "files/png_zero_width.png", "not a readable image"),
    _reader("unsupported_suffix", "files/notes.xyz", "unsupported file type '.xyz'"),
    # ------------------------------------------------------------------ readers: NIfTI
    _reader("nifti_with_nan", "files/nifti_nan.nii.gz", "NaN or infinite"),
    _reader("nifti_4d_where_3d_expected", "files/nifti_4d.nii.gz", "4D NIfTI with 10 volumes"),
    _reader("nifti_5d", "files/nifti_5d.nii.gz", "5D NIfTI"),
    _reader("nifti_empty", "files/nifti_empty.nii", "NIfTI image is empty"),
    _reader("nifti_wrong_extension_png", "files/nifti_named.png", "not a readable image"),
    _reader("nifti_gz_not_gzipped", "files/nifti_not_gzipped.nii.gz", "not a gzip file"),
    _reader("nifti_gz_truncated", "files/nifti_truncated.nii.gz", "truncated or corrupt"),
    _reader("nifti_data_cut", "files/nifti_cut_data.nii", "NIfTI data is truncated"),
    _reader("nifti_garbage", "files/nifti_garbage.nii", "not a readable NIfTI file"),
    _reader("nifti_singular_affine", "files/nifti_singular_affine.nii", "affine is singular"),
    _reader("nifti_nan_affine", "files/nifti_nan_affine.nii", "affine holds NaN"),
    # ------------------------------------------------------------------ readers: 4D volumes
    # Volumes along a 4th dimension are a model's channels only when it takes and names as many;
    # a 1-channel model refuses them (before issue 30, 3 volumes were read as RGB).
    *[
        Case(case_id, path, "model_input", DataError, re.escape(text), "predict")
        for case_id, path, text in [
            (
                "nifti_4d_3_volumes_for_a_1_channel_model",
                "files/nifti_4d_3vol.nii.gz",
                "4D volume of shape (64, 64, 8, 3): 3 volumes along the 4th dimension, but the "
                "model takes 1 channel",
            ),
            (
                "nifti_4d_2_volumes_for_a_1_channel_model",
                "files/nifti_4d_2vol.nii",
                "4D volume of shape (32, 32, 4, 2): 2 volumes along the 4th dimension",
            ),
            (
                "dicom_series_of_b_values_for_a_1_channel_model",
                "series/dwi_bvalues",
                "acquisitions by DiffusionBValue 0, 500, 1000), but the model takes 1 channel",
            ),
            (
                "enhanced_multiframe_time_points_for_a_1_channel_model",
                "files/enhanced_4d.dcm",
                "TemporalPositionIndex 1, 2, 3), but the model takes 1 channel",
            ),
        ]
    ],
    # ------------------------------------------------------------------ readers: file system
    _reader("symlink_loop", "links/symlink_loop.png", "symbolic link loop"),
    _reader("dangling_symlink", "links/dangling_link.png", "dangling symbolic link"),
    Case(
        "folder_symlink_loop",
        "links/folder_loop",
        "case_row",
        DataError,
        "a link loop: the folder holds the link",
        "predict",
    ),
    _reader(
        "unreadable_permissions",
        "files/unreadable.png",
        "permission denied",
        denied="files/unreadable.png",
    ),
    Case(
        "unreadable_input_folder",
        "inputs_unreadable",
        "cases",
        DataError,
        "permission denied; cannot list the folder",
        "predict-input",
        names="inputs_unreadable/sub",
        denied="inputs_unreadable/sub",
    ),
    # ------------------------------------------------------------------ readers: DICOM series
    _reader("series_missing_slice", "series/missing_slice", r"slice\(s\) missing"),
    _reader("series_duplicated_position", "series/duplicate_position", "same slice position"),
    _reader("series_slices_differ_in_size", "series/sizes_differ", "differ in size"),
    Case(
        "series_mixed_in_one_folder",
        "series/mixed",
        "image",
        DataError,
        "holds 2 DICOM series",
        "predict-split",
    ),
    # ------------------------------------------------------------------ masks
    Case(
        "mask_rgba_colour_coded",
        "datasets/pairs_bad/masks/mask_rgba.png",
        "mask",
        DataError,
        "channels differ",
        "evaluate-pairs",
    ),
    Case(
        "mask_float_values",
        "datasets/pairs_bad/masks/mask_float.tif",
        "mask",
        DataError,
        "not integers",
        "evaluate-pairs",
    ),
    Case(
        "mask_negative_values",
        "datasets/pairs_bad/masks/mask_negative.tif",
        "mask",
        DataError,
        "negative values",
        "evaluate-pairs",
    ),
    # ------------------------------------------------------------------ data pipeline
    Case(
        "mask_size_mismatch",
        "datasets/pairs_bad/images/mask_size.png",
        "pipeline",
        DataError,
        r"mask shape \(16, 16\) does not match",
        "evaluate-pairs",
        layout="pairs",
    ),
    Case(
        "mask_label_outside_label_set",
        "datasets/pairs_bad/images/mask_labels.png",
        "pipeline",
        DataError,
        "label 7 but model.num_classes is 3",
        "evaluate-pairs",
        names="masks/mask_labels.png",
        layout="pairs",
    ),
    Case(
        "mask_16bit_labels_outside_label_set",
        "datasets/pairs_bad/images/mask_16bit.png",
        "pipeline",
        DataError,
        "label 1000 but model.num_classes is 3",
        "evaluate-pairs",
        names="masks/mask_16bit.png",
        layout="pairs",
    ),
    Case(
        "text_file_as_dataset_image",
        "datasets/pairs_bad/images/image_text.png",
        "pipeline",
        DataError,
        "not a readable image",
        "evaluate-pairs",
        layout="pairs",
    ),
    Case(
        "symlink_loop_as_dataset_image",
        "datasets/pairs_bad/images/image_loop.png",
        "pipeline",
        DataError,
        "symbolic link loop",
        "evaluate-pairs",
        layout="pairs",
    ),
    Case(
        "nifti_nan_in_dataset",
        "datasets/nifti_bad/images/nan_image.nii.gz",
        "pipeline",
        DataError,
        "NaN or infinite",
        "evaluate-nifti",
        layout="nifti",
    ),
    Case(
        "nifti_4d_label_where_3d_expected",
        "datasets/nifti_bad/images/label_4d.nii.gz",
        "pipeline",
        DataError,
        "4D NIfTI with 3 volumes",
        "evaluate-nifti",
        names="labels/label_4d.nii.gz",
        layout="nifti",
    ),
    # ------------------------------------------------------------------ scanners
    Case(
        "pairs_image_without_mask",
        "datasets/pairs_missing_mask",
        "scan",
        DataError,
        "image has no mask",
        "audit",
        names="b_no_mask.png",
        layout="pairs",
    ),
    Case(
        "lgg_image_without_mask",
        "datasets/lgg_missing_mask",
        "scan",
        DataError,
        "image has no mask",
        "audit",
        names="slice_2.tif",
        layout="lgg",
    ),
    Case(
        "empty_class_folder",
        "datasets/class_empty",
        "scan",
        DataError,
        "class folder is empty",
        "audit",
        names="Training/meningioma",
        layout="class_folders",
    ),
    Case(
        "single_class",
        "datasets/class_single",
        "scan",
        DataError,
        "at least 2 class folders",
        "audit",
        layout="class_folders",
    ),
    Case(
        "nifti_label_shape_mismatch",
        "datasets/nifti_shape_mismatch",
        "scan",
        DataError,
        "label shape .* differs from image shape",
        "audit",
        names="labels/case_1.nii.gz",
        layout="nifti",
    ),
    Case(
        "dicom_mixed_series_in_one_folder",
        "datasets/dicom_mixed",
        "scan",
        DataError,
        "holds 2 DICOM series",
        "audit",
        names="study_1/T1post",
        layout="dicom_series",
    ),
    Case(
        "missing_dataset_folder",
        "datasets/no_such_folder",
        "scan",
        DataError,
        "dataset folder not found",
        "audit",
        layout="pairs",
    ),
    Case(
        "unreadable_dataset_folder",
        "datasets/pairs_unreadable_folder",
        "scan",
        DataError,
        "permission denied; cannot list the folder",
        "audit",
        names="pairs_unreadable_folder/masks",
        layout="pairs",
        denied="datasets/pairs_unreadable_folder/masks",
    ),
    # ------------------------------------------------------------------ configs
    *[
        Case(f"config_{name}", f"configs/{name}.yaml", "config", ConfigError, match, "config", key)
        for name, key, match in [
            ("unknown_key", "train.warp_speed", "unknown key"),
            ("misspelt_key", "train.epoch", "did you mean 'train.epochs'"),
            ("wrong_type", "train.epochs", "expected an integer, got 'ten'"),
            ("unknown_section", "training", "unknown section .*did you mean 'train'"),
            ("negative_epochs", "train.epochs", "must be >= 1, got -3"),
            ("nan_number", "train.learning_rate", "expected a finite number"),
            ("inf_number", "train.clipnorm", "expected a finite number"),
            ("top_level_list", "top_level_list.yaml", "mapping of sections"),
            ("syntax_error", "syntax_error.yaml", "not valid YAML"),
            ("python_tag", "python_tag.yaml", "not valid YAML .*python/object"),
            ("bool_for_int", "model.depth", "expected an integer, got True"),
            ("section_not_mapping", "data", "expected a mapping of keys"),
            ("image_size_too_small", "data.image_size", ">= 8"),
            ("task_layout_mismatch", "data.layout", "classification needs 'class_folders'"),
            ("not_utf8", "not_utf8.yaml", "not UTF-8 text"),
            ("alias_bomb", "alias_bomb.yaml", "the YAML expands to more than 100,000 values"),
            ("recursive_alias", "recursive_alias.yaml", "holds an alias to itself"),
            ("deep", "deep.yaml", "the YAML is nested too deeply"),
            ("long_list", "data.image_size", r"\(a list of 20,000 items\)$"),
        ]
    ],
    Case(
        "config_missing_data_folder",
        "configs/missing_folder.yaml",
        "config_data",
        DataError,
        "dataset folder not found",
        "config",
        names="no/such/dataset",
    ),
    Case(
        "train_missing_data_root",
        "datasets/no_such_root",
        "train",
        DataError,
        "dataset folder not found",
        "train",
    ),
    # ------------------------------------------------------------------ predict outputs
    Case(
        "out_is_the_input_folder",
        "out_inputs",
        "out",
        ConfigError,
        "the output folder is the input folder .*choose an output folder outside the inputs",
        "predict-out",
    ),
    Case(
        "out_inside_the_input_folder",
        "out_inputs/preds",
        "out",
        ConfigError,
        "the output folder lies inside the input folder",
        "predict-out",
        names="out_inputs/preds",
    ),
    # ------------------------------------------------------------------ models
    Case(
        "checkpoint_truncated",
        "models/run_checkpoint_truncated",
        "evaluate",
        ModelError,
        "not a readable|cannot load|corrupt",
        "evaluate",
        names="best.keras",
    ),
    Case(
        "checkpoint_garbage",
        "models/run_checkpoint_garbage",
        "evaluate",
        ModelError,
        "not a readable|cannot load|corrupt",
        "evaluate",
        names="best.keras",
    ),
    Case(
        "checkpoint_missing",
        "models/run_checkpoint_missing",
        "evaluate",
        ModelError,
        "checkpoint not found",
        "evaluate",
        names="best.keras",
    ),
    Case(
        "checkpoint_of_another_task",
        "models/run_classifier",
        "evaluate",
        ModelError,
        "does not fit a segmentation run",
        "evaluate",
        names="best.keras",
    ),
    Case(
        "run_config_not_yaml",
        "models/run_config_garbage",
        "evaluate",
        ConfigError,
        "not valid YAML",
        "evaluate",
        names="config.yaml",
    ),
    Case(
        "run_config_a_list",
        "models/run_config_list",
        "evaluate",
        ConfigError,
        "not a mapping of sections",
        "evaluate",
        names="config.yaml",
    ),
    Case(
        "run_split_manifest_garbage",
        "models/run_splits_garbage",
        "evaluate",
        DataError,
        "not readable JSON",
        "evaluate",
        names="splits.json",
    ),
    Case(
        "non_medseg_savedmodel",
        "models/foreign_savedmodel",
        "predictor",
        ModelError,
        "not a medseg export",
        "predict-model",
    ),
    Case(
        "export_holding_a_non_medseg_savedmodel",
        "models/export_foreign_savedmodel",
        "predictor",
        ModelError,
        "cannot load the SavedModel",
        "predict-model",
    ),
    Case(
        "export_with_garbage_model_card",
        "models/export_card_garbage",
        "predictor",
        ModelError,
        "not a readable medseg model card",
        "predict-model",
        names="medseg.json",
    ),
    Case(
        "dataset_folder_given_as_model",
        "datasets/pairs_good",
        "predictor",
        ModelError,
        "not a medseg export",
        "predict-model",
    ),
]

#: CLI runs that a test below covers.
CLI_GROUPS = {
    "predict",
    "predict-split",
    "audit",
    "config",
    "evaluate-pairs",
    "evaluate-nifti",
    "evaluate",
    "predict-model",
    "predict-input",
    "predict-out",
    "train",
}
MODEL_CALLS = ("evaluate", "predictor")
#: Configs whose value is huge (once expanded, or as written): their errors quote a bounded
#: excerpt, so the whole line stays under MAX_CONFIG_ERROR characters.
HUGE_CONFIGS = {"config_alias_bomb", "config_recursive_alias", "config_deep", "config_long_list"}
MAX_CONFIG_ERROR = 400


@dataclass(frozen=True)
class Handled:
    """A valid input from the wild that medseg must handle, not refuse.

    Attributes:
        id: test id.
        path: file, relative to the corpus root (``os.fsdecode`` of its bytes).
        cli: which CLI run covers it: ``predict-handled`` (one ``medseg predict`` from the
            ``names`` folder over ``.`` and ``files/tiny.dcm``: exit 0, a row per file) or
            ``audit-handled`` (``medseg data audit`` of the dataset holding ``path``: exit 0, the
            file listed among the problems).
        code: the exit code of that run.
        text: what the run must give: the ``source`` cell of the file's row (``source``),
            a warning line naming the file (``warning``), or the audit problem (``problem``).
        check: which of these ``text`` is.
    """

    id: str
    path: str
    cli: str
    code: int
    text: str
    check: str


HANDLED: list[Handled] = [
    Handled(
        "name_not_utf8",
        os.fsdecode(b"names/scan_\xff\xfe.png"),
        "predict-handled",
        0,
        r"scan_\xff\xfe.png",  # escaped
        "source",
    ),
    Handled(
        "name_a_formula",
        "names/=cmd|' -C calc'!A0.png",
        "predict-handled",
        0,
        "'=cmd|' -C calc'!A0.png",  # a spreadsheet shows it as text
        "source",
    ),
    Handled(
        "name_a_hyperlink_formula",
        'names/=HYPERLINK("x").png',
        "predict-handled",
        0,
        '\'=HYPERLINK("x").png',
        "source",
    ),
    Handled(
        "dicom_3x3_pixels_predicted_with_a_warning",
        "files/tiny.dcm",
        "predict-handled",
        0,
        "image of 3x3 pixels is smaller than 16 pixels",
        "warning",
    ),
    Handled(
        "dicom_3x3_pixels_listed_by_audit",
        "datasets/jpeg_garbled/b/tiny.dcm",
        "audit-handled",
        0,
        "image is 3x3 pixels, smaller than the minimum 16",
        "problem",
    ),
    Handled(
        "jpeg_garbled_listed_unreadable_by_audit",
        "datasets/jpeg_garbled/a/garbled.jpg",
        "audit-handled",
        0,
        "JPEG data is corrupt (restart marker",
        "problem",
    ),
]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The corpus without the model cases (no TensorFlow needed)."""
    return load_make_corpus().build(tmp_path_factory.mktemp("bad") / "corpus")


@pytest.fixture(scope="session")
def corpus_models(corpus) -> Path:
    """The same corpus with the model cases added (builds a tiny untrained U-Net)."""
    load_make_corpus().write_models(corpus)
    return corpus


def _cases(*groups: str) -> list[Case]:
    return [c for c in CASES if c.cli in groups]


def _deny(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``path`` unreadable. make_corpus.py removed its permissions, but root reads it
    anyway (permissions do not bind root), so for root the denial is emulated: opening or
    listing ``path`` raises PermissionError as it would for any other user."""
    if not IS_ROOT:
        return
    real_open, real_scandir, real_listdir = Path.open, os.scandir, os.listdir

    def check(target) -> None:
        if isinstance(target, str | os.PathLike) and Path(target) == path:
            raise PermissionError(errno.EACCES, "Permission denied", str(target))

    def fake_open(self, *args, **kwargs):
        check(self)
        return real_open(self, *args, **kwargs)

    def fake_scandir(target="."):
        check(target)
        return real_scandir(target)

    def fake_listdir(target="."):
        check(target)
        return real_listdir(target)

    monkeypatch.setattr(Path, "open", fake_open)
    monkeypatch.setattr(os, "scandir", fake_scandir)
    monkeypatch.setattr(os, "listdir", fake_listdir)


def _raised(fn, *args, **kwargs) -> MedsegError:
    """The medseg error ``fn`` raises (any other exception fails the test as it propagates)."""
    try:
        fn(*args, **kwargs)
    except MedsegError as e:
        return e
    pytest.fail(f"{getattr(fn, '__name__', fn)} accepted the bad input")


def _scan(case: Case, path: Path) -> MedsegError:
    from medseg.data.scan import scan_dataset

    # Not strict: the problem is listed (or raised, when nothing usable is left)...
    try:
        result = scan_dataset(path, case.layout, group_by="folder")
    except MedsegError as e:
        lenient = str(e)
    else:
        listed = [p for p in result.problems if case.named in p]
        assert listed, f"{case.named} is not among the problems {result.problems}"
        lenient = listed[0]
    assert case.named in lenient and re.search(case.match, lenient), lenient
    # ... strict: the first problem is raised.
    return _raised(scan_dataset, path, case.layout, strict=True, group_by="folder")


def _pipeline(case: Case, path: Path) -> MedsegError:
    from medseg.data.pipeline import load_samples
    from medseg.data.scan import scan_dataset

    root = path.parents[1]
    cfg = DataConfig(layout=case.layout, root=str(root), image_size=[32, 32], channels=1)
    samples = [s for s in scan_dataset(root, case.layout).samples if Path(s.image) == path]
    assert samples, f"{path} is not a sample of {root}"
    return _raised(load_samples, samples, cfg, 3)


def _config_data(case: Case, path: Path) -> MedsegError:
    from medseg.data.scan import scan_from_config

    return _raised(scan_from_config, load_config(path).data)


def _evaluate(case: Case, path: Path) -> MedsegError:
    from medseg.evaluation.evaluate import evaluate

    return _raised(evaluate, path)


def _predictor(case: Case, path: Path) -> MedsegError:
    from medseg.inference.predictor import Predictor

    return _raised(Predictor, path)


def _collect_cases(case: Case, path: Path) -> MedsegError:
    from medseg.inference.cases import collect_cases

    return _raised(collect_cases, [path])


def _case_row(case: Case, path: Path) -> MedsegError:
    """The ``error`` case collect_cases makes of ``path`` when it walks the folder holding it
    (a row of predict's table, not an exception: the batch goes on)."""
    from medseg.inference.cases import collect_cases

    [row] = [c for c in collect_cases([path.parent]) if c.source == str(path)]
    assert row.kind == "error", row
    return DataError(row.error)


def _one_channel_model():
    """What check_model_input reads of a 1-channel 2D model (as run_good's)."""
    from types import SimpleNamespace

    return SimpleNamespace(channels=1, card={"input": {"channels": 1}})


def _model_input(case: Case, path: Path) -> MedsegError:
    from medseg.inference.case import check_model_input

    image = read_image(path)  # read: the volumes are kept along the 4th dimension ...
    error = _raised(check_model_input, _one_channel_model(), image, str(path))
    again = _raised(read_image, path, channels=1)  # ... and refused when read for 1 channel
    assert str(again) == str(error), (str(again), str(error))
    return error


def _train(case: Case, path: Path) -> MedsegError:
    from medseg.training.train import train

    with tempfile.TemporaryDirectory() as runs:
        sets = [*TINY_UNET, f"data.root={path}", f"run.root={runs}", "run.name=x"]
        error = _raised(train, load_config(None, sets))
        assert not (Path(runs) / "x").exists(), "a run failed before its first epoch is kept"
    return error


def _out(case: Case, path: Path) -> MedsegError:
    from medseg.inference.predict import predict
    from tests.inference.test_predict import IntensityModel

    inputs = path if path.is_dir() else path.parent
    before = sorted(inputs.rglob("*"))
    error = _raised(predict, IntensityModel(), [inputs], path, overwrite=True, progress=False)
    assert sorted(inputs.rglob("*")) == before, "written into the input folder"
    return error


LIBRARY = {
    "image": lambda case, path: _raised(read_image, path),
    "mask": lambda case, path: _raised(read_mask, path),
    "scan": _scan,
    "pipeline": _pipeline,
    "config": lambda case, path: _raised(load_config, path),
    "config_data": _config_data,
    "evaluate": _evaluate,
    "predictor": _predictor,
    "cases": _collect_cases,
    "case_row": _case_row,
    "model_input": _model_input,
    "train": _train,
    "out": _out,
}


# ----------------------------------------------------------------------------- the corpus


def test_corpus_has_enough_distinct_cases() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert len({c.path for c in CASES}) == len(CASES)
    assert len([c for c in CASES if c.cli != "predict-split"]) >= 30  # refused, not handled
    assert {c.call for c in CASES} <= set(LIBRARY)
    assert {c.cli for c in CASES} <= CLI_GROUPS
    assert len({h.id for h in HANDLED} | set(ids)) == len(HANDLED) + len(ids)
    assert {h.cli for h in HANDLED} <= {"predict-handled", "audit-handled"}


def test_corpus_is_deterministic(corpus, tmp_path) -> None:
    again = load_make_corpus().build(tmp_path / "again")
    names = sorted(
        p.relative_to(corpus)
        for p in corpus.rglob("*")
        if p.relative_to(corpus).parts[0] != "models"
    )
    assert names == sorted(p.relative_to(again) for p in again.rglob("*"))
    for name in names:
        a, b = corpus / name, again / name
        if a.is_symlink() or not a.is_file() or a.stat().st_mode & 0o444 == 0:
            continue  # links and the unreadable file are compared by name only
        assert a.read_bytes() == b.read_bytes(), name


# ----------------------------------------------------------------------------- library level


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.call not in MODEL_CALLS], ids=lambda c: c.id
)
def test_library_refuses_bad_input(case: Case, corpus: Path, monkeypatch) -> None:
    path = corpus / case.path
    if case.denied:
        _deny(corpus / case.denied, monkeypatch)
    error = LIBRARY[case.call](case, path)
    message = str(error)
    assert type(error) is case.error, f"{type(error).__name__}: {message}"
    assert case.named in message, message
    assert re.search(case.match, message), message
    assert "\n" not in message, "an error message must be one line"
    if case.call == "config":
        assert Path(case.path).name in message, "config errors name the file"
    if case.id in HUGE_CONFIGS:
        assert len(message) < MAX_CONFIG_ERROR, f"{len(message)} characters"


@pytest.mark.parametrize("case", [c for c in CASES if c.call in MODEL_CALLS], ids=lambda c: c.id)
def test_library_refuses_bad_model(case: Case, corpus_models: Path) -> None:
    error = LIBRARY[case.call](case, corpus_models / case.path)
    message = str(error)
    assert type(error) is case.error, f"{type(error).__name__}: {message}"
    assert case.named in message and re.search(case.match, message), message
    assert "\n" not in message, "an error message must be one line"


def test_valid_edge_cases_are_read_not_refused(corpus: Path) -> None:
    grey16 = read_image(corpus / "files" / "grey16.png")
    assert grey16.array.shape == (32, 32, 1) and grey16.meta.bits == 16
    assert grey16.array.max() > 255  # 16-bit values kept, not scaled to 8 bits
    rgba = read_image(corpus / "files" / "rgba.png")
    assert rgba.array.shape == (32, 32, 3) and rgba.meta.extra["alpha_dropped"]
    images = read_image(corpus / "series" / "missing_slice", allow_gaps=True)
    assert images.array.shape[0] == 4 and images.meta.extra["slice_gaps"]


@pytest.mark.parametrize("case", HANDLED, ids=lambda h: h.id)
def test_library_handles_wild_input(case: Handled, corpus: Path, caplog) -> None:
    path = corpus / case.path
    if case.cli == "audit-handled":
        from medseg.data.audit import audit

        root = path.parents[1]
        report = audit(root, "class_folders", workers=1)
        rel = path.relative_to(root).as_posix()
        [problem] = [p for p in report["problems"] if p.startswith(f"{rel}: ")]
        assert case.text in problem, problem
        assert report["n_images"] == 6 and report["n_readable"] == 5  # the JPEG is unreadable
        return
    from medseg.inference.case import check_model_input
    from medseg.inference.cases import collect_cases

    [found] = [c for c in collect_cases([path.parent]) if c.source == str(path)]
    assert found.kind == "file", found  # a case, not a refusal
    with caplog.at_level("WARNING", logger="medseg.inference.case"):
        check_model_input(_one_channel_model(), read_image(path), str(path))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    if case.check == "warning":
        assert [w for w in warnings if str(path) in w and case.text in w], warnings
    else:
        assert not warnings, warnings


def test_pipeline_lists_every_unusable_sample_and_keeps_the_rest(corpus: Path) -> None:
    from medseg.data.pipeline import load_arrays
    from medseg.data.scan import scan_dataset

    bad, good = corpus / "datasets" / "pairs_bad", corpus / "datasets" / "pairs_good"
    samples = scan_dataset(bad, "pairs").samples + scan_dataset(good, "pairs").samples[:1]
    cfg = DataConfig(layout="pairs", root=str(bad), image_size=[32, 32], channels=1)
    data = load_arrays(samples, cfg, 3)
    assert len(data) == 1 and len(data.problems) == len(samples) - 1
    for case in _cases("evaluate-pairs"):
        found = [p for p in data.problems if case.named in p]
        assert len(found) == 1 and re.search(case.match, found[0]), data.problems
    with pytest.raises(DataError, match=str(bad)):
        load_arrays(samples, cfg, 3, strict=True)


def test_folder_symlink_loops_end(corpus: Path) -> None:
    """Links back up the tree are not followed: listing and scanning end (no hang)."""
    with ThreadPoolExecutor(1) as pool:
        listed = pool.submit(list_image_files, corpus / "links").result(timeout=60)
        assert [p.name for p in listed] == ["dangling_link.png", "symlink_loop.png"]
        from medseg.data.scan import scan_dataset

        scan = pool.submit(scan_dataset, corpus / "datasets" / "pairs_bad", "pairs").result(60)
        assert not any("folder_loop" in s.image for s in scan.samples)


# ----------------------------------------------------------------------------- through the CLI


def _listing(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its size and modification time (links not followed)."""
    found = []
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        found.append((str(path), st.st_size, st.st_mtime_ns))
    return found


def _one_error_line(proc, named: str, match: str) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("medseg: error:")]
    assert len(lines) == 1, proc.stderr
    assert named in lines[0] and re.search(match, lines[0]), lines[0]
    return lines[0]


@pytest.mark.slow
def test_cli_predict_reports_each_bad_file_as_a_failed_case(corpus_models: Path, tmp_path) -> None:
    corpus = corpus_models
    cases = [c for c in _cases("predict") if not c.denied]  # see the next test
    inputs = {str(corpus / ("links" if c.path.startswith("links/") else c.path)) for c in cases}
    valid = [corpus / "files" / "grey16.png", corpus / "files" / "rgba.png"]
    mixed = corpus / "series" / "mixed"
    inputs = sorted(inputs | {str(p) for p in [*valid, mixed]})
    before = _listing(corpus)
    proc = run_cli(
        "predict",
        "--model",
        str(corpus / "models" / "run_good"),
        *inputs,
        "--out",
        "preds",
        "--no-overlays",
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr  # the batch ran; some cases failed
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    with open(tmp_path / "preds" / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_source = defaultdict(list)
    for row in rows:
        by_source[row["source"]].append(row)
    failed_lines = [ln for ln in proc.stderr.splitlines() if ln.lstrip().startswith("failed:")]
    for case in cases:
        [row] = by_source[str(corpus / case.path)]
        assert row["status"] == "error", (case.id, row)
        assert case.named in row["error"], (case.id, row["error"])
        assert re.search(case.match, row["error"]), (case.id, row["error"])
        assert len([ln for ln in failed_lines if case.named in ln]) == 1, (case.id, proc.stderr)
    for path in valid:
        assert [r["status"] for r in by_source[str(path)]] == ["ok"]
    # A folder with two series: predict splits it into its series (read_image refuses it).
    assert [r["status"] for r in by_source[str(mixed)]] == ["ok", "ok"]
    assert len(failed_lines) == len(cases)
    assert _listing(corpus) == before, "written outside --out"


@pytest.mark.slow
def test_cli_predict_names_an_unreadable_file(corpus_models: Path, tmp_path, monkeypatch) -> None:
    [case] = [c for c in _cases("predict") if c.denied]
    _deny(corpus_models / case.denied, monkeypatch)
    proc = run_cli(
        "predict",
        "--model",
        str(corpus_models / "models" / "run_good"),
        str(corpus_models / case.path),
        "--out",
        "preds",
        "--no-progress",
        cwd=tmp_path,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert re.search(rf"failed: .*{case.named}.*{case.match}", proc.stderr), proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases("audit"), ids=lambda c: c.id)
def test_cli_strict_audit_refuses_bad_datasets(
    case: Case, corpus: Path, tmp_path, monkeypatch
) -> None:
    root = corpus / case.path
    if case.denied:
        _deny(corpus / case.denied, monkeypatch)
    proc = run_cli("data", "audit", str(root), "--layout", case.layout, "--strict", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc, case.named, case.match)


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases("config"), ids=lambda c: c.id)
def test_cli_refuses_bad_configs(case: Case, corpus: Path, tmp_path) -> None:
    proc = run_cli("data", "audit", str(corpus / case.path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc, case.named, case.match)
    if case.id in HUGE_CONFIGS:
        assert len(line) < len("medseg: error: ") + MAX_CONFIG_ERROR, f"{len(line)} characters"
    assert "medseg-corpus-was-executed" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cli_train_refuses_bad_configs(corpus: Path, tmp_path) -> None:
    for name in ("python_tag", "alias_bomb"):  # the others are the same code path
        [case] = [c for c in CASES if c.id == f"config_{name}"]
        proc = run_cli("train", "-c", str(corpus / case.path), cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        _one_error_line(proc, case.named, case.match)
        assert "medseg-corpus-was-executed" not in proc.stdout + proc.stderr
        assert not (tmp_path / "runs").exists()


@pytest.mark.slow
@pytest.mark.parametrize("case", _cases("train"), ids=lambda c: c.id)
def test_cli_train_with_a_bad_data_root_leaves_no_run(case: Case, corpus: Path, tmp_path) -> None:
    path = corpus / case.path
    proc = run_cli("train", "--set", f"data.root={path}", "--name", "x", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc, case.named, case.match)
    assert not (tmp_path / "runs" / "x").exists()  # the name is free: the same command reruns


@pytest.mark.slow
@pytest.mark.parametrize(
    ("group", "run", "dataset"),
    [("evaluate-pairs", "run_good", "pairs_bad"), ("evaluate-nifti", "run_nifti", "nifti_bad")],
)
def test_cli_evaluate_names_every_unusable_sample(
    group: str, run: str, dataset: str, corpus_models: Path, tmp_path
) -> None:
    corpus = corpus_models
    proc = run_cli(
        "evaluate",
        str(corpus / "models" / run),
        "--data",
        str(corpus / "datasets" / dataset),
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    skipped = [ln for ln in proc.stderr.splitlines() if "skipped:" in ln]
    for case in _cases(group):
        lines = [ln for ln in skipped if case.named in ln]
        assert len(lines) == 1 and re.search(case.match, lines[0]), (case.id, proc.stderr)
    _one_error_line(proc, "none of the", "could be loaded")


@pytest.mark.slow
def test_cli_strict_evaluate_stops_at_the_first_unusable_sample(corpus_models, tmp_path) -> None:
    corpus = corpus_models
    proc = run_cli(
        "evaluate",
        str(corpus / "models" / "run_strict"),
        "--data",
        str(corpus / "datasets" / "pairs_bad"),
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr
    line = _one_error_line(proc, str(corpus / "datasets" / "pairs_bad"), ".")
    assert any(c.named in line and re.search(c.match, line) for c in _cases("evaluate-pairs"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case", _cases("evaluate", "predict-model", "predict-input", "predict-out"), ids=lambda c: c.id
)
def test_cli_refuses_bad_models_and_inputs(
    case: Case, corpus_models: Path, tmp_path, monkeypatch
) -> None:
    path = corpus_models / case.path
    if case.denied:
        _deny(corpus_models / case.denied, monkeypatch)
    if case.cli == "evaluate":
        args = ["evaluate", str(path)]
    elif case.cli == "predict-input":
        model = corpus_models / "models" / "run_good"
        args = ["predict", "--model", str(model), str(path), "--out", "preds", "--no-progress"]
    elif case.cli == "predict-out":
        model = corpus_models / "models" / "run_good"
        inputs = path if path.is_dir() else path.parent
        args = ["predict", "--model", str(model), str(inputs), "--out", str(path)]
        args += ["--overwrite", "--no-progress"]
        before = _listing(inputs)
    else:
        image = corpus_models / "files" / "valid.png"
        args = ["predict", "--model", str(path), str(image), "--out", "preds", "--no-progress"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    _one_error_line(proc, case.named, case.match)
    if case.cli == "predict-out":
        assert _listing(inputs) == before, "written into the input folder"


@pytest.mark.slow
def test_cli_predict_handles_wild_inputs(corpus_models: Path, tmp_path) -> None:
    """Run from the ``names`` folder over ``.``: the sources are the bare file names, as a
    spreadsheet would show them (a formula must not start the cell)."""
    corpus = corpus_models
    cases = [h for h in HANDLED if h.cli == "predict-handled"]
    tiny = [str(corpus / h.path) for h in cases if not h.path.startswith("names/")]
    before = _listing(corpus)
    proc = run_cli(
        "predict",
        "--model",
        str(corpus / "models" / "run_good"),
        ".",
        *tiny,
        "--out",
        str(tmp_path / "preds"),
        "--no-overlays",
        "--no-progress",
        cwd=corpus / "names",
    )
    assert {proc.returncode} == {h.code for h in cases}, proc.stderr
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr
    with open(tmp_path / "preds" / "predictions.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(cases) and {r["status"] for r in rows} == {"ok"}
    assert len({r["case_id"] for r in rows}) == len(rows)
    sources = {r["source"] for r in rows}
    for case in cases:
        if case.check == "source":
            assert case.text in sources, (case.id, sources)
        else:
            lines = [ln for ln in proc.stderr.splitlines() if str(corpus / case.path) in ln]
            assert any(case.text in ln for ln in lines), (case.id, proc.stderr)
            assert str(corpus / case.path) in sources
    assert not any(re.match(r"[=+\-@\t\r]", cell) for r in rows for cell in r.values())
    assert _listing(corpus) == before, "written outside --out"


@pytest.mark.slow
def test_cli_audit_lists_wild_images(corpus: Path, tmp_path) -> None:
    import json

    cases = [h for h in HANDLED if h.cli == "audit-handled"]
    [root] = {(corpus / h.path).parents[1] for h in cases}
    proc = run_cli(
        "data", "audit", str(root), "--layout", "class_folders", "--out", "out", cwd=tmp_path
    )
    assert {proc.returncode} == {h.code for h in cases}, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert report["n_images"] == 6 and report["n_readable"] == 5
    for case in cases:
        rel = (corpus / case.path).relative_to(root).as_posix()
        assert [p for p in report["problems"] if p.startswith(rel) and case.text in p], case.id
        assert f"{rel}: {case.text}" in proc.stdout  # the printed report lists it too
