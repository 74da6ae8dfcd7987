"""Input readers of the inference pipeline: NIfTI files and DICOM series (METHOD.md section 5, step 1).

* :func:`list_cases` turns the user's input into cases: a NIfTI file, a folder of NIfTI files, a
  DICOM series folder (files recognised by the ``DICM`` magic, whatever their names) or a folder
  of DICOM series folders (NIfTI files and series folders may sit side by side).
* :func:`read_case` returns ``(array, affine, meta)``: Hounsfield units as ``int16`` (or
  ``float32`` when they do not fit), and a 4 x 4 affine in nibabel's RAS+ world convention, such
  that ``nib.Nifti1Image(array, affine)`` is the correct image. NaN and infinite voxels are
  replaced (:func:`replace_nonfinite`) and an image that does not look like CT is segmented with a
  warning (:func:`check_ct_range`); each warning names the file.

DICOM series are read by :mod:`flare23.data.dicom`.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from flare23.data.dicom import is_dicom_file, read_dicom_series
from flare23.errors import Flare23Error
from flare23.io import case_name, is_nifti, load_nifti, voxel_spacing

#: Values given to NaN / -inf and to +inf voxels (air; the top of the usual 12-bit CT range).
NONFINITE_FILL = -1024.0
POSINF_FILL = 3071.0
#: A CT with no voxel below this (no air anywhere) does not look like CT in Hounsfield units.
CT_AIR_BELOW_HU = -500.0
_INT16 = np.iinfo(np.int16)


@dataclass(frozen=True)
class Case:
    """One input scan: its ``name`` (output file stem), its ``path`` and its ``kind``."""

    name: str
    path: Path
    kind: str  # "nifti" or "dicom"


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
