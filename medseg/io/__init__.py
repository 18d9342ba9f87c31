"""Image and mask readers with one contract, whatever the file type.

Every reader in this package, now and later (DICOM series folders, NIfTI), follows this
contract; the rest of medseg relies on it and on nothing else about file formats.

Images (:func:`read_image` -> :class:`Image`)
    * ``Image.array`` is a float32 numpy array, channels last: HxWxC for a 2D image, DxHxWxC
      for a volume (multi-frame DICOM, multi-page TIFF). C >= 1; the channel axis is never
      squeezed away (a grey image is HxWx1). C is 1 for grey data and 3 for colour (RGB).
    * Values are the stored values, not normalised: 0..255 for 8-bit files, 0..65535 for
      16-bit files, 0/1 for 1-bit files. For DICOM the modality LUT is applied (Rescale
      Slope/Intercept, so CT is in Hounsfield units); no window/VOI LUT is applied.
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

Masks (:func:`read_mask`)
    * An integer label map, HxW (DxHxW for multi-page TIFF or multi-frame DICOM), dtype uint8
      when all labels are <= 255, else int32; 0 is background.
    * Binary masks stored as 0/255 (or 0/65535) become 0/1. Palette PNGs give their indices.
      RGB(A) masks whose colour channels are identical become one channel.
    * Values that are not non-negative integers, and colour masks whose channels differ,
      raise :class:`~medseg.errors.DataError`.

Files
    * :data:`IMAGE_SUFFIXES` lists the suffixes read (case-insensitive); DICOM files are also
      recognised by their ``DICM`` marker whatever their name (:func:`is_dicom`).
    * :func:`list_image_files` lists readable files in a folder, sorted.

Errors
    Every problem with an input file raises :class:`~medseg.errors.DataError` whose message
    starts with the file path and says the problem in plain words: missing or empty file,
    unsupported type, not an image, truncated or corrupt data, DICOM without pixel data, or a
    compressed DICOM whose decoder is not installed (the message names the pip packages).

:func:`to_channels` converts between 1 and 3 channels (repeat, or ITU-R BT.601 luma).
"""

from medseg.io.base import IMAGE_SUFFIXES, Image, ImageMeta, to_channels
from medseg.io.dicom import is_dicom
from medseg.io.readers import list_image_files, read_image, read_mask

__all__ = [
    "IMAGE_SUFFIXES",
    "Image",
    "ImageMeta",
    "is_dicom",
    "list_image_files",
    "read_image",
    "read_mask",
    "to_channels",
]
