"""Phantom cases and data sets: :func:`make_phantom` (one case in memory), :func:`generate_phantoms` (a data set in the FLARE / nnU-Net layout with a MONAI datalist), :func:`phantoms_cli` (``flare23 phantoms``)."""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

from flare23.constants import IMAGE_SUFFIX, LABEL_KEYS, ORGAN_IDS, TUMOR_ID
from flare23.errors import Flare23Error
from flare23.io import atomic_write_json, ensure_output_dir, save_nifti
from flare23.tools.phantoms.anatomy import (
    _M,
    MATERIALS,
    PARTIAL_KEEP,
    PARTIAL_PROPORTIONS,
    PHANTOM_VERSION,
    PSEUDO_ERROR_PROBS,
    PSEUDO_MISSED_FRACTION,
    PSEUDO_SMALL_ORGANS,
    TUMOR_FRACTION,
)
from flare23.tools.phantoms.builder import _Builder
from flare23.tools.phantoms.cases import _check_fraction, _check_int, _check_size, _choice, _sample_case
from flare23.tools.phantoms.lesions import TUMOR_CONTRAST_HU, TUMOR_TYPES, finish_tumors


def _pseudo(organs_map: np.ndarray, rng, miss: int | None) -> tuple[np.ndarray, dict]:
    """Pseudo labels: 13 organs with one-voxel in-plane erosions / dilations, maybe one missed organ."""
    pseudo = organs_map.copy()
    errors = {}
    cross = np.zeros((1, 3, 3), bool)
    cross[0, 1, :] = cross[0, :, 1] = True
    objs = ndimage.find_objects(organs_map, max_label=14)
    for lab in ORGAN_IDS:
        kind = _choice(rng, PSEUDO_ERROR_PROBS)
        box = objs[lab - 1]
        if lab == miss or box is None:
            errors[LABEL_KEYS[lab]] = "missed" if lab == miss else "none"
            continue
        box = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in box)
        org = organs_map[box] == lab
        if kind == "erode":
            er = ndimage.binary_erosion(org, structure=cross)
            if not er.any():
                kind = "none"
            else:
                sub = pseudo[box]
                sub[org & ~er & (sub == lab)] = 0
        elif kind == "dilate":
            di = ndimage.binary_dilation(org, structure=cross)
            sub = pseudo[box]
            grow = di & ~org & (sub == 0)
            if not grow.any():
                kind = "none"
            sub[grow] = lab
        errors[LABEL_KEYS[lab]] = kind
    if miss is not None:
        pseudo[pseudo == miss] = 0
    return pseudo, errors


def _label_counts(label: np.ndarray) -> list[int]:
    """Voxel count of labels 1..14 (counted inside each label's bounding box)."""
    objs = ndimage.find_objects(label, max_label=TUMOR_ID)
    return [0 if box is None else int(np.count_nonzero(label[box] == i + 1)) for i, box in enumerate(objs)]


def _reorient(arr_zyx: np.ndarray, code: str) -> np.ndarray:
    """(z, y, x) RAS array -> (x, y, z) array in orientation ``code``."""
    xyz = arr_zyx.T
    tr = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(code)))
    return nib.orientations.apply_orientation(xyz, tr)


def _affine(case: dict) -> np.ndarray:
    ras = np.diag(list(case["spacing"]) + [1.0])
    ras[:3, 3] = case["origin_ras"]
    tr = nib.orientations.ornt_transform(
        nib.orientations.axcodes2ornt("RAS"), nib.orientations.axcodes2ornt(tuple(case["orientation"]))
    )
    return ras @ nib.orientations.inv_ornt_aff(tr, case["shape_ras"])


def make_phantom(
    seed, size="tiny", tumor=None, orientation=None, slices=None, *, partial_kind=None, pseudo_miss=None, noiseless=False
) -> dict:
    """One synthetic case in memory.

    ``tumor``: True (at least one tumor), False (none) or None (random, probability
    :data:`TUMOR_FRACTION`). ``orientation``: "RAS", "LPS", "LAS" or None (random).
    ``slices``: number of slices (the slice spacing follows, within the size's range).
    ``partial_kind``: "all", "five", "tumor" or None (random, :data:`PARTIAL_PROPORTIONS`; a
    "tumor" partial label of a case without tumor is empty).
    ``pseudo_miss``: True / False / None (random, :data:`PSEUDO_MISSED_FRACTION`) whether the
    pseudo label misses one small organ. ``noiseless``: also return ``noiseless`` (float32), the renderer's
    HU map before noise and blur (material HU + tissue texture), on which the tumors' ``contrast_hu`` is measured.

    Returns a dict: ``image`` (int16 HU), ``label`` (uint8 full labels), ``partial``, ``pseudo``,
    ``organs`` (the clean organ map before tumors were painted), ``tissue`` (uint8 material codes,
    :data:`MATERIALS`), ``affine`` (4 x 4, world RAS+ mm) and ``meta``. Arrays are (x, y, z) in
    the orientation ``meta["orientation"]``.
    """
    case = _sample_case(seed, size, orientation, slices)
    rng = np.random.default_rng([int(seed), 5])
    if tumor is None:
        tumor = bool(rng.random() < TUMOR_FRACTION)
    if partial_kind is None:
        partial_kind = _choice(rng, PARTIAL_PROPORTIONS)
    elif partial_kind not in PARTIAL_PROPORTIONS:
        raise Flare23Error(f"partial_kind {partial_kind!r}: expected one of {', '.join(PARTIAL_PROPORTIONS)}")
    if pseudo_miss is None:
        pseudo_miss = bool(rng.random() < PSEUDO_MISSED_FRACTION)
    miss = int(rng.choice(PSEUDO_SMALL_ORGANS)) if pseudo_miss else None
    noise_std = float(np.clip(rng.uniform(8.0, 20.0) * math.sqrt(2.5 / case["spacing"][2]), 5.0, 40.0))
    pad_value = None
    if size == "full":
        pad_value = int(_choice(rng, {-1024: 0.6, -2048: 0.2, -3024: 0.2}))

    b = _Builder(case)
    b.anatomy()
    tumors = b.tumors(bool(tumor))
    # tumor HU calibrated to the drawn contrast (texture included); contrast_hu, noise_sd_hu, cnr measured
    finish_tumors(tumors, b.material, b.label, b.organs_map, b.hu, b.tex, b.texture, noise_std)
    image = b.image(noise_std, pad_value)
    label = b.label
    keep = np.zeros(256, bool)
    keep[list(PARTIAL_KEEP[partial_kind])] = True
    partial = np.where(keep[label], label, 0).astype(np.uint8)
    pseudo, errors = _pseudo(b.organs_map, np.random.default_rng([int(seed), 6]), miss)

    code = case["orientation"]
    affine = _affine(case)
    inv = np.linalg.inv(affine)
    for t in tumors:  # voxel index of the centre in the returned / written arrays
        t["center_voxel"] = [int(round(v)) for v in nib.affines.apply_affine(inv, t["center_mm"])]
    counts = _label_counts(label)
    meta = {
        "phantom_version": PHANTOM_VERSION,
        "seed": int(seed),
        "size": size,
        "shape": [int(v) for v in _reorient(label, code).shape],
        "spacing": [float(v) for v in case["spacing"]],
        "orientation": code,
        "affine": affine.round(6).tolist(),
        "scan_range": case["scan_range"],
        "canonical_z_mm": [round(v, 2) for v in case["canonical_z"]],
        "phase": case["phase"],
        "body_scale": [round(float(v), 4) for v in case["scale"]],
        "fat_mm": round(case["layers"]["fat_anterior"], 2),
        "noise_std": round(noise_std, 2),
        "pad_value": pad_value,
        "tumors": tumors,
        "partial_kind": partial_kind,
        "pseudo_errors": errors,
        "pseudo_missed": LABEL_KEYS[miss] if miss is not None else None,
        "label_voxels": {LABEL_KEYS[i]: counts[i - 1] for i in range(1, TUMOR_ID + 1)},
        "hu": {name: round(float(b.hu[c]), 1) for name, c in _M.items()},
    }
    out = {
        "image": _reorient(image, code),
        "label": _reorient(label, code),
        "partial": _reorient(partial, code),
        "pseudo": _reorient(pseudo, code),
        "organs": _reorient(b.organs_map, code),
        "tissue": _reorient(b.material, code),
        "affine": affine,
        "meta": meta,
    }
    if noiseless:
        full = tuple(slice(0, n) for n in b.material.shape)
        out["noiseless"] = _reorient((b.hu[b.material] + b.tex[b.material] * b.texture(*full)).astype(np.float32), code)
    return out


# --------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------


def case_seed(seed: int, index: int) -> int:
    """Seed of case ``index`` of a data set generated with ``seed`` (independent of the case count)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint32)[0])


def _counts(n: int, probs: dict) -> dict:
    """Largest-remainder split of n items by probabilities."""
    keys = list(probs)
    raw = np.array([probs[k] for k in keys], float) * n / sum(probs.values())
    base = np.floor(raw).astype(int)
    order = np.argsort(-(raw - base), kind="stable")
    for i in order[: n - base.sum()]:
        base[i] += 1
    return dict(zip(keys, base.tolist()))


def _plan(cases: int, seed: int, tumor_fraction: float, validation_fraction: float) -> list[dict]:
    """Per-case settings with exact proportions (tumor, partial kind, pseudo miss, split)."""
    rng = np.random.default_rng([int(seed), 99])
    tumor = np.zeros(cases, bool)
    tumor[rng.permutation(cases)[: int(round(tumor_fraction * cases))]] = True
    # partial kinds in exact proportions; "tumor only" annotations go to cases with tumors first
    counts = _counts(cases, PARTIAL_PROPORTIONS)
    perm = rng.permutation(cases)
    order = [int(i) for i in perm if tumor[i]] + [int(i) for i in perm if not tumor[i]]
    n_tumor_kind = counts.pop("tumor", 0)
    rest = [k for k, n in counts.items() for _ in range(n)]
    rest = [rest[i] for i in rng.permutation(len(rest))]
    kinds = [""] * cases
    for j, i in enumerate(order):
        kinds[i] = "tumor" if j < n_tumor_kind else rest[j - n_tumor_kind]
    miss = np.zeros(cases, bool)
    miss[rng.permutation(cases)[: int(round(PSEUDO_MISSED_FRACTION * cases))]] = True
    n_val = int(round(validation_fraction * cases))
    if cases >= 2 and validation_fraction > 0:
        n_val = min(max(n_val, 1), cases - 1)
    elif cases < 2:
        n_val = 0
    val = np.zeros(cases, bool)
    val[rng.permutation(cases)[:n_val]] = True
    return [
        {
            "index": i,
            "name": f"phantom_{i:04d}",
            "seed": case_seed(seed, i),
            "tumor": bool(tumor[i]),
            "partial_kind": kinds[i],
            "pseudo_miss": bool(miss[i]),
            "validation": bool(val[i]),
        }
        for i in range(cases)
    ]


def _header() -> nib.Nifti1Header:
    h = nib.Nifti1Header()
    h.set_xyzt_units("mm", "sec")
    return h


def _write_case(out_dir: str, item: dict, size: str, slices) -> dict:
    out = Path(out_dir)
    ph = make_phantom(
        item["seed"],
        size=size,
        tumor=item["tumor"],
        slices=slices,
        partial_kind=item["partial_kind"],
        pseudo_miss=item["pseudo_miss"],
    )
    name, aff, hdr = item["name"], ph["affine"], _header()
    save_nifti(ph["image"], aff, out / "imagesTr" / f"{name}{IMAGE_SUFFIX}.nii.gz", header=hdr, dtype=np.int16)
    save_nifti(ph["label"], aff, out / "labelsTr" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    save_nifti(ph["partial"], aff, out / "partial" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    save_nifti(ph["pseudo"], aff, out / "pseudo" / f"{name}.nii.gz", header=hdr, dtype=np.uint8)
    meta = dict(ph["meta"])
    meta["name"] = name
    meta["validation"] = item["validation"]
    return meta


def generate_phantoms(
    out_dir,
    cases=10,
    seed=0,
    size="small",
    tumor_fraction=TUMOR_FRACTION,
    validation_fraction=0.2,
    slices=None,
    workers=1,
    progress=False,
) -> Path:
    """Write a phantom data set in the FLARE / nnU-Net layout and return ``out_dir``.

    Files: ``imagesTr/<case>_0000.nii.gz`` (int16 HU), ``labelsTr/<case>.nii.gz`` (full labels),
    ``partial/<case>.nii.gz``, ``pseudo/<case>.nii.gz`` (uint8), ``datalist.json`` (MONAI datalist
    with ``training`` and ``validation`` lists, paths relative to ``out_dir``) and
    ``phantoms.json`` (settings and every case's ``meta``). Case ``i`` is named
    ``phantom_{i:04d}``; its anatomy depends only on ``(seed, i)``, while tumor presence, partial
    kind, pseudo-label miss and the validation split are assigned so that their proportions are
    exact for the data set (tumor-only partial labels go to cases with tumors first). ``workers``
    > 1 generates cases in parallel processes with identical output bytes.
    """
    cases = _check_int("cases", cases, 1)
    seed = _check_int("seed", seed, 0)
    workers = _check_int("workers", workers, 1)
    _check_size(size)
    tumor_fraction = _check_fraction("tumor_fraction", tumor_fraction)
    validation_fraction = _check_fraction("validation_fraction", validation_fraction)
    if slices is not None:
        slices = _check_int("slices", slices, 2)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise Flare23Error(f"{out}: exists and is not a folder")
    ensure_output_dir(out)
    for sub in ("imagesTr", "labelsTr", "partial", "pseudo"):
        ensure_output_dir(out / sub)
    plan = _plan(cases, seed, tumor_fraction, validation_fraction)

    from tqdm import tqdm

    metas: list[dict | None] = [None] * cases
    bar = tqdm(total=cases, desc="phantoms", unit="case", disable=not progress)
    try:
        if workers == 1 or cases == 1:
            for item in plan:
                metas[item["index"]] = _write_case(str(out), item, size, slices)
                bar.update(1)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, cases), mp_context=ctx) as pool:
                futures = {pool.submit(_write_case, str(out), item, size, slices): item["index"] for item in plan}
                for fut in as_completed(futures):
                    metas[futures[fut]] = fut.result()
                    bar.update(1)
    finally:
        bar.close()

    def entry(m):
        return {"image": f"imagesTr/{m['name']}{IMAGE_SUFFIX}.nii.gz", "label": f"labelsTr/{m['name']}.nii.gz"}

    datalist = {
        "training": [entry(m) for m in metas if not m["validation"]],
        "validation": [entry(m) for m in metas if m["validation"]],
    }
    atomic_write_json(out / "datalist.json", datalist)
    settings = {
        "phantom_version": PHANTOM_VERSION,
        "cases": cases,
        "seed": seed,
        "size": size,
        "tumor_fraction": tumor_fraction,
        "validation_fraction": validation_fraction,
        "slices": slices,
        "labels": {str(i): k for i, k in LABEL_KEYS.items()},
        "partial_proportions": PARTIAL_PROPORTIONS,
        "pseudo_error_probs": PSEUDO_ERROR_PROBS,
        "pseudo_missed_fraction": PSEUDO_MISSED_FRACTION,
        "materials": MATERIALS,
        "tumor_types": {str(h): types for h, types in TUMOR_TYPES.items()},
        "tumor_contrast_hu": TUMOR_CONTRAST_HU,
    }
    atomic_write_json(out / "phantoms.json", {"settings": settings, "cases": metas})
    return out


def phantoms_cli(
    out_dir, cases=10, seed=0, size="small", tumor_fraction=TUMOR_FRACTION, validation_fraction=0.2, slices=None, workers=1
):
    """Generate synthetic FLARE-like CT phantoms into OUT_DIR (imagesTr, labelsTr, partial, pseudo, datalist.json).

    Sizes: tiny (64 x 64 x 32, for tests), small (128 x 128 x 40-80, for CPU training), full
    (512 x 512 x N at 0.6-1.0 mm in-plane, 0.8-5 mm slices; ``--slices`` fixes N).
    """
    out = generate_phantoms(out_dir, cases, seed, size, tumor_fraction, validation_fraction, slices, workers, progress=True)
    print(f"wrote {cases} {size} phantom case(s) to {out}: imagesTr/, labelsTr/, partial/, pseudo/")
    print(f"datalist: {out / 'datalist.json'}; case details: {out / 'phantoms.json'}")
    return None
