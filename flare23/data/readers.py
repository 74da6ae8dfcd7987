"""Input readers of the inference pipeline: NIfTI files and DICOM series (METHOD.md section 5, step 1).

* :func:`list_cases` turns the user's input into cases: a NIfTI file, a folder of NIfTI files, a
  DICOM series folder (files recognised by the ``DICM`` magic, whatever their names) or a folder
  of DICOM series folders (NIfTI files and series folders may sit side by side).
* :func:`read_case` returns ``(array, affine, meta)``: Hounsfield units as ``int16`` (or
  ``float32`` when they do not fit), and a 4 x 4 affine in nibabel's RAS+ world convention, such
  that ``nib.Nifti1Image(array, affine)`` is the correct image. NaN and infinite voxels are
  replaced (:func:`replace_nonfinite`) and an image that does not look like CT is segmented with a
  warning (:func:`check_ct_range`); each warning names the file.

DICOM series are read with pydicom (JPEG 2000 and other compressed pixel data through pylibjpeg).
The array axes follow the convention of dcm2niix and dicom2nifti: axis 0 runs along the image
rows (the DICOM column index, direction ``ImageOrientationPatient[:3]``), axis 1 along the image
columns from the last row to the first (the row order is flipped, so an axial series comes out
LAS), axis 2 along the slice normal ``row x column`` in increasing position. The affine is built
in LPS from ``ImageOrientationPatient``, ``ImagePositionPatient`` and ``PixelSpacing`` and turned
into RAS by negating its first two rows, as nibabel and ITK do. Every defect is a one-line
:class:`~flare23.errors.Flare23Error` naming the folder (or file): several series in one folder,
a missing slice (a gap over 1.5 x the median spacing), non-uniform spacing, gantry tilt,
inconsistent orientation or size, multi-frame or colour images, unreadable files.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare23.errors import Flare23Error
from flare23.io import case_name, is_nifti, load_nifti, voxel_spacing

#: A gap between neighbouring slices larger than this many median spacings is a missing slice.
MISSING_SLICE_FACTOR = 1.5
#: Slice spacings may differ from their median by this much (mm) plus this fraction of it.
SPACING_ATOL_MM = 0.01
SPACING_RTOL = 0.01
#: Tolerance on direction cosines (orientation equality, tilt) and pixel spacing (relative).
DIRECTION_TOL = 1e-3
#: Values given to NaN / -inf and to +inf voxels (air; the top of the usual 12-bit CT range).
NONFINITE_FILL = -1024.0
POSINF_FILL = 3071.0
#: A CT with no voxel below this (no air anywhere) does not look like CT in Hounsfield units.
CT_AIR_BELOW_HU = -500.0

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class Case:
    """One input scan: its ``name`` (output file stem), its ``path`` and its ``kind``."""

    name: str
    path: Path
    kind: str  # "nifti" or "dicom"


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


def _has_dicom(folder: Path) -> bool:
    return any(is_dicom_file(p) for p in folder.iterdir())


def list_cases(input_path: str | os.PathLike) -> list[Case]:
    """Cases found at ``input_path`` (see the module docstring), sorted by name.

    A folder that holds DICOM files directly is one series (named after the folder); otherwise its
    NIfTI files and its sub-folders that hold DICOM files are the cases. Nothing usable, or a
    folder that mixes DICOM files with NIfTI files, is a one-line error naming the path.
    """
    path = Path(input_path)
    if not path.exists():
        raise Flare23Error(f"{path}: no such file or folder")
    if path.is_file():
        if is_nifti(path.name):
            return [Case(case_name(path), path, "nifti")]
        if is_dicom_file(path):
            raise Flare23Error(f"{path}: a single DICOM file; give the folder of its series instead")
        raise Flare23Error(f"{path}: unsupported input (expected a NIfTI file, a folder of them, or a DICOM series folder)")
    if not path.is_dir():
        raise Flare23Error(f"{path}: unsupported input (not a regular file or folder)")
    try:
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    except OSError as exc:
        raise Flare23Error(f"{path}: cannot list the folder ({exc.strerror or exc})") from None
    niftis = [p for p in entries if p.is_file() and is_nifti(p.name)]
    if any(is_dicom_file(p) for p in entries):
        if niftis:
            raise Flare23Error(f"{path}: holds both DICOM files and NIfTI files; put the DICOM series in its own folder")
        return [Case(path.resolve().name, path, "dicom")]
    cases = [Case(case_name(p), p, "nifti") for p in niftis]
    cases += [Case(p.name, p, "dicom") for p in entries if p.is_dir() and _has_dicom(p)]
    if not cases:
        raise Flare23Error(f"{path}: no NIfTI files or DICOM series found")
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise Flare23Error(f"{path}: several inputs share the case name {dupes[0]} (e.g. a NIfTI file and a series folder)")
    return sorted(cases, key=lambda c: c.name)


def _as_hu(data: np.ndarray) -> np.ndarray:
    """int16 when the values are integers that fit, else float32."""
    if data.dtype == np.int16:
        return data
    if np.issubdtype(data.dtype, np.integer) or data.dtype == bool:
        if data.size == 0 or (int(data.min()) >= _INT16.min and int(data.max()) <= _INT16.max):
            return data.astype(np.int16)
        return data.astype(np.float32)
    data = data.astype(np.float32, copy=False)
    return data


def read_case(case: Case) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read one case: ``(array, affine, meta)``.

    ``array`` holds Hounsfield units (``int16`` when they are integers that fit, else ``float32``),
    ``affine`` is the 4 x 4 RAS+ voxel-to-world matrix, ``meta`` a dict with ``kind``, ``path``,
    ``name``, ``spacing`` (mm per array axis) and, for NIfTI, the nibabel ``header`` (to write the
    result with the input's header); for DICOM the series' ``series_uid``, ``modality``,
    ``num_slices``, ``slice_spacing`` and ``header`` = ``None``.
    """
    if case.kind == "nifti":
        data, affine, header = load_nifti(case.path)
        array = _as_hu(data)
        meta = {"header": header}
    elif case.kind == "dicom":
        array, affine, meta = read_dicom_series(case.path)
    else:
        raise Flare23Error(f"{case.path}: unknown case kind {case.kind!r}")
    meta.update(kind=case.kind, path=str(case.path), name=case.name, spacing=tuple(float(s) for s in voxel_spacing(affine)))
    array = replace_nonfinite(array, case.path)
    check_ct_range(array, case.path, meta.get("modality"))
    return array, affine, meta


def replace_nonfinite(array: np.ndarray, where) -> np.ndarray:
    """NaN and -inf voxels -> air (:data:`NONFINITE_FILL`), +inf -> :data:`POSINF_FILL`, with a warning naming ``where``.

    NaN voxels in a CT almost always mark voxels outside the reconstructed field of view, written
    by resampling tools (SimpleITK, ANTs, ...) as their default fill; air is what the scanner puts
    there. Refusing the scan would stop a batch for a cosmetic defect, and passing NaN on would
    turn every patch that touches one into NaN probabilities. The input array is not modified.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return array
    bad = ~np.isfinite(array)
    n = int(np.count_nonzero(bad))
    if n == 0:
        return array
    warnings.warn(
        f"{where}: {n} voxels are NaN or infinite; NaN and -inf set to {NONFINITE_FILL:g} HU, +inf to {POSINF_FILL:g} HU",
        UserWarning,
        stacklevel=3,
    )
    return np.nan_to_num(array, nan=NONFINITE_FILL, posinf=POSINF_FILL, neginf=NONFINITE_FILL)


def check_ct_range(array: np.ndarray, where, modality: str | None = None) -> bool:
    """Warn (naming ``where``) when the image does not look like CT in Hounsfield units; returns True when it does.

    Every abdominal CT holds air (outside the body, in the lungs or the bowel) at about -1000 HU;
    an image without any voxel below :data:`CT_AIR_BELOW_HU` is most likely MR, a rescaled CT or
    a tight crop. It is still segmented (its origin cannot be known for sure), but the models
    were trained on CT and the result may be meaningless. A DICOM ``Modality`` other than CT
    also warns.
    """
    if modality and str(modality).upper() not in ("CT", ""):
        warnings.warn(f"{where}: DICOM Modality is {modality}, not CT; the models were trained on CT", UserWarning, stacklevel=3)
        return False
    if array.size and float(array.min()) >= CT_AIR_BELOW_HU:
        warnings.warn(
            f"{where}: does not look like CT in Hounsfield units (values {float(array.min()):g} to {float(array.max()):g}, "
            f"no air below {CT_AIR_BELOW_HU:g}); segmented anyway, the result may be meaningless",
            UserWarning,
            stacklevel=3,
        )
        return False
    return True


def _floats(ds, keyword: str, count: int, file: Path) -> np.ndarray:
    value = ds.get(keyword)
    try:
        arr = np.array([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (count,) or not np.all(np.isfinite(arr)):
        raise Flare23Error(f"{file}: missing or invalid {keyword} ({value!r})")
    return arr


def read_dicom_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read the single DICOM series in ``folder``: ``(array, affine, meta)`` (see module docstring)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    if not folder.is_dir():
        raise Flare23Error(f"{folder}: not a folder")
    files = dicom_files(folder)
    if not files:
        raise Flare23Error(f"{folder}: no DICOM files found")
    datasets = []
    for f in files:
        try:
            datasets.append((f, pydicom.dcmread(f)))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise Flare23Error(f"{f}: not a readable DICOM file ({type(exc).__name__}: {exc})") from None
    uids = sorted({str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets})
    if len(uids) > 1:
        raise Flare23Error(
            f"{folder}: holds {len(uids)} series (SeriesInstanceUIDs), expected one; put each series in its own folder"
        )

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
        if "PixelData" not in ds:
            raise Flare23Error(f"{f}: no pixel data")
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

    # Decode: DICOM pixel_array is (rows, columns); the volume is (columns, flipped rows, slices).
    # Integer rescaling keeps int16 as long as the values fit; anything else switches to float32.
    volume = np.empty((cols, rows, n), dtype=np.int16)
    for k, (f, ds) in enumerate(datasets):
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
        volume[:, :, k] = hu.T[:, ::-1]

    dr, dc = pixel_spacing  # PixelSpacing = (spacing between rows, spacing between columns)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * dc  # array axis 0: along a row (the DICOM column index)
    affine_lps[:3, 1] = -col_dir * dr  # array axis 1: the row index, flipped
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[0] + col_dir * dr * (rows - 1)  # voxel (0, 0, 0) is the last row's first pixel
    affine = _LPS_TO_RAS @ affine_lps
    ds_first = datasets[0][1]
    meta = {
        "header": None,
        "series_uid": uids[0],
        "modality": str(ds_first.get("Modality", "")),
        "series_description": str(ds_first.get("SeriesDescription", "")),
        "num_slices": n,
        "slice_spacing": step,
    }
    return volume, affine, meta
