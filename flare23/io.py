"""Reading and writing NIfTI volumes and result files, with validation and atomic writes.

* :func:`load_nifti` reads a whole volume (so a truncated file fails here, not later) and checks
  that it is 3D with a finite, invertible affine; every problem is a one-line
  :class:`~flare23.errors.Flare23Error` that names the file. A ``.nii.gz`` that is not
  gzip-compressed (or a gzip-compressed ``.nii``) is read by its content, with a warning.
* :func:`save_nifti`, :func:`atomic_write_text` and :func:`atomic_write_json` write to a temporary
  file in the destination folder and rename it into place, so a reader never sees a partial file
  and an interrupted run leaves nothing behind. The file gets the mode that ``open()`` would give
  it (``0666`` less the process's umask, e.g. ``0644``), not ``mkstemp``'s private ``0600``.
  Inputs are only ever opened for reading.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np

from flare23.constants import FINGERPRINT_DEFAULTS, IMAGE_SUFFIX
from flare23.errors import Flare23Error

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(path: str | os.PathLike, image: bool = True) -> str:
    """Case id of a file: image ``case_0001_0000.nii.gz`` -> ``case_0001``; label ``case_0001.nii.gz`` -> ``case_0001``.

    ``image=False`` for label and prediction files, whose names carry no channel suffix (a label
    may well be called ``phantom_0000.nii.gz``).
    """
    stem = strip_nifti_suffix(Path(path).name)
    if image and stem.endswith(IMAGE_SUFFIX):
        stem = stem[: -len(IMAGE_SUFFIX)]
    return stem


def list_nifti(folder: str | os.PathLike) -> list[Path]:
    """Sorted NIfTI files directly inside ``folder`` (hidden and temporary files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise Flare23Error(f"{folder}: not a folder")
    return sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p.name) and not p.name.startswith("."))


def index_cases(folder: str | os.PathLike, images: bool = False, what: str = "", allow_empty: bool = False) -> dict[str, Path]:
    """``{case: path}`` of the NIfTI files directly inside ``folder`` (:func:`list_nifti`).

    ``images=True``: every file must be an image ``<case>_0000`` and the case drops that suffix
    (:func:`case_name`); else the case is the whole name without ``.nii.gz`` / ``.nii`` (labels,
    predictions). Two files of one case (``a.nii`` and ``a.nii.gz``) are an error naming both; so
    is an empty folder unless ``allow_empty``. ``what`` (e.g. ``"reference"``) names the files in the errors.
    """
    kind = f"{what} " if what else ""
    found: dict[str, Path] = {}
    for path in list_nifti(folder):
        stem = strip_nifti_suffix(path.name)
        if images and not stem.endswith(IMAGE_SUFFIX):
            raise Flare23Error(f"case {stem}: image {path} is not named <case>{IMAGE_SUFFIX}.nii.gz")
        case = case_name(path, image=images)
        if case in found:
            raise Flare23Error(f"case {case}: two {kind}files in {folder} ({found[case].name}, {path.name})")
        found[case] = path
    if not found and not allow_empty:
        raise Flare23Error(f"{folder}: no NIfTI {kind}files")
    return found


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel size in mm along each array axis (column norms of the affine's 3 x 3 part)."""
    return np.sqrt((np.asarray(affine, dtype=float)[:3, :3] ** 2).sum(axis=0))


def check_affine(affine: np.ndarray, where: str) -> None:
    a = np.asarray(affine, dtype=float)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise Flare23Error(f"{where}: the affine is not a finite 4 x 4 matrix")
    if abs(np.linalg.det(a[:3, :3])) < 1e-9 or np.any(voxel_spacing(a) < 1e-6):
        raise Flare23Error(f"{where}: the affine is zero or not invertible (voxel size {voxel_spacing(a).round(4).tolist()})")


_GZIP_MAGIC = b"\x1f\x8b"


def _nifti_header_size(head: bytes) -> int | None:
    """``sizeof_hdr`` of an uncompressed NIfTI-1 (348) or NIfTI-2 (540) header, in either byte order, else None."""
    if len(head) < 4:
        return None
    for order in "<>":
        size = int(np.frombuffer(head[:4], dtype=f"{order}i4")[0])
        if size in (348, 540):
            return size
    return None


def _load_misnamed(path: Path):
    """Read a ``.nii.gz`` that is not gzip-compressed, or a ``.nii`` that is, with a warning; else None.

    nibabel picks the decompressor from the file name, so such files fail with "not a gzip file"
    although their content is a valid NIfTI image (some converters write them, and ITK, which
    sniffs the content, reads them). The content decides here; the data are read into memory.
    """
    import warnings

    with open(path, "rb") as fh:
        head = fh.read(4)
    gz_name = path.name.lower().endswith(".gz")
    if gz_name and head[:2] != _GZIP_MAGIC and _nifti_header_size(head):
        raw, what = path.read_bytes(), "not gzip-compressed despite its .gz name"
    elif not gz_name and head[:2] == _GZIP_MAGIC:
        try:
            raw = gzip.decompress(path.read_bytes())
        except (EOFError, OSError, zlib.error) as exc:
            raise Flare23Error(f"{path}: truncated or corrupt gzip data ({type(exc).__name__}: {exc})") from None
        what = "gzip-compressed despite its name without .gz"
    else:
        return None
    size = _nifti_header_size(raw[:4])
    if size is None:
        return None
    warnings.warn(f"{path}: {what}; read by its content", UserWarning, stacklevel=3)
    return (nib.Nifti1Image if size == 348 else nib.Nifti2Image).from_bytes(raw)


def load_image(path: str | os.PathLike) -> nib.Nifti1Image:
    """Open a NIfTI file lazily, turning every reader failure into a one-line error."""
    path = Path(path)
    if not path.exists():
        raise Flare23Error(f"{path}: no such file")
    if path.is_dir():
        raise Flare23Error(f"{path}: is a folder, expected a NIfTI file")
    try:
        img = _load_misnamed(path) or nib.load(str(path))
    except Flare23Error:
        raise
    except Exception as exc:  # nibabel raises many types for foreign or broken files
        raise Flare23Error(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise Flare23Error(f"{path}: not a NIfTI image ({type(img).__name__})")
    return img


def load_nifti(path: str | os.PathLike, *, dtype=None, allow_nonfinite: bool = True):
    """Read a whole 3D NIfTI volume: returns ``(array, affine, header)``.

    Trailing singleton axes (a 4D file with one volume) are dropped; anything else that is not 3D
    is an error. The array keeps the file's on-disk type unless ``dtype`` is given (scaling slope
    and intercept are applied when the header has them).
    """
    path = Path(path)
    img = load_image(path)
    try:
        if dtype is None:
            has_scaling = img.dataobj.slope != 1 or img.dataobj.inter != 0
            data = img.get_fdata(dtype=np.float32) if has_scaling else np.asanyarray(img.dataobj)
        else:
            data = np.asanyarray(img.dataobj).astype(dtype, copy=False)
    except (EOFError, OSError, zlib.error, gzip.BadGzipFile, ValueError) as exc:
        raise Flare23Error(f"{path}: truncated or corrupt image data ({type(exc).__name__}: {exc})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise Flare23Error(f"{path}: expected a 3D image, got shape {tuple(int(s) for s in data.shape)}")
    if min(data.shape) < 1:
        raise Flare23Error(f"{path}: empty image of shape {tuple(data.shape)}")
    affine = img.affine
    check_affine(affine, str(path))
    if not allow_nonfinite and np.issubdtype(data.dtype, np.floating) and not np.all(np.isfinite(data)):
        raise Flare23Error(f"{path}: contains NaN or infinite voxels")
    return np.asarray(data), np.asarray(affine, dtype=float), img.header


def same_geometry(shape_a, affine_a, shape_b, affine_b, atol: float = 1e-3) -> bool:
    return tuple(shape_a) == tuple(shape_b) and np.allclose(affine_a, affine_b, atol=atol)


def check_pair(image_path, image_shape, image_affine, label_path, label_shape, label_affine) -> None:
    """Raise a one-line error when an image and its label do not share a grid."""
    if tuple(image_shape) != tuple(label_shape):
        raise Flare23Error(
            f"{label_path}: label shape {tuple(label_shape)} differs from image shape {tuple(image_shape)} of {Path(image_path).name}"
        )
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise Flare23Error(f"{label_path}: label affine differs from the affine of {Path(image_path).name}")


def ensure_output_dir(folder: str | os.PathLike) -> Path:
    """Create ``folder`` if needed and check that files can be written in it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise Flare23Error(f"{folder}: output folder is not writable ({exc.strerror or exc})") from None
    return folder


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only there)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds.

    The file gets ``0666`` less the umask; an ``OSError`` of the block is a one-line error naming ``path``.
    """
    path = Path(path)
    suffix = ".nii.gz" if str(path).endswith(".nii.gz") else path.suffix
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise Flare23Error(f"{path}: cannot write here ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(exc, OSError):  # a full disk, a vanished folder: one line naming the file
            raise Flare23Error(f"{path}: cannot write ({exc.strerror or exc})") from None
        raise


def save_nifti(data: np.ndarray, affine: np.ndarray, path: str | os.PathLike, header=None, dtype=None) -> Path:
    """Write ``data`` as NIfTI atomically; ``header`` (optional) supplies units and codes."""
    path = Path(path)
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=float), header=header.copy() if header is not None else None)
    img.set_data_dtype(data.dtype)
    if header is not None:
        img.header.set_slope_inter(1.0, 0.0)
        sform_code = int(header["sform_code"]) or 1
        qform_code = int(header["qform_code"]) or 1
    else:
        sform_code = qform_code = 1
    img.set_sform(np.asarray(affine, dtype=float), code=sform_code)
    img.set_qform(np.asarray(affine, dtype=float), code=qform_code)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_fingerprint(path: str | os.PathLike | None = None, model: str = "organ") -> dict[str, float]:
    """Normalisation parameters ``clip_low``, ``clip_high``, ``mean``, ``std`` for ``model``.

    ``path`` is a JSON file written by ``flare23 fingerprint``: either a flat dict with those keys
    or a dict keyed by model name (``{"organ": {...}, "tumor": {...}}``). ``None`` or an empty
    string gives the defaults of METHOD.md.
    """
    if not path:
        return dict(FINGERPRINT_DEFAULTS[model])
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise Flare23Error(f"{path}: cannot read fingerprint JSON ({exc})") from None
    if model in data and isinstance(data[model], dict):
        data = data[model]
    missing = [k for k in ("clip_low", "clip_high", "mean", "std") if k not in data]
    if missing:
        raise Flare23Error(f"{path}: fingerprint lacks {', '.join(missing)}")
    return {k: float(data[k]) for k in ("clip_low", "clip_high", "mean", "std")}
