"""ROI labels for the ROI extractor (``flare23 roi-labels``) and each fine model's crops with its case selection (``flare23 crop --model organ|tumor``, METHOD.md section 2)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from flare23.constants import CONTEXT_MARGINS_MM, IMAGE_SUFFIX
from flare23.data.boxes import spacing_margin_voxels
from flare23.data.datalists import _relative, split_cases
from flare23.data.labels import bbox_with_margin, bbox_with_physical_margins, tumor_inside_organs
from flare23.data.prepare import (
    _check_headers,
    _check_output_dir,
    _echo,
    _header_geometry,
    _load_label,
    _load_pair,
    _pair_folders,
    _prefixed,
    _run_cases,
    _save_all,
)
from flare23.errors import Flare23Error
from flare23.io import (
    atomic_write_json,
    index_cases,
    voxel_spacing,
)


# --- roi-labels ----------------------------------------------------------------------------------
def _roi_case(case: str, label_path: Path, out_path: Path) -> int:
    from flare23.roi.geometry import roi_labels  # lazy: flare23.roi imports torch

    label, affine, header = _load_label(label_path)
    roi = roi_labels(label, str(label_path)).numpy()
    _save_all([(roi, affine, header, out_path, np.uint8)])
    return int(np.count_nonzero(roi))


def roi_labels_cli(labels: str, out: str, workers: int = 1) -> None:
    """ROI labels for the ROI extractor: organs -> 1, tumor and background -> 0.

    Args:
        labels: folder of full labels ``<case>.nii.gz``.
        out: output folder for ``<case>.nii.gz`` (uint8; must differ from ``labels``).
        workers: parallel processes.
    """
    files = index_cases(labels)
    for case, path in files.items():
        try:
            _header_geometry(path)
        except Flare23Error as exc:
            raise _prefixed(case, exc) from None
    out_dir = _check_output_dir(out, [labels])
    jobs = [(case, path, out_dir / f"{case}.nii.gz") for case, path in sorted(files.items())]
    results = _run_cases(_roi_case, jobs, workers, "roi-labels")
    print(f"wrote {len(results)} ROI labels to {out_dir} ({sum(results)} organ voxels in all)")


# --- crop ----------------------------------------------------------------------------------------
def _crop_case(case: str, image_path: Path, label_path: Path, image_out: Path, label_out: Path, margin_mm, require: bool) -> dict:
    image, affine, header, label, label_header = _load_pair(image_path, label_path)
    if isinstance(margin_mm, Mapping):  # physical directions (feet / head / in-plane), as the ROI box
        box = bbox_with_physical_margins(label > 0, affine, margin_mm)
    else:
        box = bbox_with_margin(label > 0, voxel_spacing(affine), margin_mm)
    if box is None:
        return {"kept": False, "reason": "no labelled voxel"}
    if require and not tumor_inside_organs(label):
        return {"kept": False, "reason": "tumor bounding box not inside the organ bounding box"}
    start = np.array([s.start for s in box], dtype=float)
    cropped_affine = affine.copy()
    cropped_affine[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]  # world position of the crop's first voxel
    _save_all(
        [
            (image[box], cropped_affine, header, image_out, None),
            (label[box], cropped_affine, label_header, label_out, np.uint8),
        ]
    )
    return {"kept": True, "box": [[s.start, s.stop] for s in box], "shape": list(image[box].shape)}


#: ``flare23 crop --model``: whether the paper's case selection (:func:`tumor_inside_organs`) is applied.
CROP_SELECTION = {"organ": False, "tumor": True}


def _crop_model(model, require_tumor_in_organs=None) -> bool:
    """The selection of ``--model`` (``organ`` or ``tumor``); a missing or other value, or a
    ``--require_tumor_in_organs`` (the former switch) that contradicts it, is a one-line error."""
    require = require_tumor_in_organs
    if require is not None and not isinstance(require, bool):
        flag = str(require).strip().lower()
        if flag not in ("true", "false"):
            raise Flare23Error(f"crop: --require_tumor_in_organs {require!r}: expected true or false (better: leave it out)")
        require = flag == "true"
    if model is None:
        hint = (
            f"; --require_tumor_in_organs {str(require).lower()} is --model {'tumor' if require else 'organ'}"
            if require is not None
            else ""
        )
        raise Flare23Error(
            "crop: --model is required: organ (every labelled case, for organ_seg) or tumor (only cases whose tumor bounding "
            f"box lies inside the organ bounding box, for tumor_seg; METHOD.md section 2){hint}"
        )
    if not isinstance(model, str) or model not in CROP_SELECTION:
        raise Flare23Error(f"crop: --model {model!r}: expected one of {', '.join(CROP_SELECTION)}")
    if require is not None and require != CROP_SELECTION[model]:
        raise Flare23Error(
            f"crop: --require_tumor_in_organs {str(require).lower()} contradicts --model {model} (the selection is "
            f"{'on' if CROP_SELECTION[model] else 'off'} for it); give --model alone"
        )
    return CROP_SELECTION[model]


def crop_cli(
    images: str,
    labels: str,
    out: str,
    model: str | None = None,
    margin_mm: float | None = None,
    validation_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 1,
    require_tumor_in_organs: bool | None = None,
) -> None:
    """Crop images and labels to the bounding box of the labels (> 0) plus a margin, for one fine model.

    Args:
        images: folder of ``<case>_0000.nii.gz``.
        labels: folder of ``<case>.nii.gz`` (the same grid as the images).
        out: a new or empty output folder (a non-empty one is refused, so that the cases of an
            earlier crop, e.g. the other model's, never mix in); writes ``out/imagesTr/<case>_0000.nii.gz``
            and ``out/labelsTr/<case>.nii.gz`` with the affine shifted so that every voxel keeps its
            world position, and ``out/datalist.json`` (MONAI datalist of the cropped cases, paths
            relative to ``out``, which the bundles' ``--dataset_dir out`` reads).
        model: required, ``organ`` or ``tumor``, the fine model the crops are for (METHOD.md
            section 2). With ``organ`` every case with a labelled voxel is kept; with ``tumor`` the
            paper's selection applies as well and keeps only cases whose tumor bounding box lies
            inside the organ bounding box (cases without tumor are kept). Crop once per model, into
            separate folders (``data/flare23_organ``, ``data/flare23_tumor``).
        margin_mm: margin around the box in mm on every side, converted per axis with the voxel
            spacing (rounded up). Default: the largest training context of the fine models
            (``flare23.constants.CONTEXT_MARGINS_MM``: 120 mm towards the feet, 60 mm towards the
            head, 30 mm in-plane, physical directions), so that their context augmentation
            (``RandRoiContextCropd``) can show them what the ROI box gives at inference.
        validation_fraction: share of the cropped cases put in the datalist's ``validation``
            (hash of the case name and ``seed``, as ``flare23 datalist`` and ``split_cases`` do).
        seed: seed of the split.
        workers: parallel processes.
        require_tumor_in_organs: the former switch of the selection, accepted only where it agrees
            with ``model`` (``true`` with ``tumor``, ``false`` with ``organ``); a contradiction is an error.

    Cases without any labelled voxel and cases rejected by the selection are skipped and listed;
    they get no file and no datalist entry. No case left is an error.
    """
    require = _crop_model(model, require_tumor_in_organs)
    split_cases([], validation_fraction, seed)  # validates the options before any work
    pairs = _pair_folders(images, labels, True, "image", "label")
    if margin_mm is None:
        margin_mm = {k: float(hi) for k, (_lo, hi) in CONTEXT_MARGINS_MM.items()}
    else:
        spacing_margin_voxels((1.0, 1.0, 1.0), margin_mm)  # validates the option before any work
    _check_headers(pairs)
    out = _check_output_dir(out, [images, labels], must_be_empty=True)
    image_dir = _check_output_dir(out / "imagesTr", [images, labels])
    label_dir = _check_output_dir(out / "labelsTr", [images, labels])
    jobs = [
        (case, img, lbl, image_dir / f"{case}{IMAGE_SUFFIX}.nii.gz", label_dir / f"{case}.nii.gz", margin_mm, require)
        for case, img, lbl in pairs
    ]

    def report(job, info):
        if info["kept"]:
            _echo(f"{job[0]}: cropped to {info['box']} (shape {info['shape']})")
        else:
            _echo(f"{job[0]}: skipped ({info['reason']})")

    results = _run_cases(_crop_case, jobs, workers, "crop", report)
    kept = [job for job, r in zip(jobs, results) if r["kept"]]
    skipped = [(job[0], r["reason"]) for job, r in zip(jobs, results) if not r["kept"]]
    why = ", ".join(f"{c} ({reason})" for c, reason in skipped)
    if not kept:
        first = ", ".join(f"{c} ({reason})" for c, reason in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        raise Flare23Error(f"crop --model {model}: no case left to train on, all {len(jobs)} skipped: {first}")
    by_case = {job[0]: {"image": _relative(job[3], out), "label": _relative(job[4], out)} for job in kept}
    training, validation = split_cases(list(by_case), validation_fraction, seed)
    datalist = out / "datalist.json"
    atomic_write_json(datalist, {"training": [by_case[c] for c in training], "validation": [by_case[c] for c in validation]})
    if skipped:
        print(f"skipped {len(skipped)}: {why}")
    print(
        f"cropped {len(kept)} of {len(jobs)} cases for the {model} model into {out}; "
        f"datalist: {len(training)} training, {len(validation)} validation cases -> {datalist}"
    )
