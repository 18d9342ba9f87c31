"""Image and mask readers with one contract, whatever the file type.

Every reader in this package (plain images, DICOM files, DICOM series folders, NIfTI) follows
this contract; the rest of medseg relies on it and on nothing else about file formats.

Images (:func:`read_image` -> :class:`Image`)
    * ``Image.array`` is a float32 numpy array, channels last: HxWxC for a 2D image, DxHxWxC
      for a volume (multi-frame DICOM, DICOM series folder, NIfTI, multi-page TIFF). C >= 1;
      the channel axis is never squeezed away (a grey image is HxWx1). C is 1 for grey data
      and 3 for colour (RGB); a 4D NIfTI whose 4th dimension is 2..4 gives that many channels
      (``photometric`` None, ``extra["channels_from"]``).
    * Values are the stored values, not normalised: 0..255 for 8-bit files, 0..65535 for
      16-bit files, 0/1 for 1-bit files. For DICOM the modality LUT is applied (Rescale
      Slope/Intercept, so CT is in Hounsfield units; in a series, per slice); no window/VOI
      LUT is applied. For NIfTI the header's scl_slope/scl_inter are applied; NaN/Inf voxels
      raise (or are replaced, ``read_image(..., replace_non_finite=v)``).
      Normalisation is the data pipeline's job.
    * Grey images are MONOCHROME2 (higher is brighter): MONOCHROME1 DICOM is reflected within
      its value range, ``v -> lo + hi - v`` where ``lo..hi`` is the range the stored bits can
      hold after the modality LUT (``extra["monochrome1_inverted"]``, ``extra["inversion_range"]``).
    * Colour is RGB: alpha channels are dropped (``extra["alpha_dropped"]``), palette images
      are mapped through their palette, DICOM YBR data is converted to RGB by pydicom.
    * ``Image.meta`` is an :class:`ImageMeta`. ``spacing`` is in mm in array axis order,
      ``(row, col)`` or ``(slice, row, col)``, or ``None`` when unknown (always for plain
      images). ``affine`` is a 4x4 matrix from the homogeneous array index ``(row, col, 0, 1)``
      (2D) or ``(slice, row, col, 1)`` (volume) to patient coordinates in mm (DICOM LPS), or
      ``None``. ``photometric`` describes the returned array (``"MONOCHROME2"`` or ``"RGB"``);
      the stored DICOM value is ``extra["dicom_photometric"]``. ``bits`` is the stored bit depth.
    * ``meta.patient_id`` (and the study/series UIDs) are for grouping only: never log them or
      put them in file names. They are left out of ``repr(meta)``; readers never log them.

DICOM series (a folder given to :func:`read_image` / :func:`read_mask`)
    * The folder (not its sub-folders) must hold ONE series (SeriesInstanceUID); several
      series raise a DataError that lists them by SeriesNumber and SeriesDescription and points
      to :func:`read_dicom_series`, which returns one volume per series (sorted by SeriesNumber,
      ``recursive=True`` for a whole study tree). A series stored as one multi-frame file is
      read as that file. Headers are read first (without pixels) to split and sort.
    * Slices are sorted by ImagePositionPatient projected on the slice normal (cross product
      of the row and column direction cosines of ImageOrientationPatient), ascending: not by
      file name, not by InstanceNumber. If positions are missing, InstanceNumber is used and a
      warning is logged (then ``affine`` is None).
    * ``spacing`` is ``(median step between slice positions, row spacing, column spacing)``;
      ``affine`` maps ``(slice, row, col, 1)`` to LPS mm from the first (lowest) slice's
      position, the direction cosines and the spacing (its slice column is the direction from
      the first to the last slice position, one median step long: the normal, except for a
      tilted CT gantry). ``meta.source`` is the sorted file
      list; ``extra`` has ``series_description``, ``series_number``, ``slice_positions``
      (Dx3 LPS mm, array order), ``slice_order``, ``instance_numbers`` and, when slopes or
      intercepts differ between slices, ``rescale_per_slice``/``rescale_slopes``/
      ``rescale_intercepts``. MONOCHROME1 slices are inverted as single files are.
    * Errors (DataError naming the folder or files): slices of different size, samples,
      pixel spacing or orientation; two files at the same position (both named); a missing
      slice (a step > 1.5x the median step; the message gives the position of the gap;
      ``allow_gaps=True`` reads anyway); a file that is neither DICOM nor an obvious non-image.
      Hidden files and obvious non-images (``DICOMDIR``, ``.txt``, ``.json``, ... see
      :data:`~medseg.io.dicom_series.NON_IMAGE_SUFFIXES`) are skipped, and so are DICOM
      objects without an image (SR, RT plan, ...; with a warning).
    * To align a mask series with an image series, compare :func:`slice_positions` of both
      folders with :func:`match_slice_positions` (the arrays of :func:`read_image` and
      :func:`read_mask` follow the same order).

NIfTI (``.nii``, ``.nii.gz``)
    * Reoriented to the closest canonical (RAS+) orientation, then array axes
      ``(i, j, k)`` -> ``(slice, row, col) = (k, J-1-j, I-1-i)``: slice index grows towards
      superior, row index towards posterior (anterior up), column index towards patient left
      (patient right on image left), i.e. the radiological display of DICOM axial images.
      ``spacing`` is the header zooms in that order and ``affine`` maps to LPS mm like DICOM.
      Details in :mod:`medseg.io.nifti`.
    * A 4th dimension of size C <= 4 becomes channels; larger raises ("4D NIfTI with N volumes").
    * :func:`write_nifti_like` writes a DxHxW label volume back in the reference NIfTI's own
      voxel order and affine (or, for a DICOM reference, with its affine), atomically.

Datasets described by a ``dataset.json`` (Medical Segmentation Decathlon, nnU-Net v2)
    * :func:`read_dataset_json` gives a :class:`DatasetDescription` (label and channel names,
      modality, the :class:`MsdCase` list); :func:`read_case_image` reads every channel of a case
      (a 4D file, or ``_0000`` ... ``_000N`` files stacked), :func:`read_case_labels` its label
      map. Details in :mod:`medseg.io.msd`.

Masks (:func:`read_mask`)
    * An integer label map, HxW (DxHxW for multi-page TIFF, multi-frame DICOM, DICOM series
      folder or NIfTI, in the same orientation and slice order as :func:`read_image`), dtype
      uint8 when all labels are <= 255, else int32; 0 is background.
    * Binary masks stored as 0/255 (or 0/65535) become 0/1. Palette PNGs give their indices.
      RGB(A) masks whose colour channels are identical become one channel.
    * Values that are not non-negative integers, and colour masks whose channels differ,
      raise :class:`~medseg.errors.DataError`.

Files
    * :data:`IMAGE_SUFFIXES` lists the suffixes read (case-insensitive), including the double
      suffix ``.nii.gz``: compare with :func:`image_suffix`, not ``Path.suffix`` (which is
      ``.gz`` there). DICOM files are also recognised by their ``DICM`` marker whatever their
      name (:func:`is_dicom`).
    * :func:`list_image_files` lists readable files in a folder, sorted (each DICOM slice on
      its own).
    * :func:`read_dicom_header` reads one DICOM file's header without its pixel data (a
      :class:`DicomHeader`; None for DICOM objects without an image, such as SR): the one
      header reader, used to split a folder into series and to order its slices.

Errors
    Every problem with an input file raises :class:`~medseg.errors.DataError` whose message
    starts with the file path and says the problem in plain words, on one line: missing or
    empty file, dangling or looping symbolic link, no permission to read it (or to list a
    folder: unreadable folders are never skipped silently), unsupported type, not an image,
    truncated or corrupt data, DICOM without pixel data, an unknown or undecodable transfer
    syntax, a compressed DICOM whose decoder is not installed (the message names the pip
    packages), a NIfTI with a NaN or singular affine, or a DICOM/NIfTI header that declares
    more than :data:`~medseg.io.base.MAX_SAMPLES` samples (refused before anything is
    allocated). Whatever else a third-party decoder raises on a damaged file is wrapped in a
    DataError naming the file too (``tests/io/test_fuzz_readers.py`` fuzzes this).

:func:`to_channels` converts between 1 and 3 channels (repeat, or ITU-R BT.601 luma).
"""

from medseg.io.base import IMAGE_SUFFIXES, Image, ImageMeta, image_suffix, to_channels
from medseg.io.dicom_series import (
    match_slice_positions,
    read_dicom_files,
    read_dicom_series,
    slice_positions,
)
from medseg.io.headers import DicomHeader, is_dicom, read_dicom_header
from medseg.io.msd import (
    DatasetDescription,
    MsdCase,
    read_case_image,
    read_case_labels,
    read_dataset_json,
)
from medseg.io.nifti import write_nifti_like
from medseg.io.readers import list_image_files, read_image, read_mask

__all__ = [
    "DatasetDescription",
    "DicomHeader",
    "IMAGE_SUFFIXES",
    "Image",
    "ImageMeta",
    "image_suffix",
    "is_dicom",
    "list_image_files",
    "match_slice_positions",
    "MsdCase",
    "read_dicom_files",
    "read_case_image",
    "read_case_labels",
    "read_dataset_json",
    "read_dicom_header",
    "read_dicom_series",
    "read_image",
    "read_mask",
    "slice_positions",
    "to_channels",
    "write_nifti_like",
]
