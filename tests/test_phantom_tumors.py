"""Tumors of the synthetic phantoms as a CT shows them: types per host, published contrast per phase, manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from flare23.constants import TUMOR_ID
from flare23.tools.phantoms.anatomy import _TRUNCATE, MATERIALS, PHANTOM_VERSION, TUMOR_MATERIAL_BASE
from flare23.tools.phantoms.cases import _sample_case
from flare23.tools.phantoms.generate import generate_phantoms, make_phantom
from flare23.tools.phantoms.imaging import _blur_sigma
from flare23.tools.phantoms.lesions import (
    TUMOR_APPEARANCE,
    TUMOR_CODE_STRIDE,
    TUMOR_CONTRAST_HU,
    TUMOR_REFERENCE,
    TUMOR_TYPES,
    plan_appearance,
    solve_hu,
    tumor_type,
)

M = MATERIALS
KIDNEYS = (2, 13)
# (seed, size) cases that all get tumors (tumor=True): tiny ones plus a few small ones for larger tumors
CASES = [(s, "tiny") for s in range(8)] + [(2, "small"), (4, "small"), (5, "small")]


def _tumor_masks(ph):
    """Per tumor (manifest order), its voxels from the tissue codes (tumor k: TUMOR_MATERIAL_BASE + stride * k + part)."""
    tis = ph["tissue"]
    out = []
    for k in range(len(ph["meta"]["tumors"])):
        c0 = TUMOR_MATERIAL_BASE + TUMOR_CODE_STRIDE * k
        out.append((tis >= c0) & (tis < c0 + TUMOR_CODE_STRIDE))
    return out


def _reference(ph, host, phase):
    """The host's reference parenchyma (clean organ map, tumors excluded) as a mask."""
    codes = [M[m] for m in TUMOR_REFERENCE[host][phase]]
    return (ph["organs"] == host) & (ph["label"] != TUMOR_ID) & np.isin(ph["tissue"], codes)


@pytest.fixture(scope="module")
def phantoms():
    return {(s, size): make_phantom(s, size, tumor=True, noiseless=True) for s, size in CASES}


def test_contrast_measured_from_the_arrays_lies_in_the_published_range(phantoms):
    seen_types = set()
    for (seed, size), ph in phantoms.items():
        meta = ph["meta"]
        tumors = meta["tumors"]
        assert tumors, (seed, size)
        nl = ph["noiseless"].astype(np.float64)
        masks = _tumor_masks(ph)
        # the label map still marks the whole tumor: every tumor part is label 14 and nothing else is
        union = np.logical_or.reduce(masks)
        assert np.array_equal(union, ph["label"] == TUMOR_ID)
        for t, mask in zip(tumors, masks):
            assert mask.sum() == t["voxels"] > 0
            assert t["phase"] == meta["phase"]
            # measured here, independently of the manifest: mean tumor HU minus mean reference-parenchyma HU
            contrast = float(nl[mask].mean() - nl[_reference(ph, t["host"], t["phase"])].mean())
            lo, hi = TUMOR_CONTRAST_HU[t["type"]][t["phase"]]
            assert lo - 0.05 <= contrast <= hi + 0.05, (seed, size, t)
            assert abs(contrast - t["contrast_hu"]) <= 0.06  # the manifest rounds to 0.1 HU
            assert abs(t["contrast_hu"] - t["hu_delta"]) <= 0.11  # calibrated to the drawn contrast
            assert t["kind"] == ("hypo" if contrast < 0 else "hyper")
            assert t["noise_sd_hu"] == meta["noise_std"]
            assert abs(t["cnr"] - abs(t["contrast_hu"]) / t["noise_sd_hu"]) <= 0.011
            seen_types.add(t["type"])
    assert len(seen_types) >= 4, seen_types


def test_the_image_is_the_noiseless_map_blurred_plus_noise_of_the_stated_sd(phantoms):
    for (seed, size), ph in list(phantoms.items())[::3]:
        # arrays are (x, y, z); the renderer blurs (z, y, x) with _blur_sigma(spacing), edges "nearest"
        sig = _blur_sigma(ph["meta"]["spacing"])[::-1]
        blurred = ndimage.gaussian_filter(ph["noiseless"], sig, mode="nearest", truncate=_TRUNCATE)
        noise = ph["image"].astype(np.float32) - blurred
        body = blurred > -500  # away from the -1024 clip of air
        sd = ph["meta"]["tumors"][0]["noise_sd_hu"]
        # hundreds of thousands of voxels: the SD estimate is good to ~1 %; rounding adds 0.3 HU in quadrature
        assert abs(float(noise[body].std()) - sd) <= 0.08 * sd + 0.5, (seed, size)


def test_each_host_gets_only_its_tumor_types_in_their_proportions():
    for host, types in TUMOR_TYPES.items():
        draws = [tumor_type(u, host) for u in np.linspace(0.0, 1.0, 1000, endpoint=False)]
        assert set(draws) == set(types)
        for name, p in types.items():
            assert abs(draws.count(name) / 1000 - p / sum(types.values())) <= 0.002
    for types in TUMOR_TYPES.values():
        for name in types:
            assert set(TUMOR_CONTRAST_HU[name]) == {"arterial", "portal"} and name in TUMOR_APPEARANCE
            for lo, hi in TUMOR_CONTRAST_HU[name].values():
                assert lo < hi and (hi < 0 or lo > 0)  # the kind (hypo / hyper) is defined by the type and phase
    seen = {}
    for s in range(40):
        for t in make_phantom(s, "tiny", tumor=True)["meta"]["tumors"]:
            assert t["type"] in TUMOR_TYPES[t["host"]], t
            seen.setdefault(t["host"], set()).add(t["type"])
    assert len(seen) == len(TUMOR_TYPES)


def test_kidney_tumors_in_the_portal_phase_are_clearly_visible():
    """Kidney tumors in the portal (nephrographic) phase: |contrast| >= 40 HU, the table's smallest magnitude for
    the kidneys in that phase (rcc_clear_cell -100..-40, rcc_papillary -110..-60), which is >= 2 x the noise SD
    (at most 20 HU for tiny and small phantoms). Against the parenchyma's parts: the portal medulla lies 0-25 HU
    below the cortex (cases.py), so the tumor is >= 40 - 25 = 15 HU darker than either; 10 HU leaves room for the
    texture's local mean. In the final image the tumor's core is darker than the (eroded) parenchyma by more than
    2 noise SD: the core is one voxel inside, where the partial-volume blur (sigma <= 0.7 voxel) barely reaches.
    """
    found = 0
    for size in ("tiny", "small"):
        for seed in range(60):
            if found >= 4 * (1 + (size == "small")) or _sample_case(seed, size)["phase"] != "portal":
                continue
            ph = make_phantom(seed, size, tumor=True, noiseless=True)
            nl, img = ph["noiseless"].astype(np.float64), ph["image"].astype(np.float64)
            for t, mask in zip(ph["meta"]["tumors"], _tumor_masks(ph)):
                if t["host"] not in KIDNEYS:
                    continue
                found += 1
                assert t["type"] in ("rcc_clear_cell", "rcc_papillary") and t["kind"] == "hypo"
                assert t["contrast_hu"] <= -40.0 and t["noise_sd_hu"] <= 20.0 and t["cnr"] >= 2.0, t
                kidney = (ph["organs"] == t["host"]) & (ph["label"] != TUMOR_ID)
                tumor_hu = nl[mask].mean()
                for part in ("kidney_cortex", "kidney_medulla"):
                    assert tumor_hu <= nl[kidney & (ph["tissue"] == M[part])].mean() - 10.0, (seed, size, part, t)
                core = ndimage.binary_erosion(mask)
                if core.sum() >= 3:
                    paren = ndimage.binary_erosion(_reference(ph, t["host"], "portal"))
                    assert img[core].mean() <= img[paren].mean() - 2.0 * t["noise_sd_hu"], (seed, size, t)
    assert found >= 8


def _sphere(diam_mm, voxel_mm):
    n = int(np.ceil(diam_mm / voxel_mm)) + 3
    g = (np.indices((n, n, n)) - (n - 1) / 2.0) * voxel_mm
    rho = np.sqrt((g**2).sum(axis=0)) / (diam_mm / 2.0)
    return rho <= 1.0, np.where(rho <= 1.0, rho, 1.0)


@pytest.mark.parametrize(
    "ttype, phase, diam",
    [("metastasis", "arterial", 40.0), ("hcc", "portal", 35.0), ("rcc_clear_cell", "portal", 45.0), ("pdac", "arterial", 30.0)],
)
def test_texture_and_margin_rules_on_a_large_tumor(ttype, phase, diam):
    sp = np.array([1.0, 1.0, 1.0])
    mask, rho = _sphere(diam, 1.0)
    parts, model = plan_appearance(np.random.default_rng(7), ttype, phase, diam, mask, rho, sp)
    hu, tex = np.zeros(256, np.float32), np.zeros(256, np.float32)
    host_hu, target = 100.0, float(np.mean(TUMOR_CONTRAST_HU[ttype][phase]))
    counts = np.bincount(parts[mask], minlength=TUMOR_CODE_STRIDE)
    solve_hu(hu, tex, TUMOR_MATERIAL_BASE, model, target, host_hu, counts, np.zeros(TUMOR_CODE_STRIDE))
    vals = hu[TUMOR_MATERIAL_BASE + parts]
    assert abs(float(vals[mask].mean()) - (host_hu + target)) < 1e-3  # the tumor's mean contrast is the target
    feats = model["features"]
    outer, centre = mask & (rho > 0.95), mask & (rho < 0.15)
    body = mask & (parts == 0)
    if ttype == "metastasis":  # enhancing rim around a darker body, low-attenuation (necrotic) centre
        assert "rim_mm" in feats and "necrosis_radius_fraction" in feats
        assert vals[outer].mean() > vals[body].mean() + 15 and vals[centre].max() <= 35.0
    elif ttype == "hcc":  # mosaic nodules, enhancing capsule in the portal phase
        assert feats["mosaic_nodules"] >= 2 and "capsule_mm" in feats
        assert len(np.unique(vals[mask & (rho < 0.8)])) >= 2 and vals[outer].mean() > np.median(vals[mask & (rho < 0.8)])
    elif ttype == "rcc_clear_cell":  # heterogeneous, necrotic centre
        assert feats["heterogeneity_hu"] >= 15 and vals[centre].max() <= 40.0
    else:  # PDAC: soft margin centred on the boundary: the outermost voxels carry about half the body's contrast
        assert feats["margin_mm"] >= 2.0
        body_c, outer_c = vals[body].mean() - host_hu, vals[outer].mean() - host_hu
        assert body_c < 0 and 0.5 * abs(body_c) < abs(outer_c) < 0.7 * abs(body_c)
        assert body_c < target  # the body more hypoattenuating than the tumor's mean


def test_version_and_manifest_fields_written(tmp_path):
    root = generate_phantoms(tmp_path / "ds", cases=3, seed=1, size="tiny", tumor_fraction=1.0)
    data = json.loads((root / "phantoms.json").read_text())
    assert data["settings"]["phantom_version"] == PHANTOM_VERSION == "2"
    keys = {"host", "host_name", "type", "phase", "kind", "hu_delta", "contrast_hu", "noise_sd_hu", "cnr"}
    keys |= {"diameter_mm", "center_mm", "voxels", "center_voxel", "appearance"}
    for meta in data["cases"]:
        assert meta["phantom_version"] == PHANTOM_VERSION and meta["tumors"]
        for t in meta["tumors"]:
            assert set(t) == keys, set(t) ^ keys  # nothing private (no "_draw") leaks into the manifest
