"""Stage 1 of the cascade, the ROI extractor (METHOD.md section 3): locate the abdomen, fast.

Pure functions (what the pipeline calls; torch-native where it matters):

* :func:`roi_strides` / :func:`slice_stride` / :func:`slice_axis`: every 4th voxel in-plane and
  every k-th slice, k = max(1, round(5 mm / slice spacing)). The "slice" axis is the array axis
  most aligned with the patient's S-I direction (by the affine), whatever the array order.
* :func:`subsample`: stride subsampling, a view (no copy, no interpolation).
* :func:`normalise_roi`: clip to [-1024, 1024] then z-score with the volume's own mean and std.
* :func:`roi_logits` / :func:`roi_predict`: the whole volume padded to a multiple of 16 when it has
  at most 240 (subsampled) slices, else non-overlapping 80 x 128 x 128 tiles (the last tile of an
  axis is smaller, padded to 16, so no voxel is computed twice). Optional mirrored passes
  (``mirror_axes``) are averaged with the plain one in probability space.
* :func:`roi_box` -> :class:`RoiBox`: the bounding box of all foreground voxels, mapped to full
  resolution, widened by physical margins (feet / head / in-plane, in mm) and clamped.
* :func:`locate`: all of the above on a full-resolution volume in any array order.

Axis decision: the bundle reorients the *subsampled* image to RAS (``Orientationd``; flips and a
permutation, never an interpolation), so the network always sees (x, y, z) with z from feet to
head, the slice axis last (``ROI_PATCH_XYZ``). Subsampling happens before the reorientation, in
the file's own array order, so its cost is a view and the reorientation touches 1/16/k of the
voxels; it starts where the RAS-oriented volume's first voxel is (:func:`ras_phase`), so the network
sees the same voxels, and draws the same box, whether the scan is stored RAS, LPS or as a DICOM series. Results go back to the input's array order (:func:`reorient`), and the box is computed
there with the input's affine: the margins are physical (the affine's S component decides which
end of which axis is "feet"), correct for RAS, LPS, flipped and permuted axes and oblique
direction cosines.

Box mapping (full voxel ``i`` is centred at ``i``, subsampled voxel ``c`` of stride ``s`` covers
the full-resolution interval ``[c s - s/2, c s + s/2]``): foreground subsampled voxels ``a..c``
give full-resolution voxels ``floor(a s - s/2 + 1/2) .. ceil(c s + s/2 - 1/2)``, i.e. every voxel
that the covered interval touches (exact for ``s = 1``). The margin is the axis-aligned extent,
in voxel space, of the physical margin box (``[-inplane, inplane]`` along R-L and A-P,
``[-feet, +head]`` along S) mapped through the inverse of the affine, rounded up.

MONAI transforms: :class:`RoiSubsample` / :class:`RoiSubsampled` (invertible; strides, full shape
and full-resolution affine stored in the meta data), :class:`RoiNormalize` / :class:`RoiNormalized`,
:class:`RoiLabel` / :class:`RoiLabeld` (organs -> 1, tumor and background -> 0),
:class:`RoiInferer`, and the post-processing :class:`RoiBoxd` (box JSON, written atomically),
:class:`RoiRestored` (the subsampled mask back to the input's geometry), :class:`RoiSaveMaskd`; for
evaluation :class:`RoiBoxCoveraged` and the ignite metric :class:`BoxCoverage`.

Modules: :mod:`~flare23.roi.geometry` (strides, subsampling, affines), :mod:`~flare23.roi.predict` (normalisation, whole-volume or tiled prediction), :mod:`~flare23.roi.box` (the crop box, :func:`~flare23.roi.box.locate`), :mod:`~flare23.roi.transforms` (the bundle's MONAI transforms), :mod:`~flare23.roi.coverage` (evaluation). Reorientation is :func:`flare23.data.grids.reorient`, the project's one.
"""
