"""MONAI transforms of the ROI extractor bundle: subsampling (invertible), normalisation, ROI labels, the box JSON and the mask back on the input's grid."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, SaveImaged, Transform
from monai.utils import TraceKeys

from flare23.constants import (
    ROI_CLIP,
    ROI_INPLANE_STRIDE,
    ROI_SLICE_TARGET_MM,
)
from flare23.data.grids import reorient
from flare23.errors import Flare23Error
from flare23.io import atomic_write_json, case_name, ensure_output_dir, save_nifti
from flare23.roi.box import _as_ints, _where, empty_box_json, physical_margin_voxels, roi_box, upsample_mask
from flare23.roi.geometry import (
    META_FULL_AFFINE,
    META_FULL_SHAPE,
    META_OFFSETS,
    META_STRIDES,
    _affine,
    _tensor,
    ras_phase,
    roi_labels,
    roi_strides,
    subsample,
    subsampled_affine,
    subsampled_shape,
)
from flare23.roi.predict import normalise_roi


class RoiSubsample(InvertibleTransform):
    """Stride subsampling of a channel-first MetaTensor (see :func:`roi_strides`); a view, no interpolation.

    The strides come from the image's affine unless ``strides`` is given. The output's affine is
    updated (voxel ``j`` is full voxel ``j * s``), and the meta data gain ``roi_strides``,
    ``roi_full_shape`` and ``roi_full_affine``; the transform is recorded so that ``Invertd``
    (or :meth:`inverse`) maps results back by nearest-neighbour upsampling (:func:`upsample_mask`).
    """

    def __init__(
        self, inplane: int = ROI_INPLANE_STRIDE, target_mm: float = ROI_SLICE_TARGET_MM, strides: Sequence[int] | None = None
    ):
        self.inplane, self.target_mm = int(inplane), float(target_mm)
        self.strides = None if strides is None else tuple(int(s) for s in strides)

    def __call__(self, img: torch.Tensor, strides: Sequence[int] | None = None, offsets: Sequence[int] | None = None) -> torch.Tensor:
        if img.ndim != 4:
            raise Flare23Error(f"{_where(img)}: expected a channel-first 3D image, got shape {tuple(img.shape)}")
        if not isinstance(img, MetaTensor):
            img = MetaTensor(img)
        full_affine = _affine(img.affine)
        strides = tuple(int(s) for s in (strides or self.strides or roi_strides(full_affine, self.inplane, self.target_mm)))
        full_shape = tuple(int(s) for s in img.shape[1:])
        offsets = tuple(int(o) for o in offsets) if offsets is not None else ras_phase(full_affine, full_shape, strides)
        meta_info = self.track_transform_meta(
            img,
            sp_size=subsampled_shape(full_shape, strides, offsets),
            affine=subsampled_affine(np.eye(4), strides, offsets),
            extra_info={"strides": list(strides), "offsets": list(offsets)},
            orig_size=full_shape,
            transform_info=self.get_transform_info(),
        )
        out = subsample(img, strides, offsets)
        out = out.copy_meta_from(meta_info) if isinstance(out, MetaTensor) else out
        out.meta[META_STRIDES] = torch.tensor(strides)
        out.meta[META_OFFSETS] = torch.tensor(offsets)
        out.meta[META_FULL_SHAPE] = torch.tensor(full_shape)
        out.meta[META_FULL_AFFINE] = torch.as_tensor(full_affine, dtype=torch.float64)
        return out

    def inverse(self, data: torch.Tensor) -> torch.Tensor:
        transform = self.pop_transform(data)
        strides = _as_ints(transform[TraceKeys.EXTRA_INFO]["strides"])
        offsets = _as_ints(transform[TraceKeys.EXTRA_INFO].get("offsets", [0, 0, 0]))
        full_shape = _as_ints(transform[TraceKeys.ORIG_SIZE])
        out = upsample_mask(data, strides, full_shape, offsets)
        if isinstance(data, MetaTensor):
            out = MetaTensor(
                out.as_tensor() if isinstance(out, MetaTensor) else out,
                meta=dict(data.meta),
                applied_operations=data.applied_operations,
            )
            out.affine = torch.as_tensor(
                _affine(data.affine) @ np.linalg.inv(subsampled_affine(np.eye(4), strides, offsets)), dtype=torch.float64
            )
        return out


class RoiSubsampled(MapTransform, InvertibleTransform):
    """Dictionary version of :class:`RoiSubsample`; every key uses the strides of ``ref_key`` (default: the first key)."""

    def __init__(self, keys: KeysCollection, ref_key: str | None = None, inplane: int = ROI_INPLANE_STRIDE,
                 target_mm: float = ROI_SLICE_TARGET_MM, allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key
        self.subsampler = RoiSubsample(inplane, target_mm)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        ref = self.ref_key if self.ref_key is not None else self.first_key(d)
        if ref not in d:
            raise Flare23Error(f"RoiSubsampled: reference key {ref!r} missing from the data")
        ref_img = d[ref]
        ref_affine = ref_img.affine if isinstance(ref_img, MetaTensor) else np.eye(4)
        strides = roi_strides(ref_affine, self.subsampler.inplane, self.subsampler.target_mm)
        offsets = ras_phase(ref_affine, ref_img.shape[1:], strides)
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(ref_img.shape[1:]):
                raise Flare23Error(
                    f"{_where(d[key])}: shape {tuple(d[key].shape[1:])} differs from {tuple(ref_img.shape[1:])} of {_where(ref_img)}"
                )
            d[key] = self.subsampler(d[key], strides, offsets)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.subsampler.inverse(d[key])
        return d


class RoiNormalize(Transform):
    """:func:`normalise_roi` as a transform (keeps the MetaTensor's meta data)."""

    def __init__(self, clip: Sequence[float] = ROI_CLIP) -> None:
        self.clip = tuple(float(c) for c in clip)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        out = normalise_roi(img, self.clip)
        if isinstance(img, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=img.meta, applied_operations=img.applied_operations)
        return out


class RoiNormalized(MapTransform):
    def __init__(self, keys: KeysCollection, clip: Sequence[float] = ROI_CLIP, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = RoiNormalize(clip)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


class RoiLabel(Transform):
    """:func:`roi_labels` as a transform: full FLARE labels -> ROI labels (organs 1, else 0), uint8."""

    def __call__(self, label: torch.Tensor) -> torch.Tensor:
        out = roi_labels(label, _where(label))
        if isinstance(label, MetaTensor) and not isinstance(out, MetaTensor):
            out = MetaTensor(out, meta=label.meta, applied_operations=label.applied_operations)
        return out


class RoiLabeld(MapTransform):
    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = RoiLabel()

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.converter(d[key])
        return d


# --- post-processing: back to the input's geometry ------------------------------------------------
class FileWriterd(SaveImaged):
    """Base of the project's postprocessing transforms that write files (results and side files such as ROI boxes).

    A subclass of MONAI's ``SaveImaged`` in type only (it neither takes its arguments nor uses its
    writer): applications that run a bundle's postprocessing but write the answer themselves drop
    ``SaveImaged`` instances from it, and so drop these writers too. MONAI Label 0.8.5 does this
    (``BundleInferTask(post_filter=[SaveImaged])``): without it every request would leave the files
    meant for a command-line run (``output/<case>.nii.gz``, ``eval/<case>_roi.nii.gz``, box JSON) in
    the app's folders. ``python -m monai.bundle run`` runs them as any other transform.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)

    def set_options(self, *args, **kwargs):  # SaveImaged's; these writers take their options in __init__
        raise NotImplementedError(f"{type(self).__name__} takes its options in __init__")

    def __call__(self, data):
        raise NotImplementedError


def _roi_meta(d: Mapping, key: Hashable, ref_key: Hashable | None) -> tuple[dict, np.ndarray]:
    """The meta data written by RoiSubsample (from ``ref_key`` if present, else from ``key``) and the current affine."""
    for k in (ref_key, key):
        if k is not None and k in d and isinstance(d[k], MetaTensor) and META_STRIDES in d[k].meta:
            return d[k].meta, _affine(d[k].affine)
    raise Flare23Error(f"{_where(d.get(key))}: no ROI subsampling meta data (was RoiSubsampled in the preprocessing?)")


def to_input_grid(mask: torch.Tensor, meta: Mapping, current_affine) -> tuple[torch.Tensor, tuple, tuple, np.ndarray, tuple]:
    """A subsampled mask ``(C, ...)`` in any flipped / permuted order -> the input's array order (still subsampled).

    Returns the mask, the strides, the full shape, the full-resolution input affine and the offsets.
    """
    strides, full_shape = _as_ints(meta[META_STRIDES]), _as_ints(meta[META_FULL_SHAPE])
    offsets = _as_ints(meta[META_OFFSETS]) if META_OFFSETS in meta else (0, 0, 0)
    full_affine = _affine(meta[META_FULL_AFFINE])
    t = mask.as_tensor() if isinstance(mask, MetaTensor) else _tensor(mask)
    t = reorient(t, current_affine, subsampled_affine(full_affine, strides, offsets))
    return t, strides, full_shape, full_affine, offsets


class RoiBoxd(MapTransform):
    """Compute the :class:`RoiBox` of the subsampled mask ``keys`` (after arg-max), in the input's voxel indices.

    The box (``RoiBox.to_json`` with the input's affine, or ``{"empty": true, ...}`` with a
    warning) is stored in ``data[box_key]`` and, when ``output_dir`` is set, written atomically to
    ``<output_dir>/<case>_<postfix>.json``. An inference config leaves ``output_dir`` unset and lets
    :class:`RoiSaveMaskd` (``box_key``) write the box: a :class:`FileWriterd` that serving
    applications drop.
    """

    def __init__(self, keys: KeysCollection, ref_key: str | None = "image", margins_mm: Mapping[str, float] | None = None,
                 output_dir: str | None = None, postfix: str = "roi_box", box_key: str = "roi_box",
                 allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.ref_key, self.margins_mm, self.postfix, self.box_key = ref_key, dict(margins_mm or {}), postfix, box_key
        physical_margin_voxels(np.eye(4), self.margins_mm)  # validate now, not at the first case
        self.output_dir = str(output_dir) if output_dir else None

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            meta, current = _roi_meta(d, key, self.ref_key)
            mask, strides, full_shape, full_affine, offsets = to_input_grid(d[key], meta, current)
            box = roi_box(mask, strides, full_shape, full_affine, self.margins_mm, offsets)
            name = _where(d[self.ref_key] if self.ref_key in d else d[key])
            if box is None:
                warnings.warn(f"{name}: the ROI extractor found no abdomen (empty box)", stacklevel=2)
                info = empty_box_json(full_shape, full_affine)
            else:
                info = box.to_json(full_affine)
            info["source"] = name
            d[self.box_key] = info
            if self.output_dir:
                ensure_output_dir(self.output_dir)
                atomic_write_json(Path(self.output_dir) / f"{case_name(name)}_{self.postfix}.json", info)
        return d


class RoiRestored(MapTransform):
    """The subsampled mask -> full resolution in the input's array order and affine (uint8 MetaTensor ``(1, ...)``).

    Reorients back to the input's order (flips / permutation), then :func:`upsample_mask` by the
    strides, cropped to the input's shape. Meta data come from ``ref_key`` (the image) when present.
    """

    def __init__(self, keys: KeysCollection, ref_key: str | None = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.ref_key = ref_key

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            meta, current = _roi_meta(d, key, self.ref_key)
            mask, strides, full_shape, full_affine, offsets = to_input_grid(d[key], meta, current)
            full = upsample_mask(mask.to(torch.uint8), strides, full_shape, offsets)
            out_meta = {k: v for k, v in meta.items() if k not in (META_STRIDES, META_FULL_SHAPE, META_FULL_AFFINE, META_OFFSETS)}
            out = MetaTensor(full, meta=out_meta)
            out.affine = torch.as_tensor(full_affine, dtype=torch.float64)
            d[key] = out
        return d


class RoiSaveMaskd(FileWriterd):
    """Write ``keys`` (a ``(1, X, Y, Z)`` mask in the input's geometry) as uint8 NIfTI, atomically; and the box.

    File: ``<output_dir>/<case>_<postfix>.nii.gz``; affine from the tensor's meta data, header
    (units, codes) from the source NIfTI file when it can be read. With ``box_key``, the box that
    :class:`RoiBoxd` stored in ``data[box_key]`` is written too, atomically, as
    ``<output_dir>/<case>_<box_postfix>.json`` (the name that ``RoiBoxd(output_dir=...)`` gives it).
    A :class:`FileWriterd`: MONAI Label drops it and a request leaves no file behind.
    """

    def __init__(self, keys: KeysCollection, output_dir: str, postfix: str = "roi", box_key: str | None = None,
                 box_postfix: str = "roi_box", allow_missing_keys: bool = False) -> None:  # fmt: skip
        super().__init__(keys, allow_missing_keys)
        self.output_dir, self.postfix = str(output_dir), postfix
        self.box_key, self.box_postfix = box_key, box_postfix

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            t = d[key]
            name = _where(t)
            arr = np.asarray((t.as_tensor() if isinstance(t, MetaTensor) else torch.as_tensor(t)).detach().cpu())
            if arr.ndim == 4 and arr.shape[0] == 1:
                arr = arr[0]
            header = None
            with contextlib.suppress(Exception):
                header = nib.load(name).header if str(name).endswith((".nii", ".nii.gz")) else None
            folder = ensure_output_dir(self.output_dir)
            save_nifti(
                arr.astype(np.uint8), _affine(t.affine), folder / f"{case_name(name)}_{self.postfix}.nii.gz", header=header
            )
        box = d.get(self.box_key) if self.box_key else None
        if isinstance(box, Mapping):
            folder = ensure_output_dir(self.output_dir)
            source = box.get("source") or next((_where(d[k]) for k in self.key_iterator(d)), "case")
            atomic_write_json(folder / f"{case_name(source)}_{self.box_postfix}.json", dict(box))
        return d
