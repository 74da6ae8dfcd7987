"""A corpus of bad and unusual inputs (issue 9), generated on the fly for the tests of ``test_corpus.py``.

Everything is written with nibabel, gzip and pydicom directly (never with the project's own
writers), so that the project's readers are tested against files they did not produce. Volumes
are tiny (24 x 24 x 12 voxels where the kind allows) so that a pipeline run over the whole corpus
takes seconds.

:func:`image_corpus` writes the CT-like inputs of ``flare23 segment`` into one folder (NIfTI files
and DICOM series sub-folders side by side: one pipeline run covers them all) and returns one
:class:`Kind` per input, with what the project must do with it. :func:`label_corpus` writes label
maps (references / predictions) for ``flare23 evaluate`` and the data tools. :func:`tree_hashes`
is the before / after check that inputs are never modified.
"""

from __future__ import annotations

import datetime
import gzip
import hashlib
import struct
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

SHAPE = (24, 24, 12)
SPACING = (1.5, 1.5, 2.5)
ORIGIN = (-20.0, 15.0, -300.0)
#: A file name with spaces and non-ASCII characters (its case name is this without ``_0000.nii.gz``).
ODD_NAME = "patient 7 é ü 名前"
VALID, ERROR, WARNING = "valid", "error", "warning"  # WARNING: a valid output and a warning


@dataclass(frozen=True)
class Kind:
    """One corpus input and the expected outcome.

    ``expect`` is ``"valid"`` (an output with ``shape`` and ``affine``, the input's own geometry
    computed here from the generation parameters), ``"warning"`` (the same, plus a warning whose
    text contains ``words``) or ``"error"`` (a one-line error naming ``path`` whose text contains
    ``words``, and no output file).
    """

    name: str
    path: Path
    case: str
    expect: str
    words: tuple[str, ...] = ()
    shape: tuple[int, ...] | None = None
    affine: np.ndarray | None = None


# --- geometry and content ------------------------------------------------------------------------
def ras_affine(spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    a = np.diag([*map(float, spacing), 1.0])
    a[:3, 3] = origin
    return a


def oriented_affine(codes: str, shape=SHAPE, spacing=SPACING, origin=ORIGIN) -> np.ndarray:
    """The affine of an array whose axes run along ``codes`` (e.g. ``"LPS"``, ``"RAI"``): flips of RAS."""
    a = ras_affine(spacing, origin)
    for axis, (code, pos) in enumerate(zip(codes, "RAS")):
        if code != pos:  # the axis runs the other way: flip the column, move the origin to the far end
            a[:3, 3] += a[:3, axis] * (shape[axis] - 1)
            a[:3, axis] *= -1
    return a


def oblique_affine(spacing=SPACING, origin=ORIGIN, degrees=(20.0, 12.0)) -> np.ndarray:
    """Rotated about z by ``degrees[0]`` then about x by ``degrees[1]``: no axis is aligned with the world."""
    z, x = np.deg2rad(degrees)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    a = np.eye(4)
    a[:3, :3] = rx @ rz @ np.diag(spacing)
    a[:3, 3] = origin
    return a


def body(shape=SHAPE, seed: int = 0) -> np.ndarray:
    """An int16 CT-like volume: an elliptic body of soft tissue (about 40 HU) with a bright spine, air around."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    inside = (x / 0.85) ** 2 + (y / 0.7) ** 2 <= 1.0
    spine = (x / 0.15) ** 2 + ((y - 0.45) / 0.15) ** 2 <= 1.0
    hu = np.where(inside, 40.0, -1000.0) + np.where(spine, 600.0, 0.0)
    vol = np.repeat(hu[:, :, None], shape[2], axis=2) + rng.normal(0.0, 10.0, shape)
    return np.rint(vol).astype(np.int16)


def head(shape=SHAPE) -> np.ndarray:
    """A head without abdomen: a skull shell (1000 HU) around brain (35 HU), air around."""
    g = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt((g[0] / 0.8) ** 2 + (g[1] / 0.9) ** 2 + (g[2] / 0.95) ** 2)
    return np.select([r <= 0.8, r <= 0.95], [35, 1000], -1000).astype(np.int16)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=float))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


def write_with_raw_sform(path: Path, data: np.ndarray, sform: np.ndarray) -> Path:
    """A .nii.gz whose header holds exactly ``sform`` (code 2, qform code 0), whatever it is.

    nibabel refuses to build an image from a zero or singular affine, so the header fields are
    patched in the bytes of a valid file (NIfTI-1: qform_code at byte 252, sform_code at 254,
    srow_x / y / z at 280 / 296 / 312, little-endian).
    """
    raw = bytearray(nib.Nifti1Image(np.asarray(data), np.eye(4)).to_bytes())
    raw[252:256] = struct.pack("<hh", 0, 2)
    for row, offset in zip(np.asarray(sform, dtype=np.float32)[:3], (280, 296, 312)):
        raw[offset : offset + 16] = struct.pack("<4f", *row)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(bytes(raw)))
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def tree_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder`` (to compare before and after a run)."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def files_under(folder: Path) -> list[str]:
    folder = Path(folder)
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


# --- DICOM ---------------------------------------------------------------------------------------
def dicom_affine(rows: int, cols: int, pixel_spacing, step: float, first_position) -> np.ndarray:
    """RAS affine of an axial series (IOP 1,0,0,0,1,0) in the dcm2niix convention (axis 1 = rows flipped: LAS)."""
    dr, dc = pixel_spacing
    lps = np.eye(4)
    lps[:3, 0] = (dc, 0.0, 0.0)
    lps[:3, 1] = (0.0, -dr, 0.0)
    lps[:3, 2] = (0.0, 0.0, step)
    lps[:3, 3] = np.asarray(first_position, dtype=float) + np.array([0.0, dr * (rows - 1), 0.0])
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _file_dataset(path: Path, sop_class: str, transfer_syntax=None):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds


def _study(ds, study_uid: str, series_uid: str, frame_uid: str | None, modality: str = "CT", series_number: int = 1) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    if frame_uid:
        ds.FrameOfReferenceUID = frame_uid
    ds.Modality, ds.PatientName, ds.PatientID = modality, "Corpus^Case", "corpus"
    ds.StudyDate = datetime.date(2024, 1, 1).strftime("%Y%m%d")
    ds.SeriesNumber = series_number


def _pixels(ds, frame: np.ndarray, compress: bool) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleSlope, ds.RescaleIntercept = 1, 0
    ds.Rows, ds.Columns = frame.shape
    frame = np.ascontiguousarray(frame.astype("<i2"))
    if compress:  # JPEG 2000 lossless through pylibjpeg-openjpeg (needs at least 32 x 32 pixels)
        from pydicom.uid import JPEG2000Lossless

        ds.compress(JPEG2000Lossless, frame, encoding_plugin="pylibjpeg")
    else:
        ds.PixelData = frame.tobytes()


def write_dicom_series(
    folder: Path,
    volume: np.ndarray,
    pixel_spacing=(1.5, 1.5),
    step: float = 2.5,
    origin=(-20.0, -30.0, -300.0),
    prefix: str = "",
    modality: str = "CT",
    suffix: str = "",
    first_instance: int = 1,
    jpeg2000: bool = False,
    uids: dict | None = None,
    blank_uids: bool = False,
) -> list[Path]:
    """Axial CT slices; ``volume`` is (rows, cols, slices) int16 HU; slice k at z = origin_z + k * step.

    Files are ``<prefix>slice<NNN><suffix>`` with names unrelated to the slice order; ``InstanceNumber``
    counts from ``first_instance``; ``jpeg2000`` compresses the pixel data (lossless); ``uids`` gives
    ``study`` / ``series`` / ``frame`` UIDs (else new ones); ``blank_uids`` writes empty study, series and SOP
    instance UIDs, as some anonymisers do.
    """
    from pydicom.uid import CTImageStorage, JPEG2000Lossless, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = dict(uids or {})
    study_uid, series_uid = uids.get("study") or generate_uid(), uids.get("series") or generate_uid()
    frame_uid = uids.get("frame") or generate_uid()
    rows, cols, n = volume.shape
    paths = []
    for k in range(n):
        path = folder / f"{prefix}slice{(5 * k) % n:03d}{suffix}"  # names unrelated to the slice order
        ds = _file_dataset(path, CTImageStorage, JPEG2000Lossless if jpeg2000 else None)
        _study(ds, study_uid, series_uid, frame_uid, modality)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(origin[0]), float(origin[1]), float(origin[2] + k * step)]
        ds.PixelSpacing = [float(pixel_spacing[0]), float(pixel_spacing[1])]
        ds.SliceThickness = float(step)
        ds.InstanceNumber = k + first_instance
        _pixels(ds, volume[:, :, k], jpeg2000)
        if blank_uids:
            ds.StudyInstanceUID = ds.SeriesInstanceUID = ds.SOPInstanceUID = ""
            ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()  # the file meta must stay valid
        ds.save_as(path, enforce_file_format=not blank_uids)
        paths.append(path)
    return paths


def series_uids(folder: Path) -> dict:
    """``{"study", "series", "frame"}`` UIDs of a series written by :func:`write_dicom_series`."""
    import pydicom

    ds = pydicom.dcmread(next(p for p in sorted(Path(folder).iterdir()) if p.is_file()), stop_before_pixels=True)
    return {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "frame": ds.get("FrameOfReferenceUID")}


def write_structured_report(path: Path, uids: dict) -> Path:
    """A Basic Text SR in the study of ``uids`` (its own series), as a scanner's dose report sits beside the images."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    ds = _file_dataset(path, "1.2.840.10008.5.1.4.1.1.88.11")  # Basic Text SR Storage
    _study(ds, uids["study"], generate_uid(), None, modality="SR", series_number=999)
    ds.ValueType, ds.CompletionFlag, ds.VerificationFlag = "CONTAINER", "COMPLETE", "UNVERIFIED"
    name = Dataset()
    name.CodeValue, name.CodingSchemeDesignator, name.CodeMeaning = "113701", "DCM", "X-Ray Radiation Dose Report"
    ds.ConceptNameCodeSequence = [name]
    ds.ContinuityOfContent = "SEPARATE"
    ds.save_as(path, enforce_file_format=True)
    return path


def write_localizer(path: Path, uids: dict, size: int = 24, same_series: bool = False) -> Path:
    """A coronal CT localizer (scout, ``ImageType`` LOCALIZER) of the study of ``uids``."""
    from pydicom.uid import CTImageStorage, generate_uid

    ds = _file_dataset(path, CTImageStorage)
    _study(ds, uids["study"], uids["series"] if same_series else generate_uid(), uids.get("frame"), series_number=2)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-200.0, 0.0, 100.0]
    ds.PixelSpacing = [2.0, 2.0]
    ds.InstanceNumber = 1
    _pixels(ds, np.full((size, size), 100, np.int16), compress=False)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicom_volume(folder: Path, array: np.ndarray, affine: np.ndarray, slice_axis: int = 0, flip_rows: bool = True,
                       uids: dict | None = None) -> list[Path]:  # fmt: skip
    """Write the RAS-affine volume ``array`` as a single-frame CT series sliced along array axis ``slice_axis``.

    Of the two other axes, the first runs along the image rows (the DICOM column index, direction
    ``ImageOrientationPatient[:3]``), the second down the columns, reversed when ``flip_rows`` (so that
    slicing a RAS volume along x gives upright sagittal images: head at the top). Any orientation that
    the affine's axes allow is written exactly: the series' geometry is the volume's.
    """
    from pydicom.uid import CTImageStorage, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uids = dict(uids or {})
    study_uid, series_uid = uids.get("study") or generate_uid(), uids.get("series") or generate_uid()
    frame_uid = uids.get("frame") or generate_uid()
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(affine, dtype=float)
    u, v = [a for a in range(3) if a != slice_axis]
    su, sv = np.linalg.norm(lps[:3, u]), np.linalg.norm(lps[:3, v])
    row_dir = lps[:3, u] / su
    col_dir = (-1.0 if flip_rows else 1.0) * lps[:3, v] / sv
    data = np.moveaxis(np.asarray(array), (v, u, slice_axis), (0, 1, 2))  # (rows, columns, slices)
    if flip_rows:
        data = data[::-1]
    paths = []
    for k in range(data.shape[2]):
        path = folder / f"IM{k:05d}"
        ds = _file_dataset(path, CTImageStorage)
        _study(ds, study_uid, series_uid, frame_uid)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
        index = np.zeros(4)
        index[3], index[slice_axis] = 1.0, k
        index[v] = data.shape[0] - 1 if flip_rows else 0
        ds.ImageOrientationPatient = [float(x) for x in (*row_dir, *col_dir)]
        ds.ImagePositionPatient = [float(x) for x in (lps @ index)[:3]]
        ds.PixelSpacing = [float(sv), float(su)]
        ds.SliceThickness = float(np.linalg.norm(lps[:3, slice_axis]))
        ds.InstanceNumber = k + 1
        _pixels(ds, data[:, :, k], compress=False)
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def copy_series_with_uids(src: Path, dst: Path) -> Path:
    """Copy a DICOM series giving it the study, series and SOP instance UIDs a PACS would (pixel data untouched).

    The real example series of ``../shared`` was anonymised with its UIDs blanked; a DICOM SEG must
    reference its source by UID.
    """
    import pydicom
    from pydicom.uid import CTImageStorage, generate_uid

    dst.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    for f in sorted(Path(src).iterdir()):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPClassUID = ds.SOPClassUID or CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesNumber = 3
        ds.save_as(dst / f.name, enforce_file_format=True)
    return dst


# --- the corpus of segment inputs ----------------------------------------------------------------
def image_corpus(folder: Path) -> dict[str, Kind]:
    """Write every CT-like input kind into ``folder``; return ``{kind: Kind}``.

    NIfTI files are ``<kind>_0000.nii.gz`` (case name ``<kind>``), except the odd-name case;
    DICOM series are sub-folders (case name = folder name). An empty folder lies beside (not
    inside) ``folder``: it is an input of its own.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kinds: dict[str, Kind] = {}
    ras = ras_affine()

    def nifti(name, data, affine, expect=VALID, words=(), stem=None):
        path = write_nifti(folder / f"{stem or name}_0000.nii.gz", data, affine)
        shape = tuple(np.asarray(data).shape)
        kinds[name] = Kind(
            name,
            path,
            stem or name,
            expect,
            tuple(words),
            shape if expect != ERROR else None,
            affine if expect != ERROR else None,
        )
        return path

    # unreadable files
    truncate(nifti("truncated", body(), ras, ERROR, ("truncated",)))
    plain = folder / "not_gzip_0000.nii.gz"  # an uncompressed .nii under a .nii.gz name
    plain.write_bytes(nib.Nifti1Image(body(seed=1), ras).to_bytes())
    kinds["not_gzip"] = Kind("not_gzip", plain, "not_gzip", WARNING, ("not gzip",), SHAPE, ras)
    garbage = folder / "garbage_0000.nii.gz"
    garbage.write_bytes(b"\x1f\x8b\x08" + bytes(range(256)) * 4)
    kinds["garbage"] = Kind("garbage", garbage, "garbage", ERROR, ("not a readable NIfTI",))
    # dimensionality
    nifti("image_2d", body()[:, :, 0], ras, ERROR, ("3D", "(24, 24)"))
    nifti("image_4d", np.stack([body(), body(seed=2)], axis=-1), ras, ERROR, ("3D", "(24, 24, 12, 2)"))
    # intensities
    mr = np.clip(np.rint((body().astype(np.float32) + 1000.0) * 0.4), 0, None).astype(np.uint16)  # 0 .. ~650, no air
    nifti("mr_like", mr, ras, WARNING, ("not look like CT",))
    bad = body().astype(np.float32)
    bad[0, 0, :3], bad[5, 6, 7], bad[10, 10, 2], bad[1, 2, 3] = np.nan, np.inf, -np.inf, np.nan
    nifti("nan_inf", bad, ras, WARNING, ("NaN", "6 voxels"))
    nifti("constant", np.full(SHAPE, 40, np.int16), ras, WARNING, ("not look like CT",))  # no air either
    # sizes and spacings
    nifti("smaller_than_patch", body((5, 4, 3)), ras)
    nifti("single_slice", body((24, 24, 1)), ras)
    nifti("slices_10mm", body((24, 24, 6)), ras_affine((1.5, 1.5, 10.0)))
    nifti("slices_0_3mm", body((24, 24, 40)), ras_affine((0.8, 0.8, 0.3)))
    # geometry
    nifti("oblique", body(), oblique_affine())
    for codes in ("RAS", "LPS", "LAS", "RAI"):
        nifti(f"orient_{codes}", body(seed=3), oriented_affine(codes))
    zero = write_with_raw_sform(folder / "zero_affine_0000.nii.gz", body(), np.zeros((4, 4)))
    kinds["zero_affine"] = Kind("zero_affine", zero, "zero_affine", ERROR, ("not invertible",))
    singular = ras.copy()
    singular[:3, 2] = singular[:3, 1]  # the third axis runs along the second: det 0
    sing = write_with_raw_sform(folder / "singular_affine_0000.nii.gz", body(), singular)
    kinds["singular_affine"] = Kind("singular_affine", sing, "singular_affine", ERROR, ("not invertible",))
    # content and names
    nifti("head_only", head(), ras)
    nifti("odd_name", body(seed=4), ras, stem=ODD_NAME)
    dicom_corpus(folder, kinds)
    return kinds


def dicom_corpus(folder: Path, kinds: dict[str, Kind] | None = None) -> dict[str, Kind]:
    """DICOM series as the field writes them, one sub-folder of ``folder`` each (case name = folder name).

    Valid: ``.dcm`` names, no extension, ``InstanceNumber`` from 0, the origin at the image corner
    (``ImagePositionPatient`` 0\\0\\0), JPEG 2000 pixel data, UIDs blanked by an anonymiser (fine for NIfTI; a
    DICOM SEG refuses it). Warning: an SR or a localizer in the series folder (skipped, named). Error: a
    missing slice, two image series in one folder (a file of each named).
    """
    folder = Path(folder)
    kinds = {} if kinds is None else kinds
    vol = body((24, 24, 8)).astype(np.int16)  # (rows, cols, slices)
    geometry = ((24, 24, 8), dicom_affine(24, 24, (1.5, 1.5), 2.5, (-20.0, -30.0, -300.0)))

    def series(name, expect=VALID, words=(), shape_affine=geometry, **kw):
        path = folder / name
        write_dicom_series(path, kw.pop("volume", vol), **kw)
        shape, affine = shape_affine if expect != ERROR else (None, None)
        kinds[name] = Kind(name, path, name, expect, tuple(words), shape, affine)
        return path

    series("dicom_good", suffix=".dcm")
    series("dicom_no_extension", prefix="IM")
    series("dicom_instance_0", first_instance=0)
    series("dicom_origin_corner", origin=(0.0, 0.0, 0.0),
           shape_affine=((24, 24, 8), dicom_affine(24, 24, (1.5, 1.5), 2.5, (0.0, 0.0, 0.0))))  # fmt: skip
    big = body((64, 64, 6), seed=5)  # JPEG 2000 needs at least 32 x 32 pixels
    series("dicom_jpeg2000", volume=big, jpeg2000=True,
           shape_affine=((64, 64, 6), dicom_affine(64, 64, (1.5, 1.5), 2.5, (-20.0, -30.0, -300.0))))  # fmt: skip
    series("dicom_blank_uids", blank_uids=True)
    sr = series("dicom_with_sr", WARNING, ("skipped", "structured report", "RDSR"))
    write_structured_report(sr / "RDSR", series_uids(sr))
    scout = series("dicom_with_localizer", WARNING, ("skipped", "localizer", "SCOUT"))
    write_localizer(scout / "SCOUT", series_uids(scout))
    gap = series("dicom_missing_slice", ERROR, ("missing slice",))
    sorted(gap.iterdir(), key=lambda p: _position(p))[3].unlink()
    mixed = series("dicom_mixed_series", ERROR, ("holds 2 series", "b_slice000", "slice000"), volume=vol[:, :, :4])
    write_dicom_series(mixed, vol[:, :, :4], origin=(-20.0, -30.0, -200.0), prefix="b_")
    return kinds


def _position(path: Path) -> float:
    import pydicom

    return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])


# --- label maps for evaluate and the data tools ----------------------------------------------------
def organ_label(shape=SHAPE, shift: int = 0) -> np.ndarray:
    """A uint8 label map with liver (1), spleen (3), aorta (5) and a tumor (14); ``shift`` moves the liver."""
    lab = np.zeros(shape, np.uint8)
    nx, ny, nz = shape
    lab[2 + shift : nx // 2 + shift, 3 : ny - 3, : max(1, nz - 1)] = 1
    lab[nx // 2 + 3 : nx - 2, 4 : ny // 2, :] = 3
    lab[nx // 2 - 1 : nx // 2 + 1, ny - 3 : ny - 1, :] = 5
    lab[4:7, 6:9, : max(1, nz // 2)] = 14
    return lab


#: Geometries of the valid label-map kinds: name -> (shape, affine).
LABEL_GEOMETRIES = {
    "ras": (SHAPE, ras_affine()),
    "lps": (SHAPE, oriented_affine("LPS")),
    "zflip": (SHAPE, oriented_affine("RAI")),
    "oblique": (SHAPE, oblique_affine()),
    "single_slice": ((24, 24, 1), ras_affine()),
    "slices_10mm": ((24, 24, 6), ras_affine((1.5, 1.5, 10.0))),
    "slices_0_3mm": ((24, 24, 40), ras_affine((0.8, 0.8, 0.3))),
    ODD_NAME: (SHAPE, ras_affine()),
}


def label_corpus(root: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    """Valid references and predictions in ``root/ref`` and ``root/pred``: ``(ref_dir, pred_dir, {case: (ref, pred, affine)})``.

    Besides the geometries of :data:`LABEL_GEOMETRIES`: ``not_gzip`` (an uncompressed prediction
    under a .nii.gz name), ``float_labels`` (whole numbers stored as float32) and ``above_14``
    (a prediction with label 20, which is not scored).
    """
    ref_dir, pred_dir = Path(root) / "ref", Path(root) / "pred"
    cases = {}
    for name, (shape, affine) in LABEL_GEOMETRIES.items():
        ref, pred = organ_label(shape), organ_label(shape, shift=1)
        write_nifti(ref_dir / f"{name}.nii.gz", ref, affine)
        write_nifti(pred_dir / f"{name}.nii.gz", pred, affine)
        cases[name] = (ref, pred, affine)
    ras = ras_affine()
    ref, pred = organ_label(), organ_label(shift=2)
    write_nifti(ref_dir / "not_gzip.nii.gz", ref, ras)
    (pred_dir / "not_gzip.nii.gz").write_bytes(nib.Nifti1Image(pred, ras).to_bytes())
    cases["not_gzip"] = (ref, pred, ras)
    write_nifti(ref_dir / "float_labels.nii.gz", ref, ras)
    write_nifti(pred_dir / "float_labels.nii.gz", pred.astype(np.float32), ras)
    cases["float_labels"] = (ref, pred, ras)
    above = pred.copy()
    above[0:2, 0:2, :] = 20
    write_nifti(ref_dir / "above_14.nii.gz", ref, ras)
    write_nifti(pred_dir / "above_14.nii.gz", above, ras)
    cases["above_14"] = (ref, np.where(above == 20, 0, above), ras)
    return ref_dir, pred_dir, cases


def bad_label(kind: str, path: Path) -> tuple[str, ...]:
    """Write a bad label map of ``kind`` at ``path``; returns words that the error message must contain."""
    ras = ras_affine()
    if kind == "truncated":
        truncate(write_nifti(path, organ_label(), ras))
        return ("truncated",)
    if kind == "image_2d":
        write_nifti(path, organ_label()[:, :, 0], ras)
        return ("3D",)
    if kind == "image_4d":
        write_nifti(path, np.stack([organ_label()] * 2, axis=-1), ras)
        return ("3D",)
    if kind == "nan":
        lab = organ_label().astype(np.float32)
        lab[3, 3, 3] = np.nan
        write_nifti(path, lab, ras)
        return ("NaN",)
    if kind == "fractional":
        write_nifti(path, organ_label().astype(np.float32) * 0.5, ras)
        return ("non-integer",)
    if kind == "negative":
        write_nifti(path, organ_label().astype(np.int16) - 1, ras)
        return ("negative",)
    if kind == "zero_affine":
        write_with_raw_sform(path, organ_label(), np.zeros((4, 4)))
        return ("not invertible",)
    raise ValueError(kind)


BAD_LABEL_KINDS = ("truncated", "image_2d", "image_4d", "nan", "fractional", "negative", "zero_affine")


# --- networks with a constant answer --------------------------------------------------------------
def constant_checkpoints(folder: Path, overrides: dict[str, str], constant: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """State dicts of the three networks (``overrides``: part -> bundle overrides, a Python literal string).

    A part named in ``constant`` gets all weights zero but the last layer's bias, which votes for
    that class everywhere (the ROI network: 0 background, 1 abdomen; the fine ones: a label);
    the others keep random weights from ``seed``. Written with ``torch.save`` into ``folder``.
    """
    import ast

    import torch

    from flare23.bundles import SubBundle

    root = Path(__file__).resolve().parents[1] / "bundles"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, bundle in (("roi", "roi_extractor"), ("organ", "organ_seg"), ("tumor", "tumor_seg")):
        torch.manual_seed(seed)
        state = SubBundle(root / bundle, "inference.json", ast.literal_eval(overrides[part])).network().state_dict()
        if part in constant:
            n_out = 2 if part == "roi" else 15
            heads = [k for k, v in state.items() if k.endswith(".bias") and tuple(v.shape) == (n_out,)]
            # the main output layer (DynUNet: output_block; LightUNet: head), not a deep-supervision head
            last = next((k for k in heads if k.startswith(("output_block.", "head."))), heads[-1])
            state = {k: torch.zeros_like(v) for k, v in state.items()}
            bias = torch.full((n_out,), -5.0)
            bias[constant[part]] = 5.0
            state[last] = bias
        paths[part] = folder / f"{part}.pt"
        torch.save(state, paths[part])
    return paths
