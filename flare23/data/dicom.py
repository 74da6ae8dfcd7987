"""DICOM series: reading a series folder into an array and a RAS affine, and its slices' headers for writers (the DICOM SEG).

DICOM series are read with pydicom (JPEG 2000 and other compressed pixel data through pylibjpeg).
The array axes follow the convention of dcm2niix and dicom2nifti: axis 0 runs along the image
rows (the DICOM column index, direction ``ImageOrientationPatient[:3]``), axis 1 along the image
columns from the last row to the first (the row order is flipped, so an axial series comes out
LAS), axis 2 along the slice normal ``row x column`` in increasing position. The affine is built
in LPS from ``ImageOrientationPatient``, ``ImagePositionPatient`` and ``PixelSpacing`` and turned
into RAS by negating its first two rows, as nibabel and ITK do. Every defect is a one-line
:class:`~flare23.errors.Flare23Error` naming the folder (or file): several image series in one
folder (naming a file of each), a missing slice (a gap over 1.5 x the median spacing), non-uniform
spacing, gantry tilt, inconsistent orientation or size, multi-frame or colour images, unreadable
files.

DICOM as the field writes it: file names do not matter (no extension, any order), nor does
``InstanceNumber`` (slices are ordered by position along the normal, so numbering from 0, from 1
or not at all is the same), nor where the origin lies (``ImagePositionPatient`` at the image
corner or anywhere else is taken as given); pixel data may be uncompressed or compressed (JPEG
2000 through pylibjpeg-openjpeg). Objects in the folder that are no slice of the image series
(a structured report, a SEG, a presentation state, anything without pixel data, and localizer /
scout images, ``ImageType`` ``LOCALIZER``, of the same or another series) are skipped with a
warning naming each file (:func:`not_a_slice`). :func:`dicom_series_headers` selects and orders
the same slices without decoding pixels, for writers that must reference them (the DICOM SEG).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare23.errors import Flare23Error

#: A gap between neighbouring slices larger than this many median spacings is a missing slice.
MISSING_SLICE_FACTOR = 1.5
#: Slice spacings may differ from their median by this much (mm) plus this fraction of it.
SPACING_ATOL_MM = 0.01
SPACING_RTOL = 0.01
#: Tolerance on direction cosines (orientation equality, tilt) and pixel spacing (relative).
DIRECTION_TOL = 1e-3

_INT16 = np.iinfo(np.int16)
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when ``path`` is a regular file with the DICOM Part 10 preamble and ``DICM`` magic."""
    path = Path(path)
    if path.name.startswith(".") or path.name.upper() == "DICOMDIR" or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def dicom_files(folder: str | os.PathLike) -> list[Path]:
    """Sorted DICOM files directly inside ``folder``."""
    return sorted(p for p in Path(folder).iterdir() if is_dicom_file(p))


def _floats(ds, keyword: str, count: int, file: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise Flare23Error(f"{file}: missing or invalid {keyword} ({value!r})")
    return arr


@dataclass(frozen=True)
class DicomSeries:
    """The slices of one series in volume order (see the module docstring), with its geometry.

    ``slices`` are ``(file, dataset)`` pairs sorted along the slice normal (axis 2 of the volume);
    ``affine`` is the RAS+ voxel-to-world matrix and ``shape`` the volume's ``(columns, rows, slices)``.
    """

    folder: Path
    slices: list
    affine: np.ndarray
    shape: tuple[int, int, int]
    step: float
    series_uid: str


def not_a_slice(ds) -> str | None:
    """Why ``ds`` is no slice of an image series (an SR, a SEG, a localizer, no pixel data, ...), or None when it is one."""
    modality = str(ds.get("Modality", "") or "").upper()
    if modality in NON_IMAGE_MODALITIES:
        return NON_IMAGE_MODALITIES[modality]
    sop = str(ds.get("SOPClassUID", "") or "")
    for prefix, what in NON_IMAGE_SOP_PREFIXES.items():
        if sop.startswith(prefix):
            return what
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return f"a DICOM object without pixel data (Modality {modality or 'missing'})"
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if "LOCALIZER" in image_type:
        return "a localizer (scout) image (ImageType LOCALIZER)"
    return None


def _read_datasets(folder: Path, headers_only: bool) -> list[tuple[Path, object]]:
    """``(file, dataset)`` of every DICOM file in ``folder``; ``headers_only`` defers the pixel data (read on access)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    files = dicom_files(folder)
    if not files:
        raise Flare23Error(f"{folder}: no DICOM files found")
    datasets = []
    for f in files:
        try:
            # defer_size: large values (the pixel data) stay in the file, but their elements are known to exist
            ds = pydicom.dcmread(f, defer_size=1024) if headers_only else pydicom.dcmread(f)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise Flare23Error(f"{f}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
        datasets.append((f, ds))
    return datasets


def _series_label(files: list[tuple[Path, object]]) -> str:
    f, ds = files[0]
    number = ds.get("SeriesNumber")
    desc = str(ds.get("SeriesDescription", "") or "").strip()
    parts = [f"series {number}" if number not in (None, "") else "no SeriesNumber"]
    if desc:
        parts.append(repr(desc))
    parts.append(f"{len(files)} file{'s' if len(files) != 1 else ''}")
    return f"{f.name} ({', '.join(parts)})"


def _image_slices(folder: Path, datasets: list[tuple[Path, object]], warn: bool) -> list[tuple[Path, object]]:
    """The slices of the one image series in ``datasets``: non-image objects and localizers are skipped (a warning
    naming each file), several image series are refused in one line naming a file of each."""
    slices = []
    for f, ds in datasets:
        why = not_a_slice(ds)
        if why is None:
            slices.append((f, ds))
        elif warn:
            warnings.warn(f"{f}: skipped, {why}, not a slice of the image series", UserWarning, stacklevel=4)
    if not slices:
        raise Flare23Error(f"{folder}: none of its {len(datasets)} DICOM files is a slice of an image series")
    by_series: dict[str, list] = {}
    for f, ds in slices:
        by_series.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append((f, ds))
    if len(by_series) > 1:
        groups = sorted(by_series.values(), key=lambda g: (-len(g), g[0][0].name))
        raise Flare23Error(
            f"{folder}: holds {len(groups)} series (SeriesInstanceUIDs), expected one: "
            f"{'; '.join(_series_label(g) for g in groups)}; put each series in its own folder"
        )
    return slices


def _series_geometry(folder: Path, datasets: list[tuple[Path, object]]) -> DicomSeries:
    """Check the slices' sizes, orientation and spacing and sort them along the slice normal."""
    f0, ds0 = datasets[0]
    iop = _floats(ds0, "ImageOrientationPatient", 6, f0)
    pixel_spacing = _floats(ds0, "PixelSpacing", 2, f0)
    rows, cols = int(ds0.get("Rows", 0)), int(ds0.get("Columns", 0))
    row_dir, col_dir = iop[:3], iop[3:]
    if min(rows, cols) < 1 or min(pixel_spacing) <= 0:
        raise Flare23Error(f"{f0}: invalid image size {rows} x {cols} or pixel spacing {pixel_spacing.tolist()}")
    if abs(np.linalg.norm(row_dir) - 1) > 1e-2 or abs(np.linalg.norm(col_dir) - 1) > 1e-2 or abs(row_dir @ col_dir) > 1e-2:
        raise Flare23Error(f"{f0}: ImageOrientationPatient {iop.tolist()} is not two orthonormal directions")
    row_dir, col_dir = row_dir / np.linalg.norm(row_dir), col_dir / np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)

    positions = []
    for f, ds in datasets:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise Flare23Error(f"{f}: multi-frame DICOM is not supported")
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise Flare23Error(f"{f}: colour DICOM images are not supported (SamplesPerPixel {ds.get('SamplesPerPixel')})")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, cols):
            raise Flare23Error(
                f"{folder}: slices differ in size ({f.name} is {ds.get('Rows')} x {ds.get('Columns')}, {f0.name} is {rows} x {cols})"
            )
        if np.abs(_floats(ds, "ImageOrientationPatient", 6, f) - iop).max() > DIRECTION_TOL:
            raise Flare23Error(f"{folder}: slices differ in ImageOrientationPatient ({f.name} vs {f0.name})")
        if np.abs(_floats(ds, "PixelSpacing", 2, f) - pixel_spacing).max() > DIRECTION_TOL * pixel_spacing.max():
            raise Flare23Error(f"{folder}: slices differ in PixelSpacing ({f.name} vs {f0.name})")
        positions.append(_floats(ds, "ImagePositionPatient", 3, f))
    positions = np.array(positions)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]
    datasets = [datasets[i] for i in order]
    n = len(datasets)

    if n > 1:
        gaps = np.diff(along)
        if np.min(gaps) < SPACING_ATOL_MM:
            i = int(np.argmin(gaps))
            raise Flare23Error(f"{folder}: two slices at the same position ({datasets[i][0].name}, {datasets[i + 1][0].name})")
        step = float(np.median(gaps))
        if np.max(gaps) > MISSING_SLICE_FACTOR * step:
            i = int(np.argmax(gaps))
            raise Flare23Error(
                f"{folder}: missing slice(s): gap of {gaps[i]:.3f} mm between {datasets[i][0].name} and {datasets[i + 1][0].name}, "
                f"median spacing {step:.3f} mm"
            )
        if np.max(np.abs(gaps - step)) > SPACING_ATOL_MM + SPACING_RTOL * step:
            raise Flare23Error(
                f"{folder}: non-uniform slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm); resample it first"
            )
        lateral = (positions - positions[0]) - np.outer(along - along[0], normal)
        if np.abs(lateral).max() > max(SPACING_ATOL_MM, DIRECTION_TOL * (along[-1] - along[0])):
            raise Flare23Error(f"{folder}: slice positions do not follow the slice normal (gantry tilt); not supported")
    else:
        step = float(datasets[0][1].get("SpacingBetweenSlices") or datasets[0][1].get("SliceThickness") or 1.0)

    dr, dc = pixel_spacing  # PixelSpacing = (spacing between rows, spacing between columns)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * dc  # array axis 0: along a row (the DICOM column index)
    affine_lps[:3, 1] = -col_dir * dr  # array axis 1: the row index, flipped
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[0] + col_dir * dr * (rows - 1)  # voxel (0, 0, 0) is the last row's first pixel
    uid = str(datasets[0][1].get("SeriesInstanceUID", ""))
    return DicomSeries(folder, datasets, _LPS_TO_RAS @ affine_lps, (cols, rows, n), step, uid)


def dicom_series_headers(folder: str | os.PathLike, warn: bool = False) -> DicomSeries:
    """The slices of the series in ``folder`` exactly as :func:`read_dicom_series` selects and orders them, without
    decoding any pixel data (for writing a result that references them, e.g. a DICOM SEG).

    ``warn``: repeat the warnings about skipped files (off by default: the reader has given them).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise Flare23Error(f"{folder}: not a folder")
    return _series_geometry(folder, _image_slices(folder, _read_datasets(folder, headers_only=True), warn))


def frames_to_volume(frame: np.ndarray) -> np.ndarray:
    """One DICOM frame ``(rows, columns)`` as the volume's ``(columns, flipped rows)`` plane (see the module docstring)."""
    return frame.T[:, ::-1]


def volume_to_frames(volume: np.ndarray) -> np.ndarray:
    """A volume ``(columns, flipped rows, slices)`` as DICOM frames ``(slices, rows, columns)`` in slice order (a view)."""
    return np.asarray(volume)[:, ::-1, :].transpose(2, 1, 0)


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the single DICOM series in ``folder``: ``(array, affine, meta)`` (see module docstring).

    Files that are no slice of an image series (an SR, a SEG, a presentation state, a localizer,
    anything without pixel data) are skipped with a warning naming each; a folder that holds
    several image series is refused in one line naming a file of each.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise Flare23Error(f"{folder}: not a folder")
    series = _series_geometry(folder, _image_slices(folder, _read_datasets(folder, headers_only=False), warn=True))
    cols, rows, n = series.shape

    # Decode: DICOM pixel_array is (rows, columns); the volume is (columns, flipped rows, slices).
    # Integer rescaling keeps int16 as long as the values fit; anything else switches to float32.
    volume = np.empty((cols, rows, n), dtype=np.int16)
    for k, (f, ds) in enumerate(series.slices):
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # decoders raise many types (missing plugin, corrupt stream)
            raise Flare23Error(f"{f}: cannot decode the pixel data ({type(exc).__name__}: {exc})") from None
        if pixels.shape != (rows, cols):
            raise Flare23Error(f"{f}: pixel data of shape {pixels.shape}, expected {rows} x {cols}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if volume.dtype == np.int16 and slope.is_integer() and intercept.is_integer():
            hu = pixels.astype(np.int64) * int(slope) + int(intercept)
            if hu.size and (hu.min() < _INT16.min or hu.max() > _INT16.max):
                volume, hu = volume.astype(np.float32), hu.astype(np.float32)
        else:
            volume = volume.astype(np.float32, copy=False)
            hu = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        volume[:, :, k] = frames_to_volume(hu)
    ds_first = series.slices[0][1]
    meta = {
        "header": None,
        "series_uid": series.series_uid,
        "modality": str(ds_first.get("Modality", "")),
        "series_description": str(ds_first.get("SeriesDescription", "")),
        "num_slices": n,
        "slice_spacing": series.step,
    }
    return volume, series.affine, meta



#: Modalities of DICOM objects that are not slices of an image series (skipped with a warning when they sit in a series folder).
NON_IMAGE_MODALITIES: dict[str, str] = {
    "SR": "a structured report (SR)",
    "SEG": "a segmentation (SEG)",
    "RTSTRUCT": "an RT structure set",
    "RTPLAN": "an RT plan",
    "RTRECORD": "an RT treatment record",
    "RTDOSE": "an RT dose grid",
    "PR": "a presentation state (PR)",
    "KO": "a key object selection (KO)",
    "REG": "a registration (REG)",
    "DOC": "an encapsulated document (DOC)",
}
#: SOP Class UID prefixes of the same kinds of objects (when Modality is missing or unusual).
NON_IMAGE_SOP_PREFIXES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.": "a structured report (SR)",
    "1.2.840.10008.5.1.4.1.1.66.": "a segmentation or registration object",
    "1.2.840.10008.5.1.4.1.1.11.": "a presentation state (PR)",
    "1.2.840.10008.5.1.4.1.1.481.": "an RT object",
    "1.2.840.10008.5.1.4.1.1.104.": "an encapsulated document",
}
