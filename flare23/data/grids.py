"""Bringing a label map onto a reference grid: exactly when the grids are equivalent, else (on request) nearest neighbour.

Two grids are *equivalent* when they hold the same voxel centres in world coordinates, only indexed
in another axis order and direction (a DICOM series written LAS against a NIfTI of the same scan in
LPS, say): the prediction's affine is the reference's composed with a signed permutation of the
index axes. :func:`equivalent_transform` finds that permutation from
``inv(pred_affine) @ ref_affine`` and accepts it only if the world coordinates of the reference's
eight corner voxel centres agree with those of the prediction voxels they are mapped to within
``atol`` mm (both index maps are affine, so the corners bound the error of every voxel centre).
:func:`to_reference_grid` then transposes and flips the array: no interpolation, every voxel kept.

Any other grid is refused with a :class:`~flare23.errors.Flare23Error` that describes both grids,
unless ``resample="nearest"``: each reference voxel centre then takes the label of the nearest
prediction voxel centre (world coordinates; outside the prediction's voxels: background).
"""

from __future__ import annotations

import numpy as np

from flare23.errors import Flare23Error

GRID_ATOL_MM = 1e-3
RESAMPLE_MODES = (None, "nearest")


def describe_grid(shape, affine) -> str:
    """``shape (a, b, c), spacing (x, y, z) mm, origin (x, y, z) mm, RAS`` for error messages."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=float)
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    codes = "".join(nib.aff2axcodes(affine))
    fmt = lambda v: ", ".join(f"{x:g}" for x in np.round(v, 4))  # noqa: E731
    return f"shape {tuple(int(s) for s in shape)}, spacing ({fmt(spacing)}) mm, origin ({fmt(affine[:3, 3])}) mm, {codes}"


def _corners(shape) -> np.ndarray:
    """The eight corner voxel centres of a grid, homogeneous index coordinates (4 x 8)."""
    ranges = [(0, n - 1) for n in shape]
    pts = np.array(np.meshgrid(*ranges, indexing="ij"), dtype=float).reshape(3, -1)
    return np.vstack([pts, np.ones((1, pts.shape[1]))])


def _signed_permutation(from_affine, to_affine):
    """``(perm, flips)`` of the linear parts (the largest entry of each column), or None if it is not a permutation."""
    m = np.linalg.solve(np.asarray(from_affine, float), np.asarray(to_affine, float))[:3, :3]  # to index -> from index
    perm = tuple(int(i) for i in np.abs(m).argmax(axis=0))
    if sorted(perm) != [0, 1, 2]:
        return None
    return perm, tuple(j for j in range(3) if m[perm[j], j] < 0)


def equivalent_transform(pred_shape, pred_affine, ref_shape, ref_affine, atol: float = GRID_ATOL_MM):
    """``(perm, flips)`` with ``flip(pred.transpose(perm), flips)`` on the reference grid, or None if not equivalent.

    ``perm[j]`` is the prediction axis that becomes reference axis ``j``; ``flips`` are the reference
    axes whose direction is reversed. Accepted only if the world coordinates of the reference's
    corner voxel centres and of the prediction voxels mapped onto them agree to ``atol`` mm.
    """
    found = _signed_permutation(pred_affine, ref_affine)
    if found is None or any(int(pred_shape[found[0][j]]) != int(ref_shape[j]) for j in range(3)):
        return None
    perm, flips = found
    t = np.zeros((4, 4))  # reoriented index -> prediction index, exact integers
    t[3, 3] = 1.0
    for j in range(3):
        if j in flips:
            t[perm[j], j], t[perm[j], 3] = -1.0, ref_shape[j] - 1
        else:
            t[perm[j], j] = 1.0
    corners = _corners(ref_shape)
    error = np.abs(np.asarray(ref_affine, float) @ corners - np.asarray(pred_affine, float) @ t @ corners)[:3].max()
    return (perm, flips) if error <= atol else None


def apply_axes(x, perm, flips):
    """``x`` (numpy array or torch tensor) with its last three axes transposed by ``perm`` and flipped along ``flips``.

    Leading axes (channels, batch) are kept. Exact; a view where numpy / torch allow it.
    """
    lead = x.ndim - 3
    axes = (*range(lead), *(lead + int(p) for p in perm))
    flipped = tuple(lead + int(j) for j in flips)
    if isinstance(x, np.ndarray):
        out = np.transpose(x, axes)
        return np.flip(out, axis=flipped) if flipped else out
    out = x.permute(*axes)
    return out.flip(flipped) if flipped else out


def reorient(x, affine_from, affine_to, atol: float = GRID_ATOL_MM):
    """``x`` (last three axes on the grid of ``affine_from``) on the grid of ``affine_to``, which must hold the same voxel
    centres in another axis order and direction (what ``Orientationd`` does); anything else is a :class:`Flare23Error`.

    The one reorientation of the project: the cascade's crop to RAS and back, the ROI extractor's
    subsampled volume, and (through :func:`to_reference_grid`) the evaluation of a prediction on
    another axis order. numpy arrays and torch tensors; a view where possible.
    """
    shape = tuple(int(n) for n in x.shape[-3:])
    found = _signed_permutation(affine_from, affine_to)
    to_shape = tuple(shape[p] for p in found[0]) if found else shape
    found = equivalent_transform(shape, affine_from, to_shape, affine_to, atol) if found else None
    if found is None:
        raise Flare23Error("the two grids do not differ by flips and a permutation only; cannot reorient")
    return apply_axes(x, *found)


def resample_nearest(data: np.ndarray, affine, ref_shape, ref_affine, fill: int = 0) -> np.ndarray:
    """Nearest-neighbour resampling of a label map onto the reference grid, one reference slice at a time.

    Each reference voxel centre is mapped to the prediction's index space; the label of the voxel
    containing it (``floor(x + 0.5)``) is taken, ``fill`` where it lies outside the prediction.
    """
    m = np.linalg.solve(np.asarray(affine, float), np.asarray(ref_affine, float))  # ref index -> data index
    out = np.full(tuple(int(s) for s in ref_shape), fill, dtype=data.dtype)
    i, j = np.meshgrid(np.arange(ref_shape[0]), np.arange(ref_shape[1]), indexing="ij")
    plane = m[:3, 0, None, None] * i + m[:3, 1, None, None] * j + m[:3, 3, None, None]
    for k in range(int(ref_shape[2])):
        idx = np.floor(plane + m[:3, 2, None, None] * k + 0.5).astype(np.int64)
        inside = np.all((idx >= 0) & (idx < np.asarray(data.shape)[:, None, None]), axis=0)
        out[:, :, k][inside] = data[idx[0][inside], idx[1][inside], idx[2][inside]]
    return out


def to_reference_grid(
    data: np.ndarray, affine, ref_shape, ref_affine, case: str, path=None, resample: str | None = None
) -> tuple[np.ndarray, str]:
    """``(array on the reference grid, how)``: how is ``"same"``, ``"reoriented"`` or ``"resampled"``.

    A non-equivalent grid is a :class:`Flare23Error` naming ``case`` and both grids unless
    ``resample="nearest"``.
    """
    if resample not in RESAMPLE_MODES:
        raise Flare23Error(f"resample {resample!r} is not one of: nearest (or leave it out to refuse other grids)")
    found = equivalent_transform(data.shape, affine, ref_shape, ref_affine)
    if found is not None:
        perm, flips = found
        if perm == (0, 1, 2) and not flips:
            return data, "same"
        return np.ascontiguousarray(apply_axes(data, perm, flips)), "reoriented"
    if resample == "nearest":
        return resample_nearest(data, affine, ref_shape, ref_affine), "resampled"
    where = f" ({path})" if path is not None else ""
    raise Flare23Error(
        f"case {case}: prediction{where} grid [{describe_grid(data.shape, affine)}] is not the reference grid "
        f"[{describe_grid(ref_shape, ref_affine)}] nor a reordering of its axes; "
        "use --resample nearest to resample it"
    )
